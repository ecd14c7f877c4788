"""Feature browser page times at real sizes: the run list, a feature list and a feature dashboard, on a real server.

Why: the browser (`python -m midisc.serve`) is clicked through by a person, page after page; each must feel
instant however large the database. Real sizes are a database of 1,000 runs and a run of 65,536 features
(a 16x SAE on a 4,096-wide model), whose pages must be sorted, counted and cut by the database, not read whole.

Each database is built through `Store`, with the writes a run makes: 1,000 runs (start_run, 3 epoch rows,
update_run, finish_run with fvu, l0, dead_frac, mse, ce_loss_score; a few failed, interrupted or still running),
one of them wide: 65,536 feature rows, 3 top and 2 quantile examples of 24 tokens per feature (327,680
example rows; a real run keeps 20 and 10 of 21 tokens), a dashboard profile per feature (density and logit
histograms, 10 promoted, suppressed and similar entries) and 2 concepts of 10 scores. SQLite is a file in a
temporary folder; PostgreSQL a fresh schema, ANALYZEd as autovacuum would be by then, and dropped afterwards
(URL from $MIDISC_TEST_POSTGRES_URL, else postgresql+psycopg2://postgres@127.0.0.1:5432/test; skipped with a
note when unreachable).

Each database is then served by a real `python -m midisc.serve --db URL --no-model --no-browser` process on a
free port of 127.0.0.1, and timed from here over one keep-alive HTTP connection, the whole answer read: the run
list (`/`, and sorted by FVU on page 3), the wide run's page with its feature list (by frequency, page 1, and by
max activation deep in it: page 200) and the dashboards of features drawn across the width. Every answer must
be 200 and show the rows the baseline read, else the script stops.

The baseline, timed in the same rounds (page, then baseline, in turn), is plain SQLAlchemy Core on the same
database from this process: the queries that fetch what the page shows, and nothing else (the run list: its
count, 50 rows and their newest epoch; the run page: the run, its epochs, evaluations, concepts and every
feature's frequency for the histogram, then the count, the 50 sorted rows and their strongest example; the
dashboard: the run, the width, the feature's row, examples, profile and concept scores). page / baseline says
what the server, the Store's checks and the HTML add.

Target: every page's p95 under 250 ms on each backend (a page a researcher clicks through must feel instant).
`--quick` (200 runs, 8,192 features, 30 requests a page) says nothing about speed; the full sizes time 100
requests a page after 3 warm-ups and take a few minutes, most of it building the databases.

Measured on 2 CPU cores, 2026-12-03 (p50 / p95 ms, page then baseline), every page under its target:
    SQLite      run list 12.6 / 31.3 (5.3 / 14.8)   feature list p1 124 / 151 (59 / 79)
                feature list by max p200 152 / 171 (88 / 96)   dashboard 15.4 / 19.9 (4.9 / 5.6)
    PostgreSQL  run list 19.9 / 21.8 (9.0 / 10.4)   feature list p1 159 / 181 (88 / 101)
                feature list by max p200 192 / 236 (119 / 148)   dashboard 28.4 / 35.7 (11.2 / 13.2)
The wide run's page is the slow one, and grows with the width: on every page turn of its feature list the server
reads all 65,536 frequencies for the histogram (about 40 ms), bins them in Python (about 50 ms, most of it
analysis.features.frequency_bins' loop) and has the database sort all 65,536 rows for one page (about 30 ms:
no index serves the sort). On busy cores (load 5 on 2) the by-max page's p95 reached 250-320 ms.

    python bench/serve.py [--quick] [--requests N]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
from sqlalchemy import and_, case, create_engine, func, select, text

from midisc.store import Store
from midisc.store.pages import RUN_COLUMNS
from midisc.store.tables import (EXAMPLE_KINDS, ConceptScore, DiscoveredFeature, EpochMetric, Evaluation,
                                 FeatureExample, FeatureProfile, TrainingRun)

from db_write import DEFAULT_PG, postgres_url, reachable, sqlite_url
from output import result, table

TARGET_P95_MS = 250.0
PAGE = 50  # rows a list page shows (midisc.web.reads.PAGE_SIZE)
DEEP_PAGE = 200  # the feature list page far from the top
TOP, QUANTILE, WINDOW = 3, 2, 24  # examples per feature and tokens per example
WARMUP = 3
START_TIMEOUT_S = 60.0
WORDS = [f" w{i}" for i in range(2_000)]
MODELS = ("HuggingFaceTB/SmolLM2-135M", "EleutherAI/pythia-70m-deduped", "google/gemma-2-2b", "meta-llama/Llama-3.2-1B")
ARCHITECTURES = ("topk", "standard", "batchtopk", "jumprelu")


# ----- the database ------------------------------------------------------------------------------


def run_config(i: int, model: str, layer: int, architecture: str, width: int) -> dict:
    """A config of the size a real run records (the page shows it whole)."""
    return {"model": {"name": model, "dtype": "float32"}, "layer": layer, "hook": f"model.layers.{layer}",
            "sae": {"architecture": architecture, "expansion": width // 576, "k": 32, "l1_coefficient": 5.0},
            "trainer": {"lr": 4e-4, "batch_size": 4096, "precision": "bf16-mixed", "max_epochs": 3},
            "activations": {"cache": "disk", "buffer_size": 262_144, "context_size": 128},
            "data": {"source": "bbc", "max_samples": 20_000, "holdout_texts": 200},
            "analysis": {"n_top": 20, "n_quantile": 10, "before": 16, "after": 4}, "seed": i}


def add_runs(store: Store, n_runs: int, wide_at: int, width: int, rng: random.Random) -> int:
    """n_runs runs, three hours apart; the one at position `wide_at` has `width` features (added later). Its id."""
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    wide = -1
    for i in range(n_runs):
        model, architecture = rng.choice(MODELS), rng.choice(ARCHITECTURES)
        layer, d_sae = rng.randrange(24), width if i == wide_at else rng.choice((4_608, 9_216, 18_432))
        sweep = f"sweep-{i // 8}" if i % 3 else None
        run_id = store.start_run(model=model, hook=f"model.layers.{layer}", layer=layer, architecture=architecture,
                                 config=run_config(i, model, layer, architecture, d_sae), output_dir=f"/runs/{i}",
                                 d_in=576, d_sae=d_sae, sweep_id=sweep,
                                 overrides=[f"sae.k={rng.choice((16, 32, 64))}", f"layer={layer}"] if sweep else None,
                                 started_at=start + timedelta(hours=3 * i, seconds=rng.randrange(3600)))
        fvu = rng.uniform(0.05, 0.4)
        for epoch in range(3):
            store.add_epoch_metrics(run_id, epoch, (epoch + 1) * 2_000,
                                    {"train/loss": fvu * (3 - epoch), "train/fvu": fvu * (1.5 - epoch / 4),
                                     "val/fvu": fvu * (1.6 - epoch / 4), "train/l0": 32.0, "val/l0": 31.5,
                                     "sparsity/dead_frac": rng.random() * 0.1})
        store.update_run(run_id, n_tokens=786_432)
        if i == wide_at:
            wide = run_id
        roll = rng.random()
        if i >= n_runs - 3 and i != wide_at:
            continue  # still running: no final metrics, a live row
        status = "completed" if i == wide_at or roll < 0.94 else "failed" if roll < 0.97 else "interrupted"
        metrics = {"fvu": fvu, "l0": rng.uniform(20, 64), "dead_frac": rng.random() * 0.1, "mse": fvu * 0.02,
                   "ce_loss_score": rng.uniform(0.7, 0.99), "analysed_tokens": 262_144}
        store.finish_run(run_id, status, metrics=metrics if status == "completed" else None,
                         error="CUDA out of memory" if status == "failed" else None)
    return wide


def histogram(rng: random.Random, bins: int) -> dict:
    low = rng.uniform(-2, 0)
    return {"low": low, "high": low + rng.uniform(1, 20), "heights": [rng.randrange(5_000) for _ in range(bins)]}


def add_wide(store: Store, run_id: int, width: int, rng: random.Random) -> int:
    """The wide run's features, examples, profiles and concept scores, as a published run has them. Example rows."""
    frequency = [0.0 if rng.random() < 0.03 else rng.random() ** 3 * 0.05 for _ in range(width)]
    mean = [rng.uniform(0.5, 5) if f else float("nan") for f in frequency]
    peak = [rng.uniform(2, 30) if f else 0.0 for f in frequency]
    store.add_features(run_id, frequency, mean, peak, [f == 0 for f in frequency])
    examples = []
    for feature in range(width):
        for kind, count in (("top", TOP), ("quantile", QUANTILE)):
            for rank in range(count):
                examples.append({"feature_index": feature, "kind": kind, "rank": rank,
                                 "activation": peak[feature] * (1 - rank * 0.05 if kind == "top" else rng.random()),
                                 "context_index": rng.randrange(20_000), "token_index": rng.randrange(1, 128),
                                 "max_token_index": 16, "tokens": rng.choices(WORDS, k=WINDOW),
                                 "values": [round(rng.random() * 10, 4) for _ in range(WINDOW)]})
    written = store.add_feature_examples(run_id, examples)
    del examples
    profiles = [{"feature_index": i, "profile": {
        "density": histogram(rng, 50), "logits": histogram(rng, 40),
        "promoted": [[rng.choice(WORDS), round(rng.uniform(0, 3), 4)] for _ in range(10)],
        "suppressed": [[rng.choice(WORDS), round(rng.uniform(-3, 0), 4)] for _ in range(10)],
        "similar": [[rng.randrange(width), round(rng.uniform(0.2, 0.9), 4)] for _ in range(10)]}}
        for i in range(width)]
    store.add_feature_profiles(run_id, profiles)
    for concept in ("emotions", "formal"):
        store.add_concept_scores(run_id, concept, [
            {"feature_index": f, "rank": rank, "score": 0.95 - rank * 0.01, "mean_concept": 2.0, "mean_contrast": 0.1,
             "fire_rate_concept": 0.8, "fire_rate_contrast": 0.05, "n_concept": 40, "n_contrast": 240}
            for rank, f in enumerate(rng.sample(range(width), 10))])
    return written


