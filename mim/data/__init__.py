"""LightningDataModules that yield uint8 image batches and normalise them on the device (see base.py).

Table support needs the ``tables`` extra (pandas, pyarrow); it is imported on first use, so ``import mim.data``
works without it.
"""

import importlib
from typing import Any

from mim.data.base import ImageDataModule, TensorImageDataset, normalize_image, normalize_video
from mim.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNISTDataModule,
    find_fashion_mnist,
    load_fashion_mnist,
)
from mim.data.folder import CorruptImageWarning, ImageFolderDataModule, ImageFolderDataset
from mim.data.shards import ShardDataModule, ShardDataset
from mim.data.transforms import eval_transform, mae_train_transform
from mim.data.video import CorruptVideoWarning, VideoClipDataset, VideoDataModule, collate_clips

_LAZY = {
    name: "mim.data.tables"
    for name in (
        "TableBatch",
        "TableDataModule",
        "TableDataset",
        "TablePreprocessor",
        "infer_column_kinds",
        "read_table",
        "sklearn_table",
    )
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mim.data' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "CorruptImageWarning",
    "CorruptVideoWarning",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "ShardDataModule",
    "ShardDataset",
    "TensorImageDataset",
    "VideoClipDataset",
    "VideoDataModule",
    "collate_clips",
    "eval_transform",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "mae_train_transform",
    "normalize_image",
    "normalize_video",
]
