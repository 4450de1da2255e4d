"""mim: masked image (and video and table) pretraining, from one CPU to a cluster.

Heavy members are imported lazily so that ``mim.masking``, ``mim.targets`` and ``mim.models`` stay free of
Lightning imports (docs/design.md, "Interfaces").
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PretrainModule": "mim.module",
    "MaskedEncoder": "mim.models.encoder",
    "RandomMasking": "mim.masking.random",
    "PixelTarget": "mim.targets.pixels",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mim' has no attribute {name!r}")
