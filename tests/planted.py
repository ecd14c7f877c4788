"""A recorded tiny run whose SAE has one planted feature with a known answer.

Feature 0 of a trained ReLU SAE is rewritten to fire exactly on one token of the held-out texts: its
encoder row reads the direction that separates that token's activations from all others, scaled so it
is also the strongest feature. The token is chosen among those occurring 3–15 times in the held-out
contexts, so all its occurrences fit in the 20 stored top examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import compose_config, tiny_overrides
from midisc.publish.write import sha256
from midisc.training.reopen import open_run
from midisc.store import Store
from midisc.train import train
from midisc.run_folder import WEIGHTS_FILENAME


@dataclass
class Planted:
    url: str
    run_id: int
    token: int               # the token id feature 0 fires on
    text: str                # its text
    places: set[tuple[int, int]]  # (context index, position) of every analysed occurrence
    workdir: Path


def build(workdir: Path, model_dir: Path, texts: Path) -> Planted:
    db = workdir / "runs.db"
    cfg = compose_config(tiny_overrides(model_dir, texts, db, sae=("sae=relu", "sae.l1_coef=1e-4")))
    result = train(cfg, workdir / "out")
    url = f"sqlite:///{db}"
    with Store(url) as store:
        run = open_run(store, result.run_id)
        source = run.recipe.open()
        chunks = list(source.chunks(source.heldout_contexts()))
    tokens = torch.cat([c.tokens for c in chunks])
    keep = torch.cat([c.keep for c in chunks])
    acts = torch.cat([c.acts for c in chunks]).float() - run.sae.b_dec.detach()
    kept_tokens = tokens[keep]
    ids, counts = kept_tokens.unique(return_counts=True)
    for token in ids[(counts >= 3) & (counts <= 15)].tolist():
        mine = kept_tokens == token
        direction = acts[mine].mean(0) - acts[~mine].mean(0)
        direction /= direction.norm()
        proj = acts @ direction
        low, high = proj[mine].min(), proj[~mine].max()
        if low > high:  # this token separates from all others along the direction
            break
    else:
        raise AssertionError("no token of the tiny model separates linearly; the planted test needs one")
    scale = 1000.0
    weights = {name: p.detach().clone() for name, p in run.sae.state_dict().items()}
    weights["W_enc"][:, 0] = scale * direction
    weights["b_enc"][0] = -scale * (low + high) / 2
    save_file(weights, str(run.sae_dir / WEIGHTS_FILENAME))
    with Store(url) as store:  # the recorded checksum follows the planted weights
        store.add_sae_model(result.run_id, path=str(run.sae_dir), d_in=run.sae.d_in, d_sae=run.sae.d_sae,
                            architecture=run.sae.architecture, checksum=sha256(run.sae_dir / WEIGHTS_FILENAME))
    places = {(int(c), int(p)) for c, p in zip(*((tokens == token) & keep).nonzero(as_tuple=True))}
    text = source.tokens.tokenizer.decode([token])
    return Planted(url=url, run_id=result.run_id, token=token, text=text, places=places, workdir=workdir)
