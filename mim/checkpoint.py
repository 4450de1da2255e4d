"""Reading sharded and plain checkpoints without Lightning: what a checkpoint is, who wrote it, its fp32 weights.

mim trains under DeepSpeed ZeRO-1/2/3 (a checkpoint *directory* with one ``*_model_states.pt`` / ``*_optim_states.pt``
per rank under a tag folder), FSDP2 (a torch.distributed.checkpoint directory: ``.metadata`` and ``__<rank>_<i>.distcp``
files, plus Lightning's ``meta.pt``) and single-file strategies (a Lightning ``.ckpt``). This module tells them apart
(:func:`checkpoint_kind`, :func:`checkpoint_world_size`), refuses a resume that cannot work (:func:`check_resume`:
DeepSpeed shards optimizer state by world size, FSDP2 reshards on load) and turns any of them into one fp32 state dict
(:func:`consolidate_checkpoint`) for ``mim export`` and fine-tuning. It imports neither Lightning nor DeepSpeed (the
DeepSpeed reader is imported only to consolidate a DeepSpeed folder).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "WorldSizeMismatchError",
    "check_resume",
    "checkpoint_kind",
    "checkpoint_world_size",
    "consolidate_checkpoint",
    "is_complete",
    "newest_checkpoint",
    "read_checkpoint",
    "strategy_family",
]

_DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index file
_LIGHTNING_META = "meta.pt"  # Lightning's non-tensor part of a distributed checkpoint
_DEEPSPEED_KEYS = {  # DeepSpeed's own entries in a model-states file (everything else is Lightning's client state)
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "ds_config",
    "ds_version",
    "autoep_layers",
    "ds_autotp_universal_checkpoint_info",
    "compiled_autograd_config",
    "checkpoint_parallel_dimensions",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupt, or not written by mim. The message is one line."""


class WorldSizeMismatchError(RuntimeError):
    """A sharded checkpoint cannot be resumed by this run (another world size, or another strategy family)."""


def checkpoint_kind(path: str | os.PathLike) -> str:
    """What ``path`` holds: ``"deepspeed"``, ``"dcp"`` (torch.distributed.checkpoint, FSDP2) or ``"file"``.

    Raises:
        FileNotFoundError: when ``path`` does not exist or is a directory of neither kind.
    """
    p = Path(path)
    if p.is_file():
        return "file"
    if p.is_dir():
        if (p / _DCP_METADATA).is_file():
            return "dcp"
        if _deepspeed_tag_dir(p) is not None:
            return "deepspeed"
        raise FileNotFoundError(
            f"{p} is a directory but neither a DeepSpeed checkpoint (no 'latest' file or '*_model_states.pt') "
            f"nor a torch.distributed.checkpoint one (no '{_DCP_METADATA}')"
        )
    raise FileNotFoundError(f"checkpoint {p} does not exist")


def _deepspeed_tag_dir(path: Path) -> Path | None:
    """The folder with DeepSpeed's ``*_model_states.pt`` files (``path/<tag from 'latest'>``), or None."""
    latest = path / "latest"
    tags = [latest.read_text().strip()] if latest.is_file() else []
    tags += [d.name for d in sorted(path.iterdir()) if d.is_dir()]
    for tag in tags:
        if any((path / tag).glob("*_model_states.pt")):
            return path / tag
    return None


def checkpoint_world_size(path: str | os.PathLike) -> int | None:
    """The number of ranks that wrote a sharded checkpoint (None for a plain file).

    DeepSpeed writes one ``*_optim_states.pt`` per data-parallel rank; torch.distributed.checkpoint one
    ``__<rank>_<i>.distcp`` file (at least) per rank.
    """
    kind = checkpoint_kind(path)
    if kind == "file":
        return None
    if kind == "deepspeed":
        tag = _deepspeed_tag_dir(Path(path))
        assert tag is not None
        return len(list(tag.glob("*_optim_states.pt"))) or None
    ranks = {int(m.group(1)) for f in Path(path).iterdir() if (m := re.fullmatch(r"__(\d+)_\d+\.distcp", f.name))}
    return len(ranks) or None


def strategy_family(strategy: object) -> str:
    """The checkpoint format a training strategy writes: ``deepspeed``, ``dcp`` (FSDP2) or ``other`` (one file).

    Decided from the class names in the strategy's MRO (Lightning's ``DeepSpeedStrategy`` and ``ModelParallelStrategy``
    and their subclasses), so that reading a checkpoint never imports Lightning.
    """
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if "DeepSpeedStrategy" in names:
        return "deepspeed"
    if "ModelParallelStrategy" in names:
        return "dcp"
    return "other"


