"""Print the newest complete Lightning checkpoint under a folder (nothing when there is none).

``launch/slurm.sbatch`` runs this before ``srun`` and passes the result as ``--ckpt_path``, so a requeued (or
resubmitted) job resumes from whichever is newest of: the periodic ``ModelCheckpoint`` files (``last.ckpt``,
``epoch=..-step=...ckpt`` in any ``version_*/checkpoints/`` folder) and the ``hpc_ckpt_<n>.ckpt`` that Lightning's
SLURM handler writes on SIGUSR1. The rule (what "complete" and "newest" mean) is
:func:`mim.checkpoint.newest_checkpoint`, the same one ``mim fit --ckpt_path last`` uses. Usage::

    python launch/newest_checkpoint.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys

from mim.checkpoint import is_complete, newest_checkpoint

__all__ = ["is_complete", "newest_checkpoint"]


def main(argv: list[str] | None = None) -> int:
    roots = sys.argv[1:] if argv is None else argv
    if not roots:
        print(__doc__, file=sys.stderr)
        return 2
    newest = newest_checkpoint(*roots)
    if newest is not None:
        print(newest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
