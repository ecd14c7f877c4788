"""Database writes: 20,480 feature rows and their top examples through midisc's Store, on SQLite and PostgreSQL.

Why: at the end of training `finish.record_analysis` writes one row per feature (`Store.add_features`) and
every feature's examples (`Store.add_feature_examples`). seed_phi2's SAE has 20,480 features and keeps
`analysis.n_top` = 20 top examples each (a window of before + 1 + after = 21 tokens): ~410k example rows. A
slow write holds every run at its end, and PostgreSQL over a network pays per round trip.

Each repeat records a fresh run (`Store.start_run`) and times the two calls record_analysis makes, with their
checks of every value included. SQLite writes into a temporary file; PostgreSQL into a throwaway schema that
is dropped afterwards (URL from $MIDISC_TEST_POSTGRES_URL, else postgresql+psycopg2://postgres@127.0.0.1:5432/test;
skipped with a note when unreachable). Figures are medians over the repeats.

    python bench/db_write.py [--quick] [--examples N]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import create_engine, text

from midisc.store import Store

from output import result, table

TARGET = 50_000  # feature rows per second
BEFORE, AFTER = 16, 4  # conf/train.yaml analysis.before / after: windows of 21 tokens
DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def feature_columns(n: int, rng: random.Random) -> tuple[list[float], list[float], list[float], list[bool]]:
    frequency = [rng.random() * 0.05 for _ in range(n)]
    return frequency, [rng.random() * 5 for _ in range(n)], [rng.random() * 20 for _ in range(n)], \
        [f == 0 for f in frequency]


def example_rows(n_features: int, per_feature: int, rng: random.Random) -> list[dict]:
    """Rows shaped as features.example_rows gives them: top examples, strongest first."""
    words = [f" word{i}" for i in range(500)]
    rows = []
    for feature in range(n_features):
        for rank in range(per_feature):
            width = BEFORE + 1 + AFTER
            rows.append({"feature_index": feature, "kind": "top", "rank": rank, "activation": 20.0 - rank * 0.5,
                         "context_index": rng.randrange(1000), "token_index": rng.randrange(1, 128),
                         "max_token_index": BEFORE, "tokens": rng.choices(words, k=width),
                         "values": [round(rng.random() * 10, 5) for _ in range(width)]})
    return rows


@contextmanager
def sqlite_url():
    with tempfile.TemporaryDirectory() as folder:
        yield f"sqlite:///{Path(folder) / 'bench.db'}"


@contextmanager
def postgres_url(url: str):
    """A URL whose connections see only a fresh schema, dropped afterwards (as tests/conftest.py does)."""
    schema = f"midisc_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, connect_args={"connect_timeout": 5})
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in url else "?"
    try:
        yield f"{url}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def measure(backend: str, url: str, features: tuple, examples: list[dict], repeats: int) -> dict:
    seconds: dict[str, list[float]] = {"features": [], "examples": []}
    with Store(url) as store:
        for _ in range(repeats):
            run_id = store.start_run(model="bench", hook="model.layers.0", layer=0, architecture="standard",
                                     config={}, output_dir="bench")
            start = time.perf_counter()
            store.add_features(run_id, *features)
            middle = time.perf_counter()
            store.add_feature_examples(run_id, examples)
            seconds["features"].append(middle - start)
            seconds["examples"].append(time.perf_counter() - middle)
    n, e = len(features[0]), len(examples)
    feature_rate = n / statistics.median(seconds["features"])
    return {"backend": backend, "features": n, "examples": e, "feature_s": statistics.median(seconds["features"]),
            "feature_rows_s": feature_rate, "example_s": statistics.median(seconds["examples"]),
            "example_rows_s": e / statistics.median(seconds["examples"]), "target": TARGET,
            "pass": feature_rate >= TARGET}


def reachable(url: str) -> str | None:
    """None when PostgreSQL answers, else why not, in one line."""
    try:
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as err:  # no driver, refused, timed out, bad login: all mean "skip it"
        return str(getattr(err, "orig", err)).strip().splitlines()[0][:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 features, a few examples each (for tests)")
    parser.add_argument("--examples", type=int, help="top examples per feature (default 20: analysis.n_top)")
    args = parser.parse_args()
    n_features, per_feature, repeats = (512, 4, 2) if args.quick else (20_480, 20, 3)
    per_feature = args.examples if args.examples is not None else per_feature
    rng = random.Random(0)
    features, examples = feature_columns(n_features, rng), example_rows(n_features, per_feature, rng)

    rows = []
    with sqlite_url() as url:
        rows.append(measure("sqlite", url, features, examples, repeats))
    pg = os.environ.get("MIDISC_TEST_POSTGRES_URL") or DEFAULT_PG
    why = reachable(pg)
    if why is None:
        with postgres_url(pg) as url:
            rows.append(measure("postgresql", url, features, examples, repeats))
    else:
        print(f"note: PostgreSQL skipped, {pg.split('@')[-1]} is unreachable: {why}")
        rows.append({"backend": "postgresql", "skipped": why})
    measured = [r for r in rows if "skipped" not in r]
    table(f"Store writes: {n_features:,} features, {per_feature} top examples each, median of {repeats}",
          ["backend", "feature rows", "seconds", "rows/s", "examples", "seconds", "rows/s", "target", "result"],
          [[r["backend"], r["features"], r["feature_s"], r["feature_rows_s"], r["examples"], r["example_s"],
            r["example_rows_s"], f"≥ {TARGET:,} feature rows/s", r["pass"]] for r in measured])
    result({"rows": rows, "targets_met": all(r["pass"] for r in measured)})


if __name__ == "__main__":
    main()
