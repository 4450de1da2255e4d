"""Patch layouts and fixed sin-cos position embeddings.

Layouts follow MAE (He et al., CVPR 2022; methods/IMAGE.md §1.0): a patch vector is ordered
(p_row, p_col, c) with the channel varying fastest, tokens in raster order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["patchify", "sincos_1d", "sincos_2d", "unpatchify"]


def patchify(images: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """Cut images into flattened patches.

    Args:
        images: (B, C, H, W).
        patch_size: (ph, pw); H and W must be multiples.

    Returns:
        (B, N, P) with N = (H/ph)*(W/pw) in raster order and P = ph*pw*C ordered (p_row, p_col, c).
    """
    b, c, h, w = images.shape
    ph, pw = patch_size
    if h % ph or w % pw:
        raise ValueError(f"image size {(h, w)} is not divisible by patch size {(ph, pw)}")
    gh, gw = h // ph, w // pw
    x = images.reshape(b, c, gh, ph, gw, pw)  # (B, C, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, ph, pw, C)
    return x.reshape(b, gh * gw, ph * pw * c)  # (B, N, P)


def unpatchify(patches: Tensor, patch_size: tuple[int, int], grid: tuple[int, int], channels: int) -> Tensor:
    """Exact inverse of :func:`patchify`.

    Args:
        patches: (B, N, P) with N = gh*gw and P = ph*pw*C.
        patch_size: (ph, pw).
        grid: (gh, gw).
        channels: C.

    Returns:
        (B, C, gh*ph, gw*pw).
    """
    b = patches.shape[0]
    (ph, pw), (gh, gw) = patch_size, grid
    x = patches.reshape(b, gh, gw, ph, pw, channels)  # (B, gh, gw, ph, pw, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, ph, gw, pw)
    return x.reshape(b, channels, gh * ph, gw * pw)  # (B, C, H, W)


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """1-D sin-cos embedding: ``[sin(t * w_i), cos(t * w_i)]`` with ``w_i = 10000^(-i / (dim/2))``.

    Sines first, then cosines (concatenated, not interleaved). Computed in float64.

    Args:
        dim: output width E (even).
        positions: (L,) coordinates.

    Returns:
        (L, E) float64.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (E/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (L, E/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (L, E)


def sincos_2d(dim: int, grid: tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
    """MAE's fixed 2-D sin-cos position embedding (methods/IMAGE.md §1.0).

    The token at (row y, col x) gets ``concat(emb(x), emb(y))``: the **column** fills the first half.
    ``num_prefix_tokens`` zero rows are prepended (MAE's CLS row is zero).

    Args:
        dim: width E, divisible by 4.
        grid: (gh, gw) token rows and columns.
        num_prefix_tokens: zero rows prepended for cls / register tokens.

    Returns:
        (prefix + gh*gw, E) float32.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
    gh, gw = grid
    rows = torch.arange(gh).repeat_interleave(gw)  # (N,) y of each raster token
    cols = torch.arange(gw).repeat(gh)  # (N,) x of each raster token
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (N, E)
    emb = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=torch.float64), emb], dim=0)  # (prefix+N, E)
    return emb.float()


def xavier_uniform_flat_(weight: Tensor) -> Tensor:
    """Xavier-uniform on a weight viewed as (out, prod(rest)), as MAE does for the patch projection."""
    out = weight.shape[0]
    fan_in = math.prod(weight.shape[1:])
    bound = math.sqrt(6.0 / (fan_in + out))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)
