"""`python -m midisc.db` init, upgrade and check, and the default URL built from POSTGRES_* variables.

Most cases call `main` in this process; two run the real command line, which costs seconds of imports each.
"""

from __future__ import annotations

import json

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from conftest import run_cli
from midisc.db import main
from midisc.store import Store, StoreError, default_db_url, redact_url
from midisc.store.engine import postgres_url_from_env, resolve_db_url
from midisc.store.engine import parse_url
from midisc.store.schema import alembic_config

POSTGRES_VARIABLES = ("MIDISC_DB_URL", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_HOST", "POSTGRES_PORT",
                      "POSTGRES_DB")


def at_0001(url: str) -> str:
    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0001")
    engine.dispose()
    return url


def test_init_then_check_on_postgres(postgres_url, tmp_path, capsys) -> None:
    made = run_cli(["midisc.db", "init", "--db", postgres_url], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert made.stdout == f"created the midisc tables in {redact_url(postgres_url)} at revision 0006\n"
    assert main(["check", "--db", postgres_url]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "revision: 0006" in captured.out and "tables:   match the models" in captured.out


def test_newer_database_is_an_error_in_one_line(sqlite_url, tmp_path) -> None:
    Store(sqlite_url).close()
    engine = create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    result = run_cli(["midisc.db", "upgrade", "--db", sqlite_url], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: database sqlite:///") and result.stderr.endswith("upgrade midisc\n")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_from_0001_then_already_at_head(backend, request, capsys) -> None:
    url = at_0001(request.getfixturevalue(f"{backend}_url"))
    shown = redact_url(url)
    assert main(["upgrade", "--db", url]) == 0
    assert capsys.readouterr().out == f"upgraded {shown} from 0001 to 0006\n"
    assert main(["upgrade", "--db", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"database": shown, "before": "0006", "after": "0006"}
    assert main(["upgrade", "--db", url]) == 0
    assert capsys.readouterr().out == f"{shown} is already at head 0006\n"


def test_init_on_a_database_that_has_the_tables(sqlite_url, capsys) -> None:
    assert main(["init", "--db", sqlite_url]) == 0
    assert main(["init", "--db", sqlite_url]) == 0
    assert capsys.readouterr().out.splitlines()[1] == f"{sqlite_url} is already at revision 0006"


def test_init_on_an_older_database_points_to_upgrade(sqlite_url, capsys) -> None:
    assert main(["init", "--db", at_0001(sqlite_url)]) == 0
    assert capsys.readouterr().out == (f"{sqlite_url} is already at revision 0001 (head is 0006: "
                                       f"run python -m midisc.db upgrade --db {sqlite_url})\n")


def test_check_an_empty_database(sqlite_url, capsys) -> None:
    assert main(["check", "--db", sqlite_url]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"{sqlite_url} has no midisc tables: run python -m midisc.db init --db {sqlite_url}\n"
    assert "revision: none (no midisc tables)" in captured.out


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_check_an_older_database(backend, request, capsys) -> None:
    url = at_0001(request.getfixturevalue(f"{backend}_url"))
    assert main(["check", "--db", url]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"database at 0001, head is 0006: run python -m midisc.db upgrade --db {redact_url(url)}\n"
    assert "head:     0006" in captured.out


def test_check_finds_tables_that_drifted_from_the_models(sqlite_url, capsys) -> None:
    Store(sqlite_url).close()
    engine = create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE training_runs ADD COLUMN note TEXT"))
        connection.execute(text("DROP INDEX training_runs_sweep_id"))
    engine.dispose()
    assert main(["check", "--db", sqlite_url, "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert (report["revision"], report["current"], report["matches"]) == ("0006", True, False)
    assert sorted(report["differences"]) == ["add_index training_runs_sweep_id on training_runs",
                                             "remove_column training_runs.note"]
    assert captured.err.startswith("database at head 0006, but its tables differ from the models in 2 place(s): ")


def test_check_without_db_uses_the_default_and_suggests_no_url(sqlite_url, monkeypatch, capsys) -> None:
    for name in POSTGRES_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MIDISC_DB_URL", at_0001(sqlite_url))
    assert main(["check"]) == 1
    assert capsys.readouterr().err == "database at 0001, head is 0006: run python -m midisc.db upgrade\n"


def test_postgres_url_from_variables_escapes_and_hides_the_password(monkeypatch) -> None:
    for name in POSTGRES_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MIDISC_DB_URL", raising=False)
    assert default_db_url() == "sqlite:///outputs/midisc.db"  # POSTGRES_* alone never moves the default
    monkeypatch.setenv("POSTGRES_DB", "runs")
    assert default_db_url() == "sqlite:///outputs/midisc.db"
    assert resolve_db_url("postgres") == postgres_url_from_env() == "postgresql+psycopg2://postgres@127.0.0.1:5432/runs"

    password = "p@ss:w/rd%?#"
    monkeypatch.setenv("POSTGRES_HOST", "db.example")
    monkeypatch.setenv("POSTGRES_PORT", "6543")
    monkeypatch.setenv("POSTGRES_USER", "trainer")
    monkeypatch.setenv("POSTGRES_PASSWORD", password)
    url = parse_url(postgres_url_from_env())
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "trainer", password, "db.example", 6543, "runs")
    assert redact_url(postgres_url_from_env()) == "postgresql+psycopg2://trainer:***@db.example:6543/runs"

    monkeypatch.setenv("MIDISC_DB_URL", "sqlite:///elsewhere.db")
    assert default_db_url() == resolve_db_url(None) == "sqlite:///elsewhere.db"
    assert resolve_db_url("sqlite:///given.db") == "sqlite:///given.db"


def test_bad_postgres_port_names_the_value(monkeypatch) -> None:
    for name in POSTGRES_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POSTGRES_HOST", "db.example")
    monkeypatch.setenv("POSTGRES_PORT", "54a")
    with pytest.raises(StoreError, match=r"^POSTGRES_PORT '54a' is not a port number \(1-65535\)$"):
        postgres_url_from_env()


def test_an_unescaped_at_in_a_password_is_refused_without_showing_any_of_it() -> None:
    with pytest.raises(StoreError, match=r"'postgresql\+psycopg2://u:\*\*\*@db:5432/x': an @ in the password must"):
        parse_url("postgresql+psycopg2://u:s3cr@t@db:5432/x")
