"""Baseline: the six tables exactly as `Base.metadata.create_all` built them before midisc had migrations.

A database made by that midisc already holds some or all of them (the last two came later), so each
table is created only where it is missing and existing tables, with their rows, are left as they are.
Types and check constraints are written out here rather than imported from tables.py: a revision
records the schema as it was, whatever the models say today.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), autoincrement=True, primary_key=True)


def _run_id() -> sa.Column:
    return sa.Column("run_id", sa.Integer(), sa.ForeignKey("training_runs.id", ondelete="CASCADE"), nullable=False)


def _timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _create(table: str, *elements: sa.SchemaItem, run_id_index: bool = True) -> None:
    op.create_table(table, *elements)
    if run_id_index:
        op.create_index(f"ix_{table}_run_id", table, ["run_id"])


def _training_runs() -> None:
    _create(
        "training_runs",
        _id(),
        sa.Column("status", sa.String(16), nullable=False),
        _timestamp("started_at"),
        _timestamp("ended_at", nullable=True),
        sa.Column("model", sa.String(512), nullable=False),
        sa.Column("hook", sa.String(256), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=True),
        sa.Column("architecture", sa.String(128), nullable=False),
        sa.Column("d_in", sa.Integer(), nullable=True),
        sa.Column("d_sae", sa.Integer(), nullable=True),
        sa.Column("n_tokens", sa.BigInteger(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("mse", sa.Float(), nullable=True),
        sa.Column("fvu", sa.Float(), nullable=True),
        sa.Column("l0", sa.Float(), nullable=True),
        sa.Column("dead_frac", sa.Float(), nullable=True),
        sa.Column("output_dir", sa.String(1024), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'completed', 'failed', 'interrupted')", name="training_runs_status_valid"
        ),
        run_id_index=False,
    )


def _epoch_metrics() -> None:
    _create(
        "epoch_metrics",
        _id(),
        _run_id(),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _timestamp("recorded_at"),
        sa.UniqueConstraint("run_id", "epoch", name="epoch_metrics_run_epoch"),
    )


def _discovered_features() -> None:
    _create(
        "discovered_features",
        _id(),
        _run_id(),
        sa.Column("feature_index", sa.Integer(), nullable=False),
        sa.Column("frequency", sa.Float(), nullable=True),
        sa.Column("mean_activation", sa.Float(), nullable=True),
        sa.Column("max_activation", sa.Float(), nullable=True),
        sa.Column("is_dead", sa.Boolean(), nullable=False),
        sa.UniqueConstraint("run_id", "feature_index", name="discovered_features_run_index"),
    )


def _sae_models() -> None:
    _create(
        "sae_models",
        _id(),
        _run_id(),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("d_in", sa.Integer(), nullable=False),
        sa.Column("d_sae", sa.Integer(), nullable=False),
        sa.Column("architecture", sa.String(128), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        _timestamp("created_at"),
    )


def _feature_examples() -> None:
    _create(
        "feature_examples",
        _id(),
        _run_id(),
        sa.Column("feature_index", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("activation", sa.Float(), nullable=False),
        sa.Column("context_index", sa.Integer(), nullable=False),
        sa.Column("token_index", sa.Integer(), nullable=False),
        sa.Column("max_token_index", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.JSON(), nullable=False),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.CheckConstraint("kind IN ('top', 'quantile')", name="feature_examples_kind_valid"),
        sa.UniqueConstraint(
            "run_id", "feature_index", "kind", "rank", name="feature_examples_run_feature_kind_rank"
        ),
    )
    op.create_index("feature_examples_run_feature", "feature_examples", ["run_id", "feature_index"])


def _concept_scores() -> None:
    _create(
        "concept_scores",
        _id(),
        _run_id(),
        sa.Column("concept", sa.String(128), nullable=False),
        sa.Column("feature_index", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("mean_concept", sa.Float(), nullable=False),
        sa.Column("mean_contrast", sa.Float(), nullable=False),
        sa.Column("fire_rate_concept", sa.Float(), nullable=False),
        sa.Column("fire_rate_contrast", sa.Float(), nullable=False),
        sa.Column("n_concept", sa.Integer(), nullable=False),
        sa.Column("n_contrast", sa.Integer(), nullable=False),
        _timestamp("created_at"),
        sa.UniqueConstraint("run_id", "concept", "feature_index", name="concept_scores_run_concept_feature"),
    )


# Oldest first: every other table's run_id refers to training_runs.
CREATORS = {
    "training_runs": _training_runs,
    "epoch_metrics": _epoch_metrics,
    "discovered_features": _discovered_features,
    "sae_models": _sae_models,
    "feature_examples": _feature_examples,
    "concept_scores": _concept_scores,
}


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for table, create in CREATORS.items():
        if table not in existing:
            create()


def downgrade() -> None:
    for table in reversed(list(CREATORS)):
        op.drop_table(table)
