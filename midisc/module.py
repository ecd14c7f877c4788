"""`SAEModule`: the LightningModule that trains one SAE on batches of activation vectors.

It knows nothing of language models or databases: batches come in, metrics leave through `self.log`
(callbacks pick them up). The decoder bias starts at the (geometric) median of the first batch — starting
it at zero instead of the data mean costs ~0.14 FVU and many dead features on SmolLM2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import lightning as L
import torch

from midisc import metrics
from midisc.sae import SparseAutoencoder


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or inf; the message is one line saying when and what to try."""


class SAEModule(L.LightningModule):
    def __init__(self, sae: SparseAutoencoder, optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
                 *, b_dec_init: str = "geometric_median", dead_window: int = 262_144,
                 unit_norm_decoder: bool = True) -> None:
        super().__init__()
        self.sae = sae
        self.make_optimizer = optimizer
        self.b_dec_init = b_dec_init
        self.dead_window = dead_window
        self.unit_norm_decoder = unit_norm_decoder
        # Buffers, so they follow the module to its device and into checkpoints.
        self.register_buffer("b_dec_ready", torch.tensor(False))
        self.register_buffer("tokens_since_fired", torch.zeros(sae.W_dec.shape[0], dtype=torch.long))
        self._val = metrics.ReconstructionTotals()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch.float()
        if not self.b_dec_ready:
            self.sae.init_b_dec(x, self.b_dec_init)
            self.b_dec_ready.fill_(True)
        out = self.sae(x)
        # Stop at once: after one NaN step Adam makes every weight NaN, and nothing after it means anything.
        if not torch.isfinite(out.loss):
            raise NonFiniteLossError(
                f"the training loss became {float(out.loss)} at step {self.global_step} (epoch {self.current_epoch}); "
                "lower optimizer.lr or check the activations for inf (activations.outlier_factor drops huge norms)")
        fired = (out.codes > 0).any(0)
        self.tokens_since_fired += len(x)
        self.tokens_since_fired[fired] = 0
        fvu, l0, dead = metrics.fvu(x, out.x_hat), metrics.l0(out.codes), self.dead_frac()
        self.log_dict({"train/loss": out.loss, "train/mse": out.mse, "train/fvu": fvu, "train/l0": l0,
                       "train/l1": out.l1, "sparsity/dead_frac": dead}, on_step=True, on_epoch=True)
        self.log_dict({"fvu": fvu, "l0": l0, "dead": dead}, prog_bar=True, logger=False, on_step=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return out.loss

    def dead_frac(self) -> torch.Tensor:
        return metrics.dead_fraction(self.tokens_since_fired, self.dead_window)

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
        x = batch.float()
        out = self.sae(x)
        self._val.update(x, out.x_hat, out.codes)

    def on_validation_epoch_end(self) -> None:
        if self._val.n:
            self.log_dict({f"val/{k}": v for k, v in self._val.compute().items()})
        self._val = metrics.ReconstructionTotals()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.sae.parameters())