def check_resume(path: str | os.PathLike | None, world_size: int, *, strategy: object | None = None) -> None:
    """Refuse, before anything is loaded, to resume a checkpoint that this world size cannot read.

    * DeepSpeed checkpoints (any ZeRO stage) partition the optimizer state (and, in ZeRO-3, the weights) by
      data-parallel rank: they resume only at the world size that wrote them.
    * FSDP2 distributed checkpoints reshard on load (torch.distributed.checkpoint): any world size works.
    * A sharded directory cannot be resumed by a strategy of the other family (e.g. ``ddp``).

    Args:
        path: the ``ckpt_path`` of the run (None: nothing to check).
        world_size: the resuming run's world size (``trainer.world_size``).
        strategy: the resuming run's strategy (to check the family), optional.

    Raises:
        WorldSizeMismatchError: with what to do instead.
    """
    if path is None or str(path) in ("last", "best", "hpc", "registry") or not Path(path).exists():
        return
    kind = checkpoint_kind(path)
    if kind == "file":
        return
    saved = checkpoint_world_size(path)
    family = None if strategy is None else strategy_family(strategy)
    if family is not None and family != kind:
        raise WorldSizeMismatchError(
            f"{path} is a {'DeepSpeed' if kind == 'deepspeed' else 'FSDP2 (torch.distributed.checkpoint)'} checkpoint "
            f"directory, but this run uses {type(strategy).__name__}. Resume it with the strategy that wrote it, or "
            "start a new run from its consolidated weights (mim.checkpoint.consolidate_checkpoint / mim export)."
        )
    if kind == "deepspeed" and saved is not None and saved != world_size:
        raise WorldSizeMismatchError(
            f"{path} is a DeepSpeed checkpoint written by {saved} ranks, but this run has world size {world_size}. "
            f"DeepSpeed partitions the optimizer state (and, in ZeRO-3, the weights) by rank, so it resumes only at "
            f"world size {saved}: run with {saved} processes in total (trainer.devices x trainer.num_nodes), or "
            "consolidate it (mim.checkpoint.consolidate_checkpoint, `mim export`) and start a new run from the fp32 "
            "weights (optimizer state and step counters are not carried over)."
        )


