"""Matryoshka BatchTopK (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

The dictionary is split into nested prefixes: features [0, w_1), [0, w_2), …, [0, d_sae). The codes are
BatchTopK's, selected once per batch; the loss asks every prefix to reconstruct x on its own (b_dec
included), so the first features must carry the broad, frequent directions and later ones cannot absorb
them (the paper's remedy for feature absorption and splitting). Inference is BatchTopK's unchanged: one
learnt threshold, saved as JumpReLU, so SAELens and `load_sae` read the folder as they read BatchTopK's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

import midisc.sae.sparse_ops as sparse_ops
from midisc.sae.jumprelu import BatchTopKSAE
from midisc.sae.settings import number

# The paper's and SAELens's usual split: each group about twice the one before, the last taking the rest.
DEFAULT_GROUP_FRACTIONS = (0.0625, 0.125, 0.25, 0.5625)
# Fractions written in a YAML file (0.1 + 0.2 + 0.7) miss 1 by an ulp or so; a real mistake misses by far more.
_SUM_TOLERANCE = 1e-6


def prefix_widths(fractions: Any, d_sae: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Validated fractions and the cumulative prefix widths w_1 < … < w_G = d_sae they give.

    The boundaries are the rounded cumulative sums, so the group sizes always add up to d_sae exactly.
    """
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or len(fractions) == 0:
        raise ValueError(f"group_fractions must be a non-empty list of fractions of the width summing to 1, "
                         f"e.g. [0.0625, 0.125, 0.25, 0.5625]; got {fractions!r}")
    checked = tuple(number(f"group_fractions[{i}]", f, 0.0, strict=True, high=1.0) for i, f in enumerate(fractions))
    total = sum(checked)
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"group_fractions must sum to 1 (they split the width d_sae={d_sae}), got "
                         f"{list(checked)} summing to {total:g}")
    widths, running, previous = [], 0.0, 0
    for i, fraction in enumerate(checked):
        running += fraction
        width = d_sae if i == len(checked) - 1 else min(d_sae, round(running * d_sae))
        if width <= previous:
            raise ValueError(f"group_fractions[{i}]={fraction:g} gives group {i} no feature of the width "
                             f"d_sae={d_sae}; each fraction must be at least 1/{d_sae} ({1 / d_sae:.3g})")
        widths.append(width)
        previous = width
    return checked, tuple(widths)


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK whose loss is the mean, over the nested prefixes, of each prefix's reconstruction MSE, plus AuxK.

    The mean rather than the paper's sum (SAELens also sums): with one group it is BatchTopK's loss exactly,
    and the reconstruction term stays on the scale of BatchTopK's, so aux_k_coef and the learning rate mean
    what they mean there. The sum is the mean times G, which Adam barely notices beyond AuxK's relative weight.
    """

    architecture: ClassVar[str] = "matryoshka_batchtopk"

    def __init__(
        self,
        d_in: int,
        expansion: int = 8,
        *,
        group_fractions: Sequence[float] = DEFAULT_GROUP_FRACTIONS,
        k: int = 32,
        threshold_lr: float = 0.1,
        aux_k_coef: float = 1 / 32,
        aux_k: int | None = None,
        d_sae: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(d_in, expansion, k=k, threshold_lr=threshold_lr, aux_k_coef=aux_k_coef, aux_k=aux_k,
                         d_sae=d_sae, seed=seed)
        self.group_fractions, self.widths = prefix_widths(group_fractions, self.d_sae)

    def _reconstruction_loss(self, flat: Tensor, target: Tensor, features: Tensor, values: Tensor, offsets: Tensor,
                             mse: Tensor) -> Tensor:
        """The mean over the nested prefixes of each one's MSE (the last prefix is the whole dictionary: `mse`).
        A prefix decodes only the selected entries of its features: masking the others' values to 0 gives their
        decoder rows and codes no gradient from it."""
        bias = self.output_bias(flat)
        inner = [sparse_ops.decode(features, values * (features < width), self.W_dec, offsets) + bias
                 for width in self.widths[:-1]]
        return torch.stack([(prefix - target).pow(2).mean() for prefix in inner] + [mse]).mean()

    def prefix_reconstruction(self, codes: Tensor, width: int) -> Tensor:
        """x_hat [.., d_in] from the first `width` features of codes [.., d_sae] alone, b_dec included."""
        return codes[..., :width] @ self.W_dec[:width] + self.b_dec

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "group_fractions": list(self.group_fractions), "widths": list(self.widths)}

    def cfg_dict(self, metadata: dict | None = None) -> dict[str, Any]:
        # Under SAELens's training-config name, cumulative widths; inference (a JumpReLU) never reads them.
        return super().cfg_dict({**(metadata or {}), "matryoshka_widths": list(self.widths)})
