"""Video shards: ``mim pack`` of real H.264 clips, ``VideoShardDataModule(urls=...)`` reading them back, a real fit."""

from __future__ import annotations

import json
import shutil
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("av")

from mim.data.pack import main as pack_main  # noqa: E402
from mim.data.pack import pack  # noqa: E402
from mim.data.shards import TooManyCorruptError  # noqa: E402
from mim.data.transforms import ClipCenterCrop  # noqa: E402
from mim.data.video import ClipDecoder, CorruptVideoWarning, collate_clips  # noqa: E402
from mim.data.video_folder import VideoDataModule  # noqa: E402
from mim.data.video_shards import VideoShardDataModule, VideoShardDataset  # noqa: E402
from tests.factories import write_tar

SMALL = dict(num_frames=4, frame_stride=2, image_size=32, resize_short=48)


@pytest.fixture(scope="module")
def class_clips(real_clips: Path, tmp_path_factory) -> Path:
    """The 4 real clips in two class folders: a/ (2 clips, label 0) and b/ (2 clips, label 1)."""
    root = tmp_path_factory.mktemp("video_classes")
    clips = sorted(real_clips.glob("*.mp4"))
    assert len(clips) == 4
    for i, clip in enumerate(clips):
        folder = root / ("a" if i < 2 else "b")
        folder.mkdir(exist_ok=True)
        shutil.copy(clip, folder / clip.name)
    return root


@pytest.fixture(scope="module")
def packed_videos(class_clips: Path, tmp_path_factory) -> Path:
    """The 4 clips packed into 2 shards of 2."""
    out = tmp_path_factory.mktemp("video_shards") / "out"
    pack(class_clips, out, shard_samples=2, progress=False)
    return out


def _members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def test_pack_stores_original_video_bytes(packed_videos: Path, class_clips: Path):
    index = json.loads((packed_videos / "index.json").read_text())
    assert index["kind"] == "video" and index["num_shards"] == 2 and index["num_samples"] == 4
    assert index["classes"] == ["a", "b"] and index["num_classes"] == 2 and index["num_skipped"] == 0
    originals = {p.read_bytes(): p.parent.name for p in class_clips.rglob("*.mp4")}
    seen = []
    for record in index["shards"]:
        shard = packed_videos / record["name"]
        assert record["samples"] == 2 and (packed_videos / (record["name"] + ".done")).is_file()
        names = _members(shard)
        assert sorted(n.rsplit(".", 1)[1] for n in names) == ["cls", "cls", "mp4", "mp4"]
        with tarfile.open(shard) as tar:
            for name in names:
                if name.endswith(".mp4"):
                    data = tar.extractfile(name).read()
                    label = int(tar.extractfile(name[:-4] + ".cls").read())
                    assert originals[data] == ["a", "b"][label]  # byte-identical, right class
                    seen.append(data)
    assert len(set(seen)) == 4
    again = pack(class_clips, packed_videos, shard_samples=2, progress=False)  # resume: nothing to redo
    assert again["shards"] == index["shards"]


def test_pack_flat_folder_and_list_file(real_clips: Path, tmp_path: Path):
    flat = pack(real_clips, tmp_path / "flat", progress=False)
    assert flat["kind"] == "video" and flat["num_samples"] == 4 and flat["classes"] == [""]
    (tmp_path / "bad.mkv").write_bytes(b"not a video at all")
    clips = sorted(real_clips.glob("*.mp4"))
    lines = [f"{clips[0]} 3", f"{clips[1]} 1", str(tmp_path / "bad.mkv")]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="unreadable video .*bad.mkv"):
        assert pack_main([str(tmp_path / "list.txt"), str(tmp_path / "listed"), "--no-progress"]) == 0
    index = json.loads((tmp_path / "listed" / "index.json").read_text())
    assert index["kind"] == "video" and index["num_samples"] == 2 and index["num_classes"] == 4
    assert index["skipped"] == [str(tmp_path / "bad.mkv")]
    with pytest.raises(ValueError, match="resize_short applies to images"):
        pack(real_clips, tmp_path / "resized", resize_short=64, progress=False)
    (tmp_path / "mixed.txt").write_text(f"{clips[0]} 0\n{tmp_path / 'x.jpg'} 1\n")
    with pytest.raises(ValueError, match="mixes videos"):
        pack(tmp_path / "mixed.txt", tmp_path / "mixed", progress=False)


