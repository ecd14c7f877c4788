"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders").

One encoder matrix feeds two paths: a gate that decides which features fire and a magnitude path that
decides how strongly, so the L1 penalty, which only the gate feels, no longer shrinks the magnitudes:

    x_enc = (x - b_dec) @ W_enc                       gate = x_enc + b_gate
    codes = (gate > 0) * relu(x_enc * exp(r_mag) + b_mag)      x_hat = codes @ W_dec + b_dec

Saved as SAELens saves it (sae_lens/saes/gated_sae.py): "architecture": "gated" in cfg.json and exactly
W_enc, b_gate, r_mag, b_mag, W_dec, b_dec in sae_weights.safetensors (no b_enc).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from midisc.sae.base import Output, SparseAutoencoder
from midisc.sae.settings import number
from midisc.sae.sparse_ops import DeadFeatures

# The tensors of SAELens's gated layout, in the order they are saved.
GATED_TENSORS = ("W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag")


class GatedSAE(SparseAutoencoder):
    """codes = gate * magnitude with W_enc shared by both paths; loss = MSE + l1_coef * L1(gate) + aux recon."""

    architecture: ClassVar[str] = "gated"

    def __init__(
        self,
        d_in: int,
        expansion: int = 8,
        *,
        l1_coef: float = 1e-3,
        d_sae: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(d_in, expansion, d_sae=d_sae, seed=seed)
        self.l1_coef = number("l1_coef", l1_coef, 0.0)
        # The gate and magnitude biases replace b_enc; deleting the parameter (not setting it to None, as
        # SAELens does) keeps it out of parameters(), the optimizer and the state_dict altogether.
        del self.b_enc
        # All zero as in SAELens: the magnitude path starts as the gate path, so training begins as a ReLU SAE.
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))  # log of the magnitude path's per-feature rescale
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    # --- the maths -------------------------------------------------------------------------
    def _shared(self, x: Tensor) -> Tensor:
        """(x - b_dec) @ W_enc [.., d_sae], the product both paths start from."""
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"expected activations with last dimension d_in={self.d_in}, got shape {tuple(x.shape)}"
            )
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc

    def _paths(self, x_enc: Tensor) -> tuple[Tensor, Tensor]:
        """(gate pre-activations, codes) from the shared product."""
        gate = x_enc + self.b_gate
        # x_enc * exp(r_mag) equals SAELens's x @ (W_enc * exp(r_mag)) up to rounding, for one matmul, not two.
        magnitude = torch.relu(x_enc * self.r_mag.exp() + self.b_mag)
        return gate, (gate > 0).to(magnitude.dtype) * magnitude

    def pre_acts(self, x: Tensor) -> Tensor:
        """The gate's pre-activations [.., d_sae]: a feature fires exactly where they are > 0."""
        return self._shared(x) + self.b_gate

    def encode(self, x: Tensor) -> Tensor:
        return self._paths(self._shared(x))[1]

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead: Tensor | DeadFeatures | None = None) -> Output:
        """One pass; `dead` is accepted for the common signature and ignored (the gated loss has no AuxK).

        Units: SAELens sums squared errors over d_in (then means over the batch) for both the MSE and the
        auxiliary reconstruction; we take means over all elements, as every midisc architecture does. Our
        loss is therefore SAELens's divided by d_in, with the same gradients up to that constant (to which
        Adam is blind), provided l1_coef = SAELens's l1_coefficient / d_in: SAELens's default of 1.0 is
        1 / d_in here, ~1e-3 for d_in in the hundreds to thousands, the range conf/sae/gated.yaml starts in.
        """
        x = x.to(self.W_enc.dtype)
        gate, codes = self._paths(self._shared(x))
        x_hat = self.decode(codes)
        mse = (x_hat - x).pow(2).mean()
        norms = self.W_dec.norm(dim=1)
        gate_act = torch.relu(gate)
        # The gate's L1, weighted by decoder row norms as SAELens weights it (and as our ReLU SAE's L1 is):
        # the step (gate > 0) has no gradient, so this is the only signal that trains the gate's sparsity.
        l1_gate = (gate_act * norms).sum(dim=-1).mean()
        # The paper's auxiliary task: the gate's ReLU alone, through a frozen copy of the decoder, should
        # reconstruct x. It gives the gate a magnitude-aware gradient the step cannot; the decoder learns
        # from the main reconstruction only.
        aux = (gate_act @ self.W_dec.detach() + self.b_dec.detach() - x).pow(2).mean()
        loss = mse + sparsity_scale * self.l1_coef * l1_gate + aux
        with torch.no_grad():  # reported, not trained on: the L1 every architecture reports, of the codes
            l1 = (codes * norms).sum(dim=-1).mean()
        # aux goes out as Output.aux (already in loss) so training logs it as train/aux_loss.
        return Output(x_hat=x_hat, codes=codes, loss=loss, mse=mse, l1=l1, aux=aux)

    # --- training helpers ------------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on `x * scale` work on raw `x`, with codes and x_hat in raw units.

        With x' = x * scale: gate' = scale * ((x - b_dec'/scale) @ W_enc + b_gate'/scale), and the magnitude
        pre-activation likewise with b_mag'. Dividing b_dec, b_gate and b_mag by `scale` therefore divides
        both pre-activations by `scale`: the gate's sign (which features fire) is unchanged, the ReLU'd
        magnitudes shrink by `scale`, and so does x_hat = codes @ W_dec + b_dec. W_enc, r_mag and the
        decoder rows stay as they are.
        """
        scale = number("input scale", scale, 0, strict=True)
        for bias in (self.b_dec, self.b_gate, self.b_mag):
            bias.div_(scale)

    # --- records and persistence -----------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "l1_coef": self.l1_coef}

    def cfg_dict(self, metadata: dict | None = None) -> dict[str, Any]:
        # As ReluSAE: SAELens keeps l1_coefficient in its training config only, so it travels in metadata
        # (in midisc's mean-over-elements units, see forward), where load_sae reads it back.
        return super().cfg_dict({**(metadata or {}), "l1_coefficient": self.l1_coef})

    def cpu_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous() for name in GATED_TENSORS}
