"""Features explained in words (`python -m midisc.autointerp`): writes one feature at a time, reads and search.

Each explanation is written the moment it exists and its scores the moment they do, so an interrupted run
loses at most the features in flight; `explained` tells a run which features it can skip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from midisc.store.tables import FeatureExplanation, TrainingRun, as_dict, utc_now
from midisc.store.values import finite_json, finite_or_none

SCORE_FIELDS = ("detection", "fuzzing", "baseline_detection", "baseline_fuzzing")
EXPLANATION_MAX_CHARS = 2000  # a model that rambles is cut here: an explanation is a phrase or a sentence


class ExplanationsMixin:
    """Store methods for feature explanations; `Store` supplies the sessions and run check."""

    _sessions: sessionmaker[Session]
    _run: Callable[[Session, int], TrainingRun]

    def add_explanation(self, run_id: int, feature_index: int, *, explainer: str, prompt_version: str,
                        explanation: str, examples: dict[str, Any]) -> int:
        """Record (or replace) the feature's explanation by `explainer` with `prompt_version`; scores come later."""
        if not isinstance(explanation, str):
            raise ValueError(f"feature {feature_index}: the explanation must be text, got {type(explanation).__name__}")
        with self._sessions.begin() as session:
            self._run(session, run_id)
            row = session.scalar(select(FeatureExplanation).where(
                FeatureExplanation.run_id == run_id, FeatureExplanation.feature_index == int(feature_index),
                FeatureExplanation.explainer == explainer, FeatureExplanation.prompt_version == prompt_version))
            if row is None:
                row = FeatureExplanation(run_id=run_id, feature_index=int(feature_index), explainer=explainer,
                                         prompt_version=prompt_version)
                session.add(row)
            row.explanation = explanation.strip()[:EXPLANATION_MAX_CHARS]
            row.examples = finite_json(examples, "examples")
            row.scorer = None
            row.scores = None
            for name in SCORE_FIELDS:
                setattr(row, name, None)
            row.created_at = utc_now()
            session.flush()
            return row.id

    def score_explanation(self, explanation_id: int, *, scorer: str, scores: dict[str, Any]) -> None:
        """Set an explanation's scores: SCORE_FIELDS as headline columns, everything in `scores`."""
        with self._sessions.begin() as session:
            row = session.get(FeatureExplanation, explanation_id)
            if row is None:
                raise KeyError(f"no explanation with id {explanation_id}")
            row.scorer = scorer
            row.scores = finite_json(scores, "scores")
            for name in SCORE_FIELDS:
                setattr(row, name, finite_or_none(scores.get(name), name))

    def explanations(self, run_id: int, *, features: Sequence[int] | None = None, explainer: str | None = None,
                     prompt_version: str | None = None, search: str | None = None) -> list[dict[str, Any]]:
        """The run's explanations by feature, newest first within a feature; `search` is a case-insensitive
        substring of the explanation text."""
        query = select(FeatureExplanation).where(FeatureExplanation.run_id == run_id)
        if features is not None:
            query = query.where(FeatureExplanation.feature_index.in_(sorted({int(f) for f in features})))
        if explainer is not None:
            query = query.where(FeatureExplanation.explainer == explainer)
        if prompt_version is not None:
            query = query.where(FeatureExplanation.prompt_version == prompt_version)
        if search:
            query = query.where(func.lower(FeatureExplanation.explanation).contains(search.lower(), autoescape=True))
        query = query.order_by(FeatureExplanation.feature_index, FeatureExplanation.created_at.desc(),
                               FeatureExplanation.id.desc())
        with self._sessions() as session:
            self._run(session, run_id)
            return [as_dict(row) for row in session.scalars(query)]

    def latest_explanations(self, run_id: int, features: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
        """{feature_index: its newest explanation row}, whichever explainer wrote it."""
        newest: dict[int, dict[str, Any]] = {}
        for row in self.explanations(run_id, features=features):
            newest.setdefault(row["feature_index"], row)
        return newest
