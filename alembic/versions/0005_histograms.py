"""per-layer histograms

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('histogram_edges',
    sa.Column('id', sa.String(length=16), nullable=False),
    sa.Column('edges', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_histogram_edges'))
    )
    op.create_table('histograms',
    sa.Column('run_id', sa.String(length=16), nullable=False),
    sa.Column('layer', sa.String(length=500), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('edges_id', sa.String(length=16), nullable=False),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('nan', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('run_id', 'layer', 'kind', 'step', name=op.f('pk_histograms')),
    sqlite_with_rowid=False
    )


def downgrade() -> None:
    op.drop_table('histograms')
    op.drop_table('histogram_edges')
