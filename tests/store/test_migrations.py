"""Schema migrations (midisc.store.schema and the revisions in midisc/store/migrations) on SQLite and PostgreSQL.

Each test starts from a database in a known state (empty, made before migrations, at an older or an
unknown revision) and opens a Store on it, as training and every tool do.
"""

from __future__ import annotations

import multiprocessing
from datetime import datetime, timezone

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, Table, create_engine, inspect, insert, text

from midisc.db import main as db_main
from midisc.store import Store, StoreError
from midisc.store.schema import (
    UNVERSIONED,
    alembic_config,
    current_revision,
    head_revision,
    known_revisions,
    schema_differences,
)

# What revisions 0002 to 0006 add; a database at 0001 differs from the models in exactly these.
CHANGES_AFTER_0001 = {
    "add_column training_runs.sweep_id",
    "add_column training_runs.overrides",
    "add_index training_runs_sweep_id on training_runs",
    "add_table evaluations",
    "add_index ix_evaluations_run_id on evaluations",
    "add_column training_runs.run_uuid",
    "add_index training_runs_run_uuid on training_runs",
    "add_table feature_profiles",
    "add_index ix_feature_profiles_run_id on feature_profiles",
    "add_table feature_explanations",
    "add_index ix_feature_explanations_run_id on feature_explanations",
    "add_index feature_explanations_run_feature on feature_explanations",
}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request) -> str:
    return request.getfixturevalue(f"{request.param}_url")


def migrate_to(url: str, revision: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)
    engine.dispose()


def execute(url: str, *statements: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))
    engine.dispose()


def record_old_run(url: str) -> int:
    """A run with three features written the way midisc wrote them before 0002: through the tables as they are."""
    engine = create_engine(url)
    tables = MetaData()
    runs = Table("training_runs", tables, autoload_with=engine)
    features = Table("discovered_features", tables, autoload_with=engine)
    with engine.begin() as connection:
        run = {"status": "completed", "started_at": datetime(2026, 1, 2, tzinfo=timezone.utc), "model": "tiny",
               "hook": "blocks.1", "architecture": "topk", "config": {"sae": {"k": 8}}, "output_dir": "/runs/1"}
        run_id = connection.execute(insert(runs).returning(runs.c.id), run).scalar_one()
        connection.execute(insert(features), [
            {"run_id": run_id, "feature_index": i, "frequency": 0.1 * i, "is_dead": i == 0} for i in range(3)])
    engine.dispose()
    return run_id


def test_revision_files_are_the_alembic_history() -> None:
    # known_revisions reads file names to spare every Store the import of Alembic; it must agree with Alembic.
    scripts = ScriptDirectory.from_config(alembic_config())
    history = [script.revision for script in reversed(list(scripts.walk_revisions()))]
    assert list(known_revisions()) == history
    assert scripts.get_heads() == [head_revision()]


def test_empty_database_is_built_at_head_matching_the_models(db_url, capsys) -> None:
    Store(db_url).close()
    store = Store(db_url)  # the second open finds it current
    assert current_revision(store._engine) == head_revision()
    assert schema_differences(store._engine) == []
    store.close()
    assert capsys.readouterr().err == ""


def test_revision_0001_is_the_models_without_the_later_revisions(db_url) -> None:
    migrate_to(db_url, "0001")
    engine = create_engine(db_url)
    assert set(schema_differences(engine)) == CHANGES_AFTER_0001
    engine.dispose()


def test_database_made_before_migrations_is_upgraded_keeping_its_rows(db_url, capsys) -> None:
    migrate_to(db_url, "0001")
    run_id = record_old_run(db_url)
    # create_all made no alembic_version, and an early midisc only four of the six tables.
    execute(db_url, "DROP TABLE alembic_version", "DROP TABLE concept_scores", "DROP TABLE feature_examples")

    with Store(db_url) as store:
        run = store.get_run(run_id)
        assert (run["model"], run["config"]) == ("tiny", {"sae": {"k": 8}})
        assert (run["sweep_id"], run["overrides"]) == (None, None)
        assert [f["is_dead"] for f in store.features(run_id)] == [True, False, False]
        store.update_run(run_id, sweep_id="multirun/2026-01-02/10-00-00", overrides=["sae.k=8"])
        assert store.get_run(run_id)["overrides"] == ["sae.k=8"]
        assert store.concepts(run_id) == [] and store.feature_examples(run_id) == []  # the missing tables were made
        assert schema_differences(store._engine) == []
        shown = store.url
    assert capsys.readouterr().err == f"upgraded database schema of {shown} from pre-migration " \
                                      f"(midisc tables without an alembic_version table) to {head_revision()}\n"


