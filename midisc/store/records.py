"""`Store`: write what a training run produces, and read it back as plain dicts.

Every call opens its own short session and transaction, so a crash between calls never leaves a
half-written transaction holding locks, and a crash inside one rolls it back whole.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from midisc.store.bulk import replace_run_rows
from midisc.store.engine import StoreError, connect, database_identity, parse_url
from midisc.store.explanations import ExplanationsMixin
from midisc.store.findings import FindingsMixin
from midisc.store.pages import PagesMixin
from midisc.store.schema import ensure_current
from midisc.store.tables import (
    RUN_STATUSES,
    Base,
    DiscoveredFeature,
    EpochMetric,
    Evaluation,
    SAEModel,
    TrainingRun,
    as_dict,
    utc_now,
)
from midisc.store.values import finite_floats, finite_json, finite_or_none

FINISHED_STATUSES = tuple(s for s in RUN_STATUSES if s != "running")
# Final metrics copied into their own columns so runs can be sorted and filtered in SQL.
HEADLINE_METRICS = ("mse", "fvu", "l0", "dead_frac")
UPDATABLE_RUN_FIELDS = ("model", "hook", "layer", "architecture", "d_in", "d_sae", "n_tokens", "config", "output_dir",
                        "sweep_id", "overrides")
SHA256_HEX_DIGITS = 64


class UnknownRunError(KeyError):
    """No run has the requested id. Prints as a plain sentence, not KeyError's quoted repr."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Store(FindingsMixin, ExplanationsMixin, PagesMixin):
    """The record of training runs in a SQL database (SQLite file or PostgreSQL server).

    The writes and reads of feature examples, profiles and concept scores come from `FindingsMixin`
    (findings.py); explanations in words from `ExplanationsMixin` (explanations.py); the paged, sorted reads the
    feature browser lists from `PagesMixin` (pages.py).
    """

    def __init__(self, url: str) -> None:
        self._engine = connect(url)
        self.url: str = parse_url(url).render_as_string(hide_password=True)
        # Which database this is, the same from any working folder: what a journal of kept writes records.
        self.database: str = database_identity(url)
        try:
            ensure_current(self._engine, self.url)
        except StoreError:
            self._engine.dispose()
            raise
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ----- writes -------------------------------------------------------------------------------

    def start_run(
        self,
        *,
        model: str,
        hook: str,
        layer: int | None,
        architecture: str,
        config: dict,
        output_dir: str,
        d_in: int | None = None,
        d_sae: int | None = None,
        sweep_id: str | None = None,
        overrides: list[str] | None = None,
        run_uuid: str | None = None,
        started_at: datetime | None = None,
    ) -> int:
        """Record a new run with status "running"; returns its id.

        `sweep_id` names the Hydra multirun sweep the run is part of; `overrides` are its job's command-line
        overrides (strings, e.g. "sae.k=16"). `run_uuid` and `started_at` are new ones unless given: a run
        recreated from its journal keeps its own.
        """
        run = TrainingRun(
            status="running",
            run_uuid=run_uuid or str(uuid.uuid4()),
            started_at=started_at or utc_now(),
            model=model,
            hook=hook,
            layer=layer,
            architecture=architecture,
            d_in=d_in,
            d_sae=d_sae,
            config=finite_json(config, "config"),
            output_dir=str(output_dir),
            sweep_id=sweep_id,
            # A list of str even when Hydra hands over its own ListConfig, which JSON cannot encode.
            overrides=None if overrides is None else [str(item) for item in overrides],
        )
        with self._sessions.begin() as session:
            session.add(run)
            session.flush()
            return run.id

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set descriptive fields learned after the start, e.g. d_in, d_sae, n_tokens."""
        unknown = sorted(set(fields) - set(UPDATABLE_RUN_FIELDS))
        if unknown:
            raise ValueError(
                f"cannot update run field(s) {', '.join(unknown)}; updatable: {', '.join(UPDATABLE_RUN_FIELDS)}"
                " (status, metrics and error are set by finish_run)"
            )
        if "config" in fields:
            fields["config"] = finite_json(fields["config"], "config")
        with self._sessions.begin() as session:
            run = self._run(session, run_id)
            for name, value in fields.items():
                setattr(run, name, value)

    def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        metrics: dict | None = None,
        error: str | None = None,
    ) -> None:
        """Mark the run completed, failed or interrupted, with its final metrics and/or error."""
        if status not in FINISHED_STATUSES:
            raise ValueError(f"finish status {status!r} is not one of {', '.join(FINISHED_STATUSES)}")
        clean = finite_json(metrics, "metrics") if metrics is not None else None
        with self._sessions.begin() as session:
            run = self._run(session, run_id)
            run.status = status
            run.ended_at = utc_now()
            run.error = error
            if clean is not None:
                run.metrics = clean
                for name in HEADLINE_METRICS:
                    if name in metrics:
                        setattr(run, name, finite_or_none(metrics[name], f"metric {name!r}"))

    def update_metrics(self, run_id: int, metrics: dict[str, float]) -> None:
        """Merge `metrics` into the run's final metrics: what a later analysis or evaluation measured again
        (analysed_tokens, the spliced-in scores), so the run's record and every export made from it agree."""
        clean = finite_json(metrics, "metrics")
        with self._sessions.begin() as session:
            run = self._run(session, run_id)
            run.metrics = {**(run.metrics or {}), **clean}
            for name in HEADLINE_METRICS:
                if name in metrics:
                    setattr(run, name, finite_or_none(metrics[name], f"metric {name!r}"))

    def reopen_run(self, run_id: int) -> None:
        """Mark a failed, interrupted or killed run as running again, for a resume into the same run."""
        with self._sessions.begin() as session:
            run = self._run(session, run_id)
            run.status, run.ended_at, run.error = "running", None, None

    def add_epoch_metrics(self, run_id: int, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """Record one epoch's metrics; writing the same epoch again replaces the earlier row."""
        clean = finite_json(metrics, "metrics")
        with self._sessions.begin() as session:
            self._run(session, run_id)
            row = session.scalar(select(EpochMetric).where(EpochMetric.run_id == run_id, EpochMetric.epoch == epoch))
            if row is None:
                session.add(EpochMetric(run_id=run_id, epoch=epoch, step=step, metrics=clean, recorded_at=utc_now()))
            else:
                row.step, row.metrics, row.recorded_at = step, clean, utc_now()

    def add_features(
        self,
        run_id: int,
        frequency: Sequence[float],
        mean_activation: Sequence[float],
        max_activation: Sequence[float],
        is_dead: Sequence[bool],
    ) -> int:
        """Record one row per SAE latent (feature_index = position); replaces the run's earlier rows.

        Takes lists or numpy arrays of equal length; returns the number of rows written.
        """
        columns = {
            "frequency": finite_floats(frequency, "frequency"),
            "mean_activation": finite_floats(mean_activation, "mean_activation"),
            "max_activation": finite_floats(max_activation, "max_activation"),
        }
        dead = [bool(d) for d in (is_dead.tolist() if hasattr(is_dead, "tolist") else is_dead)]
        lengths = {name: len(values) for name, values in columns.items()} | {"is_dead": len(dead)}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                "feature statistics must have one value per feature, got lengths "
                + ", ".join(f"{name}={n}" for name, n in lengths.items())
            )
        rows = [
            {
                "run_id": run_id,
                "feature_index": i,
                "frequency": f,
                "mean_activation": mean,
                "max_activation": peak,
                "is_dead": d,
            }
            for i, (f, mean, peak, d) in enumerate(
                zip(columns["frequency"], columns["mean_activation"], columns["max_activation"], dead)
            )
        ]
        with self._sessions.begin() as session:
            self._run(session, run_id)
            replace_run_rows(session, DiscoveredFeature.__table__, run_id, rows)
        return len(rows)

    def add_sae_model(
        self,
        run_id: int,
        *,
        path: str,
        d_in: int,
        d_sae: int,
        architecture: str,
        checksum: str,
    ) -> int:
        """Record a saved SAE; `checksum` is the sha256 hex digest of its weights. Returns its id.

        Saving to the same path again (a resumed run, a re-export) replaces the earlier row.
        """
        checksum = checksum.lower()
        if len(checksum) != SHA256_HEX_DIGITS or any(c not in "0123456789abcdef" for c in checksum):
            raise ValueError(f"checksum {checksum!r} is not a sha256 hex digest (64 characters 0-9a-f)")
        row = SAEModel(
            run_id=run_id,
            path=str(path),
            d_in=d_in,
            d_sae=d_sae,
            architecture=architecture,
            checksum=checksum,
            created_at=utc_now(),
        )
        with self._sessions.begin() as session:
            self._run(session, run_id)
            session.execute(delete(SAEModel).where(SAEModel.run_id == run_id, SAEModel.path == str(path)))
            session.add(row)
            session.flush()
            return row.id

    def add_evaluation(self, run_id: int, eval_type: str, tokens: int, result: dict) -> int:
        """Record one evaluation of the run's SAE; an evaluation of the same type replaces the earlier one."""
        clean = finite_json(result, "evaluation")
        with self._sessions.begin() as session:
            self._run(session, run_id)
            session.execute(delete(Evaluation).where(Evaluation.run_id == run_id, Evaluation.eval_type == eval_type))
            row = Evaluation(run_id=run_id, eval_type=eval_type, tokens=tokens, result=clean, created_at=utc_now())
            session.add(row)
            session.flush()
            return row.id

    # ----- reads --------------------------------------------------------------------------------

    def get_run(self, run_id: int) -> dict[str, Any]:
        """The run's row as a dict; UnknownRunError (a KeyError) listing existing ids if there is none."""
        with self._sessions() as session:
            return as_dict(self._run(session, run_id))

    def run_with_uuid(self, run_uuid: str) -> int | None:
        """The id of the run with this UUID, or None when the database has no such run."""
        with self._sessions() as session:
            return session.scalar(select(TrainingRun.id).where(TrainingRun.run_uuid == run_uuid))

    def list_runs(
        self,
        status: str | None = None,
        model: str | None = None,
        *,
        output_under: str | None = None,
        sweep_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Runs, newest first, optionally only those with the given status, model and/or sweep.

        `output_under` keeps the runs whose output_dir starts with it, e.g. a Hydra multirun sweep folder;
        it is a plain, case-sensitive prefix (% and _ mean themselves), and output_dir is
        stored as the absolute path Hydra gave the run.
        """
        if status is not None and status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        query = select(TrainingRun).order_by(TrainingRun.started_at.desc(), TrainingRun.id.desc())
        if status is not None:
            query = query.where(TrainingRun.status == status)
        if model is not None:
            query = query.where(TrainingRun.model == model)
        if sweep_id is not None:
            query = query.where(TrainingRun.sweep_id == sweep_id)
        if output_under is not None:
            # Compared as a substring, not with LIKE: SQLite's LIKE ignores case, and "_" or "%" in a
            # folder name would need escaping to stop them acting as wildcards.
            query = query.where(func.substr(TrainingRun.output_dir, 1, len(output_under)) == output_under)
        with self._sessions() as session:
            return [as_dict(run) for run in session.scalars(query)]

    def sweeps(self) -> list[dict[str, Any]]:
        """Every sweep (Hydra multirun) with runs in the database, newest first: its id, run count, first start."""
        query = (select(TrainingRun.sweep_id, func.count(), func.min(TrainingRun.started_at))
                 .where(TrainingRun.sweep_id.is_not(None)).group_by(TrainingRun.sweep_id)
                 .order_by(func.min(TrainingRun.started_at).desc()))
        with self._sessions() as session:
            # min() keeps the column's type, so the start comes back as an aware UTC datetime on every backend.
            return [{"sweep_id": sweep, "runs": n, "started_at": first} for sweep, n, first in session.execute(query)]

    def epoch_metrics(self, run_id: int) -> list[dict[str, Any]]:
        """The run's per-epoch metric rows, by epoch."""
        return self._children(EpochMetric, run_id, EpochMetric.epoch)

    def features(self, run_id: int) -> list[dict[str, Any]]:
        """The run's per-feature statistics, by feature_index."""
        return self._children(DiscoveredFeature, run_id, DiscoveredFeature.feature_index)

    def evaluations(self, run_id: int) -> list[dict[str, Any]]:
        """The run's evaluations, oldest first."""
        return self._children(Evaluation, run_id, Evaluation.id)

    def sae_models(self, run_id: int) -> list[dict[str, Any]]:
        """The run's saved checkpoints, oldest first."""
        return self._children(SAEModel, run_id, SAEModel.id)

    # ----- helpers ------------------------------------------------------------------------------

    def _children(self, table: type[Base], run_id: int, order: Any) -> list[dict[str, Any]]:
        with self._sessions() as session:
            self._run(session, run_id)
            rows = session.scalars(select(table).where(table.run_id == run_id).order_by(order))
            return [as_dict(row) for row in rows]

    @staticmethod
    def _run(session: Session, run_id: int) -> TrainingRun:
        run = session.get(TrainingRun, run_id)
        if run is not None:
            return run
        newest = session.scalars(select(TrainingRun.id).order_by(TrainingRun.id.desc()).limit(10)).all()
        total = session.scalar(select(func.count()).select_from(TrainingRun))
        if not newest:
            raise UnknownRunError(f"no run with id {run_id!r}: the database has no runs yet")
        more = f" (newest 10 of {total})" if total > len(newest) else ""
        raise UnknownRunError(f"no run with id {run_id!r}; existing ids{more}: {', '.join(map(str, newest))}")
