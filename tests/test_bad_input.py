"""Bad input handled right: 16-bit images, images smaller than the crop, missing shard paths, bad samples counted
once, unknown timm names. Real files in tmp_path (PNG, PGM, TIFF, tar shards)."""

from __future__ import annotations

import io
import random
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mim.data.decode import (
    SmallImageCheck,
    SmallImageWarning,
    convert_image,
    decode_center_crop,
    decode_random_resized_crop,
    open_image,
)
from mim.data.folder import CorruptImageWarning
from mim.data.pack import encode_image, pack
from mim.data.shards import ShardDataModule
from mim.data.video_shards import VideoShardDataModule, VideoShardDataset
from mim.models.encoder import MaskedEncoder, check_timm_name
from tests.factories import write_tar

# 16-bit values around the rounding edges (v = 257 k + 128 is just below k + 0.5) and the extremes
VALUES = np.array([0, 1, 128, 129, 385, 386, 257, 32767, 32768, 65407, 65408, 65534, 65535], dtype=np.uint16)


def _expected(values: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) per value, in Python."""
    return np.array([round(int(v) * 255 / 65535) for v in values.flat], dtype=np.uint8).reshape(values.shape)


def _grey16(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(H, W) uint16 with VALUES first and random values after them."""
    array = np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)
    array.flat[: VALUES.size] = VALUES
    return array


