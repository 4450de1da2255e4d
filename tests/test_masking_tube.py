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


def _tube_k(grid: TokenGrid, ratio: float) -> int:
    return grid.t * int(grid.h * grid.w * (1 - ratio))


class TestTubeMaskingContract(MaskingStrategyContract):
    strategy_cls = TubeMasking
    grids = [TokenGrid(8, 14, 14), TokenGrid(1, 14, 14), TokenGrid(3, 7, 5), TokenGrid(2, 2, 3)]
    targets_cover_hidden = True

    def make_strategy(self) -> TubeMasking:
        return TubeMasking(mask_ratio=0.75)

    def expected_num_visible(self, strategy: MaskingStrategy, grid: TokenGrid) -> int | None:
        assert isinstance(strategy, TubeMasking)
        return _tube_k(grid, strategy.mask_ratio)


class TestTubeMaskingContractDefault(TestTubeMaskingContract):
    grids = [TokenGrid(8, 14, 14), TokenGrid(2, 16, 16), TokenGrid(4, 4, 5)]

    def make_strategy(self) -> TubeMasking:
        return TubeMasking()


def test_default_ratio_and_videomae_grid_counts() -> None:
    strategy = TubeMasking()
    assert strategy.mask_ratio == 0.9
    grid = TokenGrid(8, 14, 14)
    masks = strategy(4, grid, generator=_gen(0), device=CPU)
    k_s = int(196 * (1 - 0.9))  # 19 (196 * 0.1 is 19.599... in float); VideoMAE's int(0.9 * 196) form gives 20
    assert k_s == 19
    assert masks.visible.shape == (4, 8 * k_s) == (4, 152)
    assert masks.targets.shape == (4, 1, 1568 - 152)
    assert masks.num_tokens == 1568
    assert masks.hidden.sum(dim=1).tolist() == [1568 - 152] * 4


@pytest.mark.parametrize(
    ("grid", "ratio"), [(TokenGrid(8, 14, 14), 0.9), (TokenGrid(4, 7, 5), 0.6), (TokenGrid(16, 2, 3), 0.5)]
)
def test_same_spatial_pattern_in_every_time_slot(grid: TokenGrid, ratio: float) -> None:
    masks = TubeMasking(mask_ratio=ratio)(16, grid, generator=_gen(1), device=CPU)
    assert masks.visible.shape[1] == _tube_k(grid, ratio)
    hidden = masks.hidden.view(16, grid.t, grid.h * grid.w)  # (B, T, HW)
    assert bool((hidden == hidden[:, :1]).all()), "the spatial mask differs between time slots"
    # exact per-slot count; visible indices are the per-slot pattern offset by t*HW, sorted
    k_s = int(grid.h * grid.w * (1 - ratio))
    assert (~hidden).sum(dim=2).unique().tolist() == [k_s]
    vis = masks.visible.view(16, grid.t, k_s)  # (B, T, K_s)
    assert torch.equal(vis - vis[:, :1], (torch.arange(grid.t) * grid.h * grid.w).view(1, -1, 1).expand_as(vis))
    # targets: exactly the hidden tokens, sorted
    tgt = masks.targets[:, 0]
    assert bool((tgt[:, 1:] > tgt[:, :-1]).all())
    assert torch.equal(masks.hidden.nonzero()[:, 1].view(16, -1), tgt)


def test_equals_random_masking_on_single_frame_grid() -> None:
    """T = 1: the same generator stream and the same keep-K-lowest rule give RandomMasking's masks exactly."""
    grid = TokenGrid(1, 14, 14)
    for ratio in (0.75, 0.9, 0.6):
        a = TubeMasking(mask_ratio=ratio)(32, grid, generator=_gen(7), device=CPU)
        b = RandomMasking(mask_ratio=ratio)(32, grid, generator=_gen(7), device=CPU)
        assert torch.equal(a.visible, b.visible) and torch.equal(a.targets, b.targets)


def test_per_position_frequency_uniform() -> None:
    """Each spatial position is visible with probability K_s / (H W), identically in every slot."""
    grid, ratio, draws = TokenGrid(3, 6, 6), 0.75, 20_000
    hw, k_s = 36, 9
    masks = TubeMasking(mask_ratio=ratio)(draws, grid, generator=_gen(2024), device=CPU)
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


def test_ratio_leaving_no_visible_position_raises() -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        TubeMasking(mask_ratio=0.9)(2, TokenGrid(8, 2, 2), generator=_gen(0), device=CPU)  # int(0.4) = 0
