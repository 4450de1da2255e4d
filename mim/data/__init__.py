"""LightningDataModules that yield uint8 image batches and normalise them on the device (see base.py)."""

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

__all__ = [
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
