"""The ``mim`` console script.

* ``mim fit|validate -c RECIPE.yaml [--trainer.max_epochs ...]``: LightningCLI over any recipe.
* ``mim pack SRC OUT/``: pack images into webdataset tar shards (see mim/data/pack.py).
* ``mim quickstart``: MAE on Fashion-MNIST on CPU, then a linear-probe table (see mim/quickstart.py).
* ``mim masks --strategy NAME --grid 14x14 [--frames T] --out masks.png``: a picture of sample masks (mim/viz.py).

Lightning is imported only by the commands that need it (``fit``, ``validate``, ``print_config``, :func:`build`,
and the first use of :class:`MimCLI`), so ``mim masks``, ``mim --help`` and friends start ~5 s faster.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

    class MimCLI(LightningCLI):
        """LightningCLI with mim's defaults: any LightningModule / LightningDataModule by ``class_path``."""


__all__ = ["MimCLI", "build", "main"]

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


@functools.cache
def _mim_cli_class() -> type[MimCLI]:
    """Define :class:`MimCLI` (a real LightningCLI subclass, importing Lightning) once, on first use."""
    from lightning.pytorch.cli import LightningCLI

    class MimCLI(LightningCLI):
        """LightningCLI with mim's defaults: any LightningModule / LightningDataModule by ``class_path``."""

        def before_fit(self) -> None:
            """Refuse a sharded checkpoint written at another world size before any process touches it."""
            from mim.distributed import check_resume

            ckpt_path = self.config[self.subcommand].get("ckpt_path")
            check_resume(ckpt_path, self.trainer.world_size, strategy=self.trainer.strategy)

    MimCLI.__module__, MimCLI.__qualname__ = __name__, "MimCLI"
    globals()["MimCLI"] = MimCLI  # later look-ups (and pickling by reference) find it without __getattr__
    cls: Any = MimCLI  # for type checkers, the TYPE_CHECKING declaration above
    return cls


def __getattr__(name: str) -> Any:
    """``from mim.cli import MimCLI`` defines the class (and imports Lightning) only when asked for (PEP 562)."""
    if name == "MimCLI":
        return _mim_cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cli(args: list[str], **kwargs) -> MimCLI:
    from lightning.pytorch import LightningDataModule, LightningModule

    return _mim_cli_class()(
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
    if argv[0] == "export":
        from mim.export import main as export

        return export(argv[1:])
    if argv[0] == "print_config":
        argv = ["fit", *argv[1:], "--print_config"]
    _cli(argv, save_config_kwargs={"overwrite": True})
    return 0
