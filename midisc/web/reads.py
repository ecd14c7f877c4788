"""What each page reads: store queries combined with `views`, one function per page, plain dicts out.

The HTML pages and the JSON API call the same function, so a page and its API answer can never disagree.
"""

from __future__ import annotations

from typing import Any

from midisc.analysis import sweeps as sweep_names
from midisc.store import Store
from midisc.web import views
from midisc.web.errors import NotFound

PAGE_SIZE = 50
EXAMPLES_SHOWN = 10  # top examples on a dashboard


def _paging(page: Any, **query: Any) -> dict[str, Any]:
    pages = max(1, -(-page.total // page.limit))
    return {"rows": page.rows, "total": page.total, "page": page.offset // page.limit + 1, "pages": pages,
            "limit": page.limit, "query": {k: v for k, v in query.items() if v not in (None, "")}}


def runs(store: Store, *, sort: str = "started_at", descending: bool = True, page: int = 1, status: str | None = None,
         search: str | None = None, limit: int = PAGE_SIZE) -> dict[str, Any]:
    found = store.run_page(sort=sort, descending=descending, offset=(max(page, 1) - 1) * limit, limit=limit,
                           status=status or None, search=search or None)
    newest = store.latest_epochs([row["id"] for row in found.rows])
    for row in found.rows:
        row["hook_short"] = views.short_hook(row["hook"])
        row["live"] = views.live(row, newest.get(row["id"]))
    return _paging(found, sort=sort, desc=int(descending), status=status, q=search)


def live(store: Store, ids: list[int] | None) -> list[dict[str, Any]]:
    """Progress of the given runs (default: every running one) from the newest epoch row each has written."""
    if ids is None:
        runs = store.run_page(status="running", limit=500, sort="id").rows
    else:
        runs = [store.get_run(run_id) for run_id in ids[:100]]
    newest = store.latest_epochs([run["id"] for run in runs])
    return [views.live(run, newest.get(run["id"])) for run in runs]


def run(store: Store, run_id: int) -> dict[str, Any]:
    row = store.get_run(run_id)
    epochs = store.epoch_metrics(run_id)
    frequency = store.feature_frequencies(run_id)
    return {"run": row, "title": views.run_title(row), "curves": views.curves(epochs),
            "live": views.live(row, epochs[-1] if epochs else None),
            "histogram": views.frequency_histogram(frequency), "core": views.core_figures(store.evaluations(run_id)),
            "concepts": store.concepts(run_id), "width": len(frequency)}


def features(store: Store, run_id: int, *, sort: str = "frequency", descending: bool = True, page: int = 1,
             search: str | None = None, concept: str | None = None, alive: bool = False,
             limit: int = PAGE_SIZE) -> dict[str, Any]:
    found = store.feature_page(run_id, sort=sort, descending=descending, offset=(max(page, 1) - 1) * limit,
                               limit=limit, search=search or None, concept=concept or None, alive=alive)
    shown = [r["feature_index"] for r in found.rows]
    best = {e["feature_index"]: e for e in store.feature_examples(run_id, features=shown, kind="top", max_rank=1)}
    explained = store.latest_explanations(run_id, shown)
    for row in found.rows:
        example = best.get(row["feature_index"])
        row["example"] = views.example_view(example, row["max_activation"]) if example else None
        row["explanation"] = explained.get(row["feature_index"], {}).get("explanation")
    return _paging(found, sort=sort, desc=int(descending), q=search, concept=concept, alive=int(alive))


def feature(store: Store, run_id: int, index: int) -> dict[str, Any]:
    row = store.get_run(run_id)
    width = store.feature_count(run_id)
    if width == 0:
        raise NotFound(f"run {run_id} ({row['status']}) has no analysed features yet; completed runs have them, "
                       f"or run python -m midisc.analyze {run_id}")
    if not 0 <= index < width:
        raise NotFound(f"run {run_id} has no feature {index}; its features are 0-{width - 1}")
    stats = store.feature_page(run_id, search=str(index), limit=1).rows[0]
    examples = store.feature_examples(run_id, features=[index])
    peak = stats["max_activation"]
    profile = store.feature_profiles(run_id, [index]).get(index, {})
    scores = [s for s in store.concept_scores(run_id) if s["feature_index"] == index]
    return {"run": {k: row[k] for k in ("id", "status", "model", "hook", "architecture", "d_sae")},
            "title": f"run {run_id}, feature {index}", "index": index, "width": width, "stats": stats,
            "top": [views.example_view(e, peak) for e in examples if e["kind"] == "top"][:EXAMPLES_SHOWN],
            "quantiles": views.quantile_groups([e for e in examples if e["kind"] == "quantile"], peak),
            "density": views.bars(profile.get("density")), "logits": views.bars(profile.get("logits")),
            "promoted": profile.get("promoted"), "suppressed": profile.get("suppressed"),
            "similar": profile.get("similar"), "has_profile": bool(profile), "concepts": scores,
            "explanations": [{k: e[k] for k in ("explanation", "explainer", "scorer", "prompt_version", "detection",
                                                "fuzzing", "baseline_detection", "baseline_fuzzing")}
                             for e in store.explanations(run_id, features=[index])],
            "neighbours": views.neighbours(index, width)}


def sweep_list(store: Store) -> list[dict[str, Any]]:
    return store.sweeps()


def sweep(store: Store, name: str) -> dict[str, Any]:
    sweep_id = sweep_names.resolve(name, store.sweeps())
    jobs = store.run_page(sweep_id=sweep_id, sort="id", descending=False, limit=500).rows
    labels = sweep_names.varying([j["overrides"] for j in jobs])
    for job, label in zip(jobs, labels):
        job["label"] = " ".join(label) or f"run {job['id']}"
    return {"sweep_id": sweep_id, "jobs": jobs, "frontier": views.frontier(jobs)}
