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

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mim.types import Batch

__all__ = ["ImageDataModule", "TensorImageDataset", "check_positive_int", "normalize_image", "normalize_video"]


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
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_image expects uint8 images, got {images.dtype}")
    if images.dim() not in (3, 4):
        raise ValueError(f"normalize_image expects (B, C, H, W) or (C, H, W) images, got shape {tuple(images.shape)}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device)  # (C,)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device)  # (C,)
    channels = images.shape[-3]
    if mean_t.shape != (channels,) or std_t.shape != (channels,):
        raise ValueError(
            f"normalize_image: images have {channels} channels but mean has {tuple(mean_t.shape)} "
            f"and std has {tuple(std_t.shape)} values"
        )
    x = images.to(torch.float32).div_(255.0)  # (..., C, H, W) in [0, 1]
    return x.sub_(mean_t[:, None, None]).div_(std_t[:, None, None])  # (..., C, H, W)


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
    if videos.dtype != torch.uint8:
        raise TypeError(f"normalize_video expects uint8 videos, got {videos.dtype}")
    if videos.dim() not in (4, 5):
        raise ValueError(
            f"normalize_video expects (B, C, T, H, W) or (C, T, H, W) videos, got shape {tuple(videos.shape)}"
        )
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=videos.device)  # (C,)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=videos.device)  # (C,)
    channels = videos.shape[-4]
    if mean_t.shape != (channels,) or std_t.shape != (channels,):
        raise ValueError(
            f"normalize_video: videos have {channels} channels but mean has {tuple(mean_t.shape)} "
            f"and std has {tuple(std_t.shape)} values"
        )
    x = videos.to(torch.float32).div_(255.0)  # (..., C, T, H, W) in [0, 1]
    return x.sub_(mean_t[:, None, None, None]).div_(std_t[:, None, None, None])  # (..., C, T, H, W)


def check_positive_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``owner.name``, the value and the valid range unless ``value >= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


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


class ImageDataModule(LightningDataModule, ABC):
    """Base for image datamodules: ``uint8`` batches from the loaders, normalised on the device.

    Subclasses implement :meth:`build_datasets`. The loaders yield ``{"image": (B, C, H, W) uint8,
    "label": (B,) int64}``; :meth:`on_after_batch_transfer` replaces ``image`` with the float32
    normalised version (:func:`normalize_image`) once the batch is on the device.

    Args:
        batch_size: samples per device and step (the training loader drops the last partial batch).
        image_size: side of the square images the loaders yield.
        in_chans: image channels C (1 grey, 3 RGB).
        mean: C per-channel means of the [0, 1]-scaled pixels.
        std: C per-channel standard deviations of the [0, 1]-scaled pixels (all > 0).
        num_classes: number of label classes.
        num_workers: loader worker processes (0 loads in the main process); workers persist across epochs.
        seed: seeds the training loader's shuffle (and, through it, the workers' augmentation RNG).

    Attributes:
        batch_size, image_size, in_chans, mean, std, num_classes, num_workers, seed: the arguments
            (``mean`` and ``std`` as tuples of floats).
        train_dataset, val_dataset: built by :meth:`setup`; ``val_dataset`` is None without a validation split.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        image_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_positive_int(owner, "batch_size", batch_size)
        check_positive_int(owner, "image_size", image_size)
        check_positive_int(owner, "in_chans", in_chans)
        check_positive_int(owner, "num_classes", num_classes)
        check_positive_int(owner, "num_workers", num_workers, minimum=0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{owner}.seed must be an int, got {seed!r}")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(
                f"{owner}.mean and .std must have in_chans={in_chans} values each, got mean={mean}, std={std}"
            )
        if not all(s > 0 for s in std):
            raise ValueError(f"{owner}.std must be > 0 in every channel, got {std}")
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

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Normalise ``batch["image"]`` on the device: (B, C, H, W) uint8 -> (B, C, H, W) float32."""
        batch["image"] = normalize_image(batch["image"], self.mean, self.std)
        return batch
