"""Reading sharded and plain checkpoints without Lightning: what a checkpoint is, who wrote it, its fp32 weights.

mim trains under DeepSpeed ZeRO-1/2/3 (a checkpoint *directory* with one ``*_model_states.pt`` / ``*_optim_states.pt``
per rank under a tag folder), FSDP2 (a torch.distributed.checkpoint directory: ``.metadata`` and ``__<rank>_<i>.distcp``
files, plus Lightning's ``meta.pt``) and single-file strategies (a Lightning ``.ckpt``). This module tells them apart
(:func:`checkpoint_kind`, :func:`checkpoint_world_size`), refuses a resume that cannot work (:func:`check_resume`:
DeepSpeed shards optimizer state by world size, FSDP2 reshards on load) and turns any of them into one fp32 state dict
(:func:`consolidate_checkpoint`) for ``mim export`` and fine-tuning. It imports neither Lightning nor DeepSpeed (the
DeepSpeed reader is imported only to consolidate a DeepSpeed folder).

Integrity: mim writes every checkpoint under a temporary name and renames it when complete, a file with a SHA-256
sidecar (:func:`write_checkpoint_file`), a sharded folder with a manifest (:func:`temporary_folder`,
:func:`finalize_checkpoint_folder`); :func:`verify_checkpoint` checks them (or, without either, what the format allows)
before :func:`read_checkpoint`, :func:`consolidate_checkpoint` and :func:`newest_checkpoint` use them. The Lightning side
(a ``CheckpointIO`` and the sharded strategies' saves) is in :mod:`mim.distributed`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import sys
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MANIFEST_NAME",
    "SIDECAR_SUFFIX",
    "CheckpointError",
    "CheckpointWriteError",
    "WorldSizeMismatchError",
    "check_resume",
    "checkpoint_kind",
    "checkpoint_world_size",
    "consolidate_checkpoint",
    "encoder_state",
    "finalize_checkpoint_folder",
    "is_complete",
    "is_temporary",
    "load_encoder_weights",
    "newest_checkpoint",
    "read_checkpoint",
    "remove_checkpoint",
    "strategy_family",
    "temporary_folder",
    "verify_checkpoint",
    "write_checkpoint_file",
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

    Raises:
        CheckpointError: the checkpoint fails verification (:func:`verify_checkpoint`), one line naming the file.
    """
    p = Path(path)
    verify_checkpoint(p)
    return _consolidate(p)


