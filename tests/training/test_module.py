import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fitting import fit, sparse_data
from midisc.training.module import SAEModule
from midisc.sae import TopKSAE


def make_module(d=16, window=10_000, lr=1e-2):
    sae = TopKSAE(d, expansion=4, k=4, seed=0)
    return SAEModule(sae, lambda params: torch.optim.Adam(params, lr=lr), b_dec_init="mean", dead_window=window)


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


# --- what changes over a run: learning rate, sparsity warm-up, input scale ----------------------
from midisc.training.module import lr_factor  # noqa: E402
from midisc.sae import ReluSAE  # noqa: E402


def test_lr_factor_warms_up_then_decays_linearly():
    assert [lr_factor(s, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, 100, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    decay = [lr_factor(s, 100, decay_frac=0.2) for s in (79, 80, 90, 99)]
    assert decay == pytest.approx([1.0, 1.0, 0.5, 0.05])
    assert lr_factor(0, 10, warmup_steps=20, decay_frac=1.0) == pytest.approx(0.05)  # both at once multiply
    assert all(lr_factor(s, 7, 3, 1.0) > 0 for s in range(7))  # no step trains at lr 0


class LrLog(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_trainer_follows_the_schedule_step_by_step():
    sae = TopKSAE(16, expansion=4, k=4, seed=0)
    module = SAEModule(sae, lambda params: torch.optim.Adam(params, lr=0.1), b_dec_init="mean",
                       lr_warmup_steps=2, lr_decay_frac=0.5)
    log = LrLog()
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", callbacks=[log]).fit(
        module, DataLoader(sparse_data(n=4), batch_size=None))
    expected = [0.1 * lr_factor(s, 8, 2, 0.5) for s in range(8)]
    assert log.lrs == pytest.approx(expected)


def test_sparsity_warmup_scales_the_l1_term_of_the_first_steps():
    sae = ReluSAE(16, expansion=4, l1_coef=0.5, seed=0)
    x = sparse_data(n=1)[0]
    full, none, half = sae(x), sae(x, sparsity_scale=0.0), sae(x, sparsity_scale=0.5)
    torch.testing.assert_close(none.loss, full.mse)
    torch.testing.assert_close(half.loss, full.mse + 0.25 * full.l1)
    module = SAEModule(sae, lambda params: torch.optim.Adam(params, lr=1e-12), b_dec_init="mean",
                       sparsity_warmup_steps=10)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader([x], batch_size=None))
    m = trainer.callback_metrics
    torch.testing.assert_close(m["train/loss_step"], m["train/mse_step"] + 0.1 * 0.5 * m["train/l1_step"])


def test_input_scale_is_set_from_the_first_batch_and_folded_at_the_end():
    data = [b * 1000.0 for b in sparse_data(n=20)]  # far from mean squared norm d_in
    sae = TopKSAE(16, expansion=4, k=4, seed=0)
    module = SAEModule(sae, lambda params: torch.optim.Adam(params, lr=1e-2), b_dec_init="mean",
                       normalize_input=True)
    scales = []

    class Peek(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            scales.append(float(pl_module.input_scale))

    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[Peek()])
    trainer.fit(module, DataLoader(data, batch_size=None), val_dataloaders=DataLoader(data[:2], batch_size=None))
    expected = (16 / data[0].pow(2).sum(1).mean()).sqrt().item()
    assert scales[0] == pytest.approx(expected) and len(set(scales)) == 1
    module.fold_input_scale()  # as train.py does once fit returns
    assert float(module.input_scale) == 1.0
    with torch.no_grad():  # the folded SAE takes raw activations and answers in raw units
        out = module.sae(torch.cat(data[:2]))
    raw = torch.cat(data[:2])
    assert (out.x_hat - raw).pow(2).sum() / (raw - raw.mean(0)).pow(2).sum() < 0.5
    torch.testing.assert_close(trainer.callback_metrics["val/mse"], (out.x_hat - raw).pow(2).mean(), rtol=1e-4, atol=0)


def test_folding_the_input_scale_changes_no_output():
    sae = TopKSAE(16, expansion=4, k=4, seed=0)
    module = SAEModule(sae, lambda params: torch.optim.Adam(params), normalize_input=True)
    module.input_scale.fill_(0.01)
    x = sparse_data(n=1)[0] * 100
    with torch.no_grad():
        before = module.sae(x * 0.01)
        module.fold_input_scale()
        after = module.sae(x)
        module.fold_input_scale()  # a second call changes nothing
        again = module.sae(x)
    torch.testing.assert_close(after.x_hat, before.x_hat / 0.01, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(after.codes, before.codes / 0.01, rtol=1e-4, atol=1e-3)
    assert torch.equal(again.x_hat, after.x_hat)


def test_resample_every_revives_dead_relu_features():
    sae = ReluSAE(16, expansion=4, l1_coef=1e-3, seed=0)
    with torch.no_grad():
        sae.b_enc[:8] = -1e4  # features 0..7 can never fire on their own
    module = SAEModule(sae, lambda params: torch.optim.Adam(params, lr=1e-3), b_dec_init="mean", dead_window=256,
                       resample_every=3)
    fit(module, sparse_data(n=4))  # steps 0..3: dead after step 1 (256 tokens), resampled at step 3
    assert (sae.b_enc[:8] > -1).all()  # b_enc restarted at 0, then trained
    assert (module.tokens_since_fired[:8] <= 128).all()  # and they fired at once, or their window restarted


# --- no host syncs in the hot loop ---------------------------------------------------------------
from midisc.training.callbacks import ProgressBar  # noqa: E402
from midisc.training.module import NonFiniteLossError, StopOnNonFiniteLoss, dead_bound  # noqa: E402
from midisc.sae.gated import GatedSAE  # noqa: E402
from midisc.sae.jumprelu import BatchTopKSAE, JumpReLUSAE  # noqa: E402

LOG_EVERY = 4
# What makes the host wait for a GPU: reading a value back, indexing by a mask (its size is data) and nonzero.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero")


class HostReads(L.Callback):
    """Counts, per training step, the calls that would read a device tensor back to the host."""

    def __init__(self, monkeypatch):
        self.active, self.per_step, self.step = False, {}, 0
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), name))
        getitem = torch.Tensor.__getitem__

        def masked_getitem(tensor, index):
            if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
                self._count("boolean mask index")
            return getitem(tensor, index)
        monkeypatch.setattr(torch.Tensor, "__getitem__", masked_getitem)

    def _count(self, what):
        if self.active:
            self.per_step.setdefault(self.step, []).append(what)

    def _counted(self, method, name):
        def wrapper(tensor, *args, **kwargs):
            # Adam's step counter is a CPU tensor on every device (unless capturable): reading it costs no sync.
            if not (name == "item" and "optimizer.py" in __import__("traceback").extract_stack(limit=2)[0].filename):
                self._count(name)
            return method(tensor, *args, **kwargs)
        return wrapper

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step, self.active = trainer.global_step, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.active = False


