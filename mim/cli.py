"""The ``mim`` console script.

* ``mim fit|validate|test|predict -c RECIPE.yaml [--trainer.max_epochs ...]``: LightningCLI over any recipe.
* ``mim finetune -c RECIPE.yaml [--encoder student|target]``: ``fit`` on a fine-tuning recipe (mim/finetune.py).
* ``mim pack SRC OUT/``: pack images into webdataset tar shards (see mim/data/pack.py).
* ``mim quickstart``: MAE on Fashion-MNIST on CPU, then a linear-probe table (see mim/quickstart.py).
* ``mim eval CKPT --data RECIPE.yaml``: linear / k-NN / attentive probes on frozen features (mim/evaluation.py).
* ``mim masks --strategy NAME --grid 14x14 [--frames T] --out masks.png``: a picture of sample masks (mim/masks_cli.py).

Lightning is imported only by the commands that train (``fit``, ``validate``, ``print_config``: through
:mod:`mim.lightning_cli`), so ``mim masks``, ``mim --help`` and friends start ~5 s faster.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]

_USAGE = """usage: mim <command> [options]

commands:
  fit -c RECIPE.yaml [--trainer.max_epochs N ...]   pretrain with a recipe (LightningCLI; --help for all options)
      [--resume auto|last|CKPT]                      auto: continue the newest complete checkpoint, else start;
                                                     last: continue it or stop with an error
  finetune -c RECIPE.yaml [--encoder student|target] fine-tune a pretrained encoder (recipes/finetune/)
  test -c RECIPE.yaml --ckpt_path CKPT               metrics of a checkpoint on the test loader
  validate -c RECIPE.yaml --ckpt_path CKPT           validation loss of a checkpoint
  predict -c RECIPE.yaml --ckpt_path CKPT            encoder features (pretraining) or class probabilities (fine-tuning)
  print_config -c RECIPE.yaml                        print the fully resolved recipe
  quickstart [--help]                                MAE on Fashion-MNIST on CPU + linear-probe table
  pack SRC OUT/ [--shard-size 1GB --resize-short 256]  pack an image folder or list file into tar shards
  masks --strategy NAME [--grid 14x14 --frames T --set k=v --out masks.png|.gif]  picture of sample masks
  export CKPT OUT/ [--img-size S]                   the encoder as a timm model folder (weights, config, data)
  eval CKPT --data RECIPE.yaml [--out results.json]  linear, k-NN, attentive probes on frozen features
"""


def _resume_args(args: list[str]) -> list[str]:
    """``--resume X`` is ``--ckpt_path X`` (``auto``: the newest complete checkpoint of the run, or a new run)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--resume" and i + 1 < len(args):
            out.append(f"--ckpt_path={args[i + 1]}")
            i += 2
            continue
        out.append(f"--ckpt_path={args[i].split('=', 1)[1]}" if args[i].startswith("--resume=") else args[i])
        i += 1
    return out


def _finetune_args(args: list[str]) -> list[str]:
    """``mim finetune`` is ``mim fit`` on a FinetuneModule recipe; ``--encoder X`` picks the checkpoint's encoder."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--encoder" and i + 1 < len(args):
            out.append(f"--model.init_args.which_encoder={args[i + 1]}")
            i += 2
            continue
        if arg.startswith("--encoder="):
            out.append(f"--model.init_args.which_encoder={arg.split('=', 1)[1]}")
        else:
            out.append(arg)
        i += 1
    return out


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
    if argv[0] == "eval":
        from mim.evaluation import main as evaluate

        return evaluate(argv[1:])
    if argv[0] == "export":
        from mim.export import main as export

        return export(argv[1:])
    command = argv[0]
    argv = _resume_args(argv)
    if argv[0] == "finetune":
        argv = ["fit", *_finetune_args(argv[1:])]
    if argv[0] == "print_config":
        argv = ["fit", *argv[1:], "--print_config"]
    from mim.lightning_cli import Preempted, UserInputError, run

    try:
        run(argv)
    except UserInputError as e:  # bad input, a missing file, a full disk: one paragraph (MIM_DEBUG=1 re-raises)
        if os.environ.get("MIM_DEBUG") == "1":
            raise
        print(f"mim {command}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:  # SIGTERM: the checkpoint is saved; 128 + 15 as a shell reports a SIGTERM death
        print(f"mim {command}: {e}", file=sys.stderr)
        return 143
    return 0
