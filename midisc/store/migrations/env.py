"""Alembic's entry point: run the revisions on the connection that midisc.store.schema passes in.

No URL is read here: the caller has already connected, taken the migration lock and begun the
transaction, so Alembic only adds its steps to that transaction.
"""

from alembic import context

from midisc.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "midisc migrations need a connection in config.attributes['connection']; "
        "run them with python -m midisc.db upgrade, not the alembic command"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite's ALTER TABLE cannot change or drop columns; batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
