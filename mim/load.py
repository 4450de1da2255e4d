"""Load what a mim run wrote: ``mim.load(path)`` for the trained module, ``load_encoder(path)`` for its encoder.

Every format :func:`mim.checkpoint.read_checkpoint` reads works here: a Lightning ``.ckpt``, a DeepSpeed or FSDP2
checkpoint folder, a ``mim export`` file. The encoder is rebuilt from the config the checkpoint records
(``checkpoint["mim"]["encoder"]``, :attr:`mim.models.base.Encoder.config`), so no recipe has to be repeated; the
module is rebuilt from the recipe LightningCLI recorded in the checkpoint's hyperparameters.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace
from typing import Any, Literal

from mim.checkpoint import CheckpointError, encoder_state, load_encoder_weights, read_checkpoint
from mim.models.base import Encoder
from mim.models.encoder import MaskedEncoder
from mim.models.table_encoder import MaskedTableEncoder

__all__ = ["build_encoder", "encoder_state", "load", "load_encoder", "load_encoder_weights"]

_ENCODERS: dict[str, type[Encoder]] = {"MaskedEncoder": MaskedEncoder, "MaskedTableEncoder": MaskedTableEncoder}


def build_encoder(config: dict[str, Any], **overrides: Any) -> Encoder:
    """A fresh encoder from a recorded config (``Encoder.config``), with constructor arguments overridden.

    Args:
        config: the config a checkpoint or export records; ``class`` names the encoder class (default
            ``MaskedEncoder``).
        **overrides: constructor arguments that replace the recorded ones (e.g. ``drop_path_rate``, ``img_size``).
    """
    kwargs = dict(config)
    name = kwargs.pop("class", "MaskedEncoder")
    if name not in _ENCODERS:
        raise CheckpointError(f"the checkpoint's encoder class {name!r} is not one of {sorted(_ENCODERS)}")
    kwargs.update(overrides)
    return _ENCODERS[name](**kwargs)


def load_encoder(path: str | os.PathLike, *, which: str = "student", **overrides: Any) -> Encoder:
    """The encoder of a checkpoint or export, rebuilt from its recorded config, weights loaded strictly.

    Overrides that change the token grid (``img_size``) keep the fixed sin-cos position table of the new grid
    (it is a function of the grid, so nothing is lost); a changed ``patch_size`` or ``in_chans`` is refused with both
    values named, as the patch embedding's weights would not fit.

    Args:
        path: a ``.ckpt`` file, a DeepSpeed / FSDP2 checkpoint folder or a ``mim export`` file.
        which: ``student``, ``target`` or a state-dict prefix (see :func:`encoder_state`).
        **overrides: constructor arguments that replace the recorded ones (``drop_path_rate``, ``img_size``).

    Raises:
        CheckpointError: unreadable input, or weights that do not fit the rebuilt encoder.
    """
    checkpoint = read_checkpoint(path)
    config = checkpoint["mim"].get("encoder")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the checkpoint records no encoder config")
    for key in ("patch_size", "in_chans"):
        if key in overrides and key in config and _same(overrides[key]) != _same(config[key]):
            raise CheckpointError(
                f"{path}: the encoder was trained with {key}={config[key]}, not {overrides[key]}; the patch embedding "
                f"cannot be reused (keep {key}={config[key]} and adapt the data instead)"
            )
    encoder = build_encoder(config, **overrides)
    _, state = encoder_state(checkpoint, which)
    load_encoder_weights(encoder, state, source=str(path))
    return encoder


def _same(value: Any) -> Any:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else value


def load(path: str | os.PathLike, *, what: Literal["module", "encoder"] = "module", which: str = "student") -> Any:
    """What a mim run wrote, ready to use: the trained module (default) or its encoder.

    ``mim.load("runs/x/checkpoints/last.ckpt")`` rebuilds the ``PretrainModule`` or ``FinetuneModule`` from the recipe
    ``mim fit`` / ``mim finetune`` recorded in the checkpoint and loads every weight strictly (EMA copies included);
    ``what="encoder"`` returns only the encoder (:func:`load_encoder`), which also works on ``mim export`` files.

    Args:
        path: a ``.ckpt`` file, a DeepSpeed / FSDP2 checkpoint folder, or (``what="encoder"``) a ``mim export`` file.
        what: ``module`` or ``encoder``.
        which: with ``what="encoder"``: ``student``, ``target`` or a state-dict prefix.

    Returns:
        The module in eval mode, or the encoder in eval mode.
    """
    if what == "encoder":
        return load_encoder(path, which=which).eval()
    if what != "module":
        raise ValueError(f"mim.load: what must be 'module' or 'encoder', got {what!r}")
    checkpoint = read_checkpoint(path)
    hp = dict(checkpoint.get("hyper_parameters") or {})
    class_path = hp.pop("_class_path", None)
    hp.pop("_instantiator", None)
    if class_path is None:
        raise CheckpointError(
            f"{path}: the checkpoint holds no recipe (the module was built in Python, not by `mim fit`); "
            "rebuild the module yourself and load_state_dict(checkpoint['state_dict']), or use what='encoder'"
        )
    from lightning.pytorch.cli import instantiate_module

    config = checkpoint["mim"].get("encoder") or {}
    if "checkpoint" in hp and config:  # a fine-tuned module: its encoder is in this checkpoint, not the pretrained one
        init = {k: v for k, v in config.items() if k != "class"}
        hp["encoder"] = {"class_path": f"mim.models.{config.get('class', 'MaskedEncoder')}", "init_args": init}
        hp["checkpoint"], hp["num_classes"] = None, checkpoint["mim"].get("num_classes")
    module_name, _, cls_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    module = instantiate_module(cls, {"_class_path": class_path, **hp})
    encoder = getattr(module, "encoder", None)
    if isinstance(encoder, Encoder) and not encoder.is_configured:  # a table encoder waits for a schema
        encoder.configure_data(SimpleNamespace(**{k: config[k] for k in ("num_numeric", "category_cardinalities")}))
    if hasattr(module, "configure_data"):
        module.configure_data(None)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module.eval()
