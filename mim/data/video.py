"""Video clips decoded with PyAV: ``uint8`` (C, T, H, W) clips through the loader, normalised on the device.

Inputs, one of:

* a folder of clips (``.mp4 .webm .mkv .avi .mov .m4v``), flat (one class) or one subfolder per class::

      ROOT/<clip>.mp4                    (all label 0)
      ROOT/<class>/<clip>.mp4            (any depth below the class folder)

* a list file, one clip per line, relative paths resolved against ``root`` (default: the list file's folder):

  - VideoMAE / VideoMAE V2 pre-training lists ``path start_idx total_frames`` (label 0; ``total_frames = -1``
    means the whole video, otherwise frames ``[start_idx, start_idx + total_frames)``);
  - VideoMAE fine-tuning lists and V-JEPA's space-separated CSVs ``path label``;
  - bare ``path`` lines (label 0). Blank lines and lines starting with ``#`` are ignored.

* webdataset tar shards of videos (``mim pack VIDEO_FOLDER OUT/`` stores each video's original bytes as
  ``{key}.mp4`` plus ``{key}.cls``): ``VideoDataModule(urls=OUT)``. The shards are read by
  :class:`VideoShardDataset`, a :class:`~mim.data.shards.ShardDataset` that decodes the in-memory bytes with
  PyAV, so the shard order, rank / worker splitting, seeding, fixed epoch length and corrupt-member accounting
  are those of :class:`~mim.data.shards.ShardDataModule`.

Sampling (methods/JEPA_VIDEO.md 3(a).1 and 6): ``num_frames`` frames ``frame_stride`` apart from a start drawn
uniformly over the valid starts; a video shorter than the clip span repeats its last frame. Each decoded video
gives ``num_repeats`` clips of the same frames with independent spatial augmentation (VideoMAE V2's
``num_sample``), and :func:`collate_clips` flattens them, so a batch of ``batch_size`` videos holds
``batch_size * num_repeats`` clips. **Learning rates scale with videos, not clips** (3(d).4): VideoMAE V2
computes ``lr = base_lr * videos_per_step / 256`` although each step trains on 4x as many clips.

Unreadable files (corrupt, truncated, no video stream) are skipped with a :class:`CorruptVideoWarning` naming
the file, counted (:attr:`VideoDataModule.num_skipped`) and replaced by the next readable sample.

PyAV is an optional dependency (``pip install mim[video]``), imported when a video is first opened.
"""

from __future__ import annotations

import io
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from mim.data.base import ImageDataModule, check_positive_int, normalize_video
from mim.data.folder import default_stats
from mim.data.shards import (
    ShardDataset,
    ShardResumeMixin,
    check_max_corrupt,
    epoch_loader,
    per_rank_samples,
    rank_and_world,
    resolve_shards,
)
from mim.types import Batch

__all__ = [
    "VIDEO_EXTENSIONS",
    "ClipCenterCrop",
    "ClipRandomResizedCrop",
    "CorruptVideoWarning",
    "VideoClipDataset",
    "VideoDataModule",
    "VideoEntry",
    "VideoShardDataset",
    "collate_clips",
    "read_frames",
    "read_video_list",
    "sample_frame_indices",
    "scan_video_folder",
]

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"})
_FOLDER_LAYOUT = "expected ROOT/<clip>.mp4 (one class) or ROOT/<class>/<clip>.mp4 (.mp4/.webm/.mkv/.avi/.mov/.m4v)"
_LIST_LAYOUT = "expected one clip per line: 'path start_idx total_frames' (VideoMAE), or 'path label' (V-JEPA CSV)"


class CorruptVideoWarning(UserWarning):
    """A video file could not be decoded and was skipped."""


class _NoFramesError(ValueError):
    """A file opened but yielded no decodable video frame."""


@dataclass(frozen=True)
class VideoEntry:
    """One video of a dataset.

    Attributes:
        path: the video file.
        label: class index (0 where the source has no labels).
        start: first frame of the usable segment.
        num_video_frames: frames in the usable segment; -1 = up to the end of the video.
    """

    path: str
    label: int = 0
    start: int = 0
    num_video_frames: int = -1


