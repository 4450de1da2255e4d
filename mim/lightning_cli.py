"""Recipes through LightningCLI: :class:`MimCLI` (``mim fit|validate|print_config``) and :func:`build`.

A recipe is YAML that LightningCLI (jsonargparse) parses into typed constructors: any ``LightningModule`` and
``LightningDataModule`` by ``class_path`` / ``init_args``, stacked ``-c`` files composing (e.g. a recipe plus a
``recipes/_base`` strategy piece). This module imports Lightning; ``mim.cli`` imports it only for the commands that
train, so ``mim masks``, ``mim export`` and ``mim --help`` start fast.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from mim.callbacks import FaultTolerance
from mim.checkpoint import CheckpointError, check_resume, newest_checkpoint

__all__ = ["MimCLI", "Preempted", "UserInputError", "build", "run"]


class MimCLI(LightningCLI):
    """LightningCLI with mim's defaults: any LightningModule / LightningDataModule by ``class_path``, the
    :class:`~mim.callbacks.FaultTolerance` callback on every trainer, and ``--ckpt_path last|auto``."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The recipe's trainer, with a :class:`~mim.callbacks.FaultTolerance` callback unless the recipe has one."""
        trainer = super().instantiate_trainer(**kwargs)
        callbacks: list = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        if not any(isinstance(c, FaultTolerance) for c in callbacks):
            callbacks.append(FaultTolerance())
        return trainer

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` to the newest complete checkpoint of the run, or stop when there is none (never
        a silent fresh start); ``--ckpt_path auto`` (for schedulers) resumes the same way or, with nothing to resume,
        starts a new run and says so. Then refuse a sharded checkpoint written at another world size before it is
        touched."""
        _check_writable(Path(self.trainer.default_root_dir))
        scheduler = self.config[self.subcommand].get("lr_scheduler")
        if scheduler is not None and type(self.model).__module__.startswith("mim."):
            owner = type(self.model).__name__
            raise ValueError(
                f"--lr_scheduler is not supported with {owner}: its warmup + cosine schedule (and lr scaling with the "
                f"effective batch) is built in, and Lightning would drop the flag. Set {owner}'s own arguments instead "
                "(--model.init_args.warmup_epochs / warmup_steps / min_lr / lr / blr), or subclass it and override "
                "configure_optimizers"
            )
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path in ("last", "auto"):
            root = Path(self.trainer.default_root_dir)
            newest = newest_checkpoint(root)
            if newest is None and ckpt_path == "last":
                raise CheckpointError(
                    f"--ckpt_path last: no complete checkpoint under {root} (trainer.default_root_dir), so there is "
                    "nothing to resume; drop --ckpt_path to start a new run (or use --ckpt_path auto, which starts "
                    "one when there is nothing to resume), or pass a checkpoint path"
                )
            if newest is None:
                rank_zero_info(f"mim: --ckpt_path auto: no complete checkpoint under {root}; starting a new run")
                ckpt_path = None
            else:
                rank_zero_info(f"mim: resuming from {newest}, the newest complete checkpoint under {root}")
                ckpt_path = str(newest)
            self.config_init[self.subcommand]["ckpt_path"] = ckpt_path
        check_resume(ckpt_path, self.trainer.world_size, strategy=self.trainer.strategy)


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and a file in it, so that an unwritable output folder stops the run before any step (and not
    at its first checkpoint). ``os.access`` is not enough: it says yes to root on a read-only mount.

    Raises:
        PermissionError / OSError: naming ``trainer.default_root_dir`` and what to do.
    """
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mim-write-test-"):
            pass
    except OSError as e:
        raise type(e)(
            e.errno,
            f"trainer.default_root_dir={str(folder)!r} is not writable ({e.strerror}); the run's logs and checkpoints "
            "go there: pass --trainer.default_root_dir=<a folder you can write to>",
        ) from None


def _cli(args: list[str], **kwargs: Any) -> MimCLI:
    return MimCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        **kwargs,
    )


def build(args: list[str], **kwargs: Any) -> MimCLI:
    """Instantiate model, datamodule and trainer from recipe arguments without running anything.

    Args:
        args: e.g. ``["--config", "recipes/quickstart.yaml", "--trainer.max_epochs=1"]``.
        **kwargs: extra ``LightningCLI`` arguments (e.g. ``save_config_callback=None``).

    Returns:
        The CLI with ``.model``, ``.datamodule`` and ``.trainer``.
    """
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return _cli(args, run=False, **kwargs)


class UserInputError(Exception):
    """A recipe, checkpoint, dataset or output folder that cannot work; the message is what to tell the user."""


class Preempted(Exception):
    """The run was stopped by SIGTERM (after :class:`~mim.callbacks.FaultTolerance` saved a checkpoint)."""


# Errors that describe the user's input or environment (a field, a file, a folder, the disk), not a bug in mim: the
# CLI prints their message and where they were raised instead of a traceback. Their messages name the field or file.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MisconfigurationException)


def _where(error: BaseException) -> str:
    """``file:line`` of the innermost frame that raised ``error`` (relative to the package folder when inside one)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    frame = frames[-1]
    parts = Path(frame.filename).parts
    for anchor in ("site-packages", "mim"):
        if anchor in parts:
            start = parts.index(anchor) + (anchor == "site-packages")
            return f"{Path(*parts[start:])}:{frame.lineno}"
    return f"{frame.filename}:{frame.lineno}"


# What torch.distributed reports when a peer process is gone (gloo, NCCL) or a collective times out.
_PEER_FAILURE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "NCCL communicator was aborted",
    "Watchdog caught collective operation timeout",
    "Socket Timeout",
    "timed out",
)


def _peer_failure(error: BaseException) -> bool:
    """Whether ``error`` says that another rank of the run died or stopped answering."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return "DistError" in names or any(text in str(error) for text in _PEER_FAILURE)


def _paragraph(error: BaseException) -> str:
    """The error's message as one paragraph (its lines joined), with where it was raised."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    if not text:
        text = type(error).__name__
    elif isinstance(error, OSError) and not isinstance(error, CheckpointError):
        text = f"{type(error).__name__}: {text}"
    return f"{text}\n  (raised at {_where(error)}; MIM_DEBUG=1 shows the traceback)"


def _constructor_errors(error: BaseException) -> list[str]:
    """The constructors' own messages inside jsonargparse's "Does not validate against any of the Union subtypes"."""
    lines = [line.strip()[2:] for line in str(error).splitlines() if line.strip().startswith("- ")]
    return [line for line in lines if not line.startswith("Expected a <class")]


def run(args: list[str]) -> None:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ...) with its arguments.

    Raises:
        UserInputError: a constructor refused its configuration (a ``ValueError`` naming the field), a checkpoint
            could not be read, written or resumed, the data does not fit the model, a file or folder is missing or
            unwritable, the disk is full; the traceback would add nothing.
        Preempted: SIGTERM stopped the run (its checkpoint is saved).
    """
    from mim.checkpoint import WorldSizeMismatchError
    from mim.checks import DataMismatchError
    from mim.optim import NonFiniteStepError

    try:
        cli = _cli(args, save_config_kwargs={"overwrite": True})
    except SIGTERMException as e:
        raise Preempted("stopped by SIGTERM; resume with --ckpt_path last (or --resume auto)") from e
    except (CheckpointError, WorldSizeMismatchError, DataMismatchError, NonFiniteStepError) as e:
        raise UserInputError(_paragraph(e)) from e
    except RuntimeError as e:
        if not _peer_failure(e):
            raise
        if FaultTolerance.sigterm_received:  # this rank was preempted too; a peer saved and exited first
            raise Preempted("stopped by SIGTERM (another rank saved the checkpoint and exited first)") from e
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserInputError(
            f"another process of this run died or stopped answering ({first}); its own log says why (out of memory, "
            "a killed node, a preemption). The steps after the last checkpoint are lost: fix the cause and resume "
            "with --ckpt_path last (or --resume auto)"
        ) from e
    except _USER_ERRORS as e:
        messages = _constructor_errors(e)
        if "Does not validate against any of the Union subtypes" in str(e) and messages:
            raise UserInputError("; ".join(messages)) from e
        raise UserInputError(_paragraph(e)) from e
    saved = [c.preempted_checkpoint for c in getattr(cli.trainer, "callbacks", []) if isinstance(c, FaultTolerance)]
    if any(saved):
        raise Preempted(f"stopped by SIGTERM after saving {next(p for p in saved if p)}; resume with --resume auto")
