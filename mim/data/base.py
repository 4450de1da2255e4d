"""The image datamodule base: ``uint8`` batches through the loader, normalised on the device.

Every image datamodule yields :class:`mim.types.Batch` dicts ``{"image": (B, C, H, W) uint8,
"label": (B,) int64}`` from its loaders (4x fewer bytes through worker pipes and host-to-device copies
than float32) and turns the images into float32 normalised with the dataset's per-channel mean and std in
:meth:`ImageDataModule.on_after_batch_transfer`, i.e. on the device, after the copy. The model therefore
always receives float images ``(x / 255 - mean) / std``.

A subclass validates its own arguments, calls ``super().__init__`` with the shared ones and implements
:meth:`ImageDataModule.build_datasets`; the base owns the loaders and the normalisation.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mim.checks import check_int, check_pair_range, check_range, invalid
from mim.types import Batch

__all__ = [
    "FileDataset",
    "ImageDataModule",
    "SkippedFilesMixin",
    "TensorImageDataset",
    "HeldOutLoadersMixin",
    "check_crops",
    "class_index",
    "check_loader_settings",
    "default_stats",
    "normalize_image",
    "normalize_video",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# One channel: the average of the RGB statistics (what a grey copy of an ImageNet-like set roughly has).
IMAGENET_MEAN_GREY = (0.449,)
IMAGENET_STD_GREY = (0.226,)


def default_stats(
    in_chans: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[Sequence[float], Sequence[float]]:
    """``mean``/``std`` or, where None, ImageNet's (RGB) or their channel average (one channel)."""
    grey = in_chans == 1
    return (
        mean if mean is not None else (IMAGENET_MEAN_GREY if grey else IMAGENET_MEAN),
        std if std is not None else (IMAGENET_STD_GREY if grey else IMAGENET_STD),
    )


def _normalize(
    x: Tensor,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    *,
    name: str,
    noun: str,
    layout: str,
    num_spatial: int,
) -> Tensor:
    """``(x / 255 - mean) / std`` per channel of uint8 ``x``, whose channel axis is ``-(num_spatial + 1)``.

    Shared by :func:`normalize_image` (``num_spatial = 2``: H, W) and :func:`normalize_video` (3: T, H, W);
    ``name``, ``noun`` and ``layout`` word the errors.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"{name} expects uint8 {noun}, got {x.dtype}")
    if x.dim() not in (num_spatial + 1, num_spatial + 2):
        raise ValueError(f"{name} expects {layout} {noun}, got shape {tuple(x.shape)}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device)  # (C,)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device)  # (C,)
    channels = x.shape[-(num_spatial + 1)]
    if mean_t.shape != (channels,) or std_t.shape != (channels,):
        raise ValueError(
            f"{name}: {noun} have {channels} channels but mean has {tuple(mean_t.shape)} "
            f"and std has {tuple(std_t.shape)} values"
        )
    per_channel = (channels,) + (1,) * num_spatial  # (C, 1, 1) or (C, 1, 1, 1)
    out = x.to(torch.float32).div_(255.0)  # (..., C, *spatial) in [0, 1]
    return out.sub_(mean_t.view(per_channel)).div_(std_t.view(per_channel))  # (..., C, *spatial)


def normalize_image(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Turn ``uint8`` images into float32 normalised per channel: ``(images / 255 - mean) / std``.

    Args:
        images: (B, C, H, W) or (C, H, W) uint8, on any device.
        mean: C per-channel means of the [0, 1]-scaled pixels.
        std: C per-channel standard deviations of the [0, 1]-scaled pixels.

    Returns:
        (B, C, H, W) or (C, H, W) float32 on the images' device.

    Raises:
        TypeError: when ``images`` is not uint8 (normalising twice is a bug, not a no-op).
        ValueError: when the number of channels does not match ``mean`` / ``std``.
    """
    layout = "(B, C, H, W) or (C, H, W)"
    return _normalize(images, mean, std, name="normalize_image", noun="images", layout=layout, num_spatial=2)


