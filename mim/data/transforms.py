"""Image and clip transforms that end in ``uint8`` tensors (normalisation happens later, on the device).

* :func:`mae_train_transform`: the MAE pretraining augmentation, ``RandomResizedCrop(size, scale=(0.2, 1.0),
  bicubic)`` + ``RandomHorizontalFlip`` (He et al., CVPR 2022, Appendix A.1; facebookresearch/mae
  main_pretrain.py), antialiased.
* :func:`eval_transform`: resize the shorter side to ``size / crop_pct`` and centre-crop ``size``
  (MAE's 256 -> 224 at ``crop_pct = 0.875``); the identity for images that already are ``size`` x ``size``
  when ``crop_pct = 1``.
* :class:`ClipRandomResizedCrop`, :class:`ClipCenterCrop`: random resized and centre crops of a (T, C, H, W)
  uint8 clip, bilinear, with one box (and one flip) for all T frames (VideoMAE, V-JEPA).

The image transforms accept a PIL image or a (C, H, W) uint8 tensor. Their randomness is torch's global generator;
the datasets seed it for every sample from the sample's seed and restore it afterwards
(:func:`mim.data.base.seeded_draws` with the seeds of :class:`mim.data.base.EpochShuffleSampler`), so each
training sample's augmentation is a function of (seed, epoch, position) alone, whatever loader worker or process
runs it, and a resumed run replays it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from mim.checks import check_int, check_pair_range, check_range

__all__ = ["ClipCenterCrop", "ClipRandomResizedCrop", "eval_transform", "mae_train_transform", "seeded_rand_augment"]

ImageLike = Image.Image | Tensor


def mae_train_transform(
    size: int, *, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5, rand_augment: int | None = None
) -> Callable[[ImageLike], Tensor]:
    """The MAE pretraining augmentation: random resized crop (bicubic, antialiased) + horizontal flip.

    With ``rand_augment`` it is MAE's fine-tuning augmentation (facebookresearch/mae util/datasets.py: scale
    (0.08, 1), RandAugment magnitude 9): RandAugment (Cubuk et al., CVPR Workshops 2020) with 2 operations at this
    magnitude follows the flip. This is torchvision's RandAugment, which works on tensors and grey images; timm's
    ``rand-m9-mstd0.5-inc1`` (the official choice) also jitters the magnitude (std 0.5) and uses increasing-severity
    operations.

    Args:
        size: side of the square output.
        scale: range of the crop's area as a fraction of the image's area (MAE: (0.2, 1.0); fine-tuning (0.08, 1)).
        hflip: probability of a horizontal flip.
        rand_augment: RandAugment magnitude in [0, 30] (MAE fine-tuning: 9); None: off.

    Returns:
        A callable mapping a PIL image or (C, H, W) uint8 tensor to a (C, size, size) uint8 tensor.
    """
    check_int("mae_train_transform", "size", size)
    scale = check_pair_range("mae_train_transform", "scale", scale, 0, 1, low_open=True)
    hflip = check_range("mae_train_transform", "hflip", hflip, 0, 1)
    if rand_augment is not None:
        check_int("mae_train_transform", "rand_augment", rand_augment, minimum=0, maximum=30)
    steps: list[Callable] = [
        # Crop and flip before the tensor conversion: on PIL input PIL resamples (fast for large images).
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(hflip),
    ]
    if rand_augment is not None:
        # Bilinear: torchvision's affine ops refuse bicubic on tensors (timm's RandAugment resamples PIL bicubically).
        steps.append(v2.RandAugment(num_ops=2, magnitude=rand_augment, interpolation=InterpolationMode.BILINEAR))
    steps += [
        v2.ToImage(),  # PIL -> (C, size, size) uint8; tensors pass through
        v2.ToPureTensor(),  # a plain Tensor, for collation
    ]
    return v2.Compose(steps)


def seeded_rand_augment(image: Tensor, magnitude: int, rng: random.Random) -> Tensor:
    """``mae_train_transform``'s RandAugment on one (C, H, W) uint8 image, its draws seeded from ``rng``.

    The shard readers draw every augmentation from a per-sample ``random.Random`` so that a resumed run replays the
    same samples; torchvision's RandAugment uses torch's global generator, so it runs under a forked, seeded one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.getrandbits(63))
        return v2.RandAugment(num_ops=2, magnitude=magnitude, interpolation=InterpolationMode.BILINEAR)(image)


def eval_transform(size: int, *, crop_pct: float = 1.0) -> Callable[[ImageLike], Tensor]:
    """Deterministic evaluation transform: resize the shorter side to ``size / crop_pct``, centre-crop ``size``.

    Args:
        size: side of the square output.
        crop_pct: fraction of the resized shorter side kept by the centre crop (MAE eval: 0.875; 1.0 keeps
            all of it, so an image that is already ``size`` x ``size`` passes through unchanged).

    Returns:
        A callable mapping a PIL image or (C, H, W) uint8 tensor to a (C, size, size) uint8 tensor.
    """
    check_int("eval_transform", "size", size)
    crop_pct = check_range("eval_transform", "crop_pct", crop_pct, 0, 1, low_open=True)
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


class ClipRandomResizedCrop:
    """Random resized crop with ONE box (and one flip) for every frame of a clip, bilinear and antialiased.

    Args:
        size: side of the square output.
        scale: area range of the crop as a fraction of the frame's area.
        ratio: aspect-ratio range of the crop.
        flip: flip the whole clip horizontally with probability 0.5 (VideoMAE: no flip).
    """

    def __init__(
        self, size: int, *, scale: tuple[float, float], ratio: tuple[float, float], flip: bool = False
    ) -> None:
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip

    def __call__(self, clip: Tensor) -> Tensor:
        """(T, C, H, W) uint8 -> (T, C, size, size) uint8."""
        top, left, height, width = v2.RandomResizedCrop.get_params(clip, list(self.scale), list(self.ratio))
        out = TF.resized_crop(
            clip, top, left, height, width, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True
        )  # (T, C, size, size)
        if self.flip and torch.rand(()) < 0.5:
            out = out.flip(-1)  # (T, C, size, size)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"


class ClipCenterCrop:
    """Centre crop of every frame (the evaluation transform, after the short-side resize at decode).

    Args:
        size: side of the square output.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, clip: Tensor) -> Tensor:
        """(T, C, H, W) uint8 -> (T, C, size, size) uint8 (frames smaller than ``size`` are resized up first)."""
        if min(clip.shape[-2:]) < self.size:
            clip = TF.resize(clip, [self.size], InterpolationMode.BILINEAR, antialias=True)  # shorter side
        return TF.center_crop(clip, [self.size, self.size])  # (T, C, size, size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"
