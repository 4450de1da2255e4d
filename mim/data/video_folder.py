"""Video files: a folder of clips or a VideoMAE / V-JEPA list file (:mod:`mim.data.video_io`) as clip batches.

:class:`VideoClipDataset` decodes each video with a :class:`~mim.data.video.ClipDecoder` into ``num_repeats``
clips; :class:`VideoDataModule` scans the folder or reads the list at construction, so a wrong path fails before
training with a message naming it. Unreadable files (corrupt, truncated, no video stream) are skipped with a
:class:`~mim.data.video.CorruptVideoWarning` naming the file, counted (:attr:`VideoDataModule.num_skipped`) and
replaced by the next readable video (:class:`~mim.data.base.FileDataset`). For ``mim pack`` shards of videos
use :class:`~mim.data.video_shards.VideoShardDataModule`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torch import Tensor

from mim.data.base import FileDataset, SkippedFilesMixin
from mim.data.video import ClipDecoder, CorruptVideoWarning, VideoDataModuleBase
from mim.data.video_io import _FOLDER_LAYOUT, DECODE_ERRORS, VideoEntry, read_video_list, scan_video_folder
from mim.types import Batch

__all__ = ["VideoClipDataset", "VideoDataModule"]


class VideoClipDataset(FileDataset):
    """Videos decoded once per sample into ``num_repeats`` independently cropped clips of the same frames.

    An unreadable file is skipped, counted and replaced by the next readable one, with a
    :class:`~mim.data.video.CorruptVideoWarning` naming it (:class:`~mim.data.base.FileDataset`).

    Args:
        entries: the videos.
        decoder: samples, decodes and crops the clips of one video.

    Each sample is ``{"video": (R, C, T, S, S) uint8, "label": (R,) int64}``; ``collate_clips`` flattens R.
    """

    kind = "video"
    warning = CorruptVideoWarning
    decode_errors = DECODE_ERRORS

    def __init__(self, entries: Sequence[VideoEntry], *, decoder: ClipDecoder) -> None:
        if not entries:
            raise ValueError("VideoClipDataset.entries must not be empty")
        super().__init__(len(entries))
        self.entries = list(entries)
        self.decoder = decoder

    def file_path(self, index: int) -> str:
        return self.entries[index].path

    def decode_file(self, index: int) -> Tensor:
        """The sampled (T, C, H, W) uint8 frames of video ``index``."""
        entry = self.entries[index]
        return self.decoder.read(entry.path, start=entry.start, num_video_frames=entry.num_video_frames)

    def to_sample(self, index: int, decoded: Tensor) -> Batch:
        return self.decoder.clips(decoded, self.entries[index].label)  # video: (R, C, T, S, S)


def _entries(
    root: str | Path | None,
    list_file: str | Path | None,
    classes: Sequence[str] | None,
    root_field: str,
    list_field: str,
) -> tuple[list[str], list[VideoEntry]]:
    """(classes, entries) of a list file (resolved against ``root``) or of the folder ``root``."""
    if list_file is not None:
        if root is not None and not Path(root).is_dir():
            raise FileNotFoundError(
                f"VideoDataModule.{root_field}: {str(root)!r} is not a directory (with {list_field}, {root_field} "
                "is the folder that the list's relative paths are resolved against)"
            )
        entries = read_video_list(list_file, root=root)
        return list(classes) if classes is not None else [], entries
    assert root is not None
    return scan_video_folder(root, classes=classes, field=root_field)


class VideoDataModule(SkippedFilesMixin, VideoDataModuleBase):
    """Video clips from a folder or a list file, as ``uint8`` batches normalised on the device.

    Batches, clip sampling, the learning-rate scaling and the clip settings (``num_frames`` ... ``seed``, documented
    there): :class:`~mim.data.video.VideoDataModuleBase`.

    Args:
        root: folder of clips (flat, or one subfolder per class); with ``list_file``, the folder that the list's
            relative paths are resolved against (default: the list file's folder).
        list_file: a VideoMAE (``path start_idx total_frames`` or ``path label``) or V-JEPA (``path label``) list.
        val_root: validation folder (same class names), or the base folder of ``val_list_file``.
        val_list_file: validation list file.
        num_classes: label classes; default: the folder's classes or ``max(label) + 1`` of the list.
    """

    def __init__(
        self,
        *,
        root: str | Path | None = None,
        list_file: str | Path | None = None,
        val_root: str | Path | None = None,
        val_list_file: str | Path | None = None,
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
        owner = "VideoDataModule"
        if root is None and list_file is None:
            raise ValueError(
                f"{owner}: give root (a folder of clips) or list_file (video shards: VideoShardDataModule); "
                f"{_FOLDER_LAYOUT}"
            )
        classes, train_entries = _entries(root, list_file, None, "root", "list_file")
        val_entries: list[VideoEntry] = []
        if val_root is not None or val_list_file is not None:
            val_entries = _entries(val_root, val_list_file, classes, "val_root", "val_list_file")[1]
        max_label = max(e.label for e in train_entries + val_entries)
        if num_classes is None:
            num_classes = max(len(classes), max_label + 1)
        elif isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes <= max_label:
            raise ValueError(f"{owner}.num_classes={num_classes} but the data has label {max_label}")
        super().__init__(
            num_classes=num_classes,
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
        self.root = None if root is None else str(root)
        self.list_file = None if list_file is None else str(list_file)
        self.classes = classes
        self.train_entries, self.val_entries = train_entries, val_entries

    def build_datasets(self) -> tuple[VideoClipDataset, VideoClipDataset | None]:
        train_decoder, val_decoder = self.clip_decoders()
        train = VideoClipDataset(self.train_entries, decoder=train_decoder)
        val = VideoClipDataset(self.val_entries, decoder=val_decoder) if self.val_entries else None
        return train, val
