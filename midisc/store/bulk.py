"""Write many rows into one table fast: COPY on PostgreSQL, the driver's own executemany on SQLite.

Why: the end of every run writes one row per feature and ~20 examples per feature (20,480 features: 430k
rows). Through SQLAlchemy's executemany each row pays for bind processing in Python and, on PostgreSQL,
batches of 1,000 parameter sets: 29k feature rows/s and 15k example rows/s were measured (bench/db_write.py).
PostgreSQL's COPY takes the rows as one text stream, and SQLite's `executemany` takes plain tuples; both
stay inside the caller's session and transaction, so a failure still rolls everything back.

Values must already be plain and checked (the Store does that): None, bool, int, float, str, or lists and
dicts for JSON columns. Rows that leave a column to a Python-side default, tables with other column types,
and other drivers go through SQLAlchemy's executemany.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, Boolean, Float, Integer, String, Table, delete, insert
from sqlalchemy.orm import Session

_PLAIN_TYPES = (Boolean, Float, Integer, String, JSON)
# The encoder SQLAlchemy's engine uses (engine.connect): same text, and NaN refused.
_encode_json = json.JSONEncoder(allow_nan=False).encode
# COPY's text format: a backslash starts an escape, tab ends a field, newline ends a row.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def insert_rows(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT `rows` (dicts with the same keys, all columns of `table` but generated ones) in the session's
    transaction."""
    if not rows:
        return
    columns = [table.c[name] for name in rows[0]]
    # Python-side defaults (a created_at) are filled in by SQLAlchemy only; the fast paths would leave NULL.
    defaulted = any(column.default is not None for column in table.columns if column.name not in rows[0])
    connection = session.connection()
    dialect = connection.dialect
    if defaulted or not all(isinstance(column.type, _PLAIN_TYPES) for column in columns):
        session.execute(insert(table), rows)
    elif dialect.name == "postgresql" and dialect.driver == "psycopg2":
        _copy(connection, table, columns, rows)
    elif dialect.name == "sqlite":
        _executemany(connection, table, columns, rows)
    else:
        session.execute(insert(table), rows)


def _names(columns: Sequence) -> tuple[list[str], list[bool]]:
    """The column names, and which of them hold JSON."""
    return [column.name for column in columns], [isinstance(column.type, JSON) for column in columns]


def _copy(connection, table: Table, columns: Sequence, rows: Sequence[dict[str, Any]]) -> None:
    names, is_json = _names(columns)
    quote = connection.dialect.identifier_preparer
    lines = []
    for row in rows:
        fields = []
        for name, json_column in zip(names, is_json):
            value = row[name]
            if value is None:
                fields.append("\\N")
            elif json_column:
                fields.append(_encode_json(value).translate(_COPY_ESCAPES))
            elif value is True or value is False:
                fields.append("t" if value else "f")
            elif isinstance(value, str):
                fields.append(value.translate(_COPY_ESCAPES))
            else:
                fields.append(repr(value))  # int, or a finite float: repr round-trips exactly
        lines.append("\t".join(fields))
    statement = (f"COPY {quote.format_table(table)} ({', '.join(quote.quote(name) for name in names)}) "
                 "FROM STDIN")
    with connection.connection.dbapi_connection.cursor() as cursor:
        cursor.copy_expert(statement, io.StringIO("\n".join(lines) + "\n"))


def _executemany(connection, table: Table, columns: Sequence, rows: Sequence[dict[str, Any]]) -> None:
    names, is_json = _names(columns)
    quote = connection.dialect.identifier_preparer
    statement = (f"INSERT INTO {quote.format_table(table)} ({', '.join(quote.quote(name) for name in names)}) "
                 f"VALUES ({', '.join('?' * len(names))})")
    values = [tuple(_encode_json(row[name]) if json_column and row[name] is not None else row[name]
                    for name, json_column in zip(names, is_json)) for row in rows]
    cursor = connection.connection.dbapi_connection.cursor()
    try:
        cursor.executemany(statement, values)
    finally:
        cursor.close()


def replace_run_rows(session: Session, table: Table, run_id: int, rows: Sequence[dict[str, Any]]) -> None:
    """Delete every row of `run_id` in `table`, then insert `rows`, in the session's transaction: what each
    per-feature write (statistics, examples, profiles) does, so a rewrite never leaves an old row behind."""
    session.execute(delete(table).where(table.c.run_id == run_id))
    insert_rows(session, table, rows)