def test_database_at_an_older_revision_is_upgraded_with_one_line(db_url, capsys) -> None:
    migrate_to(db_url, "0001")
    run_id = record_old_run(db_url)
    with Store(db_url) as store:
        assert store.get_run(run_id)["sweep_id"] is None
        new_id = store.start_run(model="m", hook="h", layer=1, architecture="topk", config={}, output_dir="/o",
                                 sweep_id="multirun/a", overrides=("sae.k=16", "layer=1"))
        assert [(r["sweep_id"], r["overrides"]) for r in store.list_runs()] == [
            ("multirun/a", ["sae.k=16", "layer=1"]), (None, None)]
        assert store.get_run(new_id)["overrides"] == ["sae.k=16", "layer=1"]
        assert current_revision(store._engine) == head_revision()
        shown = store.url
    assert capsys.readouterr().err == f"upgraded database schema of {shown} from 0001 to {head_revision()}\n"


def test_database_from_a_newer_midisc_is_refused(db_url) -> None:
    Store(db_url).close()
    execute(db_url, "UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(StoreError, match=r"revision 0099, .*newest is 0006\): upgrade midisc$") as caught:
        Store(db_url)
    assert "\n" not in str(caught.value)


def test_another_applications_alembic_version_is_not_taken_for_a_newer_midisc(db_url, capsys) -> None:
    execute(db_url, "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)",
            "INSERT INTO alembic_version VALUES ('a1b2c3d4e5f6')", "CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(StoreError, match=r"is not a midisc database: its alembic_version table is at revision "
                                         r"a1b2c3d4e5f6 of another application") as caught:
        Store(db_url)
    assert "\n" not in str(caught.value) and "newer" not in str(caught.value)
    assert db_main(["check", "--db", db_url]) == 1
    assert "is not a midisc database" in capsys.readouterr().err


def test_a_failing_migration_is_one_line_naming_the_database(sqlite_url) -> None:
    # A table in the way of 0001's index: the CREATE fails, and nothing of the migration is kept.
    execute(sqlite_url, "CREATE TABLE ix_epoch_metrics_run_id (x INTEGER)")
    expected = r"^cannot migrate the midisc tables in sqlite:///.*runs\.db: there is already a table named ix_epoch_"
    with pytest.raises(StoreError, match=expected):
        Store(sqlite_url)
    engine = create_engine(sqlite_url)
    assert inspect(engine).get_table_names() == ["ix_epoch_metrics_run_id"]
    engine.dispose()


def test_unversioned_is_told_apart_from_empty(sqlite_url) -> None:
    engine = create_engine(sqlite_url)
    assert current_revision(engine) is None
    execute(sqlite_url, "CREATE TABLE training_runs (id INTEGER PRIMARY KEY)")
    assert current_revision(engine) == UNVERSIONED
    engine.dispose()


def open_store(url: str, start: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    try:
        start.wait(timeout=30)
        Store(url).close()
        results.put("ok")
    except BaseException as error:  # noqa: BLE001 - the parent reports whatever went wrong
        results.put(f"{type(error).__name__}: {error}")


def test_parallel_jobs_opening_a_fresh_database_all_succeed(db_url, capsys) -> None:
    # Forked, not spawned: a child needs nothing but the Store, and spawning re-imports torch in each.
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=open_store, args=(db_url, start, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert outcomes == ["ok"] * 4
    engine = create_engine(db_url)
    assert current_revision(engine) == head_revision()
    assert schema_differences(engine) == []
    engine.dispose()
