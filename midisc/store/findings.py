"""What was found in a trained SAE: each feature's example contexts and dashboard profile, and features scored
against concepts.

`FindingsMixin` gives `Store` these writes and reads; it lives apart so `records.py` stays about runs.
Like every Store call, each method is one short session and transaction.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import case, delete, select
from sqlalchemy.orm import Session, sessionmaker

from midisc.store.bulk import insert_rows, replace_run_rows
from midisc.store.tables import EXAMPLE_KINDS, ConceptScore, FeatureExample, FeatureProfile, TrainingRun, as_dict
from midisc.store.values import finite_float, finite_float_list, finite_json

EXAMPLE_KEYS = frozenset(
    ("feature_index", "kind", "rank", "activation", "context_index", "token_index", "max_token_index", "tokens",
     "values")
)
CONCEPT_SCORE_KEYS = frozenset(
    ("feature_index", "rank", "score", "mean_concept", "mean_contrast", "fire_rate_concept", "fire_rate_contrast",
     "n_concept", "n_contrast")
)
CONCEPT_SCORE_FLOATS = ("score", "mean_concept", "mean_contrast", "fire_rate_concept", "fire_rate_contrast")
CONCEPT_MAX_CHARS = 128  # the column's String(128); PostgreSQL refuses longer, SQLite would keep it silently
# Feature indices per IN (...) clause: far below SQLite's 32,766 and PostgreSQL's 65,535 bound parameters.
FEATURES_PER_QUERY = 500


def _check_keys(row: dict[str, Any], expected: frozenset[str], what: str) -> None:
    if row.keys() != expected:
        missing, extra = sorted(expected - row.keys()), sorted(row.keys() - expected)
        feature = row.get("feature_index", "?")
        raise ValueError(
            f"{what} (feature_index {feature}) has "
            + "; ".join(part for part in (
                f"missing key(s) {', '.join(missing)}" if missing else "",
                f"unexpected key(s) {', '.join(extra)}" if extra else "",
            ) if part)
            + f"; the keys are {', '.join(sorted(expected))}"
        )


def _whole(value: Any, name: str) -> int:
    # operator.index takes Python, numpy and torch integers but refuses floats that int() would truncate.
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number, got {value!r} ({type(value).__name__})") from None


def _example_row(run_id: int, example: dict[str, Any]) -> dict[str, Any]:
    _check_keys(example, EXAMPLE_KEYS, "feature example")
    feature = _whole(example["feature_index"], "feature_index")
    kind = example["kind"]
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"feature {feature}: example kind {kind!r} is not one of {', '.join(EXAMPLE_KINDS)}")
    kind = str(kind)  # a numpy.str_ is fine, but is stored as the plain str it equals
    rank = _whole(example["rank"], f"feature {feature} {kind} example rank")
    where = f"feature {feature} {kind} example {rank}"
    values = finite_float_list(example["values"], f"{where}: values")
    tokens = example["tokens"]
    if not isinstance(tokens, list):
        tokens = list(tokens)
    if not set(map(type, tokens)) <= {str}:  # the fast check; str subclasses (numpy.str_) pass the slow one
        if not all(isinstance(token, str) for token in tokens):
            wrong = next(t for t in tokens if not isinstance(t, str))
            raise ValueError(f"{where}: tokens must be strings, got {wrong!r} ({type(wrong).__name__})")
        tokens = [str(token) for token in tokens]
    if len(tokens) != len(values):
        raise ValueError(f"{where}: {len(tokens)} tokens but {len(values)} values; "
                         "the window needs one value per token")
    max_token = _whole(example["max_token_index"], f"{where}: max_token_index")
    if not 0 <= max_token < len(tokens):
        raise ValueError(f"{where}: max_token_index {max_token} is outside the window of {len(tokens)} tokens "
                         f"(0..{len(tokens) - 1})")
    return {
        "run_id": run_id,
        "feature_index": feature,
        "kind": kind,
        "rank": rank,
        "activation": finite_float(example["activation"], f"{where}: activation"),
        "context_index": _whole(example["context_index"], f"{where}: context_index"),
        "token_index": _whole(example["token_index"], f"{where}: token_index"),
        "max_token_index": max_token,
        "tokens": tokens,
        "values": values,
    }


def _concept_row(run_id: int, concept: str, score: dict[str, Any]) -> dict[str, Any]:
    _check_keys(score, CONCEPT_SCORE_KEYS, f"a score for concept {concept!r}")
    feature = _whole(score["feature_index"], f"concept {concept!r}: feature_index")
    where = f"concept {concept!r}, feature {feature}"
    row: dict[str, Any] = {"run_id": run_id, "concept": concept, "feature_index": feature}
    for name in ("rank", "n_concept", "n_contrast"):
        row[name] = _whole(score[name], f"{where}: {name}")
    for name in CONCEPT_SCORE_FLOATS:
        row[name] = finite_float(score[name], f"{where}: {name}")
    return row


def _feature_chunks(features: Iterable[Any]) -> list[list[int]]:
    """Feature indices, checked, deduplicated and sorted, in chunks of FEATURES_PER_QUERY for IN (...) clauses.
    Sorted and disjoint: results read chunk after chunk are still ordered by feature."""
    wanted = sorted({_whole(f, "each of features") for f in features})
    return [wanted[i:i + FEATURES_PER_QUERY] for i in range(0, len(wanted), FEATURES_PER_QUERY)]


def _refuse_duplicates(rows: list[dict[str, Any]], key: tuple[str, ...], what: str) -> None:
    # Caught here, with the culprit named, rather than as the database's unique-constraint error.
    values = [tuple(row[k] for k in key) for row in rows]
    if len(set(values)) == len(values):
        return
    seen: set[tuple[Any, ...]] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"two {what} rows share {', '.join(f'{k}={v!r}' for k, v in zip(key, value))}")
        seen.add(value)


class FindingsMixin:
    """Store methods for feature examples and concept scores; `Store` supplies the sessions and run check."""

    _sessions: sessionmaker[Session]
    _run: Callable[[Session, int], TrainingRun]

    # ----- feature examples ---------------------------------------------------------------------

    def add_feature_examples(self, run_id: int, examples: Iterable[dict[str, Any]]) -> int:
        """Record example windows (top and quantile) for the run's features; replaces all its earlier examples.

        Each example is a dict with exactly the keys feature_index, kind ("top" or "quantile"), rank,
        activation, context_index, token_index, max_token_index, tokens (list of str) and values (one
        finite float per token). Everything is checked before anything is written. Returns rows written.
        """
        rows = [_example_row(run_id, example) for example in examples]
        _refuse_duplicates(rows, ("feature_index", "kind", "rank"), "feature example")
        with self._sessions.begin() as session:
            self._run(session, run_id)
            replace_run_rows(session, FeatureExample.__table__, run_id, rows)
        return len(rows)

    def feature_examples(
        self,
        run_id: int,
        *,
        features: Sequence[int] | None = None,
        kind: str | None = None,
        max_rank: int | None = None,
    ) -> list[dict[str, Any]]:
        """The run's examples by feature_index, then top before quantile, then rank.

        `features` keeps only those feature indices, `kind` only "top" or "quantile" examples, and
        `max_rank` only ranks below it (max_rank=5: the first five of each feature and kind).
        """
        if kind is not None and kind not in EXAMPLE_KINDS:
            raise ValueError(f"example kind {kind!r} is not one of {', '.join(EXAMPLE_KINDS)}")
        # Plain rows from the Table, not ORM objects: a third of the time for 150k examples, same dicts.
        table = FeatureExample.__table__
        query = select(table).where(table.c.run_id == run_id).order_by(
            table.c.feature_index,
            case({kind_: order for order, kind_ in enumerate(EXAMPLE_KINDS)}, value=table.c.kind),
            table.c.rank,
        )
        if kind is not None:
            query = query.where(table.c.kind == kind)
        if max_rank is not None:
            query = query.where(table.c.rank < max_rank)
        chunks = [] if features is None else _feature_chunks(features)
        with self._sessions() as session:
            self._run(session, run_id)
            if features is None:
                return [dict(row) for row in session.execute(query).mappings()]
            return [
                dict(row)
                for chunk in chunks
                for row in session.execute(query.where(table.c.feature_index.in_(chunk))).mappings()
            ]

    # ----- feature profiles --------------------------------------------------------------------

    def add_feature_profiles(self, run_id: int, profiles: Sequence[dict[str, Any]]) -> int:
        """Record each feature's dashboard profile ({"feature_index": i, "profile": {...}}, see
        tables.FeatureProfile); replaces all the run's earlier profiles. Returns rows written."""
        rows = []
        for item in profiles:
            feature = _whole(item["feature_index"], "feature_index")
            rows.append({"run_id": run_id, "feature_index": feature,
                         "profile": finite_json(item["profile"], f"feature {feature} profile")})
        _refuse_duplicates(rows, ("feature_index",), "feature profile")
        with self._sessions.begin() as session:
            self._run(session, run_id)
            replace_run_rows(session, FeatureProfile.__table__, run_id, rows)
        return len(rows)

    def feature_profiles(self, run_id: int, features: Sequence[int]) -> dict[int, dict[str, Any]]:
        """{feature_index: profile} of those of `features` that have one."""
        table = FeatureProfile.__table__
        query = select(table.c.feature_index, table.c.profile).where(table.c.run_id == run_id)
        with self._sessions() as session:
            self._run(session, run_id)
            return {index: profile for chunk in _feature_chunks(features)
                    for index, profile in session.execute(query.where(table.c.feature_index.in_(chunk)))}

    # ----- concept scores -----------------------------------------------------------------------

    def add_concept_scores(self, run_id: int, concept: str, rows: Sequence[dict[str, Any]]) -> int:
        """Record how selective each feature is for `concept`; replaces the run's earlier rows for that concept only.

        Each row is a dict with exactly the keys feature_index, rank (0 = most selective), score
        (AUROC), mean_concept, mean_contrast, fire_rate_concept, fire_rate_contrast, n_concept and
        n_contrast; the floats must be finite. Returns rows written.
        """
        if not isinstance(concept, str) or not concept or len(concept) > CONCEPT_MAX_CHARS:
            raise ValueError(f"concept must be a name of 1 to {CONCEPT_MAX_CHARS} characters, got {concept!r}")
        clean = [_concept_row(run_id, concept, row) for row in rows]
        _refuse_duplicates(clean, ("feature_index",), f"concept {concept!r} score")
        with self._sessions.begin() as session:
            self._run(session, run_id)
            session.execute(
                delete(ConceptScore).where(ConceptScore.run_id == run_id, ConceptScore.concept == concept)
            )
            if clean:
                insert_rows(session, ConceptScore.__table__, clean)
        return len(clean)

    def concept_scores(self, run_id: int, concept: str | None = None) -> list[dict[str, Any]]:
        """The run's concept scores by concept, then rank; only `concept`'s when given."""
        query = select(ConceptScore).where(ConceptScore.run_id == run_id)
        if concept is not None:
            query = query.where(ConceptScore.concept == concept)
        with self._sessions() as session:
            self._run(session, run_id)
            rows = [as_dict(row) for row in session.scalars(query)]
        # Sorted here, not by ORDER BY: a PostgreSQL locale collation orders names unlike SQLite and Python.
        return sorted(rows, key=lambda row: (row["concept"], row["rank"]))

    def concepts(self, run_id: int) -> list[str]:
        """The concepts scored for the run, sorted."""
        query = select(ConceptScore.concept).where(ConceptScore.run_id == run_id).distinct()
        with self._sessions() as session:
            self._run(session, run_id)
            return sorted(session.scalars(query))
