"""`SAEModule`: the LightningModule that trains one SAE on batches of activation vectors.

It knows nothing of language models or databases: batches come in, metrics leave through `self.log`
(callbacks pick them up). The decoder bias starts at the (geometric) median of the first batch — starting
it at zero instead of the data mean costs ~0.14 FVU and many dead features on SmolLM2.

What changes over a run lives here too: the learning rate's warm-up and linear decay, the warm-up of an
L1/L0 coefficient, resampling of dead features, and the optional input scaling (x · s with s chosen on the
first batch so that E‖x s‖² = d_in, as SAELens's `expected_average_only_in`), which makes a learning rate
or an L1 coefficient mean the same on any model and layer (a transcoder's input and output get a scale each). `fold_input_scale` (called once `fit` returns) folds s into the weights
before anything outside training sees the SAE, so every saved or analysed SAE takes raw activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import lightning as L
import torch

from midisc.analysis import metrics
from midisc.training.resampling import resample_dead
from midisc.sae import SparseAutoencoder
from midisc.sae.sparse_ops import DeadFeatures


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or inf; the message is one line saying when and what to try."""


def dead_bound(n_dead: int, width: int) -> int:
    """How many columns AuxK looks at until the dead count is read again: the count read now, plus room for a
    quarter more, rounded up to a multiple of 64 so the shape changes seldom; 0 while none is dead."""
    return 0 if n_dead <= 0 else min(width, -(-(n_dead + n_dead // 4 + 1) // 64) * 64)


def lr_factor(step: int, total: int, warmup_steps: int = 0, decay_frac: float = 0.0) -> float:
    """The learning rate's multiplier at `step` of `total`: a linear rise from 0 over warmup_steps, flat, then a
    linear fall towards 0 over the last decay_frac of the steps (SAELens's lr_warm_up_steps / lr_decay_steps).
    Every step, the last included, keeps a multiplier > 0."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay_steps = decay_frac * total
    if decay_steps > 0 and step >= total - decay_steps:
        factor *= max(total - step, 0) / decay_steps
    return factor


class SAEModule(L.LightningModule):
    def __init__(self, sae: SparseAutoencoder, optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
                 *, b_dec_init: str = "geometric_median", dead_window: int = 262_144,
                 unit_norm_decoder: bool = True, lr_warmup_steps: int = 0, lr_decay_frac: float = 0.0,
                 sparsity_warmup_steps: int = 0, normalize_input: bool = False, resample_every: int = 0,
                 auxk_window: int | None = None) -> None:
        super().__init__()
        self.sae = sae
        self.make_optimizer = optimizer
        self.b_dec_init = b_dec_init
        self.dead_window = dead_window
        # Tokens without firing before AuxK trains a feature: by default a quarter of dead_window.
        self.auxk_window = max(1, dead_window // 4) if auxk_window is None else auxk_window
        self.unit_norm_decoder = unit_norm_decoder
        self.lr_warmup_steps, self.lr_decay_frac = lr_warmup_steps, lr_decay_frac
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self.normalize_input = normalize_input
        self.resample_every = resample_every
        # Buffers, so they follow the module to its device and into checkpoints.
        self.register_buffer("b_dec_ready", torch.tensor(False))
        self.register_buffer("input_scale", torch.tensor(1.0))  # s: the SAE sees x * s until fold_input_scale
        if sae.is_transcoder:  # its input and output are scaled apart: an MLP's input and output norms differ widely
            self.register_buffer("output_scale", torch.tensor(1.0))
        self.register_buffer("tokens_since_fired", torch.zeros(sae.W_dec.shape[0], dtype=torch.long))
        self._val = metrics.ReconstructionTotals()
        # What the host reads of the device, it reads once per process or on logging steps only: every read
        # is a host sync on a GPU, which would otherwise stall it every step.
        self._b_dec_ready_seen = False
        self._dead_at_most: int | None = None  # a bound on the dead count, refreshed on logging steps
        self._nonfinite: torch.Tensor | None = None  # (loss, step, epoch) of the first non-finite loss, on the device

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch.float()
        if not self._b_dec_ready_seen and not bool(self.b_dec_ready):  # a resumed run reads True once
            if self.normalize_input:
                d_in = self.sae.d_in
                parts = (x[:, :d_in], x[:, d_in:]) if self.sae.is_transcoder else (x,)
                for scale, part in zip(self._scales(), parts):
                    scale.fill_((part.shape[1] / part.pow(2).sum(1).mean().clamp_min(1e-12)).sqrt())
            self.sae.init_b_dec(self.scaled(x), self.b_dec_init)
            self.b_dec_ready.fill_(True)
            if self._world() > 1:  # each rank started from its own first batch: all take rank 0's start
                for tensor in (*self._scales(), *self.sae.parameters()):
                    torch.distributed.broadcast(tensor.data, src=0)
        self._b_dec_ready_seen = True
        s = self._scales()[-1]  # the reconstruction's scale: the input's, or a transcoder's output's
        x = self.scaled(x)
        dead_mask = self.tokens_since_fired >= self.dead_window
        logging = self.logging_step()
        if self.resample_every and self.global_step and self.global_step % self.resample_every == 0:
            self.resample(x, dead_mask)
            self._dead_at_most = None
        # AuxK may take features sooner than they count as dead: in a short run a feature dead for a whole
        # dead_window has few steps left to come back in.
        aux_mask = self.tokens_since_fired >= self.auxk_window
        if logging or self._dead_at_most is None:
            self._dead_at_most = dead_bound(int(aux_mask.sum()), len(aux_mask))
        warm = min(1.0, (self.global_step + 1) / self.sparsity_warmup_steps) if self.sparsity_warmup_steps else 1.0
        out = self.sae(x, sparsity_scale=warm, dead=DeadFeatures(aux_mask, self._dead_at_most))
        self._note_nonfinite(out.loss)
        if logging:
            self.raise_if_nonfinite()
        fired = (out.codes > 0).any(0)
        seen = len(x)
        if self._world() > 1:  # a feature fired if it fired on any rank's batch: dead counts, and AuxK, agree
            anywhere = fired.to(torch.int32)
            torch.distributed.all_reduce(anywhere, op=torch.distributed.ReduceOp.MAX)
            fired, seen = anywhere.bool(), seen * self._world()
        self.tokens_since_fired += seen
        self.tokens_since_fired.masked_fill_(fired, 0)  # not [fired] = 0: boolean indexing syncs with a GPU
        fvu, l0, dead = metrics.fvu(self.sae.target(x), out.x_hat), metrics.l0(out.codes), self.dead_frac()
        # MSE and L1 in the units of the raw activations, so runs with and without scaling compare.
        logged = {"train/loss": out.loss, "train/mse": out.mse / s**2, "train/fvu": fvu, "train/l0": l0,
                  "train/l1": out.l1 / s, "sparsity/dead_frac": dead}
        if out.aux is not None:
            logged["train/aux_loss"] = out.aux
        self.log_dict(logged, on_step=True, on_epoch=True)
        self.log_dict({"fvu": fvu, "l0": l0, "dead": dead}, prog_bar=True, logger=False, on_step=True)
        # Where the curve file reads it. A Python number becomes a device tensor in self.log: a host-to-device copy,
        # which syncs.
        if logging or self.trainer.is_last_batch:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return out.loss

    def _scales(self) -> tuple[torch.Tensor, ...]:
        """(input_scale,), or a transcoder's (input_scale, output_scale)."""
        return (self.input_scale, self.output_scale) if self.sae.is_transcoder else (self.input_scale,)

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """x as the SAE trains on it: x * s, or a transcoder's [input * s_in, output * s_out]."""
        if not self.sae.is_transcoder:
            return x * self.input_scale
        d_in = self.sae.d_in
        return torch.cat((x[:, :d_in] * self.input_scale, x[:, d_in:] * self.output_scale), dim=1)

    def _world(self) -> int:
        """Processes training this SAE together (DDP): 1 outside a distributed run."""
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def logging_step(self) -> bool:
        """Whether Lightning's logger writes this step's metrics (its rule: every log_every_n_steps-th step)."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    @torch.no_grad()
    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Keep the first non-finite loss with its step and epoch, on the device (no host sync)."""
        if self._nonfinite is None or self._nonfinite.device != loss.device:
            self._nonfinite = torch.tensor([0.0, -1.0, -1.0], dtype=torch.float64, device=loss.device)
        record = self._nonfinite
        now = torch.stack((loss.detach().double(), torch.full_like(record[0], self.global_step),
                           torch.full_like(record[0], self.current_epoch)))
        first = ~torch.isfinite(loss.detach()) & (record[1] < 0)
        self._nonfinite = torch.where(first, now, record)

    def nonfinite_error(self) -> NonFiniteLossError | None:
        """The error to stop with if a loss so far was NaN or inf: after one such step Adam makes every weight NaN,
        and nothing after it means anything. Read on logging steps and before every checkpoint."""
        if self._nonfinite is None:
            return None
        loss, step, epoch = self._nonfinite.tolist()
        if step < 0:
            return None
        return NonFiniteLossError(
            f"the training loss became {loss} at step {int(step)} (epoch {int(epoch)}); lower optimizer.lr or check "
            "the activations for inf (activations.outlier_factor drops huge norms)")

    def raise_if_nonfinite(self) -> None:
        error = self.nonfinite_error()
        if error is not None:
            raise error

    def resample(self, x: torch.Tensor, dead: torch.Tensor) -> None:
        """Give dead features a fresh start on inputs the SAE reconstructs worst (Anthropic 2023)."""
        generator = torch.Generator(device=x.device).manual_seed(self.global_step)
        if resample_dead(self.sae, self.trainer.optimizers[0], x, dead, generator=generator):
            self.tokens_since_fired[dead] = 0  # a new window to prove themselves in

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Fold the input scale into the SAE's biases, so it takes raw activations; a no-op once done."""
        scales = [float(scale) for scale in self._scales()]
        if any(scale != 1.0 for scale in scales):
            self.sae.fold_input_scale(*scales)
            for scale in self._scales():
                scale.fill_(1.0)

    def dead_frac(self) -> torch.Tensor:
        return metrics.dead_fraction(self.tokens_since_fired, self.dead_window)

    def on_train_epoch_end(self) -> None:
        self.raise_if_nonfinite()  # after the last logging step of an epoch (StopOnNonFiniteLoss checks earlier)

    def on_after_backward(self) -> None:
        if self.unit_norm_decoder:
            self.sae.remove_parallel_grad()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: callbacks (the checkpoint among them) run before the module's own
        # hook, and a checkpoint must hold the weights as the next step will see them.
        if self.unit_norm_decoder:
            self.sae.normalize_decoder()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        x, s = batch.float(), self._scales()[-1]
        out = self.sae(self.scaled(x))
        self._val.update(self.sae.target(x), out.x_hat / s, out.codes / s)

    def on_validation_epoch_end(self) -> None:
        if self._val.n:
            self.log_dict({f"val/{k}": v for k, v in self._val.compute().items()})
        self._val = metrics.ReconstructionTotals()

    def configure_optimizers(self) -> dict:
        optimizer = self.make_optimizer(self.sae.parameters())
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        # A closure, not an object: LambdaLR then saves no function into checkpoints; a resume rebuilds it.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, self.lr_warmup_steps, self.lr_decay_frac))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class StopOnNonFiniteLoss(L.Callback):
    """Raises the module's `NonFiniteLossError` before a later callback records or saves anything that followed
    the bad step: at every epoch's end and every `every_n_steps` steps (give it the checkpoint interval). The
    module itself checks on logging steps only, where reading the device costs nothing extra. Put it first."""

    def __init__(self, every_n_steps: int = 0) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: SAEModule, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            pl_module.raise_if_nonfinite()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        pl_module.raise_if_nonfinite()
