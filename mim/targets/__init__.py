"""Targets: what to predict."""

import importlib
from typing import Any

from mim.targets.base import Target
from mim.targets.features import FeatureTarget
from mim.targets.pixels import PixelTarget, norm_pix

_LAZY = {"TeacherTarget": "mim.targets.teacher", "LatentTarget": "mim.targets.latent"}

__all__ = ["FeatureTarget", "PixelTarget", "Target", "norm_pix", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mim.targets' has no attribute {name!r}")
