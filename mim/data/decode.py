"""Fast decode + MAE augmentation for encoded image bytes (JPEG, PNG, ...), ending in (C, H, W) uint8.

The bicubic random resized crop of the MAE augmentation costs more than the decode at ImageNet size, and a
large JPEG costs most in the decode (BENCHMARKS.md, "C7: data loader"). :func:`decode_random_resized_crop` therefore

1. samples the crop box first, from the distribution of torchvision's ``RandomResizedCrop`` (scale
   (0.2, 1), aspect ratio (3/4, 4/3)) on the size read from the header (:func:`sample_crop_box`);
2. decodes a JPEG at the smallest DCT scale (1/8 ... 8/8, libjpeg-turbo through simplejpeg) at which the
   crop still holds at least ``size`` x ``size`` pixels;
3. crops the box and resizes it with torch's uint8 antialiased bicubic kernel, then flips.

Other formats (PNG, ...) and JPEGs that simplejpeg rejects (CMYK, ...) go through PIL at full size.
Randomness comes from an explicit :class:`random.Random`, so a caller seeds it from (seed, epoch, rank,
worker).
"""

from __future__ import annotations

import io
import math
import random
from typing import Literal

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import resize

__all__ = ["decode_center_crop", "decode_random_resized_crop", "image_size_of", "sample_crop_box"]

_JPEG_MAGIC = b"\xff\xd8"


def sample_crop_box(
    height: int,
    width: int,
    rng: random.Random,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """Sample a random-resized-crop box with the distribution of torchvision's ``RandomResizedCrop.get_params``.

    Ten tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first box that fits wins;
    otherwise the largest centred box whose aspect ratio is clamped into ``ratio``.

    Args:
        height: image height in pixels.
        width: image width in pixels.
        rng: the random source.
        scale: range of the crop's area as a fraction of the image's area.
        ratio: range of the crop's aspect ratio (width / height).

    Returns:
        ``(top, left, crop_height, crop_width)`` in pixels of the full-size image.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def image_size_of(data: bytes) -> tuple[int, int]:
    """(height, width) of encoded image bytes from the header only (JPEG via simplejpeg, else PIL)."""
    if data[:2] == _JPEG_MAGIC:
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(h), int(w)
        except ValueError:
            pass
    with Image.open(io.BytesIO(data)) as image:
        return image.height, image.width


def _decode_scaled_array(data: bytes, mode: Literal["RGB", "L"], min_height: int, min_width: int) -> np.ndarray:
    """Decode to an (H', W', C) uint8 array of at least (min_height, min_width) pixels (DCT-scaled for JPEGs)."""
    if data[:2] == _JPEG_MAGIC:
        try:
            return simplejpeg.decode_jpeg(
                data,
                colorspace="RGB" if mode == "RGB" else "GRAY",
                min_height=min_height,
                min_width=min_width,
                strict=True,  # a truncated file is an error, not a grey tail
            )  # (H', W', C) uint8
        except ValueError:
            pass  # e.g. CMYK or progressive quirks: let PIL try (it raises on truly corrupt data)
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft(mode, (min_width, min_height))  # DCT scaling, keeps >= the requested size
        array = np.asarray(image.convert(mode))  # decodes the whole file
    return array if array.ndim == 3 else array[:, :, None]  # (H', W', C)


def _decode_scaled(data: bytes, mode: Literal["RGB", "L"], min_height: int, min_width: int) -> Image.Image:
    """Decode to a PIL image of at least (min_height, min_width) pixels, scaled down in the DCT for JPEGs."""
    array = _decode_scaled_array(data, mode, min_height, min_width)
    return Image.fromarray(array if mode == "RGB" else array[:, :, 0], mode=mode)


def _to_tensor(image: Image.Image) -> Tensor:
    array = np.asarray(image)  # (H, W, C) or (H, W) uint8
    if array.ndim == 2:
        array = array[:, :, None]
    chw = array.transpose(2, 0, 1)  # (C, H, W), a view of PIL's read-only buffer
    return torch.from_numpy(chw.copy() if chw.flags.c_contiguous else np.ascontiguousarray(chw))  # (C, H, W) uint8


def decode_random_resized_crop(
    data: bytes,
    size: int,
    rng: random.Random,
    *,
    mode: Literal["RGB", "L"] = "RGB",
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> Tensor:
    """The MAE training augmentation on encoded bytes: random resized crop (bicubic, antialiased) + flip.

    The crop box is sampled on the full-size image first; a JPEG is then decoded at the smallest DCT scale
    at which the box still covers at least ``size`` x ``size`` pixels.

    Args:
        data: encoded image bytes.
        size: side of the square output.
        rng: the random source (crop box, then flip).
        mode: "RGB" (C = 3) or "L" (C = 1).
        scale: range of the crop's area fraction.
        ratio: range of the crop's aspect ratio.
        hflip: probability of a horizontal flip.

    Returns:
        (C, size, size) uint8.

    Raises:
        OSError, ValueError, SyntaxError: the bytes are not a decodable image.
    """
    height, width = image_size_of(data)
    top, left, h, w = sample_crop_box(height, width, rng, scale=scale, ratio=ratio)
    flip = rng.random() < hflip
    # Decode so that the crop keeps >= 2x the output size: the crop box is then cut on whole pixels of the
    # DCT-scaled image with at most 1/4 output pixel of shift (PIL's float box is not available to torch).
    need = 2 * size
    array = _decode_scaled_array(data, mode, math.ceil(height * need / h), math.ceil(width * need / w))
    fy, fx = array.shape[0] / height, array.shape[1] / width  # the DCT scale actually used
    y0, x0 = round(top * fy), round(left * fx)
    y1, x1 = max(y0 + 1, round((top + h) * fy)), max(x0 + 1, round((left + w) * fx))
    crop = torch.from_numpy(np.ascontiguousarray(array[y0:y1, x0:x1])).permute(2, 0, 1)  # (C, h', w') uint8
    # torch's uint8 antialiased bicubic kernel: ~3x faster than PIL's resample plus the array -> PIL copy
    # (measured 0.40 ms vs 1.24 + 0.49 ms for a 300 px crop -> 224), same filter.
    out = resize(crop, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)  # (C, size, size)
    return (out.flip(-1) if flip else out).contiguous()


def decode_center_crop(data: bytes, size: int, *, mode: Literal["RGB", "L"] = "RGB", crop_pct: float = 1.0) -> Tensor:
    """Evaluation decode: resize the shorter side to ``size / crop_pct`` (bicubic) and centre-crop ``size``.

    Args:
        data: encoded image bytes.
        size: side of the square output.
        mode: "RGB" (C = 3) or "L" (C = 1).
        crop_pct: fraction of the resized shorter side kept by the centre crop.

    Returns:
        (C, size, size) uint8.
    """
    height, width = image_size_of(data)
    resize = math.floor(size / crop_pct) if crop_pct < 1 else size
    factor = resize / min(height, width)  # output pixels per input pixel
    crop = size / factor  # the centre crop's side in input pixels
    top, left = (height - crop) / 2, (width - crop) / 2
    image = _decode_scaled(data, mode, math.ceil(height * factor), math.ceil(width * factor))
    fy, fx = image.height / height, image.width / width
    box = (left * fx, top * fy, (left + crop) * fx, (top + crop) * fy)
    return _to_tensor(image.resize((size, size), Image.Resampling.BICUBIC, box=box))  # (C, size, size)
