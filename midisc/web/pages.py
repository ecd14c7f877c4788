"""The HTML pages, each a deep link a person can paste into notes:

    /                             every run, sortable and filterable; running ones update live
    /runs/{run}                   a run: config, curves, frequency histogram, core figures, its features
    /runs/{run}/features/{i}      a feature's dashboard
    /runs/{run}/try               try a text: which features fire on which tokens
    /sweeps, /sweep?id=NAME       the sweeps, and one sweep's jobs and sparsity-fidelity frontier
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from midisc.store import Store
from midisc.store.pages import FEATURE_SORTS, RUN_SORTS
from midisc.store.tables import RUN_STATUSES
from midisc.web import reads

router = APIRouter()


def _page(request: Request, template: str, **context) -> HTMLResponse:
    return request.app.state.templates.TemplateResponse(request, template, context)


def _no_database(request: Request) -> HTMLResponse:
    return _page(request, "start.html", title="no database yet", db=request.app.state.db.shown, missing=True)


def _store(request: Request) -> Store | None:
    return request.app.state.db.get()


@router.get("/", response_class=HTMLResponse)
def runs(request: Request, sort: str = "started_at", desc: int = 1, page: int = 1, status: str = "", q: str = ""):
    store = _store(request)
    if store is None:
        return _no_database(request)
    listed = reads.runs(store, sort=sort, descending=bool(desc), page=page, status=status, search=q)
    if listed["total"] == 0 and not (status or q):
        return _page(request, "start.html", title="no runs yet", db=request.app.state.db.shown, missing=False)
    return _page(request, "runs.html", title="runs", listed=listed, sorts=RUN_SORTS, statuses=RUN_STATUSES,
                 db=request.app.state.db.shown)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run(request: Request, run_id: int, sort: str = "frequency", desc: int = 1, page: int = 1, q: str = "",
        concept: str = "", alive: int = 0):
    store = _store(request)
    if store is None:
        return _no_database(request)
    shown = reads.run(store, run_id)
    listed = reads.features(store, run_id, sort=sort, descending=bool(desc), page=page, search=q, concept=concept,
                            alive=bool(alive)) if shown["width"] else None
    return _page(request, "run.html", title=shown["title"], shown=shown, listed=listed, sorts=FEATURE_SORTS,
                 config=json.dumps(shown["run"]["config"], indent=2, sort_keys=True),
                 charts={"curves": shown["curves"], "histogram": shown["histogram"], "live": shown["live"]})


@router.get("/runs/{run_id}/features/{index}", response_class=HTMLResponse)
def feature(request: Request, run_id: int, index: int):
    store = _store(request)
    if store is None:
        return _no_database(request)
    shown = reads.feature(store, run_id, index)
    return _page(request, "feature.html", title=shown["title"], shown=shown,
                 charts={"density": shown["density"], "logits": shown["logits"]})


@router.get("/runs/{run_id}/try", response_class=HTMLResponse)
def try_text(request: Request, run_id: int, text: str = ""):
    store = _store(request)
    if store is None:
        return _no_database(request)
    row = store.get_run(run_id)
    return _page(request, "try.html", title=f"run {run_id}: try a text", run=row, text=text,
                 enabled=request.app.state.probe is not None)


@router.get("/sweeps", response_class=HTMLResponse)
def sweeps(request: Request):
    store = _store(request)
    if store is None:
        return _no_database(request)
    return _page(request, "sweeps.html", title="sweeps", sweeps=reads.sweep_list(store))


@router.get("/sweep", response_class=HTMLResponse)
def sweep(request: Request, id: str = "latest"):
    store = _store(request)
    if store is None:
        return _no_database(request)
    shown = reads.sweep(store, id)
    return _page(request, "sweep.html", title=f"sweep {shown['sweep_id']}", shown=shown,
                 charts={"frontier": shown["frontier"]})
