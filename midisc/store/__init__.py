"""The SQL record of training runs: runs, per-epoch metrics, discovered features, saved SAEs, and what was
found in them: example contexts per feature and features scored against concepts.

Plain Python values go in and come out; the same code runs on SQLite and PostgreSQL.
"""

from midisc.store.engine import StoreError, db_argument, default_db_url, redact_url, storage_argument
from midisc.store.pages import Page, PageError
from midisc.store.records import Store, UnknownRunError

__all__ = ["Page", "PageError", "Store", "StoreError", "UnknownRunError", "db_argument", "default_db_url", "redact_url",
           "storage_argument"]
