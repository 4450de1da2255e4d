"""Video files: the index (folders, VideoMAE / V-JEPA list files) and PyAV decoding of sampled frames.

Inputs: a folder of clips (``.mp4 .webm .mkv .avi .mov .m4v``), flat (``ROOT/<clip>.mp4``, all label 0) or one
subfolder per class (``ROOT/<class>/<clip>.mp4``, any depth below the class folder); or a list file, one clip per
line, relative paths resolved against ``root`` (default: the list file's folder):

- VideoMAE / VideoMAE V2 pre-training lists ``path start_idx total_frames`` (label 0; ``total_frames = -1``
  means the whole video, otherwise frames ``[start_idx, start_idx + total_frames)``);
- VideoMAE fine-tuning lists and V-JEPA's space-separated CSVs ``path label``;
- bare ``path`` lines (label 0). Blank lines and lines starting with ``#`` are ignored.

Sampling (as VideoMAE's and V-JEPA's loaders, MCG-NJU/VideoMAE and facebookresearch/jepa): ``num_frames`` frames
``frame_stride`` apart from a start drawn uniformly over the valid starts; a video shorter than the clip span repeats
its last frame. :func:`read_frames`
seeks to the clip's first frame of a file or of in-memory bytes (a shard member). PyAV is an optional
dependency (``pip install mim[video]``), imported when a video is first opened.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mim.data.base import class_index

__all__ = [
    "DECODE_ERRORS",
    "VIDEO_EXTENSIONS",
    "VideoEntry",
    "read_frames",
    "read_video_list",
    "sample_frame_indices",
    "scan_video_folder",
]

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"})
_FOLDER_LAYOUT = "expected ROOT/<clip>.mp4 (one class) or ROOT/<class>/<clip>.mp4 (.mp4/.webm/.mkv/.avi/.mov/.m4v)"
_LIST_LAYOUT = "expected one clip per line: 'path start_idx total_frames' (VideoMAE), or 'path label' (V-JEPA CSV)"
# What read_frames raises for an unreadable video (av.FFmpegError subclasses OSError / ValueError).
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, RuntimeError, IndexError)


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
    classes, index = class_index("VideoDataModule", field, root, subdirs, classes, reference="training data")
    entries = [VideoEntry(p, index[d]) for d in subdirs for p in _video_files(root / d)]
    return list(classes), entries


# ---------------------------------------------------------------------------------------------- decoding
def sample_frame_indices(
    num_video_frames: int, num_frames: int, frame_stride: int, *, mode: Literal["random", "center"] = "random"
) -> list[int]:
    """Frame indices of one clip: ``num_frames`` frames ``frame_stride`` apart.

    The start is uniform over the valid starts ``0 .. num_video_frames - span`` (``span = (num_frames - 1) *
    frame_stride + 1``) with torch's global generator (the datasets seed it per sample:
    :func:`mim.data.base.seeded_draws`), or the middle one for ``mode="center"``. A video shorter than
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
