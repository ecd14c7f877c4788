"""Write a `Publication` as the three artifacts: the SAELens folder, the Neuronpedia package, the dashboards."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from midisc.publish import dashboard, neuronpedia as package, saelens
from midisc.publish.publication import Publication, dashboard_dir, package_dir
from midisc.run_folder import SAE_FOLDER


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
    return written


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks: what sae_models.checksum records of the weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
