"""Writes that wait out a database outage: a real PostgreSQL server behind a proxy the test cuts."""

import json

import pytest
from sqlalchemy.engine import make_url

from midisc.db import main as db_main
from midisc.store import Store
from midisc.store.journal import Journal, pending, replay
from proxy import Proxy
from midisc.run_folder import PENDING_FILENAME


@pytest.fixture
def proxied(postgres_url):
    """(a URL through a proxy to the test schema, the proxy)."""
    real = make_url(postgres_url)
    proxy = Proxy(real.host, real.port or 5432).start()
    url = real.set(port=proxy.port).render_as_string(hide_password=False)
    yield url, proxy
    proxy.stop()


def new_run(store) -> int:
    return store.start_run(model="m", hook="h", layer=0, architecture="topk", config={}, output_dir="/out")


def test_writes_wait_while_the_database_is_away_and_go_in_order_when_it_is_back(proxied, tmp_path):
    url, proxy = proxied
    warnings = []
    store = Store(url)
    run_id = new_run(store)
    journal = Journal(store, tmp_path / "pending.jsonl", run_id, warn=warnings.append)

    journal.add_epoch_metrics(run_id, 0, 10, {"train/loss": 1.0})
    proxy.stop()
    assert journal.add_epoch_metrics(run_id, 1, 20, {"train/loss": 0.5}) is None
    journal.add_features(run_id, [0.1, 0.0], [1.0, None], [2.0, None], [False, True])
    journal.add_epoch_metrics(run_id, 1, 20, {"train/loss": 0.25})  # the same epoch again: the later one wins
    assert journal.pending == 3 and len(warnings) == 1 and "cannot be reached" in warnings[0]
    assert "127.0.0.1" in warnings[0] and json.loads((tmp_path / "pending.jsonl").read_text().splitlines()[0])

    proxy.start()
    journal.finish_run(run_id, "completed", metrics={"fvu": 0.3})
    assert journal.pending == 0 and not (tmp_path / "pending.jsonl").exists() and "is back" in warnings[-1]
    epochs = store.epoch_metrics(run_id)
    assert [(e["epoch"], e["metrics"]["train/loss"]) for e in epochs] == [(0, 1.0), (1, 0.25)]
    assert len(store.features(run_id)) == 2 and store.get_run(run_id)["status"] == "completed"
    store.close()


def test_what_is_left_at_the_end_is_sent_later_by_replay(proxied, tmp_path):
    url, proxy = proxied
    store = Store(url)
    run_id = new_run(store)
    journal = Journal(store, tmp_path / "pending.jsonl", run_id, warn=lambda _: None)
    proxy.stop()
    journal.add_epoch_metrics(run_id, 0, 5, {"train/loss": 1.0})
    journal.finish_run(run_id, "completed", metrics={"fvu": 0.5})
    assert replay(store, tmp_path / "pending.jsonl") == (0, 2)  # still away: nothing lost, nothing reordered
    assert pending(tmp_path / "pending.jsonl") == 2

    proxy.start()
    assert replay(store, tmp_path / "pending.jsonl") == (2, 0)
    assert store.get_run(run_id)["status"] == "completed" and len(store.epoch_metrics(run_id)) == 1
    assert replay(store, tmp_path / "pending.jsonl") == (0, 0)  # the file is gone: replaying again is a no-op
    store.close()


def test_a_write_the_database_rejects_is_not_kept(proxied, tmp_path):
    url, _ = proxied
    store = Store(url)
    journal = Journal(store, tmp_path / "pending.jsonl", new_run(store))
    with pytest.raises(KeyError):
        journal.add_epoch_metrics(12345, 0, 1, {})  # no such run: a bug, not an outage
    assert journal.pending == 0
    store.close()


# --- a journal belongs to one database and one run ----------------------------------------------------


def kept_journal(url: str, folder) -> tuple[int, object]:
    """A run in `url` whose epoch row and end wait in folder/pending_db_writes.jsonl: (run id, journal path)."""
    store = Store(url)
    run_id = new_run(store)
    journal = Journal(store, folder / PENDING_FILENAME, run_id, warn=lambda _: None)
    journal._keep("add_epoch_metrics", (run_id, 0, 10, {"train/loss": 0.5}), {})
    journal._keep("finish_run", (run_id, "completed"), {"metrics": {"fvu": 0.25}})
    store.close()
    return run_id, folder / PENDING_FILENAME


