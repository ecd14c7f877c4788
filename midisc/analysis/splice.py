"""What an SAE does to the model when its reconstruction stands in for the hooked activation.

Three forwards per batch of contexts: clean, with the SAE's reconstruction spliced in, and with the
activation zeroed. From them come the next-token cross-entropy of each, and the KL divergence of the
spliced and zeroed predictions from the clean ones. Only the positions the SAE was trained on are
replaced: position 0, separators and norm outliers keep their own activation, as SAEBench's
`exclude_special_tokens_from_reconstruction` does; replacing them would measure tokens the SAE never saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from midisc.data.activations import drop_outliers, keep_mask
from midisc.data.lm import hooked_vectors, input_device


@dataclass
class SpliceTotals:
    """Sums over every predicted token; `scores` turns them into SAEBench's numbers."""

    tokens: int = 0
    ce: dict[str, float] = field(default_factory=lambda: {"clean": 0.0, "sae": 0.0, "zero": 0.0})
    kl: dict[str, float] = field(default_factory=lambda: {"sae": 0.0, "zero": 0.0})

    def scores(self) -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("no tokens were evaluated")
        ce = {k: v / self.tokens for k, v in self.ce.items()}
        kl = {k: v / self.tokens for k, v in self.kl.items()}
        # Undefined when zeroing the activation changes nothing; NaN would poison the JSON, so None.
        ce_gap, kl_gap = ce["zero"] - ce["clean"], kl["zero"]
        return {"ce_loss_without_sae": ce["clean"], "ce_loss_with_sae": ce["sae"], "ce_loss_with_ablation": ce["zero"],
                "ce_loss_score": (ce["zero"] - ce["sae"]) / ce_gap if ce_gap > 0 else None,
                "kl_div_with_sae": kl["sae"], "kl_div_with_ablation": kl["zero"],
                "kl_div_score": (kl["zero"] - kl["sae"]) / kl_gap if kl_gap > 0 else None}


@contextmanager
def replaced_output(module: nn.Module, replace: Callable[[torch.Tensor], torch.Tensor], *, transcode: bool = False):
    """Within the block, `module`'s output hidden states [B, T, d] become `replace(acts)`: acts are the output
    itself, or with `transcode` the module's input and output side by side, as a transcoder was trained on them."""
    def hook(_mod, args, kwargs, output):
        new = replace(hooked_vectors(args, kwargs, output, transcode)[1])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _next_token_terms(logits: torch.Tensor, clean_logp: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    """(summed cross-entropy, summed KL(clean ‖ this)) over the predicted positions of a batch."""
    logp = logits[:, :-1].float().log_softmax(-1)
    ce = F.nll_loss(logp.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    kl = (clean_logp.exp() * (clean_logp - logp)).sum()
    return float(ce), float(kl)


@torch.no_grad()
def splice_totals(model: nn.Module, module: nn.Module, sae: nn.Module, contexts: Iterable[torch.Tensor], *,
                  special_ids: Iterable[int], outlier_factor: float | None, progress: str | None = None) -> SpliceTotals:
    """Clean, SAE-spliced and zero-ablated next-token loss over batches of contexts, each [b, T]. A transcoder's
    prediction from the module's input replaces the module's output (CE loss recovered of the MLP it stands for),
    and the ablation zeroes that output."""
    totals = SpliceTotals()
    special = sorted(set(special_ids))
    device = input_device(model)
    sae_device = sae.W_dec.device
    transcode = getattr(sae, "is_transcoder", False)

    def output_of(acts: torch.Tensor) -> torch.Tensor:  # the module's output, of the vectors harvested
        return acts[..., sae.d_in:] if transcode else acts

    batches = list(contexts)
    for ids in tqdm(batches, desc=progress, unit="batch", disable=True if progress is None else None, leave=False):
        ids = ids.to(device)
        keep = keep_mask(ids, special)

        def spliced(acts: torch.Tensor) -> torch.Tensor:
            mask = drop_outliers(acts, keep.to(acts.device), outlier_factor)
            out = output_of(acts).clone()
            x_hat = sae(acts[mask].to(sae_device, torch.float32)).x_hat
            out[mask] = x_hat.to(acts.device, acts.dtype)
            return out

        def zeroed(acts: torch.Tensor) -> torch.Tensor:
            mask = drop_outliers(acts, keep.to(acts.device), outlier_factor)
            out = output_of(acts).clone()
            out[mask] = 0
            return out

        clean = model(input_ids=ids, use_cache=False).logits
        clean_logp = clean[:, :-1].float().log_softmax(-1)
        ce, _ = _next_token_terms(clean, clean_logp, ids)
        totals.ce["clean"] += ce
        for name, replace in (("sae", spliced), ("zero", zeroed)):
            with replaced_output(module, replace, transcode=transcode):
                logits = model(input_ids=ids, use_cache=False).logits
            ce, kl = _next_token_terms(logits, clean_logp, ids)
            totals.ce[name] += ce
            totals.kl[name] += kl
        totals.tokens += ids[:, 1:].numel()
    return totals
