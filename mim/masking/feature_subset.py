"""Feature-subset masking for tables (Thimonier et al., "T-JEPA: Augmentation-Free Self-Supervised Learning for
Tabular Data", ICLR 2025, arXiv 2410.05016; released collator jose-melo/t-jepa src/mask.py).

A table of F features is the token grid (1, 1, F) (mim/types.py). Per batch, two counts are drawn: the context
size ``n_ctx`` and the target size ``n_tgt``, uniformly over the pairs with ``n_ctx + n_tgt <= F`` (T-JEPA's
redraw loop with counts uniform over their ranges), on the host from the mask generator's seed and position (no host sync, as
:class:`~mim.masking.multiblock.MultiBlockMasking`'s block shapes). Per sample, the context is ``n_ctx`` features drawn uniformly
without replacement, and each of the M targets is ``n_tgt`` features drawn uniformly without replacement from the
features *not* in the context, independently per target (vectorised: no per-sample loop, no further sync).
Context and targets are disjoint; targets may overlap each other.

Differences from the released T-JEPA code: the targets are distinct draws (the release's are all identical), the
indices address feature tokens only (the [REG] prefix token is never masked and the last feature can be
sampled), the counts are uniform over the feasible pairs (the release rounds ``lo + (hi - lo) u``, which gives each
end of a range half the weight of an inner count), and the counts do not depend on the batch size. The count ranges
and the details: docs/design.md, "Feature-subset masking".

``sampler="official"`` reproduces the released collator's statistics instead, for like-with-like comparisons: the
counts ``lo + round((hi - lo) u)``, each drawn independently and redrawn jointly until ``n_ctx + n_tgt <= F``, and all
M targets identical (one uniform ``n_tgt``-subset of the features outside the context, repeated M times). Not
reproduced: the release's index shift (its indices 0 .. F-1 address ``[REG, f_0, .., f_{F-1}]``, so REG can be masked
and the last feature never is); mim's indices address features only, in both modes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mim.checks import check_choice, check_int, check_pair_range
from mim.masking.base import MaskingStrategy, host_random
from mim.types import Masks, TokenGrid

__all__ = ["FeatureSubsetMasking", "feasible_count_pairs", "feature_subset_masks"]

Sampler = Literal["mim", "official"]


def feasible_count_pairs(num_tokens: int, context: tuple[int, int], target: tuple[int, int]) -> int:
    """Number of integer pairs (c, t) with ``c`` in ``context``, ``t`` in ``target`` (inclusive) and c + t <= N."""
    return sum(max(0, min(target[1], num_tokens - c) - target[0] + 1) for c in range(context[0], context[1] + 1))


def _pair_at(index: int, num_tokens: int, context: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The ``index``-th feasible (c, t) pair in (c, t) lexicographic order."""
    for c in range(context[0], context[1] + 1):
        width = max(0, min(target[1], num_tokens - c) - target[0] + 1)
        if index < width:
            return c, target[0] + index
        index -= width
    raise IndexError("pair index out of range")  # unreachable when index < feasible_count_pairs(...)


def feature_subset_masks(
    num_context: int,
    num_target: int,
    *,
    batch_size: int,
    num_tokens: int,
    num_targets: int,
    generator,
    device,
    identical_targets: bool = False,
) -> Masks:
    """Per sample: a uniform ``num_context``-subset as context, M uniform ``num_target``-subsets of the rest as targets.

    Args:
        num_context: n_ctx, 1 <= n_ctx.
        num_target: n_tgt, 1 <= n_tgt <= N - n_ctx.
        batch_size: B.
        num_tokens: N.
        num_targets: M.
        generator: the source of randomness (on ``device``).
        device: where the indices are created.
        identical_targets: the released T-JEPA collator's behaviour: the M targets are one subset, repeated.

    Returns:
        Masks with ``visible`` (B, n_ctx) sorted ascending and ``targets`` (B, M, n_tgt), each group sorted ascending,
        disjoint from ``visible``; groups are independent given the context (or identical, see above).
    """
    b, n, m = batch_size, num_tokens, num_targets
    order = torch.rand(b, n, generator=generator, device=device).argsort(dim=1)  # (B, N) a uniform permutation
    visible = order[:, :num_context].sort(dim=1).values  # (B, n_ctx)
    pool = order[:, num_context:]  # (B, N - n_ctx) the features outside the context, in uniform random order
    if identical_targets:
        target = pool[:, :num_target].sort(dim=1).values  # (B, n_tgt) a uniform subset of the pool
        return Masks(visible=visible, targets=target.unsqueeze(1).expand(-1, m, -1).contiguous(), num_tokens=n)
    noise = torch.rand(b, m, n - num_context, generator=generator, device=device)  # (B, M, N - n_ctx)
    pick = noise.argsort(dim=2)[..., :num_target]  # (B, M, n_tgt) positions in the pool, one permutation per target
    targets = torch.gather(pool.unsqueeze(1).expand(-1, m, -1), 2, pick)  # (B, M, n_tgt)
    return Masks(visible=visible, targets=targets.sort(dim=2).values, num_tokens=n)


