"""``mim export CKPT OUT``: the encoder of a mim checkpoint, with the data it was trained on, for timm or for mim.

An image encoder (``MaskedEncoder``) is written under timm's names, with what rebuilds it and what it reads:

* ``OUT`` a folder (no suffix): ``OUT/model.safetensors`` and ``OUT/config.json``, the layout of a timm model on the
  Hugging Face hub. ``timm.create_model("local-dir:OUT", pretrained=True, num_classes=N)`` (timm >= 1.0.16, the
  ``local-dir:`` source of timm/models/_factory.py) needs nothing else: the architecture and its arguments
  (``model_args``: ``img_size``, ``patch_size``, ``in_chans``, width, depth ...) and the ``pretrained_cfg``
  (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``) come from ``config.json``; with ``num_classes=N``
  the head is new (timm drops the ``classifier`` the config names and loads the rest), with ``num_classes=0`` the
  model is the bare encoder, loaded strictly; ``timm.data.resolve_data_config({}, model=m)`` returns the training
  input size, mean and std.
* ``OUT.safetensors``: the same tensors, with ``config.json`` beside it (so its folder is a ``local-dir:`` model when
  the export is the only weights file there); any other suffix (``.pt``, ``.pth``, ``.bin``):
  ``torch.save({"state_dict": tensors, "mim": {...}})``, which ``torch.load(OUT, weights_only=True)`` and timm's
  ``load_checkpoint`` read.

Every file carries the JSON metadata ``mim`` (the safetensors header entry ``mim``, or the torch entry):
``{format, layout, kind, arch, timm_kwargs, num_classes, pretrained_cfg, data, encoder, source}``.
``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=OUT))`` alone cannot rebuild the model:
timm reads only tensors from that file and takes ``img_size``, ``patch_size``, ``in_chans`` and the width from its
caller; :func:`create_model` passes them from the metadata (any timm 1.0, any export file).

A fine-tuned checkpoint (``FinetuneModule``) exports as the whole timm classifier: ``global_pool`` ``avg`` with
MAE's ``fc_norm`` or ``token``, and the trained head (``num_classes`` in the config). Video and table encoders have no
timm equivalent: they are written in mim's layout (the encoder's own state dict and config), which
:func:`mim.load.load_encoder` and ``FinetuneModule(checkpoint=OUT)`` read. ``--img-size`` writes an image or video
encoder for another resolution: the fixed sin-cos position table is recomputed for the new grid (MAE,
facebookresearch/mae util/pos_embed.py); a table trained in fine-tuning is resampled with timm's
``resample_abs_pos_embed`` (bicubic). Files are written to a temporary name in the same folder and renamed, so none
is ever half-written. A timm-layout export is also a teacher file for :class:`~mim.targets.teacher.TeacherTarget`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mim.checkpoint import CheckpointError, read_checkpoint
from mim.models.embed import sincos_for_grid
from mim.models.teacher import MIM_EXPORT_FORMAT, encoder_timm_kwargs
from mim.types import TokenGrid

__all__ = ["create_model", "encoder_timm_kwargs", "export_encoder", "main"]

_WEIGHTS_NAME = "model.safetensors"  # the weights file of a folder export (timm's first choice in a local-dir)
_CONFIG_NAME = "config.json"
_TIMM_SUFFIXES = (".safetensors", ".pth", ".bin")  # what timm's local-dir loading looks for (timm/models/_hub.py)
_HEAD_MODULES = ("fc_norm", "head")  # a FinetuneModule's classifier, under the names timm's ViT gives it


@dataclass
class Export:
    """What :func:`export_encoder` wrote.

    Attributes:
        path: the weights file.
        meta: its ``mim`` metadata.
        config_path: the timm ``config.json`` beside it (None for mim's layout).
        notes: what the user should know (printed by ``mim export``).
    """

    path: Path
    meta: dict[str, Any]
    config_path: Path | None = None
    notes: list[str] = field(default_factory=list)


def export_encoder(
    checkpoint_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    encoder: str = "encoder",
    img_size: int | tuple[int, int] | None = None,
) -> Path:
    """Write the encoder of a mim checkpoint with its config and data settings, atomically.

    Args:
        checkpoint_path: anything :func:`~mim.checkpoint.read_checkpoint` reads: a ``.ckpt`` of ``mim fit`` or
            ``mim finetune``, a DeepSpeed or FSDP2 checkpoint folder, or a ``mim export`` file.
        out_path: a folder (no suffix: ``model.safetensors`` + ``config.json`` inside), ``*.safetensors`` or a torch
            file (``*.pt``, ``*.pth``, ``*.bin``).
        encoder: which encoder of the checkpoint: ``encoder`` (the student, default) or the state-dict path of
            another copy, e.g. ``targets.0.target_encoder.module`` for a JEPA target encoder (what I-JEPA evaluates).
        img_size: write the encoder for this input size (int or (H, W)) instead of the trained one.

    Returns:
        The weights file written.

    Raises:
        CheckpointError: missing, truncated or corrupt input, a file mim did not write, or weights that do not load
            into the rebuilt model (one line naming the file).
        ValueError: an ``img_size`` the encoder cannot take.
    """
    return _export(Path(checkpoint_path), Path(out_path), encoder=encoder, img_size=img_size).path


def _export(src: Path, out: Path, *, encoder: str = "encoder", img_size: int | tuple[int, int] | None = None) -> Export:
    checkpoint = read_checkpoint(src)
    mim: dict[str, Any] = checkpoint["mim"]
    exported: dict[str, Any] = mim.get("export") or {}  # the source is itself an export
    config = mim.get("encoder")
    if not isinstance(config, dict):
        raise CheckpointError(f"{src}: the checkpoint records no encoder config (not written by `mim fit`?)")
    kind = mim.get("kind") or exported.get("kind") or "pretrain"
    timm_layout = config.get("class", "MaskedEncoder") == "MaskedEncoder" and int(config.get("num_frames", 1)) == 1
    root = encoder.rstrip(".")
    state = _encoder_state(src, checkpoint["state_dict"], f"{root}.vit." if timm_layout else f"{root}.")
    num_classes = 0
    extra_kwargs: dict[str, Any] = {}
    if timm_layout and kind == "finetune" and root == "encoder" and "head.weight" in checkpoint["state_dict"]:
        # MAE's classifier (facebookresearch/mae models_vit.py) is timm's: pool -> fc_norm -> head.
        head = {k: v for k, v in checkpoint["state_dict"].items() if k.split(".")[0] in _HEAD_MODULES}
        state.update(head)
        num_classes = int(head["head.weight"].shape[0])
        extra_kwargs["global_pool"] = "avg" if "fc_norm.weight" in head else "token"
    notes: list[str] = []
    if img_size is not None:
        key = "pos_embed" if timm_layout else "vit.pos_embed"
        config = _resize(state, config, img_size, learned=kind == "finetune", key=key)
    data = mim.get("data") or exported.get("data")
    meta: dict[str, Any] = {
        "format": MIM_EXPORT_FORMAT,
        "layout": "timm" if timm_layout else "mim",
        "kind": kind,
        "encoder": config,
        "data": data,
        "source": str(exported.get("source") or src.resolve()),
    }
    if timm_layout:
        kwargs = {**encoder_timm_kwargs(config), **extra_kwargs}
        model = _timm_model(src, config["arch"], kwargs, num_classes, state)
        if data is None:
            data = _default_data(config)
            notes.append(
                f"{src} records no data settings (written before mim recorded them, or saved outside a Trainer): "
                f"config.json has the encoder's input size and mim's default mean {data['mean']} / std {data['std']}; "
                "correct them there if the data was normalised otherwise"
            )
        input_size = [int(config["in_chans"]), *(int(s) for s in config["img_size"])]
        meta.update(
            arch=config["arch"],
            timm_kwargs=kwargs,
            num_classes=num_classes,
            pretrained_cfg=_pretrained_cfg(config["arch"], data, input_size, num_classes),
        )
    else:
        _check_mim_layout(src, config, state)
        modality = "table" if config.get("class") == "MaskedTableEncoder" else "video"
        notes.append(
            f"a {modality} encoder has no timm equivalent: the export is in mim's layout (the encoder's own state dict "
            "and config), for mim.load.load_encoder(OUT) and FinetuneModule(checkpoint=OUT)"
        )
    meta = json.loads(json.dumps(meta))  # plain JSON types (lists, not tuples) in both output formats
    weights = out / _WEIGHTS_NAME if out.is_dir() or not out.suffix else out
    _write_weights(state, meta, weights)
    result = Export(path=weights, meta=meta, notes=notes)
    if timm_layout:
        result.config_path = _write_hub_config(weights, meta, model, notes)
    return result


def _write_hub_config(weights: Path, meta: dict[str, Any], model: Any, notes: list[str]) -> Path:
    """``config.json`` beside ``weights``, as a timm model on the Hugging Face hub has it (what timm's
    ``load_model_config_from_path`` reads for ``local-dir:``): architecture, head, ``model_args``, ``pretrained_cfg``."""
    path = weights.parent / _CONFIG_NAME
    other = (_read_json(path).get("mim") or {}).get("weights")
    if other not in (None, weights.name):
        notes.append(f"replaced {path}, which described {other}: keep one export per folder")
    hub = {
        "architecture": meta["arch"].partition(".")[0],  # the model, without a pretrained tag
        "num_classes": meta["num_classes"],
        "num_features": int(model.num_features),
        "global_pool": model.global_pool,
        "model_args": meta["timm_kwargs"],
        "pretrained_cfg": meta["pretrained_cfg"],
        "mim": {"format": MIM_EXPORT_FORMAT, "weights": weights.name, "source": meta["source"]},
    }
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(hub, indent=2) + "\n"))
    return path


def _encoder_state(src: Path, state_dict: dict[str, Any], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix``, keys relative to it."""
    state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, Tensor)}
    if not state:
        found = sorted({k.split(".vit.")[0] for k in state_dict if ".vit." in k})
        raise CheckpointError(f"{src}: no '{prefix}*' weights in the checkpoint's state_dict; encoders found: {found}")
    return state


