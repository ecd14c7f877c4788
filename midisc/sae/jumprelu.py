"""Thresholded SAEs: JumpReLU (Rajamanoharan et al. 2024) and BatchTopK (Bussmann et al. 2024).

At inference both compute codes = pre * (pre > threshold) with one threshold per feature, which is how
SAELens stores them: "architecture": "jumprelu" in cfg.json and a `threshold` tensor [d_sae] beside
W_enc, b_enc, W_dec, b_dec in sae_weights.safetensors (sae_lens/saes/jumprelu_sae.py; BatchTopK is
saved the same way, with every feature sharing one threshold, in sae_lens/saes/batchtopk_sae.py).
They differ in how the threshold is found: JumpReLU learns it through a straight-through estimator,
BatchTopK keeps the k * B largest activations of a batch and tracks the smallest one it kept.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import midisc.sae.sparse_ops as sparse_ops
from midisc.sae.base import Output, SparseAutoencoder, check_auxk
from midisc.sae.settings import number, width_bounded
from midisc.sae.sparse_ops import BatchTopKEncoder, DeadFeatures


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - threshold). The gradient for pre is exact; for the threshold, whose true gradient is
    zero almost everywhere, the paper's pseudo-derivative -(threshold / eps) * K((pre - threshold) / eps)
    with the rectangle kernel K lets features near the threshold move it."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        near = _rectangle((pre - threshold) / ctx.bandwidth)
        grad_threshold = (-(threshold / ctx.bandwidth) * near * grad).sum_to_size(threshold.shape)
        return grad * (pre > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    """H(pre - threshold), the L0 count. Only the threshold gets a (pseudo-)gradient, -K(..) / eps: the
    paper trains the encoder through the reconstruction alone."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        near = _rectangle((pre - threshold) / ctx.bandwidth)
        return None, (-(1.0 / ctx.bandwidth) * near * grad).sum_to_size(threshold.shape), None


def _log_exactly(threshold: Tensor, steps: int = 4) -> Tensor:
    """A log_threshold whose exp() is `threshold` bit for bit, wherever exp() can reach it.

    log() then exp() is off by an ulp for some values; a reloaded SAE must fire on exactly the same
    tokens, so step the log by ulps until exp() lands on the saved value.
    """
    log = threshold.log()
    for _ in range(steps):
        back = log.exp()
        if torch.equal(back, threshold):
            break
        up, down = torch.nextafter(log, log.new_tensor(math.inf)), torch.nextafter(log, log.new_tensor(-math.inf))
        log = torch.where(back < threshold, up, torch.where(back > threshold, down, log))
    return log


def _output(sae: SparseAutoencoder, x: Tensor, codes: Tensor, penalty: Tensor | None = None) -> Output:
    x_hat = sae.reconstruct(x, codes)
    mse = (x_hat - sae.target(x).to(x_hat.dtype)).pow(2).mean()
    # The same decoder-norm-weighted L1 every architecture reports (see SparseAutoencoder.forward).
    with torch.no_grad():
        l1 = (codes * sae.W_dec.norm(dim=1)).sum(dim=-1).mean()
    loss = mse if penalty is None else mse + penalty
    return Output(x_hat=x_hat, codes=codes, loss=loss, mse=mse, l1=l1)


class JumpReLUSAE(SparseAutoencoder):
    """codes = pre * H(pre - threshold) with a learnt threshold per feature; loss = MSE + l0_coef * L0."""

    architecture: ClassVar[str] = "jumprelu"

    def __init__(
        self,
        d_in: int,
        expansion: int = 8,
        *,
        l0_coef: float = 1e-3,
        bandwidth: float = 1e-3,
        init_threshold: float = 1e-3,
        d_sae: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(d_in, expansion, d_sae=d_sae, seed=seed)
        self.l0_coef = number("l0_coef", l0_coef, 0.0)
        self.bandwidth = number("bandwidth", bandwidth, 0.0, strict=True)
        self.init_threshold = number("init_threshold", init_threshold, 0.0, strict=True)
        # The log keeps the threshold positive and makes Adam's steps relative to its size (as SAELens).
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), math.log(self.init_threshold)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        return _JumpReLU.apply(self.pre_acts(x), self.threshold, self.bandwidth)

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead: Tensor | DeadFeatures | None = None) -> Output:
        pre, threshold = self.pre_acts(x), self.threshold
        codes = _JumpReLU.apply(pre, threshold, self.bandwidth)
        l0 = _Step.apply(pre, threshold, self.bandwidth).sum(dim=-1).mean()
        return _output(self, x, codes, sparsity_scale * self.l0_coef * l0)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.log_threshold.sub_(math.log(scale))  # pre-activations shrink by `scale`, so must the threshold

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "l0_coef": self.l0_coef, "bandwidth": self.bandwidth,
                "init_threshold": self.init_threshold}

    def cfg_dict(self, metadata: dict | None = None) -> dict[str, Any]:
        # Training settings under SAELens's training-config names; inference never reads them.
        return super().cfg_dict({**(metadata or {}), "l0_coefficient": self.l0_coef,
                                 "jumprelu_bandwidth": self.bandwidth})

    def cpu_tensors(self) -> dict[str, Tensor]:
        tensors = super().cpu_tensors()
        tensors["threshold"] = self.threshold.detach().to("cpu", torch.float32).contiguous()
        return tensors

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)
        threshold = tensors.pop("threshold", None)
        if threshold is None:
            raise ValueError(f"jumprelu weights need a 'threshold' tensor [d_sae]; found only {sorted(tensors)}")
        super().load_tensors({**tensors, "log_threshold": _log_exactly(threshold.to(torch.float32))})


