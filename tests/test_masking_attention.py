"""AttentionMasking (MaskAlign): contract, and the Gumbel-top-k sampler against sequential weighted sampling without
replacement (exact brute-force probabilities, torch.multinomial and numpy's choice as references)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mim.masking.attention import AttentionMasking, gumbel_topk_scores
from mim.types import TokenGrid
from tests.contracts import MaskingStrategyContract
from tests.syncs import count_host_syncs

CPU = torch.device("cpu")
WEIGHTS = torch.tensor([0.02, 0.08, 0.1, 0.15, 0.25, 0.4])  # N = 6, unequal and one near-zero
GRID = TokenGrid(1, 2, 3)
DRAWS = 40_000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestAttentionMaskingContract(MaskingStrategyContract):
    strategy_cls = AttentionMasking

    def make_strategy(self) -> AttentionMasking:
        return AttentionMasking()

    def make_scores(self, batch_size: int, grid: TokenGrid, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(batch_size, grid.num_tokens, generator=generator).softmax(dim=1)  # attention-like rows


class TestAttentionMaskingContractHalf(TestAttentionMaskingContract):
    def make_strategy(self) -> AttentionMasking:
        return AttentionMasking(mask_ratio=0.5)


def sequential_set_probabilities(weights: list[float], k: int) -> dict[frozenset[int], float]:
    """Exact P(visible set) of k sequential draws without replacement, each proportional to the remaining weights
    (torch.multinomial(replacement=False) / MaskAlign's ids_shuffle[:, :K]), by enumerating ordered sequences."""
    total = sum(weights)
    probs: dict[frozenset[int], float] = {}
    for seq in itertools.permutations(range(len(weights)), k):
        p, left = 1.0, total
        for i in seq:
            p *= weights[i] / left
            left -= weights[i]
        probs[frozenset(seq)] = probs.get(frozenset(seq), 0.0) + p
    return probs


def _draw(weights: torch.Tensor, draws: int, seed: int, mask_ratio: float = 0.5) -> torch.Tensor:
    """(draws, K) visible sets for one row of weights repeated ``draws`` times."""
    scores = weights.expand(draws, -1)
    return AttentionMasking(mask_ratio=mask_ratio)(draws, GRID, generator=_gen(seed), device=CPU, scores=scores).visible


def _set_counts(visible: torch.Tensor) -> dict[frozenset[int], int]:
    counts: dict[frozenset[int], int] = {}
    for row in visible.tolist():
        key = frozenset(row)
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_gumbel_scores_formula():
    w, u = torch.rand(3, 7) + 0.01, torch.rand(3, 7) * 0.98 + 0.01
    torch.testing.assert_close(gumbel_topk_scores(w, u), -(w.log() - torch.log(-torch.log(u))))


def test_inclusion_probabilities_match_sequential_sampling():
    """P(token i visible) over 40k seeded draws equals the exact sequential-sampling value within 5 sigma."""
    exact_sets = sequential_set_probabilities(WEIGHTS.tolist(), 3)
    inclusion = [sum(p for s, p in exact_sets.items() if i in s) for i in range(6)]
    assert math.isclose(sum(inclusion), 3.0, rel_tol=1e-9)
    visible = _draw(WEIGHTS, DRAWS, seed=0)
    observed = torch.zeros(6).index_add_(0, visible.flatten(), torch.ones(visible.numel())) / DRAWS
    for i, p in enumerate(inclusion):
        sigma = math.sqrt(p * (1 - p) / DRAWS)
        assert abs(float(observed[i]) - p) < 5 * sigma, f"token {i}: {float(observed[i]):.4f} vs exact {p:.4f}"
    # not the top-K and not uniform: the lightest token is sometimes kept, the heaviest sometimes hidden
    assert 0 < float(observed[0]) < float(observed[5]) < 1


def test_visible_set_distribution_matches_exact_probabilities():
    """Chi-square of the 20 possible visible sets against the brute-force probabilities."""
    stats = pytest.importorskip("scipy.stats")
    exact = sequential_set_probabilities(WEIGHTS.tolist(), 3)
    counts = _set_counts(_draw(WEIGHTS, DRAWS, seed=1))
    keys = sorted(exact, key=sorted)
    observed = np.array([counts.get(k, 0) for k in keys], dtype=float)
    expected = np.array([exact[k] for k in keys]) * DRAWS
    assert observed.sum() == DRAWS
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, df=len(keys) - 1) > 1e-4, chi2


