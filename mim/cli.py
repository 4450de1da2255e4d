"""The ``mim`` console script.

* ``mim fit|validate -c RECIPE.yaml [--trainer.max_epochs ...]``: LightningCLI over any recipe.
* ``mim pack SRC OUT/``: pack images into webdataset tar shards (see mim/data/pack.py).
* ``mim quickstart``: MAE on Fashion-MNIST on CPU, then a linear-probe table (see mim/quickstart.py).
* ``mim masks --strategy NAME --grid 14x14 [--frames T] --out masks.png``: a picture of sample masks (mim/viz.py).
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

__all__ = ["MimCLI", "build", "main"]

_USAGE = """usage: mim <command> [options]

commands:
  fit -c RECIPE.yaml [--trainer.max_epochs N ...]   pretrain with a recipe (LightningCLI; --help for all options)
  validate -c RECIPE.yaml --ckpt_path CKPT           validation loss of a checkpoint
  print_config -c RECIPE.yaml                        print the fully resolved recipe
  quickstart [--help]                                MAE on Fashion-MNIST on CPU + linear-probe table
  pack SRC OUT/ [--shard-size 1GB --resize-short 256]  pack an image folder or list file into tar shards
  masks --strategy NAME [--grid 14x14 --frames T --set k=v --out masks.png|.gif]  picture of sample masks
"""


class MimCLI(LightningCLI):
    """LightningCLI with mim's defaults: any LightningModule / LightningDataModule by ``class_path``."""


def _cli(args: list[str], **kwargs) -> MimCLI:
    return MimCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        **kwargs,
    )


def build(args: list[str], **kwargs) -> MimCLI:
    """Instantiate model, datamodule and trainer from recipe arguments without running anything.

    Args:
        args: e.g. ``["--config", "recipes/quickstart.yaml", "--trainer.max_epochs=1"]``.
        **kwargs: extra ``LightningCLI`` arguments (e.g. ``save_config_callback=None``).

    Returns:
        The CLI with ``.model``, ``.datamodule`` and ``.trainer``.
    """
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return _cli(args, run=False, **kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0
    if argv[0] == "quickstart":
        from mim.quickstart import main as quickstart

        return quickstart(argv[1:])
    if argv[0] == "pack":
        from mim.data.pack import main as pack

        return pack(argv[1:])
    if argv[0] == "masks":
        from mim.viz import main as masks

        return masks(argv[1:])
    if argv[0] == "print_config":
        argv = ["fit", *argv[1:], "--print_config"]
    _cli(argv, save_config_kwargs={"overwrite": True})
    return 0
