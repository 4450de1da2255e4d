"""Tube masking (Tong et al., "VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised
Video Pre-Training", NeurIPS 2022; official MCG-NJU/VideoMAE masking_generator.py ``TubeMaskingGenerator``).

One spatial random mask per sample, repeated over every time slot of the (T, H, W) token grid, so a
hidden position stays hidden for the whole clip and the model cannot copy it from a neighbouring frame.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mim.checks import check_choice, check_range
from mim.masking.base import MaskingStrategy
from mim.types import Masks, TokenGrid, num_visible

__all__ = ["TubeMasking", "tube_masks"]

COUNTS = ("videomae", "mae")  # which count is truncated: the hidden one (VideoMAE) or the visible one (MAE)


def tube_masks(spatial_scores: Tensor, num_frames: int, num_visible_spatial: int) -> Masks:
    """Keep the ``num_visible_spatial`` lowest-scoring spatial positions visible in every time slot.

    Args:
        spatial_scores: (B, H*W) float, one score per spatial position.
        num_frames: T, the time slots of the grid.
        num_visible_spatial: K_s, 0 < K_s < H*W.

    Returns:
        Masks with ``visible`` (B, T*K_s) and ``targets`` (B, 1, T*(H*W - K_s)), both sorted ascending;
        token ``(t, s)`` is numbered ``t * H*W + s`` (raster order, t-major).
    """
    b, hw = spatial_scores.shape
    order = torch.argsort(spatial_scores, dim=1, stable=True)  # (B, HW) lowest first
    keep = order[:, :num_visible_spatial].sort(dim=1).values  # (B, K_s)
    drop = order[:, num_visible_spatial:].sort(dim=1).values  # (B, HW-K_s)
    offsets = torch.arange(num_frames, device=spatial_scores.device) * hw  # (T,)
    # t-major: every index of slot t is below every index of slot t+1, so the flattened rows stay sorted
    visible = (offsets.view(1, -1, 1) + keep.unsqueeze(1)).reshape(b, -1)  # (B, T*K_s)
    hidden = (offsets.view(1, -1, 1) + drop.unsqueeze(1)).reshape(b, -1)  # (B, T*(HW-K_s))
    return Masks(visible=visible, targets=hidden.unsqueeze(1), num_tokens=num_frames * hw)  # targets (B, 1, .)


class TubeMasking(MaskingStrategy):
    """VideoMAE's tube masking: a uniform random spatial mask, the same in every time slot.

    Each sample keeps exactly ``K_s`` of the ``H * W`` spatial positions visible, chosen uniformly without
    replacement, and ``K = T * K_s``. The hidden tokens form one target group (M = 1), sorted ascending. On a
    T = 1 grid this is :class:`~mim.masking.random.RandomMasking` in distribution when the two counts agree.

    ``count`` chooses which count is truncated to an integer:

    * ``"videomae"`` (default, as Tong et al., "VideoMAE", NeurIPS 2022, MCG-NJU/VideoMAE masking_generator.py
      ``TubeMaskingGenerator``, and Wang et al., "VideoMAE V2", CVPR 2023, OpenGVLab/VideoMAEv2
      dataset/masking_generator.py): the *hidden* count, ``int(mask_ratio * H*W)`` per slot, so
      ``K_s = H*W - int(mask_ratio * H*W)``. On VideoMAE's ViT-B grid 8x14x14 at 0.9: 176 hidden and 20 visible
      per slot, K = 160 of 1568; on VideoMAE V2's ViT-g grid 8x16x16: 230 hidden, 26 visible, K = 208 of 2048.
    * ``"mae"``: mim's visible-count form (mim/types.py ``num_visible``, MAE's ``int(L * (1 - mask_ratio))``)
      per slot, ``K_s = int(H*W * (1 - mask_ratio))``: 19 per slot (196 * 0.1 is 19.6 in float), K = 152 on
      8x14x14, and 25 per slot, K = 200 on 8x16x16. mim's default before issue 15.

    Either way ``K = T * K_s``, not a count over the whole grid (the two agree when T = 1).

    Args:
        mask_ratio: fraction of spatial positions hidden, in (0, 1). VideoMAE uses 0.9.
        count: ``"videomae"`` (truncate the hidden count, the official code's) or ``"mae"`` (truncate the visible
            count).
    """

    def __init__(self, *, mask_ratio: float = 0.9, count: Literal["videomae", "mae"] = "videomae") -> None:
        self.mask_ratio = check_range(self, "mask_ratio", mask_ratio, 0, 1, low_open=True, high_open=True)
        self.count = check_choice(self, "count", count, COUNTS)

    def num_visible_spatial(self, grid: TokenGrid) -> int:
        """K_s visible positions per time slot (see ``count``), at least 1 and at most H*W - 1."""
        hw = grid.h * grid.w
        k = hw - int(self.mask_ratio * hw) if self.count == "videomae" else num_visible(hw, self.mask_ratio)
        if not 0 < k < hw:
            raise ValueError(
                f"{type(self).__name__}.mask_ratio must leave at least one of the {hw} spatial positions visible and "
                f"hide at least one (count={self.count!r}), got {self.mask_ratio} ({k} visible); "
                "change mask_ratio or use more tokens (a larger image or a smaller patch)"
            )
        return k

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
        k_s = self.num_visible_spatial(grid)
        spatial = torch.rand(batch_size, grid.h * grid.w, generator=generator, device=device)  # (B, HW)
        return tube_masks(spatial, grid.t, k_s)
