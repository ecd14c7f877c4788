"""training_runs.run_uuid: an identity that no other database can give the same run.

A run id is only unique within its database: run 1 of a PostgreSQL server and run 1 of an unrelated
SQLite file are different runs. The journal of an unreachable database's writes carries the UUID, and
`python -m midisc.db sync` sends it only to a database whose run has that UUID. Runs recorded before
this revision get one here.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("run_uuid", sa.String(36), nullable=True))
        batch.create_index("training_runs_run_uuid", ["run_uuid"], unique=True)
    runs = sa.table("training_runs", sa.column("id", sa.Integer()), sa.column("run_uuid", sa.String(36)))
    connection = op.get_bind()
    for (run_id,) in connection.execute(sa.select(runs.c.id)).all():
        connection.execute(runs.update().where(runs.c.id == run_id).values(run_uuid=str(uuid.uuid4())))


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_index("training_runs_run_uuid")
        batch.drop_column("run_uuid")
