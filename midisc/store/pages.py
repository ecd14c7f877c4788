"""Reads a page at a time, sorted and filtered in SQL: what the feature browser lists.

A database of 1,000 runs or a run of 65,536 features is never read whole to show 50 rows of it: the
database sorts, counts and cuts the page (`PagesMixin.run_page`, `PagesMixin.feature_page`). Sort keys and
filters are checked against the lists here, so a bad one in a URL is refused with what would be valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, and_, cast, exists, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from midisc.store.tables import (RUN_STATUSES, ConceptScore, DiscoveredFeature, EpochMetric, FeatureExample,
                                 FeatureExplanation, TrainingRun)

MAX_PAGE = 500  # rows a page may ask for

# What a run list shows and sorts by: the columns, and the spliced-in score kept in the metrics JSON.
RUN_COLUMNS = ("id", "status", "started_at", "ended_at", "model", "hook", "layer", "architecture", "d_in", "d_sae",
               "n_tokens", "mse", "fvu", "l0", "dead_frac", "sweep_id", "overrides", "output_dir")
RUN_SORTS = (*RUN_COLUMNS[:-3], "ce_loss_score")
FEATURE_SORTS = ("feature_index", "frequency", "mean_activation", "max_activation", "concept_score")


class PageError(ValueError):
    """A page that cannot be asked for: an unknown sort key, a negative offset. Says what is valid."""


@dataclass
class Page:
    rows: list[dict[str, Any]]
    total: int   # rows matching the filter, on every page
    offset: int
    limit: int


def _check(sort: str, sorts: tuple[str, ...], offset: int, limit: int) -> None:
    if sort not in sorts:
        raise PageError(f"sort {sort!r} is not one of {', '.join(sorts)}")
    if offset < 0:
        raise PageError(f"offset {offset} must be 0 or more")
    if not 1 <= limit <= MAX_PAGE:
        raise PageError(f"limit {limit} must be between 1 and {MAX_PAGE}")


def _ordered(column: Any, descending: bool, tiebreak: Any) -> tuple[Any, ...]:
    # NULLs (a running run's FVU, a never-fired feature's mean) last either way: they are "not measured".
    key = column.desc() if descending else column.asc()
    return (column.is_(None), key, tiebreak)


def _like(column: Any, text: str) -> Any:
    return func.lower(column).contains(text.lower(), autoescape=True)


class PagesMixin:
    """Store methods that read one sorted, filtered page; `Store` supplies the sessions and run check."""

    _sessions: sessionmaker[Session]
    _run: Callable[[Session, int], TrainingRun]

    def run_page(self, *, sort: str = "started_at", descending: bool = True, offset: int = 0, limit: int = 50,
                 status: str | None = None, search: str | None = None, sweep_id: str | None = None) -> Page:
        """Runs without their config, sorted by `sort` (RUN_SORTS); `search` is a case-insensitive substring of
        the model, hook, architecture or sweep; ce_loss_score is the latest core evaluation's."""
        _check(sort, RUN_SORTS, offset, limit)
        if status is not None and status not in RUN_STATUSES:
            raise PageError(f"status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        ce = TrainingRun.metrics["ce_loss_score"].as_float()
        where = []
        if status is not None:
            where.append(TrainingRun.status == status)
        if sweep_id is not None:
            where.append(TrainingRun.sweep_id == sweep_id)
        if search:
            where.append(or_(*(_like(column, search) for column in (
                TrainingRun.model, TrainingRun.hook, TrainingRun.architecture, TrainingRun.sweep_id))))
        key = ce if sort == "ce_loss_score" else getattr(TrainingRun, sort)
        query = (select(*(getattr(TrainingRun, c) for c in RUN_COLUMNS), ce.label("ce_loss_score"))
                 .where(*where).order_by(*_ordered(key, descending, TrainingRun.id.desc()))
                 .offset(offset).limit(limit))
        with self._sessions() as session:
            total = session.scalar(select(func.count()).select_from(TrainingRun).where(*where))
            rows = [dict(row) for row in session.execute(query).mappings()]
        return Page(rows, int(total or 0), offset, limit)

    def feature_page(self, run_id: int, *, sort: str = "frequency", descending: bool = True, offset: int = 0,
                     limit: int = 50, search: str | None = None, concept: str | None = None,
                     alive: bool = False) -> Page:
        """The run's feature statistics, sorted by `sort` (FEATURE_SORTS; concept_score needs `concept`).

        `search`: a feature index, or text that one of the feature's top examples contains (a token or part
        of one) or its explanation does. `concept` adds each feature's AUROC for it (`concept_score`); `alive` keeps features that fired.
        """
        _check(sort, FEATURE_SORTS, offset, limit)
        if sort == "concept_score" and concept is None:
            raise PageError("sort concept_score needs a concept")
        table = DiscoveredFeature.__table__
        scores = ConceptScore.__table__
        where = [table.c.run_id == run_id]
        if alive:
            where.append(table.c.frequency > 0)
        if search and search.strip().isdigit():
            where.append(table.c.feature_index == int(search))
        elif search:
            examples, explained = FeatureExample.__table__, FeatureExplanation.__table__
            where.append(or_(
                exists().where(examples.c.run_id == run_id, examples.c.feature_index == table.c.feature_index,
                               examples.c.kind == "top", _like(cast(examples.c.tokens, String), search)),
                exists().where(explained.c.run_id == run_id, explained.c.feature_index == table.c.feature_index,
                               _like(explained.c.explanation, search))))
        columns = [table.c.feature_index, table.c.frequency, table.c.mean_activation, table.c.max_activation,
                   table.c.is_dead]
        source = table
        if concept is not None:
            source = table.outerjoin(scores, and_(scores.c.run_id == run_id, scores.c.concept == concept,
                                                  scores.c.feature_index == table.c.feature_index))
            columns.append(scores.c.score.label("concept_score"))
        key = scores.c.score if sort == "concept_score" else table.c[sort]
        query = (select(*columns).select_from(source).where(*where)
                 .order_by(*_ordered(key, descending, table.c.feature_index)).offset(offset).limit(limit))
        with self._sessions() as session:
            self._run(session, run_id)
            total = session.scalar(select(func.count()).select_from(table).where(*where))
            rows = [dict(row) for row in session.execute(query).mappings()]
        return Page(rows, int(total or 0), offset, limit)

    def latest_epochs(self, run_ids: list[int]) -> dict[int, dict[str, Any]]:
        """{run_id: its newest epoch row (epoch, step, metrics)} for those of `run_ids` with one, in one query."""
        newest = (select(EpochMetric.run_id, func.max(EpochMetric.epoch).label("epoch"))
                  .where(EpochMetric.run_id.in_(run_ids)).group_by(EpochMetric.run_id).subquery())
        query = select(EpochMetric.run_id, EpochMetric.epoch, EpochMetric.step, EpochMetric.metrics).join(
            newest, and_(EpochMetric.run_id == newest.c.run_id, EpochMetric.epoch == newest.c.epoch))
        with self._sessions() as session:
            return {row["run_id"]: dict(row) for row in session.execute(query).mappings()}

    def feature_frequencies(self, run_id: int) -> list[float | None]:
        """Every feature's firing frequency, by index: one column, for a histogram of a wide SAE."""
        table = DiscoveredFeature.__table__
        with self._sessions() as session:
            self._run(session, run_id)
            return list(session.scalars(select(table.c.frequency).where(table.c.run_id == run_id)
                                        .order_by(table.c.feature_index)))

    def feature_count(self, run_id: int) -> int:
        """How many features the run has statistics for (its width once analysed, else 0)."""
        with self._sessions() as session:
            self._run(session, run_id)
            return int(session.scalar(select(func.count()).select_from(DiscoveredFeature)
                                      .where(DiscoveredFeature.run_id == run_id)) or 0)
