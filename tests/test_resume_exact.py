"""Exact mid-epoch resume for the map-style datamodules: Fashion-MNIST, image folders, video files and tables.

Each test trains a tiny PretrainModule with real Lightning trainers, uninterrupted and then stopped by a step
checkpoint inside an epoch and resumed from it, recording every step's epoch, batch index, batch tensors, loss and
learning rate; the resumed run must reproduce the uninterrupted one exactly (CPU, bit-identical losses). The
sampler tests check :class:`EpochShuffleSampler`'s order, rank shares, seeds and skip against its specification.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from mim.data.base import EpochShuffleSampler, TensorImageDataset, sample_key, seeded_draws
from mim.data.transforms import mae_train_transform
from mim.masking import RandomMasking
from mim.module import PretrainModule
from mim.targets import FeatureTarget, PixelTarget
from mim.types import step_seed
from tests.factories import StopAt, cpu_trainer, tiny_encoder, tiny_table_encoder, tiny_video_encoder

Step = tuple[int, int, dict[str, torch.Tensor], torch.Tensor, float]  # epoch, batch_idx, batch, loss, lr


class _Recording(PretrainModule):
    """PretrainModule that keeps, per training step, (epoch, batch_idx, batch tensors, loss, lr) in ``steps``."""

    steps: list[Step]

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
        tensors = {k: v.detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.steps.append((self.current_epoch, batch_idx, tensors, loss.detach().clone(), lr))
        return loss

    def on_train_end(self) -> None:
        out = getattr(self, "out", None)  # spawned ranks hand their steps back through files
        if out is not None:
            torch.save(self.steps, Path(out) / f"rank{self.global_rank}.pt")


def _module(encoder: Any, target: Any) -> _Recording:
    module = _Recording(encoder=encoder, masking=RandomMasking(mask_ratio=0.5), targets=[target], blr=1e-2,
                        warmup_steps=2)  # fmt: skip
    module.steps = []
    return module


def _fit(
    make: Callable[[], tuple[L.LightningDataModule, _Recording]],
    root: Path,
    *,
    callbacks: tuple = (),
    ckpt_path: Path | None = None,
    **limits: Any,
) -> tuple[list[Step], L.LightningDataModule]:
    data, module = make()
    trainer = cpu_trainer(default_root_dir=root, callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                          num_sanity_val_steps=0, **limits)  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dataloader is\\s+not resumable.*")  # Lightning's generic note
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module.steps, data


def _assert_same_steps(got: list[Step], want: list[Step]) -> None:
    assert [s[:2] for s in got] == [s[:2] for s in want]
    for (epoch, idx, batch, loss, lr), (_, _, batch_want, loss_want, lr_want) in zip(got, want):
        assert batch.keys() == batch_want.keys()
        for key in batch:
            assert torch.equal(batch[key], batch_want[key]), (epoch, idx, key)
        assert torch.equal(loss, loss_want), (epoch, idx, float(loss), float(loss_want))  # bit-identical
        assert lr == lr_want, (epoch, idx)


def _resume_matches(
    make: Callable[[], tuple[L.LightningDataModule, _Recording]],
    tmp_path: Path,
    *,
    full: list[Step],
    step: int,
    max_epochs: int,
    name: str,
    expected_state: dict[str, int],
) -> None:
    """Stop at ``step`` with a step checkpoint, resume from it and compare with ``full``."""
    root = tmp_path / f"step{step}"
    checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=step, save_top_k=-1)
    before, _ = _fit(make, root, callbacks=(checkpoint, StopAt(step)), max_epochs=max_epochs)
    assert len(before) == step
    (path,) = root.glob("*.ckpt")
    state = torch.load(path, weights_only=True)[name]
    assert {k: state[k] for k in ("epoch", "batches_done")} == expected_state
    after, _ = _fit(make, root, ckpt_path=path, max_epochs=max_epochs)
    assert len(after) == len(full) - step  # the resumed epoch ends after its remaining batches
    _assert_same_steps(before + after, full)


# ------------------------------------------------------------------------------------------------ sampler


def test_sampler_rank_shares_are_disjoint_and_cover_the_padded_permutation():
    n, world, batch = 10, 3, 2
    samplers = [EpochShuffleSampler(n, seed=7, batch_size=batch, num_replicas=world, rank=r) for r in range(world)]
    assert all(isinstance(s, DistributedSampler) for s in samplers)  # Lightning does not wrap it under DDP
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        shares = [list(s) for s in samplers]
        assert [len(share) for share in shares] == [4, 4, 4] and [len(s) for s in samplers] == [4, 4, 4]
        order = samplers[0].global_order(epoch)
        assert sorted(order[:n]) == list(range(n)) and order[n:] == order[: 12 - n]  # padded with its start
        interleaved = [shares[p % world][p // world] for p in range(12)]  # position p belongs to rank p % world
        assert [index for index, _ in interleaved] == order
        assert [seed for _, seed in interleaved] == [step_seed(7, epoch, p) for p in range(12)]
        assert len({seed for _, seed in interleaved}) == 12  # padded repeats get their own draws
    # one rank of a single-process run sees the same (index, seed) at each position as the ranks of a 3-process run
    single = EpochShuffleSampler(n, seed=7, batch_size=batch)
    single.set_epoch(1)
    assert list(single) == [(samplers[0].global_order(1)[p], step_seed(7, 1, p)) for p in range(n)]


def test_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    first = list(a)
    assert sorted(i for i, _ in first) == list(range(50))
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)  # a fresh sampler at the same epoch (e.g. after resuming) gives the same keys
    assert list(b) == second
    assert list(EpochShuffleSampler(50, seed=4)) != first


def test_sampler_skip_keeps_len_and_touches_one_epoch():
    s = EpochShuffleSampler(20, seed=1, batch_size=3, num_replicas=2, rank=1)
    whole = {epoch: s.keys(epoch) for epoch in (2, 3)}
    assert len(s) == 10 and s.batches_per_epoch == 3
    s.resume_from(2, 2)  # two batches of this rank already consumed in epoch 2
    assert s.epoch == 2 and len(s) == 10
    assert list(s) == whole[2][6:]
    s.set_epoch(3)
    assert list(s) == whole[3]  # the next epoch is whole
    s.set_epoch(2)
    assert list(s) == whole[2][6:]  # a skip belongs to its epoch
    s.resume_from(2, 3)  # every whole batch of epoch 2 done (an epoch-end checkpoint): epoch 3 starts whole
    assert s.epoch == 3 and list(s) == whole[3]
    with pytest.raises(ValueError, match=r"EpochShuffleSampler.rank must be an integer in \[0, 1\], got 2"):
        EpochShuffleSampler(20, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match=r"batches_done must be an integer >= 0, got -1"):
        s.resume_from(0, -1)


def test_dataset_draws_depend_on_the_sample_seed_only():
    images = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = TensorImageDataset(images, torch.arange(4), mae_train_transform(16, rand_augment=9))
    torch.manual_seed(1)
    first = data[(2, 123)]["image"]
    torch.manual_seed(2)
    state = torch.get_rng_state()
    assert torch.equal(data[(2, 123)]["image"], first)  # whatever the global generator's state ...
    assert torch.equal(torch.get_rng_state(), state)  # ... which the sample leaves untouched
    assert not torch.equal(data[(2, 124)]["image"], first)
    assert sample_key(5) == (5, None) and data[1]["image"].shape == (3, 16, 16)  # plain indices still work
    with seeded_draws(9):
        a = torch.rand(3)
    with seeded_draws(9):
        assert torch.equal(torch.rand(3), a)


def test_loader_batches_do_not_depend_on_the_worker_count():
    images = torch.randint(0, 256, (12, 1, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = TensorImageDataset(images, torch.arange(12), mae_train_transform(16))

    def batches(workers: int) -> list[torch.Tensor]:
        sampler = EpochShuffleSampler(12, seed=5, batch_size=4)
        sampler.set_epoch(1)
        return [b["image"] for b in DataLoader(data, sampler=sampler, batch_size=4, num_workers=workers)]

    one, two = batches(0), batches(2)
    assert len(one) == 3 and all(torch.equal(a, b) for a, b in zip(one, two))


# ------------------------------------------------------------------------------------------- image folder


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """24 real image files (PNG and JPEG, sizes 20 x 24 and 24 x 20) in two class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        shape = (20, 24, 3) if i % 3 else (24, 20, 3)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.{'png' if i % 4 else 'jpg'}")
    return root


