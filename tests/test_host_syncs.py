"""Whole training steps make no host syncs (issue 13: the framework tax of ``mim fit`` on a GPU).

A real ``Trainer.fit`` with the callbacks ``mim fit`` adds (RunMetrics, FaultTolerance, RunProgressBar) and the
modules' defaults (fused AdamW with the non-finite guard on the device); every ``.item()``, ``.tolist()``,
``.cpu()``, ``bool(t)``, ``nonzero`` and boolean-mask index (tests/syncs.py) made between the start of step 2 and the
end of step 9 is counted, for MAE, I-JEPA (multi-block masks, EMA target), HPM (hard-patch masks, EMA teacher),
VideoMAE V2 (tube and running-cell dual masking) and T-JEPA (feature subsets of table rows).
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
from mim.masking import (
    DualMasking,
    FeatureSubsetMasking,
    HardPatchMasking,
    MultiBlockMasking,
    MultiMasking,
    RandomMasking,
    TubeMasking,
)
from mim.module import PretrainModule
from mim.targets import LatentTarget, PixelTarget
from mim.targets.hard_patch import HardPatchTarget
from tests.factories import TINY_VIT, cpu_trainer, tiny_encoder, tiny_table_encoder, tiny_video_encoder
from tests.syncs import SyncCounter, count_host_syncs

BATCH, STEPS = 4, 10


class Images(Dataset):
    def __init__(self, n: int, size: int) -> None:
        self.x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i]}


class Clips(Images):
    """4-frame 16 x 16 clips (the tiny video encoder's input)."""

    def __init__(self, n: int, size: int) -> None:
        self.x = torch.rand(n, 3, 4, size, size, generator=torch.Generator().manual_seed(0))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"video": self.x[i]}


class Rows(Dataset):
    """Table rows: 3 numeric features and two categorical ones (4 and 3 categories)."""

    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.numeric = torch.randn(n, 3, generator=g)
        self.categorical = torch.stack(
            [torch.randint(0, 4, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)], 1
        )

    def __len__(self) -> int:
        return len(self.numeric)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"numeric": self.numeric[i], "categorical": self.categorical[i]}


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


def _videomae_v2() -> tuple[PretrainModule, int]:
    masking = DualMasking(encoder=TubeMasking(mask_ratio=0.75), decoder_mask_ratio=0.5)
    target = PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    return PretrainModule(encoder=tiny_video_encoder(), masking=masking, targets=[target], batch_size=BATCH), 16


def _vjepa() -> tuple[PretrainModule, int]:
    """V-JEPA: two complement masks per step (MultiMasking), a mask token per set, one target pass."""
    blocks = [(8, (0.15, 0.15)), (2, (0.7, 0.7))]
    masking = MultiMasking(
        strategies=[MultiBlockMasking(num_targets=m, target_scale=s, context="complement") for m, s in blocks]
    )
    target = LatentTarget(predictor_dim=16, predictor_depth=1, num_mask_tokens=2, monitor_every=1000)
    return PretrainModule(encoder=tiny_video_encoder(), masking=masking, targets=[target], batch_size=BATCH), 16


def _tjepa() -> tuple[PretrainModule, int]:
    encoder = tiny_table_encoder(num_numeric=3, category_cardinalities=[4, 3])
    target = LatentTarget(predictor_dim=16, predictor_depth=1, monitor_every=1000)
    module = PretrainModule(encoder=encoder, masking=FeatureSubsetMasking(), targets=[target], batch_size=BATCH)
    return module, 0


DATA = {"videomae_v2": Clips, "vjepa": Clips, "tjepa": Rows}


@pytest.mark.parametrize(
    "build",
    [_mae, _ijepa, _hpm, _videomae_v2, _vjepa, _tjepa],
    ids=["mae", "ijepa", "hpm", "videomae_v2", "vjepa", "tjepa"],
)
def test_training_steps_make_no_host_syncs(build) -> None:
    module, size = build()
    data = DATA.get(build.__name__.lstrip("_"), Images)(BATCH * STEPS, size)
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
        trainer.fit(module, DataLoader(data, batch_size=BATCH))
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