@pytest.mark.parametrize("sae", [TopKSAE(16, 4, k=4, seed=0), BatchTopKSAE(16, 4, k=4, seed=0),
                                 ReluSAE(16, 4, l1_coef=1e-3, seed=0), JumpReLUSAE(16, 4, seed=0),
                                 GatedSAE(16, 4, seed=0)], ids=lambda sae: type(sae).__name__)
def test_between_logging_steps_a_training_step_reads_nothing_back_from_the_device(sae, monkeypatch):
    if hasattr(sae, "aux_k"):
        with torch.no_grad():
            sae.W_enc[:, :8] = 0
            sae.b_enc[:8] = -100  # dead from the start, so AuxK has work once the window has passed
    module = SAEModule(sae, lambda params: torch.optim.Adam(params, lr=1e-3), dead_window=256, normalize_input=True,
                       lr_warmup_steps=2, lr_decay_frac=0.3, sparsity_warmup_steps=5)
    reads = HostReads(monkeypatch)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu", log_every_n_steps=LOG_EVERY, callbacks=[ProgressBar(), reads])
    trainer.fit(module, DataLoader(sparse_data(n=17), batch_size=None))
    logging_steps = {step for step in range(17) if (step + 1) % LOG_EVERY == 0}
    assert reads.per_step.get(0), "the probe saw nothing: it no longer hooks what it should"  # the first step sets up
    assert {step: what for step, what in reads.per_step.items() if step and step not in logging_steps} == {}
    if hasattr(sae, "aux_k"):
        assert "train/aux_loss_epoch" in trainer.callback_metrics  # AuxK ran, on the sync-free path


def test_dead_bound_leaves_room_and_changes_seldom():
    assert dead_bound(0, 4608) == 0
    assert dead_bound(1, 4608) == dead_bound(40, 4608) == 64
    assert dead_bound(100, 4608) == 128 and dead_bound(4000, 4608) == 4608


class Poisoned(SAEModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch * float("nan") if batch_idx == self.bad_step else batch, batch_idx)


class EpochEnds(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(trainer.current_epoch)


@pytest.mark.parametrize("bad_step", [1, 9])  # before a logging step; after the epoch's last one
def test_a_nan_loss_is_reported_with_its_step_before_any_later_callback_sees_the_epoch(bad_step):
    module = Poisoned(TopKSAE(16, 4, k=4, seed=0), lambda params: torch.optim.Adam(params, lr=1e-3))
    module.bad_step = bad_step
    later = EpochEnds()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, accelerator="cpu", log_every_n_steps=LOG_EVERY,
                        callbacks=[StopOnNonFiniteLoss(), later])
    with pytest.raises(NonFiniteLossError, match=rf"^the training loss became nan at step {bad_step} \(epoch 0\); "):
        trainer.fit(module, DataLoader(sparse_data(n=10), batch_size=None))
    assert later.seen == []
    # Stopped at the first read after it: in the next logging step's training_step, or at the epoch's end.
    assert trainer.global_step == (LOG_EVERY - 1 if bad_step < LOG_EVERY else 10)


def test_auxk_window_hands_features_to_auxk_before_they_count_as_dead():
    """With auxk_window shorter than dead_window, AuxK trains features that have not fired for that long, while
    the dead count still waits for the whole dead_window."""
    seen = []

    class Spy(TopKSAE):
        def forward(self, x, *, sparsity_scale=1.0, dead=None):
            seen.append(int(dead.mask.sum()))
            return super().forward(x, sparsity_scale=sparsity_scale, dead=dead)

    sae = Spy(16, expansion=4, k=4, seed=0)
    module = SAEModule(sae, lambda p: torch.optim.Adam(p, lr=1e-12), b_dec_init="mean", dead_window=10_000,
                       auxk_window=256)
    with torch.no_grad():
        sae.W_enc[:, :8] = 0
        sae.b_enc[:8] = -100  # features 0..7 never fire
    fit(module, sparse_data(n=4))
    assert seen[0] == 0 and all(n >= 8 for n in seen[2:])  # after 256 tokens, AuxK sees them
    assert module.dead_frac().item() == 0.0  # 512 tokens are far from the 10,000 of dead_window
