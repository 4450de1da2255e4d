"""Count host synchronisations on CPU: calls that would block on a GPU stream (the target: none per training step
outside periodic logging).

On a CUDA device, ``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, ``nonzero`` and boolean-mask indexing wait
for the device. On CPU they are free, so tests wrap them and count the calls made by the code under test::

    with count_host_syncs() as syncs:
        module.draw_masks(batch, gen)
    assert syncs.count == 0, syncs.calls
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["count_host_syncs"]

_METHODS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@dataclass
class SyncCounter:
    calls: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCounter]:
    """Patch ``torch.Tensor`` methods that synchronise with the device and record each call."""
    counter = SyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in _METHODS}
    original_getitem = torch.Tensor.__getitem__
    original_nonzero = torch.nonzero

    def wrap(name, fn):
        def wrapper(self, *args, **kwargs):
            counter.calls.append(name)
            return fn(self, *args, **kwargs)

        return wrapper

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            counter.calls.append("boolean-mask indexing")
        return original_getitem(self, index)

    def nonzero(*args, **kwargs):
        counter.calls.append("torch.nonzero")
        return original_nonzero(*args, **kwargs)

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        torch.Tensor.__getitem__ = getitem  # type: ignore[method-assign]
        torch.nonzero = nonzero  # type: ignore[assignment]
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.Tensor.__getitem__ = original_getitem  # type: ignore[method-assign]
        torch.nonzero = original_nonzero  # type: ignore[assignment]
