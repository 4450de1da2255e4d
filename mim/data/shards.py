"""Webdataset tar shards (``mim pack`` output) as uint8 image batches with a fixed epoch length per rank.

Shards hold ``{key}.jpg`` (any PIL-readable bytes) and ``{key}.cls`` (label digits) members. ``urls`` is a
folder written by ``mim pack`` (its ``index.json`` lists the shards, the sample total and the class map),
brace-expanded paths (``/data/shard-{000000..000127}.tar``) or webdataset URLs (``pipe:cat ...``,
``file:...``), opened with :func:`webdataset.gopen`.

Shards are split by rank, then by loader worker, in an order seeded from (seed, epoch), so no sample is read twice
in a pass; every rank yields exactly ``samples_per_epoch // world_size // batch_size`` full batches (a worker that
runs out of shards starts another seeded pass), so ranks never disagree on the number of steps. Corrupt input is
skipped with a :class:`~mim.data.folder.CorruptImageWarning`, counted (:attr:`ShardDataModule.num_corrupt`) and
raises beyond ``max_corrupt``. Order, splitting, resampling and what counts as corrupt: docs/design.md, "Shards".

A bad member (or unreadable shard) is counted once, however often it is read again (every epoch, every resampling
pass, by any worker): readers record a fingerprint of its URL and key in a shared-memory table and the count is the
number of distinct fingerprints (:meth:`ShardDataset.bad_fingerprints`). Local shard paths that do not exist
(a missing folder, a brace pattern that matches no file, an empty folder) fail at construction with a
``FileNotFoundError`` naming the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from mim.checks import check_choice, check_int, invalid
from mim.data.base import ImageDataModule, check_crops, silence_unresumable_loader_warning, training_position
from mim.data.decode import SmallImageCheck, decode_center_crop, decode_random_resized_crop, image_size_of
from mim.data.folder import CorruptImageWarning
from mim.data.transforms import seeded_rand_augment
from mim.types import Batch

__all__ = [
    "ShardDataModule",
    "ShardDataset",
    "TooManyCorruptError",
    "check_max_corrupt",
    "epoch_loader",
    "ShardLoadersMixin",
    "ShardResumeMixin",
    "ShardSpec",
    "expand_shard_urls",
    "fingerprint",
    "resolve_shards",
    "per_rank_samples",
    "rank_and_world",
    "read_shard",
    "seed_of",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
_MAX_READERS = 256  # counter slots: main process + up to 255 loader workers
_BAD_PER_READER = 512  # fingerprints of bad samples each reader remembers (beyond: counted, not deduplicated)
_MIN_FOR_FRACTION = 100  # a fractional max_corrupt is enforced once this many samples were read
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_AUGMENT = 0x4155_4753  # seed tag of the per-sample augmentation generators


class TooManyCorruptError(RuntimeError):
    """More corrupt samples than ``max_corrupt`` allows."""


def seed_of(*parts: int) -> int:
    """A 64-bit seed mixed from integers (seed, epoch, rank, worker, ...) with numpy's SeedSequence."""
    state = np.random.SeedSequence([p % (1 << 64) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def fingerprint(name: str) -> int:
    """A nonzero signed 64-bit fingerprint of a string (blake2b), the key of the bad-sample table."""
    value = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little", signed=True)
    return value or 1


def expand_shard_urls(
    urls: str | Sequence[str], *, owner: str = "ShardDataModule", field: str = "urls"
) -> tuple[list[str], dict[str, Any] | None]:
    """Shard URLs and the ``index.json`` contents (None without one).

    Args:
        urls: a ``mim pack`` output folder, or one or more brace patterns / URLs (``a-{000..009}.tar``,
            ``pipe:cat x.tar``, ``file:x.tar``); several patterns may also be joined with ``::``.
        owner: the datamodule, for messages.
        field: the argument ``urls`` came from, for messages.

    Raises:
        FileNotFoundError: a folder without index.json (empty or not), a path that does not exist, or local
            shard paths none of which exists (a missing folder, a brace pattern that matches no file).
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if len(patterns) == 1 and os.path.isdir(patterns[0]):
        index_path = Path(patterns[0]) / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(_folder_without_index(owner, field, patterns[0]))
        index = json.loads(index_path.read_text())
        return [str(index_path.parent / s["name"]) for s in index["shards"]], index
    expanded = [u for p in patterns for u in wds.shardlists.expand_urls(p)]
    _check_local_shards(owner, field, urls, expanded)
    return expanded, None


def _folder_without_index(owner: str, field: str, folder: str) -> str:
    """The message for a shard folder without ``index.json``: empty, or holding tar files without an index."""
    tars = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.endswith(".tar"))
    if not tars:
        what = "is empty" if not any(True for _ in os.scandir(folder)) else "holds no index.json and no .tar shards"
        return (
            f"{owner}.{field} must be a folder written by `mim pack` (with index.json) or shard paths, got {folder!r}, "
            f"which {what}; write shards into it with `mim pack SRC {folder}` or check the path"
        )
    return (
        f"{owner}.{field} must be a folder written by `mim pack` (with index.json) or shard paths, got {folder!r}, "
        f"which holds {len(tars)} .tar files ({tars[0]} ... {tars[-1]}) but no index.json; pass them as a brace "
        f"pattern such as '{folder}/shard-{{000000..{len(tars) - 1:06d}}}.tar' with samples_per_epoch and "
        "num_classes, or repack with `mim pack`"
    )


def _local_path(url: str) -> str | None:
    """The file path of a local shard URL (a plain path or ``file:``), None for piped or remote ones."""
    if url.startswith("file:"):
        return urlparse(url).path or url[len("file:") :]
    if url == "-" or url.startswith("pipe:") or "://" in url:
        return None
    return url


def _check_local_shards(owner: str, field: str, urls: str | Sequence[str], expanded: Sequence[str]) -> None:
    """Raise ``FileNotFoundError`` when ``expanded`` are all local paths and none of them exists.

    Some missing shards among existing ones are left to the readers (skipped and counted as corrupt).
    """
    paths = [_local_path(u) for u in expanded]
    if not paths or any(p is None for p in paths) or any(os.path.exists(p) for p in paths if p is not None):
        return
    folders = sorted({os.path.dirname(p) or "." for p in paths if p is not None})
    absent = [f for f in folders if not os.path.isdir(f)]
    shown = urls if isinstance(urls, str) else list(urls)
    if len(paths) == 1:
        where = f"{paths[0]!r} does not exist"
    elif absent:
        where = f"the folder {absent[0]!r} does not exist"
    else:
        where = f"none of its {len(paths)} files exists (e.g. {paths[0]!r}; list {folders[0]!r} for the shard names)"
    raise FileNotFoundError(
        f"{owner}.{field} must name existing shards, got {shown!r}: {where}; check the path, or write shards "
        "with `mim pack SRC OUT/` and pass OUT/"
    )


@dataclass
class ShardSpec:
    """Resolved shard inputs of a datamodule (see :func:`resolve_shards`)."""

    urls: list[str]
    samples_per_epoch: int
    num_classes: int
    classes: list[str] | None
    val_urls: list[str]
    val_samples: int | None


def resolve_shards(
    owner: str,
    urls: str | Sequence[str],
    *,
    kind: Literal["image", "video"],
    samples_per_epoch: int | None = None,
    num_classes: int | None = None,
    val_urls: str | Sequence[str] | None = None,
    val_samples: int | None = None,
) -> ShardSpec:
    """Expand shard URLs and fill sample counts and classes from ``index.json`` where not given.

    Args:
        owner: the datamodule's name, for error messages.
        urls: training shards (a ``mim pack`` folder, brace patterns or URLs).
        kind: what the shards must hold (an index without ``kind`` holds images).
        samples_per_epoch: training samples per epoch; required without an index.
        num_classes: classes; required without an index.
        val_urls: validation shards, or None.
        val_samples: validation samples; required for ``val_urls`` without an index.

    Returns:
        The resolved :class:`ShardSpec`.
    """
    train_urls, index = expand_shard_urls(urls, owner=owner, field="urls")
    if not train_urls:
        raise ValueError(f"{owner}.urls: {urls!r} names no shards")
    if index is not None and index.get("kind", "image") != kind:
        raise ValueError(f"{owner}.urls: {urls!r} holds {index.get('kind', 'image')} shards, not {kind} shards")
    if samples_per_epoch is None:
        samples_per_epoch = _from_index(owner, "samples_per_epoch", index, "num_samples", f"urls ({urls!r})")
    check_int(owner, "samples_per_epoch", samples_per_epoch)
    if num_classes is None:
        num_classes = max(1, _from_index(owner, "num_classes", index, "num_classes", f"urls ({urls!r})"))
    val_list: list[str] = []
    if val_urls is not None:
        val_list, val_index = expand_shard_urls(val_urls, owner=owner, field="val_urls")
        if not val_list:
            raise ValueError(f"{owner}.val_urls: {val_urls!r} names no shards")
        if val_samples is None:
            val_samples = _from_index(owner, "val_samples", val_index, "num_samples", "val_urls")
        check_int(owner, "val_samples", val_samples)
    classes = list(index["classes"]) if index is not None and "classes" in index else None
    return ShardSpec(train_urls, samples_per_epoch, num_classes, classes, val_list, val_samples)


def _from_index(owner: str, field: str, index: dict[str, Any] | None, key: str, source: str) -> int:
    """``index[key]`` for ``field`` left unset; ``ValueError`` when ``source`` has no index.json to take it from."""
    if index is None:
        raise ValueError(f"{owner}.{field} is required when {source} has no index.json")
    return int(index[key])


def _split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``) (webdataset's key convention)."""
    directory, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return os.path.join(directory, key), ext.lower()


def read_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) samples of one tar shard, in file order.

    Raises:
        OSError, tarfile.TarError, EOFError: the shard cannot be opened or is corrupt (after the samples
            read so far were yielded).
    """
    stream = wds.gopen(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            key: str | None = None
            fields: dict[str, bytes] = {}
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_name(member.name)
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if member_key != key:
                    if key is not None:
                        yield key, fields
                    key, fields = member_key, {}
                fields[ext] = data
            if key is not None:
                yield key, fields
    finally:
        stream.close()


class _EpochSampler(Sampler[None]):
    """The sampler slot of an iterable-dataset DataLoader (yields None forever), used to receive
    Lightning's ``set_epoch``."""

    def __init__(self, epoch: Tensor) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[None]:
        while True:
            yield None

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)


