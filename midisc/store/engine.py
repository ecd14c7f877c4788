"""Turn a database URL into a checked, connected SQLAlchemy engine, with one-line errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

DEFAULT_DB_URL = "sqlite:///outputs/midisc.db"
URL_HINT = "e.g. sqlite:///outputs/midisc.db or postgresql+psycopg2://user:password@host:5432/dbname"

# Seconds to wait for a PostgreSQL server before giving up; libpq's default is to wait forever.
PG_CONNECT_TIMEOUT_S = 5
# Seconds SQLite waits on a lock; parallel sweep jobs share one file and would otherwise fail at 5 s.
SQLITE_BUSY_TIMEOUT_S = 30


class StoreError(RuntimeError):
    """The database could not be used; the message is one line meant for a person."""


def default_db_url() -> str:
    """The URL in $MIDISC_DB_URL, else a SQLite file under ./outputs: where `storage=sqlite` trains too."""
    return os.environ.get("MIDISC_DB_URL") or DEFAULT_DB_URL


def postgres_url_from_env() -> str:
    """PostgreSQL from $POSTGRES_USER/PASSWORD/HOST/PORT/DB (defaults postgres, none, 127.0.0.1, 5432, midisc).

    `storage=postgres` trains into this URL and `--db postgres` makes a tool read it, so both find the
    same database. URL.create escapes each part, so a password with @, : or / stays one password.
    """
    port = os.environ.get("POSTGRES_PORT") or "5432"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise StoreError(f"POSTGRES_PORT {port!r} is not a port number (1-65535)")
    return URL.create(
        "postgresql+psycopg2",
        username=os.environ.get("POSTGRES_USER") or "postgres",
        password=os.environ.get("POSTGRES_PASSWORD") or None,
        host=os.environ.get("POSTGRES_HOST") or "127.0.0.1",
        port=int(port),
        database=os.environ.get("POSTGRES_DB") or "midisc",
    ).render_as_string(hide_password=False)


def resolve_db_url(url: str | None) -> str:
    """A tool's --db value: a URL, `postgres` (from $POSTGRES_*), or nothing (the default database)."""
    if url is None:
        return default_db_url()
    return postgres_url_from_env() if url == "postgres" else url


def _spelling(url: str) -> str | None:
    """How a printed command names `url`: None for the default database, `postgres` for $POSTGRES_*'s,
    else the URL, password hidden (with a note: a hidden password has to be typed back in)."""
    try:
        same = database_identity(url) == database_identity(default_db_url())
        from_env = database_identity(url) == database_identity(postgres_url_from_env())
    except StoreError:
        same = from_env = False
    if same:
        return None
    if from_env and parse_url(url).get_backend_name() == "postgresql":
        return "postgres"
    shown = redact_url(url)
    return f"'{shown}'" + (" (your password in place of ***)" if shown != url else "")


def db_argument(url: str | None) -> str:
    """What a tool's command line needs to read the database at `url`: "" for the default one, else ` --db …`.

    Every hint a command prints (`python -m midisc.explore top 3`) ends with this, so that run as printed it
    reads the database the run used, not the default one beside it."""
    spelled = _spelling(url) if url else None
    return "" if spelled is None else f" --db {spelled}"


def storage_argument(url: str | None) -> str:
    """The same for `python -m midisc.train` (a resume): "", ` storage=postgres` or ` storage.url=…`."""
    if not url:
        return " storage=none"
    spelled = _spelling(url)
    if spelled is None:
        return ""
    return " storage=postgres" if spelled == "postgres" else f" storage.url={spelled}"


def redact_url(url: str) -> str:
    """`url` with its password replaced by ***; a URL that does not parse comes back unchanged."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def database_identity(url: str) -> str:
    """The database `url` names, written so that two spellings of it compare equal and no password shows.

    A SQLite path is made absolute: `sqlite:///outputs/midisc.db` is another file in another working
    folder. A journal of kept writes records this, so `db sync` can refuse to send them anywhere else.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:" and "mode=memory" not in str(parsed):
        parsed = parsed.set(database=str(Path(parsed.database).expanduser().resolve()))
    return parsed.render_as_string(hide_password=True)


def _mask_unparsed(url: str) -> str:
    # For error messages only: a URL that did not parse may still carry a password, which may itself hold
    # an unescaped @, so everything up to the last @ goes.
    return re.sub(r"(://[^:/@]*:).*@", r"\1***@", url)


def driver_message(error: BaseException) -> str:
    """The first line of the database driver's message inside a SQLAlchemy error."""
    # SQLAlchemy wraps the driver's exception; its own text adds the SQL and a docs link.
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    return lines[0] if lines else type(original).__name__


