"""Passwords in URLs are hidden however they are spelled: plain, quoted, Hydra-escaped, URL-encoded."""

import io
import logging

import pytest

from midisc.store.redaction import RedactedStream, redact_log_records, redact_text, scrub_hydra_files

SECRET = "S3cr-t"


@pytest.mark.parametrize("text, expected", [
    ("postgresql://u:S3cr-t@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("storage.url='postgresql+psycopg2://u:S3cr-t@h/db'", "storage.url='postgresql+psycopg2://u:***@h/db'"),
    # Hydra's spelling of a sweep override: every ':' escaped, a backslash doubled where one was
    (r"storage.url=postgresql+psycopg2\://postgres\:S3cr-t@127.0.0.1\:5432/test",
     r"storage.url=postgresql+psycopg2\://postgres\:***@127.0.0.1\:5432/test"),
    (r"postgresql\\://postgres\\:S3cr-t@h/db", r"postgresql\\://postgres\\:***@h/db"),
    (r"postgresql://u:S3\,cr\=t@h/db", "postgresql://u:***@h/db"),
    ("postgresql%3A%2F%2Fu%3AS3cr-t%40h%3A5432%2Fdb", "postgresql%3A%2F%2Fu%3A***%40h%3A5432%2Fdb"),
    ("postgresql://u:S3%40cr-t@h/db", "postgresql://u:***@h/db"),  # an encoded @ inside the password
    ("postgresql://u:S3:cr@t@h/db", "postgresql://u:***@h/db"),  # an unescaped one: up to the last @
    ("a postgresql://u:S3cr-t@h/db b mysql://v:S3cr-t@g/db", "a postgresql://u:***@h/db b mysql://v:***@g/db"),
    ('{"url": "postgresql://u:S3cr-t@h/db"}', '{"url": "postgresql://u:***@h/db"}'),
])
def test_every_spelling_of_a_password_is_hidden(text, expected):
    assert redact_text(text) == expected and SECRET not in redact_text(text)


@pytest.mark.parametrize("text", [
    "postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dx",
    "sqlite:///outputs/midisc.db", "postgresql://u:***@h/db", "see https://example.com/a:b and mail x@y",
])
def test_text_without_a_password_is_left_alone(text):
    assert redact_text(text) == text


def test_hydra_files_of_a_job_and_its_sweep_are_rewritten(tmp_path):
    job = tmp_path / "sweep" / "seed=1"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- storage.url=postgresql\\://u\\:{SECRET}@h/db\n- seed=1\n")
    (job / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "sweep" / "multirun.yaml").write_text(f"url: postgresql%3A%2F%2Fu%3A{SECRET}%40h\n")
    assert scrub_hydra_files(job, tmp_path / "sweep") == 2
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and SECRET in p.read_text()]
    assert (job / ".hydra" / "config.yaml").read_text() == "seed: 1\n"
    assert sorted(p.name for p in (job / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]


def test_log_records_are_redacted_whatever_handler_writes_them(caplog):
    redact_log_records()
    with caplog.at_level(logging.INFO):
        logging.getLogger("hydra").info("\t#0 : seed=1 storage.url=%s", f"postgresql\\://u\\:{SECRET}@h/db")
    assert SECRET not in caplog.text and "u\\:***@h/db" in caplog.text


def test_what_is_printed_through_a_redacted_stream_hides_passwords():
    # Hydra prints a failed job's overrides straight to stderr, past every log record.
    sink = io.StringIO()
    stream = RedactedStream(sink)
    line = f"Error executing job with overrides: ['storage.url=postgresql\\\\://u\\\\:{SECRET}@h/db']\n"
    assert stream.write(line) == len(line)
    stream.write("progress 10%\r")
    assert SECRET not in sink.getvalue() and "u\\\\:***@h/db" in sink.getvalue()
    assert sink.getvalue().endswith("progress 10%\r") and stream.getvalue() == sink.getvalue()