def _image_folder(root: Path, num_workers: int) -> Callable[[], tuple[L.LightningDataModule, _Recording]]:
    from mim.data import ImageFolderDataModule

    def make() -> tuple[L.LightningDataModule, _Recording]:
        data = ImageFolderDataModule(root=root, image_size=16, batch_size=4, val_fraction=0.2, num_workers=num_workers,
                                     rand_augment=5, seed=3)  # fmt: skip
        target = PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
        return data, _module(tiny_encoder(img_size=16, patch_size=8), target)

    return make


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_folder_resume_is_exact(image_root: Path, tmp_path: Path, num_workers: int):
    full, data = _fit(_image_folder(image_root, 0), tmp_path / "full", max_epochs=2, limit_val_batches=0)
    assert len(data.train_samples) == 19 and len(full) == 8  # 4 whole batches of 4 per epoch
    make = _image_folder(image_root, num_workers)  # the resumed runs may use another worker count
    name = "ImageFolderDataModule"
    _resume_matches(make, tmp_path, full=full, step=6, max_epochs=2, name=name,
                    expected_state={"epoch": 1, "batches_done": 2})  # fmt: skip
    if num_workers:
        return
    # inside the first epoch, and a step checkpoint on the epoch's last batch (the next epoch then starts whole)
    for step, state in ((1, {"epoch": 0, "batches_done": 1}), (4, {"epoch": 0, "batches_done": 4})):
        _resume_matches(make, tmp_path, full=full, step=step, max_epochs=2, name=name, expected_state=state)

    # an epoch-end checkpoint (on_train_epoch_end): the next epoch starts whole
    root = tmp_path / "epoch"
    checkpoint = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1)
    before, _ = _fit(make, root, callbacks=(checkpoint, StopAt(4)), max_epochs=2)
    (path,) = root.glob("*.ckpt")
    assert torch.load(path, weights_only=True)[name] == {"epoch": 0, "batches_done": 4}
    after, _ = _fit(make, root, ckpt_path=path, max_epochs=2)
    _assert_same_steps(before + after, full)


