"""Patch layouts and fixed sin-cos position embeddings.

Layouts follow MAE (He et al., CVPR 2022; facebookresearch/mae models_mae.py ``patchify``): a patch vector is ordered
(p_row, p_col, c) with the channel varying fastest, tokens in raster order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mim.types import TokenGrid

__all__ = [
    "TubeletEmbed",
    "patchify",
    "patchify_3d",
    "sincos_1d",
    "sincos_2d",
    "sincos_3d",
    "sincos_for_grid",
    "unpatchify",
    "unpatchify_3d",
]


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
    """MAE's fixed 2-D sin-cos position embedding (facebookresearch/mae util/pos_embed.py).

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


def patchify_3d(videos: Tensor, tubelet: tuple[int, int, int]) -> Tensor:
    """Cut clips into flattened tubelets (the 3-D extension of :func:`patchify`).

    Args:
        videos: (B, C, T, H, W).
        tubelet: (pt, ph, pw); T, H and W must be multiples.

    Returns:
        (B, N, P) with N = (T/pt)*(H/ph)*(W/pw) in raster order (time-major) and P = pt*ph*pw*C ordered
        (p_t, p_row, p_col, c), channel fastest (VideoMAE's (pixel, channel) target layout).
    """
    b, c, t, h, w = videos.shape
    pt, ph, pw = tubelet
    if t % pt or h % ph or w % pw:
        raise ValueError(f"clip size {(t, h, w)} is not divisible by tubelet size {(pt, ph, pw)}")
    gt, gh, gw = t // pt, h // ph, w // pw
    x = videos.reshape(b, c, gt, pt, gh, ph, gw, pw)  # (B, C, gt, pt, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, gt, gh, gw, pt, ph, pw, C)
    return x.reshape(b, gt * gh * gw, pt * ph * pw * c)  # (B, N, P)


def unpatchify_3d(patches: Tensor, tubelet: tuple[int, int, int], grid: TokenGrid, channels: int) -> Tensor:
    """Exact inverse of :func:`patchify_3d`: (B, N, P) -> (B, C, T, H, W)."""
    b = patches.shape[0]
    pt, ph, pw = tubelet
    x = patches.reshape(b, grid.t, grid.h, grid.w, pt, ph, pw, channels)  # (B, gt, gh, gw, pt, ph, pw, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, gt, pt, gh, ph, gw, pw)
    return x.reshape(b, channels, grid.t * pt, grid.h * ph, grid.w * pw)  # (B, C, T, H, W)


def sincos_3d(dim: int, grid: TokenGrid, num_prefix_tokens: int = 0, *, uniform_power: bool = True) -> Tensor:
    """Fixed 3-D sin-cos position embedding (V-JEPA's factorisation, facebookresearch/jepa
    src/models/utils/pos_embs.py).

    Each token gets ``concat(emb_t(t), emb_h(h), emb_w(w))`` (time, then row, then column), each a 1-D sin-cos
    embedding of its own width: ``2 * ceil(dim / 6)`` per axis truncated to ``dim`` in total with
    ``uniform_power``; otherwise ``dim / 2`` for time and ``dim / 4`` for each spatial axis.

    Args:
        dim: width E (even; divisible by 4 without ``uniform_power``).
        grid: (t, h, w) token grid.
        num_prefix_tokens: zero rows prepended.
        uniform_power: split the width equally over the three axes.

    Returns:
        (prefix + t*h*w, E) float32.
    """
    if uniform_power:
        width = 2 * math.ceil(dim / 6)
        widths = (width, width, width)
    else:
        if dim % 4:
            raise ValueError(f"3-D sin-cos width must be divisible by 4 without uniform_power, got {dim}")
        widths = (dim // 2, dim // 4, dim // 4)
    ts = torch.arange(grid.t).repeat_interleave(grid.h * grid.w)  # (N,) time index of each raster token
    hs = torch.arange(grid.h).repeat_interleave(grid.w).repeat(grid.t)  # (N,) row
    ws = torch.arange(grid.w).repeat(grid.t * grid.h)  # (N,) column
    emb = torch.cat([sincos_1d(wd, pos) for wd, pos in zip(widths, (ts, hs, ws), strict=True)], dim=1)[:, :dim]
    emb = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=torch.float64), emb], dim=0)  # (prefix+N, E)
    return emb.float()


def sincos_for_grid(dim: int, grid: TokenGrid, num_prefix_tokens: int = 0) -> Tensor:
    """MAE's 2-D table for images (t = 1), the 3-D table for video grids: (prefix + N, E)."""
    if grid.t == 1:
        return sincos_2d(dim, (grid.h, grid.w), num_prefix_tokens)
    return sincos_3d(dim, grid, num_prefix_tokens)


class TubeletEmbed(nn.Module):
    """3-D patch embedding: a Conv3d with kernel = stride = (pt, ph, pw) (VideoMAE, Tong et al., NeurIPS 2022).

    Args:
        in_chans: C.
        dim: D.
        tubelet: (pt, ph, pw).
    """

    def __init__(self, *, in_chans: int, dim: int, tubelet: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=tubelet, stride=tubelet)

    def forward(self, videos: Tensor) -> Tensor:
        """(B, C, T, H, W) -> (B, N, D) in raster (time-major) order."""
        return self.proj(videos).flatten(2).transpose(1, 2)  # (B, N, D)
