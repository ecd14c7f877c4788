"""The Alembic history of the midisc schema: `env.py` and the revisions in `versions/`.

There is no alembic.ini: `midisc.store.schema` builds the Alembic config in code and hands `env.py` the
connection to migrate, so a Store and `python -m midisc.db` are the only ways in.
"""
