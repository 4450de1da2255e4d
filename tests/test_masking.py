"""RandomMasking (MAE): contract, visible-count arithmetic, sampler statistics, and the functional core."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mim.masking import RandomMasking, scores_to_masks
from mim.tokens import gather_tokens, scatter_tokens
from mim.types import Masks, TokenGrid, num_visible
from tests.contracts import MaskingStrategyContract
from tests.reference import hypergeometric_pmf


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestRandomMaskingContract(MaskingStrategyContract):
    strategy_cls = RandomMasking

    def make_strategy(self) -> RandomMasking:
        return RandomMasking(mask_ratio=0.75)


class TestRandomMaskingContractRatio06(MaskingStrategyContract):
    strategy_cls = RandomMasking
    grids = [TokenGrid(1, 14, 14), TokenGrid(1, 16, 16), TokenGrid(1, 3, 7)]

    def make_strategy(self) -> RandomMasking:
        return RandomMasking(mask_ratio=0.6)


# ------------------------------ visible-count arithmetic: K = int(N * (1 - r)), facebookresearch/mae models_mae.py
@pytest.mark.parametrize(
    ("side", "ratio", "k"),
    [(14, 0.75, 49), (14, 0.7, 58), (14, 0.6, 78), (14, 0.8, 39), (14, 0.9, 19), (14, 0.5, 98), (16, 0.75, 64)],
)
def test_visible_count_table(side: int, ratio: float, k: int) -> None:
    n = side * side
    masks = RandomMasking(mask_ratio=ratio)(2, TokenGrid(1, side, side), generator=_gen(0), device=torch.device("cpu"))
    assert masks.visible.shape == (2, k)
    assert masks.targets.shape == (2, 1, n - k)
    assert num_visible(n, ratio) == k


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_mask_ratio_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        RandomMasking(mask_ratio=ratio)


def test_ratio_leaving_no_visible_token_raises() -> None:
    strategy = RandomMasking(mask_ratio=0.9)  # N = 4 -> K = int(0.4) = 0
    with pytest.raises(ValueError, match="mask_ratio"):
        strategy(2, TokenGrid(1, 2, 2), generator=_gen(0), device=torch.device("cpu"))


# ---------------------------------------------------------------------- the boolean view
def test_hidden_true_exactly_at_non_visible() -> None:
    grid = TokenGrid(1, 5, 6)
    masks = RandomMasking(mask_ratio=0.7)(4, grid, generator=_gen(3), device=torch.device("cpu"))
    hidden = masks.hidden
    for b in range(4):
        vis = set(masks.visible[b].tolist())
        for n in range(grid.num_tokens):
            assert bool(hidden[b, n]) == (n not in vis)
    # hand-made example
    m = Masks(visible=torch.tensor([[0, 3], [1, 2]]), targets=torch.tensor([[[1, 2]], [[0, 3]]]), num_tokens=4)
    assert m.hidden.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert m.batch_size == 2


def test_masks_to_device_keeps_values() -> None:
    m = Masks(visible=torch.tensor([[0, 3]]), targets=torch.tensor([[[1, 2]]]), num_tokens=4)
    moved = m.to("cpu")
    assert torch.equal(moved.visible, m.visible) and torch.equal(moved.targets, m.targets)
    assert moved.decoder is None and moved.num_tokens == 4


def test_token_grid_validation() -> None:
    assert TokenGrid(2, 3, 4).num_tokens == 24
    for bad in ((0, 3, 4), (1, -1, 4), (1, 3, 2.5)):
        with pytest.raises(ValueError, match="TokenGrid"):
            TokenGrid(*bad)


# ---------------------------------------------------------------------- sampler statistics
GRID = TokenGrid(1, 8, 8)  # N = 64, r = 0.75 -> K = 16 exactly, hidden fraction exactly 0.75
DRAWS = 100_000


@pytest.fixture(scope="module")
def many_masks() -> Masks:
    return RandomMasking(mask_ratio=0.75)(DRAWS, GRID, generator=_gen(2024), device=torch.device("cpu"))


def test_every_position_hidden_with_frequency_mask_ratio(many_masks: Masks) -> None:
    n, p = GRID.num_tokens, 0.75
    counts = many_masks.hidden.sum(dim=0).double().numpy()  # (N,) times each position was hidden
    mean, sd = DRAWS * p, math.sqrt(DRAWS * p * (1 - p))
    z = (counts - mean) / sd
    assert np.abs(z).max() < 5, f"position hidden-frequency off by {np.abs(z).max():.1f} sigma"
    # Aggregate chi-square over positions. Per sample the hidden count is fixed, which scales the covariance by
    # N/(N-1) on an (N-1)-dimensional space: stat * (N-1)/N ~ chi2(N-1).
    stat = float((z**2).sum()) * (n - 1) / n
    dof = n - 1
    assert stat < dof + 5 * math.sqrt(2 * dof), f"chi-square {stat:.1f} for {dof} dof: positions not uniform"
    assert stat > dof - 5 * math.sqrt(2 * dof), f"chi-square {stat:.1f} for {dof} dof: suspiciously uniform"


def test_pairs_of_positions_jointly_visible_uniformly(many_masks: Masks) -> None:
    n, k = GRID.num_tokens, 16
    vis = (~many_masks.hidden).double()  # (DRAWS, N)
    joint = (vis.T @ vis).numpy()  # (N, N) times both i and j were visible
    p = k * (k - 1) / (n * (n - 1))  # uniform K-subset: P(i and j visible)
    off = ~np.eye(n, dtype=bool)
    z = (joint[off] - DRAWS * p) / math.sqrt(DRAWS * p * (1 - p))
    assert np.abs(z).max() < 5.5, f"pair co-visibility off by {np.abs(z).max():.1f} sigma"


def test_masks_of_different_samples_are_independent(many_masks: Masks) -> None:
    """|V_i ∩ V_j| for independent uniform K-subsets follows Hypergeometric(N, K, K)."""
    n, k = GRID.num_tokens, 16
    vis = ~many_masks.hidden
    a, b = vis[0::2], vis[1::2]  # disjoint pairs of samples (sample 2i with 2i+1)
    overlap = (a & b).sum(dim=1).numpy()  # (DRAWS/2,)
    pairs = overlap.shape[0]
    mean = k * k / n
    var = k * (k / n) * ((n - k) / n) * ((n - k) / (n - 1))
    z = (overlap.mean() - mean) / math.sqrt(var / pairs)
    assert abs(z) < 5, f"mean overlap {overlap.mean():.3f} vs hypergeometric {mean:.3f} ({z:.1f} sigma)"
    # whole distribution: chi-square against the hypergeometric pmf (bins with expectation >= 5, tail pooled)
    observed = np.bincount(overlap, minlength=k + 1).astype(float)
    expected = np.array([pairs * hypergeometric_pmf(x, n, k, k) for x in range(k + 1)])
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    assert stat < dof + 5 * math.sqrt(2 * dof), f"overlap distribution chi-square {stat:.1f} ({dof} dof)"
    # neighbours in the batch are not more alike than samples far apart
    far = (vis[: DRAWS // 2] & vis[DRAWS // 2 :]).sum(dim=1).double().mean().item()
    assert abs(far - mean) < 5 * math.sqrt(var / (DRAWS // 2))


def test_consecutive_batches_independent() -> None:
    """Two generators with neighbouring seeds (as steps s and s+1) give unrelated masks."""
    grid, n, k = TokenGrid(1, 14, 14), 196, 49
    a = ~RandomMasking(mask_ratio=0.75)(2000, grid, generator=_gen(10), device=torch.device("cpu")).hidden
    b = ~RandomMasking(mask_ratio=0.75)(2000, grid, generator=_gen(11), device=torch.device("cpu")).hidden
    overlap = (a & b).sum(dim=1).double()
    mean = k * k / n
    var = k * (k / n) * ((n - k) / n) * ((n - k) / (n - 1))
    assert abs(overlap.mean().item() - mean) < 5 * math.sqrt(var / 2000)


# ---------------------------------------------------------------------- functional core
def test_scores_to_masks_keeps_k_lowest() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7], [0.2, 0.8, 0.4, 0.6, 0.0]])
    masks = scores_to_masks(scores, 2)
    assert masks.visible.tolist() == [[1, 3], [0, 4]]
    assert masks.targets.tolist() == [[[0, 2, 4]], [[1, 2, 3]]]
    assert masks.num_tokens == 5


def test_scores_to_masks_matches_sorting_loop() -> None:
    g = _gen(4)
    scores = torch.rand(16, 30, generator=g)
    masks = scores_to_masks(scores, 11)
    for b in range(16):
        ranked = sorted(range(30), key=lambda i: float(scores[b, i]))
        assert masks.visible[b].tolist() == sorted(ranked[:11])
        assert masks.targets[b, 0].tolist() == sorted(ranked[11:])


def test_scores_to_masks_ties_broken_by_index() -> None:
    masks = scores_to_masks(torch.zeros(2, 6), 2)
    assert masks.visible.tolist() == [[0, 1], [0, 1]]


def test_gather_and_scatter_tokens() -> None:
    g = _gen(5)
    x = torch.randn(3, 7, 4, generator=g)
    index = torch.tensor([[0, 6], [2, 3], [5, 1]])
    out = gather_tokens(x, index)
    assert out.shape == (3, 2, 4)
    for b in range(3):
        for j in range(2):
            assert torch.equal(out[b, j], x[b, index[b, j]])
    base = torch.zeros(3, 7, 4)
    src = torch.randn(3, 2, 4, generator=g, requires_grad=True)
    placed = scatter_tokens(base, index, src)
    for b in range(3):
        for n in range(7):
            hits = (index[b] == n).nonzero().flatten().tolist()
            expected = src[b, hits[0]] if hits else base[b, n]
            assert torch.equal(placed[b, n], expected)
    assert torch.equal(base, torch.zeros(3, 7, 4)), "scatter_tokens modified its input"
    placed.sum().backward()
    assert torch.equal(src.grad, torch.ones_like(src))
