"""MultiBlockMasking (I-JEPA 2-D, V-JEPA-style 3-D): contract, block geometry, coverage, batch-size independence."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from mim.masking import MultiBlockMasking, RandomMasking
from mim.masking.base import stream_position
from mim.masking.multiblock import block_indices, block_shape
from mim.types import Masks, TokenGrid
from tests.contracts import MaskingStrategyContract
from tests.syncs import count_host_syncs

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestMultiBlockMaskingContract(MaskingStrategyContract):
    strategy_cls = MultiBlockMasking
    grids = [TokenGrid(1, 14, 14), TokenGrid(1, 16, 16), TokenGrid(2, 8, 8), TokenGrid(1, 12, 10)]

    def make_strategy(self) -> MultiBlockMasking:
        return MultiBlockMasking()


class TestMultiBlockMaskingContract3D(MaskingStrategyContract):
    strategy_cls = MultiBlockMasking
    grids = [TokenGrid(8, 14, 14), TokenGrid(4, 8, 8), TokenGrid(2, 6, 7)]

    def make_strategy(self) -> MultiBlockMasking:
        return MultiBlockMasking(num_targets=2, temporal_scale=(0.5, 1.0), placement="inside")


def _draw_batches(strategy: MultiBlockMasking, grid: TokenGrid, batches: int, batch_size: int, seed: int = 0):
    for i in range(batches):
        yield strategy(batch_size, grid, generator=_gen(seed * 100_003 + i), device=CPU)


def _coords(idx: torch.Tensor, grid: TokenGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return idx // (grid.h * grid.w), (idx // grid.w) % grid.h, idx % grid.w


def _block_dims(masks: Masks, grid: TokenGrid) -> tuple[int, int, int]:
    """Check every target group is a full t x h x w box of one shape; return that shape."""
    t, h, w = _coords(masks.targets, grid)  # (B, M, T) each
    ext = [(c.amax(dim=2) - c.amin(dim=2) + 1) for c in (t, h, w)]  # (B, M) each
    dims = tuple(int(e.flatten()[0]) for e in ext)
    for e, d in zip(ext, dims):
        assert bool((e == d).all()), "target blocks of one batch differ in shape"
    count = masks.targets.shape[2]
    assert count == dims[0] * dims[1] * dims[2], "a target group is not a full box"
    srt = masks.targets.sort(dim=2).values
    assert bool((srt[..., 1:] > srt[..., :-1]).all()), "duplicate tokens in a target group"
    assert torch.equal(srt, masks.targets), "target group not in raster order"
    return dims  # type: ignore[return-value]


# ---------------------------------------------------------------------- block geometry
def _shape_feasible(h: int, w: int, hw_grid: tuple[int, int], scale, aspect) -> bool:
    """Some n in [floor(HW s_lo), floor(HW s_hi)] and aspect a in range round to (h, w); independent of block_shape."""
    area = hw_grid[0] * hw_grid[1]
    for n in range(math.floor(area * scale[0]), math.floor(area * scale[1]) + 1):
        lo = max(aspect[0], (h - 0.5) ** 2 / n, n / (w + 0.5) ** 2)
        hi = min(aspect[1], (h + 0.5) ** 2 / n, n / (w - 0.5) ** 2 if w > 0.5 else math.inf)
        if lo <= hi:
            return True
    return False


@pytest.mark.parametrize("grid", [TokenGrid(1, 14, 14), TokenGrid(1, 16, 16), TokenGrid(1, 12, 20)])
def test_target_blocks_are_boxes_within_scale_and_aspect(grid: TokenGrid) -> None:
    strategy = MultiBlockMasking()
    shapes = set()
    for masks in _draw_batches(strategy, grid, 300, 4):
        t, h, w = _block_dims(masks, grid)
        assert t == 1
        shapes.add((h, w))
        assert _shape_feasible(h, w, (grid.h, grid.w), strategy.target_scale, strategy.target_aspect), (h, w)
        # loose, rounding-tolerant ranges
        assert 0.1 <= h * w / (grid.h * grid.w) <= 0.27 and 0.5 <= h / w <= 2.0
    # independent scale and aspect draws: many shapes (I-JEPA's shared draw gives about 6 on 16 x 16)
    assert len(shapes) >= 8, shapes


def test_block_shape_formula() -> None:
    assert block_shape((14, 14), math.floor(196 * 0.15), 1.0) == (5, 5)  # n = 29, sqrt = 5.39
    assert block_shape((16, 16), 51, 1.5) == (9, 6)
    assert block_shape((4, 4), 16, 4.0) == (4, 2)  # h clamped to H (inclusive), not H - 1
    assert block_shape((4, 4), 0, 1.0) == (1, 1)


def test_3d_blocks_span_all_time_by_default() -> None:
    grid = TokenGrid(8, 14, 14)
    for masks in _draw_batches(MultiBlockMasking(), grid, 20, 4):
        t, _, _ = _block_dims(masks, grid)
        assert t == 8
    for masks in _draw_batches(MultiBlockMasking(temporal_scale=(0.5, 0.5)), grid, 20, 4):
        t, _, _ = _block_dims(masks, grid)
        assert t == 4
    # short blocks reach the first and the last time slot
    tt = torch.cat(
        [
            _coords(m.targets, grid)[0].flatten()
            for m in _draw_batches(MultiBlockMasking(temporal_scale=(0.25, 0.25)), grid, 50, 8)
        ]
    )
    assert int(tt.min()) == 0 and int(tt.max()) == 7


# ---------------------------------------------------------------------- coverage of the grid
@pytest.fixture(scope="module")
def coverage() -> dict[str, torch.Tensor]:
    """Per-position target-block counts (each block counted once) on 14 x 14 for both placements."""
    grid = TokenGrid(1, 14, 14)
    out = {}
    for placement in ("overlap", "inside"):
        counts = torch.zeros(grid.num_tokens, dtype=torch.float64)
        for masks in _draw_batches(MultiBlockMasking(placement=placement), grid, 400, 16, seed=1):
            counts += torch.bincount(masks.targets.flatten(), minlength=grid.num_tokens).double()
        out[placement] = counts.view(14, 14)
    return out


def test_every_position_covered_including_last_row_and_column(coverage: dict[str, torch.Tensor]) -> None:
    for placement, c in coverage.items():
        assert bool((c > 0).all()), f"{placement}: some position is never a target"
        assert float(c[-1].min()) > 0 and float(c[:, -1].min()) > 0, f"{placement}: last row/column never covered"


def test_overlap_placement_has_no_corner_deficit(coverage: dict[str, torch.Tensor]) -> None:
    """'overlap': the corners are the least covered tokens, and nothing is covered 4x as often as a corner."""
    c = coverage["overlap"]
    corners = torch.stack([c[0, 0], c[0, -1], c[-1, 0], c[-1, -1]])
    ratio = (corners / float(c[6:8, 6:8].mean())).tolist()
    print(
        f"overlap placement: corner / centre coverage {[round(r, 3) for r in ratio]}, "
        f"max/min {float(c.max() / c.min()):.2f}"
    )
    assert float(corners.min()) > 0.95 * float(c.min())
    assert all(r > 0.5 for r in ratio), ratio
    assert float(c.max() / corners.mean()) < 4.0  # documented bound (2 - 2/h)(2 - 2/w)
    # symmetric under flips (no raster-order bias)
    for flipped in (c.flip(0), c.flip(1)):
        assert float(((c - flipped).abs() / c).max()) < 0.1


def test_overlap_placement_corner_equals_interior() -> None:
    """With H >= 2h + 1 a corner is covered exactly as often as any token h or more from every edge."""
    grid = TokenGrid(1, 14, 14)
    strategy = MultiBlockMasking(num_targets=4, target_scale=(0.1, 0.1), target_aspect=(1.0, 1.0))  # 4 x 4 blocks
    counts = torch.zeros(grid.num_tokens, dtype=torch.float64)
    for masks in _draw_batches(strategy, grid, 100, 64, seed=2):
        counts += torch.bincount(masks.targets.flatten(), minlength=grid.num_tokens).double()
    c = counts.view(14, 14)
    interior = c[4:10, 4:10]  # rows and columns h..H-1-h
    p = (4 / 17) ** 2  # per block: h / (H + h - 1) per axis
    blocks = 100 * 64 * 4
    sd = math.sqrt(blocks * p * (1 - p))
    for x in (c[0, 0], c[0, -1], c[-1, 0], c[-1, -1], interior.min(), interior.max()):
        assert abs(float(x) - blocks * p) < 5 * sd, (float(x), blocks * p)


def test_inside_placement_corner_deficit_documented(coverage: dict[str, torch.Tensor]) -> None:
    """'inside' (uniform top-left inside the grid): corner / centre = 1 / (h w), below 0.1 for these scales."""
    c = coverage["inside"]
    ratio = float(c[0, 0] / c[6:8, 6:8].mean())
    print(f"inside placement: corner / centre coverage {ratio:.3f}")
    assert 0.0 < ratio < 0.1


# ---------------------------------------------------------------------- the context
def test_context_disjoint_from_targets_and_fixed_count() -> None:
    grid = TokenGrid(1, 14, 14)
    strategy = MultiBlockMasking()
    for masks in _draw_batches(strategy, grid, 50, 32):
        vis = ~masks.hidden  # (B, N)
        assert not bool(vis.gather(1, masks.targets.flatten(1)).any()), "a context token is also a target"
        _, h, w = _block_dims(masks, grid)
        a = h * w
        assert masks.visible.shape[1] <= grid.num_tokens - 4 * a
        assert bool((masks.visible[:, 1:] > masks.visible[:, :-1]).all())


def _context_fractions(batch_size: int, batches: int, grid: TokenGrid) -> torch.Tensor:
    strategy = MultiBlockMasking()
    return torch.tensor(
        [m.visible.shape[1] / grid.num_tokens for m in _draw_batches(strategy, grid, batches, batch_size, seed=3)]
    )


def test_context_fraction_independent_of_batch_size() -> None:
    """K depends on the block shapes drawn for the batch, never on B (the official batch-minimum cut does)."""
    grid = TokenGrid(1, 14, 14)
    small, large = _context_fractions(8, 300, grid), _context_fractions(256, 300, grid)
    # same seeds -> same per-batch shapes -> identical K for B = 8 and B = 256
    assert torch.equal(small, large)
    # and across different seeds the distributions agree too
    other = torch.tensor([m.visible.shape[1] / 196 for m in _draw_batches(MultiBlockMasking(), grid, 300, 256, seed=4)])
    print(f"context fraction: B=8 mean {small.mean():.3f}, B=256 mean {large.mean():.3f} / {other.mean():.3f}")
    assert abs(float(small.mean() - other.mean())) < 5 * float(small.std()) / math.sqrt(300) * math.sqrt(2)
    assert 0.2 < float(small.mean()) < 0.4


def test_context_has_no_raster_bias() -> None:
    """Visible tokens are spread over the grid: mean row and column of the context are central, every corner is used."""
    grid = TokenGrid(1, 14, 14)
    freq = torch.zeros(grid.num_tokens, dtype=torch.float64)
    total = 0
    for masks in _draw_batches(MultiBlockMasking(), grid, 200, 32, seed=5):
        freq += (~masks.hidden).double().sum(dim=0)
        total += masks.batch_size
    freq = (freq / total).view(14, 14)  # P(position is context)
    rows = torch.arange(14, dtype=torch.float64)
    mean_row = float((freq.sum(dim=1) * rows).sum() / freq.sum())
    mean_col = float((freq.sum(dim=0) * rows).sum() / freq.sum())
    assert abs(mean_row - 6.5) < 0.15 and abs(mean_col - 6.5) < 0.15, (mean_row, mean_col)
    corners = torch.stack([freq[0, 0], freq[0, -1], freq[-1, 0], freq[-1, -1]])
    print(
        f"context frequency: centre {float(freq[6:8, 6:8].mean()):.3f}, corners {[round(float(x), 3) for x in corners]}"
    )
    assert bool((corners > 0.1).all())


def test_context_prefers_context_block() -> None:
    """With a small context block the context lies in one c x c window except for a top-up of at most M t h w tokens."""
    grid = TokenGrid(1, 14, 14)
    strategy = MultiBlockMasking(num_targets=1, target_scale=(0.05, 0.05), context_scale=(0.25, 0.25))
    side = round(math.sqrt(math.floor(196 * 0.25)))  # 7
    topped_up = []
    for masks in _draw_batches(strategy, grid, 20, 16):
        _, h, w = _block_dims(masks, grid)
        k = masks.visible.shape[1]
        assert k < side * side
        vis = (~masks.hidden).double().view(-1, 1, 14, 14)  # (B, 1, H, W)
        best = torch.nn.functional.avg_pool2d(vis, side, stride=1).flatten(1).amax(1) * side * side  # (B,)
        outside = k - best.round()
        assert bool((outside >= 0).all()) and bool((outside <= h * w).all())
        topped_up.append(outside)
    print(f"context top-up outside the block: mean {torch.cat(topped_up).mean():.2f} tokens per sample")


# ---------------------------------------------------------------------- validation and speed
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_targets": 0}, "num_targets"),
        ({"num_targets": 2.0}, "num_targets"),
        ({"target_scale": (0.2, 0.1)}, "target_scale"),
        ({"target_scale": (0.0, 0.1)}, "target_scale"),
        ({"context_scale": (0.5, 1.5)}, "context_scale"),
        ({"target_aspect": (-1.0, 1.0)}, "target_aspect"),
        ({"temporal_scale": (0.5, 1.2)}, "temporal_scale"),
        ({"placement": "centre"}, "placement"),
    ],
)
def test_bad_config_raises(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MultiBlockMasking(**kwargs)


def test_grid_too_small_raises() -> None:
    with pytest.raises(ValueError, match="too small"):
        MultiBlockMasking()(2, TokenGrid(1, 7, 5), generator=_gen(0), device=CPU)


def test_masks_are_drawn_without_host_syncs() -> None:
    """The per-batch shapes are Python integers drawn on the host (issue 13: I-JEPA had one sync per step)."""
    strategy = MultiBlockMasking()
    with count_host_syncs() as syncs:
        strategy(8, TokenGrid(1, 14, 14), generator=_gen(0), device=CPU)
    assert syncs.count == 0, syncs.calls


def test_stream_position_follows_the_generator() -> None:
    gen = _gen(5)
    start = stream_position(gen)
    torch.rand(3, generator=gen)
    assert stream_position(gen) != start
    gen.manual_seed(5)
    assert stream_position(gen) == start
    assert stream_position(_gen(6)) != start


def test_shapes_vary_between_draws_of_one_generator() -> None:
    """Successive batches from one generator get fresh block shapes (not one shape per seed)."""
    strategy, grid, gen = MultiBlockMasking(), TokenGrid(1, 14, 14), _gen(0)
    shapes = {_block_dims(strategy(2, grid, generator=gen, device=CPU), grid) for _ in range(40)}
    assert len(shapes) >= 4, shapes
    again = _gen(0)
    first = _block_dims(strategy(2, grid, generator=again, device=CPU), grid)
    assert first == _block_dims(strategy(2, grid, generator=_gen(0), device=CPU), grid)


def test_target_scale_draw_is_uniform() -> None:
    """The block area fraction n / HW, with n = floor(HW * U(0.15, 0.2)), has the mean of that floor (1000 seeds)."""
    strategy, grid = MultiBlockMasking(target_aspect=(1.0, 1.0)), TokenGrid(1, 40, 40)
    cells = torch.tensor([strategy.sizes(grid, _gen(i))["h"] ** 2 for i in range(1000)], dtype=torch.float64)
    fraction = cells / grid.num_tokens
    assert 0.15 - 0.02 <= float(fraction.min()) and float(fraction.max()) <= 0.2 + 0.02
    # squares of side round(sqrt(n)) for n uniform-ish in [240, 320]: the mean side is sqrt(280) = 16.7 +- rounding
    side = cells.sqrt()
    assert abs(float(side.mean()) - math.sqrt(0.175 * 1600)) < 0.25, float(side.mean())
    assert float(side.std()) > 0.5


def test_vectorised_speed_report() -> None:
    """Not a timing assert: prints µs per image for B = 256 next to RandomMasking measured in the same run."""
    grid, b, reps = TokenGrid(1, 14, 14), 256, 20
    results = {}
    for name, strategy in (("MultiBlockMasking", MultiBlockMasking()), ("RandomMasking", RandomMasking())):
        g = _gen(0)
        strategy(b, grid, generator=g, device=CPU)
        start = time.perf_counter()
        for _ in range(reps):
            strategy(b, grid, generator=g, device=CPU)
        results[name] = (time.perf_counter() - start) / reps / b * 1e6
    print(" | ".join(f"{k}: {v:.1f} us/image (B={b}, 14x14)" for k, v in results.items()))
    assert all(v > 0 for v in results.values())


# ---------------------------------------------------------------------- sampler="official" (I-JEPA's statistics)
class TestMultiBlockMaskingOfficialContract(MaskingStrategyContract):
    strategy_cls = MultiBlockMasking
    grids = [TokenGrid(1, 14, 14), TokenGrid(1, 16, 16)]  # the context never needs relaxing here (see below)

    def make_strategy(self) -> MultiBlockMasking:
        return MultiBlockMasking(sampler="official")


class TestMultiBlockMaskingOfficialContractNonSquare(MaskingStrategyContract):
    strategy_cls = MultiBlockMasking
    grids = [TokenGrid(1, 12, 10), TokenGrid(1, 9, 13)]

    def make_strategy(self) -> MultiBlockMasking:
        return MultiBlockMasking(num_targets=2, sampler="official")


def _official_shape(hw: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float], u: float):
    """facebookresearch/ijepa src/masks/multiblock.py ``_sample_block_size``, written out independently."""
    s = scale[0] + u * (scale[1] - scale[0])
    a = aspect[0] + u * (aspect[1] - aspect[0])  # the same u for scale and aspect
    n = int(hw[0] * hw[1] * s)
    h, w = int(round(math.sqrt(n * a))), int(round(math.sqrt(n / a)))
    while h >= hw[0]:
        h -= 1
    while w >= hw[1]:
        w -= 1
    return h, w


def _official_sample(hw, target, context, num_targets, min_keep, rng):
    """One sample of the official collator (per-sample loop, exclusive ``randint`` bound, min-keep retry with
    relaxation after 20 failures). Returns (sorted context cells as raster indices, target cell sets)."""
    (hh, ww), (h, w), (ch, cw) = hw, target, context
    blocks = []
    for _ in range(num_targets):
        top, left = rng.randrange(0, hh - h), rng.randrange(0, ww - w)
        blocks.append({r * ww + c for r in range(top, top + h) for c in range(left, left + w)})
    tries, timeout = 0, 20
    while True:
        top, left = rng.randrange(0, hh - ch), rng.randrange(0, ww - cw)
        ctx = {r * ww + c for r in range(top, top + ch) for c in range(left, left + cw)}
        for k in range(max(num_targets - tries, 0)):
            ctx -= blocks[k]
        if len(ctx) > min_keep:
            return sorted(ctx), blocks
        timeout -= 1
        if timeout == 0:
            tries, timeout = tries + 1, 20


def test_official_block_shape_distribution_matches_the_official_formulas() -> None:
    """One u for scale and aspect: a handful of shapes, with the frequencies of the official formulas (chi-square)."""
    for grid in (TokenGrid(1, 14, 14), TokenGrid(1, 16, 16)):
        strategy, draws = MultiBlockMasking(sampler="official"), 3000
        hw = (grid.h, grid.w)
        # reference: the shape is a step function of u; 200 000 equally spaced u give its probabilities to 1e-5
        reference: dict[tuple[int, int], float] = {}
        for i in range(200_000):
            shape = _official_shape(hw, strategy.target_scale, strategy.target_aspect, (i + 0.5) / 200_000)
            reference[shape] = reference.get(shape, 0.0) + 1 / 200_000
        observed: dict[tuple[int, int], int] = {}
        contexts = set()
        for i in range(draws):
            s = strategy.sizes(grid, _gen(i))
            observed[(s["h"], s["w"])] = observed.get((s["h"], s["w"]), 0) + 1
            contexts.add((s["ch"], s["cw"]))
        print(f"official shapes on {hw}: {sorted(reference)} (mim's default mode gives >= 8)")
        assert set(observed) <= set(reference), set(observed) - set(reference)
        stat = sum((observed.get(k, 0) - draws * p) ** 2 / (draws * p) for k, p in reference.items())
        assert _chi2_ok(stat, len(reference) - 1), (stat, observed, reference)
        assert len(reference) <= 8
        # context: side round(sqrt(floor(HW s))) clamped to H - 1: always (H - 1) x (W - 1) at these sizes
        assert contexts == {(grid.h - 1, grid.w - 1)}


def _chi2_ok(stat: float, dof: int, sigmas: float = 5.0) -> bool:
    """Normal approximation of the chi-square tail: stat within dof +- sigmas * sqrt(2 dof)."""
    return abs(stat - dof) < sigmas * math.sqrt(2 * dof)


def test_official_never_covers_last_row_or_column_and_places_uniformly() -> None:
    """Exclusive upper bound: P(last row or column covered) = 0; a row r is covered by an h-row block with
    probability #{top in [0, H - h - 1] : top <= r < top + h} / (H - h)."""
    grid = TokenGrid(1, 14, 14)
    strategy = MultiBlockMasking(target_scale=(0.1, 0.1), target_aspect=(1.0, 1.0), sampler="official")  # 4 x 4
    counts = torch.zeros(grid.num_tokens, dtype=torch.float64)
    context = torch.zeros(grid.num_tokens, dtype=torch.float64)
    batches, b = 60, 64
    for masks in _draw_batches(strategy, grid, batches, b, seed=7):
        assert _block_dims(masks, grid) == (1, 4, 4)
        counts += torch.bincount(masks.targets.flatten(), minlength=grid.num_tokens).double()
        context += (~masks.hidden).double().sum(dim=0)
    c, ctx = counts.view(14, 14), context.view(14, 14)
    assert float(c[-1].sum()) == 0 and float(c[:, -1].sum()) == 0, "the official sampler never covers row/col H-1"
    assert float(ctx[-1].sum()) == 0 and float(ctx[:, -1].sum()) == 0
    h, tops = 4, range(0, 14 - 4)  # randint(0, H - h): tops 0 .. H - h - 1
    p_axis = torch.tensor([sum(1 for t in tops if t <= r < t + h) / len(tops) for r in range(14)], dtype=torch.float64)
    p = p_axis[:, None] * p_axis[None, :]  # (H, W) exact coverage probability of one block
    blocks = batches * b * 4
    expected, sd = blocks * p, (blocks * p * (1 - p)).sqrt()
    z = ((c - expected) / sd.clamp(min=1e-9))[:-1, :-1]
    assert float(z.abs().max()) < 5, float(z.abs().max())


