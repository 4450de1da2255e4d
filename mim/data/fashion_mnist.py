"""Fashion-MNIST (60k train + 10k test grey 28x28 images, 10 classes) from the Debian package's IDX files.

The data ships in the Debian package ``dataset-fashion-mnist`` (no download at run time). The four files
``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` are looked up, when no ``root`` is given, in

1. ``$MIM_DATA_DIR`` (or ``$MIM_DATA_DIR/fashion-mnist``),
2. the project folder ``.data/fashion-mnist`` (current directory first, then the source checkout), where
   ``make data`` unpacks the package with ``apt-get download`` + ``dpkg -x``,
3. ``/usr/share/datasets/fashion-mnist``, where ``apt-get install dataset-fashion-mnist`` puts them.

Files may be gzipped (as the package ships them) or not.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mim.checks import check_choice, check_int, invalid
from mim.data.base import ImageDataModule, TensorImageDataset, check_crops
from mim.data.transforms import eval_transform, mae_train_transform

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FashionMNISTDataModule",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Mean and (population) standard deviation of the 60k training images scaled to [0, 1], over all pixels;
# tests/test_data.py recomputes them.
FASHION_MNIST_MEAN = (0.2860406,)
FASHION_MNIST_STD = (0.3530242,)
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_NUM = {"train": 60_000, "test": 10_000}
_HOW_TO_GET = (
    "Get it with `make data` in the mim checkout (unpacks the Debian package dataset-fashion-mnist into "
    ".data/fashion-mnist with apt-get download + dpkg -x), or as root `apt-get install dataset-fashion-mnist` "
    f"(installs {SYSTEM_DIR}), or set MIM_DATA_DIR (or root=) to a folder holding the four IDX files "
    f"{[f for pair in _FILES.values() for f in pair]} (.gz or not)."
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped when the name ends in ``.gz``).

    Args:
        path: an IDX file: 2 zero bytes, the type code 0x08 (ubyte), the number of dimensions, the sizes as
            big-endian int32, then the data in C order.

    Returns:
        uint8 array with the shape the header gives, e.g. (N, 28, 28) for images, (N,) for labels.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {len(data) - offset} values")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _file(folder: Path, name: str) -> Path | None:
    """``folder/name.gz`` or ``folder/name``, whichever exists (gzipped first)."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _has_files(folder: Path) -> bool:
    return all(_file(folder, name) is not None for pair in _FILES.values() for name in pair)


def _split_file(folder: Path, name: str) -> Path:
    path = _file(folder, name)
    if path is None:
        raise FileNotFoundError(f"Fashion-MNIST: {folder} has no {name}(.gz). {_HOW_TO_GET}")
    return path


def _candidates(root: str | Path | None) -> list[Path]:
    if root is not None:
        bases = [Path(root)]
    else:
        bases = []
        if os.environ.get("MIM_DATA_DIR"):
            bases.append(Path(os.environ["MIM_DATA_DIR"]))
        bases += [Path.cwd() / ".data", Path(__file__).resolve().parents[2] / ".data"]
    folders = [folder for base in bases for folder in (base, base / "fashion-mnist")]
    if root is None:
        folders.append(SYSTEM_DIR)
    return list(dict.fromkeys(folders))  # deduplicated, in order


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files.

    Args:
        root: look only here (or in ``root/fashion-mnist``); None: search ``$MIM_DATA_DIR``, ``.data/``, then
            the system path (see the module docstring).

    Raises:
        FileNotFoundError: with the searched folders and how to get the data.
    """
    candidates = _candidates(root)
    for folder in candidates:
        if _has_files(folder):
            return folder
    where = "root" if root is not None else "the default places"
    raise FileNotFoundError(
        f"Fashion-MNIST not found (FashionMNISTDataModule.root={None if root is None else str(root)!r}: {where}); "
        f"looked in {[str(c) for c in candidates]}. {_HOW_TO_GET}"
    )


def load_fashion_mnist(split: Literal["train", "test"], root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Load one split of Fashion-MNIST as tensors (e.g. for a linear probe).

    Args:
        split: "train" (60,000 images) or "test" (10,000 images).
        root: folder with the IDX files; None searches the default places (:func:`find_fashion_mnist`).

    Returns:
        ``(images, labels)``: (N, 1, 28, 28) uint8 and (N,) int64 in 0..9 (:data:`FASHION_MNIST_CLASSES`).
    """
    check_choice("load_fashion_mnist", "split", split, tuple(_FILES))
    folder = find_fashion_mnist(root)
    images_name, labels_name = _FILES[split]
    images = read_idx(_split_file(folder, images_name))  # (N, 28, 28)
    labels = read_idx(_split_file(folder, labels_name))  # (N,)
    if images.shape != (_NUM[split], 28, 28) or labels.shape != (_NUM[split],):
        raise ValueError(
            f"Fashion-MNIST {split} files in {folder} have shapes {images.shape} and {labels.shape}; "
            f"expected ({_NUM[split]}, 28, 28) and ({_NUM[split]},)"
        )
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    labels_t = torch.from_numpy(labels.astype(np.int64))  # (N,)
    return images_t, labels_t


