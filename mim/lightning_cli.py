"""Recipes through LightningCLI: :class:`MimCLI` (``mim fit|validate|print_config``) and :func:`build`.

A recipe is YAML that LightningCLI (jsonargparse) parses into typed constructors: any ``LightningModule`` and
``LightningDataModule`` by ``class_path`` / ``init_args``, stacked ``-c`` files composing (e.g. a recipe plus a
``recipes/_base`` strategy piece). This module imports Lightning; ``mim.cli`` imports it only for the commands that
train, so ``mim masks``, ``mim export`` and ``mim --help`` start fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from mim.callbacks import FaultTolerance, RunMetrics, RunPictures, RunProgressBar
from mim.checkpoint import CheckpointError, check_resume, newest_checkpoint
from mim.run_logging import (
    LogConfig,
    WandbRunId,
    checkpoint_run_id,
    default_logger,
    finetune_command,
    finish_wandb,
    log_location,
    summary,
)

__all__ = ["MimCLI", "Preempted", "UserInputError", "build", "run"]


class MimCLI(LightningCLI):
    """LightningCLI with mim's defaults: any LightningModule / LightningDataModule by ``class_path``, the
    :class:`~mim.callbacks.FaultTolerance` callback on every trainer, ``--ckpt_path last|auto``, wandb as the default
    logger of ``fit`` (CSV under ``WANDB_MODE=disabled`` or when wandb cannot start; :mod:`mim.run_logging`) continuing
    the checkpoint's wandb run on resume, the resolved config logged, start-up checks (:class:`_StartChecks`), and a
    summary at the end of ``fit`` (with the exact fine-tune command, :func:`~mim.run_logging.finetune_command`)."""

    _args: list[str]
    _newest: dict[Path, Path | None]
    _resume_run_id: str | None = None

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (mim always passes them: Lightning's warning about ``args`` with ``sys.argv`` does not apply)
        and keep them for the end summary's resume command."""
        self._args = [str(a) for a in args] if isinstance(args, list | tuple) else []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def _newest_checkpoint(self, root: Path) -> Path | None:
        """:func:`~mim.checkpoint.newest_checkpoint` under ``root``, looked up once per run (it reports skipped files)."""
        cache = self.__dict__.setdefault("_newest", {})
        key = root.resolve()
        if key not in cache:
            cache[key] = newest_checkpoint(root)
        return cache[key]

    def before_instantiate_classes(self) -> None:
        """For ``fit`` resuming a checkpoint (``--ckpt_path PATH|last|auto``), read the wandb run id it stores, so the
        default logger continues that run."""
        self._resume_run_id = None
        if self.subcommand != "fit":
            return
        config = self.config["fit"]
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in ("last", "auto"):
            ckpt_path = self._newest_checkpoint(_root_dir(config["trainer"].get("default_root_dir")))
        self._resume_run_id = checkpoint_run_id(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The recipe's trainer, with mim's default callbacks unless the recipe has its own (:class:`~mim.callbacks.
        FaultTolerance`, the wandb run id, :class:`~mim.callbacks.RunMetrics`, :class:`~mim.callbacks.RunPictures`), and
        mim's default logger (:func:`~mim.run_logging.default_logger`) when the recipe sets no ``trainer.logger``."""
        trainer_config = (
            self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        )
        if "logger" not in kwargs and trainer_config.get("logger") in (None, True):
            recipes = self._recipes()
            kwargs["logger"] = default_logger(
                _root_dir(trainer_config.get("default_root_dir")),
                name=Path(recipes[0]).stem if recipes else None,
                run_id=self._resume_run_id,
                wandb=self.subcommand == "fit",
                settings=self._wandb_settings(),
            )
        trainer = super().instantiate_trainer(**kwargs)
        callbacks: list = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
        for default in (FaultTolerance, WandbRunId, RunMetrics, RunPictures):  # unless the recipe configures its own
            if not any(isinstance(c, default) for c in callbacks):
                callbacks.append(default())
        callbacks.append(_StartChecks())
        for i, c in enumerate(callbacks):  # Lightning's default bar restarts every epoch: one bar over the run instead
            if type(c) is TQDMProgressBar:
                callbacks[i] = RunProgressBar(refresh_rate=c.refresh_rate)
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """A ``wandb:`` section of the recipe: ``project``, ``name``, ``group``, ``tags``, ``entity``, ``notes`` of the
        default logger's run (``WANDB_PROJECT`` ... environment variables win over it)."""
        for key, kind in (("project", str), ("name", str), ("group", str), ("entity", str), ("notes", str)):
            parser.add_argument(f"--wandb.{key}", type=kind | None, default=None, help=f"wandb run {key}")
        parser.add_argument("--wandb.tags", type=list[str] | None, default=None, help="wandb run tags")

    def _run_config(self) -> Any:
        """This run's parsed configuration (the subcommand's section, or the whole of it under ``build``)."""
        return self.config[self.subcommand] if self.subcommand else self.config

    def _wandb_settings(self) -> dict[str, Any]:
        section = self._run_config().get("wandb")
        return {} if section is None else dict(section.as_dict() if hasattr(section, "as_dict") else section)

    def _recipes(self) -> list[str]:
        """The ``-c`` files of this run, in order."""
        config = self._run_config()
        return [str(getattr(p, "absolute", p)) for p in (config.get("config") or [])]

    def after_fit(self) -> None:
        """On rank 0: where the checkpoints and logs are, and the commands that resume, export and fine-tune."""
        if not self.trainer.is_global_zero:
            return
        ckpt = self.trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", None) or None
        last = getattr(ckpt, "last_model_path", None) or None
        if last is None and ckpt is not None:
            last = getattr(ckpt, "_last_checkpoint_saved", None) or None
        args = _without_ckpt_path(self._args[1:] if self._args[:1] == ["fit"] else self._args)
        ckpt_path = best or last
        finetune = None
        if ckpt_path and "finetune" not in type(self.model).__module__:
            config = json.loads(json.dumps(self._run_config().as_dict(), default=str))
            finetune = finetune_command(ckpt_path, config, recipes=self._recipes())
        rank_zero_info(
            summary(
                best=best,
                last=last,
                logs=log_location(self.trainer),
                resume=[*args, "--resume", "auto"],
                finetune=finetune,
            )
        )

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
            newest = self._newest_checkpoint(root)
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


def _root_dir(default_root_dir: str | os.PathLike | None) -> Path:
    """``trainer.default_root_dir`` as the Trainer resolves it (the working directory when unset)."""
    return Path(default_root_dir) if default_root_dir else Path(os.getcwd())


def _without_ckpt_path(args: list[str]) -> list[str]:
    """``args`` less any ``--ckpt_path X`` / ``--ckpt_path=X``, quoted for a shell."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            out.append(shlex.quote(arg))
    return out


# Start-up noise that says nothing about a mim run, dropped by message (and only inside `mim fit|validate|...`).
_QUIET_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's pytree helper on newer torch
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
)
_EVAL_MODE_WARNING = (  # Lightning's, word for word: EMA copies are in eval mode by design; _StartChecks says which
    r"Found \d+ module\(s\) in eval mode at the start of training\. This may lead to unexpected behavior during "
    r"training\. If this is intentional, you can ignore this warning\.\Z"
)


class _StartChecks(Callback):
    """Start-up checks of ``mim fit`` that replace two of Lightning's generic warnings with mim's own facts.

    * A datamodule without validation data (its ``val_dataloader()`` is ``[]``, e.g. an image folder without
      ``val_root``): ``trainer.limit_val_batches`` is set to 0, so Lightning runs no validation instead of asking for
      the empty loader and warning that its length is zero across ranks.
    * Modules in eval mode at the start of training: EMA copies (:class:`mim.ema.EMA`, teachers and target encoders)
      are by design, and Lightning's warning about them is dropped (:data:`_EVAL_MODE_WARNING`); any other module in
      eval mode is named in a warning.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        data = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
        if stage != "fit" or trainer.limit_val_batches == 0 or data is None:
            return
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if is_overridden("val_dataloader", data) and data.val_dataloader() in ([], ()):
            trainer.limit_val_batches = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from mim.ema import EMA

        copies = [name for name, m in pl_module.named_modules() if isinstance(m, EMA)]
        inside = tuple(f"{name}.module" for name in copies)
        stray = [
            name or type(pl_module).__name__
            for name, m in pl_module.named_modules()
            if not m.training and not any(name == c or name.startswith(c + ".") for c in inside)
        ]
        if stray:
            shown = ", ".join(stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
            rank_zero_warn(
                f"mim: {len(stray)} module(s) are in eval mode at the start of training ({shown}): dropout, drop path "
                "and batch-norm statistics behave as at inference there; call .train() on them if that is a mistake"
            )


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Within: the warnings of :data:`_QUIET_WARNINGS`, Lightning's eval-mode warning (:data:`_EVAL_MODE_WARNING`,
    replaced by :class:`_StartChecks`) and Lightning's product tips are not shown."""
    tips = _DropTips()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch")]
    with warnings.catch_warnings():
        for pattern in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", message=_EVAL_MODE_WARNING, category=PossibleUserWarning)
        for lg in loggers:
            lg.addFilter(tips)
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeFilter(tips)


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
    kwargs.setdefault("save_config_callback", LogConfig)
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
    try:
        with _quiet():
            cli = _run(args)
    except BaseException:
        finish_wandb(exit_code=1)
        raise
    finish_wandb()
    saved = [c.preempted_checkpoint for c in getattr(cli.trainer, "callbacks", []) if isinstance(c, FaultTolerance)]
    if any(saved):
        raise Preempted(f"stopped by SIGTERM after saving {next(p for p in saved if p)}; resume with --resume auto")


def _run(args: list[str]) -> MimCLI:
    """:func:`run` before its wandb run is finished: the CLI, with its failures turned into mim's exceptions."""
    from mim.checkpoint import WorldSizeMismatchError
    from mim.checks import DataMismatchError
    from mim.optim import NonFiniteStepError

    try:
        return _cli(args, save_config_kwargs={"overwrite": True})
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