def test_image_folder_resume_after_a_mid_epoch_validation(image_root: Path, tmp_path: Path):
    """A checkpoint written on validation end inside an epoch resumes right after the batches trained so far."""
    make = _image_folder(image_root, 0)
    limits = dict(val_check_interval=3, limit_val_batches=1, max_epochs=2)
    full, _ = _fit(make, tmp_path / "full", **limits)
    root = tmp_path / "val"
    checkpoint = ModelCheckpoint(dirpath=root, save_on_train_epoch_end=False, save_top_k=-1)
    before, _ = _fit(make, root, callbacks=(checkpoint, StopAt(4)), **limits)
    path = root / "epoch=0-step=3.ckpt"  # after the validation at batch 3 (another follows at the epoch's end)
    assert torch.load(path, weights_only=True)["ImageFolderDataModule"] == {"epoch": 0, "batches_done": 3}
    after, _ = _fit(make, root, ckpt_path=path, **limits)
    _assert_same_steps(before[:3] + after, full)


def test_a_new_fit_after_a_resumed_one_starts_whole(image_root: Path, tmp_path: Path):
    make = _image_folder(image_root, 0)
    full, _ = _fit(make, tmp_path / "full", max_steps=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    _fit(make, tmp_path / "ckpt", callbacks=(checkpoint,), max_steps=2)
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    data, module = make()
    cpu_trainer(default_root_dir=tmp_path, max_steps=3).fit(module, datamodule=data, ckpt_path=path)
    module.steps = []
    cpu_trainer(default_root_dir=tmp_path, max_steps=3).fit(module, datamodule=data)  # no checkpoint this time
    assert [s[:2] for s in module.steps] == [(0, 0), (0, 1), (0, 2)]
    assert all(torch.equal(a[2]["image"], b[2]["image"]) for a, b in zip(module.steps, full))


# ------------------------------------------------------------------------------------------ Fashion-MNIST


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_fashion_mnist_resume_is_exact(tmp_path: Path, num_workers: int):
    from mim.data import FashionMNISTDataModule

    def make(workers: int) -> Callable[[], tuple[L.LightningDataModule, _Recording]]:
        def build() -> tuple[L.LightningDataModule, _Recording]:
            data = FashionMNISTDataModule(image_size=16, batch_size=8, num_train=40, num_val=8, crop_scale=(0.3, 1.0),
                                          num_workers=workers, seed=1)  # fmt: skip
            target = PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2, norm_pix=True)
            return data, _module(tiny_encoder(img_size=16, in_chans=1, patch_size=4), target)

        return build

    full, _ = _fit(make(0), tmp_path / "full", max_epochs=2, limit_val_batches=0)
    assert len(full) == 10
    _resume_matches(make(num_workers), tmp_path, full=full, step=7, max_epochs=2, name="FashionMNISTDataModule",
                    expected_state={"epoch": 1, "batches_done": 2})  # fmt: skip


