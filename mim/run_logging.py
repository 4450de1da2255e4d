"""What ``mim fit`` records about a run: the default logger, the resolved config, the run id, the end summary.

* :func:`default_logger`: a wandb logger (offline unless an API key is set up or ``WANDB_MODE`` says otherwise) when the
  recipe sets no ``trainer.logger``; Lightning's ``CSVLogger`` under ``WANDB_MODE=disabled`` or when wandb cannot start
  (one warning line says why).
* :class:`WandbRunId`: writes the wandb run id into every checkpoint (``checkpoint["wandb_run_id"]``; a sharded folder
  also has it in its ``mim-info.json``), so that a resumed run (:func:`checkpoint_run_id`) continues the same wandb run.
* :func:`run_info`: the ``mim`` block of the logged config: recipe files and their text, git commit, package versions.
* :func:`summary`: the lines printed at the end of a run: checkpoints, the log folder, how to resume, export, fine-tune
  (:func:`finetune_command`: the fine-tuning recipe that fits the run, with the checkpoint filled in).

Importing this module imports Lightning but not wandb; wandb starts only when :func:`default_logger` builds its logger.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

__all__ = [
    "RUN_ID_KEY",
    "LogConfig",
    "OfflineRun",
    "WandbRunId",
    "checkpoint_run_id",
    "default_logger",
    "finetune_command",
    "finetune_recipes",
    "finish_wandb",
    "read_offline_run",
    "run_info",
    "summary",
]

RUN_ID_KEY = "wandb_run_id"
_PACKAGES = ("torch", "lightning", "timm", "wandb", "mim")


def _has_api_key() -> bool:
    """Whether wandb can log in without a prompt: ``WANDB_API_KEY``, an identity token file, or a netrc entry for the
    wandb host (``WANDB_BASE_URL``, default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:  # wandb's own reader (an internal module: tolerate its absence)
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return bool(read_netrc_auth(host=host))
    except Exception:
        pass
    import netrc
    from urllib.parse import urlparse

    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(host).hostname or host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _csv(save_dir: str) -> CSVLogger:
    """Lightning's CSV logger where ``logger=True`` would put it (``<save_dir>/lightning_logs/version_N``)."""
    return CSVLogger(save_dir=save_dir)


def default_logger(
    save_dir: str | os.PathLike,
    *,
    name: str | None = None,
    run_id: str | None = None,
    wandb: bool = True,
    settings: dict[str, Any] | None = None,
) -> Logger:
    """The logger of a recipe that sets none: wandb, or CSV when wandb is disabled or cannot start.

    Args:
        save_dir: ``trainer.default_root_dir``; wandb writes ``<save_dir>/wandb/<run>``, CSV
            ``<save_dir>/lightning_logs/version_N``.
        name: the wandb run name (e.g. the recipe's file stem); ``WANDB_NAME`` wins when set.
        run_id: continue this wandb run (a resumed run, :func:`checkpoint_run_id`); None: a new run.
        wandb: False: the CSV logger (e.g. ``mim validate``/``predict``, which need no wandb run).
        settings: the recipe's ``wandb:`` section (``project``, ``name``, ``group``, ``tags``, ``entity``, ``notes``);
            the ``WANDB_PROJECT`` / ``WANDB_NAME`` / ``WANDB_RUN_GROUP`` ... environment variables win over it.

    Returns:
        A ``WandbLogger`` (``project``: ``WANDB_PROJECT`` or "mim"; ``group``: ``WANDB_RUN_GROUP``, else the
        ``SLURM_JOB_ID`` or ``TORCHELASTIC_RUN_ID``; offline unless an API key is set up or ``WANDB_MODE`` is set)
        whose run has started on rank 0; or a ``CSVLogger`` under ``WANDB_MODE=disabled`` or, with a one-line warning,
        when wandb cannot be imported or started.
    """
    save_dir = os.fspath(save_dir)
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if not wandb or mode == "disabled":
        return _csv(save_dir)
    try:
        from lightning.pytorch.loggers import WandbLogger

        kwargs: dict[str, Any] = {}
        if not mode and not _has_api_key():
            kwargs["mode"] = "offline"  # no account set up: record locally, `wandb sync` uploads later
        recipe = {k: v for k, v in (settings or {}).items() if v not in (None, [], "")}
        group = (
            os.environ.get("WANDB_RUN_GROUP")
            or recipe.get("group")
            or os.environ.get("SLURM_JOB_ID")
            or os.environ.get("TORCHELASTIC_RUN_ID")
        )
        if group:
            kwargs["group"] = group
        for key in ("tags", "entity", "notes"):  # wandb reads WANDB_TAGS, WANDB_ENTITY, WANDB_NOTES itself
            if key in recipe and not os.environ.get(f"WANDB_{key.upper()}"):
                kwargs[key] = list(recipe[key]) if key == "tags" else recipe[key]
        if run_id:
            kwargs["resume"] = "allow"
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        logger = WandbLogger(
            name=os.environ.get("WANDB_NAME") or recipe.get("name") or name,
            save_dir=save_dir,
            id=run_id,
            project=os.environ.get("WANDB_PROJECT") or recipe.get("project") or "mim",
            **kwargs,
        )
        if getattr(logger, "_wandb_init", {}).get("anonymous", "") is None:
            del logger._wandb_init["anonymous"]  # Lightning always passes it; wandb warns that it is deprecated
        if rank_zero_only.rank == 0:  # type: ignore[attr-defined]  # set by Lightning from the environment
            _ = logger.experiment  # start now, so that a failure falls back to CSV here and not mid-run
    except Exception as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        rank_zero_warn(f"mim: wandb could not start ({type(e).__name__}: {reason}); logging to CSV under {save_dir}")
        return _csv(save_dir)
    return logger


def finish_wandb(exit_code: int = 0) -> None:
    """Finish the wandb run of this process, if one is open (a run in the same process, e.g. a test, starts afresh)."""
    import sys

    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        run.finish(exit_code=exit_code)


class WandbRunId(Callback):
    """Writes the wandb run id into every checkpoint (``checkpoint["wandb_run_id"]``), read back by
    :func:`checkpoint_run_id` when the run resumes."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Add the run id of the trainer's wandb logger, if it has one."""
        run_id = _wandb_run_id(trainer)
        if run_id:
            checkpoint[RUN_ID_KEY] = run_id


def _wandb_run_id(trainer: Trainer) -> str | None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            version = logger.version
            return str(version) if version else None
    return None


def checkpoint_run_id(path: str | os.PathLike | None) -> str | None:
    """The wandb run id stored in a checkpoint by :class:`WandbRunId`; None when there is none or it cannot be read.

    A ``.ckpt`` file is memory-mapped (only the small entries are read); a sharded checkpoint folder (DeepSpeed, FSDP2)
    carries it in its ``mim-info.json`` (:func:`mim.distributed.write_checkpoint_info`).
    """
    if path is None:
        return None
    if Path(path).is_dir():
        from mim.distributed import read_checkpoint_info

        run_id = read_checkpoint_info(path).get(RUN_ID_KEY)
        return run_id if isinstance(run_id, str) and run_id else None
    if not Path(path).is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return None
    run_id = ckpt.get(RUN_ID_KEY) if isinstance(ckpt, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def _git_commit(folder: Path) -> str | None:
    """``git rev-parse HEAD`` of the checkout holding ``folder``; None outside a checkout or without git."""
    if not (folder / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_info(recipes: Sequence[str | os.PathLike], *, world_size: int) -> dict[str, Any]:
    """The ``mim`` block of a run's logged config.

    Args:
        recipes: the ``-c`` files, in order.
        world_size: number of processes of the run.

    Returns:
        ``{"recipes": [paths], "recipe_text": {path: text}, "git_commit": sha or None, "versions": {package: v},
        "world_size": n}``.
    """
    paths = [str(Path(p).resolve()) for p in recipes]
    texts: dict[str, str] = {}
    for p in paths:
        try:
            texts[p] = Path(p).read_text()
        except OSError:
            pass
    return {
        "recipes": paths,
        "recipe_text": texts,
        "git_commit": _git_commit(Path(__file__).resolve().parent.parent),
        "versions": {p: _version(p) for p in _PACKAGES},
        "world_size": world_size,
    }


def log_run_config(trainer: Trainer, config: dict[str, Any], recipes: Sequence[str | os.PathLike]) -> None:
    """Log the resolved config (and the recipe files) to the trainer's wandb run, on rank 0; other loggers are left
    alone (LightningCLI saves ``config.yaml`` next to their logs)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        run.config.update(config, allow_val_change=True)
        files = Path(run.dir) / "recipes"
        files.mkdir(parents=True, exist_ok=True)
        for recipe in recipes:
            source = Path(recipe)
            if source.is_file():
                (files / source.name).write_text(source.read_text())
        run.save(str(files / "*"), base_path=run.dir, policy="now")


def _plain(value: Any) -> Any:
    """``value`` with only dicts, lists, strings, numbers, booleans and None (anything else as its ``str``)."""
    return json.loads(json.dumps(value, default=str))


class LogConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` next to the logs, and on rank 0 the fully resolved config in the wandb run: every
    ``class_path`` / ``init_args`` of model, data and trainer, and a ``mim`` block (:func:`run_info`); the recipe files
    are saved in the run (``files/recipes/``)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Called once, on rank 0, when the trainer is set up."""
        config = self.config.clone()
        recipes = [str(getattr(p, "absolute", p)) for p in (config.get("config") or [])]
        resolved = _plain(config.as_dict())
        resolved.pop("config", None)
        resolved["mim"] = run_info(recipes, world_size=trainer.world_size)
        log_run_config(trainer, resolved, recipes)


def log_location(trainer: Trainer) -> str | None:
    """Where the run's logs are: the wandb run's URL (online), its local folder (offline), or the CSV folder."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            if not getattr(run, "offline", True) and getattr(run, "url", None):
                return str(run.url)
            return str(Path(run.dir).parent)  # <save_dir>/wandb/offline-run-<time>-<id>
        if logger.log_dir:
            return str(logger.log_dir)
    return None


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
"""The shipped recipes (a source checkout's ``recipes/``)."""
_DATA_PATHS = ("root", "val_root", "train_path", "val_path")  # data arguments a fine-tune takes from its pretraining
_DATA_SHAPE = ("image_size", "num_frames")  # ... and, when the encoder is rebuilt from the checkpoint, these
_ARCH_TAGS = {"tiny": "ti", "small": "s", "base": "b", "large": "l", "huge": "h", "giant": "g"}  # timm -> recipe names
_TRAINING_ONLY = ("drop_path_rate",)  # encoder arguments that do not change the weights' layout


def finetune_recipes(folder: str | os.PathLike = RECIPES) -> list[Path]:
    """The fine-tuning recipes under ``folder``: ``finetune/*.yaml``, ``debug/finetune_*.yaml``, ``*_finetune.yaml``."""
    root = Path(folder)
    found = [*root.glob("finetune/*.yaml"), *root.glob("debug/finetune_*.yaml"), *root.glob("*_finetune.yaml")]
    return sorted(found)


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return text if isinstance(text, dict) else {}


def _section(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        config = config.get(key) if isinstance(config, dict) else None  # type: ignore[assignment]
    return config


def _same_encoder(recipe: dict[str, Any], run: dict[str, Any] | None) -> bool:
    """Whether the fine-tune recipe's encoder (``class_path`` / ``init_args`` as written) is the run's encoder: same
    class and every argument the recipe sets equal in the run's resolved one (``drop_path_rate`` aside)."""
    if not isinstance(run, dict) or recipe.get("class_path") != run.get("class_path"):
        return False
    ours, theirs = recipe.get("init_args") or {}, run.get("init_args") or {}
    return all(theirs.get(k) == v for k, v in ours.items() if k not in _TRAINING_ONLY)


def _arch_tag(encoder: dict[str, Any] | None) -> str | None:
    """``vit_base_patch16_224`` -> ``vit_b16`` (how recipe files name an architecture)."""
    arch = str(_section(encoder or {}, "init_args", "arch") or "")
    parts = arch.split("_")
    if len(parts) < 3 or parts[0] != "vit" or parts[1] not in _ARCH_TAGS or not parts[2].startswith("patch"):
        return None
    return f"vit_{_ARCH_TAGS[parts[1]]}{parts[2].removeprefix('patch')}"


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def finetune_command(
    checkpoint: str | os.PathLike,
    config: dict[str, Any],
    *,
    recipes: Sequence[str | os.PathLike] = (),
    folder: str | os.PathLike = RECIPES,
) -> str:
    """The ``mim finetune`` command line that fine-tunes a pretraining run's checkpoint.

    The recipe is a fine-tuning recipe (:func:`finetune_recipes`) with the run's datamodule class, preferring, in
    order: one whose encoder is the run's (the debug and quickstart recipes spell theirs out); one in the folder of
    the run's first recipe (``recipes/debug/`` for a debug run); one that rebuilds the encoder from the checkpoint (no
    ``encoder``), named after the run's architecture (``vit_b16``) if one is; any other, with
    ``--model.init_args.encoder=null`` so that the encoder is rebuilt from the checkpoint. The run's data paths
    (``root``, ``val_root``, ``train_path``, ``val_path``) that differ from the recipe's are passed on, and with an
    encoder rebuilt from the checkpoint its ``image_size`` / ``num_frames`` too. Without a
    fine-tuning recipe for the run's data: a FinetuneModule with the run's own datamodule (``--data`` as JSON).

    Args:
        checkpoint: the pretraining checkpoint (file or sharded folder).
        config: the run's resolved config (``model`` and ``data`` with ``class_path`` / ``init_args``).
        recipes: the run's ``-c`` files.
        folder: where the fine-tuning recipes are.

    Returns:
        ``mim finetune ...``, quoted for a shell.
    """
    import shlex

    data = _section(config, "data") or {}
    encoder = _section(config, "model", "init_args", "encoder")
    home = Path(recipes[0]).resolve().parent if recipes else None
    tag = _arch_tag(encoder)
    best: tuple[tuple[int, int, int], Path, dict[str, Any]] | None = None
    for path in finetune_recipes(folder):
        recipe = _load_yaml(path)
        if _section(recipe, "data", "class_path") != data.get("class_path"):
            continue
        own = _section(recipe, "model", "init_args", "encoder")
        if own is not None:
            fit = 3 if _same_encoder(own, encoder) else 0
        else:
            fit = 2 if tag and tag in path.stem else 1
        rank = (int(fit == 3), int(path.resolve().parent == home), fit)
        if best is None or rank > best[0]:
            best = (rank, path, recipe)
    if best is None:
        args = ["--model=mim.finetune.FinetuneModule", f"--model.init_args.checkpoint={checkpoint}"]
        args.append(f"--data={json.dumps(data, separators=(',', ':'))}")
        return "mim finetune " + " ".join(shlex.quote(a) for a in args)
    (_, _, fit), path, recipe = best
    args = ["-c", _shown(path), f"--model.init_args.checkpoint={checkpoint}"]
    if fit == 0:
        args.append("--model.init_args.encoder=null")
    ours, theirs = data.get("init_args") or {}, _section(recipe, "data", "init_args") or {}
    for key in _DATA_PATHS + (_DATA_SHAPE if fit < 3 else ()):  # a rebuilt encoder has the pretraining data's shape
        if ours.get(key) not in (None, "", "???") and ours.get(key) != theirs.get(key):
            args.append(f"--data.init_args.{key}={ours[key]}")
    return "mim finetune " + " ".join(shlex.quote(str(a)) for a in args)


def summary(
    *, best: str | None, last: str | None, logs: str | None, resume: Sequence[str], finetune: str | None = None
) -> str:
    """The block printed at the end of ``mim fit``.

    Args:
        best: the best checkpoint (by the monitored metric), if any.
        last: the last checkpoint written, if any.
        logs: :func:`log_location`.
        resume: the arguments of ``mim fit`` that resume this run (without ``mim fit``).
        finetune: the command that fine-tunes the checkpoint (:func:`finetune_command`; a pretraining run), if any.
    """
    ckpt = best or last
    lines = ["mim: run finished"]
    if best:
        lines.append(f"  best checkpoint:  {best}")
    if last and last != best:
        lines.append(f"  last checkpoint:  {last}")
    if not ckpt:
        lines.append("  no checkpoint written")
    if logs:
        lines.append(f"  logs:             {logs}")
    lines.append(f"  resume:    mim fit {' '.join(resume)}")
    if ckpt:
        lines.append(f"  export:    mim export {ckpt} {Path(ckpt).parent / 'export'}/")
        if finetune:
            lines.append(f"  fine-tune: {finetune}")
    return "\n".join(lines)


@dataclass
class OfflineRun:
    """What an offline wandb run logged (:func:`read_offline_run`).

    Attributes:
        run_id: the wandb run id.
        config: the logged config, top-level key -> value (``model``, ``data``, ``trainer``, ``mim`` ...).
        history: one dict per logged row, nested keys joined with ``/`` (an image is ``pictures/<kind>/_type`` ...).
        folder: the run folder (``<default_root_dir>/wandb/offline-run-<time>-<id>``).
    """

    run_id: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    folder: Path


def _records(path: Path) -> Iterator[Any]:
    """The protobuf records of a wandb transaction log (``run-<id>.wandb``: LevelDB's log format, 32 KiB blocks of
    chunks with a 7-byte header ``crc32 u32, length u16, type u8``: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb transaction log (no ':W&B' header)")
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()  # type: ignore[attr-defined]  # generated protobuf module
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_offline_run(folder: str | os.PathLike) -> OfflineRun:
    """Read an offline wandb run without syncing it: its id, config and history (to check or plot a run on a machine
    without network; ``wandb sync FOLDER`` uploads it later).

    Args:
        folder: ``<default_root_dir>/wandb/offline-run-<time>-<id>``.
    """
    folder = Path(folder)
    log = next(folder.glob("run-*.wandb"), None)
    if log is None:
        raise FileNotFoundError(f"{folder}: no run-<id>.wandb file; expected an offline wandb run folder")
    run_id, config, history = "", {}, []
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return OfflineRun(run_id=run_id, config=config, history=history, folder=folder)
