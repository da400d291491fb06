"""layer_stats and param_stats partitioned by day on PostgreSQL

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

PostgreSQL: each table becomes ``PARTITION BY RANGE (day)`` with a primary key that ends in ``day`` (a partition
key must be in it), a default partition, one partition per day its rows fall on and today plus the 7 days after.
Rows already stored are copied in; their day is that of their step's time in ``step_stats`` (today where none is
left). SQLite: the column only (0), its tables stay plain. See ``layerwatch_server.storage.partitions``.
Self-contained (no imports of the collector's code), as a revision must keep meaning what it did.
"""

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = {'layer_stats': 'layer_id', 'param_stats': 'param_id'}
AHEAD_DAYS = 7
TODAY = "((now() AT TIME ZONE 'UTC')::date - DATE '1970-01-01')"
# A step's day, never later than today nor before 1970-01-01 (as ingest clamps it).
STEP_DAY = f"GREATEST(LEAST(floor(s.time / 86400), {TODAY}), 0)::integer"


def _partition(table: str, day: int) -> str:
    return f"{table}_{dt.date(1970, 1, 1) + dt.timedelta(days=day):%Y_%m_%d}"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != 'postgresql':
        for table in TABLES:
            op.add_column(table, sa.Column('day', sa.Integer(), nullable=False, server_default='0'))
        return
    today = bind.scalar(sa.text(f'SELECT {TODAY}'))
    days = set(bind.scalars(sa.text(f'SELECT DISTINCT {STEP_DAY} FROM step_stats s')))
    days |= set(range(today, today + AHEAD_DAYS + 1))
    for table, series in TABLES.items():
        old = f'{table}_0005'
        op.execute(f'ALTER TABLE {table} RENAME TO {old}')
        op.execute(f'ALTER TABLE {old} RENAME CONSTRAINT pk_{table} TO pk_{old}')
        # Writers that leave day out (not ingest) file rows under the day they store them.
        op.execute(
            f'CREATE TABLE {table} (LIKE {old}, day integer NOT NULL DEFAULT {TODAY}, '
            f'CONSTRAINT pk_{table} PRIMARY KEY (run_id, {series}, rank, step, day)) PARTITION BY RANGE (day)'
        )
        op.execute(f'CREATE TABLE {table}_default PARTITION OF {table} DEFAULT')
        for day in sorted(days):
            bounds = f'FOR VALUES FROM ({day}) TO ({day + 1})'
            op.execute(f'CREATE TABLE {_partition(table, day)} PARTITION OF {table} {bounds}')
        columns = ', '.join(f'o.{c["name"]}' for c in sa.inspect(bind).get_columns(old))
        op.execute(
            f'INSERT INTO {table} SELECT {columns}, COALESCE({STEP_DAY}, {TODAY}) FROM {old} o '
            'LEFT JOIN step_stats s ON s.run_id = o.run_id AND s.rank = o.rank AND s.step = o.step'
        )
        op.execute(f'DROP TABLE {old}')
        op.execute(f'ANALYZE {table}')


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != 'postgresql':
        for table in TABLES:
            op.execute(f'ALTER TABLE {table} DROP COLUMN day')
        return
    for table, series in TABLES.items():
        old = f'{table}_0006'
        op.execute(f'ALTER TABLE {table} RENAME TO {old}')
        op.execute(f'ALTER INDEX pk_{table} RENAME TO pk_{old}')
        columns = [c for c in sa.inspect(bind).get_columns(old) if c['name'] != 'day']
        op.create_table(
            table,
            *(sa.Column(c['name'], c['type'], nullable=c['nullable']) for c in columns),
            sa.PrimaryKeyConstraint('run_id', series, 'rank', 'step', name=f'pk_{table}'),
        )
        names = ', '.join(c['name'] for c in columns)
        # The same step under two days (re-sent after its day was rolled up) is kept once.
        op.execute(f'INSERT INTO {table} ({names}) SELECT {names} FROM {old} ON CONFLICT DO NOTHING')
        op.execute(f'DROP TABLE {old}')  # with its partitions