def _consolidate(p: Path) -> dict[str, Any]:
    """:func:`consolidate_checkpoint` of a verified checkpoint."""
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
        CheckpointError: missing, truncated or corrupt input (its checksum is verified first, :func:`verify_checkpoint`),
            or a file mim did not write (one line naming the file).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or folder")
    if p.is_dir():
        try:
            checkpoint_kind(p)
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
    verify_checkpoint(p)
    if p.is_file() and p.suffix == ".safetensors":
        return _read_export(p)
    if p.is_file():
        ckpt = _load(p)
        mim = ckpt.get("mim")
        if isinstance(mim, dict) and str(mim.get("format", "")).startswith("mim-encoder/") and "state_dict" in ckpt:
            return _read_export(p)  # a torch-format export
        ckpt = _plain(ckpt)
    else:
        ckpt = _consolidate(p)
    if not isinstance(ckpt.get("mim"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{p}: not a mim checkpoint (no 'mim' block: it was not written by `mim fit` / `mim finetune`)"
        )
    return ckpt


# ---------------------------------------------------------------------------------------------- encoder weights
_TARGET_ENCODER = re.compile(r"^(targets\.\d+\.target_encoder\.module\.)")


def encoder_state(checkpoint: dict[str, Any], which: str = "student") -> tuple[str, dict[str, Tensor]]:
    """The weights of one encoder of a checkpoint, keys relative to the encoder.

    Args:
        checkpoint: what :func:`~mim.checkpoint.read_checkpoint` returned.
        which: ``student`` (the trained encoder, ``encoder.*``), ``target`` (a JEPA target encoder,
            ``targets.<i>.target_encoder.module.*``, what I-JEPA evaluates) or an explicit state-dict prefix.

    Returns:
        (the prefix used, state dict).
    """
    state = checkpoint["state_dict"]
    if which == "student":
        prefix = "encoder."
    elif which == "target":
        found = sorted({m.group(1) for k in state if (m := _TARGET_ENCODER.match(k))})
        if not found:
            raise CheckpointError(
                "the checkpoint has no JEPA target encoder (targets.<i>.target_encoder); use 'student'"
            )
        prefix = found[0]
    else:
        prefix = which.rstrip(".") + "."
    picked = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        roots = sorted({k.split(".vit.")[0] for k in state if ".vit." in k})
        raise CheckpointError(f"no weights under {prefix!r} in the checkpoint; encoders found: {roots}")
    return prefix, picked


def load_encoder_weights(encoder: nn.Module, state: dict[str, Tensor], *, source: str = "checkpoint") -> None:
    """Load ``state`` into ``encoder`` strictly; a fixed sin-cos ``pos_embed`` of another grid is left as built."""
    own = encoder.state_dict()
    state = dict(state)
    for key in [k for k in state if k.endswith("pos_embed")]:
        if key in own and own[key].shape != state[key].shape:
            pos = dict(encoder.named_parameters()).get(key)
            if pos is not None and pos.requires_grad:
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(state[key].shape)} but the encoder's is {tuple(own[key].shape)}, "
                    "and it is a trained table (not the fixed sin-cos one): build the encoder at the checkpoint's size"
                )
            del state[key]  # the fixed sin-cos table of the new grid, built by the constructor
            state[key] = own[key]
    missing, unexpected = (sorted(set(own) - set(state)), sorted(set(state) - set(own)))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the encoder's weights do not fit the rebuilt {type(encoder).__name__} "
            f"(missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''})"
        )
    shapes = [k for k in own if own[k].shape != state[k].shape]
    if shapes:
        k = shapes[0]
        raise CheckpointError(
            f"{source}: {k} has shape {tuple(state[k].shape)} in the checkpoint but {tuple(own[k].shape)} in the encoder"
        )
    encoder.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------- integrity
# Every checkpoint mim writes is written under a temporary name and renamed when complete: a single file as
# ``<name>.tmp-<pid>`` beside its final name, with its SHA-256 in a sidecar ``<name>.sha256`` (``sha256sum -c`` reads
# it); a sharded folder as ``<name>.tmp``, into which rank 0 writes ``mim-manifest.json`` (every file's relative path,
# size and SHA-256) once every rank has finished, before renaming it. Readers verify the checksum first; checkpoints
# without one (older mim, other tools) are checked as far as their format allows (a torch zip archive's CRC-32s).

SIDECAR_SUFFIX = ".sha256"  # ``<checkpoint file>.sha256``: "<hex digest>  <file name>\n", as sha256sum writes it
MANIFEST_NAME = "mim-manifest.json"  # inside a sharded checkpoint folder
_MANIFEST_FORMAT = "mim-manifest/1"
_TEMPORARY = re.compile(r"\.(tmp|old)(-[\w.-]*)?$")  # unfinished writes: never checkpoints, never candidates
_CHUNK = 1 << 22  # 4 MiB reads when hashing a file


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, file-size limit, read-only or forbidden folder).

    Nothing was left under the checkpoint's final name and the previous checkpoints are untouched; the message is one
    line naming the file, the cause and the newest intact checkpoint of the folder.
    """


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an unfinished write (``*.tmp``, ``*.tmp-<pid>``, ``*.old-<pid>``) rather than a checkpoint."""
    return _TEMPORARY.search(Path(path).name) is not None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _write_fully(fd: int, data: memoryview) -> None:
    """``os.write`` until every byte of ``data`` is written (a short write is retried, an error raised)."""
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself has happened
    finally:
        os.close(fd)


