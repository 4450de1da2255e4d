"""HardPatchMasking (HPM): contract, the easy-to-hard schedule, hard tokens always hidden, uniform random part."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mim.masking import HardPatchMasking
from mim.masking.hard_patch import epoch_index, hard_patch_scores, num_hard
from mim.types import TokenGrid
from tests.contracts import MaskingStrategyContract

CPU = torch.device("cpu")
GRID = TokenGrid(1, 14, 14)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestHardPatchMaskingContract(MaskingStrategyContract):
    strategy_cls = HardPatchMasking

    def make_strategy(self) -> HardPatchMasking:
        return HardPatchMasking(mask_ratio=0.75)


def test_schedule_matches_hpm():
    """alpha = 0.5 * progress; k = int(M * alpha): 0 at the start, int(147 * 0.5) = 73 at the end
    (Haochen-Wang409/HPM models_mae_learn_loss.py ``generate_mask``)."""
    s = HardPatchMasking(mask_ratio=0.75, max_hard_fraction=0.5)
    assert s.alpha(0.0) == 0.0 and s.alpha(1.0) == 0.5 and s.alpha(0.5) == 0.25
    assert s.alpha(2.0) == 0.5 and s.alpha(-1.0) == 0.0  # clamped
    k = s.num_visible(196)
    assert k == 49
    assert [num_hard(196, k, s.alpha(p)) for p in (0.0, 0.5, 1.0)] == [0, 36, 73]
    # HPM's per-epoch value 0.5 * (e + 1) / T at the last epoch is our progress 1
    t = 800
    assert num_hard(196, k, 0.5 * t / t) == 73


class TestHardPatchMaskingEpochContract(MaskingStrategyContract):
    strategy_cls = HardPatchMasking

    def make_strategy(self) -> HardPatchMasking:
        return HardPatchMasking(mask_ratio=0.75, ramp_every="epoch", epochs=4)


def _official_num_hard(epoch: int, total_epoch: int, num_tokens: int = 196, mask_ratio: float = 0.75) -> int:
    """``len_loss`` of HPM's ``generate_mask`` (Haochen-Wang409/HPM models_mae_learn_loss.py), verbatim maths:
    keep_ratio = float((epoch + 1) / total_epoch) * 0.5; int((L - len_keep) * keep_ratio)."""
    len_keep = int(num_tokens * (1 - mask_ratio))
    keep_ratio = float((epoch + 1) / total_epoch) * 0.5
    return int((num_tokens - len_keep) * keep_ratio)


@pytest.mark.parametrize("steps_per_epoch", [1, 3, 5004])  # 5004: ImageNet-1k at batch 256
def test_epoch_ramp_is_the_official_step_function(steps_per_epoch: int):
    """ramp_every='epoch': at every optimizer step k of epoch e (progress = k / (T * S), as PretrainModule.progress),
    k_hard equals the official int(147 * 0.5 * (e + 1) / T); T = 800: 0 up to e = 9, 1 from e = 10, 73 at the end.
    The first and last step of every epoch are checked (where floor(progress * T) could round to a neighbour)."""
    t = 800
    s = HardPatchMasking(mask_ratio=0.75, max_hard_fraction=0.5, ramp_every="epoch", epochs=t)
    total = t * steps_per_epoch
    for e in range(t):
        for k in (e * steps_per_epoch, (e + 1) * steps_per_epoch - 1):
            progress = min(1.0, k / max(1, total))
            assert epoch_index(progress, t) == e
            assert s.alpha(progress) == float((e + 1) / t) * 0.5
            assert num_hard(196, s.num_visible(196), s.alpha(progress)) == _official_num_hard(e, t)
    assert [_official_num_hard(e, t) for e in (0, 9, 10, 399, 799)] == [0, 0, 1, 36, 73]
    assert s.alpha(1.0) == 0.5  # after the last step: clamped to the last epoch


def test_step_ramp_is_unchanged_by_epochs():
    """ramp_every='step' (the default) ignores ``epochs``: alpha = 0.5 * progress."""
    s = HardPatchMasking(epochs=800)
    assert s.ramp_every == "step" and s.alpha(0.3) == 0.5 * 0.3


@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_hardest_tokens_always_hidden(progress: float):
    s = HardPatchMasking(mask_ratio=0.75)
    b, n = 64, GRID.num_tokens
    scores = torch.rand(b, n, generator=_gen(1))
    masks = s(b, GRID, generator=_gen(2), device=CPU, scores=scores, progress=progress)
    k = num_hard(n, s.num_visible(n), s.alpha(progress))
    hardest = torch.topk(scores, k, dim=1).indices if k else torch.empty(b, 0, dtype=torch.long)
    hidden = masks.hidden
    assert bool(hidden.gather(1, hardest).all()), "a predicted-hard token was left visible"
    assert masks.visible.shape == (b, 49)
    if progress == 1.0:
        assert k == 73
        # the visible tokens are never among the hardest half of the hidden budget
        assert not set(masks.visible[0].tolist()) & set(hardest[0].tolist())


def _official_like(scores: np.ndarray, k_vis: int, k_hard: int, rng: np.random.Generator) -> np.ndarray:
    """The per-sample loop of HPM's ``generate_mask`` (Haochen-Wang409/HPM models_mae_learn_loss.py), written out
    independently: returns hidden (B, N)."""
    b, n = scores.shape
    hidden = np.ones((b, n), dtype=bool)
    for i in range(b):
        order = np.argsort(-scores[i], kind="stable")
        rest = order[k_hard:].copy()
        rng.shuffle(rest)
        hidden[i, rest[:k_vis]] = False
    return hidden


def test_distribution_matches_the_per_sample_loop():
    """Same per-position hiding frequencies as the official per-sample algorithm, for fixed difficulty scores."""
    s = HardPatchMasking(mask_ratio=0.75)
    grid = TokenGrid(1, 6, 6)
    n, draws = grid.num_tokens, 4000
    scores = torch.rand(1, n, generator=_gen(3)).expand(draws, n).contiguous()  # one image, many draws
    progress = 0.6
    k_vis = s.num_visible(n)
    k_hard = num_hard(n, k_vis, s.alpha(progress))
    assert k_hard > 0
    ours = s(draws, grid, generator=_gen(4), device=CPU, scores=scores, progress=progress).hidden.float().mean(0)
    ref = _official_like(scores.numpy(), k_vis, k_hard, np.random.default_rng(0)).mean(0)
    hard = torch.topk(scores[0], k_hard).indices
    assert bool((ours[hard] == 1).all()) and bool((torch.from_numpy(ref)[hard] == 1).all())
    # every other token is hidden with probability (M - k) / (N - k)
    expected = (n - k_vis - k_hard) / (n - k_hard)
    rest = torch.ones(n, dtype=torch.bool)
    rest[hard] = False
    sd = (expected * (1 - expected) / draws) ** 0.5
    assert float((ours[rest] - expected).abs().max()) < 5 * sd
    assert float((torch.from_numpy(ref).float()[rest] - expected).abs().max()) < 5 * sd


def test_progress_zero_is_random_masking():
    """With alpha = 0 the scores are ignored: per-position frequency (N - K) / N, whatever the difficulty."""
    s = HardPatchMasking(mask_ratio=0.75)
    draws, n = 4000, GRID.num_tokens
    scores = torch.arange(n, dtype=torch.float32).expand(draws, n)  # strongly ordered difficulty
    freq = s(draws, GRID, generator=_gen(5), device=CPU, scores=scores, progress=0.0).hidden.float().mean(0)
    p = 147 / 196
    assert float((freq - p).abs().max()) < 5 * (p * (1 - p) / draws) ** 0.5


def test_hard_patch_scores_function():
    predicted = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    noise = torch.tensor([[0.2, 0.1, 0.4, 0.3]])
    assert torch.equal(hard_patch_scores(predicted, noise, 0), noise)
    out = hard_patch_scores(predicted, noise, 2)
    assert torch.equal(out, torch.tensor([[0.2, 2.0, 2.0, 0.3]]))


def test_validation():
    with pytest.raises(ValueError, match="max_hard_fraction"):
        HardPatchMasking(max_hard_fraction=1.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        HardPatchMasking(mask_ratio=1.0)
    with pytest.raises(ValueError, match="ramp_every"):
        HardPatchMasking(ramp_every="iteration")
    with pytest.raises(ValueError, match="epochs"):
        HardPatchMasking(ramp_every="epoch")
    with pytest.raises(ValueError, match="epochs"):
        HardPatchMasking(ramp_every="epoch", epochs=0)
    s = HardPatchMasking()
    with pytest.raises(ValueError, match=r"scores of shape \(B, N\) = \(2, 196\)"):
        s(2, GRID, generator=_gen(0), device=CPU, scores=torch.rand(2, 10))
