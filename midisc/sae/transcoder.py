"""Transcoders and skip transcoders (Dunefsky et al. 2024; Paulo et al. 2025): read one activation, reconstruct
another, e.g. an MLP's input -> its output, so the features explain what the MLP computes.

    codes = f(x @ W_enc + b_enc)        y_hat = codes @ W_dec + b_dec  (+ x @ W_skip.T with skip=True)

x [.., d_in] is the input, y [.., d_out] the output to reconstruct. Training, evaluation and analysis hand a
transcoder both, concatenated: [x, y] of width d_in + d_out (data/lm.py captures them so), which lets every
stage that moves activation vectors around move these unchanged; `checked` takes the input part, `target`
the output part. b_dec lives in the output space, so unlike an SAE's it is not subtracted from the input
(SAELens's TranscoderConfig refuses apply_b_dec_to_input for the same reason).

Each class here is one SAE architecture with the transcoder's parameters and maths; the activation function,
the loss and the training pass are the architecture's own. Only architectures SAELens has a transcoder class
for are offered, so every saved folder loads there (sae_lens/saes/transcoder.py): ReLU -> "transcoder",
JumpReLU and BatchTopK (saved as JumpReLU, as their SAEs are) -> "jumprelu_transcoder", with "skip_" variants.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from midisc.sae.base import _EPS, B_DEC_METHODS, SparseAutoencoder, _geometric_median
from midisc.sae.jumprelu import BatchTopKSAE, JumpReLUSAE
from midisc.sae.matryoshka import MatryoshkaBatchTopKSAE
from midisc.sae.relu import ReluSAE
from midisc.sae.settings import integer, number

KINDS = ("sae", "transcoder")


class Transcoder(SparseAutoencoder):
    """The transcoder's parameters and maths, mixed in before an SAE architecture (see the classes below)."""

    is_transcoder: ClassVar[bool] = True
    saved_as: ClassVar[str]  # SAELens's name for it without a skip path; with one, "skip_" goes before "transcoder"

    def __init__(self, d_in: int, expansion: int = 8, *, d_out: int | None = None, skip: bool = False,
                 **settings: Any) -> None:
        super().__init__(d_in, expansion, **settings)
        self.d_out = d_in if d_out is None else integer("d_out", d_out, 1)
        if not isinstance(skip, bool):
            raise ValueError(f"skip must be true or false, got {skip!r}")
        self.skip = skip
        seed = settings.get("seed")
        generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        # The input and output spaces differ (an MLP reads a normalised stream and writes into the residual one),
        # so the SAE's tied start W_enc = W_dec.T means nothing here: independent unit-norm rows instead.
        w_dec = torch.randn(self.d_sae, self.d_out, generator=generator, dtype=torch.float32)
        self.W_dec = nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(_EPS))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        # Zero, as SAELens starts it: the skip path learns only the linear part the features leave over.
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in)) if skip else None

    @property
    def saved_architecture(self) -> str:
        """cfg.json's "architecture": SAELens's transcoder class with this activation and skip path."""
        return self.saved_as.replace("transcoder", "skip_transcoder") if self.skip else self.saved_as

    # --- the maths -------------------------------------------------------------------------
    def checked(self, x: Tensor) -> Tensor:
        """The input part of x [.., d_in + d_out] (or x itself, inputs alone [.., d_in]), in the weights' dtype."""
        if x.shape[-1] == self.d_in + self.d_out:
            x = x[..., :self.d_in]
        elif x.shape[-1] != self.d_in:
            raise ValueError(f"expected inputs with last dimension d_in={self.d_in}, or inputs and outputs with "
                             f"d_in + d_out={self.d_in + self.d_out}, got shape {tuple(x.shape)}")
        return x.to(self.W_enc.dtype)

    def target(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_in + self.d_out:
            raise ValueError(f"a transcoder is trained and scored on inputs and outputs side by side, last dimension "
                             f"d_in + d_out={self.d_in + self.d_out}; got shape {tuple(x.shape)}")
        return x[..., self.d_in:]

    def pre_acts(self, x: Tensor) -> Tensor:
        return self.checked(x) @ self.W_enc + self.b_enc

    def encoder_shift(self) -> Tensor:
        return self.b_enc

    def output_bias(self, x: Tensor) -> Tensor:
        return self.b_dec + self.checked(x) @ self.W_skip.T if self.skip else self.b_dec

    def reconstruct(self, x: Tensor, codes: Tensor) -> Tensor:
        y_hat = self.decode(codes)
        return y_hat + self.checked(x) @ self.W_skip.T if self.skip else y_hat

    # --- training helpers ------------------------------------------------------------------
    @torch.no_grad()
    def init_b_dec(self, sample: Tensor, method: str = "geometric_median") -> None:
        """Set b_dec to the centre of the outputs of a sample [N, d_in + d_out]. The inputs stay uncentred, as
        SAELens's transcoders read them: starting b_enc at -centre @ W_enc instead raised held-out FVU on SmolLM2's
        block-15 MLP from 0.422 to 0.440 (BatchTopK, k=32, the reference setting)."""
        if method not in B_DEC_METHODS:
            raise ValueError(f"unknown b_dec init method {method!r}; valid: {', '.join(B_DEC_METHODS)}")
        if sample.ndim != 2 or sample.shape[1] != self.d_in + self.d_out or sample.shape[0] == 0:
            raise ValueError(f"b_dec init needs a non-empty sample of shape [N, {self.d_in + self.d_out}] (inputs "
                             f"and outputs), got {tuple(sample.shape)}")
        outputs = self.target(sample).to(device=self.b_dec.device, dtype=torch.float32)
        self.b_dec.copy_(outputs.mean(dim=0) if method == "mean" else _geometric_median(outputs))

    @torch.no_grad()
    def fold_input_scale(self, scale: float, output_scale: float | None = None) -> None:
        """Make a transcoder trained on (x * scale, y * output_scale) work on raw x and predict raw y.

        Its codes' and y_hat' = output_scale * y_hat. Codes = codes' / output_scale come from pre-activations
        divided by output_scale: W_enc times scale / output_scale, b_enc (and thresholds, the architecture's
        own fold) divided by output_scale; then b_dec / output_scale and W_skip * scale / output_scale give raw
        y_hat, while the unit-norm decoder rows stay as they are. With one scale for both, this is the SAE's fold.
        """
        output_scale = scale if output_scale is None else output_scale
        ratio = number("input scale", scale, 0, strict=True) / number("output scale", output_scale, 0, strict=True)
        self.W_enc.mul_(ratio)
        if self.skip:
            self.W_skip.mul_(ratio)
        super().fold_input_scale(output_scale)

    # --- records and persistence -----------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "kind": "transcoder", "d_out": self.d_out, "skip": self.skip}

    def cfg_dict(self, metadata: dict | None = None) -> dict[str, Any]:
        cfg = super().cfg_dict(metadata)
        return {**cfg, "architecture": self.saved_architecture, "d_out": self.d_out, "apply_b_dec_to_input": False}

    def cpu_tensors(self) -> dict[str, Tensor]:
        tensors = super().cpu_tensors()
        if self.skip:
            tensors["W_skip"] = self.W_skip.detach().to("cpu", torch.float32).contiguous()
        return tensors


class ReluTranscoder(Transcoder, ReluSAE):
    """ReLU codes with the decoder-norm-weighted L1 penalty: SAELens's Transcoder and SkipTranscoder."""

    architecture: ClassVar[str] = "transcoder"
    saved_as: ClassVar[str] = "transcoder"


class JumpReLUTranscoder(Transcoder, JumpReLUSAE):
    """A learnt threshold per feature with the L0 penalty: SAELens's JumpReLU(Skip)Transcoder."""

    architecture: ClassVar[str] = "jumprelu_transcoder"
    saved_as: ClassVar[str] = "jumprelu_transcoder"


class BatchTopKTranscoder(Transcoder, BatchTopKSAE):
    """k codes per token on average over a batch; one threshold at inference, saved as a JumpReLU transcoder."""

    architecture: ClassVar[str] = "batchtopk_transcoder"
    saved_as: ClassVar[str] = "jumprelu_transcoder"


class MatryoshkaTranscoder(Transcoder, MatryoshkaBatchTopKSAE):
    """Matryoshka BatchTopK's nested prefixes, each predicting the output alone; saved as a JumpReLU transcoder."""

    architecture: ClassVar[str] = "matryoshka_transcoder"
    saved_as: ClassVar[str] = "jumprelu_transcoder"


# The SAE class a config names -> its transcoder.
TRANSCODERS: dict[type, type[Transcoder]] = {ReluSAE: ReluTranscoder, JumpReLUSAE: JumpReLUTranscoder,
                                            BatchTopKSAE: BatchTopKTranscoder,
                                            MatryoshkaBatchTopKSAE: MatryoshkaTranscoder}
# cfg.json's "architecture" -> the class that loads it, and whether it has a skip path.
SAVED_TRANSCODERS: dict[str, tuple[type[Transcoder], bool]] = {
    "transcoder": (ReluTranscoder, False), "skip_transcoder": (ReluTranscoder, True),
    "jumprelu_transcoder": (JumpReLUTranscoder, False), "jumprelu_skip_transcoder": (JumpReLUTranscoder, True)}


def transcoder_of(sae_class: type) -> type[Transcoder]:
    """The transcoder of an SAE architecture; refused, naming the valid ones, where SAELens has no such class."""
    if sae_class in TRANSCODERS:
        return TRANSCODERS[sae_class]
    valid = ", ".join(cls.__name__ for cls in TRANSCODERS)
    hint = " (sae=batchtopk keeps k codes per token on average and saves exactly)" if sae_class.__name__ == \
        "TopKSAE" else ""
    raise ValueError(f"kind=transcoder is not offered for {sae_class.__name__}: SAELens has no transcoder of it to "
                     f"load the saved folder{hint}; architectures with one: {valid}")


def coder_class(sae_class: type, kind: str = "sae", skip: bool = False) -> type:
    """The class a config's `sae:` group builds: the architecture itself (kind=sae) or its transcoder."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a kind of coder; valid: {', '.join(KINDS)}")
    if kind == "sae":
        if skip is not False:
            raise ValueError(f"skip={skip!r} is a transcoder's linear path from input to output; it needs "
                             "sae.kind=transcoder (or leave sae.skip=false)")
        return sae_class
    return transcoder_of(sae_class)
