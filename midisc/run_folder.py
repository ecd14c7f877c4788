"""Every file and folder a run leaves in its run folder (outputs/<date>/<time>/ or multirun/…), named once.

    .hydra/                      Hydra's composed config and overrides (passwords redacted)
    train.log                    the run's log (a resume appends to it)
    sae/                         SAE_FOLDER: the SAELens v6 folder, CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME
    run-<id>_neuronpedia/        run-<id> + PACKAGE_SUFFIX, the Neuronpedia package: METADATA, DECODER, ANALYSIS and
                                 MODEL_FILENAME
    exports/<model>/<source>/    EXPORTS_FOLDER: the dashboard files Neuronpedia's importer reads
    probe.safetensors            PROBE_FILENAME: vectors and outputs `verify` reproduces
    curves.csv                   CURVES_FILENAME: per-step training metrics
    evaluation_core.json         EVALUATION_FILENAME: SAEBench's core evaluation
    verification.json            REPORT_FILENAME: what `verify` found
    checkpoints/                 CHECKPOINT_DIR: LAST and PREVIOUS while training, removed on success
    .running.lock                LOCK_FILENAME: held while a process trains in the folder
    pending_db_writes.jsonl      PENDING_FILENAME: writes waiting for an unreachable database

The SAELens names belong to `midisc.sae` and the journal's to `midisc.store`, which import nothing of
midisc; they are named there and listed here.
"""

from midisc.sae.io import CFG_FILENAME, WEIGHTS_FILENAME
from midisc.store.journal import PENDING_FILENAME

SAE_FOLDER = "sae"
SPARSITY_FILENAME = "sparsity.safetensors"
PACKAGE_SUFFIX = "_neuronpedia"
EXPORTS_FOLDER = "exports"
METADATA_FILENAME = "neuronpedia_metadata.json"
DECODER_FILENAME = "decoder_weights.npy"
ANALYSIS_FILENAME = "feature_analysis.json"
MODEL_FILENAME = "sae_model.pt"
PROBE_FILENAME = "probe.safetensors"
CURVES_FILENAME = "curves.csv"
EVALUATION_FILENAME = "evaluation_core.json"  # the same file `python -m midisc.evaluate` writes
REPORT_FILENAME = "verification.json"
CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"
DAMAGED_SUFFIX = ".damaged"
LOCK_FILENAME = ".running.lock"

__all__ = ["ANALYSIS_FILENAME", "CFG_FILENAME", "CHECKPOINT_DIR", "CURVES_FILENAME", "DAMAGED_SUFFIX",
           "DECODER_FILENAME", "EVALUATION_FILENAME", "EXPORTS_FOLDER", "LAST", "LOCK_FILENAME", "METADATA_FILENAME",
           "MODEL_FILENAME", "PACKAGE_SUFFIX", "PENDING_FILENAME", "PREVIOUS", "PROBE_FILENAME", "REPORT_FILENAME", "SAE_FOLDER",
           "SPARSITY_FILENAME", "WEIGHTS_FILENAME"]
