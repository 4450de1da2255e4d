"""mim.data: image folders, Fashion-MNIST, transforms and on-device normalisation."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from mim.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    CorruptImageWarning,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    eval_transform,
    find_fashion_mnist,
    load_fashion_mnist,
    mae_train_transform,
    normalize_image,
)
from mim.data.fashion_mnist import read_idx
from tests.factories import cpu_trainer

# ----------------------------------------------------------------------------------------------- helpers


def _pixels(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)  # (H, W, 3)


def _write_folder(root: Path, layout: dict[str, list[str]], size: int = 16) -> dict[str, np.ndarray]:
    """Write real image files ``root/<class>/<name>``; returns the decoded RGB pixels per path."""
    written = {}
    for i, (cls, names) in enumerate(sorted(layout.items())):
        for j, name in enumerate(names):
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_pixels(100 * i + j, size)).save(path, quality=95)
            with Image.open(path) as image:
                written[str(path)] = np.asarray(image.convert("RGB"))  # what a decoder must return (JPEG is lossy)
    return written


def _normalized_reference(images: torch.Tensor, mean, std) -> torch.Tensor:
    x = images.double() / 255.0
    m = torch.tensor(mean, dtype=torch.float64)[:, None, None]
    s = torch.tensor(std, dtype=torch.float64)[:, None, None]
    return (x - m) / s


# ----------------------------------------------------------------------------------------------- normalisation


def test_normalize_image_matches_formula():
    images = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    images[0, :, 0, 0] = 0
    images[0, :, 0, 1] = 255
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize_image(images, mean, std)
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out.double(), _normalized_reference(images, mean, std), rtol=1e-6, atol=1e-6)
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-mean[c] / std[c], abs=1e-6)
        assert out[0, c, 0, 1].item() == pytest.approx((1 - mean[c]) / std[c], abs=1e-6)
    single = normalize_image(images[1], mean, std)  # (C, H, W) works too
    torch.testing.assert_close(single, out[1])


def test_normalize_image_rejects_float_and_wrong_channels():
    with pytest.raises(TypeError, match="uint8"):
        normalize_image(torch.zeros(1, 3, 2, 2), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="3 channels"):
        normalize_image(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), (0.5,), (0.5,))


# ----------------------------------------------------------------------------------------------- transforms


def test_mae_train_transform_shape_dtype_and_randomness():
    torch.manual_seed(0)
    transform = mae_train_transform(24)
    tensor_in = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    pil_in = Image.fromarray(_pixels(1, 64))
    outs = [transform(tensor_in) for _ in range(8)]
    for out in [*outs, transform(pil_in)]:
        assert type(out) is torch.Tensor and out.dtype == torch.uint8 and out.shape == (3, 24, 24)
    distinct = {out.numpy().tobytes() for out in outs}
    assert len(distinct) == len(outs), "random resized crops should differ across calls"
    grey = mae_train_transform(28)(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8))
    assert grey.shape == (1, 28, 28) and grey.dtype == torch.uint8


def test_mae_train_transform_full_crop_is_identity_or_flip():
    # scale=(1, 1) with a square image leaves only the flip: the output is the image or its mirror.
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    transform = mae_train_transform(16, scale=(1.0, 1.0))
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        out = transform(image)
        if torch.equal(out, image):
            seen.add("same")
        elif torch.equal(out, image.flip(-1)):
            seen.add("flipped")
        else:
            pytest.fail("a full-area crop of a square image must not resample")
    assert seen == {"same", "flipped"}


def test_eval_transform_identity_and_resize():
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    assert torch.equal(eval_transform(28)(image), image)
    out = eval_transform(32, crop_pct=0.875)(torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(32, crop_pct=0.0)


# ----------------------------------------------------------------------------------------------- image folders


def test_image_folder_decodes_jpeg_and_png(tmp_path):
    written = _write_folder(
        tmp_path, {"dog": ["a.png", "b.jpg", "nested/c.PNG"], "cat": ["x.jpeg", "y.png"], "eel": ["z.png"]}
    )
    (tmp_path / "cat" / "notes.txt").write_text("not an image")  # ignored: no image extension
    dm = ImageFolderDataModule(root=tmp_path, val_root=tmp_path, image_size=16, batch_size=6, eval_crop_pct=1.0)
    assert dm.classes == ["cat", "dog", "eel"] and dm.num_classes == 3
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))  # unshuffled: samples in sorted path order
    paths = sorted(written)
    expected_labels = [{"cat": 0, "dog": 1, "eel": 2}[Path(p).relative_to(tmp_path).parts[0]] for p in paths]
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (6, 3, 16, 16)
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == expected_labels
    expected = torch.from_numpy(np.stack([written[p] for p in paths])).permute(0, 3, 1, 2)  # (B, 3, H, W)
    assert torch.equal(batch["image"], expected)

    out = dm.on_after_batch_transfer({"image": batch["image"].clone(), "label": batch["label"]}, 0)
    assert out["image"].dtype == torch.float32
    reference = _normalized_reference(expected, dm.mean, dm.std)
    torch.testing.assert_close(out["image"].double(), reference, rtol=1e-6, atol=1e-6)  # float32 rounding

    train = next(iter(dm.train_dataloader()))  # augmented, shuffled, drop_last
    assert train["image"].dtype == torch.uint8 and train["image"].shape == (6, 3, 16, 16)
    assert sorted(train["label"].tolist()) == sorted(expected_labels)


def test_image_folder_grey_and_resize(tmp_path):
    written = _write_folder(tmp_path, {"a": ["1.png"], "b": ["2.png"]}, size=20)
    dm = ImageFolderDataModule(root=tmp_path, val_root=tmp_path, in_chans=1, image_size=16, batch_size=2)
    assert dm.mean == (0.449,) and dm.in_chans == 1
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16) and batch["image"].dtype == torch.uint8
    # Resize 20 -> floor(16 / 0.875) = 18, centre crop 16, from the "L" conversion of the file.
    grey = Image.fromarray(written[sorted(written)[0]]).convert("L")
    reference = eval_transform(16, crop_pct=0.875)(grey)
    assert torch.equal(batch["image"][0], reference)


def test_image_folder_feeds_lightning_normalised_floats(tmp_path):
    _write_folder(tmp_path, {"a": ["1.png", "2.png"], "b": ["3.png", "4.png"]})
    dm = ImageFolderDataModule(root=tmp_path, image_size=16, batch_size=2, mean=(0.5,) * 3, std=(0.25,) * 3)

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["image"])
            return (batch["image"].mean() * self.weight) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = cpu_trainer(max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and the missing validation loop
        trainer.fit(probe, datamodule=dm)
    assert len(probe.seen) == 2
    for image in probe.seen:
        assert image.dtype == torch.float32 and image.shape == (2, 3, 16, 16)
        # (x / 255 - 0.5) / 0.25 lies in [-2, 2] and hits only multiples of 4/255 on the 8-bit grid.
        assert image.min() >= -2 and image.max() <= 2
        steps = (image + 2) * 255 / 4
        torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)


def test_image_folder_val_fraction_split_is_deterministic(tmp_path):
    _write_folder(tmp_path, {"a": [f"{i}.png" for i in range(6)], "b": [f"{i}.png" for i in range(4)]})
    make = lambda seed: ImageFolderDataModule(root=tmp_path, val_fraction=0.3, batch_size=2, seed=seed)
    first, again, other = make(0), make(0), make(1)
    assert len(first.val_samples) == 3 and len(first.train_samples) == 7
    assert first.val_samples == again.val_samples and first.train_samples == again.train_samples
    assert not set(first.val_samples) & set(first.train_samples)
    assert set(first.val_samples) | set(first.train_samples) == set(other.val_samples) | set(other.train_samples)
    assert first.val_samples != other.val_samples
    with pytest.raises(ValueError, match="not both"):
        ImageFolderDataModule(root=tmp_path, val_root=tmp_path, val_fraction=0.2)


def test_image_folder_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist.*ROOT/<class>/<image>"):
        ImageFolderDataModule(root=missing)
    a_file = tmp_path / "file.jpg"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="file.jpg.*not a directory"):
        ImageFolderDataModule(root=a_file)


def test_image_folder_empty_or_flat_folder_names_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*no subfolders.*ROOT/<class>/<image>"):
        ImageFolderDataModule(root=empty)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(_pixels(0)).save(flat / "img.png")
    with pytest.raises(ValueError, match=r"flat.*1 images directly"):
        ImageFolderDataModule(root=flat)
    no_images = tmp_path / "no_images"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no image files under .*no_images"):
        ImageFolderDataModule(root=no_images)
    partly = tmp_path / "partly"
    _write_folder(partly, {"full": ["1.png"]})
    (partly / "hollow").mkdir()
    with pytest.raises(ValueError, match=r"without image files.*hollow"):
        ImageFolderDataModule(root=partly)


def test_image_folder_validates_arguments(tmp_path):
    _write_folder(tmp_path, {"a": ["1.png"]})
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        ImageFolderDataModule(root=tmp_path, batch_size=0)
    with pytest.raises(ValueError, match=r"in_chans must be one of \(1, 3\), got 2"):
        ImageFolderDataModule(root=tmp_path, in_chans=2)
    with pytest.raises(ValueError, match=r"num_workers must be an integer >= 0, got -1"):
        ImageFolderDataModule(root=tmp_path, num_workers=-1)
    with pytest.raises(ValueError, match=r"mean and .std must have in_chans=3"):
        ImageFolderDataModule(root=tmp_path, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=r"val_root.*class folders \['zebra'\]"):
        val = tmp_path.parent / f"{tmp_path.name}_val"
        _write_folder(val, {"zebra": ["1.png"]})
        ImageFolderDataModule(root=tmp_path, val_root=val)


def test_image_folder_too_few_images_for_a_batch(tmp_path):
    _write_folder(tmp_path, {"a": ["1.png"], "b": ["2.png"]})
    dm = ImageFolderDataModule(root=tmp_path, image_size=16, batch_size=3)
    with pytest.raises(ValueError, match=r"2 training samples is fewer than batch_size=3"):
        dm.train_dataloader()


def test_datamodule_composes_from_yaml(tmp_path):
    # The constructors are the config: a recipe's `data:` block parses and instantiates through jsonargparse.
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    _write_folder(tmp_path, {"a": ["1.png"], "b": ["2.png"]})
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    config = parser.parse_string(
        f"data: {{class_path: mim.data.ImageFolderDataModule, "
        f"init_args: {{root: '{tmp_path}', in_chans: 1, crop_scale: [0.5, 1.0], batch_size: 2}}}}"
    )
    dm = parser.instantiate(config).data
    assert isinstance(dm, ImageFolderDataModule)
    assert (dm.in_chans, dm.crop_scale, dm.batch_size, dm.num_classes) == (1, (0.5, 1.0), 2, 2)


def _write_corrupt(root: Path) -> list[str]:
    garbage = root / "b" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    truncated = root / "a" / "truncated.png"
    Image.fromarray(_pixels(9, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])  # valid header, cut-off data
    return sorted([str(garbage), str(truncated)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_folder_skips_and_counts_corrupt_images(tmp_path, num_workers):
    _write_folder(tmp_path, {"a": ["1.png", "2.png"], "b": ["3.jpg", "4.png"]})
    bad = _write_corrupt(tmp_path)
    dm = ImageFolderDataModule(
        root=tmp_path, val_root=tmp_path, image_size=16, batch_size=3, num_workers=num_workers, eval_crop_pct=1.0
    )
    dm.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(dm.val_dataloader())
    assert [b["image"].shape[0] for b in batches] == [3, 3]  # 6 files, 2 replaced by readable neighbours
    assert all(b["image"].dtype == torch.uint8 for b in batches)
    assert dm.num_skipped == 2 and sorted(dm.skipped_paths()) == bad
    if num_workers == 0:  # workers warn in their own processes
        messages = [str(w.message) for w in caught if issubclass(w.category, CorruptImageWarning)]
        assert len(messages) == 2 and all(any(p in m for m in messages) for p in bad)
    list(dm.val_dataloader())  # a second epoch skips the known-bad files without counting them again
    assert dm.num_skipped == 2


def test_image_folder_all_corrupt_is_an_error(tmp_path):
    for path in (tmp_path / "a" / "x.png", tmp_path / "b" / "y.jpg"):
        path.parent.mkdir()
        path.write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match=r"none of the 2 image files.*can be opened"):
        ImageFolderDataModule(root=tmp_path)


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion_mnist_dir(fashion_mnist: Path) -> Path:
    return fashion_mnist


@pytest.fixture(scope="module")
def fashion_train(fashion_mnist_dir):
    return load_fashion_mnist("train", fashion_mnist_dir)


def test_fashion_mnist_train_split(fashion_train):
    images, labels = fashion_train
    assert images.shape == (60_000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60_000,) and labels.dtype == torch.int64
    assert labels.min() == 0 and labels.max() == 9
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert images.max() == 255 and images.min() == 0


def test_fashion_mnist_test_split(fashion_mnist_dir):
    images, labels = load_fashion_mnist("test", fashion_mnist_dir)
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.bincount(labels, minlength=10).tolist() == [1000] * 10


def test_fashion_mnist_mean_std_constants(fashion_train):
    pixels = fashion_train[0].double() / 255.0  # (N, 1, 28, 28)
    assert pixels.mean().item() == pytest.approx(FASHION_MNIST_MEAN[0], abs=5e-7)
    assert pixels.std(correction=0).item() == pytest.approx(FASHION_MNIST_STD[0], abs=5e-7)


def test_fashion_mnist_datamodule_subset_is_deterministic(fashion_mnist_dir, fashion_train):
    make = lambda seed: FashionMNISTDataModule(num_train=500, num_val=100, batch_size=50, seed=seed)
    first, again, other = make(0), make(0), make(1)
    for dm in (first, again, other):
        dm.setup("fit")
    assert len(first.train_dataset) == 500 and len(first.val_dataset) == 100
    idx = first.train_indices()
    assert torch.equal(idx, again.train_indices()) and not torch.equal(idx, other.train_indices())
    assert torch.equal(idx, idx.unique())  # sorted, no repeats
    assert torch.equal(first.train_dataset.images, fashion_train[0][idx])
    assert torch.equal(first.train_dataset.labels, fashion_train[1][idx])
    assert torch.equal(first.val_dataset.images, again.val_dataset.images)

    batch = next(iter(first.train_dataloader()))
    assert batch["image"].shape == (50, 1, 28, 28) and batch["image"].dtype == torch.uint8
    assert first.num_classes == 10 and first.mean == FASHION_MNIST_MEAN and first.std == FASHION_MNIST_STD
    # Validation is the test split, un-augmented: the loader returns the stored images unchanged.
    val = next(iter(first.val_dataloader()))
    assert torch.equal(val["image"], first.val_dataset.images[:50])
    assert torch.equal(val["label"], first.val_dataset.labels[:50])
    normalised = first.on_after_batch_transfer(val, 0)["image"]
    torch.testing.assert_close(
        normalised.double(),
        _normalized_reference(first.val_dataset.images[:50], FASHION_MNIST_MEAN, FASHION_MNIST_STD),
        rtol=1e-6,
        atol=1e-6,
    )


def test_fashion_mnist_datamodule_resizes_and_validates(fashion_mnist_dir):
    dm = FashionMNISTDataModule(num_train=64, num_val=64, batch_size=16, image_size=32)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape == (16, 1, 32, 32)
    assert next(iter(dm.val_dataloader()))["image"].shape == (16, 1, 32, 32)
    with pytest.raises(ValueError, match=r"num_train must be an integer in \[1, 60000\], got 60001"):
        FashionMNISTDataModule(num_train=60_001)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        FashionMNISTDataModule(batch_size=0)


def test_fashion_mnist_lookup_order_and_missing_message(tmp_path, monkeypatch, fashion_mnist_dir):
    mirror = tmp_path / "mirror" / "fashion-mnist"
    mirror.mkdir(parents=True)
    for f in fashion_mnist_dir.iterdir():
        (mirror / f.name).symlink_to(f)
    monkeypatch.setenv("MIM_DATA_DIR", str(mirror.parent))
    assert find_fashion_mnist() == mirror  # MIM_DATA_DIR comes first
    assert find_fashion_mnist(mirror) == mirror
    with pytest.raises(FileNotFoundError, match=r"nowhere.*make data.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"make data"):
        FashionMNISTDataModule(root=tmp_path / "nowhere")


def test_read_idx_plain_and_gzip(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + np.array([2, 3, 4], dtype=">i4").tobytes() + data.tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), data)
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1]) + raw[4:])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "float")


def test_epoch_shuffle_is_a_function_of_seed_and_epoch():
    from mim.data.base import EpochShuffleSampler

    a, b = EpochShuffleSampler(100, seed=3), EpochShuffleSampler(100, seed=3)
    first = list(a)  # (index, sample_seed) keys
    assert sorted(i for i, _ in first) == list(range(100))
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(i for i, _ in second) == list(range(100))
    b.set_epoch(1)  # a fresh sampler (e.g. after resuming) at the same epoch gives the same order
    assert list(b) == second
    assert list(EpochShuffleSampler(100, seed=4)) != first
