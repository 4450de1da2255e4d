"""Targets: what to predict."""

from mim.targets.base import Target
from mim.targets.cae import ContextRegressionTarget
from mim.targets.features import FeatureTarget
from mim.targets.hard_patch import HardPatchTarget
from mim.targets.latent import LatentTarget
from mim.targets.pixels import PixelTarget, norm_pix
from mim.targets.position import PositionTarget
from mim.targets.self_distill import SelfDistillTarget
from mim.targets.teacher import TeacherTarget

__all__ = [
    "ContextRegressionTarget",
    "FeatureTarget",
    "HardPatchTarget",
    "LatentTarget",
    "PixelTarget",
    "PositionTarget",
    "SelfDistillTarget",
    "Target",
    "TeacherTarget",
    "norm_pix",
]
