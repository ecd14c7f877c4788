"""feature_profiles: per feature, what its dashboard shows besides examples (density, output tokens, neighbours).

Measured when a run is published (at the end of training, or by `python -m midisc.export`), so the feature
browser reads a dashboard from the database instead of recomputing it with the language model.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feature_profiles",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("training_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("feature_index", sa.Integer(), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=False),
        sa.UniqueConstraint("run_id", "feature_index", name="feature_profiles_run_index"),
    )
    op.create_index("ix_feature_profiles_run_id", "feature_profiles", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_feature_profiles_run_id", table_name="feature_profiles")
    op.drop_table("feature_profiles")
