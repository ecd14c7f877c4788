"""midisc.store on SQLite and, when MIDISC_TEST_POSTGRES_URL is set, on PostgreSQL."""

from __future__ import annotations

import math
import os
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from midisc.store import Store, StoreError, UnknownRunError, default_db_url, redact_url

POSTGRES_URL = os.environ.get("MIDISC_TEST_POSTGRES_URL")
CHECKSUM = "ab" * 32


def start(store: Store, **overrides) -> int:
    fields = dict(
        model="SmolLM2-135M",
        hook="blocks.3.hook_resid_post",
        layer=3,
        architecture="topk",
        config={"sae": {"k": 32, "expansion": 8}, "lr": 3e-4, "layers": [3, 4]},
        output_dir="outputs/run",
    )
    return store.start_run(**(fields | overrides))


def assert_utc(value: datetime) -> None:
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0), value


def test_full_run_lifecycle(store: Store) -> None:
    before = datetime.now(timezone.utc)
    run_id = start(store)
    assert store.get_run(run_id)["status"] == "running"

    store.update_run(run_id, d_in=576, d_sae=4608, n_tokens=3_000_000_000)
    store.add_epoch_metrics(run_id, 0, 100, {"train/fvu": 0.5, "train/l0": 40.0})
    store.add_epoch_metrics(run_id, 1, 200, {"train/fvu": 0.3, "train/l0": 33.0})
    n = store.add_features(run_id, [0.1, 0.0, 0.5], [1.0, 0.0, 2.0], [3.0, 0.0, 4.0], [False, True, False])
    sae_id = store.add_sae_model(
        run_id, path="outputs/run/sae", d_in=576, d_sae=4608, architecture="topk", checksum=CHECKSUM
    )
    metrics = {"mse": 0.01, "fvu": 0.3, "l0": 33.0, "dead_frac": 1 / 3, "val/loss_delta": 0.2}
    store.finish_run(run_id, "completed", metrics=metrics)

    run = store.get_run(run_id)
    assert n == 3
    assert run["status"] == "completed"
    assert (run["d_in"], run["d_sae"], run["n_tokens"]) == (576, 4608, 3_000_000_000)
    assert run["layer"] == 3 and run["model"] == "SmolLM2-135M" and run["architecture"] == "topk"
    assert (run["mse"], run["fvu"], run["l0"]) == (0.01, 0.3, 33.0)
    assert math.isclose(run["dead_frac"], 1 / 3)
    assert run["metrics"] == metrics
    assert run["error"] is None
    assert before <= run["started_at"] <= run["ended_at"] <= datetime.now(timezone.utc)

    epochs = store.epoch_metrics(run_id)
    assert [(e["epoch"], e["step"]) for e in epochs] == [(0, 100), (1, 200)]
    assert epochs[1]["metrics"] == {"train/fvu": 0.3, "train/l0": 33.0}

    features = store.features(run_id)
    assert [f["feature_index"] for f in features] == [0, 1, 2]
    assert [f["is_dead"] for f in features] == [False, True, False]
    assert features[2]["frequency"] == 0.5 and features[2]["max_activation"] == 4.0

    (sae,) = store.sae_models(run_id)
    assert sae["id"] == sae_id and sae["checksum"] == CHECKSUM and sae["d_sae"] == 4608

    assert [r["id"] for r in store.list_runs(status="completed")] == [run_id]
    assert store.list_runs(status="running") == []


def test_failed_run_keeps_error(store: Store) -> None:
    run_id = start(store)
    store.finish_run(run_id, "failed", error="CUDA out of memory")
    run = store.get_run(run_id)
    assert run["status"] == "failed" and run["error"] == "CUDA out of memory"
    assert run["metrics"] is None and run["fvu"] is None


def test_list_runs_newest_first_and_filters(store: Store) -> None:
    first = start(store, model="a")
    second = start(store, model="b")
    third = start(store, model="a")
    store.finish_run(second, "interrupted")
    assert [r["id"] for r in store.list_runs()] == [third, second, first]
    assert [r["id"] for r in store.list_runs(model="a")] == [third, first]
    assert [r["id"] for r in store.list_runs(status="interrupted", model="b")] == [second]


