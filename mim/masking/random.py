"""Random masking (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from mim.masking.base import ScoreMasking
from mim.types import TokenGrid

__all__ = ["RandomMasking"]


class RandomMasking(ScoreMasking):
    """MAE's uniform random masking: i.i.d. U[0, 1) noise per token, keep the K lowest.

    Every sample gets an independent mask with exactly K = int(N * (1 - mask_ratio)) visible tokens.

    Args:
        mask_ratio: fraction of tokens hidden, in (0, 1). MAE uses 0.75.
    """

    def scores(
        self,
        batch_size: int,
        grid: TokenGrid,
        *,
        generator: torch.Generator,
        device: torch.device,
        scores: Tensor | None,
        progress: float,
    ) -> Tensor:
        return torch.rand(batch_size, grid.num_tokens, generator=generator, device=device)  # (B, N)
