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

    ``index_select`` on the flattened (B*N, D) tokens rather than ``torch.gather``: same values and gradients, but
    gather's backward keeps its whole (B, N, D) input alive (only for its shape), which costs 0.77 MiB per image at
    MAE ViT-B (BENCHMARKS.md, "Activation memory"); index_select's keeps the index.
    """
    b, n, d = x.shape
    flat = (index + torch.arange(b, device=index.device).unsqueeze(1) * n).flatten()  # (B*K,) rows of (B*N, D)
    return x.reshape(b * n, d).index_select(0, flat).view(b, index.shape[1], d)  # (B, K, D)


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