def _fp32(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Floating tensors to contiguous CPU float32; other entries (integer buffers, ``_extra_state``) unchanged."""
    out: dict[str, Any] = {}
    for k, v in state_dict.items():
        if isinstance(v, Tensor):
            v = v.detach().cpu()
            if v.is_floating_point():
                v = v.float()
            v = v.contiguous()
        out[k] = v
    return out


def _text_line(path: Path) -> str | None:
    """The first line of ``path`` when it is a text file, else None (a checkpoint is a zip archive or a pickle)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    control = set(range(32)) - {9, 10, 13}  # bytes that text (ASCII or UTF-8) never holds besides tab and newlines
    if not head or head.startswith((b"PK", b"\x80")) or any(byte in control for byte in head):
        return None
    return head.decode("utf-8", errors="replace").strip().splitlines()[0][:60] if head.strip() else None


def _load(path: Path, *, trusted_internal: bool = False) -> dict[str, Any]:
    """``torch.load`` on CPU with ``weights_only=True``; any failure becomes one :class:`CheckpointError` line.

    ``trusted_internal``: DeepSpeed's own client-state file inside a checkpoint folder, which holds DeepSpeed objects
    that weights-only unpickling refuses; it is read with ``weights_only=False`` (as DeepSpeed itself does).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted_internal)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; one line names the file
        if (line := _text_line(path)) is not None:
            raise CheckpointError(f"{path}: a text file, not a checkpoint (it begins {line!r})") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "WeightsUnpickler" in str(e):
            raise CheckpointError(
                f"{path}: not a checkpoint mim can read safely (weights-only loading refused it: {reason[:160]}); "
                "it may be a text file or a pickle of arbitrary objects"
            ) from None
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {reason[:160]}); the file is truncated or corrupt "
            "(an interrupted write or copy?): use another checkpoint of the run"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (the file holds a {type(obj).__name__}, not a dict)")
    return obj


def _consolidate_deepspeed(path: Path) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = _deepspeed_tag_dir(path)
    assert tag is not None
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-1/2, ZeRO-3
    files = sorted(tag.glob("*_model_states.pt"))
    client = _load(next((f for f in files if f.name in names), files[0]), trusted_internal=True)
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints its progress
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag.name)
    # zero_to_fp32 rebuilds parameters and buffers; module entries that are neither (``_extra_state``) come from the
    # module state dict DeepSpeed saved next to them.
    module = client.get("module") or {}
    for k, v in module.items():
        if k not in weights and not isinstance(v, Tensor):
            weights[k] = v
    out = {k: v for k, v in client.items() if k not in _DEEPSPEED_KEYS}
    out["state_dict"] = _strip_wrapper(_fp32(weights))
    return out


def _consolidate_dcp(path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(keys={"state_dict"}, checkpoint_id=str(path))
    out = _load(path / _LIGHTNING_META, trusted_internal=True) if (path / _LIGHTNING_META).is_file() else {}
    out.pop("optimizer_states", None)
    out["state_dict"] = _strip_wrapper(_fp32(loaded["state_dict"]))
    return out


def _strip_wrapper(state_dict: dict[str, Any]) -> dict[str, Any]:
    prefix = "_forward_module."  # Lightning's wrapper around the module under some strategies
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def consolidate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """One fp32 state dict (and the checkpoint's metadata) from a sharded or plain checkpoint.

    Needs no process group and reads only the model part (optimizer shards are skipped where the format allows).

    Args:
        path: a DeepSpeed checkpoint directory (ZeRO-1/2/3, as Lightning's ``DeepSpeedStrategy`` saves it), an FSDP2
            distributed checkpoint directory (``ModelParallelStrategy``), or a plain Lightning ``.ckpt`` file.

    Returns:
        A dict shaped like a plain Lightning checkpoint without optimizer state: ``state_dict`` (the module's keys,
        e.g. ``encoder.vit.blocks.0.attn.qkv.weight``, floating tensors as contiguous fp32 CPU tensors, EMA copies
        included, ``_extra_state`` entries kept), ``mim`` (the block ``PretrainModule.on_save_checkpoint`` writes)
        and Lightning's counters (``epoch``, ``global_step``, ``hyper_parameters`` ...) where present.
    """
    p = Path(path)
    kind = checkpoint_kind(p)
    if kind == "deepspeed":
        return _consolidate_deepspeed(p)
    if kind == "dcp":
        return _consolidate_dcp(p)
    return _plain(_load(p))


def _plain(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A loaded single-file checkpoint without optimizer state, its weights fp32 and unwrapped."""
    ckpt.pop("optimizer_states", None)
    ckpt["state_dict"] = _strip_wrapper(_fp32(ckpt.get("state_dict", {})))
    return ckpt


def _read_export(path: Path) -> dict[str, Any]:
    """A ``mim export`` file (safetensors or torch) as a checkpoint-shaped dict of its (student) encoder."""
    meta: dict[str, Any] | None
    state: Any
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            state = load_file(str(path), device="cpu")
            meta = json.loads(header["mim"]) if "mim" in header else None
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e}); it is truncated or corrupt") from None
    else:
        obj = _load(path)
        meta, state = obj.get("mim"), obj.get("state_dict")
    if not isinstance(meta, dict) or "encoder" not in meta or not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a mim export (no 'mim' metadata with the encoder's config)")
    if meta.get("layout", "timm") == "mim":  # a video or table encoder: its own state dict
        weights = {f"encoder.{k}": v for k, v in state.items()}
    else:  # timm's names; a fine-tuned export's classifier (fc_norm, head) sits beside the encoder, as in FinetuneModule
        weights = {(k if k.split(".")[0] in ("fc_norm", "head") else f"encoder.vit.{k}"): v for k, v in state.items()}
    return {"state_dict": weights, "mim": {"encoder": meta["encoder"], "export": meta}}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Any checkpoint mim writes, as one dict: ``state_dict`` (fp32, module keys) and the ``mim`` block.

    Accepts a Lightning ``.ckpt`` file, a DeepSpeed or FSDP2 checkpoint folder (consolidated on the fly) and a
    ``mim export`` file (``.safetensors`` or a torch file holding ``{"state_dict", "mim"}``; its weights appear under
    ``encoder.vit.``, as in a pretraining checkpoint).

    Raises:
        CheckpointError: missing, truncated or corrupt input, or a file mim did not write (one line naming the file).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or folder")
    if p.is_file() and p.suffix == ".safetensors":
        return _read_export(p)
    if p.is_file():
        ckpt = _load(p)
        mim = ckpt.get("mim")
        if isinstance(mim, dict) and str(mim.get("format", "")).startswith("mim-encoder/") and "state_dict" in ckpt:
            return _read_export(p)  # a torch-format export
        ckpt = _plain(ckpt)
    else:
        try:
            checkpoint_kind(p)
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
        ckpt = consolidate_checkpoint(p)
    if not isinstance(ckpt.get("mim"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{p}: not a mim checkpoint (no 'mim' block: it was not written by `mim fit` / `mim finetune`)"
        )
    return ckpt


# ---------------------------------------------------------------------------------------------- resuming
# "Complete" without loading any tensors: a single-file checkpoint's zip central directory (written last) lists a
# data.pkl; a DeepSpeed folder's ``latest`` names a tag whose files are readable zips none newer than ``latest``
# (DeepSpeed rewrites in place); a torch.distributed.checkpoint folder has a non-empty ``.metadata`` (written after
# every shard) and, when present, a readable Lightning ``meta.pt``. "Newest" is the completion time.


def _zip_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _completed_at(path: Path) -> float:
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
                found.append((_completed_at(path), str(path), path))
            else:
                print(f"mim: skipping incomplete checkpoint {path}", file=sys.stderr)
    return max(found)[2] if found else None
