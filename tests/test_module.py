import lightning as L
import torch
from torch.utils.data import DataLoader

from midisc.module import SAEModule
from midisc.sae import TopKSAE


def make_module(d=16, window=10_000, lr=1e-2):
    sae = TopKSAE(d, expansion=4, k=4, seed=0)
    return SAEModule(sae, lambda params: torch.optim.Adam(params, lr=lr), b_dec_init="mean", dead_window=window)


def fit(module, batches, epochs=1):
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def sparse_data(n=40, batch=128, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(32, d, generator=g)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 32, (batch, 3), generator=g)
        out.append(atoms[idx].sum(1) + 10)  # an offset the decoder bias must learn
    return out


def test_decoder_bias_starts_at_the_first_batch_and_training_lowers_fvu():
    data = sparse_data()
    module = make_module()
    first = module.sae(data[0]).mse.item()
    trainer = fit(module, data, epochs=3)
    assert module.b_dec_ready
    assert module.sae(data[0]).mse.item() < 0.3 * first
    assert trainer.callback_metrics["train/fvu_epoch"] < 0.5


def test_b_dec_init_uses_the_first_batch():
    data = sparse_data(n=1)
    module = make_module(lr=1e-12)  # the optimizer barely moves anything
    fit(module, data)
    torch.testing.assert_close(module.sae.b_dec.detach(), data[0].mean(0), atol=1e-4, rtol=0)


def test_decoder_rows_stay_unit_norm_through_training():
    module = make_module()
    fit(module, sparse_data(n=10))
    norms = module.sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_dead_counter_marks_features_that_never_fire():
    module = make_module(window=256)
    with torch.no_grad():
        module.sae.W_enc[:, :8] = 0
        module.sae.b_enc[:8] = -100  # features 0..7 can never fire
    data = sparse_data(n=4)
    fit(module, data)
    since = module.tokens_since_fired
    assert (since[:8] == 4 * 128).all()
    assert module.dead_frac().item() >= 8 / 64
