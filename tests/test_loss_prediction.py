"""HPM's loss predictor: the relative (ranking) loss and the standardised-MSE variant against brute force."""

from __future__ import annotations

import math

import torch

from mim.targets.loss_prediction import relative_loss, standardized_mse_loss


def _brute_relative(s: torch.Tensor, loss: torch.Tensor) -> float:
    """HPM's relative loss over ordered pairs of hidden patches as a double loop in plain Python (Wang et al., CVPR
    2023; official Haochen-Wang409/HPM models_mae_learn_loss.py ``forward_learning_loss``)."""
    num, den = 0.0, 0
    for n in range(s.shape[0]):
        for a in range(s.shape[1]):
            for b in range(s.shape[1]):
                p = 1 / (1 + math.exp(-(float(s[n, b]) - float(s[n, a]))))
                if loss[n, b] > loss[n, a]:
                    num, den = num - math.log(p + 1e-6), den + 1
                elif loss[n, b] < loss[n, a]:
                    num, den = num - math.log(1 - p + 1e-6), den + 1
    return num / den


def test_relative_loss_equals_double_loop_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 12, generator=g, dtype=torch.float64)
    loss = torch.randint(0, 5, (3, 12), generator=g).double()  # many ties
    assert abs(float(relative_loss(s, loss)) - _brute_relative(s, loss)) < 1e-9


def test_relative_loss_gradient_only_to_predictions():
    s = torch.randn(2, 6, requires_grad=True)
    loss = torch.rand(2, 6, requires_grad=True)
    relative_loss(s, loss).backward()
    assert s.grad is not None and bool(s.grad.abs().sum() > 0)
    assert loss.grad is None  # the reconstruction loss is a detached target


def test_relative_loss_prefers_correct_ranking():
    loss = torch.tensor([[0.1, 0.5, 0.9, 0.3]])
    right = relative_loss(loss * 100, loss)
    wrong = relative_loss(-loss * 100, loss)
    assert float(right) < 0.01 < 10 < float(wrong)  # -log(1e-6) = 13.8 caps a wrong pair


def test_relative_loss_all_tied_is_zero_not_nan():
    s = torch.randn(2, 5, requires_grad=True)
    out = relative_loss(s, torch.ones(2, 5))
    assert float(out) == 0.0
    out.backward()
    assert bool((s.grad == 0).all())


def test_standardized_mse_matches_formula():
    g = torch.Generator().manual_seed(1)
    s, loss = torch.randn(4, 9, generator=g), torch.rand(4, 9, generator=g)
    mean = loss.mean(1, keepdim=True)
    std = (((loss - mean) ** 2).sum(1, keepdim=True) / 8 + 1e-6).sqrt()
    expected = ((s - (loss - mean) / std) ** 2).mean()
    torch.testing.assert_close(standardized_mse_loss(s, loss), expected)
