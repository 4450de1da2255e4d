"""Image folders: one subfolder per class, any image format PIL reads.

Layout::

    ROOT/<class>/<image>.jpg          (any depth below the class folder; any PIL format)

Classes are the sorted names of ROOT's non-hidden subfolders, so the class map is the same on every
machine. Files whose extension PIL does not register are ignored; files that have an image extension but
cannot be decoded (corrupt, truncated) are skipped when loaded, with a :class:`CorruptImageWarning`, and
counted (:attr:`ImageFolderDataModule.num_skipped`), so one bad file never stops a run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from mim.checks import check_choice, check_int, check_range
from mim.data.base import FileDataset, ImageDataModule, SkippedFilesMixin, check_crops, class_index
from mim.data.decode import SmallImageCheck, open_image
from mim.data.transforms import eval_transform, mae_train_transform
from mim.types import Batch

__all__ = [
    "CorruptImageWarning",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "image_extensions",
    "scan_image_folder",
]

_LAYOUT = "expected ROOT/<class>/<image> (one subfolder per class, e.g. ROOT/cat/001.jpg)"
# What PIL raises for a file it cannot identify or decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of every format this PIL can open."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _is_image(path: str, extensions: frozenset[str]) -> bool:
    return os.path.splitext(path)[1].lower() in extensions


def _image_files(folder: Path, extensions: frozenset[str]) -> list[str]:
    """Sorted paths of the image files anywhere below ``folder`` (hidden files and folders skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and _is_image(f, extensions)]
    return sorted(found)


def _check_folder(field: str, root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(f"ImageFolderDataModule.{field}: {str(root)!r} does not exist; {_LAYOUT}")
    if not root.is_dir():
        raise ValueError(f"ImageFolderDataModule.{field}: {str(root)!r} is a file, not a directory; {_LAYOUT}")


def scan_image_folder(
    root: str | Path, *, classes: Sequence[str] | None = None, field: str = "root"
) -> tuple[list[str], list[tuple[str, int]]]:
    """List the classes and the (path, label) samples of an image folder.

    Args:
        root: the folder holding one subfolder per class.
        classes: the class names that define the labels (e.g. the training folder's); default: the
            sorted subfolder names of ``root``. Every subfolder of ``root`` must be one of them.
        field: the argument name used in error messages.

    Returns:
        ``(classes, samples)``: the class names (label ``i`` is ``classes[i]``) and the samples, sorted by path.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is not a directory, has no class subfolders, a class folder holds no images,
            a subfolder is not among ``classes``, or no file can be opened as an image.
    """
    root = Path(root)
    _check_folder(field, root)
    extensions = image_extensions()
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not subdirs:
        loose = [e.name for e in os.scandir(root) if e.is_file() and _is_image(e.name, extensions)]
        hint = (
            f"found {len(loose)} images directly in it but no class subfolders (move them into one, e.g. ROOT/all/)"
            if loose
            else "it has no subfolders"
        )
        raise ValueError(f"ImageFolderDataModule.{field}: {str(root)!r}: {hint}; {_LAYOUT}")
    classes, index = class_index("ImageFolderDataModule", field, root, subdirs, classes, reference="training folder")
    samples: list[tuple[str, int]] = []
    empty = []
    for name in subdirs:
        files = _image_files(root / name, extensions)
        if not files:
            empty.append(name)
        samples += [(path, index[name]) for path in files]
    if not samples:
        raise ValueError(
            f"ImageFolderDataModule.{field}: no image files under {str(root)!r} (looked for extensions such as "
            f".jpg, .jpeg, .png, .webp, .bmp in {len(subdirs)} subfolders); {_LAYOUT}"
        )
    if empty:
        raise ValueError(
            f"ImageFolderDataModule.{field}: class folders without image files: "
            f"{[str(root / n) for n in empty]}; add images or remove the folders; {_LAYOUT}"
        )
    if not any(_opens(path) for path, _ in samples):  # stops at the first readable file
        raise ValueError(
            f"ImageFolderDataModule.{field}: none of the {len(samples)} image files under {str(root)!r} "
            "can be opened as an image (all corrupt?)"
        )
    return list(classes), samples


def _opens(path: str) -> bool:
    try:
        with Image.open(path):  # reads the header only
            return True
    except _DECODE_ERRORS:
        return False


class ImageFolderDataset(FileDataset):
    """(path, label) samples decoded with PIL, converted to ``mode`` and transformed to uint8 tensors.

    An unreadable file is skipped, counted and replaced by the next readable one, with a
    :class:`CorruptImageWarning` naming it (:class:`~mim.data.base.FileDataset`).

    Args:
        samples: (path, label) pairs.
        mode: PIL mode the images are converted to ("RGB" for 3 channels, "L" for 1); 16-bit images are scaled to
            8 bits (:func:`mim.data.decode.convert_image`), not clipped.
        transform: maps a PIL image to a (C, H, W) uint8 tensor.
        image_size: the output side; the first image smaller than it is reported once (a ``SmallImageWarning``).
    """

    kind = "image"
    warning = CorruptImageWarning
    decode_errors = _DECODE_ERRORS

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        *,
        mode: Literal["RGB", "L"],
        transform: Callable[[Image.Image], Tensor],
        image_size: int | None = None,
    ) -> None:
        if not samples:
            raise ValueError("ImageFolderDataset.samples must not be empty")
        super().__init__(len(samples))
        self.samples = list(samples)
        self.mode = mode
        self.transform = transform
        self.small_images = None if image_size is None else SmallImageCheck("ImageFolderDataModule", image_size)

    def file_path(self, index: int) -> str:
        return self.samples[index][0]

    def decode_file(self, index: int) -> Image.Image:
        """The image at ``index`` in ``mode`` (decodes the whole file)."""
        path = self.samples[index][0]
        image = open_image(path, self.mode)
        if self.small_images is not None and not bool(self.small_images.warned[0]):
            self.small_images(path, image.height, image.width)
        return image

    def to_sample(self, index: int, decoded: Image.Image) -> Batch:
        label = torch.tensor(self.samples[index][1], dtype=torch.int64)  # ()
        return {"image": self.transform(decoded), "label": label}  # image: (C, H, W) uint8