def test_official_context_share_after_collation_depends_on_batch_size() -> None:
    """The batch-minimum cut: mean K / N for B = 1 and B = 64 agrees with a direct simulation of the official
    collator (Python ``random``), and the larger batch keeps a much smaller context."""
    grid, rng = TokenGrid(1, 14, 14), random.Random(0)
    strategy = MultiBlockMasking(sampler="official")
    hw = (grid.h, grid.w)
    results = {}
    for b, batches in ((1, 600), (64, 60)):
        ours = torch.tensor(
            [m.visible.shape[1] / 196 for m in _draw_batches(strategy, grid, batches, b, seed=11)], dtype=torch.float64
        )
        ref = []
        for _ in range(batches):
            u, v = rng.random(), rng.random()
            target = _official_shape(hw, strategy.target_scale, strategy.target_aspect, u)
            context = _official_shape(hw, strategy.context_scale, (1.0, 1.0), v)
            ref.append(min(len(_official_sample(hw, target, context, 4, 10, rng)[0]) for _ in range(b)) / 196)
        ref_t = torch.tensor(ref, dtype=torch.float64)
        se = math.sqrt(float(ours.var()) / batches + float(ref_t.var()) / batches)
        print(f"official context share after collation, B={b}: mim {ours.mean():.3f}, reference {ref_t.mean():.3f}")
        assert abs(float(ours.mean() - ref_t.mean())) < 5 * se + 1e-3, (float(ours.mean()), float(ref_t.mean()))
        results[b] = float(ours.mean())
    assert results[1] > results[64] + 0.08, results


