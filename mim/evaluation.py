"""``mim eval CKPT --data RECIPE.yaml``: probes on the frozen features of a checkpoint's encoder.

The encoder of any checkpoint or export (:func:`mim.load.load_encoder`) runs once, frozen, over the training and
validation loaders of the datamodule that a recipe's ``data:`` section builds (augmentation off, training set in
order), and the probes train on the cached features:

* ``linear``: MAE's linear probe (He et al., CVPR 2022, Appendix A.1; facebookresearch/mae main_linprobe.py):
  BatchNorm + Linear, LARS, warmup + cosine (:func:`mim.probe_train.sgd_linear_probe`);
* ``lbfgs``: a deterministic full-batch L-BFGS logistic regression (:func:`mim.probe.linear_probe`), for small sets;
* ``knn``: DINO's weighted k-NN, k = 20, T = 0.07 (Caron et al., ICCV 2021; facebookresearch/dino eval_knn.py);
* ``attentive``: V-JEPA's attentive probe on the patch tokens (Bardes et al., 2024; facebookresearch/jepa
  src/models/attentive_pooler.py). The tokens are cached when they fit in ``token_cache_gb``; otherwise the encoder
  runs again on every batch of every epoch;
* tables: ``mlp``, a small MLP on the features, and ``hgb``, scikit-learn's ``HistGradientBoostingClassifier`` on the
  same split of the table's own columns, reported next to the probes whichever wins.

Prints a table (probe | top-1 | top-5 | time) and writes the results as JSON atomically (temporary file + rename).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mim.checkpoint import CheckpointError
from mim.checks import check_choice, check_int, check_range
from mim.load import load_encoder
from mim.models.base import Encoder
from mim.probe import Accuracy, in_order, knn_classify, linear_probe, loader_features
from mim.probe_train import attentive_probe, mlp_probe, sgd_linear_probe

__all__ = [
    "PROBES",
    "ProbeRow",
    "check_data",
    "datamodule_from_recipe",
    "evaluate",
    "format_table",
    "main",
    "raw_table_baseline",
]

PROBES = ("linear", "lbfgs", "knn", "attentive", "mlp", "hgb")
DEFAULT_EPOCHS = {"linear": 90, "attentive": 20, "mlp": 100}
LBFGS_MAX_TRAIN = 100_000  # the full-batch L-BFGS probe leaves the default list above this many training samples
Pool = Literal["avg", "cls", "cls+avg"]


@dataclass
class ProbeRow:
    """One probe's result: top-1 / top-5 in [0, 1] (top-5 None where not measured), seconds, and a short note."""

    probe: str
    top1: float
    top5: float | None
    seconds: float
    note: str = ""


# ------------------------------------------------------------------------------------------------ data


def datamodule_from_recipe(recipe: str | os.PathLike, overrides: Sequence[str] = ()) -> Any:
    """The datamodule of a recipe's ``data:`` section, parsed by jsonargparse as ``mim fit`` parses it.

    Args:
        recipe: a recipe YAML (only its ``data:`` section is read).
        overrides: ``--data.init_args.x=v`` arguments (or ``--data.init_args.x v``).

    Returns:
        The instantiated ``LightningDataModule``.

    Raises:
        ValueError: no such file, no ``data:`` section, or arguments the datamodule does not accept.
    """
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    path = Path(recipe)
    if not path.is_file():
        raise ValueError(f"{path}: no such recipe file")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not config.get("data"):
        raise ValueError(f"{path}: the recipe has no 'data:' section")
    parser = ArgumentParser(prog="mim eval", exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True, fail_untyped=False)
    try:
        cfg = parser.parse_args([f"--data={json.dumps(config['data'])}", *overrides])
        built = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    except (argparse.ArgumentError, TypeError) as e:
        raise ValueError(f"{path}: bad data section or override: {' '.join(str(e).split())}") from None
    return built.data


def modality_of(datamodule: Any) -> str:
    """``table`` (a schema: ``num_numeric``), ``video`` (``num_frames``) or ``image``."""
    if hasattr(datamodule, "num_numeric"):
        return "table"
    return "video" if hasattr(datamodule, "num_frames") else "image"


