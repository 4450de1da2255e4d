"""Image transforms that end in ``uint8`` (C, H, W) tensors (normalisation happens later, on the device).

* :func:`mae_train_transform`: the MAE pretraining augmentation, ``RandomResizedCrop(size, scale=(0.2, 1.0),
  bicubic)`` + ``RandomHorizontalFlip`` (methods/IMAGE.md §1.4), antialiased.
* :func:`eval_transform`: resize the shorter side to ``size / crop_pct`` and centre-crop ``size``
  (MAE's 256 -> 224 at ``crop_pct = 0.875``); the identity for images that already are ``size`` x ``size``
  when ``crop_pct = 1``.

Both accept a PIL image or a (C, H, W) uint8 tensor. Their randomness is torch's global RNG, which a
DataLoader worker seeds from the loader's generator and Lightning's ``seed_everything`` seeds in the main
process.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

__all__ = ["eval_transform", "mae_train_transform"]

ImageLike = Image.Image | Tensor


def _check_size(name: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name}.size must be an int >= 1, got {size!r}")


def mae_train_transform(
    size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5
) -> Callable[[ImageLike], Tensor]:
    """The MAE pretraining augmentation: random resized crop (bicubic, antialiased) + horizontal flip.

    Args:
        size: side of the square output.
        scale: range of the crop's area as a fraction of the image's area (MAE: (0.2, 1.0)).
        hflip: probability of a horizontal flip.

    Returns:
        A callable mapping a PIL image or (C, H, W) uint8 tensor to a (C, size, size) uint8 tensor.
    """
    _check_size("mae_train_transform", size)
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"mae_train_transform.scale must satisfy 0 < low <= high <= 1, got {scale!r}")
    if not 0 <= hflip <= 1:
        raise ValueError(f"mae_train_transform.hflip must be in [0, 1], got {hflip!r}")
    return v2.Compose(
        [
            # Crop and flip before the tensor conversion: on PIL input PIL resamples (fast for large images).
            v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(hflip),
            v2.ToImage(),  # PIL -> (C, size, size) uint8; tensors pass through
            v2.ToPureTensor(),  # a plain Tensor, for collation
        ]
    )


def eval_transform(size: int, *, crop_pct: float = 1.0) -> Callable[[ImageLike], Tensor]:
    """Deterministic evaluation transform: resize the shorter side to ``size / crop_pct``, centre-crop ``size``.

    Args:
        size: side of the square output.
        crop_pct: fraction of the resized shorter side kept by the centre crop (MAE eval: 0.875; 1.0 keeps
            all of it, so an image that is already ``size`` x ``size`` passes through unchanged).

    Returns:
        A callable mapping a PIL image or (C, H, W) uint8 tensor to a (C, size, size) uint8 tensor.
    """
    _check_size("eval_transform", size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"eval_transform.crop_pct must be in (0, 1], got {crop_pct!r}")
    return _EvalTransform(size, math.floor(size / crop_pct) if crop_pct < 1 else size)


class _EvalTransform:
    """Resize the shorter side to ``resize`` and centre-crop ``size``; skips resampling for exact-size input.

    A class rather than a closure so that datasets holding it pickle into spawned loader workers.
    """

    def __init__(self, size: int, resize: int) -> None:
        self.size = size
        self.resize = resize
        self.resize_crop = v2.Compose(
            [
                v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),  # shorter side
                v2.CenterCrop(size),
            ]
        )
        self.to_tensor = v2.Compose([v2.ToImage(), v2.ToPureTensor()])

    def __call__(self, image: ImageLike) -> Tensor:
        height, width = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[-2:]
        if not (height == width == self.size == self.resize):
            image = self.resize_crop(image)  # (C, size, size)
        return self.to_tensor(image)  # (C, size, size) uint8

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize={self.resize})"
