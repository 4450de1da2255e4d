"""Callbacks the launch tests add to real `mim fit` runs by class_path (``--trainer.callbacks+=...``).

They live in the test tree, not in mim: a subprocess started with ``PYTHONPATH=<repo root>`` imports them as
``tests.launch_helpers.RunRecord`` and ``tests.launch_helpers.Preempt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the module's state dict (sorted keys, exact bytes of every tensor as fp32 on the CPU)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _record(trainer: L.Trainer, module: L.LightningModule, out_dir: str, extra: dict) -> None:
    env = trainer._accelerator_connector.cluster_environment
    record = {
        "global_rank": trainer.global_rank,
        "node_rank": trainer.node_rank,
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "global_step": trainer.global_step,
        "cluster_environment": type(env).__name__,
        "strategy": type(trainer.strategy).__name__,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "weights": weights_digest(module),
        **extra,
    }
    path = Path(out_dir) / f"rank{trainer.global_rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


class RunRecord(L.Callback):
    """Writes ``out_dir/rank<R>.json`` at the end of training: rank, world, steps, cluster environment, weights hash.

    Args:
        out_dir: folder for the per-rank records.
    """

    def __init__(self, *, out_dir: str) -> None:
        self.out_dir = out_dir
        self.initial = ""
        self.losses: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = weights_digest(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))  # a host sync per step is fine in a test

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _record(trainer, pl_module, self.out_dir, {"initial_weights": self.initial, "losses": self.losses})


class Preempt(L.Callback):
    """Plays SLURM's preemption: at ``at_step`` raises SIGUSR1 (what ``#SBATCH --signal=SIGUSR1@90`` delivers),
    so Lightning's SLURM handler saves ``hpc_ckpt_<n>.ckpt`` and calls ``scontrol requeue``; then the process dies
    at once, as when SLURM kills a requeued job (no checkpoint callbacks run).

    Args:
        at_step: optimizer step after which the signal arrives.
        out_dir: folder for ``rank<R>.json`` written just before the exit.
    """

    def __init__(self, *, at_step: int, out_dir: str) -> None:
        self.at_step = at_step
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.at_step:
            signal.raise_signal(signal.SIGUSR1)  # the Python-level handler runs before this returns
            _record(trainer, pl_module, self.out_dir, {"preempted": True})
            os._exit(0)


class StepLog(L.Callback):
    """Appends one JSON line per optimizer step to ``path`` (flushed at once, so a killed run keeps its lines):
    ``{"step", "loss", "lr", "rank"}`` with the loss and lr as exact float reprs.

    Args:
        path: the JSON-lines file (rank R > 0 writes ``path`` with ``.rank<R>`` appended).
    """

    def __init__(self, *, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        path = self.path if trainer.global_rank == 0 else f"{self.path}.rank{trainer.global_rank}"
        line = {
            "step": trainer.global_step,
            "loss": float(outputs["loss"]),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "rank": trainer.global_rank,
        }
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()


class Hang(L.Callback):
    """At optimizer step ``at_step`` (on rank ``rank``) writes ``marker`` and sleeps, so that a test can kill the
    process at a known step (SIGKILL, SIGTERM) without racing the run's end.

    Args:
        at_step: the optimizer step after which to stop.
        marker: a file written (with the process id) when the hang starts.
        rank: the rank that hangs (others go on, and block in the next collective).
        seconds: how long to sleep.
    """

    def __init__(self, *, at_step: int, marker: str, rank: int = 0, seconds: float = 600.0) -> None:
        self.at_step, self.marker, self.rank, self.seconds = at_step, marker, rank, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.at_step and trainer.global_rank == self.rank:
            Path(self.marker).write_text(str(os.getpid()))
            import time

            deadline = time.monotonic() + self.seconds
            from mim.callbacks import FaultTolerance

            while time.monotonic() < deadline and not (trainer.received_sigterm or FaultTolerance.sigterm_received):
                time.sleep(0.05)


class PoisonBatch(L.Callback):
    """Fills the first image of the training batches with these indices (within the epoch) with NaN, before the
    training step sees them: a corrupt sample that makes the step's loss non-finite.

    Args:
        steps: batch indices (``batch_idx``) to poison.
    """

    def __init__(self, *, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx in self.steps:
            batch["image"][0].fill_(float("nan"))
