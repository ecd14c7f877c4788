"""feature_explanations: features explained in words by a language model, with detection and fuzzing scores.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feature_explanations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("training_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("feature_index", sa.Integer(), nullable=False),
        sa.Column("explainer", sa.String(256), nullable=False),
        sa.Column("scorer", sa.String(256), nullable=True),
        sa.Column("prompt_version", sa.String(32), nullable=False),
        sa.Column("explanation", sa.Text(), nullable=False),
        sa.Column("detection", sa.Float(), nullable=True),
        sa.Column("fuzzing", sa.Float(), nullable=True),
        sa.Column("baseline_detection", sa.Float(), nullable=True),
        sa.Column("baseline_fuzzing", sa.Float(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("examples", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id", "feature_index", "explainer", "prompt_version",
                            name="feature_explanations_run_feature_explainer_prompt"),
    )
    op.create_index("ix_feature_explanations_run_id", "feature_explanations", ["run_id"])
    op.create_index("feature_explanations_run_feature", "feature_explanations", ["run_id", "feature_index"])


def downgrade() -> None:
    op.drop_index("feature_explanations_run_feature", table_name="feature_explanations")
    op.drop_index("ix_feature_explanations_run_id", table_name="feature_explanations")
    op.drop_table("feature_explanations")
