"""Targets: what to predict."""

from mim.targets.base import Target
from mim.targets.features import FeatureTarget
from mim.targets.pixels import PixelTarget, norm_pix

__all__ = ["FeatureTarget", "PixelTarget", "Target", "norm_pix"]
