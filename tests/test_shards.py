"""ShardDataModule: splitting, fixed epoch length, determinism, corrupt input, fast decode, a real fit."""

from __future__ import annotations

import io
import math
import random
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from mim.data.decode import decode_center_crop, decode_random_resized_crop, sample_crop_box
from mim.data.folder import CorruptImageWarning
from mim.data.pack import pack
from mim.data.shards import ShardDataModule, ShardDataset, TooManyCorruptError
from tests.factories import StopAt, cpu_trainer, write_tar
from tests.test_pack import make_images


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """32 samples in 8 shards of 4."""
    root = tmp_path_factory.mktemp("shards")
    make_images(root / "src", per_class=16, size=(40, 36))
    pack(root / "src", root / "out", shard_samples=4, progress=False)
    return root / "out"


class KeyedDataset(ShardDataset):
    """Yields the sample key instead of decoding (for coverage checks)."""

    def _decode(self, url, key, fields, slot, rng):
        self.read[slot] += 1
        return {"key": int(Path(key).name)}


def _keys(dataset: ShardDataset, num_workers: int) -> list[list[int]]:
    loader = DataLoader(dataset, batch_size=dataset.batch_size, num_workers=num_workers, drop_last=True)
    return [b["key"].tolist() for b in loader]


def test_crop_box_distribution_matches_torchvision():
    rng, n = random.Random(0), 4000
    torch.manual_seed(0)
    ours, theirs = [], []
    for i in range(n):
        height, width = (375, 500) if i % 2 else (300, 120)  # the second often needs the fallback
        image = torch.empty(1, height, width)
        for box, out in (
            (sample_crop_box(height, width, rng), ours),
            (v2.RandomResizedCrop.get_params(image, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3]), theirs),
        ):
            top, left, h, w = box
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            out.append((h * w / (height * width), math.log(w / h), (top + h / 2) / height))
    a, b = np.array(ours), np.array(theirs)
    for column in range(3):
        for q in (0.1, 0.25, 0.5, 0.75, 0.9):
            assert abs(np.quantile(a[:, column], q) - np.quantile(b[:, column], q)) < 0.03, (column, q)
        assert abs(a[:, column].mean() - b[:, column].mean()) < 0.02


def test_fast_decode_scales_down_and_matches_full_decode():
    pixels = np.kron(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8), np.ones((10, 10, 1)))
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()  # 800 x 600
    fast = decode_random_resized_crop(data, 32, random.Random(1), hflip=0.0)
    top, left, h, w = sample_crop_box(600, 800, random.Random(1))
    full = (
        Image.open(io.BytesIO(data))
        .convert("RGB")
        .resize((32, 32), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    )
    reference = torch.from_numpy(np.asarray(full).copy()).permute(2, 0, 1)
    assert fast.shape == (3, 32, 32) and fast.dtype == torch.uint8
    assert (fast.float() - reference.float()).abs().mean() < 6  # DCT-scaled decode, same crop
    assert decode_center_crop(data, 16, mode="L").shape == (1, 16, 16)


def test_no_duplicates_or_missing_across_ranks_and_workers(packed: Path):
    urls = sorted(str(p) for p in packed.glob("*.tar"))
    per_rank = []
    for rank in range(2):
        dataset = KeyedDataset(urls, num_samples=16, batch_size=4, rank=rank, world_size=2, seed=3)
        batches = _keys(dataset, num_workers=2)
        assert len(batches) == 4 and all(len(b) == 4 for b in batches)  # equal full batches per rank
        per_rank.append([k for b in batches for k in b])
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == list(range(32))  # no duplicated, no missing sample


def test_fixed_epoch_length_with_uneven_shards_and_resampling(packed: Path):
    urls = sorted(str(p) for p in packed.glob("*.tar"))[:3]  # 12 samples, 2 ranks x 2 workers > 3 shards
    lengths = []
    for rank in range(2):
        dataset = KeyedDataset(urls, num_samples=12, batch_size=4, rank=rank, world_size=2)
        batches = _keys(dataset, num_workers=2)
        lengths.append(len(batches))
        assert all(len(b) == 4 for b in batches)
    assert lengths == [3, 3]  # more than the shards hold: workers resample, ranks stay equal


def test_order_is_a_function_of_seed_and_epoch(packed: Path):
    def run(seed: int, epoch: int) -> list[list[int]]:
        dataset = KeyedDataset(
            [str(p) for p in sorted(packed.glob("*.tar"))], num_samples=32, batch_size=4, seed=seed, shuffle_buffer=8
        )
        dataset.set_epoch(epoch)
        return _keys(dataset, num_workers=2)

    assert run(0, 0) == run(0, 0)
    assert run(0, 1) != run(0, 0) and run(1, 0) != run(0, 0)
    assert sorted(sum(run(0, 1), [])) == list(range(32))


def test_datamodule_uint8_loader_and_normalised_on_device(packed: Path):
    dm = ShardDataModule(urls=str(packed), val_urls=str(packed), image_size=16, batch_size=4, num_workers=0)
    assert dm.num_classes == 2 and dm.samples_per_epoch == 32 and dm.classes == ["cat", "dog"]
    loader = dm.train_dataloader()
    assert len(loader) == 8
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 16, 16)
    assert batch["label"].dtype == torch.int64
    out = dm.on_after_batch_transfer(batch, 0)
    assert out["image"].dtype == torch.float32
    assert next(iter(dm.val_dataloader()))["image"].shape == (4, 3, 16, 16)
    loader.sampler.set_epoch(5)  # what Lightning calls each epoch
    assert int(dm.train_dataset.epoch) == 5
    with pytest.raises(ValueError, match="batch_size"):
        ShardDataModule(urls=str(packed), batch_size=64).train_dataloader()
    with pytest.raises(ValueError, match="max_corrupt"):
        ShardDataModule(urls=str(packed), max_corrupt=-1)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ShardDataModule(urls=str(packed / "shard-000000.tar"))


