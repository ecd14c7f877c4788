"""Keep database passwords out of everything a run writes: logs, Hydra's saved config, the console.

A password reaches us inside a URL (`storage.url=postgresql://user:secret@host/db` on the command line,
or one composed from $POSTGRES_PASSWORD). The database, the exports and our own messages only ever see
the redacted URL; what is left are files and log lines written by Hydra itself before our code runs —
the job's `.hydra/*.yaml`, the sweep's `multirun.yaml` and the launcher's "#0 : storage.url=…" line —
which is why this module rewrites those files and every log record.

A URL is not always spelled plainly there: a sweep's overrides are Hydra-escaped
(`postgresql\\://user\\:secret@host\\:5432/db`, every backslash doubled again where one was), quoted, or
URL-encoded (`postgresql%3A%2F%2Fuser%3Asecret%40host`). Each separator below accepts every spelling.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

_COLON = r"(?:\\*:|%3[Aa])"
_SLASHES = r"(?:\\*/\\*/|%2[Ff]%2[Ff])"
_AT = r"(?:@|%40)"
# scheme://user:password@ -> scheme://user:***@ ; the user ends at the first colon, the password runs to the
# last @ before the host (a password may hold an encoded @), and neither crosses white space or a quote.
_URL_PASSWORD = re.compile(
    rf"([A-Za-z][A-Za-z0-9+.\-]*{_COLON}{_SLASHES}(?:(?!%2[Ff]|%40)[^:/@\s'\"\\])*?{_COLON})([^\s'\"]+)({_AT})"
)


def redact_text(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***, however the URL is spelled."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}***{m.group(3)}", text)


def scrub_file(path: Path) -> bool:
    """Rewrite `path` with passwords redacted; True if it held one."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return False
    clean = redact_text(text)
    if clean == text:
        return False
    # A name of its own: the parallel jobs of a sweep all scrub the sweep's multirun.yaml.
    tmp = Path(path).with_name(f"{Path(path).name}.redacting-{os.getpid()}")
    tmp.write_text(clean)
    tmp.replace(path)
    return True


def scrub_hydra_files(output_dir: Path, sweep_dir: Path | None = None) -> int:
    """Redact the config files Hydra saved for this job (and its sweep); returns how many held a password."""
    files = list((Path(output_dir) / ".hydra").glob("*.yaml"))
    if sweep_dir is not None:
        files.append(Path(sweep_dir) / "multirun.yaml")
    return sum(scrub_file(path) for path in files if path.is_file())


class RedactedStream:
    """A text stream that hides URL passwords in whatever is written through it.

    For the console: Hydra writes a failed job's overrides ("Error executing job with overrides: [...]")
    straight to sys.stderr, past every log record.
    """

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_text(text) if "@" in text or "%40" in text else text)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def redact_console() -> None:
    """Hide URL passwords in everything this process prints on stdout and stderr from now on."""
    if not isinstance(sys.stdout, RedactedStream):
        sys.stdout = RedactedStream(sys.stdout)
    if not isinstance(sys.stderr, RedactedStream):
        sys.stderr = RedactedStream(sys.stderr)


def redact_log_records() -> None:
    """Redact URL passwords in every log record from now on, whatever handler writes it.

    A record factory rather than a handler filter: Hydra reconfigures logging when it starts a job,
    which drops filters installed before it, but the factory that builds records stays.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "midisc_redacts", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.args:
            record.msg, record.args = record.getMessage(), None
        if isinstance(record.msg, str) and ("@" in record.msg or "%40" in record.msg):
            record.msg = redact_text(record.msg)
        return record

    factory.midisc_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