def check_data(encoder: Encoder, datamodule: Any) -> int:
    """Refuse data the encoder cannot read or that has no labels, naming both sides.

    Returns:
        The number of classes.

    Raises:
        ValueError: another modality, table schema, channel count or image size; or no labels.
    """
    name = type(datamodule).__name__
    kind = modality_of(datamodule)
    if kind != encoder.modality:
        raise ValueError(f"the checkpoint's encoder reads {encoder.modality}s but {name} yields {kind}s")
    classes = getattr(datamodule, "num_classes", None)
    if classes is None:
        raise ValueError(
            f"{name} has no class labels (num_classes is None): evaluation needs a labelled dataset "
            "(for a table, set label_column to a classification label)"
        )
    if kind == "table":
        schema = (getattr(encoder, "num_numeric", None), list(getattr(encoder, "category_cardinalities", None) or []))
        wanted = (datamodule.num_numeric, list(datamodule.category_cardinalities))
        if schema != wanted:
            raise ValueError(
                f"the encoder was trained on a table with (numeric, category sizes) = {schema} but {name} has "
                f"{wanted}: evaluate on a table with the same columns"
            )
        return int(classes)
    chans, size = getattr(datamodule, "in_chans", None), getattr(datamodule, "image_size", None)
    own_chans, own_size = getattr(encoder, "in_chans", None), getattr(encoder, "img_size", None)
    if None not in (chans, own_chans) and chans != own_chans:
        raise ValueError(f"the encoder takes {own_chans}-channel input but {name} yields {chans} channels")
    if None not in (size, own_size) and tuple(own_size) != (size, size):  # type: ignore[arg-type]
        raise ValueError(
            f"the encoder takes {tuple(own_size)} images but {name} yields {size} x {size}: "  # type: ignore[arg-type]
            f"add --data.init_args.image_size={own_size[0]}"  # type: ignore[index]
        )
    return int(classes)


def _evaluation_transforms(datamodule: Any) -> None:
    """Training samples as the validation ones: no augmentation, no repeated clips (before ``setup``)."""
    for attr, value in (("augment", False), ("rand_augment", None), ("num_repeats", 1)):
        if hasattr(datamodule, attr):
            setattr(datamodule, attr, value)


def loaders(datamodule: Any) -> tuple[Any, Any]:
    """(training loader in order, validation loader) of a datamodule, augmentation off (set up here).

    Raises:
        ValueError: the datamodule has no validation split.
    """
    _evaluation_transforms(datamodule)
    datamodule.prepare_data()
    datamodule.setup("fit")
    val = datamodule.val_dataloader()
    if isinstance(val, list) and not val:
        raise ValueError(
            f"{type(datamodule).__name__} has no validation split: evaluation needs held-out labelled data "
            "(e.g. val_path, val_fraction or num_val)"
        )
    return in_order(datamodule.train_dataloader()), val


def raw_table_baseline(
    datamodule: Any, *, seed: int = 0, max_train: int | None = None, max_val: int | None = None
) -> Accuracy:
    """scikit-learn's ``HistGradientBoostingClassifier`` on the table's own columns, same train / val rows.

    It reads the columns the encoder tokenises, before tokenisation: the numeric ones standardised (a tree does not
    see the difference) with missing values as NaN, and each categorical column's codes as a categorical feature
    (as an ordinal one above 255 categories, the model's limit).

    Args:
        datamodule: a set-up :class:`mim.data.TableDataModule`.
        seed: the model's ``random_state``.
        max_train: use the first training rows only, as the probes do.
        max_val: use the first validation rows only.
    """
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier

    def columns(dataset: Any, limit: int | None) -> tuple[Any, Any]:
        t = dataset.tensors
        numeric = t["numeric"].double().masked_fill(t["numeric_missing"], math.nan)  # (S, Fn)
        x = torch.cat([numeric, t["categorical"].double()], dim=1)[:limit]  # (S, Fn + Fc)
        return x.numpy(), t["label"][:limit].numpy()

    x_train, y_train = columns(datamodule.train_dataset, max_train)
    x_val, y_val = columns(datamodule.val_dataset, max_val)
    num_numeric = datamodule.num_numeric
    categorical = [False] * num_numeric + [c <= 255 for c in datamodule.category_cardinalities]
    model = HistGradientBoostingClassifier(
        categorical_features=np.array(categorical, dtype=bool) if any(categorical) else None, random_state=seed
    )
    model.fit(x_train, y_train)
    proba = torch.from_numpy(model.predict_proba(x_val))  # (S', C seen in training)
    classes = torch.from_numpy(model.classes_).long()  # (C',)
    top = classes[proba.topk(min(5, proba.shape[1]), dim=1).indices]  # (S', 5)
    hit = top == torch.from_numpy(y_val).long().unsqueeze(1)  # (S', 5)
    return Accuracy(top1=hit[:, 0].double().mean().item(), top5=hit.any(1).double().mean().item())


# ------------------------------------------------------------------------------------------------ probes


def _default_probes(modality: str, num_train: int) -> list[str]:
    probes = ["linear", "lbfgs", "knn"] if num_train <= LBFGS_MAX_TRAIN else ["linear", "knn"]
    return probes + (["mlp", "hgb"] if modality == "table" else [])


def evaluate(
    encoder: Encoder,
    datamodule: Any,
    *,
    probes: Sequence[str] | None = None,
    pool: Pool = "avg",
    epochs: int | None = None,
    max_train: int | None = None,
    max_val: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    token_cache_gb: float = 4.0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Frozen-feature probes of ``encoder`` on ``datamodule``.

    Args:
        encoder: the encoder (frozen here: eval mode, no grad; its mode is restored).
        datamodule: a labelled datamodule of the encoder's modality with a validation split.
        probes: any of :data:`PROBES`; None: linear, lbfgs (up to 100k training samples) and knn, plus mlp and hgb
            for tables.
        pool: pooled features of the linear, lbfgs, knn and mlp probes: ``avg`` of the patch tokens, ``cls`` or both.
        epochs: epochs of every trained probe; None: linear 90 (MAE), attentive 20 (V-JEPA), mlp 100.
        max_train: use the first this many training samples; None: all.
        max_val: use the first this many validation samples; None: all.
        device: where the encoder and the probes run.
        seed: seeds the probes.
        token_cache_gb: the attentive probe caches the patch tokens when they take at most this much (float16);
            otherwise it runs the encoder again every epoch.
        progress: tqdm bars for feature extraction and training.
        log: where progress lines go.

    Returns:
        ``{"modality", "num_classes", "num_train", "num_val", "pool", "feature_seconds", "results": [ProbeRow
        dicts]}``.
    """
    owner = "evaluate"
    check_choice(owner, "pool", pool, ("avg", "cls", "cls+avg"))
    probes = list(probes) if probes is not None else None
    for probe in probes or []:
        check_choice(owner, "probes", probe, PROBES)
    if epochs is not None:
        check_int(owner, "epochs", epochs)
    check_range(owner, "token_cache_gb", token_cache_gb, 0, math.inf)
    num_classes = check_data(encoder, datamodule)
    if "hgb" in (probes or []) and encoder.modality != "table":
        raise ValueError(f"evaluate: the hgb probe reads a table's columns, but the data are {encoder.modality}s")
    train_loader, val_loader = loaders(datamodule)
    encoder = encoder.to(device)
    modality = encoder.modality

    def transfer(batch: dict[str, Any]) -> dict[str, Any]:
        return datamodule.on_after_batch_transfer(batch, 0)

    def features(loader: Any, limit: int | None, what: str) -> tuple[Tensor, Tensor]:
        bar = f"{what} features" if progress else None
        return loader_features(encoder, loader, transfer=transfer, pool=pool, max_samples=limit, progress=bar)

    start = time.perf_counter()
    train_x, train_y = features(train_loader, max_train, "train")
    val_x, val_y = features(val_loader, max_val, "val")
    feature_seconds = time.perf_counter() - start
    log(f"features: {train_x.shape[0]} train / {val_x.shape[0]} val samples, {feature_seconds:.1f} s")
    chosen = probes if probes is not None else _default_probes(modality, train_x.shape[0])
    rows: list[ProbeRow] = []
    for probe in chosen:
        trained: dict[str, Any] = {
            "num_classes": num_classes,
            "seed": seed,
            "device": device,
            "progress": probe if progress else None,
        }
        tic = time.perf_counter()
        note = ""
        if probe == "linear":
            n = epochs or DEFAULT_EPOCHS["linear"]
            acc = sgd_linear_probe(train_x, train_y, val_x, val_y, epochs=n, **trained)
            note = f"LARS, {n} epochs"
        elif probe == "lbfgs":
            fit = linear_probe(train_x, train_y, val_x, val_y, num_classes=num_classes)
            assert fit.test_top5 is not None
            acc, note = Accuracy(top1=fit.test_accuracy, top5=fit.test_top5), "full-batch L-BFGS"
        elif probe == "knn":
            acc = knn_classify(
                train_x.to(device), train_y, val_x.to(device), val_y, k=20, temperature=0.07, num_classes=num_classes
            )
            note = "k=20, T=0.07"
        elif probe == "mlp":
            n = epochs or DEFAULT_EPOCHS["mlp"]
            acc = mlp_probe(train_x, train_y, val_x, val_y, epochs=n, **trained)
            note = f"AdamW, {n} epochs"
        elif probe == "hgb":
            acc, note = (
                raw_table_baseline(datamodule, seed=seed, max_train=max_train, max_val=max_val),
                "raw columns, not the encoder",
            )
        else:  # attentive
            n = epochs or DEFAULT_EPOCHS["attentive"]
            acc, note = _attentive(encoder, datamodule, (train_loader, val_loader), transfer, num_classes, n,
                                   (max_train, max_val), device=device, seed=seed, cache_gb=token_cache_gb,
                                   progress=progress)  # fmt: skip
        seconds = time.perf_counter() - tic
        rows.append(ProbeRow(probe=probe, top1=acc.top1, top5=acc.top5, seconds=round(seconds, 3), note=note))
        log(f"{probe}: top-1 {acc.top1:.4f} ({seconds:.1f} s)")
    return {
        "modality": modality,
        "num_classes": num_classes,
        "num_train": int(train_x.shape[0]),
        "num_val": int(val_x.shape[0]),
        "pool": pool,
        "feature_seconds": round(feature_seconds, 3),
        "results": [asdict(r) for r in rows],
    }


def _attentive(
    encoder: Encoder,
    datamodule: Any,
    split_loaders: tuple[Any, Any],
    transfer: Callable[[dict[str, Any]], dict[str, Any]],
    num_classes: int,
    epochs: int,
    limits: tuple[int | None, int | None],
    *,
    device: torch.device | str,
    seed: int,
    cache_gb: float,
    progress: bool,
) -> tuple[Accuracy, str]:
    """V-JEPA's attentive probe on the patch tokens: cached (float16) when they fit, else the encoder every epoch."""
    (train_loader, val_loader), (max_train, max_val) = split_loaders, limits
    dataset = getattr(train_loader, "dataset", None)
    num_train = len(dataset) if hasattr(dataset, "__len__") else math.inf  # type: ignore[arg-type]
    num_train = min(num_train, max_train or math.inf)
    tokens_gb = num_train * encoder.grid.num_tokens * encoder.embed_dim * 2 / 1e9  # float16
    common = {"dim": encoder.embed_dim, "num_classes": num_classes, "num_heads": encoder.num_heads, "epochs": epochs}
    bar = "attentive" if progress else None

    def tokens(loader: Any, limit: int | None) -> tuple[Tensor, Tensor]:
        return loader_features(encoder, loader, transfer=transfer, pool="tokens", max_samples=limit,
                               store_dtype=torch.float16)  # fmt: skip

    if tokens_gb <= cache_gb:
        train, val = tokens(train_loader, max_train), tokens(val_loader, max_val)
        acc = attentive_probe(train, val, seed=seed, device=device, progress=bar, **common)
        return acc, f"AdamW, {epochs} epochs, tokens cached ({tokens_gb:.2f} GB)"

    shuffled = datamodule.train_dataloader()  # augmentation already off; a new order every epoch

    def stream(loader: Any, limit: int | None, epoch: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        if epoch is not None and hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        seen = 0
        for batch in loader:  # the encoder on one batch at a time
            x, y = tokens([batch], None if limit is None else limit - seen)
            seen += x.shape[0]
            yield x, y
            if limit is not None and seen >= limit:
                return

    steps = len(shuffled) if max_train is None else min(len(shuffled), math.ceil(max_train / shuffled.batch_size))
    train_batches = (lambda epoch: stream(shuffled, max_train, epoch), steps)
    acc = attentive_probe(train_batches, stream(val_loader, max_val), seed=seed, device=device, progress=bar, **common)
    return acc, f"AdamW, {epochs} epochs, encoder run every epoch ({tokens_gb:.1f} GB of tokens)"


# ------------------------------------------------------------------------------------------------ command


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """``probe | top-1 | top-5 | time`` as aligned text."""
    header = ("probe", "top-1", "top-5", "time", "")
    lines = [
        (
            r["probe"],
            f"{r['top1']:.4f}",
            "-" if r["top5"] is None else f"{r['top5']:.4f}",
            f"{r['seconds']:.1f} s",
            r.get("note", ""),
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(4)]
    out = []
    for line in [header, *lines]:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line[:4], widths))]
        out.append(" | ".join(cells) + (f"   {line[4]}" if line[4] else ""))
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="mim eval",
        description="Probes on the frozen features of a checkpoint's encoder: MAE's linear probe (LARS), an L-BFGS "
        "linear probe, DINO's k-NN, V-JEPA's attentive probe; for tables also an MLP and gradient-boosted trees on "
        "the raw columns. Extra --data.init_args.X=V arguments override the recipe's data section.",
    )
    p.add_argument("checkpoint", type=Path, help="a mim checkpoint (.ckpt, DeepSpeed / FSDP2 folder) or mim export")
    p.add_argument("--data", required=True, type=Path, help="a recipe YAML whose data: section is the labelled data")
    p.add_argument("--encoder", default="student", help="student (default), target (a JEPA target encoder) or a prefix")
    p.add_argument("--probes", default=None, help=f"comma-separated, from {','.join(PROBES)} (default: "
                   "linear,lbfgs,knn; tables add mlp,hgb)")  # fmt: skip
    p.add_argument("--pool", default="avg", choices=("avg", "cls", "cls+avg"), help="pooled features (default avg)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the trained probes (default: linear 90, "
                   "attentive 20, mlp 100)")  # fmt: skip
    p.add_argument("--max-train", type=int, default=None, help="use the first N training samples")
    p.add_argument("--max-val", type=int, default=None, help="use the first N validation samples")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seeds the probes")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, rest = p.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):  # --data.init_args.x=v, or --data.init_args.x v
        if not rest[i].startswith("--data."):
            p.error(f"unrecognized arguments: {' '.join(rest[i:])}")
        takes_value = "=" not in rest[i] and i + 1 < len(rest) and not rest[i + 1].startswith("--")
        overrides += rest[i : i + 1 + takes_value]
        i += 1 + takes_value
    if args.probes is not None:
        args.probes = [s.strip() for s in args.probes.split(",") if s.strip()]
        unknown = [s for s in args.probes if s not in PROBES]
        if unknown or not args.probes:
            p.error(f"--probes must be a comma-separated list from {','.join(PROBES)}, got {unknown or args.probes}")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    """``mim eval CKPT --data RECIPE.yaml [--encoder student|target] [--probes ...] [--epochs N] [--out FILE]``."""
    args, overrides = _parse(list(sys.argv[1:] if argv is None else argv))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        encoder = load_encoder(args.checkpoint, which=args.encoder)
        datamodule = datamodule_from_recipe(args.data, overrides)
        print(f"mim eval: the {args.encoder} encoder ({encoder.modality}) of {args.checkpoint} on "
              f"{type(datamodule).__name__} from {args.data}, on {device}")  # fmt: skip
        summary = evaluate(
            encoder,
            datamodule,
            probes=args.probes,
            pool=args.pool,
            epochs=args.epochs,
            max_train=args.max_train,
            max_val=args.max_val,
            device=device,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"mim eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print()
    print(format_table(summary["results"]))
    result = {
        "checkpoint": str(args.checkpoint),
        "encoder": args.encoder,
        "data": str(args.data),
        "datamodule": type(datamodule).__name__,
        "overrides": overrides,
        **summary,
    }
    if args.out is not None:
        write_json(args.out, result)
        print(f"\nresults: {args.out}")
    return 0
