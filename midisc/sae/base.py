"""The sparse autoencoder every architecture builds on: parameters, decoder, init and the SAELens v6 save.

An SAE maps an activation x [.., d_in] to non-negative codes [.., d_sae] and back:

    codes = f((x - b_dec) @ W_enc + b_enc)        x_hat = codes @ W_dec + b_dec

with parameters named and shaped as SAELens v6 names them, so a saved folder (cfg.json +
sae_weights.safetensors) loads in SAELens and Neuronpedia without conversion. This package knows
nothing of Lightning, SQL or language models: it takes tensors and plain values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from midisc.sae.settings import integer, number
from midisc.sae.sparse_ops import DeadFeatures

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
B_DEC_METHODS = ("mean", "geometric_median")
# Guards the divisions in row normalisation and Weiszfeld weights; far below any real norm.
_EPS = 1e-8


@dataclass
class Output:
    """What one forward pass gives back; every scalar is already reduced over the batch."""

    x_hat: Tensor  # [B, d_in] reconstruction
    codes: Tensor  # [B, d_sae] dense feature activations, >= 0
    loss: Tensor  # scalar the optimizer minimises
    mse: Tensor  # scalar, mean over all elements of (x_hat - x) ** 2
    l1: Tensor  # scalar, mean over batch of sum_i codes_i * ||W_dec_i||, reported for every arch
    aux: Tensor | None = None  # scalar auxiliary loss, already in `loss`: AuxK (TopK, BatchTopK), the gate's (Gated)


class SparseAutoencoder(nn.Module):
    """Shared parameters, decoder, init and persistence; subclasses choose the nonlinearity and loss."""

    architecture: ClassVar[str]  # the SAELens "architecture" string written to cfg.json
    is_transcoder: ClassVar[bool] = False  # transcoder.py: reads one activation, reconstructs another

    def __init__(
        self, d_in: int, expansion: int = 8, *, d_sae: int | None = None, seed: int | None = None
    ) -> None:
        super().__init__()
        self.d_in = integer("d_in", d_in, 1)
        self.expansion = integer("expansion", expansion, 1)
        self.d_sae = expansion * d_in if d_sae is None else integer("d_sae", d_sae, 1)
        self.d_out = d_in  # the reconstruction's width; a transcoder's may differ

        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # Unit-norm random decoder rows with the encoder as their transpose: the tied start that
        # Anthropic (April 2024 update) and EleutherAI sparsify use; it avoids early dead latents.
        w_dec = torch.randn(self.d_sae, d_in, generator=generator, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(_EPS)
        self.W_enc = nn.Parameter(w_dec.T.contiguous())  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(w_dec)  # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    # --- the maths -------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations [.., d_sae]; b_dec is subtracted first (SAELens apply_b_dec_to_input)."""
        x = self.checked(x)
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def checked(self, x: Tensor) -> Tensor:
        """x in the weights' dtype, after checking its last dimension is d_in."""
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"expected activations with last dimension d_in={self.d_in}, got shape {tuple(x.shape)}"
            )
        return x.to(self.W_enc.dtype)

    def target(self, x: Tensor) -> Tensor:
        """What the reconstruction of x should equal: x itself (a transcoder's is the other activation)."""
        return x

    def encoder_shift(self) -> Tensor:
        """The encoder's bias on raw inputs, b_enc - b_dec @ W_enc: the training passes add it to x @ W_enc, so
        no gradient with respect to the whole input batch is formed."""
        return self.b_enc - self.b_dec @ self.W_enc

    def output_bias(self, x: Tensor) -> Tensor:
        """What the reconstruction adds to codes @ W_dec for inputs x [.., d_in]: b_dec (a skip transcoder adds
        its linear path of x too)."""
        return self.b_dec

    def reconstruct(self, x: Tensor, codes: Tensor) -> Tensor:
        """The reconstruction [.., d_out] of x from its codes."""
        return self.decode(codes)

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [.., d_sae], all >= 0."""
        raise NotImplementedError(f"{type(self).__name__} must define encode()")

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction [.., d_in]. The only product with W_dec, so a sparse decoder can replace it here."""
        return codes @ self.W_dec + self.b_dec

    def objective(self, mse: Tensor, l1: Tensor, sparsity_scale: float = 1.0) -> Tensor:
        """The scalar to minimise, from the two reported terms; sparsity_scale multiplies the penalty's coefficient."""
        raise NotImplementedError(f"{type(self).__name__} must define objective()")

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead: Tensor | DeadFeatures | None = None) -> Output:
        """One pass over x [.., d_in]. Training passes two extras every architecture accepts:
        sparsity_scale (0..1, the warm-up of an L1/L0 coefficient; architectures without one ignore it) and
        dead (features that have not fired lately, for AuxK; the others ignore it): a [d_sae] bool mask, or
        `DeadFeatures`, the mask with a bound on its count that spares a GPU a host sync."""
        codes = self.encode(x)
        x_hat = self.reconstruct(x, codes)
        mse = (x_hat - self.target(x).to(x_hat.dtype)).pow(2).mean()
        # Weighting each code by its decoder norm makes the penalty blind to the trivial trade of a
        # small code against a long decoder row (Anthropic, April 2024 update).
        l1 = (codes * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        return Output(x_hat=x_hat, codes=codes, loss=self.objective(mse, l1, sparsity_scale), mse=mse, l1=l1)

    # --- training helpers ------------------------------------------------------------------
    @torch.no_grad()
    def init_b_dec(self, sample: Tensor, method: str = "geometric_median") -> None:
        """Set b_dec to the centre of a sample of activations [N, d_in], before training starts."""
        if method not in B_DEC_METHODS:
            raise ValueError(f"unknown b_dec init method {method!r}; valid: {', '.join(B_DEC_METHODS)}")
        if sample.ndim != 2 or sample.shape[1] != self.d_in or sample.shape[0] == 0:
            raise ValueError(
                f"b_dec init needs a non-empty sample of shape [N, {self.d_in}], got {tuple(sample.shape)}"
            )
        sample = sample.to(device=self.b_dec.device, dtype=torch.float32)
        centre = sample.mean(dim=0) if method == "mean" else _geometric_median(sample)
        self.b_dec.copy_(centre)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every W_dec row to unit norm; an all-zero row stays zero rather than becoming NaN."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(_EPS))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of W_dec.grad along each row, so a step rotates rows instead of growing them.

        Call after backward and before the optimizer step, then normalize_decoder() after the step
        (EleutherAI sparsify does the same). No-op before the first backward.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        # Project against unit rows so the result is orthogonal even if rows drifted off unit norm.
        rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(_EPS)
        grad -= (grad * rows).sum(dim=1, keepdim=True) * rows

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on `x * scale` work on raw `x`, with its outputs in raw units.

        With x' = x * scale the trained SAE gives codes' and x_hat' = x_hat * scale. Dividing both biases
        by `scale` gives codes = codes' / scale (ReLU and top-k selection commute with a positive
        scale) and x_hat = x_hat' / scale, while W_enc and the unit-norm decoder rows stay as they are.
        """
        scale = number("input scale", scale, 0, strict=True)
        self.b_enc.div_(scale)
        self.b_dec.div_(scale)

    # --- records and persistence -----------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        """Plain values that define this SAE, for run records."""
        return {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
                "expansion": self.expansion}

    def flat(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(inputs [N, d_in], targets [N, d_out]) of x [.., *], flattened over the batch dimensions."""
        return self.checked(x).reshape(-1, self.d_in), self.target(x).to(self.W_enc.dtype).reshape(-1, self.d_out)

    def cfg_dict(self, metadata: dict | None = None) -> dict[str, Any]:
        """The SAELens v6 cfg.json contents for this SAE."""
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": dict(metadata or {}),
        }

    def save(self, folder: str | Path, metadata: dict | None = None) -> Path:
        """Write folder/cfg.json and folder/sae_weights.safetensors; return the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CFG_FILENAME).write_text(json.dumps(self.cfg_dict(metadata), indent=2) + "\n")
        save_file(self.cpu_tensors(), str(folder / WEIGHTS_FILENAME))
        return folder

    def cpu_tensors(self) -> dict[str, Tensor]:
        """The parameters under their SAELens names, as contiguous float32 CPU tensors, ready to save."""
        return {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous()
                for name in ("W_enc", "W_dec", "b_enc", "b_dec")}

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """The inverse of cpu_tensors: set every parameter from tensors under their SAELens names."""
        self.load_state_dict(tensors, strict=True)



def check_auxk(coef: Any, aux_k: Any, d_in: int, d_sae: int) -> tuple[float, int]:
    """Validated (aux_k_coef, aux_k); aux_k defaults to d_in // 2, as Gao et al. (2024) and sparsify use."""
    coef = number("aux_k_coef", coef, 0.0)  # 0 turns AuxK off
    return coef, integer("aux_k", max(1, d_in // 2) if aux_k is None else aux_k, 1, d_sae)


# The architectures cfg.json may name. JumpReLU (and BatchTopK, which SAELens saves as JumpReLU) lives in

def _geometric_median(points: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm for the point minimising the summed distance to `points` [N, d].

    Unlike the mean, a handful of huge activations (BOS, attention-sink tokens) barely move it.
    """
    # Starting from the coordinate-wise median (itself robust) converges in far fewer steps than
    # starting from the mean, which outliers may have dragged far away.
    median = points.median(dim=0).values
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(_EPS)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * (1.0 + median.norm()):
            break
    return median
