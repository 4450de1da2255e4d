"""The image datamodule base: ``uint8`` batches through the loader, normalised on the device.

Every image datamodule yields :class:`mim.types.Batch` dicts ``{"image": (B, C, H, W) uint8,
"label": (B,) int64}`` from its loaders (4x fewer bytes through worker pipes and host-to-device copies
than float32) and turns the images into float32 normalised with the dataset's per-channel mean and std in
:meth:`ImageDataModule.on_after_batch_transfer`, i.e. on the device, after the copy. The model therefore
always receives float images ``(x / 255 - mean) / std``.

A subclass validates its own arguments, calls ``super().__init__`` with the shared ones and implements
:meth:`ImageDataModule.build_datasets`; the base owns the loaders and the normalisation.

Training order and augmentation are a pure function of (seed, epoch, rank, world size): the training loader's
:class:`EpochShuffleSampler` yields ``(index, sample_seed)`` keys, and the datasets run each sample's random draws
(crops, flips, clip starts) under torch's and python's global generators seeded with ``sample_seed`` and restored
afterwards (:func:`seeded_draws`). Nothing depends on the loader's worker count or the process, so with
:class:`MapResumeMixin` a run resumed from a mid-epoch checkpoint sees exactly the batches of the uninterrupted run.
"""

from __future__ import annotations

import random
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mim.checks import check_int, check_pair_range, check_range, invalid
from mim.types import Batch, step_seed

