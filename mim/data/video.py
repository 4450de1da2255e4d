"""Video clips: the clip sample and the settings shared by the file and the shard video datamodules.

Every video is decoded once by a :class:`ClipDecoder` (PyAV, :func:`~mim.data.video_io.read_frames`) into
``num_repeats`` clips of the same frames with independent spatial augmentation (VideoMAE V2's ``num_sample``),
and :func:`collate_clips` flattens them, so a batch of ``batch_size`` videos holds ``batch_size * num_repeats``
``uint8`` (C, T, H, W) clips, normalised on the device. **Learning rates scale with videos, not clips**
(as VideoMAE V2's official code, OpenGVLab/VideoMAEv2 run_mae_pretraining.py): it computes ``lr = base_lr * videos_per_step / 256`` although each
step trains on 4x as many clips.

Sources: :class:`~mim.data.video_folder.VideoDataModule` reads a folder or a list file of videos,
:class:`~mim.data.video_shards.VideoShardDataModule` the webdataset shards of ``mim pack``; both derive from
:class:`VideoDataModuleBase`. Unreadable videos are skipped with a :class:`CorruptVideoWarning` and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import default_collate

from mim.checks import check_choice, check_int, check_pair_range
from mim.data.base import ImageDataModule, normalize_video
from mim.data.transforms import ClipCenterCrop, ClipRandomResizedCrop
from mim.data.video_io import read_frames
from mim.types import Batch

__all__ = ["ClipDecoder", "CorruptVideoWarning", "VideoDataModuleBase", "collate_clips"]


class CorruptVideoWarning(UserWarning):
    """A video file could not be decoded and was skipped."""


class ClipDecoder:
    """Decodes one video into ``num_repeats`` independently transformed clips of the same sampled frames.

    The one decoding path of :class:`~mim.data.video_folder.VideoClipDataset` (files) and
    :class:`~mim.data.video_shards.VideoShardDataset` (shard members): :meth:`read` samples and decodes the
    frames (raising one of :data:`~mim.data.video_io.DECODE_ERRORS` for an unreadable video), :meth:`clips`
    crops them ``num_repeats`` times.

    Args:
        num_frames: frames per clip T.
        frame_stride: distance between sampled frames.
        transform: maps (T, C, H, W) uint8 frames to (T, C, S, S) uint8; called ``num_repeats`` times.
        num_repeats: clips per decoded video R.
        sampling: random clip start (training) or the centred one (evaluation).
        short_side: resize the frames' shorter side at decode (None keeps the decoded size).
        in_chans: 3 decodes RGB, 1 grey.
        decode_threads: FFmpeg threads per decode (0: one per core).

    The random clip start and the crops draw from torch's global generator; the datasets seed it per sample
    (:func:`~mim.data.base.seeded_draws` for files, a per-sample ``random.Random`` for shards), so the clips are a
    function of the sample's seed.
    """

    def __init__(
        self,
        *,
        num_frames: int,
        frame_stride: int,
        transform: Callable[[Tensor], Tensor],
        num_repeats: int = 1,
        sampling: Literal["random", "center"] = "random",
        short_side: int | None = None,
        in_chans: Literal[1, 3] = 3,
        decode_threads: int = 0,
    ) -> None:
        self.num_frames, self.frame_stride, self.num_repeats = num_frames, frame_stride, num_repeats
        self.transform, self.sampling, self.short_side, self.in_chans = transform, sampling, short_side, in_chans
        self.decode_threads = decode_threads

    def read(self, source: str | bytes, *, start: int = 0, num_video_frames: int = -1) -> Tensor:
        """The sampled (T, C, H, W) uint8 frames of a video file or of its bytes.

        Args:
            source: the video file, or its bytes (decoded from memory).
            start: first frame of the usable segment (list files' ``start_idx``).
            num_video_frames: frames in the usable segment; -1 = to the end of the video.

        Raises:
            One of :data:`~mim.data.video_io.DECODE_ERRORS`: the video cannot be opened or decoded.
        """
        frames, _ = read_frames(
            source,
            num_frames=self.num_frames,
            frame_stride=self.frame_stride,
            start=start,
            num_video_frames=num_video_frames,
            mode=self.sampling,
            short_side=self.short_side,
            gray=self.in_chans == 1,
            threads=self.decode_threads,
        )
        return frames  # (T, C, H, W)

    def clips(self, frames: Tensor, label: int) -> Batch:
        """``{"video": (R, C, T, S, S) uint8, "label": (R,) int64}``: R transformed clips of (T, C, H, W) frames."""
        clips = torch.stack([self.transform(frames) for _ in range(self.num_repeats)])  # (R, T, C, S, S)
        return {
            "video": clips.permute(0, 2, 1, 3, 4).contiguous(),  # (R, C, T, S, S)
            "label": torch.full((self.num_repeats,), label, dtype=torch.int64),  # (R,)
        }


def collate_clips(samples: Sequence[Batch]) -> Batch:
    """Stack B samples of R clips each and flatten them: B videos -> B * R clips (video-major order).

    Args:
        samples: B dicts ``{"video": (R, C, T, H, W) uint8, "label": (R,) int64}``.

    Returns:
        ``{"video": (B * R, C, T, H, W) uint8, "label": (B * R,) int64}``; clips ``b * R .. b * R + R - 1``
        come from video ``b``.
    """
    batch = default_collate(list(samples))  # video: (B, R, C, T, H, W); label: (B, R)
    return {"video": batch["video"].flatten(0, 1), "label": batch["label"].flatten(0, 1)}  # (B * R, ...)


class VideoDataModuleBase(ImageDataModule):
    """Base of the video datamodules: the clip settings, the clip decoders, clip batches normalised on the device.

    The loaders yield ``{"video": (B * R, C, T, S, S) uint8, "label": (B * R,) int64}`` with ``B =
    batch_size`` videos, ``R = num_repeats`` clips per video in training (1 in validation), ``T =
    num_frames`` and ``S = image_size``; :meth:`on_after_batch_transfer` turns ``video`` into float32
    ``(x / 255 - mean) / std`` on the device. ``batch_size`` counts videos: scale the learning rate by videos,
    not clips (as VideoMAE V2's official code does).

    A subclass checks and resolves its source (files or shards), calls ``super().__init__`` with the clip
    settings and builds its datasets from :meth:`clip_decoders`.

    Args:
        num_classes: label classes (the subclass resolves its default from the data).
        num_frames: frames per clip T (VideoMAE / V-JEPA: 16).
        frame_stride: distance between sampled frames (VideoMAE K400: 4, SSv2: 2; V-JEPA ``frame_step``: 4).
        image_size: side S of the square clips.
        resize_short: resize the shorter side to this before cropping (done by FFmpeg's scaler while
            converting, which also makes decoding of large videos cheaper); None keeps the decoded size for
            training and resizes to ``image_size`` for validation. Must be >= ``image_size``.
        batch_size: videos per device and step.
        num_repeats: clips R per decoded video in training (VideoMAE V2 ``num_sample``: 4).
        augment: training crop = random resized crop shared by all frames of a clip; False = centre crop.
        crop_scale: area range of the training crop.
        crop_ratio: aspect-ratio range of the training crop.
        flip: flip training clips horizontally with probability 0.5 (VideoMAE does not flip).
        in_chans: 3 decodes RGB, 1 grey.
        mean: per-channel means of the [0, 1] pixels; default ImageNet's.
        std: per-channel standard deviations; default ImageNet's.
        decode_threads: FFmpeg threads per decode; None: 1 with loader workers (they already use the cores,
            as VideoMAE's ``num_threads=1``), one per core without.
        num_workers: loader worker processes (decoding is CPU-bound: use several).
        seed: seeds the training order and every training video's clip start and crops
            (:class:`~mim.data.base.EpochShuffleSampler`).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        num_frames: int,
        frame_stride: int,
        image_size: int,
        resize_short: int | None,
        batch_size: int,
        num_repeats: int,
        augment: bool,
        crop_scale: tuple[float, float],
        crop_ratio: tuple[float, float],
        flip: bool,
        in_chans: Literal[1, 3],
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        decode_threads: int | None,
        num_workers: int,
        seed: int,
    ) -> None:
        owner = type(self).__name__
        for name, value in (("num_frames", num_frames), ("frame_stride", frame_stride), ("num_repeats", num_repeats)):
            check_int(owner, name, value)
        if decode_threads is not None:
            check_int(owner, "decode_threads", decode_threads, minimum=0, hint="or None")
        check_choice(owner, "in_chans", in_chans, (1, 3))
        if resize_short is not None:
            check_int(owner, "resize_short", resize_short, minimum=image_size, hint="image_size, or None")
        crop_scale = check_pair_range(owner, "crop_scale", crop_scale, 0, 1, low_open=True)
        crop_ratio = check_pair_range(owner, "crop_ratio", crop_ratio, 0, math.inf, low_open=True)
        super().__init__(
            batch_size=batch_size,
            image_size=image_size,
            in_chans=in_chans,
            mean=mean,
            std=std,
            num_classes=num_classes,
            num_workers=num_workers,
            seed=seed,
        )
        self.num_frames, self.frame_stride, self.num_repeats = num_frames, frame_stride, num_repeats
        self.resize_short, self.augment, self.flip = resize_short, augment, flip
        self.decode_threads = decode_threads
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """(C, T, S, S): the shape of one clip."""
        return (self.in_chans, self.num_frames, self.image_size, self.image_size)

    def data_config(self) -> dict[str, Any]:
        """:meth:`ImageDataModule.data_config` of one frame plus ``num_frames``; ``crop_pct`` is
        ``image_size / resize_short`` (validation resizes the shorter side to ``resize_short``, bicubic, and
        centre-crops ``image_size``), 1.0 without ``resize_short``."""
        config = super().data_config()
        config["num_frames"] = self.num_frames
        config["crop_pct"] = self.image_size / self.resize_short if self.resize_short else 1.0
        return config

    def clip_decoders(self) -> tuple[ClipDecoder, ClipDecoder]:
        """The (training, validation) decoders.

        Training: ``num_repeats`` clips from a random start, each with its own random resized crop (the centre
        crop without ``augment``); validation: one centred clip, centre-cropped.
        """
        in_chans: Literal[1, 3] = 1 if self.in_chans == 1 else 3
        center = ClipCenterCrop(self.image_size)
        if self.augment:
            train_tf: Callable[[Tensor], Tensor] = ClipRandomResizedCrop(
                self.image_size, scale=self.crop_scale, ratio=self.crop_ratio, flip=self.flip
            )
        else:
            train_tf = center
        threads = self.decode_threads if self.decode_threads is not None else (1 if self.num_workers > 0 else 0)
        common: dict[str, Any] = {
            "num_frames": self.num_frames,
            "frame_stride": self.frame_stride,
            "in_chans": in_chans,
            "decode_threads": threads,
        }
        train = ClipDecoder(
            transform=train_tf,
            num_repeats=self.num_repeats,
            sampling="random",
            short_side=self.resize_short if (self.augment or self.resize_short) else self.image_size,
            **common,
        )
        val = ClipDecoder(
            transform=center, sampling="center", short_side=self.resize_short or self.image_size, **common
        )
        return train, val

    def _loader_kwargs(self) -> dict[str, Any]:
        return {**super()._loader_kwargs(), "collate_fn": collate_clips}

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Normalise ``batch["video"]`` on the device: (B, C, T, H, W) uint8 -> (B, C, T, H, W) float32."""
        batch["video"] = normalize_video(batch["video"], self.mean, self.std)
        return batch
