"""Print the newest complete Lightning checkpoint under a folder (nothing when there is none).

``launch/slurm.sbatch`` runs this before ``srun`` and passes the result as ``--ckpt_path``, so a requeued (or
resubmitted) job resumes from whichever is newest of: the periodic ``ModelCheckpoint`` files (``last.ckpt``,
``epoch=..-step=...ckpt`` in any ``version_*/checkpoints/`` folder) and the ``hpc_ckpt_<n>.ckpt`` that Lightning's
SLURM handler writes on SIGUSR1. "Newest" is the modification time (what Lightning's ``ckpt_path="last"`` uses).

"Complete" means, without loading any tensors:

* a single-file checkpoint (``torch.save``'s zip format): the zip's central directory (written last) reads and
  lists a ``data.pkl``; a file cut short by a crash or a full disk fails that check;
* a DeepSpeed checkpoint folder: its ``latest`` file (written after all shards) names a tag folder whose files
  are all readable zips and none is newer than ``latest`` (DeepSpeed rewrites the folder in place, so a crash
  mid-save leaves shards newer than ``latest``);
* a torch.distributed.checkpoint folder (FSDP2 / ModelParallelStrategy): ``.metadata`` (written after all
  shards) is present and non-empty, and Lightning's ``meta.pt``, when present, is a readable zip.

Anything else is skipped with a note on stderr. Usage::

    python launch/newest_checkpoint.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

__all__ = ["is_complete", "newest_checkpoint"]


def _zip_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _mtime(path: Path) -> float:
    """The time a checkpoint was completed: the file's, or a sharded folder's marker file's."""
    if path.is_dir():
        markers = [m for m in (path / "latest", path / "meta.pt", path / ".metadata") if m.is_file()]
        return max((m.stat().st_mtime for m in markers), default=path.stat().st_mtime)
    return path.stat().st_mtime


def is_complete(path: Path) -> bool:
    """Whether ``path`` (a checkpoint file or a sharded checkpoint folder) was written to the end."""
    if path.is_file():
        return _zip_ok(path)
    if not path.is_dir():
        return False
    latest = path / "latest"
    if latest.is_file():  # DeepSpeed
        tag = path / latest.read_text().strip()
        files = [f for f in tag.rglob("*") if f.is_file()] if tag.is_dir() else []
        done = latest.stat().st_mtime
        return bool(files) and all(f.stat().st_mtime <= done and _zip_ok(f) for f in files)
    metadata = path / ".metadata"
    if metadata.is_file():  # torch.distributed.checkpoint
        meta = path / "meta.pt"
        return metadata.stat().st_size > 0 and (not meta.exists() or _zip_ok(meta))
    return False


def newest_checkpoint(*roots: str | Path) -> Path | None:
    """The newest complete ``*.ckpt`` (file or folder) under the roots, or None."""
    found: list[tuple[float, str, Path]] = []
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for path in root.rglob("*.ckpt"):
            if any(parent.suffix == ".ckpt" for parent in path.relative_to(root).parents):
                continue  # inside a sharded checkpoint folder
            path = path.resolve() if path.is_symlink() else path  # save_last="link"
            if not path.exists():
                continue
            if is_complete(path):
                found.append((_mtime(path), str(path), path))
            else:
                print(f"newest_checkpoint: skipping incomplete checkpoint {path}", file=sys.stderr)
    return max(found)[2] if found else None


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
