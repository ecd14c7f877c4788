"""Concept testing: which features fire selectively on texts of one concept?

A concept module is a text file of examples, one per line (`#` starts a comment); `concept_modules/`
ships ten. Each text goes through the run's model and SAE on its own, prefixed with the separator the
run trained with, so its first word sits where a document start sits in training (position 0 is never
analysed). A feature's response to a text is its max activation over the text's tokens.

The score is the AUROC of that response, concept texts against contrast texts (the other modules and a
corpus sample): the chance that a random concept text makes the feature fire harder than a random
contrast text, ties counted half. 0.5 is chance, 1.0 a perfect detector. Mean response and firing rate
on each side come with it.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from midisc.data.activations import drop_outliers, keep_mask
from midisc.data.lm import capture
from midisc.sae import SparseAutoencoder

CONCEPT_DIR = Path(__file__).resolve().parents[2] / "concept_modules"


class ConceptError(ValueError):
    """A concept module or text file that cannot be used; the message is one line."""


def concept_dir() -> Path:
    return Path(os.environ.get("MIDISC_CONCEPTS", CONCEPT_DIR))


def available(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.txt"))


def read_texts(path: Path) -> list[str]:
    """The examples of a concept file: one per non-empty line, `#` comment lines skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConceptError(f"cannot read concept texts from {path}: {err}") from None
    texts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not texts:
        raise ConceptError(f"{path} holds no texts (one example per line; lines starting with # are comments)")
    return list(dict.fromkeys(texts))


def load_modules(folder: Path, names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """The named modules (all of them without names), each as its list of texts."""
    found = available(folder)
    if not found:
        raise ConceptError(f"no concept modules (*.txt) in {folder}")
    unknown = [n for n in (names or []) if n not in found]
    if unknown:
        raise ConceptError(f"unknown concept {', '.join(map(repr, unknown))}; modules in {folder}: {', '.join(found)}")
    return {name: read_texts(folder / f"{name}.txt") for name in (names or found)}


def corpus_sample(documents: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """`n` sentences of 30–300 characters drawn from the documents: neutral contrast texts."""
    sentences = [s.strip() for doc in documents for s in re.split(r"(?<=[.!?])\s+", doc)]
    sentences = sorted({s for s in sentences if 30 <= len(s) <= 300})
    return random.Random(seed).sample(sentences, min(n, len(sentences)))


@torch.no_grad()
def text_maxima(sae: SparseAutoencoder, model, module, tokenizer, texts: Sequence[str], *, prefix: int,
                special: Sequence[int], context_size: int, outlier_factor: float | None,
                batch_size: int = 16, transcode: bool = False) -> torch.Tensor:
    """[len(texts), d_sae]: each feature's max activation over each text's tokens (0 where it never fires).
    `transcode`: the SAE is a transcoder, reading the module's input (see `lm.capture_many`)."""
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    maxima = torch.zeros(len(texts), sae.d_sae)
    pad = special[0]
    for start in range(0, len(ids), batch_size):
        rows = [[prefix, *row][:context_size] for row in ids[start:start + batch_size]]
        width = max(map(len, rows))
        tokens = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        acts = capture(model, module, tokens, attention, transcode=transcode)
        keep = keep_mask(tokens, special) & attention.bool()
        keep = drop_outliers(acts, keep.to(acts.device), outlier_factor).cpu()
        codes = sae.encode(acts[keep.to(acts.device)].to(sae.W_dec.device, torch.float32)).cpu()
        text = keep.nonzero(as_tuple=True)[0]
        block = torch.zeros(len(rows), sae.d_sae)
        index = text[:, None].expand_as(codes)
        maxima[start:start + len(rows)] = block.scatter_reduce_(0, index, codes, "amax", include_self=True)
    return maxima


@dataclass
class Selectivity:
    auroc: torch.Tensor         # [d_sae]
    mean_concept: torch.Tensor  # [d_sae] mean over concept texts of the per-text max
    mean_contrast: torch.Tensor
    fire_concept: torch.Tensor  # [d_sae] fraction of concept texts on which the feature fires at all
    fire_contrast: torch.Tensor
    n_concept: int
    n_contrast: int


def selectivity(concept: torch.Tensor, contrast: torch.Tensor) -> Selectivity:
    """Scores of every feature from per-text maxima, concept [n_c, d_sae] against contrast [n_o, d_sae]."""
    if not len(concept) or not len(contrast):
        raise ConceptError(f"a concept test needs texts on both sides; got {len(concept)} concept and "
                           f"{len(contrast)} contrast texts")
    # Mann-Whitney: each concept text wins over the contrast texts below it and half the ones equal to it, counted
    # by binary search in each feature's sorted contrast column: O(n log n) per feature, not n_concept × n_contrast
    # comparisons (which took 25 of the 69 s of `concepts --all` on the default run).
    ordered = contrast.T.contiguous().sort(dim=1).values  # [d_sae, n_o]
    values = concept.T.contiguous()                       # [d_sae, n_c]
    below = torch.searchsorted(ordered, values, right=False)
    upto = torch.searchsorted(ordered, values, right=True)
    wins = below.sum(1, dtype=torch.float64) + 0.5 * (upto - below).sum(1, dtype=torch.float64)
    return Selectivity(auroc=(wins / (len(concept) * len(contrast))).float(),
                       mean_concept=concept.mean(0), mean_contrast=contrast.mean(0),
                       fire_concept=(concept > 0).float().mean(0), fire_contrast=(contrast > 0).float().mean(0),
                       n_concept=len(concept), n_contrast=len(contrast))


def ranked(scores: Selectivity, top: int) -> list[dict]:
    """The `top` most selective features as rows (rank 0 first); ties broken by the firing-rate gap."""
    gap = scores.fire_concept - scores.fire_contrast
    order = sorted(range(len(scores.auroc)), key=lambda f: (-float(scores.auroc[f]), -float(gap[f]), f))[:top]
    return [{"feature_index": f, "rank": rank, "score": float(scores.auroc[f]),
             "mean_concept": float(scores.mean_concept[f]), "mean_contrast": float(scores.mean_contrast[f]),
             "fire_rate_concept": float(scores.fire_concept[f]), "fire_rate_contrast": float(scores.fire_contrast[f]),
             "n_concept": scores.n_concept, "n_contrast": scores.n_contrast} for rank, f in enumerate(order)]