def test_official_context_is_the_lowest_raster_indices_of_each_context() -> None:
    """After the cut each sample keeps a prefix (in raster order) of its own context: its visible tokens hold no gap
    that the context block minus the targets would fill."""
    grid = TokenGrid(1, 14, 14)
    for masks in _draw_batches(MultiBlockMasking(sampler="official"), grid, 10, 32, seed=12):
        _, h, w = _block_dims(masks, grid)
        hidden_by_targets = torch.zeros(masks.batch_size, 196, dtype=torch.bool).scatter_(
            1, masks.targets.flatten(1), 1
        )
        last = masks.visible[:, -1:]  # (B, 1)
        rows, cols = torch.arange(196) // 14, torch.arange(196) % 14
        block = (rows < 13) & (cols < 13)  # at 14 x 14 the context block is the fixed top-left 13 x 13 square
        expected = block & ~hidden_by_targets & (torch.arange(196) <= last)  # (B, N)
        assert torch.equal(~masks.hidden, expected)


def test_official_min_keep_retry_and_relaxation_match_the_official_loop() -> None:
    """A tight configuration (8 x 8, four 3 x 3 targets, 6 x 6 context, min_keep 16): the per-sample context count and
    the share of contexts that, relaxed, hold target tokens agree with the official loop simulated in Python."""
    from mim.masking.multiblock import official_context

    grid, b, m, min_keep = TokenGrid(1, 8, 8), 4000, 4, 16
    gen = _gen(21)
    top = torch.randint(0, 8 - 3, (b, m), generator=gen)
    left = torch.randint(0, 8 - 3, (b, m), generator=gen)
    targets = block_indices(torch.zeros_like(top), top, left, (1, 3, 3), grid)  # (B, M, 9)
    member = official_context(targets, (6, 6), grid, min_keep=min_keep, generator=gen)  # (B, N)
    counts = member.sum(dim=1).double()
    leaked = member.gather(1, targets.flatten(1)).any(dim=1).double()  # relaxed contexts holding target tokens
    rng = random.Random(1)
    ref_counts, ref_leaked = [], []
    for _ in range(b):
        ctx, blocks = _official_sample((8, 8), (3, 3), (6, 6), m, min_keep, rng)
        ref_counts.append(len(ctx))
        ref_leaked.append(float(bool(set(ctx) & set().union(*blocks))))
    rc, rl = torch.tensor(ref_counts, dtype=torch.float64), torch.tensor(ref_leaked, dtype=torch.float64)
    print(
        f"min-keep retry: mean count {counts.mean():.2f} (reference {rc.mean():.2f}), relaxed with leaked target "
        f"tokens {leaked.mean():.3f} (reference {rl.mean():.3f})"
    )
    assert bool((counts > min_keep).all()) or bool((counts[counts <= min_keep] == 36).all())
    for ours, ref in ((counts, rc), (leaked, rl)):
        se = math.sqrt(float(ours.var()) / b + float(ref.var()) / b)
        assert abs(float(ours.mean() - ref.mean())) < 5 * se, (float(ours.mean()), float(ref.mean()))
    assert 0.05 < float(leaked.mean()) < 0.95  # the relaxation does happen in this configuration


def test_official_mode_costs_one_host_sync_and_needs_a_2d_grid() -> None:
    """K is the batch minimum of per-sample counts drawn on the device: one sync (the default mode has none)."""
    strategy = MultiBlockMasking(sampler="official")
    with count_host_syncs() as syncs:
        strategy(8, TokenGrid(1, 14, 14), generator=_gen(0), device=CPU)
    assert syncs.count == 1, syncs.calls
    for grid in (TokenGrid(2, 8, 8), TokenGrid(1, 1, 54)):
        with pytest.raises(ValueError, match="official"):
            strategy(2, grid, generator=_gen(0), device=CPU)


@pytest.mark.parametrize(("kwargs", "field"), [({"sampler": "ijepa"}, "sampler"), ({"min_keep": -1}, "min_keep")])
def test_bad_official_config_raises(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MultiBlockMasking(**kwargs)
