"""The benchmarks in bench/ run in their --quick mode and end with one JSON line that tools can read.

Their figures are not checked here: tiny sizes on a shared machine say nothing about speed. Torch runs one
thread per process: on a machine whose cores are busy, two threads waiting on each other make a tiny forward
30 times slower, which is noise here, not a finding.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def readme_benchmarks() -> dict[str, list[str]]:
    """The README's `python bench/X.py ARGS` commands (its performance section): script name -> ARGS."""
    lines = re.findall(r"^python bench/(\S+)(.*?)(?:\s+#.*)?$", (REPO / "README.md").read_text(), flags=re.M)
    return {script: shlex.split(args) for script, args in lines}

pytestmark = pytest.mark.slow  # a minute in all, and the fault campaign's few: they start training runs


# The benchmarks that run here, and the keys of the JSON line each ends with.
QUICK_KEYS = {
    "sae_step.py": {"rows", "targets_met"},
    "harvest.py": {"rows", "targets_met"},
    "db_write.py": {"rows", "targets_met"},
    "memory.py": {"rows", "targets_met"},
    "pipeline.py": {"default_run", "sweep"},
    "precision.py": {"runs", "fvu_change", "step_speedup", "pass"},
    "faults.py": {"rows", "targets_met", "kills_resumed_exactly", "rows_lost", "tracebacks"},
    "autointerp.py": {"rows", "targets_met", "detection_margin"},
    "serve.py": {"rows", "targets_met", "postgres"},
    "shards.py": {"rows", "targets_met", "write"},
    "scale.py": {"rows", "targets_met", "harvest_ratio", "total_speedup", "ddp_fvu_diff", "ddp_time_ratio"},
}
# The fault campaign's quick mode is a few minutes of real runs; the others take seconds.
TIMEOUT_S = {"faults.py": 1200, "scale.py": 600}


@pytest.mark.parametrize("script, keys", QUICK_KEYS.items())
def test_quick_mode_ends_with_its_figures_as_json(script, keys, tmp_path):
    """Each run with the options the README gives it, so the README's commands are the ones tested."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = readme_benchmarks()[script]
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--quick"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT_S.get(script, 300), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert keys <= figures.keys(), figures
    if "rows" in figures:
        assert figures["rows"] and isinstance(figures["targets_met"], bool)
    if script == "faults.py":  # its figures are correctness, not speed: CI holds them to the target
        assert figures["targets_met"], proc.stdout[-5000:]
    assert not list(tmp_path.iterdir()), "a benchmark left files in its working folder"


def test_the_readme_shows_every_benchmark_that_runs_here():
    assert set(readme_benchmarks()) == set(QUICK_KEYS)


def test_the_sparsify_comparison_says_how_to_install_it_when_it_is_missing(tmp_path):
    """sparsify lives in its own environment (bench/vs_sparsify.py); without it, one line says so."""
    stub = tmp_path / "sparsify.py"
    stub.write_text("raise ImportError('no sparsify here')\n")  # shadows a sparsify installed in this environment
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(BENCH / "vs_sparsify.py"), "--batch", "64", "--d-in", "16"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "sparsify is not installed here; see this script's docstring for a separate environment"], proc.stderr
