"""The tables that record training runs and what was found in them, as SQLAlchemy 2.0 declarative models.

These models are the schema's present; the Alembic revisions in `midisc/store/migrations/versions` are its
history, and `midisc.store.schema` brings a database up to them. A change here needs a new revision too:
`python -m midisc.db check` (and tests/test_migrations.py) reports any model the revisions do not build.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

RUN_STATUSES = ("running", "completed", "failed", "interrupted")
# "top": the highest-activating contexts; "quantile": contexts sampled across the activation range.
EXAMPLE_KINDS = ("top", "quantile")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that goes in and comes out as timezone-aware UTC on every backend.

    SQLite has no timezone type and hands back naive datetimes, while PostgreSQL's timestamptz comes
    back in the session's time zone; normalising here keeps callers from ever comparing naive with
    aware values.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value.isoformat()} has no time zone; pass an aware datetime (UTC)")
        value = value.astimezone(timezone.utc)
        # SQLite would store the offset as text and compare strings; store naive UTC instead.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime}


def as_dict(row: Base) -> dict[str, Any]:
    """A row as {column: value}, the plain form every Store read returns."""
    return {column.key: getattr(row, column.key) for column in row.__table__.columns}


class TrainingRun(Base):
    """One training run: what was trained, how it went, and its headline final metrics."""

    __tablename__ = "training_runs"
    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in RUN_STATUSES) + ")",
            name="training_runs_status_valid",
        ),
        Index("training_runs_sweep_id", "sweep_id"),
        Index("training_runs_run_uuid", "run_uuid", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    model: Mapped[str] = mapped_column(String(512))
    hook: Mapped[str] = mapped_column(String(256))
    layer: Mapped[int | None] = mapped_column(Integer)
    architecture: Mapped[str] = mapped_column(String(128))
    d_in: Mapped[int | None] = mapped_column(Integer)
    d_sae: Mapped[int | None] = mapped_column(Integer)
    # Activation vectors seen in training; passes 2**31 on long runs, hence BigInteger.
    n_tokens: Mapped[int | None] = mapped_column(BigInteger)
    config: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any] | None]
    mse: Mapped[float | None] = mapped_column(Float)
    fvu: Mapped[float | None] = mapped_column(Float)
    l0: Mapped[float | None] = mapped_column(Float)
    dead_frac: Mapped[float | None] = mapped_column(Float)
    output_dir: Mapped[str] = mapped_column(String(1024))
    error: Mapped[str | None] = mapped_column(Text)
    # The Hydra multirun sweep the run belongs to (None for a single run), so a sweep's runs can be listed.
    sweep_id: Mapped[str | None] = mapped_column(String(1024))
    # The job's command-line overrides, e.g. ["sae.k=16", "layer=3"]: what sets a run apart within its sweep.
    overrides: Mapped[list[str] | None] = mapped_column(JSON)
    # Unique across databases (a run id is not): a journal of kept writes names it, so `db sync` can tell
    # its own run from another database's run with the same id. Revision 0004 gave older runs one.
    run_uuid: Mapped[str | None] = mapped_column(String(36))


class EpochMetric(Base):
    """The metrics logged at the end of one epoch of one run."""

    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("run_id", "epoch", name="epoch_metrics_run_epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    recorded_at: Mapped[datetime] = mapped_column(default=utc_now)


class DiscoveredFeature(Base):
    """Firing statistics of one SAE latent after training."""

    __tablename__ = "discovered_features"
    __table_args__ = (UniqueConstraint("run_id", "feature_index", name="discovered_features_run_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    feature_index: Mapped[int] = mapped_column(Integer)
    # Fraction of tokens on which the latent fires.
    frequency: Mapped[float | None] = mapped_column(Float)
    # Mean over the tokens where it fires; undefined (NULL) for a latent that never fires.
    mean_activation: Mapped[float | None] = mapped_column(Float)
    max_activation: Mapped[float | None] = mapped_column(Float)
    is_dead: Mapped[bool] = mapped_column(Boolean)


class SAEModel(Base):
    """A saved SAE checkpoint produced by a run."""

    __tablename__ = "sae_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    d_in: Mapped[int] = mapped_column(Integer)
    d_sae: Mapped[int] = mapped_column(Integer)
    architecture: Mapped[str] = mapped_column(String(128))
    checksum: Mapped[str] = mapped_column(String(64))  # sha256 hex digest of the weights file
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class FeatureExample(Base):
    """One context window in which a feature fires: a top example or a sample from one activation quantile."""

    __tablename__ = "feature_examples"
    __table_args__ = (
        CheckConstraint(
            "kind IN (" + ", ".join(f"'{k}'" for k in EXAMPLE_KINDS) + ")",
            name="feature_examples_kind_valid",
        ),
        UniqueConstraint("run_id", "feature_index", "kind", "rank", name="feature_examples_run_feature_kind_rank"),
        Index("feature_examples_run_feature", "run_id", "feature_index"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    feature_index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    rank: Mapped[int] = mapped_column(Integer)  # 0-based order within the feature and kind
    activation: Mapped[float] = mapped_column(Float)  # the example's max activation
    context_index: Mapped[int] = mapped_column(Integer)
    token_index: Mapped[int] = mapped_column(Integer)  # position of the max token inside its context
    max_token_index: Mapped[int] = mapped_column(Integer)  # position of the max token inside the stored window
    tokens: Mapped[list[str]] = mapped_column(JSON)  # one string per token of the window
    values: Mapped[list[float]] = mapped_column(JSON)  # the feature's activation on each token of the window


class ConceptScore(Base):
    """How well one feature separates texts of a concept from contrast texts (AUROC), ranked per concept."""

    __tablename__ = "concept_scores"
    __table_args__ = (
        UniqueConstraint("run_id", "concept", "feature_index", name="concept_scores_run_concept_feature"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    concept: Mapped[str] = mapped_column(String(128))
    feature_index: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)  # 0 = most selective
    score: Mapped[float] = mapped_column(Float)  # AUROC of the feature's activation, concept vs contrast
    mean_concept: Mapped[float] = mapped_column(Float)
    mean_contrast: Mapped[float] = mapped_column(Float)
    fire_rate_concept: Mapped[float] = mapped_column(Float)
    fire_rate_contrast: Mapped[float] = mapped_column(Float)
    n_concept: Mapped[int] = mapped_column(Integer)
    n_contrast: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Evaluation(Base):
    """One evaluation of a run's SAE (eval_type "core": SAEBench's core metrics), the whole result as JSON."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    eval_type: Mapped[str] = mapped_column(String(64))
    tokens: Mapped[int] = mapped_column(Integer)  # tokens whose next-token loss was measured with the SAE spliced in
    result: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class FeatureProfile(Base):
    """What a feature's dashboard shows beyond its examples, measured when the run was published.

    `profile` holds plain JSON: `density` (its nonzero activations counted in equal bins between their
    min and max: {"low", "high", "heights"}), `promoted` and `suppressed` (the output tokens its decoder
    direction raises and lowers most: [[token, logit], ...]), `logits` (that effect over the whole
    vocabulary, binned like density) and `similar` (the features with the closest decoder directions:
    [[feature, cosine], ...]). Keys a run could not measure (output tokens of a hook that is not residual
    width) are absent.
    """

    __tablename__ = "feature_profiles"
    __table_args__ = (UniqueConstraint("run_id", "feature_index", name="feature_profiles_run_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    feature_index: Mapped[int] = mapped_column(Integer)
    profile: Mapped[dict[str, Any]]


class FeatureExplanation(Base):
    """A feature explained in words by a language model, and how well the explanation predicts where it fires.

    One row per run, feature, explainer and prompt version, so a run explained again with the same explainer
    and prompt continues where it stopped, and another explainer's explanations sit beside it.
    """

    __tablename__ = "feature_explanations"
    __table_args__ = (
        UniqueConstraint("run_id", "feature_index", "explainer", "prompt_version",
                         name="feature_explanations_run_feature_explainer_prompt"),
        Index("feature_explanations_run_feature", "run_id", "feature_index"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    feature_index: Mapped[int] = mapped_column(Integer)
    explainer: Mapped[str] = mapped_column(String(256))      # the explaining model, e.g. "SmolLM2-135M-Instruct"
    scorer: Mapped[str | None] = mapped_column(String(256))  # the scoring model; None until scored
    prompt_version: Mapped[str] = mapped_column(String(32))
    explanation: Mapped[str] = mapped_column(Text)
    # Balanced accuracy of the scorer given the explanation: activating vs non-activating contexts (detection),
    # correctly vs randomly marked tokens (fuzzing); the same with another feature's explanation (baseline).
    detection: Mapped[float | None] = mapped_column(Float)
    fuzzing: Mapped[float | None] = mapped_column(Float)
    baseline_detection: Mapped[float | None] = mapped_column(Float)
    baseline_fuzzing: Mapped[float | None] = mapped_column(Float)
    scores: Mapped[dict[str, Any] | None]  # every figure: AUROC, counts, the answers
    examples: Mapped[dict[str, Any]]       # which examples explained it and which scored it
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
