"""Webdataset tar shards of videos (``mim pack VIDEO_FOLDER OUT/``) as clip batches.

``mim pack`` stores each video's original bytes as ``{key}.mp4`` (``.webm .mkv .avi .mov .m4v``) plus its label
as ``{key}.cls``. :class:`VideoShardDataset` is a :class:`~mim.data.shards.ShardDataset` that decodes the
in-memory bytes with the same :class:`~mim.data.video.ClipDecoder` as the file datasets, so the shard order,
rank / worker splitting, seeding, fixed epoch length, exact mid-epoch resume and corrupt-member accounting are
those of :class:`~mim.data.shards.ShardDataModule`. Corrupt members are skipped with a
:class:`~mim.data.video.CorruptVideoWarning` and counted (:attr:`VideoShardDataModule.num_corrupt`), each once
however often it is read again (by its shard URL and key).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn

from mim.checks import check_int
from mim.data.shards import ShardDataset, ShardLoadersMixin, check_max_corrupt, resolve_shards
from mim.data.video import ClipDecoder, CorruptVideoWarning, VideoDataModuleBase
from mim.data.video_io import DECODE_ERRORS, VIDEO_EXTENSIONS
from mim.types import Batch

__all__ = ["VideoShardDataModule", "VideoShardDataset"]

_SHARD_VIDEO_EXTENSIONS = tuple(sorted(e[1:] for e in VIDEO_EXTENSIONS))  # shard member extensions


class VideoShardDataset(ShardDataset):
    """Clips decoded from the ``{key}.mp4`` (``.webm .mkv .avi .mov .m4v``) members of tar shards (``mim pack``).

    Shard order, rank / worker splitting, the shuffle buffer, the fixed epoch length, resampling and the
    corrupt-sample accounting are :class:`~mim.data.shards.ShardDataset`'s; only the decoding differs: each
    video is decoded from its in-memory bytes by ``decoder`` into ``num_repeats`` clips, exactly as
    :class:`~mim.data.video_folder.VideoClipDataset` does for files. Frame sampling and the crops draw from
    torch's RNG reseeded per sample from the (seed, epoch, rank, worker) stream, so a sample's clips are a
    function of those numbers (the caller's global RNG is left as it was).

    Args:
        urls: shard URLs (already expanded).
        num_samples: videos this rank yields per epoch; a multiple of ``batch_size``.
        batch_size: videos per batch.
        decoder: samples, decodes and crops the clips of one video.
        **kwargs: ``rank``, ``world_size``, ``train``, ``shuffle_buffer``, ``seed``, ``max_corrupt`` of
            :class:`~mim.data.shards.ShardDataset`.

    Each sample is ``{"video": (R, C, T, S, S) uint8, "label": (R,) int64}``; ``collate_clips`` flattens R.
    """

    warning = CorruptVideoWarning

    def __init__(
        self, urls: Sequence[str], *, num_samples: int, batch_size: int, decoder: ClipDecoder, **kwargs: Any
    ) -> None:
        super().__init__(urls, num_samples=num_samples, batch_size=batch_size, **kwargs)
        self.decoder = decoder

    def _decode(self, url: str, key: str, fields: dict[str, bytes], slot: int, rng: random.Random) -> Batch | None:
        ext = next((e for e in _SHARD_VIDEO_EXTENSIONS if e in fields), None)
        if ext is None:
            self._skip(slot, f"sample {key} in {url}: no video member (has {sorted(fields)})", f"{url}\0{key}")
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            try:
                label = int(fields["cls"].decode().strip()) if "cls" in fields else 0
                frames = self.decoder.read(fields[ext])  # (T, C, H, W)
            except DECODE_ERRORS as err:  # av.FFmpegError subclasses OSError / ValueError
                self._skip(slot, f"sample {key}.{ext} in {url}: {type(err).__name__}: {err}", f"{url}\0{key}")
                return None
            sample = self.decoder.clips(frames, label)  # video: (R, C, T, S, S)
        self.read[slot] += 1
        return sample


class VideoShardDataModule(ShardLoadersMixin, VideoDataModuleBase):
    """Webdataset shards of videos (``mim pack``), as ``uint8`` clip batches normalised on the device.

    The shards are read like :class:`~mim.data.shards.ShardDataModule` reads image shards (seeded shard order
    split by rank and worker, a shuffle buffer, ``samples_per_epoch // world_size // batch_size`` batches on every
    rank, corrupt members skipped and counted up to ``max_corrupt``) and decoded from memory with PyAV. Batches,
    clip sampling, the learning-rate scaling and the clip settings (``num_frames`` ... ``seed``, documented
    there): :class:`~mim.data.video.VideoDataModuleBase`.

    Args:
        urls: a ``mim pack`` output folder with index.json, brace-expanded paths or webdataset URLs.
        val_urls: validation shards, same forms; None: no validation.
        samples_per_epoch: videos per epoch over all ranks; default: the index's total.
        val_samples: validation videos over all ranks; default: the index's total.
        shuffle_buffer: videos held in each worker's shuffle buffer (1 disables it).
        max_corrupt: corrupt members tolerated (an int: a count; a float in [0, 1): a fraction of the videos
            read); beyond it the loader raises :class:`~mim.data.shards.TooManyCorruptError`.
        num_classes: label classes; default: from the training index.
        seed: seeds the shard order, the shuffle buffer, the frame sampling and the crops (with epoch, rank,
            worker).
    """

    def __init__(
        self,
        *,
        urls: str | list[str],
        val_urls: str | list[str] | None = None,
        samples_per_epoch: int | None = None,
        val_samples: int | None = None,
        shuffle_buffer: int = 64,
        max_corrupt: int | float = 0.01,
        num_frames: int = 16,
        frame_stride: int = 4,
        image_size: int = 224,
        resize_short: int | None = None,
        batch_size: int = 8,
        num_repeats: int = 1,
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = False,
        in_chans: Literal[1, 3] = 3,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        decode_threads: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        owner = "VideoShardDataModule"
        check_int(owner, "shuffle_buffer", shuffle_buffer)
        check_max_corrupt(owner, max_corrupt)
        spec = resolve_shards(
            owner,
            urls,
            kind="video",
            samples_per_epoch=samples_per_epoch,
            num_classes=num_classes,
            val_urls=val_urls,
            val_samples=val_samples,
        )
        super().__init__(
            num_classes=spec.num_classes,
            num_frames=num_frames,
            frame_stride=frame_stride,
            image_size=image_size,
            resize_short=resize_short,
            batch_size=batch_size,
            num_repeats=num_repeats,
            augment=augment,
            crop_scale=crop_scale,
            crop_ratio=crop_ratio,
            flip=flip,
            in_chans=in_chans,
            mean=mean,
            std=std,
            decode_threads=decode_threads,
            num_workers=num_workers,
            seed=seed,
        )
        self.urls, self.val_urls = spec.urls, spec.val_urls
        self.samples_per_epoch, self.val_samples = spec.samples_per_epoch, spec.val_samples
        self.classes = spec.classes or []
        self.shuffle_buffer, self.max_corrupt = shuffle_buffer, max_corrupt

    def build_datasets(self) -> tuple[ShardDataset, ShardDataset | None]:
        train_decoder, val_decoder = self.clip_decoders()

        def make(urls: list[str], *, train: bool, **kwargs: Any) -> VideoShardDataset:
            return VideoShardDataset(urls, decoder=train_decoder if train else val_decoder, train=train, **kwargs)

        return self._shard_datasets(make)

    @property
    def num_skipped(self) -> int:
        """The same as :attr:`num_corrupt` (the count that :class:`~mim.data.video_folder.VideoDataModule` keeps
        of its unreadable files)."""
        return self.num_corrupt

    def teardown(self, stage: str) -> None:
        if self.num_corrupt:
            rank_zero_warn(
                f"VideoShardDataModule skipped {self.num_corrupt} corrupt shard members or shards "
                "(see the warnings above)",
                category=CorruptVideoWarning,
            )