def normalize_video(videos: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Turn ``uint8`` clips into float32 normalised per channel: ``(videos / 255 - mean) / std``.

    Args:
        videos: (B, C, T, H, W) or (C, T, H, W) uint8 (T frames), on any device.
        mean: C per-channel means of the [0, 1]-scaled pixels.
        std: C per-channel standard deviations of the [0, 1]-scaled pixels.

    Returns:
        (B, C, T, H, W) or (C, T, H, W) float32 on the videos' device.

    Raises:
        TypeError: when ``videos`` is not uint8 (normalising twice is a bug, not a no-op).
        ValueError: when the shape is not 4-D/5-D or the channel count does not match ``mean`` / ``std``.
    """
    layout = "(B, C, T, H, W) or (C, T, H, W)"
    return _normalize(videos, mean, std, name="normalize_video", noun="videos", layout=layout, num_spatial=3)


def check_loader_settings(owner: str, *, batch_size: Any, num_workers: Any, seed: Any) -> None:
    """Raise ``ValueError`` naming ``owner`` unless ``batch_size >= 1``, ``num_workers >= 0`` and ``seed`` is an int."""
    check_int(owner, "batch_size", batch_size)
    check_int(owner, "num_workers", num_workers, minimum=0)
    check_int(owner, "seed", seed, minimum=None)


def check_crops(owner: str, crop_scale: Sequence[float], eval_crop_pct: float | None = None) -> tuple[float, float]:
    """``crop_scale`` as floats; ``ValueError`` naming ``owner`` unless ``0 < low <= high <= 1`` and (when given)
    ``0 < eval_crop_pct <= 1``."""
    scale = check_pair_range(owner, "crop_scale", crop_scale, 0, 1, low_open=True)
    if eval_crop_pct is not None:
        check_range(owner, "eval_crop_pct", eval_crop_pct, 0, 1, low_open=True)
    return scale


def class_index(
    owner: str, field: str, root: Path, subdirs: Sequence[str], classes: Sequence[str] | None, *, reference: str
) -> tuple[list[str], dict[str, int]]:
    """The class names of a class-per-subfolder ``root`` and their labels (label ``i`` is ``classes[i]``).

    Args:
        owner, field: name the argument in error messages.
        root: the folder (for messages).
        subdirs: its class subfolders.
        classes: the names that define the labels (e.g. the training folder's); None: ``subdirs``.
        reference: where ``classes`` come from, for the message ("training folder").

    Raises:
        ValueError: a subfolder is not among ``classes``.
    """
    classes = list(subdirs) if classes is None else list(classes)
    unknown = [d for d in subdirs if d not in classes]
    if unknown:
        raise ValueError(
            f"{owner}.{field}: {str(root)!r} has class folders {unknown} that the {reference} does not have "
            f"(training classes: {classes})"
        )
    return classes, {name: i for i, name in enumerate(classes)}


class TensorImageDataset(Dataset):
    """Samples from in-memory ``uint8`` images, each passed through ``transform``.

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64.
        transform: maps one (C, H, W) uint8 image to a (C, H', W') uint8 image; None keeps it as is.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Batch:
        image = self.images[index]  # (C, H, W)
        if self.transform is not None:
            image = self.transform(image)  # (C, H', W')
        return {"image": image, "label": self.labels[index]}


class FileDataset(Dataset, ABC):
    """Samples decoded from files, where an unreadable file is skipped, counted and replaced.

    An unreadable file (one whose :meth:`decode_file` raises one of ``decode_errors``) is skipped: the sample is
    replaced by the next readable one (so batches keep their size), a ``warning`` names the file once, and the
    file is marked bad in a shared-memory table that the loader workers and the main process all see
    (:attr:`num_skipped`); a file marked bad is not tried again.

    Subclasses call ``super().__init__(num_files)``, set the class attributes and implement :meth:`file_path`,
    :meth:`decode_file` and :meth:`to_sample`.

    Attributes:
        kind: what a file holds ("image", "video"), for the messages.
        warning: the category of the skip warnings.
        decode_errors: the exceptions of :meth:`decode_file` that mean "unreadable file".
        bad: (N,) bool in shared memory, True = unreadable.
    """

    kind: str
    warning: type[Warning]
    decode_errors: tuple[type[BaseException], ...]

    def __init__(self, num_files: int) -> None:
        self.bad = torch.zeros(num_files, dtype=torch.bool).share_memory_()  # (N,) True = unreadable

    def __len__(self) -> int:
        return self.bad.numel()

    @abstractmethod
    def file_path(self, index: int) -> str:
        """The path of file ``index`` (for messages and :meth:`skipped_paths`)."""

    @abstractmethod
    def decode_file(self, index: int) -> Any:
        """Decode file ``index``; raises one of ``decode_errors`` when it is unreadable."""

    @abstractmethod
    def to_sample(self, index: int, decoded: Any) -> Batch:
        """The sample of file ``index`` from its decoded content."""

    @property
    def num_skipped(self) -> int:
        """How many files were found unreadable so far (each counted once)."""
        return int(self.bad.sum())

    def skipped_paths(self) -> list[str]:
        return [self.file_path(i) for i in self.bad.nonzero().flatten().tolist()]

    def load(self, index: int) -> Any | None:
        """The decoded content of file ``index``, or None when the file cannot be decoded (then marked bad)."""
        try:
            return self.decode_file(index)
        except self.decode_errors as err:
            self.bad[index] = True
            warnings.warn(f"skipping unreadable {self.kind} {self.file_path(index)}: {err}", self.warning, stacklevel=2)
            return None

    def __getitem__(self, index: int) -> Batch:
        n = len(self)
        for offset in range(n):
            i = (index + offset) % n
            if self.bad[i]:
                continue
            decoded = self.load(i)
            if decoded is not None:
                return self.to_sample(i, decoded)
        raise RuntimeError(f"{type(self).__name__}: none of the {n} {self.kind} files can be decoded")


class SkippedFilesMixin:
    """:attr:`num_skipped`, :meth:`skipped_paths` and the end-of-stage warning of a datamodule whose datasets are
    :class:`FileDataset` s. ``_skipped_where`` may name the data's location in the warning."""

    train_dataset: Dataset | None
    val_dataset: Dataset | None

    def _file_datasets(self) -> list[FileDataset]:
        return [d for d in (self.train_dataset, self.val_dataset) if isinstance(d, FileDataset)]

    @property
    def num_skipped(self) -> int:
        """Unreadable files skipped so far, over the training and validation sets (each file counted once)."""
        return sum(d.num_skipped for d in self._file_datasets())

    def skipped_paths(self) -> list[str]:
        """Paths of the unreadable files skipped so far."""
        return [path for d in self._file_datasets() for path in d.skipped_paths()]

    def _skipped_where(self) -> str:
        return ""

    def teardown(self, stage: str) -> None:
        if self.num_skipped:
            paths = self.skipped_paths()
            dataset = self._file_datasets()[0]
            rank_zero_warn(
                f"{type(self).__name__} skipped {len(paths)} unreadable {dataset.kind} files{self._skipped_where()}: "
                f"{paths[:10]}{' ...' if len(paths) > 10 else ''}",
                category=dataset.warning,
            )


def loader_kwargs(batch_size: int, num_workers: int, **extra: Any) -> dict[str, Any]:
    """DataLoader keyword arguments shared by the map-style datamodules (decided at loader time, not in
    ``__init__``: nothing touches CUDA at construction)."""
    return {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": num_workers > 0,
        **extra,
    }


def train_loader(owner: str, dataset: Dataset, *, seed: int, unit: str = "samples", **kwargs: Any) -> DataLoader:
    """A shuffled training loader of whole batches, ordered by (seed, epoch) (:class:`EpochShuffleSampler`).

    Raises:
        ValueError: the dataset has fewer than ``batch_size`` items (``drop_last`` would leave no batch).
    """
    num_samples = len(dataset)  # type: ignore[arg-type]  # map-style datasets have a length
    if num_samples < kwargs["batch_size"]:
        raise ValueError(
            f"{owner}: {num_samples} training {unit} is fewer than batch_size={kwargs['batch_size']}; lower batch_size"
        )
    return DataLoader(dataset, sampler=EpochShuffleSampler(num_samples, seed=seed), drop_last=True, **kwargs)


def eval_loader(dataset: Dataset | None, **kwargs: Any) -> DataLoader | list:
    """An in-order validation loader, or ``[]`` (Lightning then skips validation) without a dataset."""
    if dataset is None:
        return []
    return DataLoader(dataset, shuffle=False, drop_last=False, **kwargs)


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that is a pure function of (seed, epoch).

    Lightning calls ``set_epoch`` before every epoch (also after resuming from a checkpoint), so a resumed
    run sees the same order as an uninterrupted one. (Under DDP Lightning swaps in a ``DistributedSampler``,
    which is seeded the same way.)

    Args:
        num_samples: dataset length.
        seed: base seed.
    """

    def __init__(self, num_samples: int, *, seed: int = 0) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


class HeldOutLoadersMixin:
    """``test_dataloader`` and ``predict_dataloader`` read the held-out split: ``mim test`` / ``mim predict`` work."""

    def test_dataloader(self) -> DataLoader | list:
        """The validation loader."""
        return self.val_dataloader()  # type: ignore[attr-defined]

    def predict_dataloader(self) -> DataLoader | list:
        """The validation loader."""
        return self.val_dataloader()  # type: ignore[attr-defined]


class ImageDataModule(HeldOutLoadersMixin, LightningDataModule, ABC):
    """Base for image datamodules: ``uint8`` batches from the loaders, normalised on the device.

    Subclasses implement :meth:`build_datasets`. The loaders yield ``{"image": (B, C, H, W) uint8,
    "label": (B,) int64}``; :meth:`on_after_batch_transfer` replaces ``image`` with the float32
    normalised version (:func:`normalize_image`) once the batch is on the device.

    Args:
        batch_size: samples per device and step (the training loader drops the last partial batch).
        image_size: side of the square images the loaders yield.
        in_chans: image channels C (1 grey, 3 RGB).
        mean: C per-channel means of the [0, 1]-scaled pixels; None: ImageNet's (their average for one channel).
        std: C per-channel standard deviations of the [0, 1]-scaled pixels (all > 0); None: ImageNet's.
        num_classes: number of label classes.
        num_workers: loader worker processes (0 loads in the main process); workers persist across epochs.
        seed: seeds the training loader's shuffle (and, through it, the workers' augmentation RNG).

    Attributes:
        batch_size, image_size, in_chans, mean, std, num_classes, num_workers, seed: the arguments
            (``mean`` and ``std`` as tuples of floats).
        eval_crop_pct: the evaluation transform's centre-crop fraction (1.0: no crop; subclasses that resize and
            crop set their own).
        train_dataset, val_dataset: built by :meth:`setup`; ``val_dataset`` is None without a validation split.
    """

    eval_crop_pct: float = 1.0

    def __init__(
        self,
        *,
        batch_size: int,
        image_size: int,
        in_chans: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        num_classes: int,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_loader_settings(owner, batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_int(owner, "image_size", image_size)
        check_int(owner, "in_chans", in_chans)
        check_int(owner, "num_classes", num_classes)
        mean, std = default_stats(in_chans, mean, std)
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(
                f"{owner}.mean and .std must have in_chans={in_chans} values each, got mean={mean}, std={std}"
            )
        if not all(s > 0 for s in std):
            raise invalid(owner, "std", "> 0 in every channel", std)
        self.batch_size = batch_size
        self.image_size = image_size
        self.in_chans = in_chans
        self.mean = mean
        self.std = std
        self.num_classes = num_classes
        self.num_workers = num_workers
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    @abstractmethod
    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """Build the (training, validation) datasets; validation may be None.

        Each sample is ``{"image": (C, image_size, image_size) uint8, "label": () int64}``.
        """

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset, self.val_dataset = self.build_datasets()

    def _loader_kwargs(self) -> dict[str, Any]:
        return loader_kwargs(self.batch_size, self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")  # a no-op once the datasets exist
        assert self.train_dataset is not None
        return train_loader(type(self).__name__, self.train_dataset, seed=self.seed, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return eval_loader(self.val_dataset, **self._loader_kwargs())

    def data_config(self) -> dict[str, Any]:
        """The data settings in the fields of timm's ``pretrained_cfg`` (timm/models/_pretrained.py ``PretrainedCfg``).

        Checkpoints record them (``checkpoint["mim"]["data"]``) and ``mim export`` writes them out, so that
        ``timm.data.resolve_data_config`` gives the model the input it was trained on.

        Returns:
            ``input_size`` [C, H, W], ``mean`` and ``std`` (C values each), ``interpolation`` ("bicubic", as the
            transforms resize) and ``crop_pct`` (:attr:`eval_crop_pct`), as plain JSON types.
        """
        return {
            "input_size": [self.in_chans, self.image_size, self.image_size],
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": "bicubic",
            "crop_pct": float(self.eval_crop_pct),
        }

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Normalise ``batch["image"]`` on the device: (B, C, H, W) uint8 -> (B, C, H, W) float32."""
        batch["image"] = normalize_image(batch["image"], self.mean, self.std)
        return batch
