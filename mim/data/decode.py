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

High bit depth (:func:`convert_image`, shared with ``mim pack``): PIL's ``convert("RGB")`` clips a 16-bit grey image
(modes ``I;16``, ``I;16B``, ``I``) to 255 instead of scaling it, so these are scaled here to 8 bits as
``round(v * 255 / max)``: ``max`` = 65535 for 16-bit PNGs and PGMs (PIL stretches a PGM's maxval to 16 bits), and
``2**BitsPerSample - 1`` for TIFFs of up to 16 bits. A 32-bit integer (mode ``I`` with no such depth) or
floating-point (mode ``F``) image has no known range: it is refused with a ``ValueError`` naming the file (a
loader then skips it as unreadable), as scaling by 2**32 would silently turn it black. 16-bit RGB, RGBA and
grey + alpha PNGs are reduced to 8 bits by PIL itself when it opens them (keeping the high byte, ``v >> 8``, which
differs from the rounded value by at most 1); they decode correctly without this step.

Images smaller than the output: :class:`SmallImageCheck` warns once per dataset (over all loader workers) with one
example, since such images are upsampled by every crop.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from typing import Literal

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import resize

__all__ = [
    "SmallImageCheck",
    "SmallImageWarning",
    "convert_image",
    "decode_center_crop",
    "decode_random_resized_crop",
    "image_size_of",
    "max_pixel_value",
    "open_image",
    "sample_crop_box",
]

_JPEG_MAGIC = b"\xff\xd8"
_TIFF_BITS_PER_SAMPLE = 258
_CONVERT_HINT = "convert it to an 8-bit or 16-bit PNG (e.g. with numpy: scale to 0..65535, save as uint16)"


class SmallImageWarning(UserWarning):
    """Images smaller than the output size: every crop of them is upsampled (blurry inputs)."""


def max_pixel_value(image: Image.Image, *, name: str = "image") -> int | None:
    """The full-scale value of a high-bit-depth grey image (scaled to 255 by :func:`convert_image`), None for 8 bits.

    Args:
        image: an opened PIL image.
        name: the file (or shard member) for the error message.

    Returns:
        None for 8-bit modes (``L``, ``RGB``, ``P``, ...); 65535 for 16-bit modes (``I;16``, ``I;16B``, ...) and for
        mode ``I`` read from a PNG or PGM/PPM; ``2**BitsPerSample - 1`` for a TIFF of at most 16 bits.

    Raises:
        ValueError: mode ``F`` (floating point) or a 32-bit integer image, whose value range is unknown.
    """
    mode = image.mode
    if mode != "I" and mode != "F" and not mode.startswith("I;16"):
        return None
    if mode == "F":
        raise ValueError(
            f"{name}: a floating-point image (PIL mode 'F', {image.format or 'unknown'} format) has no known value "
            f"range to scale to 8 bits; {_CONVERT_HINT}"
        )
    bits: int | None = 16 if mode.startswith("I;16") or image.format in ("PNG", "PPM") else None
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None and _TIFF_BITS_PER_SAMPLE in tags:
        per_sample = tags[_TIFF_BITS_PER_SAMPLE]
        bits = int(per_sample[0] if isinstance(per_sample, tuple) else per_sample)
    if bits is None or not 1 <= bits <= 16:
        depth = f"{bits}-bit" if bits is not None else "32-bit (PIL mode 'I')"
        raise ValueError(
            f"{name}: a {depth} integer image ({image.format or 'unknown'} format) has no known value range to scale "
            f"to 8 bits (16 bits at most are scaled); {_CONVERT_HINT}"
        )
    return (1 << bits) - 1


def convert_image(image: Image.Image, mode: Literal["RGB", "L"], *, name: str = "image") -> Image.Image:
    """``image.convert(mode)`` that scales high-bit-depth grey images to 8 bits instead of clipping them.

    PIL's own ``convert`` clips a 16-bit value v to ``min(v, 255)`` (a 16-bit photo becomes white); here v becomes
    ``round(v * 255 / max)`` with ``max`` from :func:`max_pixel_value` (65535 for 16-bit PNGs), clipped to [0, 255]
    (negative values of signed images become 0), then grey is replicated for ``mode="RGB"``. 8-bit images are
    converted by PIL unchanged.

    Args:
        image: an opened PIL image (decoded here).
        mode: "RGB" or "L".
        name: the file (or shard member) for error messages.

    Returns:
        A PIL image in ``mode``.

    Raises:
        ValueError: a floating-point or 32-bit integer image (no known range; see :func:`max_pixel_value`).
    """
    maximum = max_pixel_value(image, name=name)
    if maximum is None:
        return image.convert(mode)
    values = np.asarray(image).astype(np.int64)  # (H, W), any byte order
    # round(v * 255 / max) in integers (half up; no ties for max = 65535): floor((2 * 255 v + max) / (2 max))
    grey = np.clip((values * 510 + maximum) // (2 * maximum), 0, 255).astype(np.uint8)  # (H, W)
    out = Image.fromarray(grey)  # mode "L"
    return out if mode == "L" else out.convert(mode)


def open_image(path: str, mode: Literal["RGB", "L"]) -> Image.Image:
    """The image file at ``path``, decoded and converted to ``mode`` with :func:`convert_image` (16-bit aware).

    Raises:
        OSError, SyntaxError, ValueError, Image.DecompressionBombError: the file cannot be decoded (or has no
            known value range, see :func:`max_pixel_value`).
    """
    with Image.open(path) as image:
        return convert_image(image, mode, name=path)


class SmallImageCheck:
    """Warns once per dataset (over the main process and all loader workers) about an image smaller than the output.

    Such an image is upsampled by every crop, which a user should know about, but one warning per image would flood
    the log. The flag lives in shared memory (like :class:`~mim.data.base.FileDataset`'s table of bad files), so a
    dataset that holds this object warns at most once whatever its number of workers (two workers meeting their
    first small image at the same instant may both warn).

    Args:
        owner: the datamodule, for the message.
        size: the output side (``image_size``); images with a side below it are reported.
        field: the argument that sets ``size``.
    """

    def __init__(self, owner: str, size: int, *, field: str = "image_size") -> None:
        self.owner, self.size, self.field = owner, size, field
        self.warned = torch.zeros(1, dtype=torch.bool).share_memory_()  # True once the warning was issued

    def __call__(self, name: str, height: int, width: int) -> bool:
        """Warn (the first time) when ``height`` or ``width`` is below ``size``; returns whether the image is small.

        Args:
            name: the file or shard member, named in the warning as the example.
            height: the image's height in pixels.
            width: the image's width in pixels.
        """
        if height >= self.size and width >= self.size:
            return False
        if not bool(self.warned[0]):
            self.warned[0] = True
            warnings.warn(
                f"{self.owner}: some images are smaller than {self.field}={self.size} and are upsampled by every crop, "
                f"e.g. {name} ({height}x{width} pixels, height x width); lower {self.field} or use larger images "
                "(warned once per dataset)",
                SmallImageWarning,
                stacklevel=2,
            )
        return True


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
        array = np.asarray(convert_image(image, mode, name="image bytes"))  # decodes the whole file
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
    region = array[y0:y1, x0:x1]  # (h', w', C); PIL's arrays are read-only, which torch warns about
    region = np.ascontiguousarray(region) if array.flags.writeable else region.copy()
    crop = torch.from_numpy(region).permute(2, 0, 1)  # (C, h', w') uint8
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