class ShardDataset(IterableDataset):
    """Samples of tar shards for one rank: ``{"image": (C, S, S) uint8, "label": () int64}``.

    Args:
        urls: shard URLs (already expanded).
        num_samples: samples this rank yields per epoch (the loader's length); a multiple of ``batch_size``.
        batch_size: the loader's batch size (each worker yields whole batches).
        rank: this process's rank.
        world_size: number of ranks.
        image_size: side S of the square output.
        mode: "RGB" or "L".
        train: MAE augmentation, a seeded shard order and a shuffle buffer; False: centre crop, file order.
        crop_scale: area range of the training random resized crop.
        eval_crop_pct: centre-crop fraction of the evaluation transform.
        shuffle_buffer: samples held in the shuffle buffer (training).
        seed: base seed.
        max_corrupt: an int is the most corrupt samples allowed in total; a float in [0, 1) the most as a
            fraction of the samples read (checked once 100 were read).

    Subclasses decode other members by overriding :meth:`_decode` (e.g. :class:`mim.data.video_shards.VideoShardDataset`);
    ``warning`` is the category of the skip warnings.
    """

    warning: type[Warning] = CorruptImageWarning

    def __init__(
        self,
        urls: Sequence[str],
        *,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        image_size: int = 224,
        mode: Literal["RGB", "L"] = "RGB",
        train: bool = True,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        eval_crop_pct: float = 1.0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_corrupt: int | float = 0.01,
        rand_augment: int | None = None,
    ) -> None:
        if not urls:
            raise ValueError("ShardDataset.urls must name at least one shard")
        if num_samples < batch_size or num_samples % batch_size:
            raise ValueError(f"ShardDataset.num_samples={num_samples} must be a multiple of batch_size={batch_size}")
        check_int("ShardDataset", "rank", rank, minimum=0, maximum=world_size - 1)
        self.urls = list(urls)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.image_size, self.mode, self.train = image_size, mode, train
        self.crop_scale, self.eval_crop_pct = crop_scale, eval_crop_pct
        self.shuffle_buffer, self.seed, self.max_corrupt = shuffle_buffer, seed, max_corrupt
        self.rand_augment = rand_augment
        self.epoch = torch.zeros(1, dtype=torch.int64).share_memory_()  # set through the loader's sampler
        # Bad samples and shards found by each reader slot (first seen by it; a row's first _BAD_PER_READER also
        # have their fingerprints in `bad`, 0 = empty), so a sample read again in a later epoch is counted once.
        self.corrupt = torch.zeros(_MAX_READERS, dtype=torch.int64).share_memory_()  # (R,) per reader slot
        self.bad = torch.zeros(_MAX_READERS, _BAD_PER_READER, dtype=torch.int64).share_memory_()  # (R, F)
        self.small_images = SmallImageCheck("ShardDataset", image_size)
        self.read = torch.zeros(_MAX_READERS, dtype=torch.int64).share_memory_()  # samples read, per slot
        # (epoch, batches already consumed in it) of a resumed run; epoch -1: none
        self.resume = torch.tensor([-1, 0], dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_corrupt(self) -> int:
        """Corrupt samples and shards skipped so far, over all readers, each counted once however often it was read."""
        fingerprints, overflow = self.bad_fingerprints()
        return int(fingerprints.numel()) + overflow

    def bad_fingerprints(self) -> tuple[Tensor, int]:
        """(distinct fingerprints of the bad samples and shards recorded so far (F,) int64, count not recorded).

        Each reader slot records up to 512 fingerprints; further bad samples of a slot are counted without
        deduplication (the second value).
        """
        recorded = self.bad[self.bad != 0]  # (F',) int64, over all readers
        overflow = int((self.corrupt - _BAD_PER_READER).clamp_(min=0).sum())
        return torch.unique(recorded), overflow

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """Make the next pass over ``epoch`` leave out its first ``batches_done`` batches (read, not decoded).

        The loader then yields the remaining batches of that epoch exactly as an uninterrupted pass would;
        other epochs are whole. Also sets the epoch to the one a resumed run continues with. ``batches_done`` at or beyond the epoch's length (an epoch-end checkpoint)
        skips nothing: the next epoch starts from its beginning. Loader worker ``w`` of the resumed pass
        produces the stream of worker ``(w + batches_done) % W``, so the round robin continues in order.
        """
        if epoch < 0 or batches_done < 0:
            raise ValueError(f"ShardDataset.resume_from: epoch={epoch} and batches_done={batches_done} must be >= 0")
        self.resume[0], self.resume[1] = epoch, batches_done
        # Lightning creates the resumed loader's iterator (starting its workers, which read the epoch at once)
        # before it calls set_epoch, so the epoch the run continues with is set here already.
        self.set_epoch(epoch if batches_done < self.num_samples // self.batch_size else epoch + 1)

    def _resumed(self, epoch: int) -> int:
        """Batches of ``epoch`` a resumed run already consumed (0 unless it resumes inside ``epoch``)."""
        done = int(self.resume[1]) if int(self.resume[0]) == epoch else 0
        return done if done < self.num_samples // self.batch_size else 0  # an ended epoch: nothing to skip

    def _skip(self, slot: int, message: str, name: str) -> None:
        """Skip a bad sample or shard: warn and count it the first time ``name`` (its URL and key) is met.

        Raises:
            TooManyCorruptError: the count exceeds ``max_corrupt``.
        """
        code = fingerprint(name)
        if bool((self.bad == code).any()):  # met before (an earlier epoch or pass, or another worker)
            return
        position = int(self.corrupt[slot])
        if position < _BAD_PER_READER:
            self.bad[slot, position] = code
        self.corrupt[slot] += 1
        warnings.warn(f"{type(self).__name__}: skipping {message}", self.warning, stacklevel=3)
        total, read = self.num_corrupt, int(self.read.sum())
        if isinstance(self.max_corrupt, int) and total > self.max_corrupt:
            raise TooManyCorruptError(
                f"ShardDataset: {total} corrupt samples/shards exceed max_corrupt={self.max_corrupt} "
                f"(last: {message}); check the shards or raise max_corrupt"
            )
        if isinstance(self.max_corrupt, float) and read + total >= _MIN_FOR_FRACTION:
            if total > self.max_corrupt * (read + total):
                raise TooManyCorruptError(
                    f"ShardDataset: {total} of {read + total} samples read were corrupt, more than "
                    f"max_corrupt={self.max_corrupt:g} of them (last: {message}); check the shards or raise max_corrupt"
                )

    def _samples(
        self, urls: Sequence[str], slot: int, keep: tuple[int, int] | None
    ) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """(url, key, fields) of the shards in order; ``keep=(i, n)`` keeps every n-th sample from the i-th."""
        position = 0
        for url in urls:
            last = "<start>"
            try:
                for key, fields in read_shard(url):
                    last = key
                    if keep is not None:
                        position += 1
                        if (position - 1) % keep[1] != keep[0]:
                            continue
                    yield url, key, fields
            except (OSError, tarfile.TarError, EOFError, ValueError) as err:
                self._skip(slot, f"unreadable shard {url} (after key {last}): {type(err).__name__}: {err}", url)

    def _decode(self, url: str, key: str, fields: dict[str, bytes], slot: int, rng: random.Random) -> Batch | None:
        ext = next((e for e in IMAGE_EXTENSIONS if e in fields), None)
        if ext is None:
            self._skip(slot, f"sample {key} in {url}: no image member (has {sorted(fields)})", f"{url}\0{key}")
            return None
        try:
            data = fields[ext]
            if not bool(self.small_images.warned[0]):  # until one was reported: a header read per image
                self.small_images(f"{key}.{ext} in {url}", *image_size_of(data))
            if self.train:
                image = decode_random_resized_crop(data, self.image_size, rng, mode=self.mode, scale=self.crop_scale)
                if self.rand_augment is not None:
                    image = seeded_rand_augment(image, self.rand_augment, rng)
            else:
                image = decode_center_crop(data, self.image_size, mode=self.mode, crop_pct=self.eval_crop_pct)
            label = int(fields["cls"].decode().strip()) if "cls" in fields else -1
        except _DECODE_ERRORS as err:
            self._skip(slot, f"sample {key}.{ext} in {url}: {type(err).__name__}: {err}", f"{url}\0{key}")
            return None
        self.read[slot] += 1
        return {"image": image, "label": torch.tensor(label, dtype=torch.int64)}

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot = min(worker + 1 if info is not None else 0, _MAX_READERS - 1)
        epoch = int(self.epoch[0])
        num_batches = self.num_samples // self.batch_size
        done = self._resumed(epoch) if self.train else 0
        # An uninterrupted pass takes batch i from worker i % W. A resumed one starts its round robin at
        # worker 0 with batch `done`, so worker w plays the part of worker (w + done) % W: it produces that
        # worker's stream and leaves out the batches i < done of it.
        worker = (worker + done) % num_workers
        quota = (num_batches // num_workers + (worker < num_batches % num_workers)) * self.batch_size
        to_skip = (done // num_workers + (worker < done % num_workers)) * self.batch_size
        order = list(self.urls)
        if self.train:
            random.Random(seed_of(self.seed, epoch)).shuffle(order)  # the same on every rank
        readers, reader = self.world_size * num_workers, self.rank * num_workers + worker
        if len(order) >= readers:
            mine, keep = order[self.rank :: self.world_size][worker::num_workers], None  # split by node, worker
        else:
            mine, keep = order, (reader, readers)  # too few shards: split by sample
        rng = random.Random(seed_of(self.seed, epoch, self.rank, worker))  # the shuffle buffer's
        buffer: list[tuple[str, str, dict[str, bytes]]] = []
        produced, passes, drawn = 0, 0, 0

        def decode(item: tuple[str, str, dict[str, bytes]]) -> Batch | None:
            """The sample of the ``drawn``-th item of this stream; a skipped one is not decoded."""
            nonlocal produced, drawn
            index, drawn = drawn, drawn + 1
            if index < to_skip:  # consumed before the resumed checkpoint
                produced += 1
                return None
            augment = random.Random(seed_of(self.seed, epoch, self.rank, worker, _AUGMENT, index))
            sample = self._decode(item[0], item[1], item[2], slot, augment)
            if sample is not None:
                produced += 1
            return sample

        while produced < quota:
            urls = list(mine)
            if passes > 0:  # resampling: another pass over this reader's shards, in a new order
                random.Random(seed_of(self.seed, epoch, self.rank, worker, passes)).shuffle(urls)
            passes += 1
            before = produced
            for item in self._samples(urls, slot, keep):
                if self.train and self.shuffle_buffer > 1:
                    buffer.append(item)
                    if len(buffer) < self.shuffle_buffer:
                        continue
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    item = buffer.pop()
                sample = decode(item)
                if sample is not None:
                    yield sample
                if produced >= quota:
                    return
            while buffer and produced < quota:  # drain the buffer at the end of a pass
                sample = decode(buffer.pop(rng.randrange(len(buffer))))
                if sample is not None:
                    yield sample
            if produced == before and not buffer:
                raise TooManyCorruptError(
                    f"ShardDataset: rank {self.rank} worker {worker} read no usable sample from its shards {urls}"
                )


def check_max_corrupt(owner: str, max_corrupt: Any) -> None:
    """Raise ``ValueError`` unless ``max_corrupt`` is an int >= 0 (a count) or a float in [0, 1) (a share)."""
    if isinstance(max_corrupt, bool) or not (
        (isinstance(max_corrupt, int) and max_corrupt >= 0) or (isinstance(max_corrupt, float) and 0 <= max_corrupt < 1)
    ):
        raise invalid(owner, "max_corrupt", "an integer >= 0 or a float in [0, 1)", max_corrupt)


def rank_and_world(module: Any) -> tuple[int, int]:
    """(global rank, world size) from the datamodule's trainer, else from ``RANK`` / ``WORLD_SIZE``."""
    trainer = getattr(module, "_trainer", None) or getattr(module, "trainer", None)
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def per_rank_samples(owner: str, total: int, world: int, batch_size: int, field: str) -> int:
    """Samples per rank and epoch: ``total // world`` rounded down to whole batches (at least one)."""
    batches = total // world // batch_size
    if batches < 1:
        raise ValueError(
            f"{owner}.{field}={total} over {world} ranks is less than one batch of "
            f"batch_size={batch_size}; lower batch_size"
        )
    return batches * batch_size


def epoch_loader(dataset: ShardDataset, **loader_kwargs: Any) -> DataLoader:
    """A DataLoader over a :class:`ShardDataset` whose sampler slot forwards Lightning's ``set_epoch``."""
    loader = DataLoader(dataset, drop_last=True, **loader_kwargs)
    # An iterable dataset's DataLoader has no sampler with set_epoch; put one in its place so Lightning's
    # per-epoch set_epoch reaches the dataset (through shared memory, also in persistent workers).
    object.__setattr__(loader, "sampler", _EpochSampler(dataset.epoch))
    return loader


class ShardResumeMixin:
    """Exact mid-epoch resume for datamodules whose training set is a :class:`ShardDataset`.

    Lightning saves ``state_dict()`` in checkpoints and calls ``load_state_dict`` on restore; the datamodule calls
    :meth:`_apply_resume` when it builds its training loader.
    """

    trainer: Any
    train_dataset: Any
    _resume: tuple[int, int] | None = None  # (epoch, batches_done) from load_state_dict

    def _apply_resume(self) -> None:
        if self._resume is not None and isinstance(self.train_dataset, ShardDataset):
            self.train_dataset.resume_from(*self._resume)

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_done"}``: the training position of this rank (Lightning saves it in checkpoints).

        ``batches_done`` counts the training batches already fetched in the current epoch (Lightning's
        ``batch_progress.current.ready``): inside ``on_train_batch_end`` (``ModelCheckpoint(every_n_train_steps=...)``)
        that includes the batch just trained on, which Lightning counts as completed on restore; at the end of
        an epoch it is the epoch's length, so a resumed run starts the next epoch whole.
        """
        return training_position(self.trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume mid-epoch: the first pass over the saved epoch leaves out the batches already consumed."""
        if "epoch" not in state_dict or "batches_done" not in state_dict:
            return
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
        self._apply_resume()
        silence_unresumable_loader_warning()


class ShardLoadersMixin(ShardResumeMixin):
    """The datasets and loaders of a datamodule that reads :class:`ShardDataset` s (images or videos).

    Every rank gets ``samples_per_epoch // world_size // batch_size`` full batches from :func:`epoch_loader`,
    with exact mid-epoch resume (:class:`ShardResumeMixin`). The datamodule sets the attributes below and
    builds its datasets with :meth:`_shard_datasets`.
    """

    urls: list[str]
    val_urls: list[str]
    samples_per_epoch: int
    val_samples: int | None
    batch_size: int
    seed: int
    shuffle_buffer: int
    max_corrupt: int | float
    val_dataset: Any
    setup: Callable[..., None]
    _loader_kwargs: Callable[[], dict[str, Any]]

    def _shard_datasets(self, make: Callable[..., ShardDataset]) -> tuple[ShardDataset, ShardDataset | None]:
        """(training, validation) datasets; validation is None without ``val_urls``.

        Args:
            make: ``make(urls, *, num_samples, train, batch_size, rank, world_size, shuffle_buffer, seed,
                max_corrupt)`` builds one dataset (the class with its decoding arguments bound).
        """
        owner = type(self).__name__
        rank, world = rank_and_world(self)
        common: dict[str, Any] = dict(
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            max_corrupt=self.max_corrupt,
        )
        train_samples = per_rank_samples(owner, self.samples_per_epoch, world, self.batch_size, "samples_per_epoch")
        train = make(self.urls, num_samples=train_samples, train=True, **common)
        val = None
        if self.val_urls and self.val_samples is not None:
            val_samples = per_rank_samples(owner, self.val_samples, world, self.batch_size, "val_samples")
            val = make(self.val_urls, num_samples=val_samples, train=False, **common)
        return train, val

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert isinstance(self.train_dataset, ShardDataset)
        self._apply_resume()
        return epoch_loader(self.train_dataset, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if not isinstance(self.val_dataset, ShardDataset):
            return []
        return epoch_loader(self.val_dataset, **self._loader_kwargs())

    @property
    def num_corrupt(self) -> int:
        """Corrupt samples and shards skipped so far, over the training and validation loaders (each counted once,
        also when the validation shards are the training shards)."""
        datasets = [d for d in (self.train_dataset, self.val_dataset) if isinstance(d, ShardDataset)]
        if not datasets:
            return 0
        found = [d.bad_fingerprints() for d in datasets]
        return int(torch.unique(torch.cat([f for f, _ in found])).numel()) + sum(n for _, n in found)


class ShardDataModule(ShardLoadersMixin, ImageDataModule):
    """Webdataset tar shards (e.g. from ``mim pack``) as uint8 batches, normalised on the device.

    Every rank yields ``samples_per_epoch // world_size // batch_size`` full batches per epoch (see
    docs/design.md, "Shards", for the order, the splitting and the resampling).

    Args:
        urls: a ``mim pack`` output folder (with index.json), or brace-expanded shard paths / webdataset URLs.
        val_urls: validation shards, same forms; None: no validation.
        image_size: side of the square images the loaders yield.
        batch_size: samples per device and step.
        samples_per_epoch: samples per epoch over all ranks; default: the training index's total (required
            when ``urls`` has no index.json).
        val_samples: validation samples over all ranks; default: the validation index's total.
        num_classes: number of classes; default: from the training index.
        in_chans: 3 decodes to RGB, 1 to grey.
        mean: per-channel means of the [0, 1] pixels; default ImageNet's.
        std: per-channel standard deviations; default ImageNet's.
        crop_scale: area range of the training random resized crop (MAE: (0.2, 1.0)).
        rand_augment: RandAugment magnitude on the training samples (fine-tuning: 9, as MAE); None: off.
        eval_crop_pct: validation resizes the shorter side to ``image_size / eval_crop_pct`` and centre-crops.
        shuffle_buffer: samples in each worker's shuffle buffer (1 disables it).
        max_corrupt: corrupt samples tolerated: an int is a total count, a float in [0, 1) a fraction of the
            samples read; beyond it the loader raises :class:`TooManyCorruptError`.
        num_workers: loader worker processes.
        seed: seeds the shard order, the shuffle buffer and the augmentation (with epoch, rank, worker).

    Attributes:
        num_corrupt: corrupt samples and shards skipped so far (training and validation).
    """

    def __init__(
        self,
        *,
        urls: str | list[str],
        val_urls: str | list[str] | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        samples_per_epoch: int | None = None,
        val_samples: int | None = None,
        num_classes: int | None = None,
        in_chans: Literal[1, 3] = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        eval_crop_pct: float = 0.875,
        rand_augment: int | None = None,
        shuffle_buffer: int = 1000,
        max_corrupt: int | float = 0.01,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        owner = "ShardDataModule"
        if rand_augment is not None:
            check_int(owner, "rand_augment", rand_augment, minimum=0, maximum=30)
        check_choice(owner, "in_chans", in_chans, (1, 3))
        crop_scale = check_crops(owner, crop_scale, eval_crop_pct)
        check_int(owner, "shuffle_buffer", shuffle_buffer)
        check_max_corrupt(owner, max_corrupt)
        spec = resolve_shards(
            owner,
            urls,
            kind="image",
            samples_per_epoch=samples_per_epoch,
            num_classes=num_classes,
            val_urls=val_urls,
            val_samples=val_samples,
        )
        super().__init__(
            batch_size=batch_size,
            image_size=image_size,
            in_chans=in_chans,
            mean=mean,
            std=std,
            num_classes=spec.num_classes,
            num_workers=num_workers,
            seed=seed,
        )
        self.urls, self.val_urls = spec.urls, spec.val_urls
        self.samples_per_epoch, self.val_samples = spec.samples_per_epoch, spec.val_samples
        self.classes: list[str] | None = spec.classes
        self.crop_scale, self.rand_augment = crop_scale, rand_augment
        self.eval_crop_pct, self.shuffle_buffer, self.max_corrupt = eval_crop_pct, shuffle_buffer, max_corrupt

    def build_datasets(self) -> tuple[ShardDataset, ShardDataset | None]:
        mode: Literal["RGB", "L"] = "RGB" if self.in_chans == 3 else "L"
        return self._shard_datasets(
            partial(
                ShardDataset,
                image_size=self.image_size,
                mode=mode,
                crop_scale=self.crop_scale,
                eval_crop_pct=self.eval_crop_pct,
                rand_augment=self.rand_augment,
            )
        )

    def teardown(self, stage: str) -> None:
        if self.num_corrupt:
            rank_zero_warn(
                f"ShardDataModule skipped {self.num_corrupt} corrupt samples or shards (see the warnings above)",
                category=CorruptImageWarning,
            )
