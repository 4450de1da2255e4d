"""Optimizer parameter groups and the per-iteration warmup + cosine schedule of MAE.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (Appendix A.1; official
facebookresearch/mae main_pretrain.py and util/lr_sched.py): AdamW with betas (0.9, 0.95); no weight decay on
1-D parameters (norms) and biases; frozen parameters (the sin-cos tables) are in no group; base lr = blr *
effective batch / 256; linear warmup from 0 then half-cosine to ``min_lr``, updated every optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

__all__ = ["cosine_anneal", "param_groups", "scaled_lr", "warmup_cosine"]


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


def cosine_anneal(step: int, *, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps`` and later).

    ``end + (start - end) * (1 + cos(pi * min(1, step / total))) / 2``. I-JEPA's weight decay *increases* this way
    from 0.04 to 0.4 over training (facebookresearch/ijepa configs/in1k_vith14_ep300.yaml).
    """
    progress = min(1.0, max(step, 0) / max(total_steps, 1))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