def test_sync_sends_a_journal_to_its_own_database_not_the_default_one(postgres_url, tmp_path, monkeypatch, capsys):
    # The defect: a PostgreSQL run's journal, synced as printed from a folder whose outputs/midisc.db has its
    # own run 1, rewrote that unrelated run and deleted the journal.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MIDISC_DB_URL", raising=False)
    (tmp_path / "outputs").mkdir()
    with Store("sqlite:///outputs/midisc.db") as local:
        local_id = new_run(local)
    run_id, path = kept_journal(postgres_url, tmp_path / "run")
    assert run_id == local_id == 1

    assert db_main(["sync", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 write(s) sent to postgresql+psycopg2://" in out and not path.exists()
    with Store(postgres_url) as store:
        assert store.get_run(run_id)["status"] == "completed" and len(store.epoch_metrics(run_id)) == 1
    with Store("sqlite:///outputs/midisc.db") as local:
        assert local.get_run(local_id)["status"] == "running" and local.epoch_metrics(local_id) == []
        assert local.sae_models(local_id) == []


def test_sync_refuses_db_naming_another_database_and_keeps_the_journal(postgres_url, sqlite_url, tmp_path, capsys):
    with Store(sqlite_url) as other:
        other_id = new_run(other)
    _, path = kept_journal(postgres_url, tmp_path)
    before = path.read_text()

    assert db_main(["sync", str(path), "--db", sqlite_url]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path} holds writes of run 1 of postgresql+psycopg2://") and "\n" not in err
    assert f"--db names {sqlite_url}: nothing sent, journal kept" in err
    assert path.read_text() == before
    with Store(sqlite_url) as other:
        assert other.epoch_metrics(other_id) == [] and other.get_run(other_id)["status"] == "running"


def test_sync_refuses_a_database_whose_run_is_another_run(sqlite_url, tmp_path, capsys):
    # The same database file, emptied and refilled: run 1 there now is someone else's.
    _, path = kept_journal(sqlite_url, tmp_path)
    (tmp_path / "runs.db").unlink()
    with Store(sqlite_url) as store:
        stranger = store.start_run(model="m", hook="h", layer=0, architecture="topk", config={}, output_dir="/other")
    before = path.read_text()

    assert db_main(["sync", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"run {stranger} of sqlite:///{tmp_path / 'runs.db'} is another run (/other)" in err
    assert "nothing sent, journal kept" in err and f"sync {path} --recreate" in err and "\n" not in err
    assert path.read_text() == before
    with Store(sqlite_url) as store:
        assert store.epoch_metrics(stranger) == [] and store.get_run(stranger)["status"] == "running"


def test_recreate_records_the_run_again_from_the_journal(sqlite_url, tmp_path, capsys):
    # The SQLite file deleted while the run trained: its writes went to the journal, the run is gone.
    store = Store(sqlite_url)
    run_id = store.start_run(model="tiny", hook="model.layers.1", layer=1, architecture="topk",
                             config={"sae": {"k": 8}}, output_dir=str(tmp_path), d_in=32, d_sae=128)
    started = store.get_run(run_id)
    journal = Journal(store, tmp_path / PENDING_FILENAME, run_id, warn=lambda _: None)
    (tmp_path / "runs.db").unlink()
    journal.add_epoch_metrics(run_id, 0, 10, {"train/loss": 0.5})  # an outage: no such table
    journal.finish_run(run_id, "completed", metrics={"fvu": 0.25})
    store.close()
    assert journal.pending == 2

    assert db_main(["sync", str(tmp_path)]) == 1
    assert f"has no run {run_id}" in capsys.readouterr().err
    assert db_main(["sync", str(tmp_path), "--recreate"]) == 0
    assert not (tmp_path / PENDING_FILENAME).exists()
    with Store(sqlite_url) as fresh:
        (run,) = fresh.list_runs()
        assert run["run_uuid"] == started["run_uuid"] and run["status"] == "completed" and run["fvu"] == 0.25
        assert {k: run[k] for k in ("model", "hook", "layer", "config", "output_dir", "d_sae", "started_at")} == {
            k: started[k] for k in ("model", "hook", "layer", "config", "output_dir", "d_sae", "started_at")}
        assert [e["epoch"] for e in fresh.epoch_metrics(run["id"])] == [0]


def test_a_journal_whose_password_is_not_kept_takes_it_from_db_or_the_environment(postgres_url, tmp_path, capsys,
                                                                               monkeypatch):
    secret = "Pa55-w0rd"  # trust auth ignores it
    url = postgres_url.replace("postgres@", f"postgres:{secret}@", 1)
    _, path = kept_journal(url, tmp_path)
    assert secret not in path.read_text() and ":***@" in path.read_text()
    monkeypatch.delenv("MIDISC_DB_URL", raising=False)
    monkeypatch.delenv("POSTGRES_PASSWORD", raising=False)

    assert db_main(["sync", str(path)]) == 1
    err = capsys.readouterr().err
    assert "whose password is not kept" in err and f"sync {path} --db 'URL'" in err and secret not in err
    monkeypatch.setenv("MIDISC_DB_URL", url)
    assert db_main(["sync", str(path)]) == 0 and not path.exists()
    assert secret not in capsys.readouterr().out


def test_a_journal_without_a_header_needs_db(sqlite_url, tmp_path, capsys):
    with Store(sqlite_url) as store:
        run_id = new_run(store)
    path = tmp_path / PENDING_FILENAME
    path.write_text(json.dumps({"method": "finish_run", "args": [run_id, "failed"], "kwargs": {}}) + "\n")
    assert db_main(["sync", str(path)]) == 1
    assert "does not say which database it belongs to" in capsys.readouterr().err and path.exists()
    assert db_main(["sync", str(path), "--db", sqlite_url]) == 0 and not path.exists()
    with Store(sqlite_url) as store:
        assert store.get_run(run_id)["status"] == "failed"
