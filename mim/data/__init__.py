"""LightningDataModules that yield uint8 image batches and normalise them on the device (see base.py).

Table support needs the ``tables`` extra (pandas, pyarrow); it is imported on first use, so ``import mim.data``
works without it.
"""

import importlib
from typing import Any

_MODULES = {
    "mim.data.base": ("ImageDataModule", "TensorImageDataset", "normalize_image", "normalize_video"),
    "mim.data.fashion_mnist": (
        "FASHION_MNIST_CLASSES",
        "FASHION_MNIST_MEAN",
        "FASHION_MNIST_STD",
        "FashionMNISTDataModule",
        "find_fashion_mnist",
        "load_fashion_mnist",
    ),
    "mim.data.folder": ("CorruptImageWarning", "ImageFolderDataModule", "ImageFolderDataset"),
    "mim.data.shards": ("ShardDataModule", "ShardDataset"),
    "mim.data.transforms": ("ClipCenterCrop", "ClipRandomResizedCrop", "eval_transform", "mae_train_transform"),
    "mim.data.video": ("ClipDecoder", "CorruptVideoWarning", "collate_clips"),
    "mim.data.video_folder": ("VideoClipDataset", "VideoDataModule"),
    "mim.data.video_shards": ("VideoShardDataModule", "VideoShardDataset"),
    "mim.data.table_preprocess": ("TableBatch", "TablePreprocessor", "infer_column_kinds"),
    "mim.data.tables": ("TableDataModule", "TableDataset", "read_table", "sklearn_table"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mim.data' has no attribute {name!r}")


__all__ = sorted(_LAZY)
