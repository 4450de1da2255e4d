"""RunProgressBar: one bar over the whole run, in samples, also when max_steps ends it; MimCLI uses it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mim.callbacks import RunProgressBar
from mim.masking import RandomMasking
from mim.module import PretrainModule
from mim.targets import PixelTarget
from tests.factories import cpu_trainer, tiny_encoder


class _Images(L.LightningDataModule):
    batch_size = 4

    def train_dataloader(self) -> DataLoader:
        images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        return DataLoader([{"image": x} for x in images], batch_size=self.batch_size)


class _Spy(RunProgressBar):
    """Records the bar object and its (n, total) at every epoch end."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int | None, int]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        bar = self.train_progress_bar
        self.seen.append((bar.n, bar.total, id(bar)))


def _fit(bar: RunProgressBar, **limits) -> L.Trainer:
    module = PretrainModule(encoder=tiny_encoder(), masking=RandomMasking(), targets=[PixelTarget(decoder_dim=16,
                            decoder_depth=1, decoder_num_heads=2)], warmup_steps=1)  # fmt: skip
    trainer = cpu_trainer(enable_progress_bar=True, callbacks=[bar], **limits)
    trainer.fit(module, datamodule=_Images())
    return trainer


@pytest.mark.parametrize(("limits", "batches"), [({"max_epochs": 3}, 12), ({"max_steps": 6, "max_epochs": -1}, 6)])
def test_one_bar_spans_the_run_in_samples(limits, batches):
    bar = _Spy()
    _fit(bar, **limits)
    total = batches * 4  # samples: batches x batch size
    assert len({seen[2] for seen in bar.seen}) == 1  # the same bar in every epoch
    assert all(seen[1] == total for seen in bar.seen)
    assert [seen[0] for seen in bar.seen] == [min(16 * (e + 1), total) for e in range(len(bar.seen))]
    assert bar.train_progress_bar.unit == "sample"


def test_mim_fit_uses_the_run_bar(tmp_path: Path):
    from mim.lightning_cli import build

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "debug" / "mae_table.yaml"
    cli = build(["-c", str(recipe), f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=true"],
                save_config_callback=None)  # fmt: skip
    bars = [c for c in cli.trainer.callbacks if isinstance(c, L.pytorch.callbacks.ProgressBar)]
    assert [type(b) for b in bars] == [RunProgressBar]