def test_datamodule_reads_video_shards(packed_videos: Path):
    dm = VideoShardDataModule(urls=str(packed_videos), batch_size=2, num_repeats=2, **SMALL)
    assert dm.num_classes == 2 and dm.classes == ["a", "b"] and dm.samples_per_epoch == 4
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 4 videos / 2 per batch
    labels = []
    for batch in batches:
        assert batch["video"].shape == (4, 3, 4, 32, 32) and batch["video"].dtype == torch.uint8  # (B*R, C, T, H, W)
        assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
        assert torch.equal(batch["label"][0::2], batch["label"][1::2])  # R clips of one video share its label
        assert batch["video"].float().std() > 5  # real pictures, not a constant
        labels += batch["label"].tolist()
    assert Counter(labels) == {0: 4, 1: 4}  # every video once per epoch (2 per class x 2 repeats)
    normalised = dm.on_after_batch_transfer(dict(batches[0]), 0)["video"]
    assert normalised.dtype == torch.float32 and normalised.shape == (4, 3, 4, 32, 32)
    assert dm.num_corrupt == 0 and dm.num_skipped == 0

    val = VideoShardDataModule(urls=str(packed_videos), val_urls=str(packed_videos), batch_size=2, **SMALL)
    (first,) = list(val.val_dataloader())[:1]
    assert first["video"].shape == (2, 3, 4, 32, 32)
    assert torch.equal(first["video"], next(iter(val.val_dataloader()))["video"])  # centre clips: deterministic


class KeyedVideoShards(VideoShardDataset):
    """Decodes for real and also reports the sample key (for coverage checks)."""

    def _decode(self, url, key, fields, slot, rng):
        sample = super()._decode(url, key, fields, slot, rng)
        if sample is not None:
            sample["key"] = torch.full((self.decoder.num_repeats,), int(Path(key).name))
        return sample


def _collate_keyed(samples):
    return {**collate_clips(samples), "key": torch.cat([s["key"] for s in samples])}