class ImageFolderDataModule(SkippedFilesMixin, ImageDataModule):
    """Class-per-subfolder images (``ROOT/<class>/<image>``), as uint8 batches normalised on the device.

    The folder is scanned at construction, so a wrong path fails before training with a message naming it,
    and :attr:`num_classes` is known at once.

    Args:
        root: training folder, one subfolder per class.
        image_size: side of the square images the loaders yield.
        batch_size: samples per device and step.
        val_root: validation folder with the same class names (a subset is fine); None: see ``val_fraction``.
        val_fraction: without ``val_root``, hold out this fraction of ``root`` (a seeded random split) for
            validation; 0 means no validation.
        in_chans: 3 decodes to RGB, 1 to grey ("L").
        mean: per-channel means of the [0, 1] pixels; default ImageNet's (their average for one channel).
        std: per-channel standard deviations; default ImageNet's (their average for one channel).
        augment: training transform = MAE augmentation (random resized crop with ``crop_scale``, bicubic, and
            horizontal flip); False uses the evaluation transform for training too.
        crop_scale: area range of the training random resized crop (MAE: (0.2, 1.0)).
        rand_augment: RandAugment magnitude on the training split (fine-tuning: 9, as MAE); None: off.
        eval_crop_pct: validation resizes the shorter side to ``image_size / eval_crop_pct`` and centre-crops
            (MAE: 0.875, i.e. 256 -> 224).
        num_workers: loader worker processes.
        seed: seeds the validation split, the training order and every training sample's augmentation.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        image_size: int = 224,
        batch_size: int = 64,
        val_root: str | Path | None = None,
        val_fraction: float = 0.0,
        in_chans: Literal[1, 3] = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        rand_augment: int | None = None,
        eval_crop_pct: float = 0.875,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        check_choice("ImageFolderDataModule", "in_chans", in_chans, (1, 3))
        check_range("ImageFolderDataModule", "val_fraction", val_fraction, 0, 1, high_open=True)
        if val_root is not None and val_fraction > 0:
            raise ValueError(
                f"ImageFolderDataModule: give val_root ({str(val_root)!r}) or val_fraction ({val_fraction}), not both"
            )
        crop_scale = check_crops("ImageFolderDataModule", crop_scale, eval_crop_pct)
        classes, samples = scan_image_folder(root)
        super().__init__(
            batch_size=batch_size,
            image_size=image_size,
            in_chans=in_chans,
            mean=mean,
            std=std,
            num_classes=len(classes),
            num_workers=num_workers,
            seed=seed,
        )
        self.root = str(root)
        self.val_root = None if val_root is None else str(val_root)
        self.val_fraction = val_fraction
        self.augment = augment
        self.crop_scale = crop_scale
        if rand_augment is not None:
            check_int("ImageFolderDataModule", "rand_augment", rand_augment, minimum=0, maximum=30)
        self.rand_augment = rand_augment
        self.eval_crop_pct = eval_crop_pct
        self.classes = classes
        if val_root is not None:
            self.train_samples = samples
            self.val_samples = scan_image_folder(val_root, classes=classes, field="val_root")[1]
        elif val_fraction > 0:
            num_val = round(len(samples) * val_fraction)
            if not 1 <= num_val < len(samples):
                raise ValueError(
                    f"ImageFolderDataModule.val_fraction={val_fraction} of {len(samples)} images gives {num_val} "
                    f"validation images; need between 1 and {len(samples) - 1}"
                )
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
            self.val_samples = [samples[i] for i in sorted(order[:num_val])]
            self.train_samples = [samples[i] for i in sorted(order[num_val:])]
        else:
            self.train_samples, self.val_samples = samples, []

    def build_datasets(self) -> tuple[ImageFolderDataset, ImageFolderDataset | None]:
        mode: Literal["RGB", "L"] = "RGB" if self.in_chans == 3 else "L"
        evaluate = eval_transform(self.image_size, crop_pct=self.eval_crop_pct)
        train_tf = (
            mae_train_transform(self.image_size, scale=self.crop_scale, rand_augment=self.rand_augment)
            if self.augment
            else evaluate
        )
        train = ImageFolderDataset(self.train_samples, mode=mode, transform=train_tf, image_size=self.image_size)
        val = (
            ImageFolderDataset(self.val_samples, mode=mode, transform=evaluate, image_size=self.image_size)
            if self.val_samples
            else None
        )
        return train, val

    def _skipped_where(self) -> str:
        return f" under {self.root!r}"
