"""The benchmarks in bench/ run in their --quick mode and end with one JSON line that tools can read.

Their figures are not checked here: tiny sizes on a shared machine say nothing about speed. Torch runs one
thread per process: on a machine whose cores are busy, two threads waiting on each other make a tiny forward
30 times slower, which is noise here, not a finding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytestmark = pytest.mark.slow  # about a minute in all: two of them start training runs


@pytest.mark.parametrize("script, keys", [
    ("sae_step.py", {"rows", "targets_met"}),
    ("harvest.py", {"rows", "targets_met"}),
    ("db_write.py", {"rows", "targets_met"}),
    ("memory.py", {"rows", "targets_met"}),
    ("pipeline.py", {"default_run", "sweep"}),
])
def test_quick_mode_ends_with_its_figures_as_json(script, keys, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert keys <= figures.keys(), figures
    if "rows" in figures:
        assert figures["rows"] and isinstance(figures["targets_met"], bool)
    assert not list(tmp_path.iterdir()), "a benchmark left files in its working folder"
