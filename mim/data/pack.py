"""``mim pack SRC OUT/``: pack an image or video folder, or a list file, into webdataset tar shards.

Output::

    OUT/shard-000000.tar       members {key}.jpg (JPEG bytes) or {key}.mp4 (.webm .mkv .avi .mov .m4v: the
                               video's original bytes), and {key}.cls (the label as ASCII digits)
    OUT/shard-000000.tar.done  sidecar: the shard's sample range, count, byte size and sha256 (JSON)
    OUT/index.json             per-shard counts and sha256, the class map, totals and the pack arguments

Inputs are a class-per-subfolder image or video folder, or a text file of ``path label`` / ``path`` lines. The
sample order is sorted by path, then shuffled with ``--seed``, so the shard contents are a pure function of the
inputs and the arguments. Unreadable inputs are skipped with a warning and listed in the index. Resumable: shards
and sidecars are written atomically, and a rerun keeps every complete leading shard. Video inputs, re-encoding
and the resume rule: docs/design.md, "Shards".
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mim.checks import check_int
from mim.data.decode import convert_image
from mim.data.folder import CorruptImageWarning, scan_image_folder

__all__ = [
    "encode_image",
    "main",
    "pack",
    "parse_size",
    "read_sources",
    "read_video",
    "source_kind",
    "write_json_atomic",
]

INDEX_NAME = "index.json"
FORMAT = "mim-shards-v1"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")  # = mim.data.video_io.VIDEO_EXTENSIONS


def _is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_SUFFIXES


def _has_video(folder: Path) -> bool:
    for _, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") and _is_video(f) for f in filenames):
            return True
    return False


def source_kind(src: str | Path, samples: Sequence[tuple[str, int]]) -> str:
    """``"video"`` when the inputs are videos (by suffix), else ``"image"``.

    Raises:
        ValueError: a list file mixes videos with other files.
    """
    videos = sum(_is_video(path) for path, _ in samples)
    if videos and videos != len(samples):
        other = next(path for path, _ in samples if not _is_video(path))
        raise ValueError(
            f"pack.src: {str(src)!r} mixes videos ({', '.join(VIDEO_SUFFIXES)}) with other files ({other})"
        )
    return "video" if videos else "image"


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string such as ``'1GB'``, ``'500MB'``, ``'64KB'``, ``'4096'`` (binary units).

    Raises:
        ValueError: naming ``shard_size`` when the value cannot be parsed or is not positive.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError(f"pack.shard_size must look like '1GB', '500MB', '64KB' or a byte count, got {value!r}")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1:
        raise ValueError(f"pack.shard_size must be >= 1 byte, got {value!r}")
    return size


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through ``path.tmp`` + fsync + ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_sources(src: str | Path) -> tuple[list[str] | None, list[tuple[str, int]]]:
    """The (classes, samples) of an image folder or a list file, samples sorted by path.

    Args:
        src: a class-per-subfolder image folder, a video folder (flat or class-per-subfolder; chosen when the
            folder holds any video file), or a text file of ``path label`` or ``path`` lines (label 0).

    Returns:
        ``(classes, samples)``: class names (None for a list file) and the (path, label) pairs.
    """
    src = Path(src)
    if src.is_dir():
        if _has_video(src):  # a video folder: flat (one class) or one subfolder per class
            from mim.data.video_io import scan_video_folder

            video_classes, entries = scan_video_folder(src, field="src")
            return video_classes, sorted((e.path, e.label) for e in entries)
        classes, samples = scan_image_folder(src, field="src")
        return classes, samples
    if not src.is_file():
        raise FileNotFoundError(f"pack.src: {str(src)!r} is neither an image folder nor a list file")
    samples = []
    for number, line in enumerate(src.read_text().splitlines(), 1):
        parts = line.strip().rsplit(maxsplit=1)
        if not parts or line.lstrip().startswith("#"):
            continue
        if len(parts) == 2 and re.fullmatch(r"-?\d+", parts[1]):
            path, label = parts[0], int(parts[1])
        else:
            path, label = line.strip(), 0
        if label < 0:
            raise ValueError(f"pack.src: {src}:{number}: negative label {label}")
        samples.append((str(src.parent / path) if not os.path.isabs(path) else path, label))
    if not samples:
        raise ValueError(f"pack.src: the list file {str(src)!r} names no images ('path label' per line)")
    return None, sorted(samples)


def encode_image(path: str, resize_short: int | None, quality: int) -> bytes | None:
    """JPEG bytes for one input: the original bytes of a JPEG when no resize is needed, else re-encoded RGB.

    16-bit grey images are scaled to 8 bits (``round(v * 255 / 65535)``, :func:`mim.data.decode.convert_image`),
    not clipped to white as PIL's ``convert`` would.

    Returns:
        The bytes, or None when the file cannot be read or decoded (the caller warns and skips it).
    """
    return _encode_image(path, resize_short, quality)[0]


def _encode_image(path: str, resize_short: int | None, quality: int) -> tuple[bytes | None, str]:
    """(JPEG bytes, "") as :func:`encode_image`, or (None, why the file was not readable)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as image:
            short = min(image.size)
            needs_resize = resize_short is not None and short > resize_short
            if image.format == "JPEG" and image.mode in ("RGB", "L") and not needs_resize:
                image.verify()  # catches many corrupt files without a full decode
                return data, ""
            if needs_resize:
                assert resize_short is not None
                image.draft("RGB", (resize_short, resize_short))  # DCT scaling for JPEGs, >= the target
            rgb = convert_image(image, "RGB", name=path)  # scales 16-bit images to 8 bits
        if needs_resize:
            assert resize_short is not None
            w, h = rgb.size
            factor = resize_short / min(w, h)
            rgb = rgb.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=quality)
        return out.getvalue(), ""
    except _DECODE_ERRORS as err:
        return None, f"{type(err).__name__}: {err}"


