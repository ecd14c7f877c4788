"""Several processes writing runs at once, as the jobs of a parallel sweep do: no row lost, no id shared."""

import multiprocessing

import pytest

from midisc.store import Store

WRITERS, RUNS_EACH, FEATURES = 4, 5, 300


def write_runs(url: str, writer: int, start, ids) -> None:
    start.wait()  # every process opens the database and writes at the same moment
    with Store(url) as store:
        for i in range(RUNS_EACH):
            run_id = store.start_run(model=f"writer-{writer}", hook="h", layer=i, architecture="topk",
                                     config={"writer": writer, "i": i}, output_dir=f"/out/{writer}/{i}",
                                     sweep_id="/multirun/parallel", overrides=[f"seed={i}"])
            for epoch in range(3):
                store.add_epoch_metrics(run_id, epoch, 10 * epoch, {"train/loss": 1.0 / (epoch + 1)})
            store.add_features(run_id, [0.01] * FEATURES, [1.0] * FEATURES, [2.0] * FEATURES, [False] * FEATURES)
            store.finish_run(run_id, "completed", metrics={"fvu": 0.1 * writer, "l0": float(i + 1)})
            ids.append(run_id)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_parallel_writers_lose_no_rows_and_never_share_an_id(backend, request):
    url = request.getfixturevalue(f"{backend}_url")
    Store(url).close()  # the schema exists before the race, as after the first job of a sweep
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start, ids = manager.Barrier(WRITERS), manager.list()
        workers = [context.Process(target=write_runs, args=(url, w, start, ids)) for w in range(WRITERS)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
        assert [w.exitcode for w in workers] == [0] * WRITERS
        ids = list(ids)
    assert len(ids) == len(set(ids)) == WRITERS * RUNS_EACH
    with Store(url) as store:
        runs = store.list_runs(sweep_id="/multirun/parallel")
        assert sorted(r["id"] for r in runs) == sorted(ids) and {r["status"] for r in runs} == {"completed"}
        for run_id in ids:
            assert len(store.epoch_metrics(run_id)) == 3 and len(store.features(run_id)) == FEATURES
        assert store.sweeps()[0]["runs"] == WRITERS * RUNS_EACH
