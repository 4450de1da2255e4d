"""``mim export CKPT OUT``: a mim pretraining checkpoint -> the encoder as a plain timm state dict.

The output holds the encoder's weights under timm's names (``timm.create_model(arch, num_classes=0, **timm_kwargs)``
loads them strictly; so does ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=OUT),
num_classes=0, **timm_kwargs)``), plus what is needed to rebuild it:

* ``OUT.safetensors``: the tensors, and the metadata entry ``mim`` = JSON ``{format, arch, timm_kwargs, encoder,
  source}`` (read it with ``safetensors.safe_open(OUT, "pt").metadata()["mim"]``);
* any other suffix (``.pt``, ``.pth``, ``.bin``): ``torch.save({"state_dict": tensors, "mim": {...}})``, which
  ``torch.load(OUT, weights_only=True)`` and timm's ``load_checkpoint`` read.

The file is written to a temporary name in the same folder and renamed, so it is never half-written. A mim export
is also a valid teacher file for :class:`~mim.targets.teacher.TeacherTarget`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mim.models.teacher import MIM_EXPORT_FORMAT, encoder_timm_kwargs

__all__ = ["encoder_timm_kwargs", "export_encoder", "main"]


def _encoder_state(
    checkpoint: dict[str, Any], path: Path, encoder: str = "encoder"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    mim = checkpoint.get("mim") if isinstance(checkpoint, dict) else None
    if not isinstance(mim, dict) or "encoder" not in mim or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a mim pretraining checkpoint (no 'mim' encoder config or 'state_dict')")
    config = mim["encoder"]
    if int(config.get("num_frames", 1)) > 1:
        raise ValueError(f"{path}: a video encoder (3-D tubelet embedding) has no timm image-model equivalent")
    if "arch" not in config:
        raise ValueError(f"{path}: the encoder config has no 'arch' (a table encoder?); only ViT encoders export")
    prefix = f"{encoder.rstrip('.')}.vit."
    state = {
        k.removeprefix(prefix): v.detach().clone().contiguous()
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(prefix)
    }
    if not state:
        found = sorted({k.split(".vit.")[0] for k in checkpoint["state_dict"] if ".vit." in k})
        raise ValueError(f"{path}: no '{prefix}*' weights in the checkpoint's state_dict; encoders found: {found}")
    return state, config


def export_encoder(checkpoint_path: str | Path, out_path: str | Path, *, encoder: str = "encoder") -> Path:
    """Write the encoder of a mim checkpoint as a timm state dict plus its config, atomically.

    Args:
        checkpoint_path: a Lightning checkpoint written by ``mim fit`` (PretrainModule).
        out_path: ``*.safetensors`` or a torch file (``*.pt``, ``*.pth``, ``*.bin``).
        encoder: which encoder of the checkpoint: ``encoder`` (the student, default) or the state-dict path of
            another copy, e.g. ``targets.0.target_encoder.module`` for a JEPA target encoder (what I-JEPA evaluates).

    Returns:
        ``out_path``.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a mim image-encoder checkpoint, or the weights do not load strictly into timm.
    """
    return _export(Path(checkpoint_path), Path(out_path), encoder)[0]


def _export(src: Path, out: Path, encoder: str = "encoder") -> tuple[Path, dict[str, Any]]:
    import timm

    if src.is_dir():  # a sharded DeepSpeed or FSDP2 checkpoint directory: consolidate to fp32 first
        from mim.checkpoint import consolidate_checkpoint

        checkpoint = consolidate_checkpoint(src)
    elif src.is_file():
        checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"mim export: checkpoint not found: {src}")
    state, config = _encoder_state(checkpoint, src, encoder)
    kwargs = encoder_timm_kwargs(config)
    model = timm.create_model(config["arch"], pretrained=False, num_classes=0, **kwargs)
    try:
        model.load_state_dict(state, strict=True)  # the promise of the export: strict timm loading
    except RuntimeError as e:
        raise ValueError(f"mim export: the encoder of {src} does not load into timm {config['arch']!r}: {e}") from e
    meta = {
        "format": MIM_EXPORT_FORMAT,
        "arch": config["arch"],
        "timm_kwargs": kwargs,
        "encoder": config,
        "source": str(src.resolve()),
    }
    meta = json.loads(json.dumps(meta))  # plain JSON types (lists, not tuples) in both output formats
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"mim": json.dumps(meta), "format": "pt"})
        else:
            torch.save({"state_dict": state, "mim": meta}, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, meta


def main(argv: list[str] | None = None) -> int:
    """``mim export CKPT OUT``."""
    p = argparse.ArgumentParser(
        prog="mim export",
        description="Write the encoder of a mim checkpoint as a timm state dict (+ its config), for fine-tuning "
        "with timm or as a TeacherTarget teacher file.",
    )
    p.add_argument("checkpoint", type=Path, help="a .ckpt written by `mim fit`")
    p.add_argument("out", type=Path, help="output file: .safetensors, or .pt / .pth / .bin for a torch file")
    p.add_argument(
        "--encoder",
        default="encoder",
        help="which encoder: 'encoder' (the student, default) or a state-dict path such as "
        "'targets.0.target_encoder.module' (a JEPA target encoder)",
    )
    args = p.parse_args(argv)
    try:
        out, meta = _export(args.checkpoint, args.out, args.encoder)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    arch, kwargs = meta["arch"], meta["timm_kwargs"]
    print(f"wrote {out}")
    print(f"  timm:    timm.create_model({arch!r}, num_classes=0, **{kwargs}).load_state_dict(<{out.name}>)")
    print(f"  teacher: TeacherTarget(teacher_arch={arch!r}, teacher_checkpoint={str(out)!r}, teacher_kwargs={kwargs})")
    return 0