# ---------------------------------------------------------------------------------------------- index files
def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def read_video_list(list_file: str | Path, *, root: str | Path | None = None) -> list[VideoEntry]:
    """Parse a VideoMAE / V-JEPA list file (see the module docstring for the formats).

    Paths may contain spaces: the trailing integer columns are split off from the right.

    Args:
        list_file: the list file.
        root: folder that relative paths are resolved against; default: the list file's folder.

    Returns:
        The entries in file order.

    Raises:
        FileNotFoundError: ``list_file`` does not exist.
        ValueError: the file has no entries, or a line has a negative label or start.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"VideoDataModule.list_file: {str(list_file)!r} does not exist; {_LIST_LAYOUT}")
    base = Path(root) if root is not None else list_file.parent
    entries = []
    for lineno, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.split()
        where = f"{str(list_file)!r} line {lineno} ({line!r})"
        if len(tokens) >= 3 and _is_int(tokens[-1]) and _is_int(tokens[-2]):
            path, start, total = line.rsplit(maxsplit=2)
            entry = VideoEntry(path, 0, int(start), int(total))
            if entry.start < 0 or entry.num_video_frames == 0 or entry.num_video_frames < -1:
                raise ValueError(f"VideoDataModule.list_file: {where}: need start_idx >= 0 and total_frames >= 1 or -1")
        elif len(tokens) >= 2 and _is_int(tokens[-1]):
            path, label = line.rsplit(maxsplit=1)
            entry = VideoEntry(path, int(label))
            if entry.label < 0:
                raise ValueError(f"VideoDataModule.list_file: {where}: labels must be >= 0")
        else:
            entry = VideoEntry(line)
        if not os.path.isabs(entry.path):
            entry = VideoEntry(str(base / entry.path), entry.label, entry.start, entry.num_video_frames)
        entries.append(entry)
    if not entries:
        raise ValueError(f"VideoDataModule.list_file: {str(list_file)!r} lists no clips; {_LIST_LAYOUT}")
    if not os.path.exists(entries[0].path):  # a cheap check that the path resolution is right
        raise FileNotFoundError(
            f"VideoDataModule.list_file: the first entry of {str(list_file)!r} resolves to {entries[0].path!r}, "
            f"which does not exist (relative paths are resolved against {str(base)!r}; set root)"
        )
    return entries


def _video_files(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS
        ]
    return sorted(found)


def scan_video_folder(
    root: str | Path, *, classes: Sequence[str] | None = None, field: str = "root"
) -> tuple[list[str], list[VideoEntry]]:
    """List the classes and the videos of a folder: flat (one class) or one subfolder per class.

    Args:
        root: the folder.
        classes: class names that define the labels (e.g. the training folder's); default: the sorted
            subfolder names of ``root`` (or ``[""]`` for a flat folder).
        field: the argument name used in error messages.

    Returns:
        ``(classes, entries)``, entries sorted by path.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: ``root`` is a file, holds no videos, mixes loose videos with class subfolders, or has a
            class folder unknown to ``classes``.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"VideoDataModule.{field}: {str(root)!r} does not exist; {_FOLDER_LAYOUT}")
    if not root.is_dir():
        raise ValueError(f"VideoDataModule.{field}: {str(root)!r} is a file, not a directory; {_FOLDER_LAYOUT}")
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    subdirs = [d for d in subdirs if _video_files(root / d)]
    loose = [
        str(root / e.name)
        for e in os.scandir(root)
        if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in VIDEO_EXTENSIONS
    ]
    if subdirs and loose:
        raise ValueError(
            f"VideoDataModule.{field}: {str(root)!r} holds both class subfolders {subdirs[:5]} and loose videos "
            f"{sorted(loose)[:3]}; {_FOLDER_LAYOUT}"
        )
    if not subdirs:
        if not loose:
            raise ValueError(f"VideoDataModule.{field}: no video files under {str(root)!r}; {_FOLDER_LAYOUT}")
        return list(classes) if classes is not None else [""], [VideoEntry(p) for p in sorted(loose)]
    classes = subdirs if classes is None else list(classes)
    unknown = [d for d in subdirs if d not in classes]
    if unknown:
        raise ValueError(
            f"VideoDataModule.{field}: {str(root)!r} has class folders {unknown} that the training data does not "
            f"have (training classes: {classes})"
        )
    index = {name: i for i, name in enumerate(classes)}
    entries = [VideoEntry(p, index[d]) for d in subdirs for p in _video_files(root / d)]
    return list(classes), entries


