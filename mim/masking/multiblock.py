"""Multi-block masking (Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture" (I-JEPA), CVPR 2023, official sampler facebookresearch/ijepa src/masks/multiblock.py; 3-D blocks as
in Bardes et al., "Revisiting Feature Prediction for Learning Visual Representations from Video" (V-JEPA), arXiv
2404.08471, 2024, facebookresearch/jepa src/masks/multiblock3d.py).

Per batch: one target block shape (t x h x w tokens) and one context block shape; per sample: M target blocks
and one context block at random positions. The context is the context block minus every target block.

Differences from the official I-JEPA sampler: every row, column and time slot can be covered;
``placement="overlap"`` (default) removes the corner deficit of uniform placement inside the grid; the visible
count K is fixed per batch from the block shapes alone, so it does not depend on the batch size (the official
sampler cuts every context to the batch minimum); scale, aspect and temporal extent are independent draws.
The placement rule, the formula for K and its statistics: docs/design.md, "Multi-block masking".

``sampler="official"`` reproduces the official I-JEPA sampler's statistics instead, for like-with-like comparisons:
one uniform draw for both the target scale and aspect, sides clamped to H - 1 and W - 1, placement with an exclusive
upper bound (the last row and column are never covered), the context square resampled until it keeps more than
``min_keep`` tokens outside the targets (20 tries, then the last target constraint is dropped, then the next one),
and every context cut to the batch minimum, keeping its lowest raster indices (so K depends on the batch size). It
costs one host sync per batch (K is the minimum of per-sample counts drawn on the device) and needs T = 1.

``context="complement"`` gives V-JEPA's masks (``src/masks/multiblock3d.py``): the target is the **union** of the M
blocks, as one group, and the context is every token outside it (no context block). The union's size varies per
sample; the official sampler cuts every sample's target and context lists to the batch minimum, keeping the lowest
raster indices (t-major: early frames keep their context, late frames lose their targets). Here the two counts are
fixed per batch from the block shape alone, without a host sync or a dependence on B: T and K are the
:data:`UNION_QUANTILE` quantiles of the union and complement sizes over random placements of that shape (computed
once per shape on the host with a fixed seed, :func:`union_counts`); each sample draws :data:`UNION_TRIES` candidate
placements and keeps the first whose union has at least T tokens and whose complement has at least K, then keeps a
random T of its union as targets and a random K of its complement as context. Targets and context never share a
token. Docs: docs/design.md, "Multi-block masking".
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mim.checks import check_choice, check_int, check_pair_range, invalid
from mim.masking.base import MaskingStrategy, host_random
from mim.types import Masks, TokenGrid, step_seed

__all__ = [
    "MultiBlockMasking",
    "block_indices",
    "block_shape",
    "official_block_shape",
    "official_context",
    "place_blocks",
    "union_counts",
]

Placement = Literal["overlap", "inside"]
Sampler = Literal["mim", "official"]
Context = Literal["block", "complement"]

UNION_QUANTILE = 0.05
"""``context="complement"``: T and K are this quantile of the union and complement sizes (V-JEPA's batch-minimum cut
at its 24 clips per GPU keeps about the 1/25 quantile)."""

UNION_TRIES = 8
"""``context="complement"``: candidate placements per sample; the first that reaches both counts is kept."""

UNION_SAMPLES = 1024
"""``context="complement"``: random placements behind the count quantiles of one block shape."""

_UNION_COUNTS: dict[tuple, tuple[int, int]] = {}

OFFICIAL_TRIES = 20
"""Failed context draws after which the official sampler drops one more target constraint (its ``timeout``)."""


def block_shape(grid_hw: tuple[int, int], n: int, aspect: float) -> tuple[int, int]:
    """I-JEPA's block shape for ``n = floor(H W scale)`` cells: ``h = round(sqrt(n a))``, ``w = round(sqrt(n / a))``.

    Sides are clamped to [1, H] and [1, W] (inclusive: a block may span the whole grid).
    """
    h_grid, w_grid = grid_hw
    h = min(max(round(math.sqrt(n * aspect)), 1), h_grid)
    w = min(max(round(math.sqrt(n / aspect)), 1), w_grid)
    return h, w


def official_block_shape(grid_hw: tuple[int, int], n: int, aspect: float) -> tuple[int, int]:
    """The official I-JEPA block shape: ``h = round(sqrt(n a))``, ``w = round(sqrt(n / a))``, then decremented while
    ``h >= H`` and ``w >= W`` (sides at most H - 1 and W - 1); floored at 1 (the official would loop forever on an
    empty block).
    """
    h_grid, w_grid = grid_hw
    h, w = round(math.sqrt(n * aspect)), round(math.sqrt(n / aspect))
    return max(min(h, h_grid - 1), 1), max(min(w, w_grid - 1), 1)


def official_context(
    targets: Tensor,
    side: tuple[int, int],
    grid: TokenGrid,
    *,
    min_keep: int,
    generator: torch.Generator,
    tries: int = OFFICIAL_TRIES,
) -> Tensor:
    """The official I-JEPA context of every sample, before the batch-minimum cut (vectorised, no host sync).

    The official loop places the ch x cw context block with ``top ~ U{0, .., H - ch - 1}``, ``left ~ U{0, .., W - cw
    - 1}``, removes the first ``M - r`` target blocks from it and accepts when more than ``min_keep`` tokens remain;
    ``r`` (relaxations) starts at 0 and grows by one after every ``tries`` failed draws. Here the M * tries + 1
    candidate draws are made at once and the first accepted one is kept; the last candidate (no constraint left) is
    always accepted, where the official would loop forever if ch * cw <= min_keep. A relaxed sample's context may
    hold tokens of the dropped targets, as in the official sampler.

    Args:
        targets: (B, M, h*w) target block indices on a T = 1 grid.
        side: (ch, cw) context block shape, 1 <= ch <= H - 1, 1 <= cw <= W - 1.
        grid: the token grid (T = 1).
        min_keep: a context needs more than ``min_keep`` tokens.
        generator: the source of the positions (on ``targets.device``).
        tries: failed draws before the next relaxation (the official's 20).

    Returns:
        (B, N) bool, True where the token is in the sample's context.
    """
    b, m, _ = targets.shape
    h_grid, w_grid, n = grid.h, grid.w, grid.num_tokens
    ch, cw = side
    dev = targets.device
    # cover[:, k]: tokens of the first k targets, k = 0 .. M
    hit = torch.zeros(b, m, n, dtype=torch.int32, device=dev).scatter_(2, targets, 1)  # (B, M, N)
    cover = torch.cat([hit.new_zeros(b, 1, n), hit.cumsum(dim=1).clamp_(max=1)], dim=1)  # (B, M+1, N)
    # integral image: sums over any rectangle in four lookups
    table = cover.view(b, m + 1, h_grid, w_grid).cumsum(2).cumsum(3)  # (B, M+1, H, W)
    table = torch.nn.functional.pad(table, (1, 0, 1, 0))  # (B, M+1, H+1, W+1)
    attempts = m * tries + 1
    top = torch.randint(0, h_grid - ch, (b, attempts), generator=generator, device=dev)  # (B, A) exclusive bound
    left = torch.randint(0, w_grid - cw, (b, attempts), generator=generator, device=dev)  # (B, A)
    relaxed = (torch.arange(attempts, device=dev) // tries).clamp_(max=m)  # (A,) constraints dropped
    level = (m - relaxed).expand(b, -1)  # (B, A) targets still removed from the context
    flat = table.flatten(2)  # (B, M+1, (H+1)*(W+1))

    def corner(r: Tensor, c: Tensor) -> Tensor:
        index = (level * (h_grid + 1) + r) * (w_grid + 1) + c  # (B, A)
        return flat.flatten(1).gather(1, index)  # (B, A)

    covered = corner(top + ch, left + cw) - corner(top, left + cw) - corner(top + ch, left) + corner(top, left)
    accept = (ch * cw - covered) > min_keep  # (B, A)
    accept[:, -1] = True
    first = accept.int().argmax(dim=1, keepdim=True)  # (B, 1) the first accepted draw
    top, left, level = top.gather(1, first), left.gather(1, first), level.gather(1, first)  # (B, 1) each
    rows = torch.arange(h_grid, device=dev).view(1, -1, 1)
    cols = torch.arange(w_grid, device=dev).view(1, 1, -1)
    block = (rows >= top.unsqueeze(2)) & (rows < top.unsqueeze(2) + ch)  # (B, H, 1)
    block = block & (cols >= left.unsqueeze(2)) & (cols < left.unsqueeze(2) + cw)  # (B, H, W)
    removed = cover.gather(1, level.unsqueeze(2).expand(-1, -1, n)).squeeze(1).bool()  # (B, N)
    return block.flatten(1) & ~removed  # (B, N)


def place_blocks(
    size: int, extent: int, shape: tuple[int, ...], *, placement: Placement, generator: torch.Generator, device
) -> Tensor:
    """First coordinate of blocks of ``size`` cells along an axis of ``extent`` cells, in [0, extent - size].

    Args:
        size: block side along this axis, 1 <= size <= extent.
        extent: grid side along this axis.
        shape: shape of the returned tensor, e.g. (B, M).
        placement: "overlap": uniform over the extent + size - 1 overlapping offsets, shifted inside;
            "inside": uniform over the extent - size + 1 offsets inside the grid.

    Returns:
        int64 tensor of ``shape``.
    """
    if placement == "overlap":
        start = torch.randint(1 - size, extent, shape, generator=generator, device=device)
        return start.clamp_(0, extent - size)
    return torch.randint(0, extent - size + 1, shape, generator=generator, device=device)


def union_counts(
    grid: TokenGrid, block: tuple[int, int, int], num_blocks: int, placement: Placement
) -> tuple[int, int]:
    """(T, K) for ``context="complement"``: the :data:`UNION_QUANTILE` quantiles of the size of the union of
    ``num_blocks`` blocks of shape ``block`` and of its complement, over :data:`UNION_SAMPLES` random placements.

    Host-side (numpy) and deterministic (a fixed seed per shape), cached per shape: every rank and a resumed run get
    the same counts, and no device is involved. Each is at least 1.
    """
    key = (grid.shape, block, num_blocks, placement)
    if key not in _UNION_COUNTS:
        rng = np.random.default_rng(step_seed("union-counts", *grid.shape, *block, num_blocks, placement))
        shape = (UNION_SAMPLES, num_blocks)
        origin = []
        for size, extent in zip(block, grid.shape):
            if placement == "overlap":  # as place_blocks: uniform over the overlapping offsets, shifted inside
                origin.append(np.clip(rng.integers(1 - size, extent, shape), 0, extent - size))
            else:
                origin.append(rng.integers(0, extent - size + 1, shape))
        t0, top, left = origin  # (S, M) each
        bt, bh, bw = block
        offsets = (np.arange(bt)[:, None, None] * grid.h + np.arange(bh)[None, :, None]) * grid.w
        offsets = (offsets + np.arange(bw)[None, None, :]).ravel()  # (t*h*w,)
        cells = (((t0 * grid.h + top) * grid.w + left)[..., None] + offsets).reshape(UNION_SAMPLES, -1)  # (S, M*thw)
        member = np.zeros((UNION_SAMPLES, grid.num_tokens), dtype=bool)
        np.put_along_axis(member, cells, True, axis=1)
        sizes = member.sum(axis=1)  # (S,) union sizes
        t = int(np.quantile(sizes, UNION_QUANTILE, method="lower"))
        k = int(np.quantile(grid.num_tokens - sizes, UNION_QUANTILE, method="lower"))
        _UNION_COUNTS[key] = (max(t, 1), max(k, 1))
    return _UNION_COUNTS[key]


def block_indices(t0: Tensor, top: Tensor, left: Tensor, block: tuple[int, int, int], grid: TokenGrid) -> Tensor:
    """Raster indices of t x h x w blocks whose first cell is (t0, top, left).

    Args:
        t0, top, left: (...) int64 block origins.
        block: (t, h, w) block shape.
        grid: the token grid.

    Returns:
        (..., t*h*w) int64, sorted ascending (raster order within the block).
    """
    bt, bh, bw = block
    dev = t0.device
    dt = torch.arange(bt, device=dev).view(-1, 1, 1)
    dh = torch.arange(bh, device=dev).view(1, -1, 1)
    dw = torch.arange(bw, device=dev).view(1, 1, -1)
    offsets = ((dt * grid.h + dh) * grid.w + dw).flatten()  # (t*h*w,) ascending
    origin = (t0 * grid.h + top) * grid.w + left  # (...)
    return origin.unsqueeze(-1) + offsets  # (..., t*h*w)


class MultiBlockMasking(MaskingStrategy):
    """I-JEPA multi-block masking on image grids, V-JEPA-style 3-D blocks when the grid has T > 1.

    Targets are ``num_targets`` blocks of the same shape per batch, at independent positions per sample:
    ``targets`` (B, M, t*h*w), each group in raster order. ``visible`` (B, K) is the context (see
    docs/design.md, "Multi-block masking", for how K is fixed per batch without depending on B). Targets may
    overlap each other; the context never contains a target token (with ``sampler="official"``: unless the
    official min-keep relaxation dropped that target, which the I-JEPA defaults never need on 14 x 14 or 16 x 16).

    Args:
        num_targets: M, target blocks per sample (I-JEPA: 4).
        target_scale: (lo, hi) fraction of the H x W frame a target block covers (I-JEPA: (0.15, 0.2)).
        target_aspect: (lo, hi) aspect ratio h / w of a target block (I-JEPA: (0.75, 1.5)).
        context_scale: (lo, hi) frame fraction of the context block, which is square (I-JEPA: (0.85, 1.0)).
        temporal_scale: (lo, hi) fraction of the T time slots a target block spans (V-JEPA: (1.0, 1.0)).
            The context block always spans all time slots.
        placement: "overlap" (default; no corner deficit) or "inside" (uniform inside the grid). Ignored by the
            official sampler, which places blocks with its exclusive upper bound.
        sampler: "mim" (default: the fixes above) or "official": the official I-JEPA sampler's statistics (Assran et
            al., CVPR 2023, facebookresearch/ijepa src/masks/multiblock.py; see the module docstring). The official
            mode needs T = 1 and H, W >= 2, ignores ``temporal_scale`` and costs one host sync per batch.
        min_keep: official sampler only: a context block keeps more than ``min_keep`` tokens outside the targets or
            is redrawn (I-JEPA configs: 10).
        context: ``block`` (I-JEPA: a context block minus the targets, M target groups) or ``complement`` (V-JEPA: the
            target is the union of the M blocks as one group, (B, 1, T), and the context is drawn from every token
            outside it; ``context_scale`` is unused; counts fixed per batch as the module docstring says). The
            complement needs ``sampler="mim"``.
    """

    def __init__(
        self,
        *,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        temporal_scale: tuple[float, float] = (1.0, 1.0),
        placement: Placement = "overlap",
        sampler: Sampler = "mim",
        min_keep: int = 10,
        context: Context = "block",
    ) -> None:
        owner = "MultiBlockMasking"
        self.num_targets = check_int(owner, "num_targets", num_targets)
        self.target_scale = check_pair_range(owner, "target_scale", target_scale, 0, 1, low_open=True)
        self.target_aspect = check_pair_range(owner, "target_aspect", target_aspect, 0, math.inf, low_open=True)
        self.context_scale = check_pair_range(owner, "context_scale", context_scale, 0, 1, low_open=True)
        self.temporal_scale = check_pair_range(owner, "temporal_scale", temporal_scale, 0, 1, low_open=True)
        self.placement: Placement = check_choice(owner, "placement", placement, ("overlap", "inside"))
        self.sampler: Sampler = check_choice(owner, "sampler", sampler, ("mim", "official"))
        self.min_keep = check_int(owner, "min_keep", min_keep, minimum=0)
        self.context: Context = check_choice(owner, "context", context, ("block", "complement"))
        if context == "complement" and sampler == "official":
            hint = "the official mode reproduces the 2-D I-JEPA sampler; V-JEPA's union masks have no official mode"
            raise invalid(owner, "sampler", "'mim' with context='complement'", sampler, hint=hint)

    # ------------------------------------------------------------------ per-batch sizes
    def _max_target_tokens(self, grid: TokenGrid) -> int:
        """The largest t*h*w any draw can give on ``grid`` (exact: h, w change only where a rounding flips)."""
        best = 1
        s_lo, s_hi = self.target_scale
        a_lo, a_hi = self.target_aspect
        for n in range(math.floor(grid.h * grid.w * s_lo), math.floor(grid.h * grid.w * s_hi) + 1):
            if n <= 0:
                continue
            flips = [(k + 0.5) ** 2 / n for k in range(grid.h + 1)] + [n / (k + 0.5) ** 2 for k in range(grid.w + 1)]
            points = sorted({a_lo, a_hi, *(a for a in flips if a_lo < a < a_hi)})
            probes = points + [(x + y) / 2 for x, y in zip(points, points[1:])]
            for a in probes:
                h, w = block_shape((grid.h, grid.w), n, a)
                best = max(best, h * w)
        return best * min(max(round(grid.t * self.temporal_scale[1]), 1), grid.t)

    def sizes(self, grid: TokenGrid, generator: torch.Generator) -> dict[str, int]:
        """Draw the per-batch shapes: target (t, h, w), context side c, and the visible count K.

        The shapes are Python integers that the tensor code needs on the host; they are drawn on the host, from a
        Python generator seeded from the mask generator (:func:`~mim.masking.base.host_random`), as the official sampler
        draws them from its per-iteration seed: no host sync.
        """
        if self.sampler == "official":
            return self._official_sizes(grid, generator)
        n_tok = grid.num_tokens
        if self.context == "block" and n_tok - self.num_targets * self._max_target_tokens(grid) < 1:
            raise ValueError(
                f"grid {grid.shape} is too small for num_targets={self.num_targets} blocks of target_scale "
                f"{self.target_scale}: no context token would be guaranteed; use a larger grid or fewer targets"
            )
        host = host_random(generator, "multiblock-sizes")
        u = [host.random() for _ in range(4)]

        def lerp(r: tuple[float, float], x: float) -> float:
            return r[0] + x * (r[1] - r[0])

        n_cells = math.floor(grid.h * grid.w * lerp(self.target_scale, u[0]))
        h, w = block_shape((grid.h, grid.w), n_cells, lerp(self.target_aspect, u[1]))
        t = min(max(round(grid.t * lerp(self.temporal_scale, u[2])), 1), grid.t)
        side = max(round(math.sqrt(math.floor(grid.h * grid.w * lerp(self.context_scale, u[3])))), 1)
        ch, cw = min(side, grid.h), min(side, grid.w)
        area = t * h * w
        if self.context == "complement":
            n_targets, k = union_counts(grid, (t, h, w), self.num_targets, self.placement)
            return {"t": t, "h": h, "w": w, "ch": ch, "cw": cw, "k": k, "targets": n_targets}
        context = grid.t * ch * cw
        k = min(round(context * (1 - area / n_tok) ** self.num_targets), n_tok - self.num_targets * area)
        return {"t": t, "h": h, "w": w, "ch": ch, "cw": cw, "k": max(k, 1)}

    def _official_sizes(self, grid: TokenGrid, generator: torch.Generator) -> dict[str, int]:
        """The official per-batch shapes: one uniform draw for the target scale *and* aspect, one for the context.

        ``k`` is absent: the official K is the batch minimum of the per-sample context counts.
        """
        if grid.t != 1 or grid.h < 2 or grid.w < 2:
            raise ValueError(
                f"MultiBlockMasking.sampler='official' reproduces the 2-D I-JEPA sampler and needs a grid (1, H, W) "
                f"with H, W >= 2, got {grid.shape}; use sampler='mim' for video or thin grids"
            )
        host = host_random(generator, "multiblock-sizes")
        u_target, u_context = host.random(), host.random()

        def lerp(r: tuple[float, float], x: float) -> float:
            return r[0] + x * (r[1] - r[0])

        hw = (grid.h, grid.w)
        n_cells = int(grid.h * grid.w * lerp(self.target_scale, u_target))
        h, w = official_block_shape(hw, n_cells, lerp(self.target_aspect, u_target))
        ch, cw = official_block_shape(hw, int(grid.h * grid.w * lerp(self.context_scale, u_context)), 1.0)
        return {"t": 1, "h": h, "w": w, "ch": ch, "cw": cw}

    def _official_call(self, batch_size: int, grid: TokenGrid, generator: torch.Generator, device) -> Masks:
        """The official sampler's masks; one host sync (the batch minimum of the context counts)."""
        s = self.sizes(grid, generator)
        b, m, n = batch_size, self.num_targets, grid.num_tokens
        top = torch.randint(0, grid.h - s["h"], (b, m), generator=generator, device=device)  # (B, M) exclusive bound
        left = torch.randint(0, grid.w - s["w"], (b, m), generator=generator, device=device)  # (B, M)
        targets = block_indices(torch.zeros_like(top), top, left, (1, s["h"], s["w"]), grid)  # (B, M, h*w)
        member = official_context(targets, (s["ch"], s["cw"]), grid, min_keep=self.min_keep, generator=generator)
        k = int(member.sum(dim=1).min())  # the one host sync: the batch minimum (the official collation cut)
        position = torch.arange(n, device=device).expand(b, -1)  # (B, N)
        key = torch.where(member, position, position + n)  # (B, N) context tokens first, in raster order
        visible = key.topk(k, dim=1, largest=False, sorted=True).values  # (B, K) the K lowest context indices
        return Masks(visible=visible, targets=targets, num_tokens=n)

    def _complement_call(self, s: dict[str, int], b: int, grid: TokenGrid, place, generator: torch.Generator) -> Masks:
        """V-JEPA's masks: the union of the blocks as one target group, the context from its complement."""
        m, n, a = self.num_targets, grid.num_tokens, UNION_TRIES
        n_targets, k = s["targets"], s["k"]
        t0, top, left = place(s["t"], grid.t, a * m), place(s["h"], grid.h, a * m), place(s["w"], grid.w, a * m)
        cells = block_indices(t0, top, left, (s["t"], s["h"], s["w"]), grid).view(b, a, -1)  # (B, A, M*t*h*w)
        member = torch.zeros(b, a, n, dtype=torch.bool, device=cells.device).scatter_(2, cells, True)  # (B, A, N)
        size = member.sum(dim=2)  # (B, A) union sizes of the candidates
        ok = (size >= n_targets) & (n - size >= k)  # (B, A)
        ok[:, -1] = True  # the last candidate is kept when none reached both counts
        first = ok.int().argmax(dim=1)  # (B,) the first candidate that did
        union = member[torch.arange(b, device=cells.device), first]  # (B, N)
        r = torch.rand(b, n, generator=generator, device=cells.device)  # (B, N)
        targets = (r + (~union).float()).topk(n_targets, dim=1, largest=False).indices.sort(dim=1).values  # (B, T)
        chosen = torch.zeros_like(union).scatter_(1, targets, True)  # (B, N)
        # complement first, then union tokens that are not targets; never a target (T + K <= N)
        key = r + union.float() + 2.0 * chosen.float()  # (B, N)
        visible = key.topk(k, dim=1, largest=False).indices.sort(dim=1).values  # (B, K)
        return Masks(visible=visible, targets=targets.unsqueeze(1), num_tokens=n)

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
        if self.sampler == "official":
            return self._official_call(batch_size, grid, generator, device)
        s = self.sizes(grid, generator)
        b, m, n = batch_size, self.num_targets, grid.num_tokens

        def place(size: int, extent: int, count: int) -> Tensor:
            return place_blocks(size, extent, (b, count), placement=self.placement, generator=generator, device=device)

        if self.context == "complement":
            return self._complement_call(s, b, grid, place, generator)

        # targets: M blocks per sample
        t0, top, left = place(s["t"], grid.t, m), place(s["h"], grid.h, m), place(s["w"], grid.w, m)  # (B, M) each
        targets = block_indices(t0, top, left, (s["t"], s["h"], s["w"]), grid)  # (B, M, t*h*w)

        # context block: all time slots, a ch x cw square per sample
        zero = torch.zeros(b, 1, dtype=torch.long, device=device)
        c_top, c_left = place(s["ch"], grid.h, 1), place(s["cw"], grid.w, 1)  # (B, 1) each
        context = block_indices(zero, c_top, c_left, (grid.t, s["ch"], s["cw"]), grid).squeeze(1)  # (B, C)

        # priority: random in [0, 1) inside the context block, [1, 2) elsewhere, 3 on targets; keep the K lowest
        priority = torch.rand(b, n, generator=generator, device=device) + 1.0  # (B, N)
        priority.scatter_(1, context, priority.gather(1, context) - 1.0)
        priority.scatter_(1, targets.reshape(b, -1), 3.0)
        keep = torch.topk(priority, s["k"], dim=1, largest=False, sorted=False).indices  # (B, K)
        visible = keep.sort(dim=1).values  # (B, K)
        return Masks(visible=visible, targets=targets, num_tokens=n)
