"""Exponential moving averages of parameters (EMA teachers and target encoders).

Used by hard-patch mining (Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023: an EMA copy
of the student scores every token) and, later, by JEPA target encoders. One update is

    ema <- m * ema + (1 - m) * online        (for parameters only; buffers are left alone)

done as one fused ``torch._foreach_lerp_`` call over all parameters (``lerp(ema, online, 1 - m)`` is the same
convex combination), after the optimizer step, with no host synchronisation.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["EMA", "ema_momentum"]


def ema_momentum(progress: float, *, start: float, end: float, ramp: float = 1.0) -> float:
    """Momentum that moves linearly from ``start`` to ``end`` over the first ``ramp`` fraction of training.

    HPM (methods/IMAGE.md §3.2 step 8): ``0.999 -> 0.9999`` over the first 100 of 800 epochs (``ramp = 0.125``),
    then constant. I-JEPA-style schedules are ``ramp = 1``.

    Args:
        progress: fraction of training done, in [0, 1].
        start: momentum at progress 0.
        end: momentum from ``progress >= ramp`` on.
        ramp: fraction of training over which the momentum moves; 0 means ``end`` from the start.

    Returns:
        The momentum, a Python float (host side: no device work).
    """
    if ramp <= 0 or progress >= ramp:
        return end
    return start + (end - start) * max(progress, 0.0) / ramp


class EMA(nn.Module):
    """A frozen copy of a module whose parameters track the online module's parameters.

    The copy holds no gradients (``requires_grad=False``), stays in eval mode, is part of the owner's state dict
    (so it is saved with checkpoints and restored on resume) and is never seen by the optimizer.

    Args:
        module: the online module to copy (its current weights become the EMA's initial weights).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> EMA:
        """The EMA copy always stays in eval mode (no dropout or drop-path in the teacher)."""
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """``ema = momentum * ema + (1 - momentum) * online`` for every parameter, in one fused call.

        Args:
            online: a module with the same parameter structure as the copy (the student).
            momentum: m in [0, 1]; 1 keeps the EMA unchanged, 0 copies the online weights.
        """
        if not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum!r}")
        ema_params = list(self.module.parameters())
        online_params = list(online.parameters())
        if len(ema_params) != len(online_params):
            raise ValueError(
                f"EMA.update: the online module has {len(online_params)} parameters, the EMA copy {len(ema_params)}; "
                "pass the module the EMA was made from"
            )
        if momentum == 1.0:
            return
        sources = [
            o.detach().to(e.dtype) if o.dtype != e.dtype else o.detach() for e, o in zip(ema_params, online_params)
        ]
        torch._foreach_lerp_(ema_params, sources, 1.0 - momentum)
