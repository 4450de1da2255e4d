"""Collapse statistics of learned features (pure functions, no state).

Representation collapse (every input mapped to the same point, or to a low-dimensional subspace) is the failure
joint-embedding methods such as I-JEPA / V-JEPA / T-JEPA (papers: mim/targets/latent.py) are most feared for. Two
cheap monitors of a batch of features ``x`` (R rows of width D):

* **per-dimension standard deviation** across rows: a collapsed dimension has std 0; a complete collapse has every
  std 0 (the VICReg / I-JEPA monitoring habit);
* **RankMe** (Garrido, Balestriero, Najman and LeCun, "RankMe: Assessing the Downstream Performance of Pretrained
  Self-Supervised Representations by Their Rank", ICML 2023): the effective rank
  ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / ||sigma||_1 + eps`` over the singular values ``sigma`` of ``x``
  (eps = 1e-7, as in the paper). It lies in ``[1, min(R, D)]`` up to eps, equals r for a matrix with r equal
  non-zero singular values and falls towards 1 as features collapse.

Both compute in float32 and return device tensors (no host sync); the singular value decomposition may synchronise
with the device for its error check, so callers run them only every so often.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["per_dimension_std", "rankme"]


def _rows(features: Tensor) -> Tensor:
    if features.ndim < 2:
        raise ValueError(f"features must be (..., D) with at least 2 dims, got shape {tuple(features.shape)}")
    return features.detach().reshape(-1, features.shape[-1]).float()  # (R, D)


def per_dimension_std(features: Tensor) -> Tensor:
    """Standard deviation of every feature dimension across rows (population std, divisor R).

    Args:
        features: (..., D); all leading dimensions are rows (e.g. (B, M, T, D) token features).

    Returns:
        (D,) float32.
    """
    x = _rows(features)  # (R, D)
    return x.std(dim=0, correction=0)  # (D,)


def rankme(features: Tensor, eps: float = 1e-7) -> Tensor:
    """RankMe effective rank ``exp(-sum_k p_k log p_k)``, ``p_k = sigma_k / sum(sigma) + eps``.

    Features are not centred (as in the paper).

    Args:
        features: (..., D); all leading dimensions are rows.
        eps: added to every normalised singular value (paper: 1e-7).

    Returns:
        Scalar float32 in ``[1, min(R, D)]`` (up to eps); 1 for an all-zero matrix.
    """
    sigma = torch.linalg.svdvals(_rows(features))  # (min(R, D),)
    p = sigma / sigma.sum().clamp_min(torch.finfo(sigma.dtype).tiny) + eps  # (min(R, D),)
    return torch.exp(-(p * p.log()).sum())