# ------------------------------------------------------------------------------------------------- video


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """8 real H.264 clips of 10 frames of 24 x 32 (moving gradients, one offset per clip) in two class folders."""
    av = pytest.importorskip("av")
    root = tmp_path_factory.mktemp("videos")
    yy, xx = np.meshgrid(np.arange(24), np.arange(32), indexing="ij")
    for v in range(8):
        folder = root / ("a" if v % 2 else "b")
        folder.mkdir(exist_ok=True)
        with av.open(str(folder / f"{v}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv444p"
            stream.options = {"crf": "0"}
            for t in range(10):
                frame = np.stack([xx * 7 + 13 * t, yy * 9 + 31 * v, (xx + yy) * 5 + 3 * t * v], -1) % 256
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_video_folder_resume_is_exact(video_root: Path, tmp_path: Path, num_workers: int):
    from mim.data import VideoDataModule

    def make(workers: int) -> Callable[[], tuple[L.LightningDataModule, _Recording]]:
        def build() -> tuple[L.LightningDataModule, _Recording]:
            data = VideoDataModule(root=video_root, num_frames=4, frame_stride=2, image_size=16, batch_size=2,
                                   num_repeats=2, flip=True, num_workers=workers, seed=2)  # fmt: skip
            target = PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
            return data, _module(tiny_video_encoder(patch_size=8), target)

        return build

    full, _ = _fit(make(0), tmp_path / "full", max_epochs=2)
    assert len(full) == 8 and full[0][2]["video"].shape == (4, 3, 4, 16, 16)  # 2 videos x 2 clips
    _resume_matches(make(num_workers), tmp_path, full=full, step=5, max_epochs=2, name="VideoDataModule",
                    expected_state={"epoch": 1, "batches_done": 1})  # fmt: skip


# ------------------------------------------------------------------------------------------------- table


@pytest.mark.parametrize("num_workers", [0, 2])
def test_table_resume_is_exact(tmp_path: Path, num_workers: int):
    from mim.data.tables import TableDataModule, sklearn_table

    path = sklearn_table("wine", tmp_path)

    def make(workers: int) -> Callable[[], tuple[L.LightningDataModule, _Recording]]:
        def build() -> tuple[L.LightningDataModule, _Recording]:
            data = TableDataModule(train_path=path, label_column="target", batch_size=32, num_workers=workers, seed=4)
            target = FeatureTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
            return data, _module(tiny_table_encoder(), target)

        return build

    full, _ = _fit(make(0), tmp_path / "full", max_epochs=2)
    assert len(full) == 2 * math.floor(178 / 32)
    _resume_matches(make(num_workers), tmp_path, full=full, step=8, max_epochs=2, name="TableDataModule",
                    expected_state={"epoch": 1, "batches_done": 3})  # fmt: skip


# ------------------------------------------------------------------------------------------- two processes


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_ranks_share_the_order_and_resume_exactly(image_root: Path, tmp_path: Path):
    """DDP on 2 CPU processes (gloo): Lightning keeps the sampler (no wrapper), the ranks' batches of 2 images are
    the single-process batches of 4 split by position (same images, same augmentation), and a run resumed from a
    mid-epoch checkpoint replays the uninterrupted one on both ranks."""
    from mim.data import ImageFolderDataModule

    def make(batch_size: int) -> Callable[[], tuple[L.LightningDataModule, _Recording]]:
        def build() -> tuple[L.LightningDataModule, _Recording]:
            data = ImageFolderDataModule(root=image_root, image_size=16, batch_size=batch_size, val_fraction=0.2,
                                         rand_augment=5, seed=3)  # fmt: skip
            target = PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
            return data, _module(tiny_encoder(img_size=16, patch_size=8), target)

        return build

    def spawned(root: Path, **kwargs: Any) -> list[list[Step]]:
        root.mkdir(parents=True, exist_ok=True)
        data, module = make(2)()
        module.out = str(root)
        callbacks = kwargs.pop("callbacks", [])
        trainer = cpu_trainer(devices=2, strategy="ddp_spawn", default_root_dir=root, callbacks=callbacks,
                              enable_checkpointing=bool(callbacks), num_sanity_val_steps=0, limit_val_batches=0,
                              max_epochs=2)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, datamodule=data, **kwargs)
        return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]

    single, _ = _fit(make(4), tmp_path / "single", max_epochs=2, limit_val_batches=0)
    full = spawned(tmp_path / "full")
    assert [len(steps) for steps in full] == [10, 10]  # 19 images: 10 a rank (one padded), 5 batches of 2 an epoch
    for s, (a, b) in enumerate(zip(full[0][:4], full[1][:4])):  # the single process's 4 batches of 4 of epoch 0
        interleaved = torch.stack([a[2]["image"], b[2]["image"]], 1).flatten(0, 1)  # positions 4s, 4s + 1, ...
        assert torch.equal(interleaved, single[s][2]["image"]), s

    root = tmp_path / "resumed"
    checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=6, save_top_k=-1)
    before = spawned(root, callbacks=[checkpoint, StopAt(6)])
    after = spawned(root, ckpt_path=root / "epoch=1-step=6.ckpt")
    for rank in range(2):
        assert len(before[rank]) == 6 and len(after[rank]) == 4
        _assert_same_steps(before[rank] + after[rank], full[rank])