class FeatureSubsetMasking(MaskingStrategy):
    """T-JEPA's context and target feature subsets, with distinct targets and no masked prefix token by default.

    Meant for the table grid (1, 1, F) but works on any grid, treated as N = ``grid.num_tokens`` tokens in raster
    order. ``visible`` (B, n_ctx) is the context; ``targets`` (B, M, n_tgt) are the M target subsets. Tokens in
    neither are hidden from the encoder and predicted by no target. See docs/design.md ("Feature-subset
    masking") for the count draw.

    Args:
        context_share: (lo, hi) fraction of the F features in the context, 0 < lo <= hi <= 1
            (T-JEPA launch default on Jannis: (0.1363, 0.3682)).
        target_share: (lo, hi) fraction of the F features in each target, 0 < lo <= hi <= 1
            (T-JEPA: (0.1556, 0.6222)). ``context_share[0] + target_share[0]`` must not exceed 1.
        num_targets: M, target subsets per sample (T-JEPA: 4).
        sampler: "mim" (default: distinct targets, uniform feasible count pairs) or "official": the released
            collator's statistics (Thimonier et al., ICLR 2025, jose-melo/t-jepa src/mask.py; see the module
            docstring): rounded count draws with a redraw loop and M identical targets.
    """

    def __init__(
        self,
        *,
        context_share: tuple[float, float] = (0.1363, 0.3682),
        target_share: tuple[float, float] = (0.1556, 0.6222),
        num_targets: int = 4,
        sampler: Sampler = "mim",
    ) -> None:
        owner = "FeatureSubsetMasking"
        check_int(owner, "num_targets", num_targets)
        self.context_share = check_pair_range(owner, "context_share", context_share, 0, 1, low_open=True)
        self.target_share = check_pair_range(owner, "target_share", target_share, 0, 1, low_open=True)
        if self.context_share[0] + self.target_share[0] > 1:
            raise ValueError(
                "FeatureSubsetMasking.context_share[0] + target_share[0] must be <= 1 (the smallest context and "
                f"target must fit together), got {self.context_share[0]} + {self.target_share[0]}"
            )
        self.num_targets = num_targets
        self.sampler: Sampler = check_choice(owner, "sampler", sampler, ("mim", "official"))

    def count_ranges(self, num_tokens: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Inclusive integer ranges of n_ctx and n_tgt on N tokens (``max(1, round(N * share))`` at both ends).

        Raises:
            ValueError: when even the smallest context and target do not fit together in N tokens.
        """
        n = num_tokens
        context = (max(1, round(n * self.context_share[0])), max(1, round(n * self.context_share[1])))
        target = (max(1, round(n * self.target_share[0])), max(1, round(n * self.target_share[1])))
        if context[0] + target[0] > n:
            raise ValueError(
                f"FeatureSubsetMasking: a grid of {n} tokens is too small for context_share={self.context_share} "
                f"and target_share={self.target_share}: the smallest context ({context[0]}) and target "
                f"({target[0]}) do not fit together; use more features or smaller shares"
            )
        return context, target

    def sample_counts(self, num_tokens: int, generator: torch.Generator) -> tuple[int, int]:
        """Draw (n_ctx, n_tgt) on the host (no host sync): uniformly over the feasible pairs, or as the release does.

        Official: ``n = lo + round((hi - lo) u)`` per count (half-to-even rounding, as numpy's), both redrawn until
        ``n_ctx + n_tgt <= N``; the loop ends because the smallest pair fits (``count_ranges`` checks it) and has
        positive probability.
        """
        context, target = self.count_ranges(num_tokens)
        if self.sampler == "official":
            host = host_random(generator, "feature-subset-counts")
            while True:
                c = context[0] + round((context[1] - context[0]) * host.random())
                t = target[0] + round((target[1] - target[0]) * host.random())
                if c + t <= num_tokens:
                    return c, t
        total = feasible_count_pairs(num_tokens, context, target)
        index = host_random(generator, "feature-subset-counts").randrange(total)
        return _pair_at(index, num_tokens, context, target)

    def __call__(
        self,
        batch_size: int,
        grid: TokenGrid,
        *,
        generator: torch.Generator,
        device: torch.device,
        scores: Tensor | None = None,
        progress: float = 0.0,
    ) -> Masks:
        n = grid.num_tokens
        n_ctx, n_tgt = self.sample_counts(n, generator)
        return feature_subset_masks(
            n_ctx,
            n_tgt,
            batch_size=batch_size,
            num_tokens=n,
            num_targets=self.num_targets,
            generator=generator,
            device=device,
            identical_targets=self.sampler == "official",
        )
