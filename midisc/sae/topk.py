"""TopK codes (Gao et al. 2024): the k largest pre-activations per token, with AuxK for dead features."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

import midisc.sae.sparse_ops as sparse_ops
from midisc.sae.base import Output, SparseAutoencoder, check_auxk
from midisc.sae.settings import width_bounded
from midisc.sae.sparse_ops import DeadFeatures, TopKEncoder


class TopKSAE(SparseAutoencoder):
    """Keeps the k largest pre-activations per token (Gao et al. 2024); sparsity is set, not penalised."""

    architecture: ClassVar[str] = "topk"

    def __init__(
        self,
        d_in: int,
        expansion: int = 8,
        *,
        k: int = 32,
        aux_k_coef: float = 1 / 32,
        aux_k: int | None = None,
        d_sae: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(d_in, expansion, d_sae=d_sae, seed=seed)
        self.aux_k_coef, self.aux_k = check_auxk(aux_k_coef, aux_k, d_in, self.d_sae)
        self.k = width_bounded("k", k, self.d_sae, d_in, expansion)

    def encode(self, x: Tensor) -> Tensor:
        # SAELens TopK: select on raw pre-activations, then ReLU only the selected values, so a row
        # whose top-k includes negatives ends up with fewer than k nonzeros.
        pre = self.pre_acts(x)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def objective(self, mse: Tensor, l1: Tensor, sparsity_scale: float = 1.0) -> Tensor:
        return mse

    def forward(self, x: Tensor, *, sparsity_scale: float = 1.0, dead: Tensor | DeadFeatures | None = None) -> Output:
        if not (torch.is_grad_enabled() and self.W_dec.requires_grad):
            return super().forward(x)  # inference: the dense sums SAELens computes, bit for bit
        return self._sparse_forward(x, dead)

    def _sparse_forward(self, x: Tensor, dead: Tensor | DeadFeatures | None = None) -> Output:
        """The training pass, with the same value and gradients as the dense one for a fraction of the work.

        Dense, a step costs six [B, d_in] x [d_in, d_sae] products; here only the encoder's forward remains
        (sparse_ops explains the rest), and b_dec enters the encoder as b_dec @ W_enc, so no gradient with
        respect to the whole input batch is formed.
        """
        flat = self.checked(x).reshape(-1, self.d_in)
        shift = self.b_enc - self.b_dec @ self.W_enc
        top_values, indices = TopKEncoder.apply(flat, self.W_enc, shift, self.k)
        values = torch.relu(top_values)
        x_hat = sparse_ops.decode(indices, values, self.W_dec) + self.b_dec
        mse = (x_hat - flat).pow(2).mean()
        aux = sparse_ops.sparse_auxk(flat, self.W_enc, shift, self.W_dec, dead, self.aux_k, flat - x_hat) \
            if self.aux_k_coef else None
        with torch.no_grad():  # reported, not trained on: TopK's objective is the MSE alone
            codes = flat.new_zeros(len(flat), self.d_sae).scatter(-1, indices, values)
            l1 = (values * self.W_dec.norm(dim=1)[indices]).sum(dim=-1).mean()
        shape = x.shape[:-1]
        loss = mse if aux is None else mse + self.aux_k_coef * aux
        return Output(x_hat=x_hat.reshape(*shape, self.d_in), codes=codes.reshape(*shape, self.d_sae),
                      loss=loss, mse=mse, l1=l1, aux=aux)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "k": self.k, "aux_k_coef": self.aux_k_coef, "aux_k": self.aux_k}

    def cfg_dict(self, metadata: dict | None = None) -> dict[str, Any]:
        return {**super().cfg_dict(metadata), "k": self.k, "rescale_acts_by_decoder_norm": False}
