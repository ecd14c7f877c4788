import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from midisc.analysis import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path: Path) -> None:
    """A figure someone could use: a PNG of a sensible size that is not one flat colour."""
    assert path.exists()
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000
    pixels = imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300
    assert pixels.std() > 0


def test_importing_plots_does_not_import_pyplot():
    code = "import sys, midisc.analysis.plots; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_density_histogram_writes_a_png_into_new_folders(tmp_path):
    rng = np.random.default_rng(0)
    freqs = list(10 ** rng.uniform(-6, 0, 2_000)) + [0.0] * 30 + [None] * 5
    out = plots.density_histogram(freqs, tmp_path / "a" / "b" / "density.png")
    assert out == tmp_path / "a" / "b" / "density.png"
    assert_real_png(out)


@pytest.mark.parametrize("freqs", [[0.0] * 100, [None, 0.0], [0.02], [math.nan, math.inf, 1e-3, -1.0, 0.5]])
def test_density_histogram_edge_cases(tmp_path, freqs):
    assert_real_png(plots.density_histogram(freqs, tmp_path / "d.png"))


def test_training_curves_with_held_out_points(tmp_path):
    steps = [
        {"step": s, "train/loss": 1 / (s + 1), "train/fvu": 0.5 / (s + 1), "train/l0": 64 - s / 10, "sparsity/dead_frac": 0.01}
        for s in range(0, 500, 10)
    ]
    steps[3]["train/fvu"] = math.nan  # a bad row is skipped, not fatal
    epochs = [{"step": 250, "val/fvu": 0.01, "val/l0": 40.0}, {"step": 490, "val/fvu": 0.005}]
    assert_real_png(plots.training_curves(steps, tmp_path / "curves.png", epochs=epochs))


def test_training_curves_with_a_missing_metric_still_writes(tmp_path):
    steps = [{"step": s, "train/loss": 1.0 - s / 100, "train/l0": None} for s in range(50)]
    assert_real_png(plots.training_curves(steps, tmp_path / "curves.png"))


def test_training_curves_with_no_rows_still_writes(tmp_path):
    assert_real_png(plots.training_curves([], tmp_path / "curves.png"))


def test_frequency_vs_max_scatter(tmp_path):
    rng = np.random.default_rng(1)
    freqs = list(10 ** rng.uniform(-6, 0, 5_000)) + [0.0, None, math.nan]
    peaks = list(rng.gamma(2.0, 2.0, 5_000)) + [0.0, 1.0, 2.0]
    peaks[10] = None
    assert_real_png(plots.frequency_vs_max(freqs, peaks, tmp_path / "scatter.png"))


def test_frequency_vs_max_all_dead_still_writes(tmp_path):
    assert_real_png(plots.frequency_vs_max([0.0] * 10, [0.0] * 10, tmp_path / "scatter.png"))


def test_frequency_vs_max_refuses_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match=r"3.*2"):
        plots.frequency_vs_max([0.1, 0.2, 0.3], [1.0, 2.0], tmp_path / "scatter.png")
    assert not (tmp_path / "scatter.png").exists()


def test_frontier_labels_and_pareto(tmp_path):
    points = [(16, 0.30, "k=16"), (32, 0.20, "k=32"), (32, 0.25, "l1=3e-3"), (64, 0.22, "bad"), (128, 0.08, "k=128"),
              (math.nan, 0.1, "nan")]
    assert_real_png(plots.frontier(points, tmp_path / "frontier.png"))


def test_pareto_keeps_only_points_nothing_beats():
    points = [(16, 0.30, "a"), (32, 0.20, "b"), (32, 0.25, "c"), (64, 0.22, "d"), (128, 0.08, "e")]
    assert [p[2] for p in plots._pareto(points)] == ["a", "b", "e"]


def test_frontier_refuses_an_empty_sequence(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plots.frontier([], tmp_path / "frontier.png")