def _subset(n: int, k: int | None, seed: int) -> Tensor | None:
    """Indices of a seeded random subset of size ``k`` of ``range(n)``, sorted; None for all."""
    if k is None or k == n:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    return order[:k].sort().values  # (k,)


def _class_subset(labels: Tensor, classes: tuple[int, ...], k: int | None, seed: int, field: str) -> Tensor:
    """Indices of the samples whose label is in ``classes``, or a seeded random subset of ``k`` of them, sorted.

    Args:
        labels: (n,) int64 labels of the whole split.
        classes: the kept labels.
        k: the subset size; None: every sample of the kept classes.
        seed: seeds the draw.
        field: the datamodule argument ``k`` came from (for the error message).

    Returns:
        (k,) or (n_kept,) sorted int64 indices into the split.
    """
    pool = torch.isin(labels, torch.tensor(classes)).nonzero().flatten()  # (n_kept,) ascending
    if k is None:
        return pool
    if k > len(pool):
        raise ValueError(
            f"FashionMNISTDataModule.{field} must be <= {len(pool)} (the images of classes {list(classes)} in the "
            f"split), got {k}"
        )
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))  # (n_kept,)
    return pool[order[:k]].sort().values  # (k,)


def _check_classes(classes: list[int] | None) -> tuple[int, ...] | None:
    if classes is None:
        return None
    valid = (
        isinstance(classes, list | tuple)
        and len(classes) > 0
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(FASHION_MNIST_CLASSES) for c in classes)
        and len(set(classes)) == len(classes)
    )
    if not valid:
        raise invalid(
            "FashionMNISTDataModule",
            "classes",
            f"a non-empty list of distinct labels in 0..{len(FASHION_MNIST_CLASSES) - 1}",
            classes,
        )
    return tuple(classes)


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST from the Debian package, as uint8 batches normalised on the device.

    Training uses the 60k training split (augmented with the MAE augmentation when ``augment``); validation
    is the 10k test split, un-augmented (resized to ``image_size`` when that is not 28). One channel; mean
    and std are :data:`FASHION_MNIST_MEAN` / :data:`FASHION_MNIST_STD`.

    Args:
        root: folder with the IDX files; None searches ``$MIM_DATA_DIR``, ``.data/``, then the system path.
        image_size: side of the images the loaders yield (28 is the native size).
        batch_size: samples per device and step.
        num_train: use a seeded random subset of this many training images; None: all 60,000.
        num_val: use a seeded random subset of this many test images for validation; None: all 10,000.
        augment: MAE augmentation on the training split (random resized crop with ``crop_scale``, bicubic,
            and horizontal flip); False resizes only.
        crop_scale: area range of the random resized crop (MAE: (0.2, 1.0)).
        rand_augment: RandAugment magnitude on the training split (fine-tuning: 9, as MAE); None: off.
        classes: keep only the images of these classes (labels 0..9 of :data:`FASHION_MNIST_CLASSES`, distinct), in
            both splits; ``num_train`` / ``num_val`` then draw their seeded subsets from those images. The labels are
            renumbered ``0 .. len(classes) - 1`` in the order given and ``num_classes`` is ``len(classes)`` (a
            k-way task: a domain-shift split, e.g. pretrain on ``[0, 1, 2, 3, 4]``, adapt to ``[5, 6, 7, 8, 9]``).
            None: all ten classes, labels unchanged.
        num_workers: loader worker processes.
        seed: seeds the subsets, the training order and every training sample's augmentation.
    """

    def __init__(
        self,
        *,
        root: str | Path | None = None,
        image_size: int = 28,
        batch_size: int = 128,
        num_train: int | None = None,
        num_val: int | None = None,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        rand_augment: int | None = None,
        classes: list[int] | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        kept = _check_classes(classes)
        super().__init__(
            batch_size=batch_size,
            image_size=image_size,
            in_chans=1,
            mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD,
            num_classes=len(kept) if kept is not None else len(FASHION_MNIST_CLASSES),
            num_workers=num_workers,
            seed=seed,
        )
        for name, value, total in (("num_train", num_train, _NUM["train"]), ("num_val", num_val, _NUM["test"])):
            if value is not None:
                check_int("FashionMNISTDataModule", name, value, minimum=1, maximum=total)
        crop_scale = check_crops("FashionMNISTDataModule", crop_scale)
        self.data_dir = find_fashion_mnist(root)  # fails at construction, with instructions, when missing
        self.num_train = num_train
        self.num_val = num_val
        self.augment = augment
        self.crop_scale = crop_scale
        if rand_augment is not None:
            check_int("FashionMNISTDataModule", "rand_augment", rand_augment, minimum=0, maximum=30)
        self.rand_augment = rand_augment
        self.classes = kept

    def _indices(self, split: Literal["train", "test"], k: int | None, seed: int, field: str) -> Tensor | None:
        if self.classes is None:
            return _subset(_NUM[split], k, seed)
        labels = torch.from_numpy(read_idx(_split_file(self.data_dir, _FILES[split][1])).astype(np.int64))  # (n,)
        return _class_subset(labels, self.classes, k, seed, field)

    def train_indices(self) -> Tensor | None:
        """(num_train,) sorted indices of the training subset (of the kept ``classes``), or None for all 60,000."""
        return self._indices("train", self.num_train, self.seed, "num_train")

    def val_indices(self) -> Tensor | None:
        """(num_val,) sorted indices of the validation subset of the test split (of the kept ``classes``), or None for
        all 10,000."""
        return self._indices("test", self.num_val, self.seed + 1, "num_val")

    def build_datasets(self) -> tuple[TensorImageDataset, TensorImageDataset]:
        evaluate = eval_transform(self.image_size)  # the identity at 28
        train_tf = (
            mae_train_transform(self.image_size, scale=self.crop_scale, rand_augment=self.rand_augment)
            if self.augment
            else evaluate
        )
        datasets = []
        splits: tuple[tuple[Literal["train", "test"], Tensor | None, Callable[[Tensor], Tensor]], ...] = (
            ("train", self.train_indices(), train_tf),
            ("test", self.val_indices(), evaluate),
        )
        for split, indices, transform in splits:
            images, labels = load_fashion_mnist(split, self.data_dir)  # (N, 1, 28, 28), (N,)
            if indices is not None:
                images, labels = images[indices].clone(), labels[indices].clone()  # (n, 1, 28, 28), (n,)
            if self.classes is not None:  # renumber 0 .. k-1 in the order of ``classes``
                lookup = torch.full((len(FASHION_MNIST_CLASSES),), -1, dtype=torch.int64)
                lookup[list(self.classes)] = torch.arange(len(self.classes))
                labels = lookup[labels]  # (n,)
            datasets.append(TensorImageDataset(images, labels, transform))
        return datasets[0], datasets[1]
