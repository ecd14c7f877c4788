"""The feature browser's application: FastAPI routes over the store, Jinja2 pages, the assets it ships.

`create_app(url, probe)` builds it; `python -m midisc.serve` runs it under uvicorn. Every read goes through
`Store`, the queries the command-line tools use; the server writes nothing. A database that does not
exist yet is looked for again on each request, so the page that says "train a run first" turns into the
run list once a run has made it. Errors a person can meet (an unknown run, a feature past the width, a
word where an id goes) get a page that says what exists, with status 404 or 400, never a 500.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from midisc.analysis.sweeps import SweepError
from midisc.store import PageError, Store, UnknownRunError
from midisc.store.engine import StoreError, redact_url, require_existing
from midisc.web import api, pages
from midisc.web.errors import NotFound
from midisc.web.tryit import TextProbe, TryError

HERE = Path(__file__).parent


class Database:
    """The store the pages read, opened on first use: None while the database does not exist."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.shown = redact_url(url)
        self._store: Store | None = None
        self._lock = threading.Lock()

    def get(self) -> Store | None:
        """The store, or None while a SQLite file does not exist; StoreError when it cannot be opened."""
        with self._lock:
            if self._store is None:
                try:
                    require_existing(self.url)
                except StoreError:
                    return None
                self._store = Store(self.url)
            return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _error(request: Request, status: int, message: str) -> HTMLResponse | JSONResponse:
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, "error.html", {"status": status, "message": message},
                                      status_code=status)


def create_app(url: str, probe: TextProbe | None = None) -> FastAPI:
    """The browser over the database at `url`; `probe` answers "try a text" (None: the box says it is off)."""
    database = Database(url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        database.close()

    app = FastAPI(title="midisc feature browser", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  lifespan=lifespan)
    app.state.db = database
    app.state.probe = probe
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["zip"] = zip
    app.state.templates = templates
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)

    @app.exception_handler(NotFound)
    @app.exception_handler(UnknownRunError)
    @app.exception_handler(SweepError)
    async def not_found(request: Request, error: Exception):
        return _error(request, 404, str(error))

    @app.exception_handler(PageError)
    @app.exception_handler(TryError)
    async def bad_request(request: Request, error: Exception):
        return _error(request, 400, str(error))

    @app.exception_handler(StoreError)
    async def store_down(request: Request, error: StoreError):
        return _error(request, 503, str(error))

    @app.exception_handler(RequestValidationError)
    async def bad_path(request: Request, error: RequestValidationError):
        wrong = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg'].lower()} (got {e.get('input')!r})"
                          for e in error.errors())
        status = 404 if any(e["loc"][0] == "path" for e in error.errors()) else 400
        return _error(request, status, f"{wrong}; run and feature ids are whole numbers, as the run list shows them")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        if error.status_code == 404:
            return _error(request, 404, f"there is no page {request.url.path}; the pages are the run list (/), "
                                        "a run (/runs/ID), a feature (/runs/ID/features/N), sweeps (/sweeps)")
        return _error(request, error.status_code, str(error.detail))

    return app
