"""SAEBench's core evaluation of one SAE, in SAEBench's own groups and field names.

`eval_result_metrics` holds `model_behavior_preservation`, `model_performance_preservation`,
`reconstruction_quality`, `shrinkage`, `sparsity` and `token_stats` exactly as SAEBench's
`CoreMetricCategories` names them, so a midisc result lines up with published tables. What SAEBench has
no field for (FVU, dead and dense fractions) goes in a separate `midisc` group.

Explained variance here is 1 − FVU, with the variance pooled over all evaluated vectors about their mean.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from midisc.analysis.metrics import METRICS_VERSION, target_of

EVAL_TYPE = "core"
DENSE_FREQUENCY = 0.1  # a feature firing on more than 10 % of tokens counts as dense


@torch.no_grad()
def reconstruction(sae, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Reconstruction, shrinkage and sparsity over activation vectors (batches [b, d_in]), as exact sums."""
    n, err2, total2, cos, norm_in, norm_out, out2, dot, active, l1 = (0,) + (0.0,) * 9
    total = None
    fired = torch.zeros(sae.d_sae, dtype=torch.long)
    device = sae.W_dec.device
    for x in batches:
        x = x.to(device, torch.float32)
        out = sae(x)
        x = target_of(sae, x)
        x64, x_hat = x.double(), out.x_hat.double()
        n += len(x)
        err2 += (x_hat - x64).pow(2).sum().item()
        total = x64.sum(0) if total is None else total + x64.sum(0)
        total2 += x64.pow(2).sum().item()
        cos += torch.nn.functional.cosine_similarity(x_hat, x64, dim=-1).sum().item()
        norm_in += x64.norm(dim=-1).sum().item()
        norm_out += x_hat.norm(dim=-1).sum().item()
        out2 += x_hat.pow(2).sum().item()
        dot += (x_hat * x64).sum().item()
        active += (out.codes > 0).sum().item()
        l1 += out.codes.abs().sum().item()
        fired += (out.codes > 0).sum(0).cpu()
    if n == 0:
        raise ValueError("no activation vectors were evaluated")
    variance = total2 - n * (total / n).pow(2).sum().item()
    frequency = fired.double() / n
    return {"tokens": n, "mse": err2 / (n * x.shape[1]), "fvu": err2 / max(variance, 1e-12),
            "cossim": cos / n, "l2_norm_in": norm_in / n, "l2_norm_out": norm_out / n,
            # Wright & Sharkey's γ: the scale x̂ would need to match x on average; < 1 means shrinkage.
            "relative_reconstruction_bias": out2 / dot if dot else None,
            "l0": active / n, "l1": l1 / n, "dead_frac": (frequency == 0).double().mean().item(),
            "dense_frac": (frequency > DENSE_FREQUENCY).double().mean().item()}


def core_report(recon: dict[str, float], spliced: dict[str, float | None], spliced_tokens: int,
                config: dict) -> dict:
    """The SAEBench-shaped result from `reconstruction` and `SpliceTotals.scores` output."""
    return {
        "eval_type_id": EVAL_TYPE,
        "eval_config": config,
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {
            "model_behavior_preservation": {k: spliced[k] for k in
                                            ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae")},
            "model_performance_preservation": {k: spliced[k] for k in
                                               ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae",
                                                "ce_loss_without_sae")},
            "reconstruction_quality": {"explained_variance": 1.0 - recon["fvu"], "mse": recon["mse"],
                                       "cossim": recon["cossim"]},
            "shrinkage": {"l2_norm_in": recon["l2_norm_in"], "l2_norm_out": recon["l2_norm_out"],
                          "l2_ratio": recon["l2_norm_out"] / recon["l2_norm_in"] if recon["l2_norm_in"] else None,
                          "relative_reconstruction_bias": recon["relative_reconstruction_bias"]},
            "sparsity": {"l0": recon["l0"], "l1": recon["l1"]},
            "token_stats": {"total_tokens_eval_reconstruction": spliced_tokens,
                            "total_tokens_eval_sparsity_variance": recon["tokens"]},
        },
        "midisc": {"fvu": recon["fvu"], "dead_frac": recon["dead_frac"], "dense_frac": recon["dense_frac"],
                   "metrics_version": METRICS_VERSION},
    }


def headline(report: dict) -> dict[str, float | None]:
    """The few numbers worth a column: CE loss recovered, KL score, FVU, cosine, L0."""
    m = report["eval_result_metrics"]
    return {"ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
            "kl_div_score": m["model_behavior_preservation"]["kl_div_score"],
            "fvu": report["midisc"]["fvu"], "cossim": m["reconstruction_quality"]["cossim"],
            "l0": m["sparsity"]["l0"]}