def test_timestamps_are_aware_utc(store: Store) -> None:
    run_id = start(store)
    store.add_epoch_metrics(run_id, 0, 1, {"loss": 1.0})
    store.add_sae_model(run_id, path="p", d_in=2, d_sae=4, architecture="relu", checksum=CHECKSUM)
    store.finish_run(run_id, "completed")
    run = store.get_run(run_id)
    for value in (
        run["started_at"],
        run["ended_at"],
        store.epoch_metrics(run_id)[0]["recorded_at"],
        store.sae_models(run_id)[0]["created_at"],
    ):
        assert_utc(value)
        assert abs(datetime.now(timezone.utc) - value) < timedelta(minutes=1)
    assert_utc(store.list_runs()[0]["started_at"])


def test_config_json_round_trips(store: Store) -> None:
    config = {
        "model": {"name": "gpt2", "context": 128, "dtype": None},
        "sae": {"_target_": "midisc.sae.TopKSAE", "k": 32, "tied": False},
        "layers": [1, 2, {"site": "resid"}],
        "lr": 1e-4,
        "name": "ünïcode ✓",
    }
    run_id = start(store, config=config)
    assert store.get_run(run_id)["config"] == config
    store.update_run(run_id, config=config | {"seed": 7})
    assert store.get_run(run_id)["config"]["seed"] == 7


def test_epoch_metrics_rewrite_replaces_row(store: Store) -> None:
    run_id = start(store)
    store.add_epoch_metrics(run_id, 0, 10, {"loss": 1.0, "old": 5.0})
    store.add_epoch_metrics(run_id, 0, 12, {"loss": 0.5})
    (row,) = store.epoch_metrics(run_id)
    assert row["step"] == 12 and row["metrics"] == {"loss": 0.5}


def test_non_finite_values_never_stored(store: Store) -> None:
    run_id = start(store, config={"a": float("nan"), "b": [1.0, float("inf")], "c": 2})
    assert store.get_run(run_id)["config"] == {"b": [1.0, None], "c": 2}

    store.add_epoch_metrics(run_id, 0, 1, {"loss": float("nan"), "fvu": np.float32(0.25), "l0": -math.inf})
    assert store.epoch_metrics(run_id)[0]["metrics"] == {"fvu": 0.25}

    store.add_features(run_id, np.array([0.5, np.nan]), [np.inf, 1.0], [2.0, -np.inf], np.array([False, True]))
    first, second = store.features(run_id)
    assert first["mean_activation"] is None and second["frequency"] is None and second["max_activation"] is None

    store.finish_run(run_id, "completed", metrics={"mse": float("nan"), "fvu": float("inf"), "l0": 3.0, "x": math.nan})
    run = store.get_run(run_id)
    assert run["mse"] is None and run["fvu"] is None and run["l0"] == 3.0
    assert run["metrics"] == {"l0": 3.0}


def test_many_features_in_one_bulk_insert(store: Store) -> None:
    run_id = start(store)
    n = 20_480
    rng = np.random.default_rng(0)
    frequency = rng.random(n)
    started = time.perf_counter()
    written = store.add_features(run_id, frequency, rng.random(n), rng.random(n) * 10, frequency < 0.01)
    elapsed = time.perf_counter() - started
    assert written == n
    features = store.features(run_id)
    assert len(features) == n and features[-1]["feature_index"] == n - 1
    assert sum(f["is_dead"] for f in features) == int((frequency < 0.01).sum())
    assert elapsed < 10, f"20,480 features took {elapsed:.1f} s"
    # Writing again replaces rather than colliding with the unique (run_id, feature_index).
    assert store.add_features(run_id, [0.1], [0.2], [0.3], [False]) == 1
    assert len(store.features(run_id)) == 1


def test_feature_lengths_must_match(store: Store) -> None:
    run_id = start(store)
    with pytest.raises(ValueError, match="frequency=3.*mean_activation=2"):
        store.add_features(run_id, [0.1, 0.2, 0.3], [1.0, 2.0], [1.0, 2.0, 3.0], [False] * 3)


