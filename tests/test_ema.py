"""EMA: one step is m * ema + (1 - m) * online for parameters (not buffers); HPM's momentum schedule."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from mim.ema import EMA, ema_momentum


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_one_step_matches_formula():
    online = _net()
    ema = EMA(online)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    buffers_before = [b.clone() for b in ema.module.buffers()]
    with torch.no_grad():
        online[1].running_mean.add_(5.0)  # an online buffer change must not reach the EMA
    m = 0.9
    ema.update(online, m)
    for e, t, o in zip(ema.module.parameters(), before, online.parameters()):
        torch.testing.assert_close(e, m * t + (1 - m) * o.detach(), rtol=1e-6, atol=1e-7)
    for b, b0 in zip(ema.module.buffers(), buffers_before):
        assert torch.equal(b, b0), "EMA.update changed a buffer"


def test_endpoints_and_online_untouched():
    online = _net()
    ema = EMA(online)
    with torch.no_grad():
        for p in online.parameters():
            p.mul_(2.0)
    snapshot = [p.detach().clone() for p in online.parameters()]
    kept = [p.clone() for p in ema.module.parameters()]
    ema.update(online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), kept))
    ema.update(online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), online.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), snapshot))


def test_frozen_eval_and_in_state_dict():
    online = _net()
    ema = EMA(online)
    assert not any(p.requires_grad for p in ema.parameters())
    ema.train()
    assert not ema.module.training, "the EMA copy must stay in eval mode"
    x = torch.randn(5, 4)
    torch.testing.assert_close(ema(x), ema(x))  # dropout off: deterministic
    holder = nn.Module()
    holder.ema = ema
    assert "ema.module.0.weight" in holder.state_dict()
    clone = pickle.loads(pickle.dumps(ema))
    assert all(torch.equal(a, b) for a, b in zip(clone.parameters(), ema.parameters()))


def test_errors():
    ema = EMA(_net())
    with pytest.raises(ValueError, match="momentum must be in"):
        ema.update(_net(), 1.5)
    with pytest.raises(ValueError, match="parameters"):
        ema.update(nn.Linear(2, 2), 0.5)


def test_hpm_momentum_schedule():
    """HPM: 0.999 + (e / 100) * (0.9999 - 0.999) for e < 100 of 800 epochs, then 0.9999 (Wang et al., "Hard Patches
    Mining for Masked Image Modeling", CVPR 2023; official Haochen-Wang409/HPM engine_pretrain.py)."""
    kw = {"start": 0.999, "end": 0.9999, "ramp": 100 / 800}
    for epoch in (0, 50, 99, 100, 400, 799):
        expected = 0.999 + (epoch / 100) * (0.9999 - 0.999) if epoch < 100 else 0.9999
        assert ema_momentum(epoch / 800, **kw) == pytest.approx(expected, abs=1e-12)
    assert ema_momentum(0.3, start=0.996, end=1.0, ramp=1.0) == pytest.approx(0.996 + 0.3 * 0.004)
    assert ema_momentum(0.0, start=0.5, end=0.9, ramp=0.0) == 0.9
