"""Masking strategies: where to hide (see mim.types for the mask convention).

Strategies added after the core (colored noise, hard-patch, dual, feature subsets) are imported on first use.
"""

import importlib
from typing import Any

from mim.masking.base import MaskingStrategy, ScoreMasking
from mim.masking.functional import gather_tokens, scatter_tokens, scores_to_masks
from mim.masking.multiblock import MultiBlockMasking
from mim.masking.random import RandomMasking
from mim.masking.tube import TubeMasking

_LAZY = {
    "ColoredNoiseMasking": "mim.masking.colored_noise",
    "HardPatchMasking": "mim.masking.hard_patch",
    "DualMasking": "mim.masking.dual",
    "RunningCellMasking": "mim.masking.dual",
    "FeatureSubsetMasking": "mim.masking.feature_subset",
    "AttentionMasking": "mim.masking.attention",
}

__all__ = [
    "MaskingStrategy",
    "MultiBlockMasking",
    "RandomMasking",
    "ScoreMasking",
    "TubeMasking",
    "gather_tokens",
    "scatter_tokens",
    "scores_to_masks",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mim.masking' has no attribute {name!r}")
