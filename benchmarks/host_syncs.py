"""Host syncs per training step of ``Trainer.fit``, per method, counted (deterministic; CPU).

A host sync (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, ``nonzero``, boolean-mask indexing on a device
tensor) makes the host wait for every kernel queued so far; the next step's launches then start from an idle GPU.
This script runs a real ``Trainer.fit`` of a tiny model per method with the callbacks ``mim fit`` adds (RunMetrics,
FaultTolerance, RunProgressBar), counts those calls (tests/syncs.py) over steps 2-9 (no logging step:
``log_every_n_steps=50``), attributes each to the line that made it, and prints a table: with the defaults (fused
AdamW), with ``fused_optimizer=False`` (the non-finite check on the host), and with ``train/loss`` on Lightning's
progress bar (``prog_bar=True``, what mim did before issue 13). On the CPU the calls cost nothing; on a GPU each is a
pipeline drain. Single process: with several ranks Lightning also broadcasts its SIGTERM flag every step (a
collective and a sync), which ``FaultTolerance`` switches off.

    .venv/bin/python benchmarks/host_syncs.py
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mim.callbacks import FaultTolerance, RunMetrics, RunProgressBar  # noqa: E402
from tests import test_host_syncs as methods  # noqa: E402  (the tiny modules of the sync test)
from tests.factories import cpu_trainer  # noqa: E402
from tests.syncs import count_host_syncs  # noqa: E402

STEPS, FIRST, LAST = 12, 2, 9


class Window(L.Callback):
    """Counts host syncs from batch ``FIRST``'s start to batch ``LAST + 1``'s start, keyed by the line that made them."""

    def __init__(self) -> None:
        self.where: collections.Counter[str] = collections.Counter()
        self._context: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == LAST + 1 and self._context is not None:  # steps FIRST..LAST whole, their step-end work included
            self._context.__exit__(None, None, None)
            self._context = None
        if idx != FIRST:
            return
        self._context = count_host_syncs()
        counter = self._context.__enter__()
        where = self.where

        class Calls(list):
            def append(self, name: str) -> None:
                frames = [f for f in traceback.extract_stack()[:-2] if "syncs.py" not in f.filename]
                f = frames[-1]
                short = f.filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
                where[f"{name} at {short}:{f.lineno}"] += 1
                super().append(name)

        counter.calls = Calls()


def count(build: Any, *, fused: bool, loss_on_bar: bool) -> collections.Counter[str]:
    module, size = build()
    module.hparams.fused_optimizer = fused  # type: ignore[attr-defined]
    if loss_on_bar:  # mim before issue 13: train/loss logged with prog_bar=True
        original = module.log

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            original(name, value, *args, **{**kwargs, "prog_bar": kwargs.get("prog_bar") or name == "train/loss"})

        module.log = log  # type: ignore[method-assign]
    window = Window()
    trainer = cpu_trainer(
        max_steps=STEPS,
        log_every_n_steps=50,
        enable_progress_bar=True,
        callbacks=[window, RunMetrics(), FaultTolerance(), RunProgressBar(refresh_rate=1000)],
    )
    data = methods.DATA.get(build.__name__.lstrip("_"), methods.Images)(methods.BATCH * STEPS, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(data, batch_size=methods.BATCH))
    return window.where


def main() -> None:
    builds = [methods._mae, methods._ijepa, methods._hpm, methods._videomae_v2, methods._tjepa]
    variants = {
        "defaults (fused AdamW)": {"fused": True, "loss_on_bar": False},
        "fused_optimizer=False": {"fused": False, "loss_on_bar": False},
        "train/loss on the bar": {"fused": True, "loss_on_bar": True},
    }
    steps = LAST - FIRST + 1
    rows, notes = [], set()
    for build in builds:
        cells = []
        for options in variants.values():
            where = count(build, **options)
            device = {k: v for k, v in where.items() if "torch/optim/" not in k}  # foreach AdamW: host step counters
            notes.update(k for k in where if "torch/optim/" in k)
            cells.append(f"{sum(device.values()) / steps:g}")
            notes.update(device)
        rows.append(f"| {build.__name__.lstrip('_')} | " + " | ".join(cells) + " |")
    print(f"\nHost syncs per training step (steps {FIRST}-{LAST}, {STEPS}-step fits, 1 process, CPU count):\n")
    print("| method | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    print("\n".join(rows))
    print("\nwhere they were made:")
    for k in sorted(notes):
        extra = (
            " (a CPU step counter of torch's foreach AdamW: no device wait, not counted)" if "torch/optim/" in k else ""
        )
        print(f"  {k}{extra}")


if __name__ == "__main__":
    main()
