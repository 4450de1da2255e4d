"""The ``mim`` console script.

* ``mim fit|validate -c RECIPE.yaml [--trainer.max_epochs ...]``: LightningCLI over any recipe.
* ``mim pack SRC OUT/``: pack images into webdataset tar shards (see mim/data/pack.py).
* ``mim quickstart``: MAE on Fashion-MNIST on CPU, then a linear-probe table (see mim/quickstart.py).
* ``mim masks --strategy NAME --grid 14x14 [--frames T] --out masks.png``: a picture of sample masks (mim/masks_cli.py).

Lightning is imported only by the commands that train (``fit``, ``validate``, ``print_config``: through
:mod:`mim.lightning_cli`), so ``mim masks``, ``mim --help`` and friends start ~5 s faster.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

_USAGE = """usage: mim <command> [options]

commands:
  fit -c RECIPE.yaml [--trainer.max_epochs N ...]   pretrain with a recipe (LightningCLI; --help for all options)
  validate -c RECIPE.yaml --ckpt_path CKPT           validation loss of a checkpoint
  print_config -c RECIPE.yaml                        print the fully resolved recipe
  quickstart [--help]                                MAE on Fashion-MNIST on CPU + linear-probe table
  pack SRC OUT/ [--shard-size 1GB --resize-short 256]  pack an image folder or list file into tar shards
  masks --strategy NAME [--grid 14x14 --frames T --set k=v --out masks.png|.gif]  picture of sample masks
  export CKPT OUT.safetensors                        the encoder as a timm state dict (+ config)
"""


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
        from mim.masks_cli import main as masks

        return masks(argv[1:])
    if argv[0] == "export":
        from mim.export import main as export

        return export(argv[1:])
    if argv[0] == "print_config":
        argv = ["fit", *argv[1:], "--print_config"]
    from mim.lightning_cli import run

    run(argv)
    return 0
