"""store.bulk.insert_rows: COPY on PostgreSQL and raw executemany on SQLite read back exactly what
SQLAlchemy's own insert would have written, awkward text included."""

from __future__ import annotations

import pytest
from sqlalchemy import JSON, Boolean, Column, Float, Integer, MetaData, String, Table, insert, select

from midisc.store import Store, bulk
from midisc.store.tables import ConceptScore, DiscoveredFeature, FeatureExample

# Tokens a tokenizer really produces: COPY's separators and escape character, quotes, JSON's own escapes.
AWKWARD = ["\t", "\n", "\r\n", "\\", "\\N", '"', "'", " \\t", "é", "日本", "\u2028", "", " ", "NULL", "a\tb\\c\nd"]


def probe_table(store: Store) -> Table:
    """A table with a plain text column, which midisc's own tables only have under CHECK constraints."""
    table = Table("bulk_probe", MetaData(), Column("id", Integer, primary_key=True), Column("run_id", Integer),
                  Column("feature_index", Integer), Column("text", String(64)), Column("flag", Boolean),
                  Column("data", JSON), Column("x", Float))
    table.create(store._engine)
    return table


def probe_rows(run_id: int) -> list[dict]:
    return [{"run_id": run_id, "feature_index": i, "text": token, "flag": i % 2 == 1 if i % 5 else None,
             "data": {token: [token, None, i, 0.5]}, "x": None if i % 4 == 0 else -i / 3}
            for i, token in enumerate(AWKWARD)]


def start(store: Store) -> int:
    return store.start_run(model="m", hook="h", layer=0, architecture="topk", config={}, output_dir="out")


def example_rows(run_id: int) -> list[dict]:
    return [{"run_id": run_id, "feature_index": i, "kind": "top", "rank": 0, "activation": 1 / (i + 3),
             "context_index": i, "token_index": 2 ** 31 - 1 - i, "max_token_index": 0,
             "tokens": [token, token * 2], "values": [1e-300 * (i + 1), -1.5e300]} for i, token in enumerate(AWKWARD)]


def read(store: Store, table, run_id: int) -> list[dict]:
    with store._sessions() as session:
        rows = session.execute(select(table).where(table.c.run_id == run_id).order_by(table.c.feature_index))
        return [{k: v for k, v in row._mapping.items() if k != "id"} for row in rows]


def write(store: Store, table, rows: list[dict], fast: bool) -> None:
    with store._sessions.begin() as session:
        if fast:
            bulk.insert_rows(session, table, rows)
        else:
            session.execute(insert(table), rows)


@pytest.mark.parametrize("table, make", [
    ("probe", probe_rows),
    (FeatureExample.__table__, example_rows),
    (DiscoveredFeature.__table__, lambda run_id: [
        {"run_id": run_id, "feature_index": i, "frequency": None if i % 3 == 0 else i / 7, "mean_activation": 0.1,
         "max_activation": float(i), "is_dead": i % 2 == 0} for i in range(10)]),
])
def test_fast_rows_read_back_as_sqlalchemys_own_insert(store, table, make):
    table = probe_table(store) if table == "probe" else table
    fast_run, slow_run = start(store), start(store)
    write(store, table, make(fast_run), fast=True)
    write(store, table, make(slow_run), fast=False)
    fast, slow = read(store, table, fast_run), read(store, table, slow_run)
    assert len(fast) == len(make(0)) > 0
    assert [{**r, "run_id": 0} for r in fast] == [{**r, "run_id": 0} for r in slow]
    assert [{**r, "run_id": 0} for r in fast] == make(0)  # and both are what was given


def test_rows_left_to_a_python_default_take_sqlalchemys_path(store):
    run_id = start(store)
    row = {"run_id": run_id, "concept": "c\tx", "feature_index": 1, "rank": 0, "score": 0.5, "mean_concept": 1.0,
           "mean_contrast": 0.0, "fire_rate_concept": 1.0, "fire_rate_contrast": 0.0, "n_concept": 1, "n_contrast": 1}
    write(store, ConceptScore.__table__, [row], fast=True)
    (stored,) = read(store, ConceptScore.__table__, run_id)
    assert stored["created_at"] is not None and stored["concept"] == "c\tx"


def test_a_failing_bulk_write_rolls_back_the_whole_transaction(store):
    run_id = start(store)
    table = FeatureExample.__table__
    write(store, table, example_rows(run_id)[:3], fast=False)
    bad = example_rows(run_id)[3:5]
    bad[1]["kind"] = None  # NOT NULL: the database refuses the second row, after the old rows were deleted
    with pytest.raises(Exception, match="(?i)null"):
        with store._sessions.begin() as session:
            session.execute(table.delete().where(table.c.run_id == run_id))
            bulk.insert_rows(session, table, bad)
    assert [r["feature_index"] for r in read(store, table, run_id)] == [0, 1, 2]  # the old rows, untouched
