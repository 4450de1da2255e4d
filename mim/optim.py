"""Optimizer parameter groups and the per-iteration warmup + cosine schedule of MAE.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (Appendix A.1; official
facebookresearch/mae main_pretrain.py and util/lr_sched.py): AdamW with betas (0.9, 0.95); no weight decay on
1-D parameters (norms) and biases; frozen parameters (the sin-cos tables) are in no group; base lr = blr *
effective batch / 256; linear warmup from 0 then half-cosine to ``min_lr``, updated every optimizer step.
:class:`LARS` is the optimizer of MAE's linear probe (facebookresearch/mae util/lars.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from mim.checks import check_range

__all__ = ["LARS", "cosine_anneal", "layer_decay_groups", "param_groups", "scaled_lr", "warmup_cosine"]


def scaled_lr(blr: float, effective_batch: int) -> float:
    """Linear scaling rule: ``lr = blr * effective_batch / 256``."""
    return blr * effective_batch / 256


def warmup_cosine(
    step: int, *, warmup_steps: int, total_steps: int, base_lr: float, min_lr: float = 0.0, start_lr: float = 0.0
) -> float:
    """The learning rate at optimizer step ``step`` (0-based).

    ``lr = start + (base - start) * step / warmup`` during warmup (MAE: start 0; I-JEPA: start 2e-4, base 1e-3), then
    ``min + (base - min) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2``.
    """
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(
    module: nn.Module,
    *,
    weight_decay: float,
    special_tokens: Iterable[str] = (),
    decay_special_tokens: bool = True,
    never_decay: Iterable[str] = (),
) -> list[dict]:
    """Split trainable parameters into a decay and a no-decay group.

    No decay: every parameter with ``ndim <= 1`` (norms, biases of any shape) and every name ending in
    ``.bias``. ``special_tokens`` (cls / register / mask tokens, learned position embeddings) are decayed
    when ``decay_special_tokens`` is True (official MAE) and not decayed otherwise (mmpretrain, ColorMAE).
    ``never_decay`` names are never decayed (MaskAlign's layer-mixing matrix).
    Parameters with ``requires_grad=False`` are left out.

    Returns:
        Two param-group dicts: ``{"params", "weight_decay", "names", "decay"}`` (``decay`` marks the group whose
        weight decay a schedule updates).
    """
    special, never = set(special_tokens), set(never_decay)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name in never or (not decay_special_tokens and name in special)
        (no_decay if skip else decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "weight_decay": weight_decay, "names": [n for n, _ in decay], "decay": True},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0, "names": [n for n, _ in no_decay], "decay": False},
    ]


def layer_decay_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    *,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    layer_of: Callable[[str], int],
    no_weight_decay: Iterable[str] = (),
) -> list[dict]:
    """Parameter groups with layer-wise lr decay, as MAE's fine-tuning (facebookresearch/mae util/lr_decay.py).

    Each trainable parameter gets ``lr_scale = layer_decay ** (num_layers - layer_of(name))``: with ``num_layers =
    depth + 1`` the embeddings (layer 0) get ``ld^(depth+1)``, block ``i`` (layer ``i + 1``) ``ld^(depth-i)`` and the
    head and final norms (layer ``depth + 1``) 1. No weight decay for 1-D parameters and for ``no_weight_decay``
    names (position embeddings, cls and register tokens). One group per (layer, decay) pair.

    Args:
        named_parameters: (name, parameter) pairs, e.g. ``module.named_parameters()``.
        weight_decay: the decay of the decayed groups.
        layer_decay: the per-layer factor (MAE ViT-B: 0.65, ViT-L: 0.75); 1 gives every group scale 1.
        num_layers: depth + 1.
        layer_of: parameter name -> layer id in ``[0, num_layers]``.
        no_weight_decay: names never decayed.

    Returns:
        Param-group dicts ``{"params", "weight_decay", "lr_scale", "names", "decay", "layer"}``, ordered by layer.
    """
    skip = set(no_weight_decay)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        layer = layer_of(name)
        if not 0 <= layer <= num_layers:
            raise ValueError(f"layer_decay_groups: layer id {layer} of {name!r} is outside [0, {num_layers}]")
        decay = not (p.ndim == 1 or name in skip)
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers - layer),
                "decay": decay,
                "layer": layer,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def cosine_anneal(step: int, *, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps`` and later).

    ``end + (start - end) * (1 + cos(pi * min(1, step / total))) / 2``. I-JEPA's weight decay *increases* this way
    from 0.04 to 0.4 over training (facebookresearch/ijepa configs/in1k_vith14_ep300.yaml).
    """
    progress = min(1.0, max(step, 0) / max(total_steps, 1))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LARS(torch.optim.Optimizer):
    """LARS (You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks", 2017) as MAE's linear probe
    uses it (He et al., CVPR 2022, Appendix A.1; facebookresearch/mae util/lars.py, from MoCo v3).

    For a parameter with ``ndim > 1`` the update is ``d = grad + weight_decay * p``, rescaled by the trust ratio
    ``trust_coefficient * ||p|| / ||d||`` (1 when either norm is 0); biases and norm parameters (``ndim <= 1``) take
    the plain gradient, without decay or trust ratio. Then heavy-ball momentum: ``mu = momentum * mu + d``,
    ``p -= lr * mu``.

    The trust ratio makes each step move a weight matrix by about ``lr * trust_coefficient`` of its norm, so the
    probe's progress per epoch grows with the number of steps: MAE's blr 0.1 is tuned for ImageNet (16384-sample
    batches, 78 steps per epoch).

    Args:
        params: parameters or param groups.
        lr: learning rate (MAE: blr 0.1 x batch / 256).
        weight_decay: decay of the ``ndim > 1`` parameters (MAE's probe: 0).
        momentum: heavy-ball momentum (MAE: 0.9).
        trust_coefficient: eta of the trust ratio (MAE: 0.001).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        check_range("LARS", "lr", lr, 0, math.inf)
        check_range("LARS", "weight_decay", weight_decay, 0, math.inf)
        check_range("LARS", "momentum", momentum, 0, 1, high_open=True)
        check_range("LARS", "trust_coefficient", trust_coefficient, 0, math.inf, low_open=True)
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:  # not a bias or norm parameter
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = group["trust_coefficient"] * p_norm / d_norm
                    d = d.mul(torch.where((p_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio)))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss
