"""FaultTolerance: atomic verified checkpoints, a checkpoint on SIGTERM, and a resume that says what changed.

``mim fit`` / ``mim finetune`` add this callback to every run (:class:`mim.lightning_cli.MimCLI`); a Python user adds
``FaultTolerance()`` to the Trainer's callbacks. It does three things:

* **Atomic checkpoints**: at setup it installs :func:`mim.distributed.use_atomic_checkpoints` (a file is written under a
  temporary name with a SHA-256 sidecar and renamed when complete; a full disk leaves the previous checkpoint intact).
* **SIGTERM: save, then stop.** At the end of the step the signal arrives in (with several ranks: the step after it,
  where every rank has read the flag agreed over the ranks without a host sync), every rank saves
  ``preempted-step=<N>.ckpt`` next to the run's other checkpoints and training stops (``mim fit`` then exits with 143),
  so ``--ckpt_path last`` (or ``--resume auto``) continues from that step instead of the last periodic checkpoint.
* **Resume settings**: every checkpoint records the settings an exact resume depends on (the seeds, the world size,
  gradient accumulation and the datamodule's constructor arguments: data sources, batch size, augmentation, workers).
  On resume it logs which of them changed and whether the resume is still exact.
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mim.distributed import use_atomic_checkpoints
from mim.optim import LaggedRead

__all__ = ["FaultTolerance", "compare_run_settings", "run_settings"]

# Settings whose change leaves the data order, augmentation, masks and step counts of a resumed run unchanged.
_HARMLESS = {"num_workers", "decode_threads", "pin_memory", "persistent_workers", "prefetch_factor"}


def _no_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast while FaultTolerance handles SIGTERM."""


def _plain(value: Any) -> Any:
    """``value`` as JSON-comparable data (tuples as lists, paths as strings), or None when it is not data."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if all(i is not None or v is None for i, v in zip(items, value, strict=True)) else None
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    return None


def _init_arguments(obj: Any) -> dict[str, Any]:
    """The constructor arguments of ``obj`` that it keeps as attributes of the same name, as plain data."""
    out: dict[str, Any] = {}
    for name in inspect.signature(type(obj).__init__).parameters:
        if name in ("self", "args", "kwargs") or not hasattr(obj, name):
            continue
        value = _plain(getattr(obj, name))
        if value is not None or getattr(obj, name) is None:
            out[name] = value
    return out


def run_settings(trainer: L.Trainer, pl_module: L.LightningModule | None = None) -> dict[str, Any]:
    """What an exact resume of this run depends on, as plain JSON data.

    Returns:
        ``{"world_size", "accumulate_grad_batches", "model_seed", "datamodule", "data"}``: ``data`` holds the
        datamodule's constructor arguments that it keeps under the same name (e.g. ``root``, ``urls``, ``batch_size``,
        ``num_workers``, ``seed``, ``augment``), ``model_seed`` the LightningModule's ``seed`` (masks, per-step RNG).
    """
    module = pl_module if pl_module is not None else trainer.lightning_module
    datamodule = getattr(trainer, "datamodule", None)
    return {
        "world_size": int(trainer.world_size),
        "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        "model_seed": _plain(getattr(module, "seed", None)),
        "datamodule": None if datamodule is None else type(datamodule).__name__,
        "data": {} if datamodule is None else _init_arguments(datamodule),
    }


def compare_run_settings(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], bool]:
    """The settings that differ between a checkpoint and the resuming run, and whether the resume stays exact.

    Returns:
        (changes, exact): ``changes`` reads ``"data.batch_size: 64 -> 32"``; ``exact`` is False when any changed
        setting other than loader plumbing (``num_workers`` ...) changed.
    """
    changes: list[str] = []
    exact = True

    def differ(name: str, old: Any, new: Any, harmless: bool = False) -> None:
        nonlocal exact
        if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
            changes.append(f"{name}: {old!r} -> {new!r}")
            exact = exact and harmless

    for key in ("world_size", "accumulate_grad_batches", "model_seed", "datamodule"):
        differ(key, saved.get(key), current.get(key))
    old_data, new_data = saved.get("data") or {}, current.get("data") or {}
    for name in sorted(set(old_data) | set(new_data)):
        differ(f"data.{name}", old_data.get(name), new_data.get(name), harmless=name in _HARMLESS)
    return changes, exact


class FaultTolerance(L.Callback):
    """Atomic checkpoints, a checkpoint on SIGTERM, and resume settings checked on resume (see the module docstring).

    Args:
        save_on_sigterm: write ``preempted-step=<N>.ckpt`` when the run is stopped by SIGTERM (a scheduler's
            preemption, ``kill``, torchrun forwarding a signal).
        atomic: install the atomic checkpoint writer on the trainer's strategy.

    Attributes:
        sigterm_received: class-wide: this process was stopped by SIGTERM (also a rank whose peers exited first and
            which then saw a lost connection; the CLI then reports the preemption, not a crash).
        preempted_checkpoint: the path written on SIGTERM (None before).
        resume_changes: the settings that changed at the last resume (``"name: old -> new"``).
        resume_exact: whether the last resume was exact (None before a resume).
    """

    sigterm_received = False

    def __init__(self, *, save_on_sigterm: bool = True, atomic: bool = True) -> None:
        self.save_on_sigterm = save_on_sigterm
        self.atomic = atomic
        self.preempted_checkpoint: Path | None = None
        self.resume_changes: list[str] = []
        self.resume_exact: bool | None = None
        self._trainer: L.Trainer | None = None
        self._stop_requested = False
        self._previous_handler: Any = None
        self._agreed = LaggedRead()

    @property
    def state_key(self) -> str:
        return "FaultTolerance"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self._stop_requested = False
        self._agreed = LaggedRead()
        self.preempted_checkpoint = None
        FaultTolerance.sigterm_received = False
        if self.atomic:
            use_atomic_checkpoints(trainer)

    # ------------------------------------------------------------------ resume settings
    def state_dict(self) -> dict[str, Any]:
        return {"run_settings": run_settings(self._trainer)} if self._trainer is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("run_settings")
        if not isinstance(saved, dict) or self._trainer is None:
            return
        self.resume_changes, self.resume_exact = compare_run_settings(saved, run_settings(self._trainer))
        if not self.resume_changes:
            rank_zero_info("mim: resuming with the settings the checkpoint was written with (an exact resume)")
            return
        changed = "; ".join(self.resume_changes)
        if self.resume_exact:
            rank_zero_info(f"mim: resuming with changed loader settings ({changed}); the resume is still exact")
        else:
            rank_zero_warn(
                f"mim: resuming with changed settings ({changed}): the run continues, but not exactly as the "
                "uninterrupted run would (data order, augmentation, masks or step counts differ); pass the "
                "original values to resume exactly"
            )

    # ------------------------------------------------------------------ SIGTERM
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Replace Lightning's SIGTERM handler (registered just before) for the training loop.

        Lightning's own handler broadcasts from inside the signal handler and raises on the rank that got the signal
        at its next step end, while the other ranks wait in the next step's broadcast: under DDP a checkpoint saved
        then can hang (measured: 1 run in 2 on 2 CPU processes). This one only sets a flag (and forwards the signal to
        the processes Lightning's launcher started); the ranks agree on it at a step end and all save there.

        Lightning's per-step broadcast of its own flag (``_broadcast_sigterm_tensor``, with several ranks: a collective
        and a host sync at every step) then has nothing to carry: it is switched off for this run.
        """
        if not self.save_on_sigterm or threading.current_thread() is not threading.main_thread():
            return
        self._previous_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = _no_broadcast  # type: ignore[method-assign]

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self._stop_requested and self._trainer is not None:
            launcher = getattr(self._trainer.strategy, "launcher", None)
            if launcher is not None:  # Lightning's launcher started the other ranks: only this process got the signal
                launcher.kill(signum)
        self._stop_requested = True
        FaultTolerance.sigterm_received = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """At a step end after SIGTERM (on any rank): every rank saves ``preempted-step=<N>.ckpt`` and training stops.

        With several ranks the flag is summed over them at every step end (an all-reduce of a scalar, queued on the
        device) and every rank reads the sum one step later (:class:`mim.optim.LaggedRead`: no host sync, the queue
        stays full), so that all ranks save at the same step, the one after the signal.
        """
        if not self.save_on_sigterm or self.preempted_checkpoint is not None:
            return
        stop = self._stop_requested
        if trainer.world_size > 1:
            flag = torch.full((1,), float(stop), device=pl_module.device)  # a fill kernel: no host-to-device copy
            previous = self._agreed.pop()  # the previous step end's sum: the same on every rank
            self._agreed.push(trainer.strategy.reduce(flag, reduce_op="sum"))
            stop = previous is not None and previous[0][0] > 0
        if not stop:
            return
        FaultTolerance.sigterm_received = True
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = Path(folder) / f"preempted-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        self.preempted_checkpoint = path
        trainer.should_stop = True
        rank_zero_info(
            f"mim: SIGTERM at step {trainer.global_step}: saved {path}; resume with --ckpt_path last (or --resume auto)"
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_handler)
        self._previous_handler = None
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)  # Lightning's own again

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # Lightning's handler, outside the training loop (sanity check)
            FaultTolerance.sigterm_received = True
