"""`mim masks`: the picture's size follows the documented layout and its pixels decode back to the masks drawn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from mim import viz
from mim.cli import main
from mim.masking import MultiBlockMasking, RandomMasking, TubeMasking
from mim.masking.base import MaskingStrategy, ScoreMasking
from mim.types import Masks, TokenGrid

CPU = torch.device("cpu")


# ---------------------------------------------------------------------- helpers (the layout, written out independently)
def _size(grid: TokenGrid, samples: int, cell: int, slots: int | None = None, top: int = 0) -> tuple[int, int]:
    slots = grid.t if slots is None else slots
    return cell + slots * (grid.w * cell + cell), top + cell + samples * (grid.h * cell + cell)


def _origin(grid: TokenGrid, cell: int, s: int, t: int, h: int, w: int, top: int = 0) -> tuple[int, int]:
    return cell + t * (grid.w * cell + cell) + w * cell, top + cell + s * (grid.h * cell + cell) + h * cell


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _draw(strategy: MaskingStrategy, grid: TokenGrid, samples: int, seed: int, progress: float = 0.0) -> Masks:
    """What the command draws: one generator seeded with --seed (scores first, for needs_scores strategies)."""
    gen = torch.Generator().manual_seed(seed)
    scores = viz.smooth_scores(samples, grid, gen) if strategy.needs_scores else None
    return strategy(samples, grid, generator=gen, device=CPU, scores=scores, progress=progress)


def _expected_fill(masks: Masks, colour_groups: bool) -> tuple[list[list[tuple]], list[list[tuple | None]]]:
    """Per sample and token: the fill colour and the centre-dot colour (None: no dot), from the masks directly."""
    fills, dots = [], []
    for b in range(masks.batch_size):
        visible = set(masks.visible[b].tolist())
        groups = [set(g) for g in masks.targets[b].tolist()]
        decoder = set(masks.decoder[b].tolist()) if masks.decoder is not None else set()
        row_fill, row_dot = [], []
        for k in range(masks.num_tokens):
            inside = [m for m, g in enumerate(groups) if k in g]
            if colour_groups and inside:
                fill = viz.TARGET_COLOURS[inside[0] % 8]
            else:
                fill = viz.VISIBLE if k in visible else viz.HIDDEN
            dot = viz.TARGET_COLOURS[inside[-1] % 8] if colour_groups and len(inside) > 1 else None
            row_fill.append(fill)
            row_dot.append(viz.DECODER if k in decoder else dot)
        fills.append(row_fill)
        dots.append(row_dot)
    return fills, dots


def _check_pixels(img: np.ndarray, masks: Masks, grid: TokenGrid, cell: int, colour_groups: bool, top: int = 0):
    fills, dots = _expected_fill(masks, colour_groups)
    slots = range(grid.t) if top == 0 else [0]
    for s in range(masks.batch_size):
        for t in slots:
            for h in range(grid.h):
                for w in range(grid.w):
                    k = (t * grid.h + h) * grid.w + w
                    x, y = _origin(grid, cell, s, 0 if top else t, h, w, top)
                    assert tuple(img[y + 1, x + 1]) == fills[s][k], (s, t, h, w)  # corner: the fill
                    centre = tuple(img[y + (cell - 1) // 2, x + (cell - 1) // 2])
                    assert centre == (dots[s][k] or fills[s][k]), (s, t, h, w)
                    assert tuple(img[y + cell - 1, x + 1]) == viz.LINE  # the grid line below the cell


# ---------------------------------------------------------------------- pictures decode back to the masks
def test_random_png_pixels_match_the_masks(tmp_path: Path, capsys) -> None:
    out = tmp_path / "random.png"
    assert (
        main(["masks", "--strategy", "random", "--grid", "14x14", "--samples", "5", "--seed", "3", "--out", str(out)])
        == 0
    )
    img = _read(out)
    grid = TokenGrid(1, 14, 14)
    assert (img.shape[1], img.shape[0]) == _size(grid, 5, 12) == (12 + 14 * 12 + 12, 12 + 5 * (14 * 12 + 12))
    masks = _draw(RandomMasking(), grid, 5, 3)
    _check_pixels(img, masks, grid, 12, colour_groups=False)
    hidden_px = (img == np.array(viz.HIDDEN, dtype=np.uint8)).all(-1).sum()
    assert hidden_px == 5 * (196 - 49) * 11 * 11  # exactly the hidden cells are dark (11 x 11 fill per cell)
    assert "wrote" in capsys.readouterr().out


def test_tube_png_is_a_frame_strip_matching_the_masks(tmp_path: Path) -> None:
    out = tmp_path / "tube.png"
    args = ["--strategy", "tube", "--grid", "6x7", "--frames", "4", "--samples", "3", "--cell", "8"]
    assert main(["masks", *args, "--set", "mask_ratio=0.6", "--out", str(out)]) == 0
    img = _read(out)
    grid = TokenGrid(4, 6, 7)
    assert (img.shape[1], img.shape[0]) == _size(grid, 3, 8)
    masks = _draw(TubeMasking(mask_ratio=0.6), grid, 3, 0)
    _check_pixels(img, masks, grid, 8, colour_groups=False)
    # the strip shows the tube: every time slot of a sample looks the same
    x_step = 7 * 8 + 8
    first = img[:, 8 : 8 + 7 * 8]
    for t in range(1, 4):
        assert np.array_equal(first, img[:, 8 + t * x_step : 8 + t * x_step + 7 * 8])


def test_multiblock_png_colours_target_groups(tmp_path: Path) -> None:
    out = tmp_path / "mb.png"
    assert main(["masks", "--strategy", "multiblock", "--samples", "4", "--seed", "11", "--out", str(out)]) == 0
    img = _read(out)
    grid = TokenGrid(1, 14, 14)
    masks = _draw(MultiBlockMasking(), grid, 4, 11)
    _check_pixels(img, masks, grid, 12, colour_groups=True)
    for m in range(4):  # every group's colour is on the picture
        assert (img == np.array(viz.TARGET_COLOURS[m], dtype=np.uint8)).all(-1).any()


def test_table_grid_and_full_class_path_with_init(tmp_path: Path) -> None:
    out = tmp_path / "table.png"
    init = json.dumps({"mask_ratio": 0.5})
    args = ["--strategy", "mim.masking.RandomMasking", "--init", init, "--grid", "20", "--samples", "8"]
    assert main(["masks", *args, "--out", str(out)]) == 0
    img = _read(out)
    grid = TokenGrid(1, 1, 20)
    assert (img.shape[1], img.shape[0]) == _size(grid, 8, 12) == (12 + 20 * 12 + 12, 12 + 8 * 24)
    _check_pixels(img, _draw(RandomMasking(mask_ratio=0.5), grid, 8, 0), grid, 12, colour_groups=False)


def test_gif_has_one_frame_per_time_slot(tmp_path: Path) -> None:
    out = tmp_path / "tube.gif"
    args = ["--strategy", "tube", "--grid", "5x6", "--frames", "6", "--samples", "2", "--cell", "10"]
    assert main(["masks", *args, "--out", str(out)]) == 0
    grid = TokenGrid(6, 5, 6)
    gif = Image.open(out)
    assert gif.n_frames == 6  # identical tube frames are kept apart by the progress band
    assert gif.size == _size(grid, 2, 10, slots=1, top=10)
    masks = _draw(TubeMasking(), grid, 2, 0)
    bars = []
    for t in range(6):
        gif.seek(t)
        frame = np.asarray(gif.convert("RGB"))
        _check_pixels(frame, masks, TokenGrid(1, 5, 6), 10, colour_groups=False, top=10)  # slot t (same as 0: a tube)
        bars.append(int((frame[5] == np.array(viz.BAR, dtype=np.uint8)).all(-1).sum()))
    assert bars == sorted(bars) and bars[-1] == 6 * 10 and bars[0] < bars[-1]


def test_decoder_tokens_are_marked() -> None:
    grid = TokenGrid(1, 2, 3)
    masks = Masks(
        visible=torch.tensor([[0, 4]]),
        targets=torch.tensor([[[1, 2, 3, 5]]]),
        num_tokens=6,
        decoder=torch.tensor([[2, 5]]),
    )
    img = np.asarray(viz.render_masks(masks, grid, cell=9))
    assert img.shape == (9 + 2 * 9 + 9, 9 + 3 * 9 + 9, 3)
    _check_pixels(img, masks, grid, 9, colour_groups=False)
    centre = [
        tuple(img[_origin(grid, 9, 0, 0, k // 3, k % 3)[1] + 4, _origin(grid, 9, 0, 0, k // 3, k % 3)[0] + 4])
        for k in range(6)
    ]
    assert [c == viz.DECODER for c in centre] == [False, False, True, False, False, True]


def test_dual_strategy_marks_decoder_tokens_when_available(tmp_path: Path) -> None:
    if "dual" not in viz.available_strategies():
        pytest.skip("mim.masking.DualMasking is not there yet")
    out = tmp_path / "dual.png"
    assert (
        main(["masks", "--strategy", "dual", "--grid", "8x8", "--frames", "2", "--samples", "2", "--out", str(out)])
        == 0
    )
    img = _read(out)
    assert (img == np.array(viz.DECODER, dtype=np.uint8)).all(-1).any()


# ---------------------------------------------------------------------- scores, progress, nested strategies
class LowestScoresVisible(ScoreMasking):
    """Test strategy: keeps the K lowest *given* scores visible (so the picture shows the score field)."""

    needs_scores = True

    def scores(self, batch_size, grid, *, generator, device, scores, progress) -> Tensor:
        assert scores is not None
        return scores


class ProgressCount(MaskingStrategy):
    """Test strategy: K = 1 + round(progress * (N - 2)) visible tokens (the first K), the rest one target group."""

    def __init__(self, *, inner: MaskingStrategy | None = None) -> None:
        self.inner = inner

    def __call__(self, batch_size, grid, *, generator, device, scores=None, progress=0.0) -> Masks:
        n = grid.num_tokens
        k = 1 + round(progress * (n - 2))
        idx = torch.arange(n).expand(batch_size, -1)
        return Masks(visible=idx[:, :k], targets=idx[:, None, k:], num_tokens=n)


def test_scores_for_needs_scores_strategies_are_a_smooth_field(tmp_path: Path) -> None:
    grid = TokenGrid(1, 16, 16)
    a = viz.smooth_scores(3, grid, torch.Generator().manual_seed(0))
    assert a.shape == (3, 256)
    torch.testing.assert_close(a.mean(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.std(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.equal(a, viz.smooth_scores(3, grid, torch.Generator().manual_seed(0)))
    field = a.view(3, 16, 16)
    neighbour = torch.corrcoef(torch.stack([field[:, :, :-1].flatten(), field[:, :, 1:].flatten()]))[0, 1]
    assert neighbour > 0.8, f"neighbour correlation {neighbour:.2f}: not smooth"  # white noise: ~0
    video = viz.smooth_scores(2, TokenGrid(4, 6, 6), torch.Generator().manual_seed(1))
    assert video.shape == (2, 144) and bool(torch.isfinite(video).all())
    # through the command: the visible tokens are the lowest of that field
    out = tmp_path / "scores.png"
    path = f"{__name__}.LowestScoresVisible"
    assert main(["masks", "--strategy", path, "--grid", "16x16", "--samples", "3", "--out", str(out)]) == 0
    _check_pixels(_read(out), _draw(LowestScoresVisible(), grid, 3, 0), grid, 12, colour_groups=False)


def test_progress_and_nested_class_path(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    nested = json.dumps({"inner": {"class_path": "random", "init_args": {"mask_ratio": 0.5}}})
    args = ["--strategy", f"{__name__}.ProgressCount", "--init", nested, "--grid", "12", "--progress", "0.5"]
    assert main(["masks", *args, "--samples", "2", "--out", str(out)]) == 0
    img = _read(out)
    light = (img == np.array(viz.VISIBLE, dtype=np.uint8)).all(-1).sum()
    assert light == 2 * (1 + 5) * 11 * 11  # K = 1 + round(0.5 * 10) = 6 per sample
    built = viz.build_strategy(f"{__name__}.ProgressCount", json.loads(nested))
    assert isinstance(built, ProgressCount) and isinstance(built.inner, RandomMasking)
    assert built.inner.mask_ratio == 0.5


# ---------------------------------------------------------------------- errors name the flag
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--strategy", "nope"], "--strategy 'nope' is unknown; available: random, tube, multiblock"),
        (["--strategy", "mim.masking.NoSuchMasking"], "--strategy mim.masking.NoSuchMasking"),
        (["--strategy", "mim.types.TokenGrid"], "not a concrete"),
        (["--strategy", "random", "--grid", "14by14"], "--grid"),
        (["--strategy", "random", "--grid", "0x3"], "--grid"),
        (["--strategy", "random", "--grid", "14", "--frames", "4"], "--frames"),
        (["--strategy", "random", "--grid", "2x14x14", "--frames", "4"], "--frames"),
        (["--strategy", "random", "--frames", "0"], "--frames"),
        (["--strategy", "random", "--samples", "0"], "--samples"),
        (["--strategy", "random", "--cell", "1"], "--cell"),
        (["--strategy", "random", "--progress", "1.5"], "--progress"),
        (["--strategy", "random", "--out", "masks.jpg"], "--out"),
        (["--strategy", "random", "--set", "mask_ratio"], "--set"),
        (["--strategy", "random", "--set", "mask_ratio=1.5"], "mask_ratio"),
        (["--strategy", "random", "--set", "bogus=1"], "--set/--init"),
        (["--strategy", "random", "--init", "{nope"], "--init"),
        (["--strategy", "random", "--init", "[1, 2]"], "--init"),
        (["--strategy", "random", "--grid", "1"], "--grid"),
        ([], "--strategy is required"),
    ],
)
def test_bad_arguments_give_clear_errors(args: list[str], needle: str, tmp_path: Path, capsys) -> None:
    out = [] if any(a == "--out" for a in args) else ["--out", str(tmp_path / "m.png")]
    with pytest.raises(SystemExit) as exc:
        main(["masks", *args, *out])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_strategy_module_lists_available(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(viz.STRATEGIES, "ghost", "GhostMasking")
    assert "ghost" not in viz.available_strategies()
    with pytest.raises(SystemExit):
        main(["masks", "--strategy", "ghost"])
    err = capsys.readouterr().err
    assert "mim.masking.GhostMasking is not available" in err and "available: random, tube, multiblock" in err


def test_list_and_help(capsys) -> None:
    assert main(["masks", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert names[:3] == ["random", "tube", "multiblock"] and "feature_subset" in names
    assert main(["--help"]) == 0
    assert "masks --strategy" in capsys.readouterr().out


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.png"
    out.write_bytes(b"old")

    def broken(self, fp, format=None, **params):
        Path(fp).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["masks", "--strategy", "random", "--out", str(out)])
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.png"]
    monkeypatch.undo()
    assert main(["masks", "--strategy", "random", "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG" and [p.name for p in tmp_path.iterdir()] == ["m.png"]


@pytest.mark.slow  # a fresh interpreter imports torch and Lightning (mim.cli): 5-12 s on 2 busy cores
def test_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "mim"
    if not script.is_file():
        pytest.skip(f"no console script next to {sys.executable}")
    out = tmp_path / "fs.png"
    run = subprocess.run(
        [str(script), "masks", "--strategy", "feature_subset", "--grid", "54", "--samples", "6", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "FeatureSubsetMasking" in run.stdout and "4 target group(s) in colour" in run.stdout
    assert Image.open(out).size == _size(TokenGrid(1, 1, 54), 6, 12)