# ---------------------------------------------------------------------------------------------- decoding
def sample_frame_indices(
    num_video_frames: int, num_frames: int, frame_stride: int, *, mode: Literal["random", "center"] = "random"
) -> list[int]:
    """Frame indices of one clip: ``num_frames`` frames ``frame_stride`` apart.

    The start is uniform over the valid starts ``0 .. num_video_frames - span`` (``span = (num_frames - 1) *
    frame_stride + 1``) with torch's global RNG, or the middle one for ``mode="center"``. A video shorter than
    ``span`` starts at 0 and repeats its last frame (indices clamp to ``num_video_frames - 1``).

    Args:
        num_video_frames: frames in the video (>= 1).
        num_frames: frames per clip.
        frame_stride: distance between sampled frames.
        mode: random start (training) or centred (evaluation).

    Returns:
        ``num_frames`` non-decreasing frame indices.
    """
    span = (num_frames - 1) * frame_stride + 1
    num_starts = max(num_video_frames - span + 1, 1)
    start = int(torch.randint(num_starts, ()).item()) if mode == "random" else (num_starts - 1) // 2
    return [min(start + k * frame_stride, num_video_frames - 1) for k in range(num_frames)]


def _open(source: str | bytes, threads: int = 0) -> Any:
    import av  # optional dependency: pip install mim[video]

    container = av.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    if not container.streams.video:
        container.close()
        raise _NoFramesError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads
    stream.thread_count = threads  # 0: FFmpeg picks (one per core)
    return container


