"""training_runs.sweep_id and training_runs.overrides: which Hydra multirun sweep a run belongs to, and how
its job's command line set it apart.

Both are nullable: runs recorded before this revision, and single runs, have neither.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("sweep_id", sa.String(1024), nullable=True))
        batch.add_column(sa.Column("overrides", sa.JSON(), nullable=True))
        batch.create_index("training_runs_sweep_id", ["sweep_id"])


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_index("training_runs_sweep_id")
        batch.drop_column("overrides")
        batch.drop_column("sweep_id")
