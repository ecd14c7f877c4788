"""Fitting an SAEModule on synthetic sparse data in a bare Lightning trainer, for the training and SAE tests."""

import lightning as L
import torch
from torch.utils.data import DataLoader


def fit(module, batches, epochs=1):
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def sparse_data(n=40, batch=128, d=16, seed=0):
    """n batches [batch, d], each row a sum of 3 of 32 random atoms plus a constant offset."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(32, d, generator=g)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 32, (batch, 3), generator=g)
        out.append(atoms[idx].sum(1) + 10)  # an offset the decoder bias must learn
    return out


def randomise(sae, seed=0):
    """The SAE's weights drawn at random (N(0, 0.25)), biases too: no structure an exact test could lean on."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            p = getattr(sae, name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae
