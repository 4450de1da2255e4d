"""Tiny models, a CPU trainer and recording callbacks shared by the tests.

Plain functions and classes, imported with ``from tests.factories import ...``: fixtures live in conftest.py and
contract test classes in contracts.py. Every builder takes the tiny defaults below and lets a test override any
constructor argument; an overriding ``model_kwargs`` replaces the default one whole (no merge), so what a test
passes is what timm gets.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset

from mim.models import MaskedEncoder, MaskedTableEncoder

TINY_ARCH = "vit_tiny_patch16_224"
TINY_VIT: dict[str, Any] = {"depth": 1, "embed_dim": 64, "num_heads": 4}  # the contract tests' encoder
TINY_TABLE_VIT: dict[str, Any] = {"depth": 1, "embed_dim": 32, "num_heads": 2}
E2E_VIT: dict[str, Any] = {"embed_dim": 64, "depth": 4, "num_heads": 4}  # the e2e learning checks' blocks
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def fashion_mnist_vit(**overrides: Any) -> MaskedEncoder:
    """The e2e learning checks' encoder: E2E_VIT blocks on 28 x 28 grey Fashion-MNIST in patches of 7 (a 4 x 4 grid).

    Draws its weights from torch's global generator (the tests seed it first). ``overrides`` replace any
    MaskedEncoder argument (``model_kwargs`` whole, as for every builder here)."""
    kwargs: dict[str, Any] = {
        "arch": TINY_ARCH,
        "img_size": 28,
        "patch_size": 7,
        "in_chans": 1,
        "model_kwargs": dict(E2E_VIT),
    }
    return MaskedEncoder(**{**kwargs, **overrides})


def fit_debug_recipe(name: str, tmp_path: Path, steps: int, *extra: str) -> tuple[Any, list[dict[str, float]]]:
    """Build ``recipes/debug/<name>`` with the CLI's builder and fit it for ``steps`` optimizer steps, logging every
    step (one validation batch, no progress bar; ``extra``: more command-line overrides).

    Returns:
        (the MimCLI, the ``train/...`` metrics after every step: :class:`TrainMetricsRecorder`).
    """
    from mim.lightning_cli import build

    args = ["--config", str(RECIPES / "debug" / name), f"--trainer.default_root_dir={tmp_path}"]
    args += [f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=1"]
    cli = build([*args, "--trainer.enable_progress_bar=false", *extra], save_config_callback=None)
    record = TrainMetricsRecorder()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, record.seen


def tiny_encoder(*, seed: int | None = 0, **overrides: Any) -> MaskedEncoder:
    """A MaskedEncoder on 16 x 16 RGB images in patches of 4 (grid 1 x 4 x 4), TINY_VIT blocks.

    Args:
        seed: ``torch.manual_seed`` before the weights are drawn; None leaves the global generator as it is.
        **overrides: MaskedEncoder arguments that replace the defaults.

    Returns:
        The encoder.
    """
    kwargs: dict[str, Any] = dict(arch=TINY_ARCH, img_size=16, patch_size=4, in_chans=3, model_kwargs=dict(TINY_VIT))
    kwargs.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return MaskedEncoder(**kwargs)


def tiny_video_encoder(*, seed: int | None = 0, **overrides: Any) -> MaskedEncoder:
    """``tiny_encoder`` on clips of 4 frames of 16 x 16 in tubelets of 2 x 4 x 4 (grid 2 x 4 x 4).

    Args:
        seed: as in ``tiny_encoder``.
        **overrides: MaskedEncoder arguments that replace the defaults.

    Returns:
        The encoder.
    """
    return tiny_encoder(seed=seed, **{"num_frames": 4, "tubelet_size": 2, **overrides})


def tiny_table_encoder(*, seed: int | None = 0, **overrides: Any) -> MaskedTableEncoder:
    """A MaskedTableEncoder with TINY_TABLE_VIT blocks; the schema (``num_numeric``, ``category_cardinalities``)
    comes in ``overrides`` or, left out, from the datamodule at fit time.

    Args:
        seed: as in ``tiny_encoder``.
        **overrides: MaskedTableEncoder arguments that replace the defaults.

    Returns:
        The encoder.
    """
    kwargs: dict[str, Any] = dict(arch=TINY_ARCH, model_kwargs=dict(TINY_TABLE_VIT))
    kwargs.update(overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return MaskedTableEncoder(**kwargs)


class ClipDataset(Dataset):
    """16 correlated clips of 3 x 4 x 16 x 16: one random frame repeated, plus ``noise`` times Gaussian noise.

    Args:
        noise: the scale of the per-clip, per-frame Gaussian noise.
    """

    def __init__(self, noise: float) -> None:
        g = torch.Generator().manual_seed(0)
        base = torch.rand(1, 3, 1, 16, 16, generator=g)  # (1, C, 1, H, W)
        self.x = (base + noise * torch.randn(16, 3, 4, 16, 16, generator=g)).float()  # (16, C, T, H, W)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"video": self.x[i]}


def cpu_trainer(**overrides: Any) -> L.Trainer:
    """A quiet one-process CPU Lightning Trainer: no logger, checkpoints, progress bar or model summary.

    Args:
        **overrides: Trainer arguments that replace the defaults (``max_steps``, ``callbacks``,
            ``enable_checkpointing=True`` ...).

    Returns:
        The trainer.
    """
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


class LossRecorder(L.Callback):
    """Keeps every training step's loss as a float in ``losses`` (a host sync per step is fine in a test)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class TrainMetricsRecorder(L.Callback):
    """Keeps, after every training step, the ``train/...`` entries of ``trainer.callback_metrics`` as floats."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def finetune_top1(encoder: Any, *, steps: int, seed: int = 0, num_train: int = 10000, num_test: int = 2000) -> float:
    """Fine-tune ``encoder`` (a copy) with MAE's recipe on Fashion-MNIST for ``steps`` steps of 128 images; top-1 on
    ``num_test`` test images. The short-run settings of recipes/quickstart_finetune.yaml (no Mixup, CutMix,
    RandAugment or erasing; layer decay 0.75, label smoothing 0.1, warmup 10 %, cosine).
    """
    import copy

    from mim.data import FashionMNISTDataModule
    from mim.finetune import FinetuneModule

    L.seed_everything(seed, verbose=False)
    module = FinetuneModule(
        encoder=copy.deepcopy(encoder), blr=2e-3, layer_decay=0.75, warmup_steps=max(1, steps // 10),
        mixup=0.0, cutmix=0.0, random_erasing=0.0, seed=seed,
    )  # fmt: skip
    data = FashionMNISTDataModule(
        batch_size=128, num_train=num_train, num_val=num_test, crop_scale=(0.5, 1.0), seed=seed
    )
    trainer = cpu_trainer(max_steps=steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    trainer = cpu_trainer()
    return float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/top1"])


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent test images."""
    return (accuracy * (1 - accuracy) / n) ** 0.5


class StopAt(L.Callback):
    """Ends training after optimizer step ``step`` (an interruption: the trainer's settings, hence the learning-rate
    schedule, stay those of the uninterrupted run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    """A tar file at ``path`` with one member per ``name: bytes`` (hand-made webdataset shards, corrupt members)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def fashion_mnist_probe(data: Any, images: int, *, seed: int = 1234) -> Callable[[torch.nn.Module], float]:
    """The e2e learning checks' measure: a function giving an encoder's linear-probe test accuracy on its
    average-pooled features of ``images`` Fashion-MNIST train and ``images`` test images (the same random subsets,
    drawn from ``seed``, for every encoder), normalised with ``data``'s mean and std."""
    from mim.data import load_fashion_mnist, normalize_image
    from mim.probe import encoder_features, linear_probe

    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(x_train.shape[0], generator=g)[:images]
    te = torch.randperm(x_test.shape[0], generator=g)[:images]

    def normalize(u: torch.Tensor) -> torch.Tensor:
        return normalize_image(u, data.mean, data.std)

    def probe(encoder: torch.nn.Module) -> float:
        f_train = encoder_features(encoder, x_train[tr], normalize=normalize, pool="avg")
        f_test = encoder_features(encoder, x_test[te], normalize=normalize, pool="avg")
        return linear_probe(f_train, y_train[tr], f_test, y_test[te], num_classes=10).test_accuracy

    return probe
