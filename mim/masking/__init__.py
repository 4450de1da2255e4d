"""Masking strategies: where to hide (see :mod:`mim.types` for the mask convention)."""

from mim.masking.attention import AttentionMasking
from mim.masking.base import MaskingStrategy, ScoreMasking
from mim.masking.colored_noise import ColoredNoiseMasking
from mim.masking.dual import DualMasking, RunningCellMasking
from mim.masking.feature_subset import FeatureSubsetMasking
from mim.masking.functional import scores_to_masks
from mim.masking.group_partition import GroupPartitionMasking
from mim.masking.hard_patch import HardPatchMasking
from mim.masking.multi import MultiMasking
from mim.masking.multiblock import MultiBlockMasking
from mim.masking.random import RandomMasking
from mim.masking.tube import TubeMasking

__all__ = [
    "AttentionMasking",
    "ColoredNoiseMasking",
    "DualMasking",
    "FeatureSubsetMasking",
    "GroupPartitionMasking",
    "HardPatchMasking",
    "MaskingStrategy",
    "MultiBlockMasking",
    "MultiMasking",
    "RandomMasking",
    "RunningCellMasking",
    "ScoreMasking",
    "TubeMasking",
    "scores_to_masks",
]