# The spellings users paste (hosted databases and DATABASE_URL give postgres://) name no driver; SQLAlchemy 2.1
# would pick psycopg 3, or know no `postgres` dialect at all. midisc ships psycopg2.
DRIVERLESS = {"postgresql": "postgresql+psycopg2", "postgres": "postgresql+psycopg2"}


def parse_url(url: str) -> URL:
    """Parse `url`, or raise StoreError saying what a valid one looks like. A PostgreSQL URL without a driver
    (`postgresql://`, `postgres://`) means the installed psycopg2."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as error:
        raise StoreError(f"malformed database URL {_mask_unparsed(url)!r} ({error}); {URL_HINT}") from None
    if parsed.drivername in DRIVERLESS:
        parsed = parsed.set(drivername=DRIVERLESS[parsed.drivername])
    if parsed.host and "@" in parsed.host:
        # The password ends at the first @, so the rest of it would be taken for the host and shown.
        raise StoreError(
            f"malformed database URL {_mask_unparsed(url)!r}: an @ in the password must be written %40 (a : as %3A)"
        )
    return parsed


SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def sqlite_files_under(folder: Path, limit: int = 8) -> list[str]:
    """SQLite files under `folder` (the ones a mistyped --db was probably meant to be), nearest first."""
    if not folder.is_dir():
        return []
    found = sorted((p for p in folder.rglob("*") if p.suffix in SQLITE_SUFFIXES and p.is_file()),
                   key=lambda p: (len(p.parts), str(p)))
    return [str(p) for p in found[:limit]]


def require_existing(url: str) -> None:
    """Refuse a SQLite URL whose file does not exist: a tool that only reads runs would otherwise create an empty
    database (and its folders) at a mistyped path and then report that it holds no runs."""
    parsed = parse_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return
    if Path(database).expanduser().is_file():
        return
    seen = sqlite_files_under(Path("outputs"))
    there = (f"databases under outputs/: {', '.join(seen)}" if seen else
             "there is no database under outputs/ either: train a run first (python -m midisc.train)")
    raise StoreError(f"no database at {database} ({redact_url(url)}); {there}")


def _connect_args(parsed: URL) -> dict[str, Any]:
    if parsed.get_backend_name() == "sqlite":
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg2", "psycopg"):
        return {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    return {}


def _make_sqlite_folder(parsed: URL) -> None:
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _enforce_sqlite_foreign_keys(engine: Engine) -> None:
    # SQLite ignores foreign keys (and so ON DELETE CASCADE) unless each connection turns them on.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def connect(url: str) -> Engine:
    """An engine for `url` that has been shown to connect; StoreError (one line) otherwise."""
    parsed = parse_url(url)  # postgresql:// and postgres:// are psycopg2's
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        try:
            _make_sqlite_folder(parsed)
        except OSError as error:
            raise StoreError(f"cannot create the folder for {shown}: {error.strerror} ({error.filename})") from None
    try:
        engine = create_engine(
            parsed,
            connect_args=_connect_args(parsed),
            # Refuse NaN/inf outright: the store drops them first, this makes a slip loud, not silent.
            # One encoder for every value: json.dumps with any option builds a new one per call, which
            # costs ~1 s over the 300k JSON values of a large add_feature_examples.
            json_serializer=json.JSONEncoder(allow_nan=False).encode,
        )
    except NoSuchModuleError:
        raise StoreError(f"unknown database dialect {parsed.drivername!r} in {shown}; {URL_HINT}") from None
    except ImportError as error:
        raise StoreError(
            f"the driver for {parsed.drivername!r} is not installed ({error}); "
            "use postgresql+psycopg2:// or sqlite:///"
        ) from None
    except (ArgumentError, TypeError) as error:
        raise StoreError(f"cannot use database URL {shown}: {driver_message(error)}") from None
    if backend == "sqlite":
        _enforce_sqlite_foreign_keys(engine)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        engine.dispose()
        reason = driver_message(error)
        if parsed.password:
            reason = reason.replace(str(parsed.password), "***")
        if backend == "sqlite":
            raise StoreError(f"cannot open database {shown}: {reason}") from None
        # The hint helps only when nothing answered; after a refused login or a missing database it misleads.
        lowered = reason.lower()
        if "database" in lowered and "does not exist" in lowered:
            # The server answered; the database in the URL (POSTGRES_DB's default, midisc) was never created.
            name = parsed.database
            hint = (f" (create it: createdb -h {parsed.host or 'localhost'} -U {parsed.username or 'postgres'} {name}; "
                    "or name one that exists: POSTGRES_DB for storage=postgres and --db postgres, else the URL's "
                    "last part)")
        elif "host name" in lowered or "name or service" in lowered:
            hint = " (is the host name right?)"
        elif any(word in lowered for word in ("refused", "timeout", "timed out", "could not connect")):
            hint = " (is the server running?)"
        else:
            hint = ""
        raise StoreError(f"cannot reach database {shown}: {reason}{hint}") from None
    return engine