def build(url: str, n_runs: int, width: int) -> tuple[int, float]:
    """The database at `url`, through Store; the wide run's id and the seconds it took."""
    rng = random.Random(0)
    started = time.perf_counter()
    with Store(url) as store:
        wide = add_runs(store, n_runs, n_runs // 3, width, rng)
        add_wide(store, wide, width, rng)
    if url.startswith("postgresql"):
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(text("ANALYZE"))
        engine.dispose()
    return wide, time.perf_counter() - started


# ----- the baseline: plain SQLAlchemy Core ---------------------------------------------------------


RUNS = TrainingRun.__table__
EPOCHS = EpochMetric.__table__
FEATURES = DiscoveredFeature.__table__
EXAMPLES = FeatureExample.__table__
PROFILES = FeatureProfile.__table__
SCORES = ConceptScore.__table__
EVALUATIONS = Evaluation.__table__


def ordered(column, descending: bool, tiebreak) -> tuple:
    return (column.is_(None), column.desc() if descending else column.asc(), tiebreak)


def newest_epochs(connection, ids: list[int]) -> list:
    newest = (select(EPOCHS.c.run_id, func.max(EPOCHS.c.epoch).label("epoch"))
              .where(EPOCHS.c.run_id.in_(ids)).group_by(EPOCHS.c.run_id).subquery())
    return connection.execute(select(EPOCHS.c.run_id, EPOCHS.c.epoch, EPOCHS.c.step, EPOCHS.c.metrics).join(
        newest, and_(EPOCHS.c.run_id == newest.c.run_id, EPOCHS.c.epoch == newest.c.epoch))).all()


def base_runs(connection, sort: str, descending: bool, page: int) -> list[int]:
    """The run list: its count, one page of rows, their newest epoch rows. The ids shown."""
    connection.execute(select(func.count()).select_from(RUNS)).scalar()
    ce = RUNS.c.metrics["ce_loss_score"].as_float()
    rows = connection.execute(select(*(RUNS.c[c] for c in RUN_COLUMNS), ce.label("ce_loss_score"))
                              .order_by(*ordered(RUNS.c[sort], descending, RUNS.c.id.desc()))
                              .offset((page - 1) * PAGE).limit(PAGE)).all()
    ids = [row.id for row in rows]
    newest_epochs(connection, ids)
    return ids


def base_run(connection, run_id: int, sort: str, descending: bool, page: int) -> list[int]:
    """The run page: the run, its epochs, evaluations, concepts, every frequency, then one page of features."""
    connection.execute(select(RUNS).where(RUNS.c.id == run_id)).one()
    connection.execute(select(EPOCHS).where(EPOCHS.c.run_id == run_id).order_by(EPOCHS.c.epoch)).all()
    # Iterated, not .all(): SQLAlchemy's fastest way through 65,536 one-column rows (half the time of .all()).
    list(connection.scalars(select(FEATURES.c.frequency).where(FEATURES.c.run_id == run_id)
                            .order_by(FEATURES.c.feature_index)))
    connection.execute(select(EVALUATIONS).where(EVALUATIONS.c.run_id == run_id)).all()
    connection.execute(select(SCORES.c.concept).where(SCORES.c.run_id == run_id).distinct()).all()
    where = FEATURES.c.run_id == run_id
    connection.execute(select(func.count()).select_from(FEATURES).where(where)).scalar()
    rows = connection.execute(
        select(FEATURES.c.feature_index, FEATURES.c.frequency, FEATURES.c.mean_activation,
               FEATURES.c.max_activation, FEATURES.c.is_dead).where(where)
        .order_by(*ordered(FEATURES.c[sort], descending, FEATURES.c.feature_index))
        .offset((page - 1) * PAGE).limit(PAGE)).all()
    shown = [row.feature_index for row in rows]
    connection.execute(select(EXAMPLES).where(EXAMPLES.c.run_id == run_id, EXAMPLES.c.kind == "top",
                                              EXAMPLES.c.rank < 1, EXAMPLES.c.feature_index.in_(shown))).all()
    return shown


def base_feature(connection, run_id: int, index: int) -> None:
    """The dashboard: the run, the width, the feature's row, its examples, its profile, the run's concept scores."""
    connection.execute(select(RUNS).where(RUNS.c.id == run_id)).one()
    connection.execute(select(func.count()).select_from(FEATURES).where(FEATURES.c.run_id == run_id)).scalar()
    connection.execute(select(FEATURES).where(FEATURES.c.run_id == run_id,
                                              FEATURES.c.feature_index == index)).one()
    kinds = case({kind: order for order, kind in enumerate(EXAMPLE_KINDS)}, value=EXAMPLES.c.kind)
    connection.execute(select(EXAMPLES).where(EXAMPLES.c.run_id == run_id, EXAMPLES.c.feature_index == index)
                       .order_by(kinds, EXAMPLES.c.rank)).all()
    connection.execute(select(PROFILES.c.profile).where(PROFILES.c.run_id == run_id,
                                                        PROFILES.c.feature_index == index)).one()
    connection.execute(select(SCORES).where(SCORES.c.run_id == run_id)).all()


# ----- the server ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(url: str, folder: Path):
    """`python -m midisc.serve` on a free port of 127.0.0.1, answering; an httpx client on it. Always stopped."""
    port = free_port()
    log = folder / f"serve-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "midisc.serve", "--db", url, "--host", "127.0.0.1",
                                    "--port", str(port), "--no-model", "--no-browser"],
                                   cwd=folder, stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
                try:
                    client.get("/static/does-not-exist")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the server did not answer in {START_TIMEOUT_S:.0f} s:\n"
                                         f"{log.read_text()[-3000:]}") from None
                    time.sleep(0.2)
            yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ----- timing --------------------------------------------------------------------------------------


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def fetch(client: httpx.Client, path: str, expected: list[str]) -> tuple[float, int]:
    """Seconds to GET `path` whole, and its size; stops the script unless it is 200 and shows `expected`."""
    start = time.perf_counter()
    answer = client.get(path)
    body = answer.text
    seconds = time.perf_counter() - start
    if answer.status_code != 200:
        raise SystemExit(f"GET {path}: {answer.status_code}\n{body[:2000]}")
    missing = [e for e in expected if e not in body]
    if missing:
        raise SystemExit(f"GET {path}: the page does not show {missing[:5]} (of {len(expected)} expected)")
    return seconds, len(body)