def _write_durably(path: Path, data: memoryview) -> None:
    """Write ``data`` to a new file ``path`` and fsync it; on any error the partial file is removed and it re-raises."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_fully(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def _replace_atomically(path: Path, data: memoryview) -> None:
    """Write ``data`` to ``<path>.tmp-<pid>``, fsync it and rename it to ``path`` (the temporary file never remains)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    _write_durably(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _cause(error: OSError) -> str:
    """``No space left on device (ENOSPC)`` from an OSError, without its traceback or file name."""
    code = errno.errorcode.get(error.errno or 0)
    text = error.strerror or str(error) or type(error).__name__
    return f"{text} ({code})" if code else text


def _write_error(path: Path, error: OSError, what: str = "the checkpoint") -> CheckpointWriteError:
    """The one-line error for a failed write of ``path``: the cause and the newest intact checkpoint of its folder
    (possibly an older file under the same name, which a failed write leaves as it was)."""
    previous = _newest_good(path.parent) if path.parent.is_dir() else None
    if previous is not None:
        intact = f"the previous checkpoint {previous} is intact (`--ckpt_path last` resumes from it)"
    else:
        intact = f"no earlier complete checkpoint in {path.parent} was touched"
    hint = {
        errno.ENOSPC: "free space on the device",
        errno.EDQUOT: "free space within your disk quota",
        errno.EFBIG: "raise the file-size limit (ulimit -f) or use a file system that allows larger files",
        errno.EROFS: "write checkpoints to a writable folder",
        errno.EACCES: "fix the folder's permissions or write checkpoints elsewhere",
        errno.EPERM: "fix the folder's permissions or write checkpoints elsewhere",
    }.get(error.errno or 0, "fix the cause")
    return CheckpointWriteError(
        f"{path}: could not write {what} ({_cause(error)}); nothing was written under that name and {intact}: "
        f"{hint}, then resume"
    )


def write_checkpoint_file(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> str:
    """Write a serialised checkpoint atomically, with its SHA-256 in a sidecar ``<path>.sha256``.

    The bytes go to ``<path>.tmp-<pid>`` in the same folder (flushed and fsynced), the checksum (computed from
    ``data``, no re-read) to ``<path>.sha256`` (itself written through a temporary file), and the file is renamed to
    ``path``; the folder is fsynced. Until the rename, an older file under ``path`` stays as it was; a reader that finds
    the new file with the old sidecar (a crash between the two renames) sees a checksum mismatch, never a silent change.

    Args:
        path: the checkpoint's final name (its folder is created when missing).
        data: the whole serialised checkpoint (e.g. ``io.BytesIO.getbuffer()`` after ``torch.save``).

    Returns:
        The SHA-256 hex digest of ``data``.

    Raises:
        CheckpointWriteError: any OSError while writing (ENOSPC, EFBIG, EROFS, EACCES ...); the temporary files are
            removed and the previous checkpoints are untouched.
    """
    p = Path(path)
    view = memoryview(data).cast("B")
    digest = hashlib.sha256(view).hexdigest()
    tmp, sidecar = p.with_name(f"{p.name}.tmp-{os.getpid()}"), _sidecar(p)
    old_sidecar: bytes | None = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        _write_durably(tmp, view)
        old_sidecar = sidecar.read_bytes() if sidecar.is_file() else None
        _replace_atomically(sidecar, memoryview(f"{digest}  {p.name}\n".encode()))
        os.replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        with contextlib.suppress(OSError):  # the data rename failed after the sidecar's: the old file keeps its own
            if sidecar.is_file() and sidecar.read_text().split()[:1] == [digest] and not _matches(p, digest):
                if old_sidecar is None:
                    sidecar.unlink()
                else:
                    _replace_atomically(sidecar, memoryview(old_sidecar))
        raise _write_error(p, e) from None
    _fsync_dir(p.parent)
    return digest


def _matches(path: Path, digest: str) -> bool:
    """Whether ``path`` exists and hashes to ``digest``."""
    return path.is_file() and _hash_file(path) == digest


def _hash_file(path: Path, *, sync: bool = False) -> str:
    """The SHA-256 hex digest of a file, read in chunks (``sync``: also fsync it, e.g. a shard another call wrote)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def temporary_folder(path: str | os.PathLike) -> Path:
    """Where a sharded checkpoint for ``path`` is written before :func:`finalize_checkpoint_folder` renames it.

    ``<path>.tmp``, emptied of what an interrupted earlier save left there (call it on one rank, before the others
    write).
    """
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this file system cannot swap: fall back to two renames
    raise OSError(code, os.strerror(code), str(b))


def finalize_checkpoint_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> dict[str, Any]:
    """Seal a sharded checkpoint written into ``tmp`` (every rank done): write its manifest, rename it to ``path``.

    Rank 0 calls this after a barrier. Every file under ``tmp`` is hashed (and fsynced) once; ``mim-manifest.json``
    (format, and every file's relative path, size and SHA-256) is written atomically inside ``tmp``; then ``tmp``
    becomes ``path``. An existing ``path`` is replaced only now that the new folder is complete: swapped atomically
    where the file system allows (Linux), otherwise renamed aside to ``<path>.old-<pid>`` for the instant of the
    rename; the old folder is then deleted.

    Returns:
        The manifest.

    Raises:
        CheckpointWriteError: an OSError while hashing, writing the manifest or renaming; ``tmp`` is removed and an
            older ``path`` is left as it was.
    """
    tmp, final = Path(tmp), Path(path)
    try:
        files = sorted(f for f in tmp.rglob("*") if f.is_file() and f.name != MANIFEST_NAME)
        entries = {
            f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": _hash_file(f, sync=True)} for f in files
        }
        manifest = {"format": _MANIFEST_FORMAT, "files": entries}
        _replace_atomically(tmp / MANIFEST_NAME, memoryview(json.dumps(manifest, indent=1).encode()))
        for folder in {tmp, *(f.parent for f in files)}:
            _fsync_dir(folder)
        if final.exists() or final.is_symlink():
            if not _exchange(tmp, final):
                aside = final.with_name(f"{final.name}.old-{os.getpid()}")
                os.rename(final, aside)
                os.rename(tmp, final)
                tmp = aside
            _remove_path(tmp)  # the previous checkpoint, now under the temporary name
        else:
            os.rename(tmp, final)
    except OSError as e:
        with contextlib.suppress(OSError):
            _remove_path(tmp)
        raise _write_error(final, e, "the checkpoint folder") from None
    _fsync_dir(final.parent)
    return manifest


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint file or folder and its checksum sidecar (what is missing is skipped)."""
    p = Path(path)
    _remove_path(p)
    with contextlib.suppress(FileNotFoundError):
        _sidecar(p).unlink()


def _sidecar_problem(path: Path, sidecar: Path) -> str | None:
    try:
        expected = sidecar.read_text().split()[0].lower()
    except (OSError, IndexError, UnicodeDecodeError):
        expected = ""
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        return f"its checksum file {sidecar.name} is unreadable"
    actual = _hash_file(path)
    if actual != expected:
        return (
            f"corrupt checkpoint: checksum mismatch (SHA-256 {actual[:12]}... but {sidecar.name} says "
            f"{expected[:12]}...): the file is truncated or corrupt"
        )
    return None


def _zip_problem(path: Path) -> str | None:
    """What is wrong with a torch zip checkpoint, judged by its central directory and CRC-32s (None: nothing)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "a zip archive without data.pkl, not a torch checkpoint"
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return (
            "unreadable checkpoint (not a complete zip archive): the file is truncated or corrupt (an interrupted "
            "write or copy?)"
        )
    except (OSError, EOFError, zlib.error, RuntimeError, NotImplementedError) as e:
        return f"unreadable checkpoint ({type(e).__name__}: {str(e)[:80]}): the file is truncated or corrupt"
    if bad is not None:
        return f"corrupt checkpoint: {bad} fails its CRC-32 check inside the zip archive (the file is damaged)"
    return None


def _file_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint file (None: it verifies)."""
    if is_temporary(path):
        return "an unfinished temporary file of an interrupted save, not a checkpoint"
    sidecar = _sidecar(path)
    if sidecar.is_file():
        return _sidecar_problem(path, sidecar)
    try:  # no checksum (older mim, another tool): what the format allows
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"unreadable ({_cause(e)})"
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        return _zip_problem(path)
    if (line := _text_line(path)) is not None:
        return f"a text file, not a checkpoint (it begins {line!r})"
    if head.startswith(b"\x80") or path.suffix == ".safetensors":
        return None  # a legacy torch pickle or a safetensors file: no checksum to compare
    return "neither a zip archive (torch.save) nor a pickle: not a checkpoint, or its beginning is overwritten"


def _manifest_problem(path: Path, manifest_path: Path) -> str | None:
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["files"]
        assert isinstance(entries, dict) and entries
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"its manifest {MANIFEST_NAME} is unreadable"
    for rel, entry in entries.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing (listed in {MANIFEST_NAME}): the folder is incomplete"
        size = f.stat().st_size
        if size != entry.get("size"):
            return f"{rel} has {size} bytes but {MANIFEST_NAME} says {entry.get('size')}: the shard is truncated"
        if _hash_file(f) != entry.get("sha256"):
            return f"{rel}: checksum mismatch with {MANIFEST_NAME}: the shard is corrupt"
    return None


def _folder_problem(path: Path) -> str | None:
    """What is wrong with a sharded checkpoint folder (None: it verifies)."""
    if is_temporary(path):
        return "an unfinished temporary folder of an interrupted save, not a checkpoint"
    if (path / MANIFEST_NAME).is_file():
        return _manifest_problem(path, path / MANIFEST_NAME)
    latest = path / "latest"  # no manifest (older mim): DeepSpeed's 'latest' and torch.distributed.checkpoint's index
    if latest.is_file():
        tag = path / latest.read_text().strip()
        files = sorted(f for f in tag.rglob("*") if f.is_file()) if tag.is_dir() else []
        if not files:
            return f"'latest' names {tag.name}, which holds no files: the save was interrupted"
        done = latest.stat().st_mtime
        for f in files:
            if f.stat().st_mtime > done:
                return f"{f.relative_to(path)} is newer than 'latest': a save into this folder was interrupted"
            if (problem := _zip_problem(f)) is not None:
                return f"{f.relative_to(path)}: {problem}"
        return None
    metadata = path / _DCP_METADATA
    if metadata.is_file():
        if metadata.stat().st_size == 0:
            return f"{_DCP_METADATA} is empty: the save was interrupted"
        meta = path / _LIGHTNING_META
        if meta.exists() and (problem := _zip_problem(meta)) is not None:
            return f"{_LIGHTNING_META}: {problem}"
        return None
    return (
        "neither a DeepSpeed checkpoint (no 'latest') nor a torch.distributed.checkpoint one (no "
        f"'{_DCP_METADATA}'): the save was interrupted, or it is not a checkpoint"
    )


def _problem(path: Path) -> str | None:
    """What is wrong with a checkpoint file or folder, in a few words (None: it verifies)."""
    path = path.resolve() if path.is_symlink() else path
    if path.is_dir():
        return _folder_problem(path)
    if path.is_file():
        return _file_problem(path)
    return "no such checkpoint file or folder"


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check a checkpoint against its checksum before anything loads it.

    A file with a ``.sha256`` sidecar is hashed and compared; a folder with ``mim-manifest.json`` has every listed
    file's size and hash compared. Without either (older mim, another tool), what the format allows is checked: a torch
    zip archive's central directory and CRC-32s, DeepSpeed's ``latest`` and torch.distributed.checkpoint's index.
    Legacy pickles and safetensors files without a sidecar pass unchecked.

    Raises:
        CheckpointError: one line naming the file (or the shard inside a folder), what is wrong, and the newest good
            checkpoint of the same folder to use instead.
    """
    p = Path(path)
    if (problem := _problem(p)) is None:
        return
    previous = _newest_good(p.parent, exclude=p) if p.parent.is_dir() else None
    if previous is not None:
        instead = f"use {previous} instead (the newest good checkpoint in that folder; `--ckpt_path last` picks it)"
    else:
        instead = f"there is no other good checkpoint in {p.parent}"
    raise CheckpointError(f"{p}: {problem}; {instead}")


# ---------------------------------------------------------------------------------------------- resuming
# "Complete" means verified (:func:`verify_checkpoint`: the checksum when there is one) and, for a file, a torch zip
# archive (the format Lightning writes). "Newest" is the completion time: the file's, or a folder's manifest's
# (DeepSpeed's ``latest``, torch.distributed.checkpoint's ``.metadata`` in folders without one).


def _zip_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _completed_at(path: Path) -> float:
    """The time a checkpoint was completed: the file's, or a sharded folder's marker file's."""
    if path.is_dir():
        names = (MANIFEST_NAME, "latest", _LIGHTNING_META, _DCP_METADATA)
        markers = [m for m in (path / name for name in names) if m.is_file()]
        return max((m.stat().st_mtime for m in markers), default=path.stat().st_mtime)
    return path.stat().st_mtime


def is_complete(path: Path) -> bool:
    """Whether ``path`` (a checkpoint file or a sharded checkpoint folder) was written to the end and verifies."""
    path = Path(path)
    if _problem(path) is not None:
        return False
    return path.is_dir() or _zip_ok(path.resolve())


def _candidates(*roots: str | Path, recursive: bool = True) -> list[tuple[float, str, Path]]:
    """Every ``*.ckpt`` file or folder under the roots (not inside a sharded folder, not temporary), newest first."""
    found: dict[Path, tuple[float, str, Path]] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for path in root.rglob("*.ckpt") if recursive else root.glob("*.ckpt"):
            rel = path.relative_to(root)
            if any(parent.suffix == ".ckpt" or is_temporary(parent) for parent in rel.parents if parent.name):
                continue  # inside a sharded checkpoint folder, or inside an unfinished one
            path = path.resolve() if path.is_symlink() else path  # save_last="link"
            if not path.exists() or path in found:
                continue
            found[path] = (_completed_at(path), str(path), path)
    return sorted(found.values(), reverse=True)


def _newest_good(folder: Path, *, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint directly in ``folder`` that verifies, other than ``exclude`` (quiet)."""
    skip = None if exclude is None else (exclude.resolve() if exclude.is_symlink() else exclude).absolute()
    for _, _, path in _candidates(folder, recursive=False):
        if path.absolute() != skip and is_complete(path):
            return path
    return None


def newest_checkpoint(*roots: str | Path) -> Path | None:
    """The newest complete ``*.ckpt`` (file or folder) under the roots, or None.

    Candidates are tried newest first and verified (:func:`is_complete`: the checksum when there is one); each one
    skipped is named on stderr with the reason, so a corrupted or truncated newest checkpoint gives way to the previous
    good one. Temporary leftovers of interrupted saves (``*.tmp*``) are never candidates.
    """
    for _, _, path in _candidates(*roots):
        problem = _problem(path)
        if problem is None and not path.is_dir() and not _zip_ok(path):
            problem = "not a torch zip archive"
        if problem is None:
            return path
        print(f"mim: skipping incomplete checkpoint {path}: {problem}", file=sys.stderr)
    return None
