"""Masking strategies: where to hide (see mim.types for the mask convention)."""

from mim.masking.base import MaskingStrategy, ScoreMasking
from mim.masking.functional import gather_tokens, scatter_tokens, scores_to_masks
from mim.masking.random import RandomMasking

__all__ = ["MaskingStrategy", "RandomMasking", "ScoreMasking", "gather_tokens", "scatter_tokens", "scores_to_masks"]