def _png16(array: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL writes only 16-bit grey): colour type 0 grey, 2 RGB, 4 grey + alpha."""
    big = np.ascontiguousarray(array, dtype=">u2")
    height, width = big.shape[:2]
    raw = b"".join(b"\x00" + big[y].tobytes() for y in range(height))  # filter 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _png8(size: int, value: int = 90) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------- 16-bit images


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path: Path):
    array = _grey16((6, 7))
    path = tmp_path / "grey16.png"
    Image.fromarray(array).save(path)  # PIL writes uint16 as a 16-bit grey PNG
    with Image.open(path) as image:
        assert image.mode == "I;16" and image.format == "PNG"
        assert np.asarray(image.convert("L")).max() == 255  # what PIL alone does: clipped
    expected = _expected(array)
    assert np.array_equal(np.asarray(open_image(str(path), "L")), expected)
    rgb = np.asarray(open_image(str(path), "RGB"))  # (H, W, 3)
    assert rgb.shape == (6, 7, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))


def test_big_endian_16bit_and_pgm_mode_i_are_scaled(tmp_path: Path):
    array = _grey16((3, 5), seed=1)
    big = Image.frombytes("I;16B", (5, 3), array.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(convert_image(big, "L")), _expected(array))
    pgm = tmp_path / "grey16.pgm"
    pgm.write_bytes(b"P5\n5 3\n65535\n" + array.astype(">u2").tobytes())
    with Image.open(pgm) as image:
        assert image.mode == "I"  # 32-bit integer mode; PGM samples are stretched to 16 bits by PIL
    assert np.array_equal(np.asarray(open_image(str(pgm), "L")), _expected(array))


def _tiff12(values: np.ndarray) -> bytes:
    """A little-endian 12-bit grey TIFF written by hand (PIL writes no 12-bit TIFF; it reads one as I;16)."""
    height, width = values.shape
    packed = bytearray()
    for a, b in values.reshape(-1, 2).tolist():  # two 12-bit samples in three bytes, most significant bits first
        packed += bytes([a >> 4, ((a & 0xF) << 4) | (b >> 8), b & 0xFF])
    tags = [(256, width), (257, height), (258, 12), (259, 1), (262, 1), (273, 0), (277, 1), (278, height)]
    tags.append((279, len(packed)))
    offset = 8 + 2 + 12 * len(tags) + 4  # the pixel data follow the one IFD
    out = bytearray(b"II\x2a\x00" + struct.pack("<IH", 8, len(tags)))
    for tag, value in tags:
        out += struct.pack("<HHII", tag, 4, 1, offset if tag == 273 else value)  # LONG values
    return bytes(out + struct.pack("<I", 0) + packed)


def test_12bit_tiff_scales_by_its_bit_depth(tmp_path: Path):
    values = np.array([[0, 1, 8, 9, 2047, 2048, 4094, 4095]], dtype=np.uint16)
    path = tmp_path / "grey12.tif"
    path.write_bytes(_tiff12(values))
    with Image.open(path) as image:
        assert image.mode == "I;16" and np.array_equal(np.asarray(image), values)  # raw 12-bit values
    got = np.asarray(open_image(str(path), "L"))
    assert got.tolist() == [[round(v * 255 / 4095) for v in values[0].tolist()]]


def test_float_and_32bit_images_are_refused_naming_the_file(tmp_path: Path):
    for name, array in (("float.tif", np.array([[0.0, 0.5]], np.float32)), ("int32.tif", np.array([[0, 9]], np.int32))):
        path = tmp_path / name
        Image.fromarray(array).save(path)
        with pytest.raises(ValueError, match=f"{name}.*no known value range.*convert it to an 8-bit or 16-bit PNG"):
            open_image(str(path), "RGB")


def test_decoders_scale_16bit_png_bytes():
    array = _grey16((16, 16), seed=2)
    data = _png16(array, 0)
    # a centre crop of an image of the output size is the image itself
    out = decode_center_crop(data, 16, mode="L", crop_pct=1.0)  # (1, 16, 16)
    assert torch.equal(out[0], torch.from_numpy(_expected(array)))
    rgb = decode_center_crop(data, 16, mode="RGB", crop_pct=1.0)  # (3, 16, 16)
    assert all(torch.equal(rgb[c], torch.from_numpy(_expected(array))) for c in range(3))
    flat = np.full((40, 40), 30000, dtype=np.uint16)  # a constant image stays constant under any crop
    crop = decode_random_resized_crop(_png16(flat, 0), 16, random.Random(0))
    assert crop.shape == (3, 16, 16) and bool((crop == round(30000 * 255 / 65535)).all())


def test_16bit_rgb_and_grey_alpha_pngs_keep_the_high_byte():
    """PIL itself reduces 48-bit RGB and 32-bit grey + alpha PNGs to 8 bits (v >> 8, at most 1 off the rounding)."""
    rgb = np.stack([_grey16((4, 5), seed=s) for s in (3, 4, 5)], axis=-1)  # (H, W, 3) uint16
    with Image.open(io.BytesIO(_png16(rgb, 2))) as image:
        assert image.mode == "RGB"
        got = np.asarray(convert_image(image, "RGB"))  # (H, W, 3)
    assert np.array_equal(got, (rgb >> 8).astype(np.uint8))
    assert int(np.abs(got.astype(int) - _expected(rgb).astype(int)).max()) <= 1
    grey_alpha = np.stack([_grey16((4, 5), seed=6), np.full((4, 5), 65535, np.uint16)], axis=-1)
    with Image.open(io.BytesIO(_png16(grey_alpha, 4))) as image:
        got = np.asarray(convert_image(image, "L"))
    assert np.array_equal(got, (grey_alpha[..., 0] >> 8).astype(np.uint8))


def test_pack_scales_16bit_png(tmp_path: Path):
    # constant 8x8 blocks: JPEG keeps a flat block exactly at quality 100
    levels = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    array = np.kron(levels, np.ones((8, 8), dtype=np.uint16))  # (16, 16)
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(array).save(tmp_path / "src" / "a" / "grey16.png")
    data = encode_image(str(tmp_path / "src" / "a" / "grey16.png"), None, 100)
    assert data is not None
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert np.array_equal(decoded, np.kron(_expected(levels), np.ones((8, 8), dtype=np.uint8)))
    index = pack(tmp_path / "src", tmp_path / "out", quality=100, progress=False)
    assert index["num_samples"] == 1 and index["num_skipped"] == 0
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        jpeg = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg"))  # type: ignore[union-attr]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(jpeg)).convert("L")), decoded)


def test_pack_names_why_a_float_image_is_skipped(tmp_path: Path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "src" / "a" / "ok.png")
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "src" / "a" / "float.tif")
    with pytest.warns(CorruptImageWarning, match="float.tif.*no known value range"):
        index = pack(tmp_path / "src", tmp_path / "out", progress=False)
    assert index["num_samples"] == 1 and index["skipped"] == [str(tmp_path / "src" / "a" / "float.tif")]


# ------------------------------------------------------------------------------------- images smaller than the crop


def test_small_image_check_warns_once():
    check = SmallImageCheck("ImageFolderDataModule", 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check("big.png", 32, 40) is False
        assert check("a/small.png", 20, 48) is True
        assert check("a/smaller.png", 10, 10) is True
    messages = [str(w.message) for w in caught if issubclass(w.category, SmallImageWarning)]
    assert messages == [
        "ImageFolderDataModule: some images are smaller than image_size=32 and are upsampled by every crop, "
        "e.g. a/small.png (20x48 pixels, height x width); lower image_size or use larger images "
        "(warned once per dataset)"
    ]


def test_shards_warn_once_about_small_images(tmp_path: Path):
    write_tar(tmp_path / "s.tar", {f"{i:03d}.png": _png8(20 + i) for i in range(4)})
    dm = ShardDataModule(urls=str(tmp_path / "s.tar"), samples_per_epoch=4, num_classes=1, image_size=32, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = dm.train_dataloader()
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]  # what Lightning calls
            assert len(list(loader)) == 2
    small = [str(w.message) for w in caught if issubclass(w.category, SmallImageWarning)]
    assert len(small) == 1 and "image_size=32" in small[0] and "in " + str(tmp_path / "s.tar") in small[0]
    assert dm.train_dataset is not None and bool(dm.train_dataset.small_images.warned[0])


# ------------------------------------------------------------------------------------------- shard paths that are not


def test_missing_shard_folder_is_named_first(tmp_path: Path):
    pattern = str(tmp_path / "missing" / "dir" / "shard-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError) as info:
        ShardDataModule(urls=pattern)  # no samples_per_epoch: that message must not come first
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"ShardDataModule.urls must name existing shards, got {pattern!r}")
    assert f"the folder {str(tmp_path / 'missing' / 'dir')!r} does not exist" in first
    folder = str(tmp_path / "missing" / "dir")
    with pytest.raises(FileNotFoundError, match=f"{folder}' does not exist"):
        ShardDataModule(urls=folder)
    with pytest.raises(FileNotFoundError, match="VideoShardDataModule.urls must name existing shards"):
        VideoShardDataModule(urls=pattern)


def test_empty_folder_and_pattern_matching_nothing(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match="ShardDataModule.urls must be a folder written by `mim pack`.*is empty"
    ):
        ShardDataModule(urls=str(tmp_path / "empty"))
    pattern = str(tmp_path / "empty" / "shard-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="none of its 4 files exists"):
        ShardDataModule(urls=pattern, samples_per_epoch=4, num_classes=1)
    (tmp_path / "loose").mkdir()
    write_tar(tmp_path / "loose" / "shard-000000.tar", {})
    with pytest.raises(FileNotFoundError, match=r"holds 1 \.tar files .* but no index\.json; pass them as a brace"):
        ShardDataModule(urls=str(tmp_path / "loose"))
    write_tar(tmp_path / "train.tar", {"000.png": _png8(8)})
    with pytest.raises(FileNotFoundError, match="ShardDataModule.val_urls must name existing shards"):
        ShardDataModule(
            urls=str(tmp_path / "train.tar"),
            val_urls=str(tmp_path / "nothing.tar"),
            samples_per_epoch=1,
            val_samples=1,
            num_classes=1,
        )


# ---------------------------------------------------------------------------------------- bad samples counted once


def _shards_with_one_bad_member(tmp_path: Path) -> list[str]:
    """Two shards of 3 readable 8x8 PNGs, the second with one corrupt member (key 004)."""
    write_tar(tmp_path / "a.tar", {f"{i:03d}.png": _png8(8, 10 * i) for i in range(3)})
    members = {f"{i:03d}.png": _png8(8, 10 * i) for i in range(3, 6)}
    members["004.png"] = b"\x89PNG\r\n\x1a\n not a png"
    write_tar(tmp_path / "b.tar", members)
    return [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_member_is_counted_once_over_epochs(tmp_path: Path, num_workers: int):
    urls = _shards_with_one_bad_member(tmp_path)
    # 8 samples per epoch from 5 readable ones: each epoch reads the bad member at least once, by any worker
    dm = ShardDataModule(
        urls=urls,
        samples_per_epoch=8,
        num_classes=1,
        image_size=8,
        batch_size=4 if num_workers == 0 else 2,
        shuffle_buffer=1,
        max_corrupt=1,  # a second count would raise
        num_workers=num_workers,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = dm.train_dataloader()
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]  # what Lightning calls
            assert sum(len(b["image"]) for b in loader) == 8
            assert dm.num_corrupt == 1
    if num_workers == 0:  # warnings of worker processes do not reach this process
        skips = [str(w.message) for w in caught if issubclass(w.category, CorruptImageWarning)]
        assert len(skips) == 1 and "sample 004.png in " + urls[1] in skips[0]


def test_unreadable_shard_and_train_val_overlap_count_once(tmp_path: Path):
    urls = _shards_with_one_bad_member(tmp_path)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00\x01not a tar" * 200)
    dm = ShardDataModule(
        urls=[*urls, str(garbage)],
        val_urls=urls[1:],  # the shard with the bad member, read twice per pass (2 readable samples)
        samples_per_epoch=8,
        val_samples=4,
        num_classes=1,
        image_size=8,
        batch_size=4,
        shuffle_buffer=1,
        max_corrupt=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            list(dm.train_dataloader())
            list(dm.val_dataloader())
    assert dm.train_dataset is not None and dm.val_dataset is not None
    assert dm.train_dataset.num_corrupt == 2 and dm.val_dataset.num_corrupt == 1  # bad member + garbage shard
    assert dm.num_corrupt == 2  # the bad member of the validation shards is the training one


class _StubDecoder:
    """A ClipDecoder stand-in: b"bad" is undecodable, anything else one frame."""

    def read(self, data: bytes) -> torch.Tensor:
        if data == b"bad":
            raise ValueError("invalid data found when processing input")
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)  # (T, C, H, W)

    def clips(self, frames: torch.Tensor, label: int) -> dict[str, torch.Tensor]:
        return {"video": frames.permute(1, 0, 2, 3)[None], "label": torch.tensor([label])}


def test_video_shard_bad_member_is_counted_once(tmp_path: Path):
    write_tar(tmp_path / "v.tar", {"000.mp4": b"ok", "001.mp4": b"bad", "002.mp4": b"ok", "003.mp4": b"ok"})
    dataset = VideoShardDataset(
        [str(tmp_path / "v.tar")], num_samples=4, batch_size=2, decoder=_StubDecoder(), shuffle_buffer=1, max_corrupt=1
    )
    loader = DataLoader(dataset, batch_size=2, collate_fn=lambda samples: samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in range(3):
            dataset.set_epoch(epoch)
            assert sum(len(b) for b in loader) == 4
    assert dataset.num_corrupt == 1


# ------------------------------------------------------------------------------------------------ unknown timm names


def test_unknown_timm_name_suggests_close_vit_names():
    with pytest.raises(ValueError) as info:
        MaskedEncoder(arch="vit_tinyy_patch16_224")
    message = str(info.value)
    assert message.startswith("MaskedEncoder.arch must be a timm model name (did you mean 'vit_tiny_patch16_224' or ")
    assert message.endswith("got 'vit_tinyy_patch16_224'; list them with timm.list_models('vit_*')")
    with pytest.raises(ValueError, match="did you mean 'deit_small_patch16_224'"):
        check_timm_name("Owner", "arch", "deit_smal_patch16_224")
    assert check_timm_name("Owner", "arch", "vit_base_patch16_224") == "vit_base_patch16_224"


def test_pretrained_timm_name_checks_the_tag():
    assert check_timm_name("finetune", "checkpoint", "vit_base_patch16_224.mae", pretrained=True)
    assert check_timm_name("finetune", "checkpoint", "local-dir:/some/folder", pretrained=True)
    with pytest.raises(ValueError, match=r"with pretrained weights \(did you mean 'vit_base_patch16_224.mae'"):
        check_timm_name("finetune", "checkpoint", "vit_base_patch16_224.maee", pretrained=True)
    with pytest.raises(ValueError, match="finetune.checkpoint must be a timm model name"):
        check_timm_name("finetune", "checkpoint", "vitt_base_patch16_224.mae", pretrained=True)


def test_image_folder_scales_16bit_pngs_and_warns_once_about_small_images(tmp_path: Path):
    from mim.data import ImageFolderDataModule

    arrays = [_grey16((12, 12), seed=i) for i in range(4)]
    for i, array in enumerate(arrays):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(array).save(tmp_path / f"c{i % 2}" / f"{i}.png")  # 16-bit grey PNGs, 12 x 12
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, in_chans=1, batch_size=2, val_fraction=0.0)
    dm.setup("fit")
    dataset = dm.train_dataset
    with pytest.warns(SmallImageWarning) as caught:
        decoded = [np.asarray(dataset.decode_file(i)) for i in range(len(dataset))]
    assert len(caught) == 1 and "12" in str(caught[0].message) and "16" in str(caught[0].message)  # once, with sizes
    by_path = {dataset.file_path(i): image for i, image in enumerate(decoded)}
    for i, array in enumerate(arrays):
        assert np.array_equal(by_path[str(tmp_path / f"c{i % 2}" / f"{i}.png")], _expected(array))  # not all 255