def _num_frames(stream: Any, container: Any) -> int:
    """Frame count from the header (exact for mp4), else estimated from duration x rate; 0 if unknown."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if rate is None:
        return 0
    if stream.duration is not None and stream.time_base is not None:
        return int(round(float(stream.duration * stream.time_base * rate)))
    if container.duration is not None:
        return int(round(container.duration / 1_000_000 * float(rate)))  # container.duration is in microseconds
    return 0


def _convert(frame: Any, short_side: int | None, gray: bool) -> np.ndarray:
    """One decoded frame as (H, W, C) uint8, the shorter side resized to ``short_side`` by swscale."""
    width = height = None
    if short_side is not None:
        scale = short_side / min(frame.width, frame.height)
        width, height = max(round(frame.width * scale), 1), max(round(frame.height * scale), 1)
    array = frame.to_ndarray(
        width=width, height=height, format="gray" if gray else "rgb24", interpolation="BICUBIC"
    )  # (H, W) or (H, W, 3)
    return array[..., None] if gray else array


def read_frames(
    path: str | bytes,
    *,
    num_frames: int,
    frame_stride: int,
    start: int = 0,
    num_video_frames: int = -1,
    mode: Literal["random", "center"] = "random",
    short_side: int | None = None,
    gray: bool = False,
    threads: int = 0,
    indices: Sequence[int] | None = None,
) -> tuple[Tensor, list[int]]:
    """Decode one clip from a video with PyAV, seeking to the clip's first frame.

    Args:
        path: the video file, or its bytes (e.g. a webdataset shard member), decoded from memory.
        num_frames: frames per clip.
        frame_stride: distance between sampled frames.
        start: first frame of the usable segment (list files' ``start_idx``).
        num_video_frames: frames in the usable segment; -1 = to the end of the video.
        mode: see :func:`sample_frame_indices`.
        short_side: resize the shorter side to this many pixels while converting (None keeps the size).
        gray: decode to one grey channel instead of RGB.
        threads: FFmpeg decoding threads (0: one per core; 1 in many loader workers avoids oversubscription).
        indices: decode exactly these frame indices (relative to ``start``) instead of sampling.

    Returns:
        ``(frames, indices)``: (T, C, H, W) uint8 frames and the frame indices they show (relative to ``start``;
        an index past the end of the video shows the last decoded frame).

    Raises:
        av.FFmpegError, OSError, ValueError: the file cannot be opened or decoded.
    """
    container = _open(path, threads)
    try:
        stream = container.streams.video[0]
        total = _num_frames(stream, container) - start
        if num_video_frames > 0:
            total = min(total, num_video_frames) if total > 0 else num_video_frames
        if indices is None:
            if total <= 0:  # unknown length: decode to the end once to count
                total = sum(1 for _ in container.decode(stream)) - start
                container.seek(0)
                if total <= 0:
                    raise _NoFramesError("no frames in the requested segment")
            indices = sample_frame_indices(total, num_frames, frame_stride, mode=mode)
        wanted = [start + i for i in indices]
        frames = _decode_indices(container, stream, wanted, short_side, gray)
    finally:
        container.close()
    clip = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (T, H, W, C) -> (T, C, H, W)
    return clip, list(indices)


def _frame_index(frame: Any, stream: Any, origin: int, rate: float) -> int | None:
    if frame.pts is None or stream.time_base is None or not rate:
        return None
    return int(round(float((frame.pts - origin) * stream.time_base) * rate))


def _decode_indices(
    container: Any, stream: Any, wanted: Sequence[int], short_side: int | None, gray: bool
) -> list[np.ndarray]:
    """Frames at the sorted indices ``wanted``, seeking to the keyframe before the first one.

    Frame indices come from the timestamps (``round((pts - start_time) * time_base * fps)``); when a seek
    overshoots or timestamps are missing, the video is decoded from its start and frames are counted.
    """
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    origin = stream.start_time or 0
    first, last = wanted[0], wanted[-1]
    if not (rate > 0 and stream.time_base is not None and first > 0):
        return _decode_from_start(container, stream, wanted, short_side, gray)
    container.seek(origin + int(first / rate / stream.time_base), stream=stream, backward=True)
    needed = set(wanted)
    found: dict[int, np.ndarray] = {}
    for frame in container.decode(stream):
        index = _frame_index(frame, stream, origin, rate)
        if index is None or (not found and index > first):  # no timestamps, or the seek overshot
            return _decode_from_start(container, stream, wanted, short_side, gray)
        if index in needed:
            found[index] = _convert(frame, short_side, gray)
        if index >= last:
            break
    if not found:  # e.g. the header overstated the length: count from the start
        return _decode_from_start(container, stream, wanted, short_side, gray)
    return _pad(found, wanted)


def _decode_from_start(
    container: Any, stream: Any, wanted: Sequence[int], short_side: int | None, gray: bool
) -> list[np.ndarray]:
    """Frames at the sorted indices ``wanted``, counting decoded frames from the start of the video."""
    container.seek(0)
    needed, last = set(wanted), wanted[-1]
    found: dict[int, np.ndarray] = {}
    tail = None
    for position, frame in enumerate(container.decode(stream)):
        tail = frame
        if position in needed:
            found[position] = _convert(frame, short_side, gray)
        if position >= last:
            break
    if not found:  # the video is shorter than the first wanted index: show its last frame
        if tail is None:
            raise _NoFramesError("no decodable frames")
        found[wanted[0]] = _convert(tail, short_side, gray)
    return _pad(found, wanted)


def _pad(found: dict[int, np.ndarray], wanted: Sequence[int]) -> list[np.ndarray]:
    """Frames for ``wanted``, an index that was not decoded taking the latest decoded frame before it."""
    out = []
    previous = found[min(found)]
    for index in wanted:
        previous = found.get(index, previous)
        out.append(previous)
    return out


# ---------------------------------------------------------------------------------------------- transforms
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
        top, left, height, width = RandomResizedCrop.get_params(clip, list(self.scale), list(self.ratio))
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


# ---------------------------------------------------------------------------------------------- dataset
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, RuntimeError, IndexError)
_SHARD_VIDEO_EXTENSIONS = tuple(sorted(e[1:] for e in VIDEO_EXTENSIONS))  # shard member extensions


class VideoClipDataset(Dataset):
    """Videos decoded once per sample into ``num_repeats`` independently cropped clips of the same frames.

    An unreadable file is skipped: the sample is replaced by the next readable one, a
    :class:`CorruptVideoWarning` names the file, and the file is marked bad in a shared-memory table that the
    loader workers and the main process all see (:attr:`num_skipped`).

    Args:
        entries: the videos.
        num_frames: frames per clip T.
        frame_stride: distance between sampled frames.
        transform: maps (T, C, H, W) uint8 frames to (T, C, S, S) uint8; called ``num_repeats`` times.
        num_repeats: clips per decoded video R.
        sampling: random clip start (training) or the centred one (evaluation).
        short_side: resize the frames' shorter side at decode (None keeps the decoded size).
        in_chans: 3 decodes RGB, 1 grey.
        decode_threads: FFmpeg threads per decode (0: one per core).

    Each sample is ``{"video": (R, C, T, S, S) uint8, "label": (R,) int64}``; :func:`collate_clips` flattens R.
    """

    def __init__(
        self,
        entries: Sequence[VideoEntry],
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
        if not entries:
            raise ValueError("VideoClipDataset.entries must not be empty")
        self.entries = list(entries)
        self.num_frames, self.frame_stride, self.num_repeats = num_frames, frame_stride, num_repeats
        self.transform, self.sampling, self.short_side, self.in_chans = transform, sampling, short_side, in_chans
        self.decode_threads = decode_threads
        self.bad = torch.zeros(len(self.entries), dtype=torch.bool).share_memory_()  # (N,) True = unreadable

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_skipped(self) -> int:
        """How many files were found unreadable so far (each counted once)."""
        return int(self.bad.sum())

    def skipped_paths(self) -> list[str]:
        return [self.entries[i].path for i in self.bad.nonzero().flatten().tolist()]

    def load(self, index: int) -> Tensor | None:
        """The sampled (T, C, H, W) uint8 frames of video ``index``, or None when the file cannot be decoded."""
        entry = self.entries[index]
        try:
            frames, _ = read_frames(
                entry.path,
                num_frames=self.num_frames,
                frame_stride=self.frame_stride,
                start=entry.start,
                num_video_frames=entry.num_video_frames,
                mode=self.sampling,
                short_side=self.short_side,
                gray=self.in_chans == 1,
                threads=self.decode_threads,
            )
        except _DECODE_ERRORS as err:  # av.FFmpegError subclasses OSError / ValueError
            self.bad[index] = True
            warnings.warn(f"skipping unreadable video {entry.path}: {err}", CorruptVideoWarning, stacklevel=2)
            return None
        return frames

    def __getitem__(self, index: int) -> Batch:
        n = len(self.entries)
        for offset in range(n):
            i = (index + offset) % n
            if self.bad[i]:
                continue
            frames = self.load(i)  # (T, C, H, W)
            if frames is not None:
                clips = torch.stack([self.transform(frames) for _ in range(self.num_repeats)])  # (R, T, C, S, S)
                label = torch.full((self.num_repeats,), self.entries[i].label, dtype=torch.int64)  # (R,)
                return {"video": clips.permute(0, 2, 1, 3, 4).contiguous(), "label": label}  # (R, C, T, S, S)
        raise RuntimeError(f"VideoClipDataset: none of the {n} video files can be decoded")


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


class VideoShardDataset(ShardDataset):
    """Clips decoded from the ``{key}.mp4`` (``.webm .mkv .avi .mov .m4v``) members of tar shards (``mim pack``).

    Shard order, rank / worker splitting, the shuffle buffer, the fixed epoch length, resampling and the
    corrupt-sample accounting are :class:`~mim.data.shards.ShardDataset`'s; only the decoding differs: each
    video is decoded from its in-memory bytes with PyAV into ``num_repeats`` clips exactly as
    :class:`VideoClipDataset` does for files. Frame sampling and the crops draw from torch's RNG reseeded per
    sample from the (seed, epoch, rank, worker) stream, so a sample's clips are a function of those numbers
    (the caller's global RNG is left as it was).

    Args:
        urls: shard URLs (already expanded).
        num_samples: videos this rank yields per epoch; a multiple of ``batch_size``.
        batch_size: videos per batch.
        num_frames, frame_stride, transform, num_repeats, sampling, short_side, in_chans, decode_threads: as
            for :class:`VideoClipDataset`.
        **kwargs: ``rank``, ``world_size``, ``train``, ``shuffle_buffer``, ``seed``, ``max_corrupt`` of
            :class:`~mim.data.shards.ShardDataset`.

    Each sample is ``{"video": (R, C, T, S, S) uint8, "label": (R,) int64}``; :func:`collate_clips` flattens R.
    """

    warning = CorruptVideoWarning

    def __init__(
        self,
        urls: Sequence[str],
        *,
        num_samples: int,
        batch_size: int,
        num_frames: int,
        frame_stride: int,
        transform: Callable[[Tensor], Tensor],
        num_repeats: int = 1,
        sampling: Literal["random", "center"] = "random",
        short_side: int | None = None,
        in_chans: Literal[1, 3] = 3,
        decode_threads: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(urls, num_samples=num_samples, batch_size=batch_size, **kwargs)
        self.num_frames, self.frame_stride, self.num_repeats = num_frames, frame_stride, num_repeats
        self.transform, self.sampling, self.short_side, self.in_chans = transform, sampling, short_side, in_chans
        self.decode_threads = decode_threads

    def _decode(self, url: str, key: str, fields: dict[str, bytes], slot: int, rng: random.Random) -> Batch | None:
        ext = next((e for e in _SHARD_VIDEO_EXTENSIONS if e in fields), None)
        if ext is None:
            self._skip(slot, f"sample {key} in {url}: no video member (has {sorted(fields)})")
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.getrandbits(63))
            try:
                label = int(fields["cls"].decode().strip()) if "cls" in fields else 0
                frames, _ = read_frames(
                    fields[ext],
                    num_frames=self.num_frames,
                    frame_stride=self.frame_stride,
                    mode=self.sampling,
                    short_side=self.short_side,
                    gray=self.in_chans == 1,
                    threads=self.decode_threads,
                )  # (T, C, H, W)
            except _DECODE_ERRORS as err:  # av.FFmpegError subclasses OSError / ValueError
                self._skip(slot, f"sample {key}.{ext} in {url}: {type(err).__name__}: {err}")
                return None
            clips = torch.stack([self.transform(frames) for _ in range(self.num_repeats)])  # (R, T, C, S, S)
        self.read[slot] += 1
        return {
            "video": clips.permute(0, 2, 1, 3, 4).contiguous(),  # (R, C, T, S, S)
            "label": torch.full((self.num_repeats,), label, dtype=torch.int64),  # (R,)
        }


# ---------------------------------------------------------------------------------------------- datamodule
def _check_range(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"VideoDataModule.{name} must be a pair (low, high), got {value!r}") from None
    if not (low < a <= b <= high):
        raise ValueError(f"VideoDataModule.{name} must satisfy {low} < low <= high <= {high}, got {value!r}")
    return a, b


class VideoDataModule(ShardResumeMixin, ImageDataModule):
    """Video clips from a folder, a list file or webdataset shards, as ``uint8`` batches normalised on the device.

    The loaders yield ``{"video": (B * R, C, T, S, S) uint8, "label": (B * R,) int64}`` with ``B =
    batch_size`` videos, ``R = num_repeats`` clips per video in training (1 in validation), ``T =
    num_frames`` and ``S = image_size``; :meth:`on_after_batch_transfer` turns ``video`` into float32
    ``(x / 255 - mean) / std`` on the device. ``batch_size`` counts videos: scale the learning rate by videos,
    not clips (methods/JEPA_VIDEO.md 3(d).4).

    Args:
        root: folder of clips (flat, or one subfolder per class); with ``list_file``, the folder that the list's
            relative paths are resolved against (default: the list file's folder).
        list_file: a VideoMAE (``path start_idx total_frames`` or ``path label``) or V-JEPA (``path label``) list.
        val_root: validation folder (same class names), or the base folder of ``val_list_file``.
        val_list_file: validation list file.
        urls: instead of ``root`` / ``list_file``: webdataset shards of videos (a ``mim pack`` output folder
            with index.json, brace-expanded paths or webdataset URLs). They are read like
            :class:`~mim.data.shards.ShardDataModule` reads image shards (seeded shard order split by rank and
            worker, a shuffle buffer, ``samples_per_epoch // world_size // batch_size`` batches on every rank,
            corrupt members skipped and counted up to ``max_corrupt``) and decoded from memory with PyAV.
        val_urls: validation shards (with ``urls``), same forms.
        samples_per_epoch: with ``urls``: videos per epoch over all ranks; default: the index's total.
        val_samples: with ``val_urls``: validation videos over all ranks; default: the index's total.
        shuffle_buffer: with ``urls``: videos held in each worker's shuffle buffer (1 disables it).
        max_corrupt: with ``urls``: corrupt members tolerated (an int: a count; a float in [0, 1): a fraction of
            the videos read); beyond it the loader raises :class:`~mim.data.shards.TooManyCorruptError`.
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
        num_classes: label classes; default: the folder's classes or ``max(label) + 1`` of the list.
        mean: per-channel means of the [0, 1] pixels; default ImageNet's.
        std: per-channel standard deviations; default ImageNet's.
        decode_threads: FFmpeg threads per decode; None: 1 with loader workers (they already use the cores,
            as VideoMAE's ``num_threads=1``), one per core without.
        num_workers: loader worker processes (decoding is CPU-bound: use several).
        seed: seeds the training shuffle (and, through it, the workers' sampling and augmentation).
    """

    def __init__(
        self,
        *,
        root: str | Path | None = None,
        list_file: str | Path | None = None,
        val_root: str | Path | None = None,
        val_list_file: str | Path | None = None,
        urls: str | list[str] | None = None,
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
        owner = "VideoDataModule"
        if urls is None and (val_urls is not None or samples_per_epoch is not None or val_samples is not None):
            raise ValueError(f"{owner}: val_urls, samples_per_epoch and val_samples need urls (video shards)")
        if urls is not None and any(v is not None for v in (root, list_file, val_root, val_list_file)):
            raise ValueError(f"{owner}: give either urls (video shards) or root / list_file (files), not both")
        if root is None and list_file is None and urls is None:
            raise ValueError(
                f"{owner}: give root (a folder of clips) or list_file, or urls (video shards); {_FOLDER_LAYOUT}"
            )
        check_positive_int(owner, "shuffle_buffer", shuffle_buffer)
        check_max_corrupt(owner, max_corrupt)
        for name, value in (("num_frames", num_frames), ("frame_stride", frame_stride), ("num_repeats", num_repeats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{owner}.{name} must be an int >= 1, got {value!r}")
        if decode_threads is not None and (
            isinstance(decode_threads, bool) or not isinstance(decode_threads, int) or decode_threads < 0
        ):
            raise ValueError(f"{owner}.decode_threads must be None or an int >= 0, got {decode_threads!r}")
        if in_chans not in (1, 3):
            raise ValueError(f"{owner}.in_chans must be 1 or 3, got {in_chans!r}")
        if resize_short is not None and (
            isinstance(resize_short, bool) or not isinstance(resize_short, int) or resize_short < image_size
        ):
            raise ValueError(
                f"{owner}.resize_short must be None or an int >= image_size={image_size}, got {resize_short!r}"
            )
        crop_scale = _check_range("crop_scale", crop_scale, 0.0, 1.0)
        crop_ratio = _check_range("crop_ratio", crop_ratio, 0.0, math.inf)
        train_urls: list[str] = []
        val_url_list: list[str] = []
        train_entries: list[VideoEntry] = []
        val_entries: list[VideoEntry] = []
        if urls is not None:
            spec = resolve_shards(
                owner,
                urls,
                kind="video",
                samples_per_epoch=samples_per_epoch,
                num_classes=num_classes,
                val_urls=val_urls,
                val_samples=val_samples,
            )
            train_urls, val_url_list, classes = spec.urls, spec.val_urls, spec.classes or []
            samples_per_epoch, num_classes, val_samples = spec.samples_per_epoch, spec.num_classes, spec.val_samples
        else:
            classes, train_entries = self._entries(root, list_file, None, "root", "list_file")
            if val_root is not None or val_list_file is not None:
                val_entries = self._entries(val_root, val_list_file, classes, "val_root", "val_list_file")[1]
            max_label = max(e.label for e in train_entries + val_entries)
            if num_classes is None:
                num_classes = max(len(classes), max_label + 1)
            elif isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes <= max_label:
                raise ValueError(f"{owner}.num_classes={num_classes} but the data has label {max_label}")
        stats = default_stats(in_chans, mean, std)
        super().__init__(
            batch_size=batch_size,
            image_size=image_size,
            in_chans=in_chans,
            mean=stats[0],
            std=stats[1],
            num_classes=num_classes,
            num_workers=num_workers,
            seed=seed,
        )
        self.root = None if root is None else str(root)
        self.list_file = None if list_file is None else str(list_file)
        self.num_frames, self.frame_stride, self.num_repeats = num_frames, frame_stride, num_repeats
        self.resize_short, self.augment, self.flip = resize_short, augment, flip
        self.decode_threads = decode_threads
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.classes = classes
        self.train_entries, self.val_entries = train_entries, val_entries
        self.urls, self.val_urls = train_urls, val_url_list
        self.samples_per_epoch, self.val_samples = samples_per_epoch, val_samples
        self.shuffle_buffer, self.max_corrupt = shuffle_buffer, max_corrupt

    @staticmethod
    def _entries(
        root: str | Path | None,
        list_file: str | Path | None,
        classes: Sequence[str] | None,
        root_field: str,
        list_field: str,
    ) -> tuple[list[str], list[VideoEntry]]:
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

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """(C, T, S, S): the shape of one clip."""
        return (self.in_chans, self.num_frames, self.image_size, self.image_size)

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        in_chans: Literal[1, 3] = 1 if self.in_chans == 1 else 3
        center = ClipCenterCrop(self.image_size)
        if self.augment:
            train_tf: Callable[[Tensor], Tensor] = ClipRandomResizedCrop(
                self.image_size, scale=self.crop_scale, ratio=self.crop_ratio, flip=self.flip
            )
        else:
            train_tf = center
        common: dict[str, Any] = {
            "num_frames": self.num_frames,
            "frame_stride": self.frame_stride,
            "in_chans": in_chans,
            "decode_threads": self.decode_threads
            if self.decode_threads is not None
            else (1 if self.num_workers > 0 else 0),
        }
        train_kw: dict[str, Any] = {
            "transform": train_tf,
            "num_repeats": self.num_repeats,
            "sampling": "random",
            "short_side": self.resize_short if (self.augment or self.resize_short) else self.image_size,
        }
        val_kw: dict[str, Any] = {
            "transform": center,
            "sampling": "center",
            "short_side": self.resize_short or self.image_size,
        }
        if self.urls:
            return self._build_shard_datasets(common, train_kw, val_kw)
        train = VideoClipDataset(self.train_entries, **train_kw, **common)
        val = None
        if self.val_entries:
            val = VideoClipDataset(self.val_entries, **val_kw, **common)
        return train, val

    def _build_shard_datasets(
        self, common: dict[str, Any], train_kw: dict[str, Any], val_kw: dict[str, Any]
    ) -> tuple[VideoShardDataset, VideoShardDataset | None]:
        rank, world = rank_and_world(self)
        shard_kw: dict[str, Any] = {
            **common,
            "batch_size": self.batch_size,
            "rank": rank,
            "world_size": world,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
            "max_corrupt": self.max_corrupt,
        }
        assert self.samples_per_epoch is not None
        train_samples = per_rank_samples(
            "VideoDataModule", self.samples_per_epoch, world, self.batch_size, "samples_per_epoch"
        )
        train = VideoShardDataset(self.urls, num_samples=train_samples, train=True, **train_kw, **shard_kw)
        val = None
        if self.val_urls and self.val_samples is not None:
            val_samples = per_rank_samples("VideoDataModule", self.val_samples, world, self.batch_size, "val_samples")
            val = VideoShardDataset(self.val_urls, num_samples=val_samples, train=False, **val_kw, **shard_kw)
        return train, val

    def train_dataloader(self) -> DataLoader:
        if not self.urls:
            return super().train_dataloader()
        self.setup("fit")
        assert isinstance(self.train_dataset, VideoShardDataset)
        self._apply_resume()  # exact mid-epoch resume from shards (files use the epoch-seeded sampler)
        return epoch_loader(self.train_dataset, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        if not self.urls:
            return super().val_dataloader()
        self.setup("validate")
        if not isinstance(self.val_dataset, VideoShardDataset):
            return []
        return epoch_loader(self.val_dataset, **self._loader_kwargs())

    def _loader_kwargs(self) -> dict[str, Any]:
        return {**super()._loader_kwargs(), "collate_fn": collate_clips}

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Normalise ``batch["video"]`` on the device: (B, C, T, H, W) uint8 -> (B, C, T, H, W) float32."""
        batch["video"] = normalize_video(batch["video"], self.mean, self.std)
        return batch

    def _datasets(self) -> list[VideoClipDataset]:
        return [d for d in (self.train_dataset, self.val_dataset) if isinstance(d, VideoClipDataset)]

    @property
    def num_corrupt(self) -> int:
        """With ``urls``: corrupt shard members and unreadable shards skipped so far (training and validation)."""
        return sum(d.num_corrupt for d in (self.train_dataset, self.val_dataset) if isinstance(d, VideoShardDataset))

    @property
    def num_skipped(self) -> int:
        """Unreadable files skipped so far (each file counted once), plus :attr:`num_corrupt` with ``urls``."""
        return sum(d.num_skipped for d in self._datasets()) + self.num_corrupt

    def skipped_paths(self) -> list[str]:
        """Paths of the unreadable files skipped so far."""
        return [path for d in self._datasets() for path in d.skipped_paths()]

    def teardown(self, stage: str) -> None:
        if self.num_corrupt:
            rank_zero_warn(
                f"VideoDataModule skipped {self.num_corrupt} corrupt shard members or shards (see the warnings above)",
                category=CorruptVideoWarning,
            )
        elif self.num_skipped:
            paths = self.skipped_paths()
            rank_zero_warn(
                f"VideoDataModule skipped {len(paths)} unreadable video files: "
                f"{paths[:10]}{' ...' if len(paths) > 10 else ''}",
                category=CorruptVideoWarning,
            )