def read_video(path: str) -> bytes | None:
    """The original bytes of a video, or None when it cannot be read or PyAV finds no video stream in it.

    Only the container header is parsed (nothing is decoded); without PyAV the bytes are kept unchecked.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        import av
    except ImportError:  # pragma: no cover - PyAV is an optional dependency
        return data if data else None
    try:
        with av.open(io.BytesIO(data)) as container:
            return data if container.streams.video else None
    except (OSError, ValueError, EOFError, RuntimeError, IndexError):  # av.FFmpegError subclasses OSError / ValueError
        return None


def _encode_task(task: tuple[int, str, int | None, int, str]) -> tuple[int, bytes | None, str]:
    """(index, bytes or None, why not) of one input."""
    index, path, resize_short, quality, kind = task
    if kind == "video":
        data = read_video(path)
        return index, data, "" if data is not None else "not a readable video"
    return (index, *_encode_image(path, resize_short, quality))


def _tar_bytes(payload: int) -> int:
    return 512 + (payload + 511) // 512 * 512  # header + data padded to blocks


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: identical bytes on every run
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def _complete_shards(out: Path, fingerprint: str) -> list[dict[str, Any]]:
    """The leading shards whose sidecar matches ``fingerprint`` and whose file matches its sha256."""
    done: list[dict[str, Any]] = []
    while True:
        name = _shard_name(len(done))
        sidecar, shard = out / (name + ".done"), out / name
        try:
            record = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return done
        start = done[-1]["end"] if done else 0
        if (
            record.get("fingerprint") != fingerprint
            or record.get("start") != start
            or not shard.is_file()
            or _sha256(shard) != record.get("sha256")
        ):
            return done
        done.append(record)


def pack(
    src: str | Path,
    out: str | Path,
    *,
    shard_size: str | int = "1GB",
    shard_samples: int | None = None,
    resize_short: int | None = None,
    quality: int = 90,
    workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    progress: bool = True,
    after_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Pack ``src`` into tar shards under ``out`` and write ``out/index.json``; resumes an interrupted pack.

    Args:
        src: a class-per-subfolder image folder, a video folder (flat or class-per-subfolder) or a list file
            of ``path label`` lines (images, or videos by their suffix).
        out: output folder (created).
        shard_size: maximum bytes per shard (a single larger sample still gets its own shard).
        shard_samples: maximum samples per shard; None: no limit.
        resize_short: downscale images whose shorter side exceeds this and re-encode them; None: keep sizes
            (must be None for videos).
        quality: JPEG quality of re-encoded images (1-100).
        workers: encoding processes (0 encodes in this process).
        seed: seeds the shuffle of the sample order.
        shuffle: shuffle the (path-sorted) samples before packing, so shards mix classes.
        progress: show a tqdm progress bar.
        after_shard: called with each shard number once the shard is complete (tests inject failures here).

    Returns:
        The index (also written to ``out/index.json``).
    """
    size_limit = parse_size(shard_size)
    if shard_samples is not None:
        check_int("pack", "shard_samples", shard_samples)
    if resize_short is not None:
        check_int("pack", "resize_short", resize_short)
    check_int("pack", "quality", quality, minimum=1, maximum=100)
    check_int("pack", "workers", workers, minimum=0)
    classes, samples = read_sources(src)
    kind = source_kind(src, samples)
    if kind == "video" and resize_short is not None:
        raise ValueError("pack.resize_short applies to images; videos are stored as their original bytes")
    if shuffle:
        random.Random(seed).shuffle(samples)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = {
        "src": str(src),
        "shard_size": size_limit,
        "shard_samples": shard_samples,
        "resize_short": resize_short,
        "quality": quality,
        "seed": seed,
        "shuffle": shuffle,
    }
    listing = hashlib.sha256(json.dumps([args, samples]).encode()).hexdigest()  # inputs + arguments
    shards = _complete_shards(out, listing)
    start = shards[-1]["end"] if shards else 0
    tasks = [(i, path, resize_short, quality, kind) for i, (path, _) in enumerate(samples[start:], start)]
    unit = "video" if kind == "video" else "img"
    bar = tqdm(total=len(samples), initial=start, unit=unit, desc=f"mim pack -> {out}", disable=not progress)
    state: dict[str, Any] = {"tar": None, "bytes": 0, "count": 0, "start": start, "skipped": []}

    def close_shard(end: int) -> None:
        tar = state["tar"]
        number = len(shards)
        name = _shard_name(number)
        tar.close()
        tmp = out / (name + ".tmp")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out / name)
        record = {
            "name": name,
            "samples": state["count"],
            "bytes": (out / name).stat().st_size,
            "sha256": _sha256(out / name),
            "start": state["start"],
            "end": end,
            "skipped": state["skipped"],
            "fingerprint": listing,
        }
        write_json_atomic(out / (name + ".done"), record)
        shards.append(record)
        state.update(tar=None, bytes=0, count=0, start=end, skipped=[])
        if after_shard is not None:
            after_shard(number)

    results: Iterator[tuple[int, bytes | None, str]]
    pool = get_context("spawn").Pool(workers) if workers > 0 and tasks else None
    try:
        results = pool.imap(_encode_task, tasks, chunksize=16) if pool is not None else map(_encode_task, tasks)
        for index, data, why in results:
            path, label = samples[index]
            bar.update(1)
            if data is None:
                warnings.warn(f"mim pack: skipping unreadable {unit} {path} ({why})", CorruptImageWarning, stacklevel=2)
                state["skipped"].append(path)
                continue
            key = f"{index:09d}"
            cls = str(label).encode()
            added = _tar_bytes(len(data)) + _tar_bytes(len(cls))
            if state["tar"] is not None and (
                state["bytes"] + added > size_limit or (shard_samples is not None and state["count"] >= shard_samples)
            ):
                close_shard(index)
            if state["tar"] is None:
                state["tar"] = tarfile.open(out / (_shard_name(len(shards)) + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
            ext = os.path.splitext(path)[1][1:].lower() if kind == "video" else "jpg"
            _add_member(state["tar"], f"{key}.{ext}", data)
            _add_member(state["tar"], f"{key}.cls", cls)
            state["bytes"] += added
            state["count"] += 1
        if state["tar"] is not None:
            close_shard(len(samples))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        if state["tar"] is not None:  # interrupted: drop the partial shard, never rename it
            state["tar"].close()
            (out / (_shard_name(len(shards)) + ".tmp")).unlink(missing_ok=True)
    if shards and state["skipped"]:  # trailing unreadable inputs after the last shard
        shards[-1]["skipped"] = shards[-1]["skipped"] + state["skipped"]
    for stale in sorted(out.glob("shard-*.tar*")):  # shards of an earlier, larger pack of other inputs
        number = int(stale.name[6:12]) if stale.name[6:12].isdigit() else -1
        if number >= len(shards):
            stale.unlink()
    skipped = [path for record in shards for path in record["skipped"]]
    labels = sorted({label for _, label in samples})
    index_data = {
        "format": FORMAT,
        "kind": kind,
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256", "start", "end")} for r in shards],
        "num_samples": sum(r["samples"] for r in shards),
        "num_shards": len(shards),
        "classes": classes if classes is not None else [str(label) for label in labels],
        "num_classes": len(classes) if classes is not None else (max(labels) + 1 if labels else 0),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "args": args,
    }
    write_json_atomic(out / INDEX_NAME, index_data)
    return index_data


def main(argv: Sequence[str] | None = None) -> int:
    """``mim pack SRC OUT/ [--shard-size 1GB] [--shard-samples N] [--resize-short 256] [--quality 90] ...``."""
    parser = argparse.ArgumentParser(prog="mim pack", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "src",
        help="image or video folder (one subfolder per class; videos also flat) or list file ('path label' lines)",
    )
    parser.add_argument("out", help="output folder for shard-NNNNNN.tar and index.json")
    parser.add_argument("--shard-size", default="1GB", help="max bytes per shard: 1GB, 500MB, 64KB or bytes")
    parser.add_argument("--shard-samples", type=int, default=None, help="max samples per shard")
    parser.add_argument("--resize-short", type=int, default=None, help="downscale so the shorter side is this")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--workers", type=int, default=0, help="encoding processes (0: this process)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the path-sorted order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = parser.parse_args(list(argv) if argv is not None else None)
    try:
        index = pack(
            a.src,
            a.out,
            shard_size=a.shard_size,
            shard_samples=a.shard_samples,
            resize_short=a.resize_short,
            quality=a.quality,
            workers=a.workers,
            seed=a.seed,
            shuffle=not a.no_shuffle,
            progress=not a.no_progress,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(
        f"packed {index['num_samples']} samples into {index['num_shards']} shards under {a.out} "
        f"({index['num_skipped']} unreadable inputs skipped)"
    )
    return 0
