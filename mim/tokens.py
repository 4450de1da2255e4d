"""Token utilities every floor above ``mim.types`` may use: select tokens per sample, place them back.

Tokens are numbered in raster order over the token grid and masks are index tensors (see :mod:`mim.types`); these
two functions are the only places that turn such an index into a gather or a scatter over the token axis.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gather_tokens", "scatter_tokens"]


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Select tokens per sample.

    Args:
        x: (B, N, D).
        index: (B, K) int64 into N.

    Returns:
        (B, K, D).
    """
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)


def scatter_tokens(base: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """Place ``src`` tokens at ``index`` in a copy of ``base`` (out of place, autograd-safe).

    Args:
        base: (B, N, D), e.g. mask tokens broadcast over the grid.
        index: (B, K) int64 into N.
        src: (B, K, D).

    Returns:
        (B, N, D).
    """
    return base.scatter(1, index.unsqueeze(-1).expand(-1, -1, base.shape[-1]), src)  # (B, N, D)