def test_finish_run_rejects_bad_status(store: Store) -> None:
    run_id = start(store)
    with pytest.raises(ValueError, match="'done'.*completed, failed, interrupted"):
        store.finish_run(run_id, "done")
    assert store.get_run(run_id)["status"] == "running"


def test_update_run_rejects_unknown_field(store: Store) -> None:
    run_id = start(store)
    with pytest.raises(ValueError, match="colour"):
        store.update_run(run_id, colour="red")


def test_bad_checksum_rejected(store: Store) -> None:
    run_id = start(store)
    with pytest.raises(ValueError, match="sha256"):
        store.add_sae_model(run_id, path="p", d_in=1, d_sae=2, architecture="relu", checksum="xyz")


def test_unknown_run_lists_existing_ids(store: Store) -> None:
    with pytest.raises(KeyError, match="no runs yet"):
        store.get_run(1)
    ids = [start(store) for _ in range(12)]
    with pytest.raises(UnknownRunError) as caught:
        store.get_run(999_999)
    message = str(caught.value)
    assert "999999" in message and "newest 10 of 12" in message
    assert str(ids[-1]) in message and f" {ids[0]}," not in message and not message.endswith(f" {ids[0]}")
    for write in (
        lambda: store.finish_run(999_999, "failed"),
        lambda: store.add_epoch_metrics(999_999, 0, 0, {}),
        lambda: store.add_features(999_999, [1.0], [1.0], [1.0], [False]),
        lambda: store.epoch_metrics(999_999),
    ):
        with pytest.raises(KeyError, match="no run with id 999999"):
            write()


def test_unreachable_postgres_is_one_clear_line() -> None:
    url = "postgresql+psycopg2://alice:s3cret@127.0.0.1:1/midisc"
    started = time.perf_counter()
    with pytest.raises(StoreError) as caught:
        Store(url)
    message = str(caught.value)
    assert "\n" not in message
    assert "127.0.0.1" in message and ":1/" in message
    assert "s3cret" not in message and "alice:***@" in message
    assert message.startswith("cannot reach database")
    assert time.perf_counter() - started < 10


def test_a_database_never_created_says_how_to_create_or_name_one(postgres_url) -> None:
    from sqlalchemy.engine import make_url

    missing = make_url(postgres_url).set(database="midisc_never_created", query={})
    with pytest.raises(StoreError) as caught:
        Store(missing.render_as_string(hide_password=False))
    message = str(caught.value)
    assert "\n" not in message and 'database "midisc_never_created" does not exist' in message
    assert f"createdb -h {missing.host} -U {missing.username} midisc_never_created" in message
    assert "POSTGRES_DB for storage=postgres and --db postgres" in message


@pytest.mark.parametrize(
    "url, expected",
    [
        ("not a url at all", "malformed database URL"),
        ("postgresql://u:s3cret@host:notaport/db", "malformed database URL"),
        ("nosuchdialect://u:s3cret@host/db", "unknown database dialect"),
    ],
)
def test_bad_url_is_one_clear_line(url: str, expected: str) -> None:
    with pytest.raises(StoreError) as caught:
        Store(url)
    message = str(caught.value)
    assert expected in message and "\n" not in message and "s3cret" not in message


def test_redact_url_hides_password() -> None:
    assert redact_url("postgresql+psycopg2://u:s3cret@db:5432/x") == "postgresql+psycopg2://u:***@db:5432/x"
    assert redact_url("sqlite:///outputs/midisc.db") == "sqlite:///outputs/midisc.db"
    assert redact_url("not a url") == "not a url"


def test_store_url_is_redacted(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    assert store.url.startswith("sqlite:///") and "x.db" in store.url
    store.close()


def test_sqlite_parent_folder_is_created(tmp_path) -> None:
    path = tmp_path / "deep" / "er" / "runs.db"
    store = Store(f"sqlite:///{path}")
    start(store)
    store.close()
    assert path.exists()


def test_default_db_url_honours_environment(monkeypatch) -> None:
    monkeypatch.delenv("MIDISC_DB_URL", raising=False)
    assert default_db_url() == "sqlite:///outputs/midisc.db"
    monkeypatch.setenv("MIDISC_DB_URL", "postgresql+psycopg2://u@h/db")
    assert default_db_url() == "postgresql+psycopg2://u@h/db"
