"""A run as plain data, to set a faulted run beside its uninterrupted twin: every row it has in every table, and
its saved SAE weights.

A row is kept without what names where and when it was made (ids, paths, times, the config with its database
URL): two runs of one config differ in those and nothing else. A run's `metrics` JSON holds its wall time
(`seconds`), and an evaluation its time (`datetime_epoch_millis`) and run id: dropped for the same reason.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from safetensors.torch import load_file
from sqlalchemy import MetaData, select

from midisc.run_folder import SAE_FOLDER, WEIGHTS_FILENAME
from midisc.store import Store

WHERE_AND_WHEN = {"id", "run_id", "started_at", "ended_at", "recorded_at", "created_at", "output_dir", "path",
                  "config", "run_uuid", "sweep_id", "overrides"}
WALL_TIME = {"seconds", "datetime_epoch_millis"}  # and when SAEBench's report was made


def _plain(column: str, value):
    if isinstance(value, dict):
        return tuple(sorted((k, _plain(k, v)) for k, v in value.items() if k not in WALL_TIME | WHERE_AND_WHEN))
    if isinstance(value, list):
        return tuple(_plain(column, v) for v in value)
    return value


def rows(url: str, run_id: int) -> dict[str, Counter]:
    """{table: Counter of its rows of `run_id`}, each row a tuple of (column, value) without WHERE_AND_WHEN."""
    with Store(url) as store:
        tables = MetaData()
        tables.reflect(store._engine)
        found: dict[str, Counter] = {}
        with store._engine.connect() as connection:
            for name, table in tables.tables.items():
                key = table.c.get("run_id") if name != "training_runs" else table.c.id
                if key is None:
                    continue
                found[name] = Counter(
                    tuple((c, _plain(c, v)) for c, v in row._mapping.items() if c not in WHERE_AND_WHEN)
                    for row in connection.execute(select(table).where(key == run_id)))
    return found


def weights(run_folder: Path) -> dict:
    return load_file(Path(run_folder) / SAE_FOLDER / WEIGHTS_FILENAME)


def differences(run: dict[str, Counter], twin: dict[str, Counter]) -> list[str]:
    """What the faulted run's rows lack or have beyond the twin's, table by table ([] when they are the same)."""
    said = []
    for table in sorted(set(run) | set(twin)):
        lost = twin.get(table, Counter()) - run.get(table, Counter())
        extra = run.get(table, Counter()) - twin.get(table, Counter())
        if lost or extra:
            said.append(f"{table}: {sum(lost.values())} row(s) missing or changed, {sum(extra.values())} extra")
    return said


def lost_rows(run: dict[str, Counter], twin: dict[str, Counter]) -> int:
    return sum(sum((twin[t] - run.get(t, Counter())).values()) for t in twin)


def weight_difference(run: dict, twin: dict) -> float:
    """The largest absolute difference between the two SAEs' tensors (inf when they do not have the same ones)."""
    if run.keys() != twin.keys() or any(run[k].shape != twin[k].shape for k in run):
        return float("inf")
    return max(float((run[k].double() - twin[k].double()).abs().max()) for k in run)
