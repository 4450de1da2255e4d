"""Independent reference computations (NumPy, float64, explicit loops), written from the papers and the official code
named in each function.

Nothing here imports mim: these are the specification against which mim's tensor code is checked.
"""

from __future__ import annotations

import math

import numpy as np


def patchify_loop(images: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """(B, C, H, W) -> (B, N, ph*pw*C) by explicit loops (MAE's ``patchify``, facebookresearch/mae models_mae.py).

    Tokens in raster order ``k = gy * gw + gx``; inside a patch the channel varies fastest, then the column
    within the patch, then the row: ``index = (row * pw + col) * C + c``.
    """
    b, c, h, w = images.shape
    gh, gw = h // ph, w // pw
    out = np.empty((b, gh * gw, ph * pw * c), dtype=images.dtype)
    for n in range(b):
        for gy in range(gh):
            for gx in range(gw):
                k = gy * gw + gx
                for row in range(ph):
                    for col in range(pw):
                        for ch in range(c):
                            out[n, k, (row * pw + col) * c + ch] = images[n, ch, gy * ph + row, gx * pw + col]
    return out


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """MAE's 1-D table: omega_i = 1 / 10000**(i / (dim/2)); ``[sin(pos*omega), cos(pos*omega)]`` (dim values)."""
    half = dim // 2
    omega = 1.0 / 10000 ** (np.arange(half, dtype=np.float64) / half)
    angles = np.asarray(pos, dtype=np.float64).reshape(-1)[:, None] * omega[None, :]  # (L, dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, gh: int, gw: int, cls_token: bool = True) -> np.ndarray:
    """MAE's 2-D table: ``np.meshgrid(cols, rows)`` ('xy') makes grid[0] the column; first half encodes it.

    omega = 1/10000**(arange(E/4)/(E/4)); zero CLS row prepended; computed in float64, returned float32.
    """
    grid_h = np.arange(gh, dtype=np.float64)
    grid_w = np.arange(gw, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # two (gh, gw) arrays; grid[0] = column x, grid[1] = row y
    emb_x = sincos_1d(dim // 2, grid[0])  # (gh*gw, E/2), raster order
    emb_y = sincos_1d(dim // 2, grid[1])
    emb = np.concatenate([emb_x, emb_y], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb.astype(np.float32)


def hidden_mask_loop(visible: np.ndarray, num_tokens: int) -> np.ndarray:
    """(B, K) visible indices -> (B, N) float mask, 1 = hidden (MAE's ``mask``), by an explicit loop."""
    mask = np.ones((visible.shape[0], num_tokens))
    for b in range(visible.shape[0]):
        for k in visible[b]:
            mask[b, int(k)] = 0.0
    return mask


def norm_pix_reference(patches: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per patch: (x - mean) / sqrt(unbiased var + eps), divisor P - 1.

    MAE's ``norm_pix_loss`` (facebookresearch/mae models_mae.py ``forward_loss``).
    """
    p = patches.shape[-1]
    mean = patches.sum(axis=-1, keepdims=True) / p
    var = ((patches - mean) ** 2).sum(axis=-1, keepdims=True) / (p - 1)
    return (patches - mean) / np.sqrt(var + eps)


def mae_loss_reference(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """``l = mean_P (pred - target)^2``; ``loss = sum(mask * l) / sum(mask)``.

    MAE's loss (facebookresearch/mae models_mae.py ``forward_loss``).
    """
    per_token = ((pred - target) ** 2).mean(axis=-1)  # (B, N)
    return float((mask * per_token).sum() / mask.sum())


def warmup_cosine_epochs(
    it: int, *, iters_per_epoch: int, warmup_epochs: float, epochs: float, base: float, min_lr: float = 0.0
) -> float:
    """MAE's per-iteration schedule with a fractional epoch ``e = it / iters_per_epoch``.

    As in facebookresearch/mae util/lr_sched.py ``adjust_learning_rate``.
    """
    e = it / iters_per_epoch
    if e < warmup_epochs:
        return base * e / warmup_epochs
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs)))


def hypergeometric_pmf(k: int, population: int, successes: int, draws: int) -> float:
    """P(X = k) for X ~ Hypergeometric(population, successes, draws)."""
    return math.comb(successes, k) * math.comb(population - successes, draws - k) / math.comb(population, draws)


def tubelets_loop(videos: np.ndarray, pt: int, ph: int, pw: int) -> np.ndarray:
    """(B, C, T, H, W) -> (B, N, pt*ph*pw*C) by explicit loops: tokens time-major raster ``(gt*gh + gy)*gw + gx``;
    inside a tubelet ``index = ((dt * ph + row) * pw + col) * C + c`` (VideoMAE's (pixel, channel) layout)."""
    b, c, t, h, w = videos.shape
    gt, gh, gw = t // pt, h // ph, w // pw
    out = np.empty((b, gt * gh * gw, pt * ph * pw * c), dtype=videos.dtype)
    for n in range(b):
        for it in range(gt):
            for gy in range(gh):
                for gx in range(gw):
                    k = (it * gh + gy) * gw + gx
                    for dt in range(pt):
                        for row in range(ph):
                            for col in range(pw):
                                for ch in range(c):
                                    value = videos[n, ch, it * pt + dt, gy * ph + row, gx * pw + col]
                                    out[n, k, ((dt * ph + row) * pw + col) * c + ch] = value
    return out


def sincos_3d_uniform(dim: int, gt: int, gh: int, gw: int) -> np.ndarray:
    """V-JEPA's 3-D table with uniform power (facebookresearch/jepa src/models/utils/pos_embs.py): each axis
    ``2*ceil(dim/6)`` channels, concatenated (time, height, width), truncated to ``dim``; rows in time-major raster
    order."""
    width = 2 * math.ceil(dim / 6)
    rows = []
    for t in range(gt):
        for y in range(gh):
            for x in range(gw):
                parts = [sincos_1d(width, np.array([v]))[0] for v in (t, y, x)]
                rows.append(np.concatenate(parts)[:dim])
    return np.stack(rows).astype(np.float32)
