"""Optimizer groups and the MAE warmup + cosine schedule.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022; official facebookresearch/mae
main_pretrain.py (AdamW, weight-decay groups) and util/lr_sched.py (per-iteration schedule). The official code decays
``cls_token`` and ``mask_token``; mmpretrain's MAE (open-mmlab/mmpretrain, ColorMAE's base) does not.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mim.models import MaskedEncoder
from mim.optim import param_groups, scaled_lr, warmup_cosine
from mim.targets import PixelTarget
from tests.reference import warmup_cosine_epochs


# ---------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    ("iters_per_epoch", "warmup_epochs", "epochs", "min_lr"),
    [(37, 4, 20, 0.0), (37, 4, 20, 1e-6), (10, 2.5, 9, 1e-5), (1251, 40, 400, 0.0)],
)
def test_warmup_cosine_matches_epoch_formula(
    iters_per_epoch: int, warmup_epochs: float, epochs: int, min_lr: float
) -> None:
    base = 2.4e-3
    warmup_steps = round(warmup_epochs * iters_per_epoch)
    total = epochs * iters_per_epoch
    mid = (warmup_steps + total) // 2
    for it in (0, warmup_steps // 2, warmup_steps - 1, warmup_steps, warmup_steps + 1, mid, total - 1):
        expected = warmup_cosine_epochs(
            it, iters_per_epoch=iters_per_epoch, warmup_epochs=warmup_epochs, epochs=epochs, base=base, min_lr=min_lr
        )
        got = warmup_cosine(it, warmup_steps=warmup_steps, total_steps=total, base_lr=base, min_lr=min_lr)
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), f"iteration {it}"


def test_warmup_cosine_landmarks() -> None:
    kw = dict(warmup_steps=10, total_steps=110, base_lr=1.0, min_lr=0.1)
    assert warmup_cosine(0, **kw) == 0.0  # the ramp starts at 0
    assert warmup_cosine(5, **kw) == pytest.approx(0.5)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)  # peak at the end of warmup
    assert warmup_cosine(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)  # ends at min_lr
    lrs = [warmup_cosine(s, **kw) for s in range(111)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_warmup_cosine_without_warmup() -> None:
    assert warmup_cosine(0, warmup_steps=0, total_steps=100, base_lr=1.0) == pytest.approx(1.0)
    assert warmup_cosine(50, warmup_steps=0, total_steps=100, base_lr=1.0) == pytest.approx(0.5)


@pytest.mark.parametrize(("blr", "eff", "lr"), [(1.5e-4, 4096, 2.4e-3), (1e-3, 256, 1e-3), (1.5e-4, 64, 3.75e-5)])
def test_scaled_lr(blr: float, eff: int, lr: float) -> None:
    assert scaled_lr(blr, eff) == pytest.approx(lr, rel=1e-12)


# ---------------------------------------------------------------------- parameter groups
@pytest.fixture(scope="module")
def model() -> nn.ModuleDict:
    torch.manual_seed(0)
    encoder = MaskedEncoder(
        arch="vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2},
    )
    target = PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    target.bind(encoder)
    return nn.ModuleDict({"encoder": encoder, "target": target})


def _special(model: nn.ModuleDict) -> set[str]:
    names = {f"encoder.{n}" for n in model["encoder"].no_weight_decay()}
    return names | {f"target.{n}" for n in model["target"].no_weight_decay()}


def _by_name(groups: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for group in groups:
        assert len(group["names"]) == len(group["params"])
        for name in group["names"]:
            assert name not in out, f"{name} is in two groups"
            out[name] = group["weight_decay"]
    return out


@pytest.mark.parametrize("decay_special", [True, False])
def test_param_groups(model: nn.ModuleDict, decay_special: bool) -> None:
    groups = param_groups(model, weight_decay=0.05, special_tokens=_special(model), decay_special_tokens=decay_special)
    wd = _by_name(groups)
    params = dict(model.named_parameters())
    # every trainable parameter in exactly one group (by identity), frozen ones in none
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in params.values() if p.requires_grad}
    for group in groups:  # the names label the right tensors
        assert all(p is params[n] for n, p in zip(group["names"], group["params"], strict=True))
    for name, p in params.items():
        assert (name in wd) == p.requires_grad, name
    assert "encoder.vit.pos_embed" not in wd and "target.decoder.decoder_pos_embed" not in wd
    # norms and biases (1-D) are never decayed
    for name, p in params.items():
        if p.requires_grad and (p.ndim == 1 or name.endswith(".bias")):
            assert wd[name] == 0.0, name
    for name in (
        "encoder.vit.blocks.0.norm1.weight",
        "encoder.vit.norm.bias",
        "encoder.vit.patch_embed.proj.bias",
        "target.decoder.decoder_norm.weight",
        "target.decoder.decoder_pred.bias",
    ):
        assert wd[name] == 0.0, name
    # matrices are decayed
    for name in (
        "encoder.vit.blocks.1.attn.qkv.weight",
        "encoder.vit.patch_embed.proj.weight",
        "target.decoder.decoder_embed.weight",
        "target.decoder.decoder_blocks.0.mlp.fc1.weight",
    ):
        assert wd[name] == 0.05, name
    # special tokens follow the switch: official MAE decays them, mmpretrain / ColorMAE do not
    expected = 0.05 if decay_special else 0.0
    assert wd["encoder.vit.cls_token"] == expected
    assert wd["target.decoder.mask_token"] == expected


def test_param_groups_count_every_element(model: nn.ModuleDict) -> None:
    groups = param_groups(model, weight_decay=0.1)
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_param_groups_on_toy_module() -> None:
    toy = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    toy.register_parameter("frozen", nn.Parameter(torch.zeros(2, 2), requires_grad=False))
    toy.register_parameter("token", nn.Parameter(torch.zeros(1, 1, 4)))
    wd = _by_name(param_groups(toy, weight_decay=0.3, special_tokens={"token"}, decay_special_tokens=False))
    assert wd == {"0.weight": 0.3, "0.bias": 0.0, "1.weight": 0.0, "1.bias": 0.0, "2.weight": 0.3, "token": 0.0}
    wd = _by_name(param_groups(toy, weight_decay=0.3, special_tokens={"token"}, decay_special_tokens=True))
    assert wd["token"] == 0.3


def test_adamw_accepts_groups(model: nn.ModuleDict) -> None:
    groups = param_groups(model, weight_decay=0.05, special_tokens=_special(model))
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert math.isclose(opt.param_groups[0]["lr"], 1e-3)


def test_ijepa_schedule_check_values() -> None:
    """The official I-JEPA schedulers' values (facebookresearch/ijepa src/utils/schedulers.py with
    configs/in1k_vith14_ep300.yaml: ipe 625, 300 epochs, warm-up 40 epochs).

    The official schedulers are stepped at the start of each iteration, so the spec's "step s" (the s-th iteration)
    runs at the schedule's point s: ``warmup_cosine(s)``, which ``PretrainModule(schedule_convention="ijepa")``
    applies at its 0-based optimizer step s - 1 (tests/test_schedules_official.py checks the whole loop).
    """
    from mim.optim import cosine_anneal

    total, warm = 187_500, 25_000
    kw = {"warmup_steps": warm, "total_steps": total, "base_lr": 1e-3, "min_lr": 1e-6, "start_lr": 2e-4}
    assert warmup_cosine(1, **kw) == pytest.approx(2.00032e-4, rel=1e-6)
    assert warmup_cosine(warm, **kw) == pytest.approx(1e-3)
    assert warmup_cosine(100_000, **kw) == pytest.approx(5.6071e-4, rel=1e-4)
    assert warmup_cosine(total, **kw) == pytest.approx(1e-6)
    wd = {"total_steps": total, "start": 0.04, "end": 0.4}
    assert cosine_anneal(1, **wd) == pytest.approx(0.04, abs=1e-6)
    assert cosine_anneal(warm, **wd) == pytest.approx(0.05556, abs=1e-5)
    assert cosine_anneal(100_000, **wd) == pytest.approx(0.23882, abs=1e-5)
    assert cosine_anneal(total, **wd) == pytest.approx(0.4)


def test_never_decay_wins_over_decay_special_tokens() -> None:
    """MaskAlign: the layer-mixing matrix is never decayed, while the cls token still is (decay_special_tokens)."""
    model = nn.ModuleDict({"mix": nn.Linear(4, 4, bias=False), "cls": nn.Linear(4, 4, bias=False)})
    decay, no_decay = param_groups(
        model, weight_decay=0.05, special_tokens={"cls.weight"}, decay_special_tokens=True, never_decay={"mix.weight"}
    )
    assert decay["names"] == ["cls.weight"] and no_decay["names"] == ["mix.weight"]
