"""Bring a database's midisc tables up to the models in tables.py, through the Alembic revisions in migrations/.

Every Store checks on opening: a database already at the newest revision costs one query; an empty one
is built; an older one (including one built before midisc had migrations) is upgraded in place, keeping
its rows, with one line on stderr; a newer one is refused. Parallel sweep jobs may all open a fresh
database at once, so the migration runs inside one transaction that only one process at a time can hold.

A new revision: change tables.py, then write the skeleton migrations/versions/0003_what.py with
`alembic.command.revision(alembic_config(), message="what", rev_id="0003")` (ids are the next number,
four digits) and fill in `upgrade` and `downgrade` with `alembic.op`; tests/test_migrations.py fails
until the revisions build what the models describe.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from midisc.store.engine import SQLITE_BUSY_TIMEOUT_S, StoreError, driver_message
from midisc.store.tables import Base

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"
# What current_revision reports for midisc tables made by create_all, before there were migrations.
UNVERSIONED = "unversioned"
# Every midisc process migrating the same PostgreSQL database takes this advisory lock ("midisc" in ASCII).
MIGRATION_LOCK_KEY = int.from_bytes(b"midisc", "big")


@dataclass(frozen=True)
class Migration:
    """The revision a database was found at (None: empty; UNVERSIONED: made before migrations) and is left at."""

    before: str | None
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


@cache
def known_revisions() -> tuple[str, ...]:
    """This midisc's revision ids, oldest first, read from the file names in migrations/versions.

    Read from the names rather than through Alembic, whose import (~90 ms) every process opening a Store
    would otherwise pay just to learn that its database is already current.
    """
    return tuple(sorted(path.name.split("_", 1)[0] for path in (MIGRATIONS / "versions").glob("[0-9]*_*.py")))


def head_revision() -> str:
    """The newest revision this midisc knows."""
    return known_revisions()[-1]


def describe_revision(revision: str | None) -> str:
    """A revision as people read it in messages."""
    if revision is None:
        return "none (no midisc tables)"
    if revision == UNVERSIONED:
        return "pre-migration (midisc tables without an alembic_version table)"
    return revision


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's config for the revisions in midisc/store/migrations, set to run on `connection`."""
    from alembic.config import Config

    config = Config()
    # The value goes through ConfigParser interpolation, where a bare % in the path would be an error.
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at: an id, UNVERSIONED, or None when it has no midisc tables."""
    with engine.connect() as connection:
        return _revision(connection)


def ensure_current(engine: Engine, shown: str) -> Migration | None:
    """Upgrade the database to the newest revision if it is not there yet; None when it already was.

    `shown` is the URL with its password hidden, for messages. An upgrade of a database that held
    midisc tables prints one line on stderr; building an empty one prints nothing.
    """
    if _recorded_revision(engine) == head_revision():
        return None
    migration = upgrade(engine, shown)
    if migration.before is not None and migration.changed:
        print(
            f"upgraded database schema of {shown} from {describe_revision(migration.before)} to {migration.after}",
            file=sys.stderr,
        )
    return migration


def upgrade(engine: Engine, shown: str) -> Migration:
    """Apply the revisions the database lacks, under the migration lock; StoreError (one line) if that fails."""
    with _quiet_alembic():  # from the import on: loading Alembic logs its plugins
        from alembic import command
        from alembic.util import CommandError

    try:
        with _migration_connection(engine) as connection:
            # Read again under the lock: another process may have migrated while this one waited.
            before = _revision(connection)
            refuse_unknown(before, shown, connection)
            if before != head_revision():
                with _quiet_alembic():
                    command.upgrade(alembic_config(connection), "head")
    except (SQLAlchemyError, CommandError) as error:
        raise StoreError(f"cannot migrate the midisc tables in {shown}: {driver_message(error)}") from None
    return Migration(before, head_revision())


def schema_differences(engine: Engine) -> list[str]:
    """How the live midisc tables differ from the models, one short line per difference (empty: they match)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    def ours(name: str | None, kind: str, _parent: Any) -> bool:
        # Other applications' tables may share the database; only midisc's are compared.
        return kind != "table" or name in Base.metadata.tables

    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "include_name": ours})
        return [_describe_difference(diff) for diff in compare_metadata(context, Base.metadata)]