def time_case(client: httpx.Client, engine, name: str, shown_path: str, paths_and_queries, rounds: int) -> dict:
    """`rounds` of (the page, then its baseline) after WARMUP of each; p50 / p95 of both in ms."""
    pages, baselines, size = [], [], 0
    for i, (path, query, expected) in enumerate(paths_and_queries(WARMUP + rounds)):
        start = time.perf_counter()
        with engine.connect() as connection:
            shown = query(connection)
        baseline = time.perf_counter() - start
        seconds, size = fetch(client, path, expected(shown))
        if i >= WARMUP:
            pages.append(seconds * 1000)
            baselines.append(baseline * 1000)
    page_p50, page_p95 = percentile(pages, 50), percentile(pages, 95)
    base_p50, base_p95 = percentile(baselines, 50), percentile(baselines, 95)
    return {"page": name, "path": shown_path, "requests": rounds, "kb": size / 1024, "page_p50_ms": page_p50,
            "page_p95_ms": page_p95, "baseline_p50_ms": base_p50, "baseline_p95_ms": base_p95,
            "ratio": page_p50 / base_p50, "target_p95_ms": TARGET_P95_MS, "pass": page_p95 < TARGET_P95_MS}


def measure(backend: str, url: str, n_runs: int, width: int, rounds: int, folder: Path) -> list[dict]:
    wide, build_s = build(url, n_runs, width)
    print(f"{backend}: built {n_runs:,} runs and run {wide} of {width:,} features in {build_s:.0f} s", flush=True)
    deep = min(DEEP_PAGE, -(-width // PAGE) // 2)  # within the list at every size
    rng = random.Random(1)

    def fixed(path: str, query, expected):
        return lambda n: [(path, query, expected)] * n

    def runs_shown(ids: list[int]) -> list[str]:
        return [f'data-run="{i}"' for i in ids]

    def features_shown(indices: list[int]) -> list[str]:
        return [f'href="/runs/{wide}/features/{i}"' for i in indices]

    def dashboards(n: int):
        # Drawn across the width, each with its own K: the baseline and the page read the same feature.
        return [(f"/runs/{wide}/features/{k}", lambda c, k=k: base_feature(c, wide, k),
                 lambda _, k=k: [f"Feature {k} <span", 'id="top-examples"', 'id="logit-table"'])
                for k in rng.sample(range(width), n)]

    cases = [
        ("run list", "/", fixed("/", lambda c: base_runs(c, "started_at", True, 1), runs_shown)),
        ("run list, by FVU, page 3", "/?sort=fvu&desc=0&page=3", fixed("/?sort=fvu&desc=0&page=3", lambda c: base_runs(c, "fvu", False, 3),
                                           runs_shown)),
        ("feature list, page 1", f"/runs/{wide}", fixed(f"/runs/{wide}", lambda c: base_run(c, wide, "frequency", True, 1),
                                       features_shown)),
        (f"feature list, by max, page {deep}", f"/runs/{wide}?sort=max_activation&desc=1&page={deep}",
         fixed(f"/runs/{wide}?sort=max_activation&desc=1&page={deep}",
               lambda c: base_run(c, wide, "max_activation", True, deep), features_shown)),
        ("feature dashboard", f"/runs/{wide}/features/K", dashboards),
    ]
    engine = create_engine(url)
    try:
        with serving(url, folder) as client:
            rows = [{"backend": backend, **time_case(client, engine, name, shown, paths, rounds)}
                    for name, shown, paths in cases]
    finally:
        engine.dispose()
    for row in rows:
        row.update(runs=n_runs, features=width, build_s=build_s)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 runs, 8,192 features, 30 requests a page (for tests)")
    parser.add_argument("--requests", type=int, help="timed requests per page (default 100; 30 with --quick)")
    args = parser.parse_args()
    n_runs, width, rounds = (200, 8_192, 30) if args.quick else (1_000, 65_536, 100)
    rounds = args.requests or rounds
    if rounds < 2:
        parser.error(f"--requests={rounds} must be at least 2 (a p95 needs two)")

    rows: list[dict] = []
    postgres = "measured"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with sqlite_url() as url:
            rows += measure("sqlite", url, n_runs, width, rounds, folder)
        pg = os.environ.get("MIDISC_TEST_POSTGRES_URL") or DEFAULT_PG
        why = reachable(pg)
        if why is None:
            with postgres_url(pg) as url:
                rows += measure("postgresql", url, n_runs, width, rounds, folder)
        else:
            postgres = f"skipped: {pg.split('@')[-1]} is unreachable: {why}"
            print(f"note: PostgreSQL {postgres}")
    table(f"feature browser pages: {n_runs:,} runs, a run of {width:,} features, {rounds} requests a page (ms)",
          ["backend", "page", "KiB", "p50", "p95", "baseline p50", "baseline p95", "page / baseline", "target",
           "result"],
          [[r["backend"], r["page"], r["kb"], r["page_p50_ms"], r["page_p95_ms"], r["baseline_p50_ms"],
            r["baseline_p95_ms"], r["ratio"], f"p95 < {TARGET_P95_MS:.0f}", r["pass"]] for r in rows])
    for r in rows:
        if not r["pass"]:
            print(f"MISSED {r['backend']} {r['page']} ({r['path']}): p95 {r['page_p95_ms']:.0f} ms")
    result({"rows": rows, "runs": n_runs, "features": width, "requests": rounds, "postgres": postgres,
            "targets_met": all(r["pass"] for r in rows)})


if __name__ == "__main__":
    main()
