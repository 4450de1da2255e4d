"""`mim masks` (mim/masks_cli.py) and its pictures (mim/viz.py): the picture's size follows the documented layout,
its pixels decode back to the masks drawn, and every strategy mim.masking exports can be drawn."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

import mim.masking
from mim import masks_cli, viz
from mim.cli import main
from mim.masking import (
    AttentionMasking,
    ColoredNoiseMasking,
    DualMasking,
    FeatureSubsetMasking,
    HardPatchMasking,
    MultiBlockMasking,
    RandomMasking,
    TubeMasking,
)
from mim.masking.base import MaskingStrategy, ScoreMasking
from mim.types import Masks, TokenGrid

CPU = torch.device("cpu")


# ---------------------------------------------------------------------- helpers (the layout, written out independently)
TOP = viz.CAPTION_HEIGHT  # the caption band on top (on by default)


@dataclass(frozen=True)
class Layout:
    """The layout of render_masks' docstring: a T = 1 grid (or a GIF frame) in ``columns``, or a video frame strip."""

    grid: TokenGrid
    samples: int
    cell: int
    top: int  # caption band (+ the GIF progress band)
    columns: int | None  # None: video frame strip, one row per sample

    @property
    def size(self) -> tuple[int, int]:
        g, c = self.grid, self.cell
        if self.columns is None:
            return c + g.t * (g.w * c + c), self.top + self.samples * (g.h * c + 2 * c)
        rows = -(-self.samples // self.columns)
        return c + self.columns * (g.w * c + c), self.top + c + rows * (g.h * c + c)

    def origin(self, s: int, t: int, h: int, w: int) -> tuple[int, int]:
        """Top-left pixel (x, y) of token (t, h, w) of sample s (t is ignored outside a frame strip)."""
        g, c = self.grid, self.cell
        if self.columns is None:
            return c + t * (g.w * c + c) + w * c, self.top + c + s * (g.h * c + 2 * c) + h * c
        col, row = s % self.columns, s // self.columns
        return c + col * (g.w * c + c) + w * c, self.top + c + row * (g.h * c + c) + h * c


def _layout(
    grid: TokenGrid, samples: int, cell: int, *, caption: bool = True, gif: bool = False, columns: int | None = None
) -> Layout:
    top = (TOP if caption else 0) + (cell if gif else 0)
    if grid.t > 1 and not gif:
        return Layout(grid, samples, cell, top, None)
    if columns is None:  # tables: 1; else at most 4 per row, balanced over the fewest rows
        rows = -(-samples // 4)
        columns = 1 if grid.h == 1 else -(-samples // rows)
    return Layout(grid, samples, cell, top, min(columns, samples))


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _colour_count(img: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((img == np.array(colour, dtype=np.uint8)).all(-1).sum())


def _draw(strategy: MaskingStrategy, grid: TokenGrid, samples: int, seed: int, progress: float = 0.0) -> Masks:
    """What the command draws: one generator seeded with --seed (scores first, for needs_scores strategies)."""
    gen = torch.Generator().manual_seed(seed)
    scores = masks_cli.smooth_scores(samples, grid, gen) if strategy.needs_scores else None
    return strategy(samples, grid, generator=gen, device=CPU, scores=scores, progress=progress)


def _expected_fill(masks: Masks, colour_groups: bool) -> tuple[list[list[tuple]], list[list[tuple | None]]]:
    """Per sample and token: the fill colour and the centre-marker colour (None: no marker), from the masks."""
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


def _check_pixels(img: np.ndarray, masks: Masks, lay: Layout, colour_groups: bool, slot: int | None = None) -> None:
    """Every cell's corner pixel is its fill, its centre the marker (or the fill), its last row a grid line."""
    assert (img.shape[1], img.shape[0]) == lay.size
    fills, dots = _expected_fill(masks, colour_groups)
    grid, cell = lay.grid, lay.cell
    slots = range(grid.t) if lay.columns is None else [slot or 0]
    for s in range(masks.batch_size):
        for t in slots:
            for h in range(grid.h):
                for w in range(grid.w):
                    k = (t * grid.h + h) * grid.w + w
                    x, y = lay.origin(s, t, h, w)
                    assert tuple(img[y, x]) == fills[s][k], (s, t, h, w)  # corner: the fill
                    centre = tuple(img[y + (cell - 1) // 2, x + (cell - 1) // 2])
                    assert centre == (dots[s][k] or fills[s][k]), (s, t, h, w)
                    assert tuple(img[y + cell - 1, x + 1]) == viz.LINE  # the grid line below the cell
                    assert tuple(img[y + 1, x + cell - 1]) == viz.LINE  # and right of it


# ---------------------------------------------------------------------- pictures decode back to the masks
def test_random_png_pixels_match_the_masks(tmp_path: Path, capsys) -> None:
    out = tmp_path / "random.png"
    assert (
        main(["masks", "--strategy", "random", "--grid", "14x14", "--samples", "5", "--seed", "3", "--out", str(out)])
        == 0
    )
    img = _read(out)
    grid = TokenGrid(1, 14, 14)
    lay = _layout(grid, 5, 12)
    assert lay.columns == 3  # 5 samples: 3 + 2, side by side
    assert lay.size == (12 + 3 * (14 * 12 + 12), TOP + 12 + 2 * (14 * 12 + 12))
    masks = _draw(RandomMasking(), grid, 5, 3)
    _check_pixels(img, masks, lay, colour_groups=False)
    assert _colour_count(img[TOP:], viz.HIDDEN) == 5 * (196 - 49) * 11 * 11  # exactly the hidden cells are dark
    x, y = lay.origin(5, 0, 0, 0)  # the sixth slot of the 3 x 2 layout is empty
    assert (img[y : y + 14 * 12, x : x + 14 * 12] == np.array(viz.BACKGROUND, dtype=np.uint8)).all()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(("samples", "columns"), [(1, 1), (3, 3), (4, 4), (6, 3), (7, 4), (8, 4), (9, 3), (12, 4)])
def test_default_columns_balance_rows_of_at_most_four(samples: int, columns: int) -> None:
    grid = TokenGrid(1, 6, 6)
    assert viz.default_columns(grid, samples) == columns == _layout(grid, samples, 4).columns
    assert viz.default_columns(TokenGrid(1, 1, 54), samples) == 1  # tables: one long strip per row
    masks = _draw(RandomMasking(), grid, samples, 0)
    assert viz.render_masks(masks, grid, cell=4).size == _layout(grid, samples, 4, caption=False).size


def test_columns_flag_and_no_caption(tmp_path: Path) -> None:
    out = tmp_path / "cols.png"
    args = ["--strategy", "random", "--grid", "5x7", "--samples", "5", "--columns", "2", "--cell", "6"]
    assert main(["masks", *args, "--no-caption", "--seed", "2", "--out", str(out)]) == 0
    img = _read(out)
    grid = TokenGrid(1, 5, 7)
    lay = _layout(grid, 5, 6, caption=False, columns=2)
    assert lay.size == (6 + 2 * (7 * 6 + 6), 6 + 3 * (5 * 6 + 6))
    _check_pixels(img, _draw(RandomMasking(), grid, 5, 2), lay, colour_groups=False)
    # more columns than samples: the picture is as wide as the samples
    assert main(["masks", *args[:-4], "--columns", "9", "--no-caption", "--out", str(out)]) == 0
    assert Image.open(out).size == _layout(grid, 5, 12, caption=False, columns=5).size


def test_tube_png_is_a_frame_strip_per_sample_with_separators(tmp_path: Path) -> None:
    out = tmp_path / "tube.png"
    args = ["--strategy", "tube", "--grid", "6x7", "--frames", "4", "--samples", "3", "--cell", "8"]
    assert main(["masks", *args, "--set", "mask_ratio=0.6", "--out", str(out)]) == 0
    img = _read(out)
    grid = TokenGrid(4, 6, 7)
    lay = _layout(grid, 3, 8)
    assert lay.columns is None and lay.size == (8 + 4 * (7 * 8 + 8), TOP + 3 * (6 * 8 + 16))
    masks = _draw(TubeMasking(mask_ratio=0.6), grid, 3, 0)
    _check_pixels(img, masks, lay, colour_groups=False)
    # the strip shows the tube: every time slot of a sample looks the same
    x_step = 7 * 8 + 8
    first = img[TOP:, 8 : 8 + 7 * 8]
    for t in range(1, 4):
        assert np.array_equal(first, img[TOP:, 8 + t * x_step : 8 + t * x_step + 7 * 8])
    # between samples: two gaps with a separator line (max(1, 8 // 6) = 1 px) in the middle, else background
    width = img.shape[1]
    for s in (1, 2):
        _, below = lay.origin(s - 1, 0, 6, 0)  # first pixel row after sample s - 1
        _, above = lay.origin(s, 0, 0, 0)
        assert above - below == 16
        for y in range(below, above):
            row = img[y]
            if y == TOP + s * (6 * 8 + 16):
                assert (row[4 : width - 4] == np.array(viz.SEPARATOR, dtype=np.uint8)).all()
                assert (row[:4] == 255).all() and (row[width - 4 :] == 255).all()
            else:
                assert (row == 255).all(), y


def test_video_columns_are_rejected_for_png_but_allowed_for_gif(tmp_path: Path, capsys) -> None:
    args = ["masks", "--strategy", "tube", "--grid", "4x4", "--frames", "2", "--columns", "2"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "v.png")])
    assert exc.value.code == 2 and "--columns applies to T = 1 grids and GIF frames" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert main([*args, "--samples", "3", "--out", str(tmp_path / "v.gif")]) == 0
    assert Image.open(tmp_path / "v.gif").size == _layout(TokenGrid(2, 4, 4), 3, 12, gif=True, columns=2).size


def test_multiblock_png_colours_target_groups(tmp_path: Path) -> None:
    out = tmp_path / "mb.png"
    assert main(["masks", "--strategy", "multiblock", "--samples", "4", "--seed", "11", "--out", str(out)]) == 0
    img = _read(out)
    grid = TokenGrid(1, 14, 14)
    masks = _draw(MultiBlockMasking(), grid, 4, 11)
    _check_pixels(img, masks, _layout(grid, 4, 12), colour_groups=True)
    for m in range(4):  # every group's colour is on the picture, and in the legend
        assert _colour_count(img[TOP:], viz.TARGET_COLOURS[m]) > 0
        assert _colour_count(img[:TOP], viz.TARGET_COLOURS[m]) > 0


def test_caption_band_holds_a_title_and_legend(tmp_path: Path) -> None:
    grid = TokenGrid(1, 14, 14)
    masks = _draw(RandomMasking(), grid, 8, 0)
    plain = np.asarray(viz.render_masks(masks, grid))
    titled = np.asarray(viz.render_masks(masks, grid, title="grid 14x14 | RandomMasking(mask_ratio=0.75)"))
    assert titled.shape[0] == plain.shape[0] + TOP and titled.shape[1] == plain.shape[1]
    assert np.array_equal(titled[TOP:], plain)  # the caption only adds the band
    band = titled[:TOP]
    dark_text = (band.astype(int).sum(-1) < 3 * 120) & ~(band == np.array(viz.HIDDEN, dtype=np.uint8)).all(-1)
    assert dark_text[: TOP // 2].sum() > 200  # the title line has text
    for colour in (viz.VISIBLE, viz.HIDDEN):  # the legend's swatches
        assert _colour_count(band, colour) >= 36
    assert _colour_count(band, viz.DECODER) == 0 and _colour_count(band, viz.TARGET_COLOURS[1]) == 0
    # a long title is cut to the picture's width instead of running off it
    narrow = np.asarray(viz.render_masks(_draw(RandomMasking(), grid, 1, 0), grid, title="x" * 500))
    assert narrow.shape[1] == 12 + 14 * 12 + 12
    assert (narrow[:TOP, -12:] == 255).all() and (narrow[:TOP, 12:-12] != 255).any()


def test_table_grid_and_full_class_path_with_init(tmp_path: Path) -> None:
    out = tmp_path / "table.png"
    init = json.dumps({"mask_ratio": 0.5})
    args = ["--strategy", "mim.masking.RandomMasking", "--init", init, "--grid", "20", "--samples", "8"]
    assert main(["masks", *args, "--out", str(out)]) == 0
    img = _read(out)
    grid = TokenGrid(1, 1, 20)
    lay = _layout(grid, 8, 12)
    assert lay.columns == 1 and lay.size == (12 + 20 * 12 + 12, TOP + 12 + 8 * 24)  # one sample per row
    _check_pixels(img, _draw(RandomMasking(mask_ratio=0.5), grid, 8, 0), lay, colour_groups=False)


def test_gif_has_one_frame_per_time_slot(tmp_path: Path) -> None:
    out = tmp_path / "tube.gif"
    args = ["--strategy", "tube", "--grid", "5x6", "--frames", "6", "--samples", "2", "--cell", "10"]
    assert main(["masks", *args, "--out", str(out)]) == 0
    grid = TokenGrid(6, 5, 6)
    gif = Image.open(out)
    assert gif.n_frames == 6  # identical tube frames are kept apart by the progress band
    lay = _layout(grid, 2, 10, gif=True)
    assert lay.columns == 2 and gif.size == lay.size == (10 + 2 * 70, TOP + 10 + 10 + 60)
    masks = _draw(TubeMasking(), grid, 2, 0)
    bars = []
    for t in range(6):
        gif.seek(t)
        frame = np.asarray(gif.convert("RGB"))
        _check_pixels(frame, masks, lay, colour_groups=False, slot=t)  # slot t (the same as 0: a tube)
        bars.append(_colour_count(frame[TOP + 5 : TOP + 6], viz.BAR))
    assert bars == [round(130 * (t + 1) / 6) for t in range(6)]  # grows to the panels' width, 150 - 2 gaps


def test_marker_square_is_large_centred_and_inside_the_cell() -> None:
    for cell in range(3, 65):  # every --cell the command accepts
        start, size, outlined = viz.marker_square(cell)
        fill = cell - 1
        assert size == max(1, round(0.45 * fill)) and start == (cell - size) // 2, cell
        assert 1 <= start <= (cell - 1) // 2 < start + size <= fill, cell  # holds the centre pixel, not the corner
        assert outlined == (cell >= 6), cell
        if outlined:
            assert start - 1 >= 1 and start + size <= fill - 1, cell  # the ring stays inside the fill
            assert size >= 0.4 * fill, cell  # clearly visible: ~45 % of the cell, ~(45 % + 2 px) with its ring


@pytest.mark.parametrize("cell", [8, 9, 12])
def test_decoder_tokens_are_marked(cell: int) -> None:
    grid = TokenGrid(1, 2, 3)
    masks = Masks(
        visible=torch.tensor([[0, 4]]),
        targets=torch.tensor([[[1, 2, 3, 5]]]),
        num_tokens=6,
        decoder=torch.tensor([[2, 5]]),
    )
    img = np.asarray(viz.render_masks(masks, grid, cell=cell))
    lay = _layout(grid, 1, cell, caption=False)
    assert img.shape == (cell + 2 * cell + cell, cell + 3 * cell + cell, 3)
    _check_pixels(img, masks, lay, colour_groups=False)
    start, size, _ = viz.marker_square(cell)
    for k in range(6):
        x, y = lay.origin(0, 0, k // 3, k % 3)
        block = img[y : y + cell - 1, x : x + cell - 1]
        if k in (2, 5):  # a yellow square of size^2 pixels in a dark ring
            assert _colour_count(block, viz.DECODER) == size * size
            assert (block[start : start + size, start : start + size] == np.array(viz.DECODER, np.uint8)).all()
            assert _colour_count(block, viz.DECODER_EDGE) == (size + 2) ** 2 - size * size
        else:
            assert _colour_count(block, viz.DECODER) == _colour_count(block, viz.DECODER_EDGE) == 0


def test_dual_strategy_marks_decoder_tokens(tmp_path: Path) -> None:
    out = tmp_path / "dual.png"
    assert (
        main(["masks", "--strategy", "dual", "--grid", "8x8", "--frames", "4", "--samples", "2", "--out", str(out)])
        == 0
    )
    img = _read(out)
    grid = TokenGrid(4, 8, 8)
    masks = _draw(DualMasking(), grid, 2, 0)
    assert masks.decoder is not None
    _check_pixels(img, masks, _layout(grid, 2, 12), colour_groups=False)
    start, size, _ = viz.marker_square(12)
    assert _colour_count(img[TOP:], viz.DECODER) == masks.decoder.numel() * size * size
    assert _colour_count(img[:TOP], viz.DECODER) > 0  # in the legend (cut on pictures narrower than ~240 px)


# ---------------------------------------------------------------------- every strategy mim.masking exports
NAMES = {
    "attention": AttentionMasking,
    "colored_noise": ColoredNoiseMasking,
    "dual": DualMasking,
    "feature_subset": FeatureSubsetMasking,
    "hard_patch": HardPatchMasking,
    "multiblock": MultiBlockMasking,
    "random": RandomMasking,
    "tube": TubeMasking,
}
"""--strategy names in use (README, scripts/mask_pictures.sh, docs/img/masks_<name>.png): they must not change."""


def _concrete_strategies() -> set[type]:
    """Every concrete MaskingStrategy defined in a mim.masking module (each module imported first)."""
    for info in pkgutil.iter_modules(mim.masking.__path__, "mim.masking."):
        importlib.import_module(info.name)
    found, todo = set(), [MaskingStrategy]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("mim.masking.") and not inspect.isabstract(sub):
                found.add(sub)
    return found


def test_short_names_are_the_snake_case_class_names() -> None:
    for name, cls in NAMES.items():
        assert masks_cli.short_name(cls) == name and masks_cli.STRATEGIES[name] is cls
    assert masks_cli.short_name(type("RunningCellMasking", (), {})) == "running_cell"  # any new class alike


def test_every_strategy_of_mim_masking_has_a_short_name() -> None:
    """A strategy added to mim.masking (and exported) is drawable without touching the command."""
    assert set(masks_cli.STRATEGIES.values()) == _concrete_strategies()


@pytest.mark.parametrize("name", list(masks_cli.STRATEGIES))
def test_every_strategy_draws_a_picture(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.png"
    args = ["--strategy", name, "--grid", "2x8x8", "--samples", "2", "--cell", "6", "--seed", "5"]
    assert main(["masks", *args, "--out", str(out)]) == 0
    grid = TokenGrid(2, 8, 8)
    masks = _draw(masks_cli.STRATEGIES[name](), grid, 2, 5)  # needs_scores strategies: the smooth field
    _check_pixels(_read(out), masks, _layout(grid, 2, 6), colour_groups=viz.token_states(masks)[2])


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
    a = masks_cli.smooth_scores(3, grid, torch.Generator().manual_seed(0))
    assert a.shape == (3, 256)
    torch.testing.assert_close(a.mean(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.std(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.equal(a, masks_cli.smooth_scores(3, grid, torch.Generator().manual_seed(0)))
    field = a.view(3, 16, 16)
    neighbour = torch.corrcoef(torch.stack([field[:, :, :-1].flatten(), field[:, :, 1:].flatten()]))[0, 1]
    assert neighbour > 0.8, f"neighbour correlation {neighbour:.2f}: not smooth"  # white noise: ~0
    video = masks_cli.smooth_scores(2, TokenGrid(4, 6, 6), torch.Generator().manual_seed(1))
    assert video.shape == (2, 144) and bool(torch.isfinite(video).all())
    # through the command: the visible tokens are the lowest of that field
    out = tmp_path / "scores.png"
    path = f"{__name__}.LowestScoresVisible"
    assert main(["masks", "--strategy", path, "--grid", "16x16", "--samples", "3", "--out", str(out)]) == 0
    _check_pixels(_read(out), _draw(LowestScoresVisible(), grid, 3, 0), _layout(grid, 3, 12), colour_groups=False)


def test_progress_and_nested_class_path(tmp_path: Path) -> None:
    out = tmp_path / "p.png"
    nested = json.dumps({"inner": {"class_path": "random", "init_args": {"mask_ratio": 0.5}}})
    args = ["--strategy", f"{__name__}.ProgressCount", "--init", nested, "--grid", "12", "--progress", "0.5"]
    assert main(["masks", *args, "--samples", "2", "--out", str(out)]) == 0
    img = _read(out)
    assert _colour_count(img[TOP:], viz.VISIBLE) == 2 * (1 + 5) * 11 * 11  # K = 1 + round(0.5 * 10) = 6 per sample
    built = masks_cli.build_strategy(f"{__name__}.ProgressCount", json.loads(nested))
    assert isinstance(built, ProgressCount) and isinstance(built.inner, RandomMasking)
    assert built.inner.mask_ratio == 0.5


# ---------------------------------------------------------------------- errors name the flag
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--strategy", "nope"], f"--strategy 'nope' is unknown; available: {', '.join(masks_cli.STRATEGIES)}, or"),
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


def test_list_and_help(capsys) -> None:
    assert main(["masks", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert names == list(masks_cli.STRATEGIES) == sorted(names) and {"random", "attention"} <= set(names)
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


@pytest.mark.slow  # a fresh interpreter imports torch (mim.cli imports Lightning only for fit/validate)
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
    assert Image.open(out).size == _layout(TokenGrid(1, 1, 54), 6, 12).size


@pytest.mark.slow  # a fresh interpreter imports torch (~2-4 s on 2 busy cores)
def test_masks_command_does_not_import_lightning(tmp_path: Path) -> None:
    code = (
        "import sys; from mim.cli import main; "
        f"rc = main(['masks', '--strategy', 'random', '--samples', '2', '--out', {str(tmp_path / 'r.png')!r}]); "
        "print('LIGHTNING', 'lightning' in sys.modules, rc)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LIGHTNING False 0" in run.stdout
