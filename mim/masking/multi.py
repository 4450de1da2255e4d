"""Several masks per step (Bardes et al., "Revisiting Feature Prediction for Learning Visual Representations from
Video" (V-JEPA), arXiv 2404.08471, 2024; official facebookresearch/jepa app/vjepa/train.py, ``cfgs_mask``).

V-JEPA draws two masks per clip, a short-range one (the union of 8 small blocks) and a long-range one (the union of 2
large blocks), runs the context encoder and the predictor once per mask (with a mask token of its own) and averages
the two losses. Here each mask comes from its own strategy; :class:`~mim.PretrainModule` runs the encoder and every
target once per mask set and averages (``Masks.sets``, :mod:`mim.types`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from mim.checks import invalid
from mim.masking.base import MaskingStrategy
from mim.masking.multiblock import MultiBlockMasking
from mim.types import Masks, TokenGrid

__all__ = ["MultiMasking", "vjepa_masks"]


def vjepa_masks() -> list[MaskingStrategy]:
    """V-JEPA's two masks (``configs/pretrain/vitl16.yaml`` ``mask``): short-range, the union of 8 blocks of 15 % of the
    frame; long-range, the union of 2 blocks of 70 %; aspect 0.75-1.5, all time steps, placed inside the grid,
    context = the complement."""
    common: dict = {"target_aspect": (0.75, 1.5), "temporal_scale": (1.0, 1.0), "context": "complement"}
    return [
        MultiBlockMasking(num_targets=8, target_scale=(0.15, 0.15), placement="inside", **common),
        MultiBlockMasking(num_targets=2, target_scale=(0.7, 0.7), placement="inside", **common),
    ]


class MultiMasking(MaskingStrategy):
    """One mask set per strategy, drawn in order from the step's generator.

    The returned :class:`~mim.types.Masks` is the first set, holding the others in ``more``; set ``i`` has
    ``set_index = i``. Each set keeps its own visible and target counts.

    Args:
        strategies: the masking strategies, at least two; None: V-JEPA's (:func:`vjepa_masks`: the unions of 8 blocks
            of 15 % and of 2 blocks of 70 % of the frame, over all time steps, context = the complement). Strategies
            that need per-token scores (hard-patch mining) and nested ``MultiMasking`` are not supported.
    """

    def __init__(self, *, strategies: list[MaskingStrategy] | None = None) -> None:
        owner = "MultiMasking"
        strategies = vjepa_masks() if strategies is None else strategies
        if not isinstance(strategies, list | tuple) or len(strategies) < 2:
            raise invalid(owner, "strategies", "a list of at least two masking strategies", strategies)
        for i, s in enumerate(strategies):
            if not isinstance(s, MaskingStrategy) or isinstance(s, MultiMasking):
                raise invalid(owner, f"strategies[{i}]", "a MaskingStrategy other than MultiMasking", s)
            if s.needs_scores:
                hint = "score-driven masking (hard-patch mining) has one score map per step"
                raise invalid(owner, f"strategies[{i}]", "a strategy without per-token scores", s, hint=hint)
        self.strategies = list(strategies)

    def __call__(
        self,
        batch_size: int,
        grid: TokenGrid,
        *,
        generator: torch.Generator,
        device: torch.device,
        scores: Tensor | None = None,
        progress: float = 0.0,
    ) -> Masks:
        n = len(self.strategies)
        sets = [
            replace(s(batch_size, grid, generator=generator, device=device, progress=progress), set_index=i, num_sets=n)
            for i, s in enumerate(self.strategies)
        ]
        return replace(sets[0], more=tuple(sets[1:]))
