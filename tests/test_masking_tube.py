"""TubeMasking (VideoMAE): contract, tube structure, exact counts, per-position statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mim.masking import RandomMasking, TubeMasking
from mim.masking.base import MaskingStrategy
from mim.types import TokenGrid
from tests.contracts import MaskingStrategyContract

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _official_num_masks_per_frame(grid: TokenGrid, mask_ratio: float) -> int:
    """MCG-NJU/VideoMAE masking_generator.py ``TubeMaskingGenerator.__init__`` (also OpenGVLab/VideoMAEv2):
    ``self.num_masks_per_frame = int(mask_ratio * self.num_patches_per_frame)``."""
    num_patches_per_frame = grid.h * grid.w
    return int(mask_ratio * num_patches_per_frame)


def _official_tube_mask(grid: TokenGrid, mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """``TubeMaskingGenerator.__call__`` (1 = masked), with the generator passed in instead of np.random."""
    num_patches_per_frame = grid.h * grid.w
    num_masks_per_frame = _official_num_masks_per_frame(grid, mask_ratio)
    mask_per_frame = np.hstack([np.zeros(num_patches_per_frame - num_masks_per_frame), np.ones(num_masks_per_frame)])
    rng.shuffle(mask_per_frame)
    return np.tile(mask_per_frame, (grid.t, 1)).flatten()  # (T*H*W,)


def _spatial_k(grid: TokenGrid, ratio: float, count: str = "videomae") -> int:
    """K_s: VideoMAE floors the hidden count; ``count="mae"`` floors the visible count (MAE's int(L * (1 - r)))."""
    hw = grid.h * grid.w
    return hw - _official_num_masks_per_frame(grid, ratio) if count == "videomae" else int(hw * (1 - ratio))


def _tube_k(grid: TokenGrid, ratio: float, count: str = "videomae") -> int:
    return grid.t * _spatial_k(grid, ratio, count)


class TestTubeMaskingContract(MaskingStrategyContract):
    strategy_cls = TubeMasking
    grids = [TokenGrid(8, 14, 14), TokenGrid(1, 14, 14), TokenGrid(3, 7, 5), TokenGrid(2, 2, 3)]
    targets_cover_hidden = True

    def make_strategy(self) -> TubeMasking:
        return TubeMasking(mask_ratio=0.75)

    def expected_num_visible(self, strategy: MaskingStrategy, grid: TokenGrid) -> int | None:
        assert isinstance(strategy, TubeMasking)
        return _tube_k(grid, strategy.mask_ratio, strategy.count)


class TestTubeMaskingContractDefault(TestTubeMaskingContract):
    grids = [TokenGrid(8, 14, 14), TokenGrid(2, 16, 16), TokenGrid(4, 4, 5)]

    def make_strategy(self) -> TubeMasking:
        return TubeMasking()


class TestTubeMaskingContractMaeCount(TestTubeMaskingContract):
    grids = [TokenGrid(8, 14, 14), TokenGrid(3, 7, 5), TokenGrid(2, 4, 4)]

    def make_strategy(self) -> TubeMasking:
        return TubeMasking(mask_ratio=0.9, count="mae")


def test_default_ratio_and_videomae_grid_counts() -> None:
    """ViT-B, 16 frames / tubelet 2 at 224 / 16: VideoMAE hides int(0.9 * 196) = 176 positions per slot, 160 visible."""
    strategy = TubeMasking()
    assert (strategy.mask_ratio, strategy.count) == (0.9, "videomae")
    grid = TokenGrid(16 // 2, 224 // 16, 224 // 16)
    masks = strategy(4, grid, generator=_gen(0), device=CPU)
    hidden_per_slot = int(0.9 * 196)  # the official num_masks_per_frame
    assert hidden_per_slot == 176
    assert masks.visible.shape == (4, 8 * (196 - 176)) == (4, 160)
    assert masks.targets.shape == (4, 1, 8 * 176) == (4, 1, 1408)
    assert masks.num_tokens == 1568
    assert masks.hidden.sum(dim=1).tolist() == [1408] * 4


def test_vit_g_grid_counts() -> None:
    """VideoMAE V2's ViT-g/14 (16 frames / tubelet 2 at 224 / 14 = 8x16x16): int(0.9 * 256) = 230 hidden, 208 visible."""
    grid = TokenGrid(8, 16, 16)
    masks = TubeMasking()(2, grid, generator=_gen(3), device=CPU)
    assert int(0.9 * 256) == 230
    assert masks.visible.shape == (2, 8 * (256 - 230)) == (2, 208)
    assert masks.hidden.sum(dim=1).tolist() == [8 * 230] * 2 == [1840] * 2


def test_mae_count_keeps_the_visible_floor() -> None:
    """count="mae": K_s = int(H*W * (1 - r)); 196 * 0.1 is 19.599... and 256 * 0.1 is 25.6 in float."""
    strategy = TubeMasking(mask_ratio=0.9, count="mae")
    assert int(196 * (1 - 0.9)) == 19 and int(256 * (1 - 0.9)) == 25
    assert strategy(2, TokenGrid(8, 14, 14), generator=_gen(0), device=CPU).visible.shape == (2, 152)
    assert strategy(2, TokenGrid(8, 16, 16), generator=_gen(0), device=CPU).visible.shape == (2, 200)


@pytest.mark.parametrize("grid", [TokenGrid(8, 14, 14), TokenGrid(8, 16, 16), TokenGrid(2, 7, 5), TokenGrid(4, 3, 3)])
def test_counts_match_the_official_generator(grid: TokenGrid) -> None:
    """Over a sweep of ratios, the default count equals the official TubeMaskingGenerator's, mask for mask."""
    rng = np.random.default_rng(0)
    for ratio in [r / 100 for r in range(5, 100, 5)] + [0.33, 0.66, 0.875, 0.95]:
        official = _official_tube_mask(grid, ratio, rng)  # (N,) 1 = masked
        if official.sum() == 0 or official.sum() == official.size:  # the official code allows an empty side
            with pytest.raises(ValueError, match="mask_ratio"):
                TubeMasking(mask_ratio=ratio).num_visible_spatial(grid)
            continue
        masks = TubeMasking(mask_ratio=ratio)(1, grid, generator=_gen(0), device=CPU)
        assert masks.visible.shape[1] == int((official == 0).sum()), ratio
        assert masks.targets.shape[2] == int(official.sum()), ratio


def test_bad_count_raises() -> None:
    with pytest.raises(ValueError, match=r"TubeMasking.count must be one of \('videomae', 'mae'\)"):
        TubeMasking(count="MAE")  # type: ignore[arg-type]


@pytest.mark.parametrize("count", ["videomae", "mae"])
@pytest.mark.parametrize(
    ("grid", "ratio"), [(TokenGrid(8, 14, 14), 0.9), (TokenGrid(4, 7, 5), 0.6), (TokenGrid(16, 2, 3), 0.5)]
)
def test_same_spatial_pattern_in_every_time_slot(grid: TokenGrid, ratio: float, count: str) -> None:
    masks = TubeMasking(mask_ratio=ratio, count=count)(16, grid, generator=_gen(1), device=CPU)  # type: ignore[arg-type]
    assert masks.visible.shape[1] == _tube_k(grid, ratio, count)
    hidden = masks.hidden.view(16, grid.t, grid.h * grid.w)  # (B, T, HW)
    assert bool((hidden == hidden[:, :1]).all()), "the spatial mask differs between time slots"
    # exact per-slot count; visible indices are the per-slot pattern offset by t*HW, sorted
    k_s = _spatial_k(grid, ratio, count)
    assert (~hidden).sum(dim=2).unique().tolist() == [k_s]
    vis = masks.visible.view(16, grid.t, k_s)  # (B, T, K_s)
    assert torch.equal(vis - vis[:, :1], (torch.arange(grid.t) * grid.h * grid.w).view(1, -1, 1).expand_as(vis))
    # targets: exactly the hidden tokens, sorted
    tgt = masks.targets[:, 0]
    assert bool((tgt[:, 1:] > tgt[:, :-1]).all())
    assert torch.equal(masks.hidden.nonzero()[:, 1].view(16, -1), tgt)


def test_equals_random_masking_on_single_frame_grid() -> None:
    """T = 1: the same generator stream and the same keep-K-lowest rule give RandomMasking's masks exactly, with
    count="mae" always and with the default count where the two counts agree (0.75 on 196: 49 visible both ways)."""
    grid = TokenGrid(1, 14, 14)
    for ratio, count in [(0.75, "mae"), (0.9, "mae"), (0.6, "mae"), (0.75, "videomae")]:
        a = TubeMasking(mask_ratio=ratio, count=count)(32, grid, generator=_gen(7), device=CPU)  # type: ignore[arg-type]
        b = RandomMasking(mask_ratio=ratio)(32, grid, generator=_gen(7), device=CPU)
        assert torch.equal(a.visible, b.visible) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize(
    ("ratio", "count", "k_s"),
    [(0.75, "videomae", 36 - int(0.75 * 36)), (0.9, "videomae", 36 - int(0.9 * 36)), (0.9, "mae", int(36 * 0.1))],
)
def test_per_position_frequency_uniform(ratio: float, count: str, k_s: int) -> None:
    """Each spatial position is visible with probability K_s / (H W), identically in every slot.

    At 0.9 on 6x6 the counts differ: VideoMAE hides int(32.4) = 32 (4 visible), MAE keeps int(3.6) = 3.
    """
    grid, draws, hw = TokenGrid(3, 6, 6), 20_000, 36
    masks = TubeMasking(mask_ratio=ratio, count=count)(draws, grid, generator=_gen(2024), device=CPU)  # type: ignore[arg-type]
    assert masks.visible.shape[1] == grid.t * k_s
    vis = (~masks.hidden).view(draws, grid.t, hw)  # (draws, T, HW)
    counts = vis[:, 0].sum(dim=0).double().numpy()  # (HW,)
    p = k_s / hw
    z = (counts - draws * p) / math.sqrt(draws * p * (1 - p))
    assert np.abs(z).max() < 5, f"spatial visible-frequency off by {np.abs(z).max():.1f} sigma"
    # fixed count per sample: stat * (n-1)/n ~ chi2(n-1)
    stat, dof = float((z**2).sum()) * (hw - 1) / hw, hw - 1
    assert abs(stat - dof) < 5 * math.sqrt(2 * dof), f"chi-square {stat:.1f} for {dof} dof"
    assert torch.equal(vis.sum(dim=0)[0], vis.sum(dim=0)[2])  # every slot counted identically
    # samples are independent: mean overlap of two samples' spatial masks is hypergeometric K_s^2 / HW
    overlap = (vis[0::2, 0] & vis[1::2, 0]).sum(dim=1).double()
    mean = k_s * k_s / hw
    var = k_s * (k_s / hw) * ((hw - k_s) / hw) * ((hw - k_s) / (hw - 1))
    assert abs(overlap.mean().item() - mean) < 5 * math.sqrt(var / overlap.numel())


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_mask_ratio_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        TubeMasking(mask_ratio=ratio)


def test_ratio_leaving_no_visible_or_no_hidden_position_raises() -> None:
    grid = TokenGrid(8, 2, 2)
    with pytest.raises(ValueError, match="mask_ratio"):
        TubeMasking(mask_ratio=0.9, count="mae")(2, grid, generator=_gen(0), device=CPU)  # int(4 * 0.1) = 0 visible
    with pytest.raises(ValueError, match="mask_ratio"):
        TubeMasking(mask_ratio=0.2)(2, grid, generator=_gen(0), device=CPU)  # int(0.2 * 4) = 0 hidden
    masks = TubeMasking(mask_ratio=0.9)(2, grid, generator=_gen(0), device=CPU)  # int(3.6) = 3 hidden, 1 visible
    assert masks.visible.shape == (2, 8)
