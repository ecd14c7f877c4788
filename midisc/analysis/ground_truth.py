"""Activations made from a known sparse dictionary, and how well an SAE recovers it (`python -m midisc.synth`).

FVU says how well an SAE reconstructs, not whether its features are the ones in the data. Here the data are
built from true features, so that can be measured (in the spirit of SAELens's SynthSAEBench):

- true feature i is a unit direction in R^d; groups of them share a common component (correlated features);
- feature i fires with probability p_i, falling as a power law over i (a few frequent features, many rare);
- some features are children of a parent and can fire only when their parent does (hierarchy, the setting
  in which SAEs absorb a child into its parent);
- an active feature's magnitude is |N(1, 0.25)|; x = offset + Σ magnitude_i · direction_i + N(0, noise²).

Scores, each over the true features:
- MCC (mean correlation coefficient): decoder rows are matched one to one to true directions (Hungarian
  matching on cosine similarity); the mean cosine of the matched pairs. 1 is a perfect recovery.
- feature F1: a true feature's matched latent should fire exactly when the feature is active; the F1 of
  "latent > 0" against "feature active" over held-out samples, averaged over the true features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment


CHILD_RATE = 0.3  # how often a child fires when its parent does
TRUTH_STREAM = 0x5EED_7A11  # added to the seed of the true dictionary


@dataclass(frozen=True)
class GroundTruth:
    directions: torch.Tensor  # [n, d] unit rows
    frequency: torch.Tensor   # [n] probability of firing (for a child: given that its parent fires)
    parent: torch.Tensor      # [n] index of the feature's parent, or -1
    offset: torch.Tensor      # [d] the mean the decoder bias must learn
    noise: float

    @property
    def n_features(self) -> int:
        return len(self.directions)


def make_ground_truth(n_features: int, d: int, *, mean_active: float = 8.0, correlated_groups: int = 8,
                      correlation: float = 0.3, children: float = 0.25, noise: float = 0.05,
                      seed: int = 0) -> GroundTruth:
    """A dictionary of `n_features` directions in R^d firing `mean_active` at a time on average, a fraction
    `children` of them children of the first features, groups sharing `correlation` of a common direction."""
    # A stream of its own: an SAE seeded with the same number draws its initial decoder as randn(n, d) too, which
    # would start it at the answer.
    g = torch.Generator().manual_seed(TRUTH_STREAM + seed)
    raw = torch.randn(n_features, d, generator=g)
    common = torch.randn(correlated_groups, d, generator=g)
    group = torch.randint(0, correlated_groups, (n_features,), generator=g)
    raw = torch.nn.functional.normalize(raw, dim=1) * (1 - correlation) + \
        torch.nn.functional.normalize(common[group], dim=1) * correlation
    directions = torch.nn.functional.normalize(raw, dim=1)
    parent = torch.full((n_features,), -1, dtype=torch.long)
    n_children = int(children * n_features)
    n_parents = max(n_children // 4, 1)
    # The last features are children of the first (most frequent) ones: four children per parent.
    parent[n_features - n_children:] = torch.arange(n_children) % n_parents
    shape = (torch.arange(n_features, dtype=torch.float64) + 1).pow(-0.5)
    free = parent < 0
    # Free feature i fires with probability s·shape_i; a child with CHILD_RATE whenever its parent fires. The
    # expected count active is linear in s: solve it for mean_active.
    per_s = shape[free].sum() + CHILD_RATE * shape[parent[~free]].sum()
    frequency = torch.where(free, (shape * mean_active / per_s).clamp(max=0.9), torch.full_like(shape, CHILD_RATE))
    offset = torch.randn(d, generator=g) * 0.5
    return GroundTruth(directions, frequency.float(), parent, offset, noise)


def sample(truth: GroundTruth, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, d], active [n, n_features] bool): n samples of the data and which true features made each."""
    draws = torch.rand(n, truth.n_features, generator=generator) < truth.frequency
    has_parent = truth.parent >= 0
    active = draws.clone()
    active[:, has_parent] &= draws[:, truth.parent[has_parent]]  # a child fires only with its parent
    magnitude = (1 + 0.25 * torch.randn(n, truth.n_features, generator=generator)).abs()
    x = truth.offset + (active * magnitude) @ truth.directions
    x += truth.noise * torch.randn(x.shape, generator=generator)
    return x, active


def match(decoder: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent index matched to each true feature [n], cosine of the pair [n]): one to one, maximising the total
    cosine (Hungarian matching); needs at least as many decoder rows as true features."""
    if len(decoder) < len(directions):
        raise ValueError(f"{len(decoder)} latents cannot each match one of {len(directions)} true features")
    cos = torch.nn.functional.normalize(directions.double(), dim=1) @ \
        torch.nn.functional.normalize(decoder.double(), dim=1).T  # [n, m]
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    latent = torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]
    return latent, cos[torch.arange(len(directions)), latent].float()


def feature_f1(codes: torch.Tensor, active: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """[n] F1 of "matched latent fires" against "true feature active", per true feature (0 where neither ever)."""
    fired = codes[:, latent] > 0
    hits = (fired & active).sum(0).float()
    return torch.where(fired.sum(0) + active.sum(0) > 0, 2 * hits / (fired.sum(0) + active.sum(0)).float(),
                       torch.zeros_like(hits))
