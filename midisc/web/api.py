"""The JSON API: what the pages fetch after loading (live progress, curves, try a text) and what scripts read.

    GET  /api/runs                       a page of runs (?sort=&desc=&page=&status=&q=)
    GET  /api/live[?ids=1,2]             progress of running runs, from the newest epoch row each wrote
    GET  /api/runs/{run}                 a run: its row, curves, frequency histogram, core figures
    GET  /api/runs/{run}/features        a page of its features (?sort=&desc=&page=&q=&concept=&alive=)
    GET  /api/runs/{run}/features/{i}    a feature's dashboard
    POST /api/runs/{run}/warm            load the run's model and SAE for "try a text" now
    POST /api/runs/{run}/try             {"text": ...}: the features that fire on each of its tokens
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from midisc.store import Store
from midisc.web import reads
from midisc.web.errors import NotFound
from midisc.web.tryit import TryError

router = APIRouter(prefix="/api")


def store_of(request: Request) -> Store:
    store = request.app.state.db.get()
    if store is None:
        raise NotFound(f"there is no database at {request.app.state.db.shown} yet: train a run first "
                       "(python -m midisc.train), or pass --db to python -m midisc.serve")
    return store


@router.get("/runs")
def runs(request: Request, sort: str = "started_at", desc: int = 1, page: int = 1, status: str = "",
         q: str = "") -> dict[str, Any]:
    return reads.runs(store_of(request), sort=sort, descending=bool(desc), page=page, status=status, search=q)


@router.get("/live")
def live(request: Request, ids: str = "") -> list[dict[str, Any]]:
    try:
        wanted = [int(i) for i in ids.split(",") if i.strip()] or None
    except ValueError:
        raise TryError(f"ids {ids!r} must be run ids separated by commas, e.g. ids=3,4") from None
    return reads.live(store_of(request), wanted)


@router.get("/runs/{run_id}")
def run(request: Request, run_id: int) -> dict[str, Any]:
    return reads.run(store_of(request), run_id)


@router.get("/runs/{run_id}/features")
def features(request: Request, run_id: int, sort: str = "frequency", desc: int = 1, page: int = 1, q: str = "",
             concept: str = "", alive: int = 0) -> dict[str, Any]:
    return reads.features(store_of(request), run_id, sort=sort, descending=bool(desc), page=page, search=q,
                          concept=concept, alive=bool(alive))


@router.get("/runs/{run_id}/features/{index}")
def feature(request: Request, run_id: int, index: int) -> dict[str, Any]:
    return reads.feature(store_of(request), run_id, index)


@router.post("/runs/{run_id}/warm")
async def warm(request: Request, run_id: int) -> dict[str, Any]:
    """Load the run's model and SAE now (the try page asks on opening), so the first text answers fast."""
    probe = request.app.state.probe
    if probe is None:
        return {"ready": False}
    store_of(request).get_run(run_id)
    await run_in_threadpool(probe.warm, run_id)
    return {"ready": True}


class Text(BaseModel):
    text: str


@router.post("/runs/{run_id}/try")
async def try_text(request: Request, run_id: int, body: Text) -> dict[str, Any]:
    probe = request.app.state.probe
    if probe is None:
        raise TryError("trying texts is off in this server (it was started without the language model)")
    store_of(request).get_run(run_id)  # an unknown run is a 404 before anything loads
    # The forward runs in a worker thread: the server keeps answering other pages meanwhile.
    return await run_in_threadpool(probe.features, run_id, body.text)
