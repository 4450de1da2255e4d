"""Pure tensor functions behind the masking strategies (the functional core)."""

from __future__ import annotations

import torch
from torch import Tensor

from mim.types import Masks

__all__ = ["scores_to_masks"]


def scores_to_masks(scores: Tensor, num_visible: int) -> Masks:
    """Keep the ``num_visible`` lowest-scoring tokens of each row visible; the rest form one target group.

    Ties are broken by token index (stable sort), so equal scores give raster order.

    Args:
        scores: (B, N) float.
        num_visible: K, 0 < K < N.

    Returns:
        Masks with ``visible`` (B, K) and ``targets`` (B, 1, N - K), both sorted ascending.
    """
    b, n = scores.shape
    order = torch.argsort(scores, dim=1, stable=True)  # (B, N) lowest first
    visible = order[:, :num_visible].sort(dim=1).values  # (B, K)
    hidden = order[:, num_visible:].sort(dim=1).values  # (B, N-K)
    return Masks(visible=visible, targets=hidden.unsqueeze(1), num_tokens=n)  # targets (B, 1, N-K)
