"""Writes that wait out a database outage: a real PostgreSQL server behind a proxy the test cuts."""

import json

import pytest
from sqlalchemy.engine import make_url

from midisc.store import Store
from midisc.store.journal import Journal, pending, replay
from proxy import Proxy


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
    journal = Journal(store, tmp_path / "pending.jsonl", warn=warnings.append)

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
    journal = Journal(store, tmp_path / "pending.jsonl", warn=lambda _: None)
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
    journal = Journal(store, tmp_path / "pending.jsonl")
    with pytest.raises(KeyError):
        journal.add_epoch_metrics(12345, 0, 1, {})  # no such run: a bug, not an outage
    assert journal.pending == 0
    store.close()
