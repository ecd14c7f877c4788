"""Write a `Publication` as the three artifacts: the SAELens folder, the Neuronpedia package, the dashboards."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from midisc.publish import dashboard, neuronpedia as package, saelens
from midisc.publish.publication import Publication, dashboard_dir, package_dir
from midisc.run_folder import EXPORTS_FOLDER, PACKAGE_SUFFIX, SAE_FOLDER


@dataclass
class Written:
    saelens: Path
    package: Path | None = None
    dashboard: Path | None = None


def write_all(pub: Publication, output_dir: Path, *, neuronpedia: bool = True, weights: bool = True,
              features_per_batch: int = 128) -> Written:
    """Write the artifacts under `output_dir`: always the SAELens folder, with `neuronpedia` also the package
    and the dashboard files. `weights=False` leaves an existing SAE weights file alone."""
    output_dir = Path(output_dir)
    written = Written(saelens=saelens.write(pub, output_dir / SAE_FOLDER, weights=weights))
    if neuronpedia:
        written.package = package.write(pub, package_dir(output_dir, pub))
        if pub.activation_histograms is not None:
            written.dashboard = dashboard.write(pub, dashboard_dir(output_dir, pub), features_per_batch=features_per_batch)
        remove_superseded(output_dir, written)
    return written


def remove_superseded(output_dir: Path, written: Written) -> list[Path]:
    """Remove the packages and dashboard sets in `output_dir` that `written` replaces (an export under an older
    set name, say), so the folder, and `verify --package`, hold one consistent set. Removed after the new set is
    complete: an export cut short leaves the old set, never none. Returns what was removed."""
    removed = []
    if written.package is not None:
        removed += [p for p in output_dir.glob(f"*{PACKAGE_SUFFIX}") if p.is_dir() and p != written.package]
    if written.dashboard is not None:
        removed += [p for p in output_dir.glob(f"{EXPORTS_FOLDER}/*/*") if p.is_dir() and p != written.dashboard]
    for path in removed:
        shutil.rmtree(path)
        if path.parent.parent.name == EXPORTS_FOLDER and not any(path.parent.iterdir()):
            path.parent.rmdir()  # a model folder left empty
    return removed


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks: what sae_models.checksum records of the weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
