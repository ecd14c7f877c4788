"""The command lines hints print name the database they read: `db_argument` and `storage_argument`."""

import pytest

from midisc.store import db_argument, storage_argument


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    monkeypatch.delenv("MIDISC_DB_URL", raising=False)
    for name in ("USER", "PASSWORD", "HOST", "PORT", "DB"):
        monkeypatch.delenv(f"POSTGRES_{name}", raising=False)


def test_the_default_database_needs_no_option(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert db_argument("sqlite:///outputs/midisc.db") == storage_argument("sqlite:///outputs/midisc.db") == ""
    # the same file spelled absolutely is the same database
    assert db_argument(f"sqlite:///{tmp_path}/outputs/midisc.db") == ""
    monkeypatch.setenv("MIDISC_DB_URL", "sqlite:////data/runs.db")  # the tools default to it too
    assert db_argument("sqlite:////data/runs.db") == ""
    assert db_argument("sqlite:///outputs/midisc.db") == " --db 'sqlite:///outputs/midisc.db'"


def test_postgres_from_the_environment_is_named_postgres(monkeypatch):
    url = "postgresql+psycopg2://postgres@127.0.0.1:5432/midisc"
    assert db_argument(url) == " --db postgres" and storage_argument(url) == " storage=postgres"
    monkeypatch.setenv("POSTGRES_DB", "experiments")
    assert db_argument(url) == f" --db '{url}'" and storage_argument(url) == f" storage.url='{url}'"


def test_a_password_is_never_printed():
    hint = db_argument("postgresql+psycopg2://me:s3cret@db.example:5432/runs")
    assert "s3cret" not in hint and "me:***@db.example" in hint and "your password in place of ***" in hint


def test_no_database():
    assert db_argument(None) == "" and storage_argument(None) == " storage=none"


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_url_without_a_driver_uses_the_installed_psycopg2(postgres_url, scheme):
    from midisc.store import Store
    from midisc.store.engine import database_identity

    plain = scheme + postgres_url.removeprefix("postgresql+psycopg2")
    with Store(plain) as store:  # the tables are made, a run is written and read back
        run_id = store.start_run(model="m", hook="h", layer=0, architecture="topk", config={}, output_dir="o")
        assert store.get_run(run_id)["status"] == "running"
        assert store.url.startswith("postgresql+psycopg2://")
    assert database_identity(plain) == database_identity(postgres_url)