__all__ = [
    "EpochShuffleSampler",
    "FileDataset",
    "ImageDataModule",
    "MapResumeMixin",
    "SampleKey",
    "SkippedFilesMixin",
    "TensorImageDataset",
    "HeldOutLoadersMixin",
    "check_crops",
    "class_index",
    "check_loader_settings",
    "default_stats",
    "normalize_image",
    "normalize_video",
    "sample_key",
    "silence_unresumable_loader_warning",
    "training_position",
    "seeded_draws",
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


SampleKey = int | tuple[int, int]
"""What a map-style dataset's ``__getitem__`` takes: an index (in-order loaders, direct access) or the
``(index, sample_seed)`` pair of :class:`EpochShuffleSampler` (training)."""


def sample_key(key: SampleKey) -> tuple[int, int | None]:
    """``(index, sample_seed)`` of a :data:`SampleKey`; ``sample_seed`` is None for a plain index."""
    if isinstance(key, tuple):
        index, seed = key
        return int(index), int(seed)
    return int(key), None


@contextmanager
def seeded_draws(seed: int | None) -> Iterator[None]:
    """Run the block with torch's global CPU generator and python's ``random`` seeded with ``seed``; both are
    restored afterwards. ``seed=None``: the block runs on the generators as they are.

    The transforms (torchvision's random crops and flips, RandAugment, random clip starts) draw from these global
    generators; seeding them per sample makes every draw a function of the sample's seed alone, whatever process
    or loader worker runs it.
    """
    if seed is None:
        yield
        return
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator only: 2 us, where torch.manual_seed takes 80
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


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

    def __getitem__(self, key: SampleKey) -> Batch:
        """Sample ``index`` of ``key`` (an index or an ``(index, sample_seed)`` pair: :func:`sample_key`); the
        transform's random draws are seeded with ``sample_seed`` (:func:`seeded_draws`)."""
        index, seed = sample_key(key)
        image = self.images[index]  # (C, H, W)
        if self.transform is not None:
            with seeded_draws(seed):
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

    def __getitem__(self, key: SampleKey) -> Batch:
        """The sample of file ``index`` of ``key`` (an index or an ``(index, sample_seed)`` pair:
        :func:`sample_key`), or of the next readable file; decoding and transform draw their randomness (clip
        starts, crops) from generators seeded with ``sample_seed`` (:func:`seeded_draws`), afresh for every file
        tried, so a replacement sample does not depend on whether the unreadable file was tried first."""
        index, seed = sample_key(key)
        n = len(self)
        for offset in range(n):
            i = (index + offset) % n
            if self.bad[i]:
                continue
            with seeded_draws(seed):
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
        parent = getattr(super(), "teardown", None)
        if parent is not None:
            parent(stage)
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


def train_loader(
    owner: str,
    dataset: Dataset,
    *,
    seed: int,
    unit: str = "samples",
    rank: int = 0,
    world_size: int = 1,
    resume: tuple[int, int] | None = None,
    **kwargs: Any,
) -> DataLoader:
    """A shuffled training loader of whole batches from :class:`EpochShuffleSampler` (this rank's share).

    Args:
        owner: names the datamodule in errors.
        dataset: a map-style dataset whose ``__getitem__`` takes ``(index, sample_seed)`` pairs
            (:data:`SampleKey`); one with ``__getitems__`` gets a batch's list of them.
        seed: seeds the order and every sample's random draws.
        unit: what the dataset's items are, for the error message.
        rank, world_size: this process's global rank and the number of processes.
        resume: ``(epoch, batches_done)`` of a checkpoint (:meth:`EpochShuffleSampler.resume_from`); None: none.
        **kwargs: DataLoader arguments (``batch_size`` is required).

    Raises:
        ValueError: a rank's share of the dataset is smaller than ``batch_size`` (``drop_last`` would leave no batch).
    """
    num_items = len(dataset)  # type: ignore[arg-type]  # map-style datasets have a length
    batch_size = kwargs["batch_size"]
    per_rank = -(-num_items // world_size)  # ceil: the sampler pads the last ranks' shares
    if per_rank < batch_size:
        shares = f" over {world_size} ranks ({per_rank} per rank)" if world_size > 1 else ""
        raise ValueError(
            f"{owner}: {num_items} training {unit}{shares} is fewer than batch_size={batch_size}; lower batch_size"
        )
    sampler = EpochShuffleSampler(num_items, seed=seed, batch_size=batch_size, num_replicas=world_size, rank=rank)
    if resume is not None:
        sampler.resume_from(*resume)
    return DataLoader(dataset, sampler=sampler, drop_last=True, **kwargs)


def eval_loader(dataset: Dataset | None, **kwargs: Any) -> DataLoader | list:
    """An in-order validation loader, or ``[]`` (Lightning then skips validation) without a dataset."""
    if dataset is None:
        return []
    return DataLoader(dataset, shuffle=False, drop_last=False, **kwargs)


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of one seeded permutation per epoch, as ``(index, sample_seed)`` keys.

    The order and every sample's seed are a pure function of (seed, epoch, rank, world size): epoch ``e`` shuffles
    ``range(num_items)`` with a generator seeded by ``step_seed(seed, e)``, pads the permutation to a multiple of
    ``num_replicas`` by repeating its start (as ``DistributedSampler`` does, so every rank has the same length) and
    gives rank ``r`` the positions ``r, r + num_replicas, ...``. The item at position ``p`` of the padded global
    order comes with ``sample_seed = step_seed(seed, e, p)``, which seeds the dataset's random draws for it
    (:func:`seeded_draws`): augmentation does not depend on the worker count, the process or the world size.

    A ``DistributedSampler`` with explicit ``num_replicas`` / ``rank``, so Lightning uses it as it is under DDP
    (it only wraps samplers that are not ``DistributedSampler`` instances) and calls :meth:`set_epoch` before every
    epoch. :meth:`resume_from` makes one epoch start after the batches a checkpointed run already consumed, while
    ``len`` stays the whole share (Lightning then ends the resumed epoch at its usual last batch).

    Args:
        num_items: dataset length N.
        seed: base seed.
        batch_size: items per batch (the unit of :meth:`resume_from`).
        num_replicas: number of ranks (world size).
        rank: this rank, in ``[0, num_replicas)``.

    Attributes:
        num_samples: items of one rank per epoch, ``ceil(N / num_replicas)`` (``DistributedSampler``'s name).
        total_size: ``num_samples * num_replicas``, the padded global order's length.
        epoch: the epoch the next iteration yields.
    """

    def __init__(
        self, num_items: int, *, seed: int = 0, batch_size: int = 1, num_replicas: int = 1, rank: int = 0
    ) -> None:
        owner = "EpochShuffleSampler"
        check_int(owner, "num_items", num_items)
        check_int(owner, "seed", seed, minimum=None)
        check_int(owner, "batch_size", batch_size)
        check_int(owner, "num_replicas", num_replicas)
        check_int(owner, "rank", rank, minimum=0, maximum=num_replicas - 1)
        items: Any = range(num_items)  # DistributedSampler only takes its dataset's length
        super().__init__(items, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.num_items, self.batch_size = num_items, batch_size
        self._skip: tuple[int, int] = (-1, 0)  # (epoch, items of this rank to leave out in it)

    def __len__(self) -> int:
        return self.num_samples

    def global_order(self, epoch: int) -> list[int]:
        """The padded global order of ``epoch``: ``total_size`` dataset indices (a permutation, then its start)."""
        generator = torch.Generator().manual_seed(step_seed(self.seed, epoch))
        order = torch.randperm(self.num_items, generator=generator).tolist()  # (N,)
        while len(order) < self.total_size:
            order += order[: self.total_size - len(order)]
        return order  # (total_size,)

    @property
    def batches_per_epoch(self) -> int:
        """Whole batches of this rank per epoch (the training loader drops the last partial one)."""
        return self.num_samples // self.batch_size

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """Make the next pass over ``epoch`` leave out this rank's first ``batches_done`` batches.

        That pass then yields the remaining items exactly as an uninterrupted one would; other epochs are whole.
        Also sets :attr:`epoch` to the one a resumed run continues with (Lightning may start the loader's workers,
        which read the sampler at once, before it calls :meth:`set_epoch`). ``batches_done`` at or beyond the
        epoch's whole batches (an epoch-end checkpoint) skips nothing: the run continues with epoch ``epoch + 1``.
        """
        check_int("EpochShuffleSampler.resume_from", "epoch", epoch, minimum=0)
        check_int("EpochShuffleSampler.resume_from", "batches_done", batches_done, minimum=0)
        if batches_done < self.batches_per_epoch:
            self._skip = (epoch, batches_done * self.batch_size)
            self.set_epoch(epoch)
        else:
            self._skip = (-1, 0)
            self.set_epoch(epoch + 1)

    def keys(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's whole share of ``epoch``: ``num_samples`` ``(index, sample_seed)`` pairs, nothing skipped."""
        order = self.global_order(epoch)  # (total_size,)
        positions = range(self.rank, self.total_size, self.num_replicas)  # (num_samples,)
        return [(order[p], step_seed(self.seed, epoch, p)) for p in positions]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]  # keys, not plain indices
        skip_epoch, skip = self._skip
        keys = self.keys(self.epoch)
        return iter(keys[skip:] if skip_epoch == self.epoch else keys)


def training_position(trainer: Any) -> dict[str, int]:
    """``{"epoch", "batches_done"}`` of a trainer's fit loop (``{}`` without a trainer): what a resumable datamodule
    saves. ``batches_done`` is Lightning's ``batch_progress.current.ready``, the training batches fetched so far in the
    epoch (see :meth:`MapResumeMixin.state_dict`)."""
    if trainer is None:
        return {}
    fit_loop = trainer.fit_loop
    return {
        "epoch": int(fit_loop.epoch_progress.current.completed),
        "batches_done": int(fit_loop.epoch_loop.batch_progress.current.ready),
    }


def silence_unresumable_loader_warning() -> None:
    """Hide Lightning's "your dataloader is not resumable" warning on a mid-epoch resume: it looks for ``state_dict``
    on the DataLoader only, while mim's datamodules resume their loaders themselves (exactly; tests/test_resume_exact.py).
    Called when a datamodule loads its resume position, so runs without one keep the warning."""
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


class MapResumeMixin:
    """Exact mid-epoch resume for a datamodule whose training loader comes from :func:`train_loader`.

    Lightning saves :meth:`state_dict` in checkpoints and calls :meth:`load_state_dict` on restore, before it asks
    for the training loader; :meth:`_train_loader` then builds the loader of this rank whose sampler leaves out the
    batches the checkpointed run already consumed (:meth:`EpochShuffleSampler.resume_from`).
    """

    trainer: Any
    _map_resume: tuple[int, int] | None = None  # (epoch, batches_done) from load_state_dict

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_done"}``: the training position of this rank (Lightning saves it in checkpoints).

        ``batches_done`` counts the training batches already fetched in the current epoch (Lightning's
        ``batch_progress.current.ready``): inside ``on_train_batch_end`` (``ModelCheckpoint(every_n_train_steps=...)``)
        that includes the batch just trained on, which Lightning counts as completed on restore; on validation end
        inside an epoch it is the batches trained so far; at the end of an epoch it is the epoch's length, so a
        resumed run starts the next epoch whole. Empty without a trainer.
        """
        return training_position(getattr(self, "_trainer", None) or getattr(self, "trainer", None))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume mid-epoch: the next training loader leaves out the batches of ``state_dict``'s epoch already
        consumed. A state without ``epoch`` / ``batches_done`` (an older checkpoint) resumes nothing."""
        if "epoch" in state_dict and "batches_done" in state_dict:
            self._map_resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
            silence_unresumable_loader_warning()

    def _rank_and_world(self) -> tuple[int, int]:
        """(global rank, world size) from the trainer; (0, 1) without one."""
        trainer = getattr(self, "_trainer", None) or getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _train_loader(self, owner: str, dataset: Dataset, *, seed: int, **kwargs: Any) -> DataLoader:
        """:func:`train_loader` for this rank, resumed at the position of the last :meth:`load_state_dict`."""
        rank, world = self._rank_and_world()
        return train_loader(owner, dataset, seed=seed, rank=rank, world_size=world, resume=self._map_resume, **kwargs)

    def teardown(self, stage: str) -> None:
        """Forget the resume position at the end of a run: a later ``fit`` without a checkpoint starts whole."""
        self._map_resume = None
        parent = getattr(super(), "teardown", None)
        if parent is not None:
            parent(stage)


class HeldOutLoadersMixin:
    """``test_dataloader`` and ``predict_dataloader`` read the held-out split: ``mim test`` / ``mim predict`` work."""

    def test_dataloader(self) -> DataLoader | list:
        """The validation loader."""
        return self.val_dataloader()  # type: ignore[attr-defined]

    def predict_dataloader(self) -> DataLoader | list:
        """The validation loader."""
        return self.val_dataloader()  # type: ignore[attr-defined]


class ImageDataModule(HeldOutLoadersMixin, MapResumeMixin, LightningDataModule, ABC):
    """Base for image datamodules: ``uint8`` batches from the loaders, normalised on the device.

    Subclasses implement :meth:`build_datasets`. The loaders yield ``{"image": (B, C, H, W) uint8,
    "label": (B,) int64}``; :meth:`on_after_batch_transfer` replaces ``image`` with the float32
    normalised version (:func:`normalize_image`) once the batch is on the device. The training loader gives each
    rank its share of a seeded order, and a resumed run continues mid-epoch exactly (:class:`MapResumeMixin`).

    Args:
        batch_size: samples per device and step (the training loader drops the last partial batch).
        image_size: side of the square images the loaders yield.
        in_chans: image channels C (1 grey, 3 RGB).
        mean: C per-channel means of the [0, 1]-scaled pixels; None: ImageNet's (their average for one channel).
        std: C per-channel standard deviations of the [0, 1]-scaled pixels (all > 0); None: ImageNet's.
        num_classes: number of label classes.
        num_workers: loader worker processes (0 loads in the main process); workers persist across epochs.
        seed: seeds the training order and every training sample's augmentation (:class:`EpochShuffleSampler`).

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
        return self._train_loader(type(self).__name__, self.train_dataset, seed=self.seed, **self._loader_kwargs())

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
