"""Group-partition masking (Chen et al., "Mixed Autoencoder for Self-supervised Visual Representation Learning"
(MixedAE), CVPR 2023; /work/shared/methods/MORE.md section 2): within each group of g consecutive samples the visible
sets partition the grid, so the group's visible tokens mix into one full sequence (:class:`mim.targets.MixedPixelTarget`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mim.checks import check_int, invalid
from mim.masking.base import MaskingStrategy
from mim.types import Masks, TokenGrid

__all__ = ["GroupPartitionMasking", "group_partition"]


def group_partition(
    batch_size: int, num_tokens: int, group_size: int, *, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Visible sets that partition the grid within each run of ``group_size`` consecutive samples.

    One uniform random permutation of the N positions per group, cut into ``g`` runs of ``N/g``: slot ``s`` gets the
    ``s``-th run. A trailing incomplete group (``B % g`` samples) gets the first slots of its permutation (disjoint,
    not covering; a mixing target refuses such a batch).

    Args:
        batch_size: B.
        num_tokens: N, a multiple of ``group_size``.
        group_size: g.
        generator: the only source of randomness.
        device: where the indices live.

    Returns:
        ``visible`` (B, N/g) sorted ascending and ``hidden`` (B, N - N/g) sorted ascending.
    """
    k = num_tokens // group_size
    groups = -(-batch_size // group_size)  # ceil
    noise = torch.rand(groups, num_tokens, generator=generator, device=device)  # (G, N)
    order = noise.argsort(dim=1)  # (G, N) a permutation per group
    slots = order.view(groups, group_size, k).flatten(0, 1)[:batch_size]  # (B, K): sample b takes run b % g
    visible = slots.sort(dim=1).values  # (B, K)
    hidden = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=device)
    hidden.scatter_(1, visible, False)  # (B, N) True = hidden
    rest = hidden.float().argsort(dim=1, descending=True, stable=True)[:, : num_tokens - k]  # (B, N - K)
    return visible, rest.sort(dim=1).values


class GroupPartitionMasking(MaskingStrategy):
    """MixedAE's masking: within each group of ``group_size`` consecutive samples the visible sets partition the
    grid, so the group's visible tokens mix into one full sequence of N tokens.

    ``visible`` (B, N/g), ``targets`` (B, 1, N - N/g) = the complement (the mask ratio is ``1 - 1/g``: 0.75 at the
    paper's g = 4). The grid must have a multiple of ``g`` tokens.

    Args:
        group_size: g, images per mixed sequence (paper: 4, the inverse of MAE's 25 % visible ratio).
    """

    def __init__(self, *, group_size: int = 4) -> None:
        check_int("GroupPartitionMasking", "group_size", group_size, minimum=2)
        self.group_size = group_size

    def __repr__(self) -> str:
        return f"GroupPartitionMasking(group_size={self.group_size})"

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
        if n % self.group_size:
            raise invalid(
                "GroupPartitionMasking", "group_size", f"a divisor of the grid's {n} tokens ({grid})", self.group_size
            )
        visible, hidden = group_partition(batch_size, n, self.group_size, generator=generator, device=device)
        return Masks(visible=visible, targets=hidden.unsqueeze(1), num_tokens=n)