class BatchTopKSAE(SparseAutoencoder):
    """Keeps the k * B largest activations of a batch of B tokens (k per token on average); at inference a
    single threshold, the running average of the smallest kept activation, replaces the batch."""

    architecture: ClassVar[str] = "batchtopk"
    saved_architecture: ClassVar[str] = "jumprelu"  # what cfg.json says, so SAELens and load_sae read it

    def __init__(
        self,
        d_in: int,
        expansion: int = 8,
        *,
        k: int = 32,
        threshold_lr: float = 0.1,
        aux_k_coef: float = 1 / 32,
        aux_k: int | None = None,
        d_sae: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(d_in, expansion, d_sae=d_sae, seed=seed)
        self.aux_k_coef, self.aux_k = check_auxk(aux_k_coef, aux_k, d_in, self.d_sae)
        self.k = width_bounded("k", k, self.d_sae, d_in, expansion)
        self.threshold_lr = number("threshold_lr", threshold_lr, 0.0, strict=True, high=1.0)
        # float64 as in SAELens: an EMA over many steps in float32 stalls once lr * change < 1 ulp.
        self.register_buffer("running_threshold", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("threshold_seen", torch.tensor(False))

    @property
    def threshold(self) -> Tensor:
        """The inference threshold [d_sae], exactly as a reloaded JumpReLUSAE computes it: a value exp() can
        reach, so load_sae finds a log_threshold that gives it back bit for bit."""
        value = self.running_threshold.to(self.W_enc.dtype).expand(self.d_sae)
        return value.log().exp()

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)  # threshold >= 0, so this is ReLU then the jump

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead: Tensor | DeadFeatures | None = None) -> Output:
        # Batch selection only when a gradient is wanted (TopKSAE's test): validation and analysis run without
        # one and see each token alone. Not self.training: Lightning keeps an SAE handed over in eval mode so.
        if not (torch.is_grad_enabled() and self.W_dec.requires_grad):
            return _output(self, x, self.encode(x))
        return self._sparse_forward(x, dead)

    def _sparse_forward(self, x: Tensor, dead: Tensor | DeadFeatures | None) -> Output:
        """The training pass: the k·B largest ReLU'd pre-activations of the batch, computed over the selected
        entries only, as TopKSAE's pass is (see sparse_ops). Selecting on raw pre-activations and then taking the
        ReLU keeps the same entries wherever k·B of them are positive; where fewer are, the extra ones are 0
        either way and carry no gradient."""
        flat, target = self.flat(x)
        shift = self.encoder_shift()
        n = min(self.k * len(flat), len(flat) * self.d_sae)
        values, tokens, features = BatchTopKEncoder.apply(flat, self.W_enc, shift, n)
        values = torch.relu(values)
        offsets = sparse_ops.offsets_of(tokens, len(flat))
        x_hat = sparse_ops.decode(features, values, self.W_dec, offsets) + self.output_bias(flat)
        mse = (x_hat - target).pow(2).mean()
        recon = self._reconstruction_loss(flat, target, features, values, offsets, mse)
        aux = sparse_ops.sparse_auxk(flat, self.W_enc, shift, self.W_dec, dead, self.aux_k, target - x_hat) \
            if self.aux_k_coef else None
        with torch.no_grad():
            codes = flat.new_zeros(len(flat), self.d_sae).index_put_((tokens, features), values)
            self._update_threshold(values)
            l1 = (values * self.W_dec.norm(dim=1)[features]).sum() / len(flat)
        loss = recon if aux is None else recon + self.aux_k_coef * aux
        shape = x.shape[:-1]
        return Output(x_hat=x_hat.reshape(*shape, self.d_out), codes=codes.reshape(*shape, self.d_sae), loss=loss,
                      mse=mse, l1=l1, aux=aux)

    def _reconstruction_loss(self, flat: Tensor, target: Tensor, features: Tensor, values: Tensor, offsets: Tensor,
                             mse: Tensor) -> Tensor:
        """The reconstruction term of the training loss, from the selected entries (features, values) of the
        flat batch (inputs, and the targets they reconstruct): the whole dictionary's MSE. Matryoshka asks the same of each of its nested prefixes."""
        return mse

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        """Move the inference threshold towards the smallest positive code of this batch (values: the selected
        entries). Only device operations: reading a tensor back here would stall a GPU every step."""
        kept = values > 0
        smallest = torch.where(kept, values, math.inf).amin().to(torch.float64)  # inf when nothing was kept
        # Start at the first value rather than at 0, which an EMA would take ~1/lr steps to forget.
        rate = torch.where(self.threshold_seen, torch.full_like(self.running_threshold, self.threshold_lr),
                           torch.ones_like(self.running_threshold))
        moved = self.running_threshold * (1 - rate) + rate * smallest
        any_kept = kept.any()
        self.running_threshold.copy_(torch.where(any_kept, moved, self.running_threshold))
        self.threshold_seen.logical_or_(any_kept)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.running_threshold.div_(scale)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "k": self.k, "threshold_lr": self.threshold_lr, "aux_k_coef": self.aux_k_coef,
                "aux_k": self.aux_k}

    def cfg_dict(self, metadata: dict | None = None) -> dict[str, Any]:
        # SAELens drops keys its JumpReLU config lacks, so "k" may stay for midisc's own checks.
        cfg = super().cfg_dict({**(metadata or {}), "trained_as": self.architecture})
        return {**cfg, "architecture": self.saved_architecture, "k": self.k}

    def cpu_tensors(self) -> dict[str, Tensor]:
        tensors = super().cpu_tensors()
        tensors["threshold"] = self.threshold.detach().to("cpu", torch.float32).contiguous()
        return tensors
