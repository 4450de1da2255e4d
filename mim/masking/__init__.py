"""Masking strategies: where to hide (see mim.types for the mask convention)."""

from mim.masking.base import MaskingStrategy, ScoreMasking
from mim.masking.functional import gather_tokens, scatter_tokens, scores_to_masks
from mim.masking.multiblock import MultiBlockMasking
from mim.masking.random import RandomMasking
from mim.masking.tube import TubeMasking

__all__ = [
    "MaskingStrategy",
    "MultiBlockMasking",
    "RandomMasking",
    "ScoreMasking",
    "TubeMasking",
    "gather_tokens",
    "scatter_tokens",
    "scores_to_masks",
]