def _resize(
    state: dict[str, Tensor], config: dict[str, Any], img_size: int | tuple[int, int], *, learned: bool, key: str
) -> dict[str, Any]:
    """Replace ``state[key]`` by the position table of the grid of ``img_size``; return the encoder's new config.

    The fixed sin-cos table (every pretraining checkpoint's, and a fine-tuned one left frozen) is recomputed for the
    new grid; a table trained in fine-tuning is resampled with timm's ``resample_abs_pos_embed`` (bicubic), as timm
    does for its own checkpoints.
    """
    from timm.layers import resample_abs_pos_embed

    if config.get("class", "MaskedEncoder") != "MaskedEncoder":
        raise ValueError(f"mim export: img_size applies to image and video encoders, not a {config.get('class')}")
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    ph, pw = (int(p) for p in config["patch_size"])
    if len(size) != 2 or min(size) < 1 or size[0] % ph or size[1] % pw:
        raise ValueError(
            f"mim export: img_size must be a positive multiple of the patch size {(ph, pw)}, got {img_size}"
        )
    t = int(config.get("num_frames", 1)) // int(config.get("tubelet_size", 1))
    old = TokenGrid(t, int(config["img_size"][0]) // ph, int(config["img_size"][1]) // pw)
    new = TokenGrid(t, size[0] // ph, size[1] // pw)
    table = state[key]  # (1, prefix + N, D)
    prefix, dim = table.shape[1] - old.num_tokens, table.shape[2]
    fixed = sincos_for_grid(dim, old, prefix)  # (prefix + N, D)
    if learned and not torch.allclose(table[0].float(), fixed, atol=1e-6):
        if t > 1:
            raise ValueError("mim export: a trained 3-D (video) position table cannot be resampled; export at its size")
        resized = resample_abs_pos_embed(
            table, new_size=[new.h, new.w], old_size=[old.h, old.w], num_prefix_tokens=prefix, verbose=False
        )  # (1, prefix + N', D)
    else:
        resized = sincos_for_grid(dim, new, prefix).unsqueeze(0).to(table.dtype)  # (1, prefix + N', D)
    state[key] = resized.contiguous()
    config = json.loads(json.dumps(config))
    config["img_size"] = list(size)
    if "img_size" in (config.get("model_kwargs") or {}):
        config["model_kwargs"]["img_size"] = list(size)
    return config


def _timm_model(src: Path, arch: str, kwargs: dict[str, Any], num_classes: int, state: dict[str, Tensor]) -> Any:
    """The timm model the export promises (a ``VisionTransformer``), with ``state`` loaded strictly: the check of
    the export."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{src}: the encoder does not load into timm {arch!r} with {kwargs}: {reason}") from None
    return model


def _check_mim_layout(src: Path, config: dict[str, Any], state: dict[str, Tensor]) -> None:
    """Rebuild the encoder from ``config`` and load ``state`` strictly: what ``mim.load.load_encoder`` will do."""
    import mim.models
    from mim.models.base import Encoder

    name = config.get("class", "MaskedEncoder")
    cls = getattr(mim.models, name, None)
    if not isinstance(cls, type) or not issubclass(cls, Encoder):
        raise CheckpointError(f"{src}: the checkpoint's encoder class {name!r} is not a mim encoder")
    rebuilt = cls(**{k: v for k, v in config.items() if k != "class"})
    try:
        rebuilt.load_state_dict(state, strict=True)
    except RuntimeError as e:
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{src}: the encoder's weights do not fit its recorded config: {reason}") from None


def _default_data(config: dict[str, Any]) -> dict[str, Any]:
    """The data settings of a checkpoint that records none: the encoder's input and mim's default statistics."""
    from mim.data.base import default_stats

    in_chans = int(config["in_chans"])
    mean, std = default_stats(in_chans, None, None)
    return {
        "input_size": [in_chans, *(int(s) for s in config["img_size"])],
        "mean": list(mean),
        "std": list(std),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
    }


def _pretrained_cfg(arch: str, data: dict[str, Any], input_size: list[int], num_classes: int) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` (timm/models/_pretrained.py ``PretrainedCfg``) of the export.

    ``first_conv`` and ``classifier`` come from the architecture's registry entry: with them timm adapts another
    ``in_chans`` and drops the head for another ``num_classes`` by itself. ``fixed_input_size`` makes timm take
    ``img_size`` from ``input_size`` when the config is passed without ``model_args``.
    """
    import timm

    registry = timm.get_pretrained_cfg(arch)
    return {
        "input_size": input_size,
        "fixed_input_size": True,
        "interpolation": str(data.get("interpolation", "bicubic")),
        "crop_pct": float(data.get("crop_pct", 1.0)),
        "crop_mode": "center",
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "num_classes": num_classes,
        "first_conv": (registry.first_conv if registry else None) or "patch_embed.proj",
        "classifier": (registry.classifier if registry else None) or "head",
    }


def _write_atomic(path: Path, write: Any) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it to ``path`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_weights(state: dict[str, Tensor], meta: dict[str, Any], path: Path) -> None:
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        _write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata={"mim": json.dumps(meta), "format": "pt"}))
    else:
        _write_atomic(path, lambda tmp: torch.save({"state_dict": state, "mim": meta}, tmp))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def create_model(path: str | os.PathLike, *, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The timm model of a ``mim export``, its weights loaded, built from what the export records.

    What ``timm.create_model("local-dir:FOLDER", pretrained=True, ...)`` does with ``config.json``, for any timm 1.0
    and any export file (``.safetensors`` or torch, several exports in one folder): the architecture's arguments
    (``img_size``, ``patch_size``, ``in_chans`` ...) and the ``pretrained_cfg`` (input size, mean, std) come from the
    file's metadata.

    Args:
        path: an export file, or a folder export (its ``config.json`` names the weights file).
        num_classes: a new head of this many classes, freshly initialised; None keeps the export's (0: the bare
            encoder; a fine-tuned export: its trained classifier).
        **kwargs: further ``timm.create_model`` arguments (``drop_path_rate`` ...), over the recorded ones.

    Raises:
        CheckpointError: not a timm-layout ``mim export`` (one line naming the file).
    """
    import timm

    weights = Path(path)
    if weights.is_dir():
        name = (_read_json(weights / _CONFIG_NAME).get("mim") or {}).get("weights", _WEIGHTS_NAME)
        weights = weights / name
    meta = read_checkpoint(weights)["mim"].get("export")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{weights}: not a `mim export` file (a training checkpoint? export it first)")
    if meta.get("layout", "timm") != "timm":
        raise CheckpointError(
            f"{weights}: a {meta['encoder'].get('class', 'video')} export in mim's layout has no timm model; "
            "use mim.load.load_encoder"
        )
    pretrained_cfg = {**meta["pretrained_cfg"], "file": str(weights)}
    for key in ("input_size", "mean", "std"):  # tuples, as timm's own configs hold them
        pretrained_cfg[key] = tuple(pretrained_cfg[key])
    model_args = {**meta["timm_kwargs"], **kwargs}
    if num_classes is not None:
        model_args["num_classes"] = num_classes
    return timm.create_model(meta["arch"], pretrained=True, pretrained_cfg=pretrained_cfg, **model_args)


def _usage(result: Export) -> list[str]:
    """What ``mim export`` prints after writing: how to load the export, and what it holds."""
    out, meta, notes = result.path, result.meta, list(result.notes)
    data = meta.get("data") or {}
    lines = [f"wrote {out}" + (f" and {result.config_path}" if result.config_path else "")]
    if result.config_path is None:
        lines.append(f"  mim:     mim.load.load_encoder({str(out)!r})  |  FinetuneModule(checkpoint={str(out)!r})")
        if data:
            shown = {k: v for k, v in data.items() if k != "preprocessor"}
            lines.append(
                f"  data:    {shown}" + ("  (+ the fitted table preprocessor)" if "preprocessor" in data else "")
            )
    else:
        arch, kwargs, cfg = meta["arch"], meta["timm_kwargs"], meta["pretrained_cfg"]
        folder = out.parent
        others = [p.name for p in folder.iterdir() if p != out and p.suffix in _TIMM_SUFFIXES]
        if out.suffix not in _TIMM_SUFFIXES:
            notes.append(f"timm's 'local-dir:' reads {', '.join(_TIMM_SUFFIXES)} files, not {out.suffix}")
        elif out.name != _WEIGHTS_NAME and others:
            notes.append(
                f"{folder} holds other weights files ({others[:3]}), which timm's 'local-dir:' may read instead: "
                "export to a folder of its own (`mim export CKPT FOLDER`) for the one-line timm call"
            )
        else:
            trained = f" (default {meta['num_classes']}: the fine-tuned head)" if meta["num_classes"] else ""
            lines.append(
                f"  timm:    m = timm.create_model('local-dir:{folder}', pretrained=True, num_classes=N){trained}"
            )
            lines.append("           (timm >= 1.0.16; num_classes=0: the bare encoder; N > 0: a new head of N classes)")
        lines.append(f"  mim:     m = mim.export.create_model({str(out)!r}, num_classes=N)  (any timm 1.0)")
        lines.append(
            f"  data:    timm.data.resolve_data_config({{}}, model=m) -> input_size {tuple(cfg['input_size'])}, "
            f"mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])}, {cfg['interpolation']}, crop_pct {cfg['crop_pct']}"
        )
        if not meta["num_classes"]:
            lines.append(
                f"  teacher: TeacherTarget(teacher_arch={arch!r}, teacher_checkpoint={str(out)!r}, "
                f"teacher_kwargs={kwargs})"
            )
    lines += [f"note: {note}" for note in notes]
    return lines


def main(argv: list[str] | None = None) -> int:
    """``mim export CKPT OUT [--encoder PATH] [--img-size S | --img-size H W]``."""
    p = argparse.ArgumentParser(
        prog="mim export",
        description="Write the encoder of a mim checkpoint with its config and data settings: image encoders as a "
        "timm model (weights + config.json: timm.create_model('local-dir:OUT', pretrained=True, num_classes=N)), "
        "video and table encoders in mim's layout (mim.load.load_encoder).",
    )
    p.add_argument("checkpoint", type=Path, help="a .ckpt of `mim fit` / `mim finetune`, a sharded folder, an export")
    p.add_argument(
        "out",
        type=Path,
        help="a folder (model.safetensors + config.json inside), OUT.safetensors (config.json beside it), "
        "or .pt / .pth / .bin for a torch file",
    )
    p.add_argument(
        "--encoder",
        default="encoder",
        help="which encoder: 'encoder' (the student, default) or a state-dict path such as "
        "'targets.0.target_encoder.module' (a JEPA target encoder)",
    )
    p.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        metavar="SIZE",
        help="write the encoder for this input size (S, or H W): the sin-cos position table is recomputed for the new "
        "grid, a fine-tuned one resampled",
    )
    args = p.parse_args(argv)
    img_size = None
    if args.img_size is not None:
        if len(args.img_size) > 2:
            p.exit(2, f"mim export: error: --img-size takes S or H W, got {args.img_size}\n")
        img_size = args.img_size[0] if len(args.img_size) == 1 else tuple(args.img_size)
    try:
        result = _export(args.checkpoint, args.out, encoder=args.encoder, img_size=img_size)
    except (CheckpointError, ValueError) as e:
        p.exit(2, f"mim export: error: {e}\n")
    except OSError as e:  # e.g. an output folder that cannot be written; the message names the path
        p.exit(2, f"mim export: error: {e}\n")
    print("\n".join(_usage(result)))
    return 0