def test_same_distribution_as_torch_multinomial_and_numpy_choice():
    """Two-sample chi-square tests against MaskAlign's sampler (torch.multinomial without replacement) and numpy's
    Generator.choice(replace=False, p=w): both are sequential weighted sampling."""
    stats = pytest.importorskip("scipy.stats")
    ours = _set_counts(_draw(WEIGHTS, DRAWS, seed=2))
    multinomial = torch.multinomial(WEIGHTS.expand(DRAWS, -1), 3, replacement=False, generator=_gen(3))
    rng = np.random.default_rng(4)
    p = (WEIGHTS / WEIGHTS.sum()).double().numpy()
    numpy_sets = torch.tensor(np.stack([rng.choice(6, 3, replace=False, p=p) for _ in range(DRAWS // 4)]))
    for name, reference in (("torch.multinomial", _set_counts(multinomial)), ("numpy", _set_counts(numpy_sets))):
        keys = sorted(set(ours) | set(reference), key=sorted)
        table = np.array([[ours.get(k, 0) for k in keys], [reference.get(k, 0) for k in keys]])
        pvalue = stats.chi2_contingency(table)[1]
        assert pvalue > 1e-4, f"differs from {name}: p = {pvalue:.2e}"


def test_rows_use_their_own_weights_and_scale_does_not_matter():
    n = GRID.num_tokens
    up, down = torch.arange(1.0, n + 1), torch.arange(float(n), 0, -1)
    scores = torch.stack([up, down]).repeat(DRAWS // 8, 1)  # (B, N): alternating rows
    masks = AttentionMasking(mask_ratio=0.5)(scores.shape[0], GRID, generator=_gen(5), device=CPU, scores=scores)
    hidden = masks.hidden.float()
    freq_up, freq_down = 1 - hidden[0::2].mean(0), 1 - hidden[1::2].mean(0)
    assert bool((freq_up[1:] > freq_up[:-1]).all()) and bool((freq_down[1:] < freq_down[:-1]).all())
    scaled = AttentionMasking(mask_ratio=0.5)(scores.shape[0], GRID, generator=_gen(5), device=CPU, scores=7 * scores)
    assert torch.equal(scaled.visible, masks.visible)


def test_zero_attention_stays_hidden_while_positive_tokens_remain():
    scores = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0]]).repeat(500, 1)
    masks = AttentionMasking(mask_ratio=0.5)(500, GRID, generator=_gen(6), device=CPU, scores=scores)
    assert torch.equal(masks.visible, torch.tensor([[1, 3, 4]]).expand(500, -1))


def test_scores_are_required_with_the_right_shape():
    strategy = AttentionMasking()
    with pytest.raises(ValueError, match=r"\(B, N\) = \(2, 6\)"):
        strategy(2, GRID, generator=_gen(0), device=CPU, scores=torch.rand(2, 5))
    with pytest.raises(ValueError, match="mask_ratio"):
        AttentionMasking(mask_ratio=1.0)
    assert AttentionMasking().mask_ratio == 0.7
    assert AttentionMasking()(2, TokenGrid(1, 14, 14), generator=_gen(0), device=CPU, scores=torch.rand(2, 196)).visible.shape == (2, 58)  # fmt: skip


def test_no_host_syncs():
    scores = torch.rand(8, 196).softmax(1)
    with count_host_syncs() as syncs:
        AttentionMasking()(8, TokenGrid(1, 14, 14), generator=_gen(0), device=CPU, scores=scores)
    assert syncs.count == 0, syncs.calls
