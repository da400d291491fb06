"""write probes (readiness)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import layerwatch_server.storage.base


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('write_probes',
    sa.Column('replica', sa.String(length=100), nullable=False),
    sa.Column('checked_at', layerwatch_server.storage.base.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('replica', name=op.f('pk_write_probes'))
    )


def downgrade() -> None:
    op.drop_table('write_probes')
