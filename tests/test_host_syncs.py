"""Whole training steps make no host syncs (issue 13: the framework tax of ``mim fit`` on a GPU).

A real ``Trainer.fit`` with the callbacks ``mim fit`` adds (RunMetrics, FaultTolerance, RunProgressBar) and the
modules' defaults (fused AdamW with the non-finite guard on the device); every ``.item()``, ``.tolist()``,
``.cpu()``, ``bool(t)``, ``nonzero`` and boolean-mask index (tests/syncs.py) made between the start of step 2 and the
end of step 9 is counted, for MAE, I-JEPA (multi-block masks, EMA target) and HPM (hard-patch masks, EMA teacher).
Steps 2-9 are not logging steps (``log_every_n_steps=50``): a logging step reads the logged values once, by design.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mim.callbacks.fault_tolerance import FaultTolerance
from mim.callbacks.progress import RunProgressBar
from mim.callbacks.run_metrics import RunMetrics
from mim.masking import HardPatchMasking, MultiBlockMasking, RandomMasking
from mim.module import PretrainModule
from mim.targets import LatentTarget, PixelTarget
from mim.targets.hard_patch import HardPatchTarget
from tests.factories import TINY_VIT, cpu_trainer, tiny_encoder
from tests.syncs import SyncCounter, count_host_syncs

BATCH, STEPS = 4, 10


class Images(Dataset):
    def __init__(self, n: int, size: int) -> None:
        self.x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i]}


class CountSteps(L.Callback):
    """Counts host syncs from the start of training batch ``first`` to the end of batch ``last``."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.counter: SyncCounter | None = None
        self._context: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.first:
            self._context = count_host_syncs()
            self.counter = self._context.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.last + 1 and self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


def _mae() -> tuple[PretrainModule, int]:
    target = PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    return PretrainModule(
        encoder=tiny_encoder(), masking=RandomMasking(mask_ratio=0.75), targets=[target], batch_size=BATCH
    ), 16


def _ijepa() -> tuple[PretrainModule, int]:
    encoder = tiny_encoder(img_size=32, model_kwargs={**TINY_VIT, "class_token": False, "global_pool": "avg"})
    masking = MultiBlockMasking(num_targets=2, target_scale=(0.15, 0.2))
    target = LatentTarget(predictor_dim=16, predictor_depth=1, monitor_every=1000)
    return PretrainModule(encoder=encoder, masking=masking, targets=[target], batch_size=BATCH), 32


def _hpm() -> tuple[PretrainModule, int]:
    target = HardPatchTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2, ema_ramp=0.5)
    return PretrainModule(encoder=tiny_encoder(), masking=HardPatchMasking(), targets=[target], batch_size=BATCH), 16


@pytest.mark.parametrize("build", [_mae, _ijepa, _hpm], ids=["mae", "ijepa", "hpm"])
def test_training_steps_make_no_host_syncs(build) -> None:
    module, size = build()
    window = CountSteps(first=2, last=9)
    bar = RunProgressBar()
    trainer = cpu_trainer(
        max_steps=STEPS,
        log_every_n_steps=50,
        enable_progress_bar=True,
        callbacks=[window, RunMetrics(), FaultTolerance(), bar],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(Images(BATCH * STEPS, size), batch_size=BATCH))
    assert window.counter is not None and trainer.global_step == STEPS
    assert window.counter.calls == []
    assert module.trainer.optimizers[0].param_groups[0]["fused"] is True
    assert "train/loss" in bar.get_metrics(trainer, module)  # the bar still shows the loss (read at step 1 and the end)


def test_the_host_path_is_one_sync_per_step() -> None:
    """Without the fused optimizer the non-finite check reads its flag on the host: one sync per optimizer step."""
    module, size = _mae()
    module.hparams.fused_optimizer = False  # type: ignore[attr-defined]
    window = CountSteps(first=2, last=9)
    trainer = cpu_trainer(max_steps=STEPS, log_every_n_steps=50, callbacks=[window])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(Images(BATCH * STEPS, size), batch_size=BATCH))
    assert window.counter is not None
    # torch's foreach AdamW also reads its step counters with .item(), but those live on the host (not counted there)
    guard_reads = [c for c in window.counter.calls if c == "__float__"]
    assert len(guard_reads) == 8
