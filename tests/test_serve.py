"""`python -m midisc.serve`: it binds to this machine unless told otherwise, refuses a taken port in one line,
and serves the run list over a real socket."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from midisc.cli import UsageError
from midisc.serve import check_address


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "example.org", "::"])
def test_another_address_than_loopback_needs_public(host):
    with pytest.raises(UsageError, match=f"--host={host} makes every run's pages .* add --public"):
        check_address(host, free_port(), public=False)


def test_a_taken_port_is_refused_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port} .*Pass another --port"):
            check_address("127.0.0.1", port, public=False)
    with pytest.raises(UsageError, match="--port=70000 must be between 1 and 65535"):
        check_address("127.0.0.1", 70000, public=False)


def test_the_command_refuses_a_public_host_before_starting(tmp_path):
    done = subprocess.run([sys.executable, "-m", "midisc.serve", "--host", "0.0.0.0", "--no-browser"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: --host=0.0.0.0 makes every run's pages"), done.stderr
    assert "Traceback" not in done.stderr


def serve(args: list[str], cwd, port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "midisc.serve", "--port", str(port), "--no-browser", *args],
                              cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(120):  # bounded: 60 s for imports and start-up on a busy machine
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server
        except OSError:
            if server.poll() is not None:
                raise AssertionError(server.communicate()[1])
            time.sleep(0.5)
    server.kill()
    raise AssertionError("the server did not answer within 60 s")


@pytest.mark.slow
def test_the_server_shows_the_run_list_on_localhost_only(trained_run, tmp_path):
    work, run_id = trained_run
    port = free_port()
    server = serve(["--db", f"sqlite:///{work / 'runs.db'}", "--no-model"], tmp_path, port)
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert f'href="/runs/{run_id}"' in page
        script = urllib.request.urlopen(f"http://127.0.0.1:{port}/static/vendor/chart.umd.min.js", timeout=10)
        assert b"Chart.js" in script.read(2000)  # the charting library comes from the package, not a CDN
        with socket.socket() as other:  # bound to the loopback address, not every interface
            outside = socket.gethostbyname(socket.gethostname())
            if not outside.startswith("127."):
                assert other.connect_ex((outside, port)) != 0
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert f"midisc feature browser on http://127.0.0.1:{port}/" in out
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_database_not_made_yet_starts_with_a_note(tmp_path):
    port = free_port()
    server = serve(["--db", f"sqlite:///{tmp_path / 'none.db'}", "--no-model"], tmp_path, port)
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/runs/3", timeout=10).read().decode()
        assert "No database yet" in page and "python -m midisc.train" in page
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "note: no database at" in err and not (tmp_path / "none.db").exists()
