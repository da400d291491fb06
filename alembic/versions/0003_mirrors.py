"""mlflow mirror cursor

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import layerwatch_server.storage.base


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('mlflow_mirror',
    sa.Column('run_id', sa.String(length=16), nullable=False),
    sa.Column('last_step', sa.BigInteger(), nullable=True),
    sa.Column('nonfinite_values', sa.BigInteger(), nullable=False),
    sa.Column('first_nonfinite_step', sa.BigInteger(), nullable=True),
    sa.Column('ended_status', sa.String(length=16), nullable=True),
    sa.Column('updated_at', layerwatch_server.storage.base.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_mlflow_mirror'))
    )


def downgrade() -> None:
    op.drop_table('mlflow_mirror')