def test_corrupt_input_is_skipped_counted_and_limited(packed: Path, tmp_path: Path):
    good = sorted(str(p) for p in packed.glob("*.tar"))[:2]  # 8 good samples
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(jpeg, format="JPEG")
    bad = tmp_path / "bad.tar"
    write_tar(
        bad,
        {
            "trunc.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
            "trunc.cls": b"0",  # truncated JPEG
            "text.jpg": b"not an image at all",
            "text.cls": b"1",  # non-image member
            "nojpg.txt": b"hello",  # sample without an image
            "ok.jpg": jpeg.getvalue(),
            "ok.cls": b"1",
        },
    )
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    missing = str(tmp_path / "missing.tar")
    urls = [*good, str(bad), str(garbage), missing]

    def run(max_corrupt):
        # 10 > the 9 good samples: every shard is read at least once
        dm = ShardDataModule(
            urls=urls,
            samples_per_epoch=10,
            num_classes=2,
            image_size=16,
            batch_size=10,
            shuffle_buffer=1,
            max_corrupt=max_corrupt,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(dm.train_dataloader())
        return dm, batches, [str(w.message) for w in caught if issubclass(w.category, CorruptImageWarning)]

    dm, batches, messages = run(max_corrupt=50)
    assert len(batches) == 1 and batches[0]["image"].shape == (10, 3, 16, 16)
    assert dm.num_corrupt == 5  # each of the 5 planted failures, once however often it was read
    text = "\n".join(messages)
    for needle in ("trunc.jpg", "text.jpg", "nojpg", "garbage.tar", "missing.tar"):
        assert needle in text
    assert "bad.tar" in text
    with pytest.raises(TooManyCorruptError, match="max_corrupt=2"):
        run(max_corrupt=2)


def test_short_lightning_fit_on_shards(packed: Path, tmp_path: Path):
    from mim.masking import RandomMasking
    from mim.models import MaskedEncoder
    from mim.module import PretrainModule
    from mim.targets import PixelTarget

    model = PretrainModule(
        encoder=MaskedEncoder(
            arch="vit_tiny_patch16_224",
            img_size=32,
            patch_size=8,
            model_kwargs=dict(embed_dim=64, depth=2, num_heads=2),
        ),
        masking=RandomMasking(mask_ratio=0.75),
        targets=[PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=2)],
    )
    dm = ShardDataModule(urls=str(packed), val_urls=str(packed), image_size=32, batch_size=8, num_workers=1)
    trainer = cpu_trainer(max_epochs=2, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 8 and int(dm.train_dataset.epoch) == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_skips_consumed_batches_for_one_epoch(packed: Path, num_workers: int):
    urls = [str(p) for p in sorted(packed.glob("*.tar"))]

    def run(epoch: int, resume: tuple[int, int] | None) -> list[list[int]]:
        dataset = KeyedDataset(urls, num_samples=32, batch_size=4, seed=5, shuffle_buffer=8)
        dataset.set_epoch(epoch)
        if resume is not None:
            dataset.resume_from(*resume)
            assert int(dataset.epoch) == (resume[0] if resume[1] < 8 else resume[0] + 1)
            dataset.set_epoch(epoch)
        return _keys(dataset, num_workers=num_workers)

    full = {epoch: run(epoch, None) for epoch in (0, 1)}
    for done in (0, 1, 3, 7):
        assert run(1, (1, done)) == full[1][done:]  # the rest of the epoch, batch for batch
        assert run(0, (1, done)) == full[0]  # another epoch is whole
    for done in (8, 9):  # saved at the end of the epoch: a pass over it again (not done by Lightning) is whole
        assert run(1, (1, done)) == full[1]
    with pytest.raises(ValueError, match="batches_done"):
        KeyedDataset(urls, num_samples=32, batch_size=4).resume_from(0, -1)


class _IdDataset(ShardDataset):
    """Decodes as usual and adds the sample's key as ``id``."""

    def _decode(self, url, key, fields, slot, rng):
        sample = super()._decode(url, key, fields, slot, rng)
        if sample is not None:
            sample["id"] = torch.tensor(int(Path(key).name))
        return sample


def _recording_fit(
    packed: Path, root: Path, num_workers: int, *, ckpt_path=None, callbacks=(), val=False, interrupt_at=None, **limits
):
    """Fit a tiny PretrainModule on the shards; (epoch, batch_idx, ids, image sum, loss) of every training batch.

    ``interrupt_at`` stops the 2-epoch run after that step (:class:`StopAt`), so its lr schedule stays the
    uninterrupted run's."""
    from mim.masking import RandomMasking
    from mim.models import MaskedEncoder
    from mim.module import PretrainModule
    from mim.targets import PixelTarget

    seen: list[tuple] = []
    if interrupt_at is not None:
        callbacks = [*callbacks, StopAt(interrupt_at)]
        limits["max_epochs"] = 2

    class Recording(PretrainModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            ids = tuple(batch["id"].tolist())
            seen.append(
                (self.current_epoch, batch_idx, ids, float(batch["image"].double().sum()), float(loss.detach()))
            )
            return loss

    L.seed_everything(0)
    model = Recording(
        encoder=MaskedEncoder(
            arch="vit_tiny_patch16_224",
            img_size=16,
            patch_size=8,
            model_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
        ),
        masking=RandomMasking(mask_ratio=0.75),
        targets=[PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)],
    )
    dm = ShardDataModule(
        urls=str(packed),
        val_urls=str(packed) if val else None,
        image_size=16,
        batch_size=4,
        num_workers=num_workers,
        shuffle_buffer=8,
    )
    trainer = cpu_trainer(
        default_root_dir=root,
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
        num_sanity_val_steps=0,
        **limits,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return seen, trainer, dm


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resume_sees_the_uninterrupted_batches(packed: Path, tmp_path: Path, num_workers: int, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    import mim.data.shards

    monkeypatch.setattr(mim.data.shards, "ShardDataset", _IdDataset)
    full, trainer, _ = _recording_fit(packed, tmp_path / "full", num_workers, max_epochs=2)
    assert trainer.global_step == 16 and [b[:2] for b in full] == [(e, i) for e in (0, 1) for i in range(8)]
    assert sorted(i for b in full[8:] for i in b[2]) == list(range(32))  # epoch 1 reads every sample once

    # stopped inside epoch 1, inside epoch 0, and by a step checkpoint on the last batch of epoch 0
    for step in (11, 3, 8):
        root = tmp_path / f"step{step}"
        checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=step, save_top_k=-1)
        before, _, dm = _recording_fit(packed, root, num_workers, callbacks=[checkpoint], interrupt_at=step)
        (path,) = root.glob("*.ckpt")
        state = torch.load(path, weights_only=True)["ShardDataModule"]
        assert state == {"epoch": (step - 1) // 8, "batches_done": (step - 1) % 8 + 1}  # fetched batches
        after, trainer, dm = _recording_fit(packed, root, num_workers, ckpt_path=path, max_epochs=2)
        assert trainer.global_step == 16
        assert [b[:4] for b in before + after] == [b[:4] for b in full], step  # same batches, same augmentation
        assert len(after) == 16 - step  # the resumed epoch ends after its remaining batches
        assert [b[4] for b in after] == pytest.approx([b[4] for b in full[step:]], rel=1e-5)  # and the same losses

    # an epoch-end checkpoint (on_train_epoch_end): the next epoch starts whole
    root = tmp_path / "epoch"
    checkpoint = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1)
    before, _, _ = _recording_fit(packed, root, num_workers, callbacks=[checkpoint], max_epochs=1)
    (path,) = root.glob("*.ckpt")
    assert torch.load(path, weights_only=True)["ShardDataModule"] == {"epoch": 0, "batches_done": 8}
    after, trainer, _ = _recording_fit(packed, root, num_workers, ckpt_path=path, max_epochs=2)
    assert trainer.global_step == 16
    assert [b[:4] for b in before + after] == [b[:4] for b in full]

    # a checkpoint saved on validation end inside the epoch (val_check_interval)
    root = tmp_path / "val"
    checkpoint = ModelCheckpoint(dirpath=root, save_on_train_epoch_end=False, save_top_k=-1)
    kwargs = dict(val=True, val_check_interval=3, limit_val_batches=1)
    before, _, _ = _recording_fit(packed, root, num_workers, callbacks=[checkpoint], max_steps=4, **kwargs)
    (path,) = root.glob("*.ckpt")
    assert torch.load(path, weights_only=True)["ShardDataModule"] == {"epoch": 0, "batches_done": 3}
    after, trainer, _ = _recording_fit(packed, root, num_workers, ckpt_path=path, max_epochs=2, **kwargs)
    assert trainer.global_step == 16
    assert [b[:4] for b in before[:3] + after] == [b[:4] for b in full]