def _keyed(urls: list[str], rank: int, world: int, seed: int = 0) -> KeyedVideoShards:
    return KeyedVideoShards(
        urls,
        num_samples=2,
        batch_size=1,
        rank=rank,
        world_size=world,
        seed=seed,
        decoder=ClipDecoder(
            num_frames=4, frame_stride=2, transform=ClipCenterCrop(32), short_side=32, decode_threads=1
        ),
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_no_duplicates_or_missing_across_two_ranks(packed_videos: Path, num_workers: int):
    urls = sorted(str(p) for p in packed_videos.glob("*.tar"))
    per_rank = []
    for rank in range(2):
        loader = DataLoader(
            _keyed(urls, rank, 2), batch_size=1, num_workers=num_workers, drop_last=True, collate_fn=_collate_keyed
        )
        batches = list(loader)
        assert len(batches) == 2  # equal full batches on every rank
        assert all(b["video"].shape == (1, 3, 4, 32, 32) for b in batches)
        per_rank.append([int(b["key"][0]) for b in batches])
    assert sorted(per_rank[0] + per_rank[1]) == [0, 1, 2, 3]  # no duplicated, no missing video


def test_rank_from_environment_splits_the_datamodule(packed_videos: Path, monkeypatch):
    labels = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = VideoShardDataModule(urls=str(packed_videos), batch_size=1, **SMALL)
        batches = list(dm.train_dataloader())
        assert len(batches) == 2 and dm.train_dataset.rank == rank and dm.train_dataset.world_size == 2
        labels += [int(b["label"][0]) for b in batches]
    assert Counter(labels) == {0: 2, 1: 2}


def test_order_is_a_function_of_seed_and_epoch(packed_videos: Path):
    urls = sorted(str(p) for p in packed_videos.glob("*.tar"))

    def run(seed: int, epoch: int) -> list[torch.Tensor]:
        dm = VideoShardDataModule(urls=urls, samples_per_epoch=4, num_classes=2, batch_size=2, seed=seed, **SMALL)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [b["video"] for b in loader]

    a, b = run(0, 0), run(0, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # frames and crops reproduce
    assert not all(torch.equal(x, y) for x, y in zip(a, run(0, 1), strict=True))


def test_corrupt_member_is_skipped_and_counted(packed_videos: Path, real_clips: Path, tmp_path: Path):
    good = sorted(str(p) for p in packed_videos.glob("*.tar"))  # 4 good videos
    bad = tmp_path / "bad.tar"
    clip = sorted(real_clips.glob("*.mp4"))[1].read_bytes()
    write_tar(
        bad,
        {
            "garbage.mp4": np.random.default_rng(0).integers(0, 255, 4000, dtype=np.uint8).tobytes(),
            "garbage.cls": b"0",
            "text.webm": b"not a video at all",
            "text.cls": b"1",
            "novideo.txt": b"hello",  # a sample without a video member
            "ok.mp4": clip,
            "ok.cls": b"1",
        },
    )
    urls = [*good, str(bad)]

    def run(max_corrupt):
        # 6 > the 5 good videos: every shard is read at least once
        dm = VideoShardDataModule(
            urls=urls,
            samples_per_epoch=6,
            num_classes=2,
            batch_size=6,
            shuffle_buffer=1,
            max_corrupt=max_corrupt,
            **SMALL,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(dm.train_dataloader())
        return dm, batches, [str(w.message) for w in caught if issubclass(w.category, CorruptVideoWarning)]

    dm, batches, messages = run(max_corrupt=50)
    assert len(batches) == 1 and batches[0]["video"].shape == (6, 3, 4, 32, 32)
    assert dm.num_corrupt == 3 and dm.num_skipped == dm.num_corrupt  # each planted failure, once
    text = "\n".join(messages)
    for needle in ("garbage.mp4", "text.webm", "novideo", "bad.tar"):
        assert needle in text
    with pytest.raises(TooManyCorruptError, match="max_corrupt=1"):
        run(max_corrupt=1)


def test_argument_errors(packed_videos: Path, real_clips: Path, tmp_path: Path):
    with pytest.raises(TypeError, match="root"):  # files and shards are separate datamodules
        VideoShardDataModule(urls=str(packed_videos), root=str(real_clips))
    with pytest.raises(TypeError, match="samples_per_epoch"):
        VideoDataModule(root=str(real_clips), samples_per_epoch=4)
    with pytest.raises(ValueError, match="samples_per_epoch is required"):
        VideoShardDataModule(urls=[str(p) for p in sorted(packed_videos.glob("*.tar"))])
    with pytest.raises(ValueError, match="max_corrupt"):
        VideoShardDataModule(urls=str(packed_videos), max_corrupt=1.5)
    with pytest.raises(ValueError, match="less than one batch"):
        VideoShardDataModule(urls=str(packed_videos), batch_size=8).train_dataloader()


def test_video_debug_recipe_trains_on_shards(packed_videos: Path, tmp_path: Path):
    """`recipes/debug/mae_video.yaml` with `VideoShardDataModule` and `--data.init_args.urls`: decode from shards,
    tubelets, masking, fit."""
    from mim.lightning_cli import build

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "debug" / "mae_video.yaml"
    cli = build(
        [
            "--config",
            str(recipe),
            "--data.class_path=mim.data.VideoShardDataModule",
            f"--data.init_args.urls={packed_videos}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=3",
            "--trainer.enable_progress_bar=false",
        ],
        save_config_callback=None,
    )
    assert isinstance(cli.datamodule, VideoShardDataModule) and cli.datamodule.urls
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert batch["video"].shape == (4, 3, 4, 32, 32)  # 2 videos x 2 repeats, normalised float
            assert batch["video"].dtype == torch.float32
            losses.append(float(outputs["loss"]))

    cli.trainer.callbacks.append(Record())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(losses) == 6  # 4 videos / batch 2 = 2 steps per epoch, 3 epochs
    assert all(np.isfinite(losses))
    assert int(cli.datamodule.train_dataset.epoch) == 2  # Lightning's set_epoch reached the shards


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_continues_the_same_batches(packed_videos: Path, num_workers: int):
    """A VideoShardDataModule restored from {"epoch", "batches_done"} yields exactly the rest of that epoch."""
    urls = sorted(str(p) for p in packed_videos.glob("*.tar"))

    def loader(state: dict | None):
        dm = VideoShardDataModule(
            urls=urls, samples_per_epoch=4, num_classes=2, batch_size=1, num_workers=num_workers, **SMALL
        )
        assert dm.state_dict() == {}  # no trainer attached: nothing to save
        if state is not None:
            dm.load_state_dict(state)
        out = dm.train_dataloader()
        out.sampler.set_epoch(1)
        return [b["video"] for b in out]

    full = loader(None)
    assert len(full) == 4
    resumed = loader({"epoch": 1, "batches_done": 3})
    assert len(resumed) == 1 and torch.equal(resumed[0], full[3])
    assert all(torch.equal(a, b) for a, b in zip(loader({"epoch": 0, "batches_done": 3}), full, strict=True))