def has_midisc_tables(bind: Engine | Connection) -> bool:
    """Whether any of midisc's tables is in the database (another application may own its alembic_version)."""
    return bool(set(inspect(bind).get_table_names()) & set(Base.metadata.tables))


def refuse_unknown(revision: str | None, shown: str, bind: Engine | Connection) -> None:
    """StoreError (one line) if `revision` is one this midisc does not know: a newer midisc wrote it, or the
    alembic_version table is another application's."""
    if revision not in (None, UNVERSIONED, *known_revisions()):
        if not has_midisc_tables(bind):
            raise StoreError(
                f"database {shown} is not a midisc database: its alembic_version table is at revision {revision} "
                "of another application and it has no midisc tables; use an empty database (or another schema)"
            )
        raise StoreError(
            f"database {shown} is at schema revision {revision}, which this midisc does not know "
            f"(its newest is {head_revision()}): upgrade midisc"
        )


# ----- helpers ----------------------------------------------------------------------------------


def _recorded_revision(engine: Engine) -> str | None:
    # The fast path: one query, no inspection. Any failure (usually: no such table) means "look closer".
    try:
        with engine.connect() as connection:
            rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    except SQLAlchemyError:
        return None
    return rows[0] if len(rows) == 1 else None


def _revision(connection: Connection) -> str | None:
    inspector = inspect(connection)
    if inspector.has_table(VERSION_TABLE):
        rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
        if rows:
            return ", ".join(sorted(rows))
    if has_midisc_tables(connection):
        return UNVERSIONED
    return None


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that no other midisc process can hold on this database meanwhile."""
    backend, database = engine.dialect.name, engine.url.database or ""
    if backend == "postgresql":
        with engine.connect() as connection, connection.begin():
            # Transaction-scoped, so commit or rollback releases it: a failed migration never leaves it held.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            yield connection
    elif backend == "sqlite" and database not in ("", ":memory:") and "mode=memory" not in str(engine.url):
        # pysqlite sends no BEGIN before DDL, so two processes could both create the tables; BEGIN
        # IMMEDIATE takes SQLite's write lock first and the second waits (busy timeout), then finds
        # the work done. A connection of its own also leaves foreign keys off, as Alembic's batch mode
        # needs: dropping a copied table with them on would cascade-delete the child rows.
        lone = create_engine(engine.url, poolclass=NullPool, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(lone, "connect", _leave_begin_to_sqlalchemy)
        event.listen(lone, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
        try:
            with lone.begin() as connection:
                yield connection
        finally:
            lone.dispose()
    else:  # an in-memory SQLite database lives in this one connection pool; nobody else can open it
        with engine.begin() as connection:
            yield connection


def _leave_begin_to_sqlalchemy(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None


@contextmanager
def _quiet_alembic() -> Iterator[None]:
    # Alembic logs every step at INFO (and its plugins as they load, before any step), which under Hydra's
    # logging would add a dozen lines to every run that migrates; the one line `ensure_current` prints says it.
    logger = logging.getLogger("alembic")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _describe_difference(diff: Any) -> str:
    if isinstance(diff, list):  # column changes come grouped: [("modify_type", schema, table, column, …), …]
        kind, _schema, table, column = diff[0][:4]
        return f"{kind} {table}.{column}"
    kind, item = diff[0], diff[-1]
    if kind in ("add_column", "remove_column"):  # (kind, schema, table, Column)
        return f"{kind} {diff[2]}.{item.name}"
    table = getattr(item, "table", None)  # an index or constraint: say which table it is on
    return f"{kind} {getattr(item, 'name', None) or '(unnamed)'}" + (f" on {table.name}" if table is not None else "")
