"""RunProgressBar: one progress bar over the whole run, in samples, with its ETA and samples/s.

Lightning's ``TQDMProgressBar`` restarts at every epoch and, when ``max_steps`` ends the run, covers one epoch that
never finishes: no useful ETA for a pretraining run of days. This bar counts the training batches of the whole run
(``trainer.estimated_stepping_batches`` optimizer steps x gradient accumulation, less when ``max_steps`` ends it
first), starts where a resumed run stands, shows samples (batches x per-device batch x world size), so tqdm's rate is
samples/s, and keeps the epoch in its description. ``mim fit`` uses it in place of Lightning's default bar.

The training loss is shown as of the last logging step (``trainer.log_every_n_steps``): the modules do not log it with
``prog_bar=True``, because Lightning converts progress-bar values to Python numbers at every step, a host sync that
keeps a GPU's queue from running ahead; at a logging step the logger reads the values anyway.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

__all__ = ["RunProgressBar"]


class RunProgressBar(TQDMProgressBar):
    """A ``TQDMProgressBar`` whose training bar spans the run (see the module docstring); validation bars as usual.

    Args:
        refresh_rate: update the bar every this many batches (Lightning's meaning).
        leave: keep finished validation bars (Lightning's meaning).
    """

    SHOWN = ("train/loss",)  # read at logging steps only

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._batches_done = 0
        self._shown: dict[str, float] = {}
        self._shown_step = -1

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float | dict]:
        return {**super().get_metrics(trainer, pl_module), **self._shown}

    def _read_shown(self, trainer: L.Trainer, *, now: bool = False) -> None:
        """Read the shown values after the first step, at logging steps and at the end (``now``): one host sync per
        ``log_every_n_steps`` steps."""
        step = trainer.global_step
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        if step == self._shown_step or not (now or step == 1 or step % every == 0 or trainer.should_stop):
            return
        self._shown_step = step
        for key in self.SHOWN:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self._shown[key] = round(float(value), 4)

    def _samples_per_batch(self, trainer: L.Trainer) -> int:
        per_device = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if per_device is None:
            per_device = getattr(trainer.lightning_module, "batch_size", None)
        return int(per_device or 1) * int(trainer.world_size)

    def _run_batches(self, trainer: L.Trainer) -> float:
        """Training batches of the whole run (optimizer steps x accumulation), inf when the run has no end."""
        steps = trainer.estimated_stepping_batches
        return float(steps) * trainer.accumulate_grad_batches

    def init_train_tqdm(self) -> Tqdm:
        bar = super().init_train_tqdm()
        bar.unit = "sample"
        bar.unit_scale = True
        return bar

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        scale = self._samples_per_batch(trainer)
        total = self._run_batches(trainer)
        self._batches_done = trainer.global_step * trainer.accumulate_grad_batches  # a resumed run starts there
        bar = self.train_progress_bar
        bar.reset(total=None if total == float("inf") else int(total) * scale)
        bar.initial = self._batches_done * scale
        bar.n = bar.initial

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches_done += 1
        self._read_shown(trainer)
        bar = self.train_progress_bar
        if self.refresh_rate and (self._batches_done % self.refresh_rate == 0 or trainer.should_stop):
            bar.n = self._batches_done * self._samples_per_batch(trainer)
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_shown(trainer, now=True)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
