"""Recipes through LightningCLI: :class:`MimCLI` (``mim fit|validate|print_config``) and :func:`build`.

A recipe is YAML that LightningCLI (jsonargparse) parses into typed constructors: any ``LightningModule`` and
``LightningDataModule`` by ``class_path`` / ``init_args``, stacked ``-c`` files composing (e.g. a recipe plus a
``recipes/_base`` strategy piece). This module imports Lightning; ``mim.cli`` imports it only for the commands that
train, so ``mim masks``, ``mim export`` and ``mim --help`` start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from mim.checkpoint import CheckpointError, check_resume, newest_checkpoint

__all__ = ["MimCLI", "UserInputError", "build", "run"]


class MimCLI(LightningCLI):
    """LightningCLI with mim's defaults: any LightningModule / LightningDataModule by ``class_path``."""

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` to the newest complete checkpoint of the run, or stop when there is none (never
        a silent fresh start), and refuse a sharded checkpoint written at another world size before it is touched."""
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path == "last":
            root = Path(self.trainer.default_root_dir)
            newest = newest_checkpoint(root)
            if newest is None:
                raise CheckpointError(
                    f"--ckpt_path last: no complete checkpoint under {root} (trainer.default_root_dir), so there is "
                    "nothing to resume; drop --ckpt_path to start a new run, or pass a checkpoint path"
                )
            rank_zero_info(f"mim: resuming from {newest}, the newest complete checkpoint under {root}")
            ckpt_path = str(newest)
            self.config_init[self.subcommand]["ckpt_path"] = ckpt_path
        check_resume(ckpt_path, self.trainer.world_size, strategy=self.trainer.strategy)


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
    """A recipe, checkpoint or dataset that cannot work, found before training; the message is what to tell the user."""


def _constructor_errors(error: BaseException) -> list[str]:
    """The constructors' own messages inside jsonargparse's "Does not validate against any of the Union subtypes"."""
    lines = [line.strip()[2:] for line in str(error).splitlines() if line.strip().startswith("- ")]
    return [line for line in lines if not line.startswith("Expected a <class")]


def run(args: list[str]) -> None:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ...) with its arguments.

    Raises:
        UserInputError: a constructor refused its configuration (a ``ValueError`` naming the field), a checkpoint
            could not be read or resumed, or the data does not fit the model; the traceback would add nothing.
    """
    from mim.checkpoint import CheckpointError, WorldSizeMismatchError
    from mim.checks import DataMismatchError

    try:
        _cli(args, save_config_kwargs={"overwrite": True})
    except (CheckpointError, WorldSizeMismatchError, DataMismatchError) as e:
        raise UserInputError(str(e)) from e
    except ValueError as e:
        messages = _constructor_errors(e)
        if "Does not validate against any of the Union subtypes" in str(e) and messages:
            raise UserInputError("; ".join(messages)) from e
        raise
