"""Pictures of masks: ``mim masks`` draws sample masks of any strategy so users can see what they configure.

    mim masks --strategy multiblock --grid 14x14 --samples 8 --out masks.png
    mim masks --strategy tube --grid 14x14 --frames 8 --set mask_ratio=0.9 --out tube.gif
    mim masks --strategy feature_subset --grid 54 --out tjepa.png           # a table of 54 features
    mim masks --strategy mim.masking.RandomMasking --init '{"mask_ratio": 0.6}' --columns 2 --no-caption

Layout (``cell`` pixels per token, ``gap = cell``; every cell's last pixel column and row are grid lines). On top,
a caption band of ``top = CAPTION_HEIGHT`` (36) pixels: the grid, the sample count and the strategy's repr (cut
with "..." to the picture's width), then a legend of swatches: visible, hidden, and the target groups, overlaps and
decoder marker when the masks have them (``--no-caption``: ``top = 0``). Below it:

* T = 1 grids (images, tables): samples side by side, C per row (``--columns``; default 1 for tables, whose sample
  is a long 1 x F strip, else at most 4 balanced over the fewest rows, ``C = ceil(S / ceil(S / 4))``: 8 samples
  4 x 2, 6 samples 3 x 2), R = ceil(S / C) rows. The picture is ``gap + C (W cell + gap)`` pixels wide and
  ``top + gap + R (H cell + gap)`` high; token ``(h, w)`` of sample ``s`` starts at
  ``x = gap + (s mod C)(W cell + gap) + w cell``, ``y = top + gap + (s div C)(H cell + gap) + h cell``.
* Video (T > 1): a frame strip per sample, one row per sample with its T time slots side by side, and twice the
  gap (with a grey separator line of ``max(1, cell div 6)`` pixels in its middle) between samples. The picture is
  ``gap + T (W cell + gap)`` wide and ``top + S (H cell + 2 gap)`` high; token ``(t, h, w)`` of sample ``s``
  starts at ``x = gap + t (W cell + gap) + w cell``, ``y = top + gap + s (H cell + 2 gap) + h cell``.
* An animated GIF (``--out *.gif``) has one frame per time slot: the T = 1 layout of slot t, with a band of ``gap``
  pixels under the caption (so ``top = CAPTION_HEIGHT + gap``) whose blue bar, from ``x = gap``, is
  ``round((width - 2 gap)(t + 1) / T)`` pixels long (the last frame's spans the panels).

Colours (the caption's legend repeats them): light grey = visible (the encoder sees it); dark grey = hidden; for
strategies with several target groups (or targets that are not exactly the hidden tokens), target group m has
colour ``TARGET_COLOURS[m % 8]`` (blue, red, green, purple, brown, pink, cyan, olive), and a token in several groups
has the first group's colour with a centre square in the last one's. A yellow centre square with a dark ring marks
the tokens a decoder keeps (``Masks.decoder``, dual masking); the square is about 45 % of the cell
(:func:`marker_square`). White is background.

Strategies that need per-token scores (hard-patch mining) get a smooth random field: white Gaussian noise from the
same generator, blurred with a Gaussian of sigma = 15 % of each grid side (at least 0.5 tokens) and standardised per
sample, so "hard" tokens come in blobs as in a real loss map.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from mim.masking.base import MaskingStrategy
from mim.types import Masks, TokenGrid

__all__ = [
    "STRATEGIES",
    "TARGET_COLOURS",
    "available_strategies",
    "build_strategy",
    "default_columns",
    "main",
    "marker_square",
    "parse_grid",
    "render_masks",
    "resolve_strategy",
    "save_images",
    "smooth_scores",
    "token_states",
]

STRATEGIES: dict[str, str] = {
    "random": "RandomMasking",
    "tube": "TubeMasking",
    "multiblock": "MultiBlockMasking",
    "colored_noise": "ColoredNoiseMasking",
    "hard_patch": "HardPatchMasking",
    "dual": "DualMasking",
    "feature_subset": "FeatureSubsetMasking",
}
"""Short names of ``--strategy`` -> class names in :mod:`mim.masking` (resolved lazily)."""

BACKGROUND = (255, 255, 255)
LINE = (200, 200, 200)
VISIBLE = (235, 235, 235)
HIDDEN = (45, 45, 45)
DECODER = (255, 215, 0)
DECODER_EDGE = (20, 20, 20)
SEPARATOR = (150, 150, 150)
BAR = (31, 119, 180)
TEXT = (30, 30, 30)
OVERLAP = (-1, -1, -1)  # legend key of the "in several groups" swatch (not a colour)
MARKER_SHARE = 0.45
"""Side of a centre marker square as a share of a cell's fill (``cell - 1`` pixels)."""
MAX_DEFAULT_COLUMNS = 4
CAPTION_FONT_SIZE = 12
CAPTION_LINE = 16
CAPTION_HEIGHT = 2 + 2 * CAPTION_LINE + 2
"""Pixels of the caption band on top (two lines: title, legend)."""
TARGET_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),  # blue
    (214, 39, 40),  # red
    (44, 160, 44),  # green
    (148, 103, 189),  # purple
    (140, 86, 75),  # brown
    (227, 119, 194),  # pink
    (23, 190, 207),  # cyan
    (188, 189, 34),  # olive
)


# ------------------------------------------------------------------------------------------------ strategies
def resolve_strategy(name: str) -> type[MaskingStrategy]:
    """A short name (:data:`STRATEGIES`) or a dotted class path -> a concrete MaskingStrategy class.

    Raises:
        ValueError: naming ``--strategy`` and listing the available short names.
    """
    if name in STRATEGIES:
        try:
            cls = getattr(importlib.import_module("mim.masking"), STRATEGIES[name])
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"--strategy {name}: mim.masking.{STRATEGIES[name]} is not available ({err}); "
                f"available: {', '.join(available_strategies())}"
            ) from None
    elif "." in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"--strategy {name}: cannot import it ({err})") from None
    else:
        raise ValueError(
            f"--strategy {name!r} is unknown; available: {', '.join(available_strategies())}, "
            "or a class path such as mim.masking.RandomMasking"
        )
    if not (isinstance(cls, type) and issubclass(cls, MaskingStrategy)) or inspect.isabstract(cls):
        raise ValueError(f"--strategy {name}: {cls!r} is not a concrete mim.masking.MaskingStrategy")
    return cls


def available_strategies() -> list[str]:
    """The short names whose class can be imported now."""
    found = []
    for short, cls_name in STRATEGIES.items():
        try:
            getattr(importlib.import_module("mim.masking"), cls_name)
        except Exception:  # a module that does not exist yet, or fails to import
            continue
        found.append(short)
    return found


def _instantiate(value: Any) -> Any:
    """Build nested ``{"class_path": ..., "init_args": {...}}`` values (LightningCLI style), e.g. a wrapped strategy."""
    if isinstance(value, dict) and "class_path" in value:
        extra = set(value) - {"class_path", "init_args"}
        if extra:
            raise ValueError(f"unexpected keys {sorted(extra)} next to class_path {value['class_path']!r}")
        return build_strategy(str(value["class_path"]), dict(value.get("init_args") or {}))
    if isinstance(value, list):
        return [_instantiate(v) for v in value]
    return value


def build_strategy(name: str, kwargs: dict[str, Any]) -> MaskingStrategy:
    """Construct ``name`` (short name or class path) with keyword arguments (nested class_path dicts are built).

    Raises:
        ValueError: for an unknown strategy or arguments it rejects (the message names the flags).
    """
    cls = resolve_strategy(name)
    try:
        return cls(**{k: _instantiate(v) for k, v in kwargs.items()})
    except (TypeError, ValueError) as err:
        raise ValueError(f"--set/--init: {cls.__name__}({_kwargs_text(kwargs)}): {err}") from None


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def smooth_scores(batch_size: int, grid: TokenGrid, generator: torch.Generator) -> Tensor:
    """A smooth random score field per sample (for strategies with ``needs_scores``).

    Gaussian-blurred white noise, sigma = max(0.5, 0.15 * side) tokens along each of T, H, W, standardised per sample.

    Returns:
        (B, N) float32.
    """
    x = torch.randn(batch_size, grid.t, grid.h, grid.w, generator=generator)  # (B, T, H, W)
    for dim, size in ((1, grid.t), (2, grid.h), (3, grid.w)):
        if size == 1:
            continue
        sigma = max(0.5, 0.15 * size)
        radius = max(1, math.ceil(3 * sigma))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1)  # (1, 1, 2r+1)
        moved = x.movedim(dim, -1)  # (..., size)
        shape = moved.shape
        rows = F.pad(moved.reshape(-1, 1, size), (radius, radius), mode="replicate")  # (B*rest, 1, size + 2r)
        x = F.conv1d(rows, kernel).reshape(shape).movedim(-1, dim)  # (B, T, H, W)
    x = x.reshape(batch_size, -1)  # (B, N)
    return (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True).clamp_min(1e-6)


# ------------------------------------------------------------------------------------------------ rendering
def token_states(masks: Masks) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-token drawing state of each sample.

    Args:
        masks: any strategy's masks (B samples, N tokens).

    Returns:
        ``fill`` (B, N) int: 0 visible, 1 hidden, ``2 + m`` first target group m containing the token (only when
        target groups are coloured: M > 1, or targets that are not exactly the hidden tokens);
        ``dot`` (B, N) int: -1 none, ``m`` the last of several target groups, ``-2`` kept by the decoder;
        ``colour_groups``: whether target groups are coloured.
    """
    b, n, m = masks.batch_size, masks.num_tokens, masks.targets.shape[1]
    hidden = masks.hidden.cpu().numpy()  # (B, N)
    fill = hidden.astype(np.int64)  # (B, N)
    targets = masks.targets.cpu().numpy()  # (B, M, T)
    member = np.zeros((b, m, n), dtype=bool)  # (B, M, N)
    rows = np.arange(b)[:, None, None]
    member[rows, np.arange(m)[None, :, None], targets] = True
    colour_groups = m > 1 or not np.array_equal(member.any(axis=1), hidden)
    dot = np.full((b, n), -1, dtype=np.int64)
    if colour_groups:
        in_any = member.any(axis=1)  # (B, N)
        first = member.argmax(axis=1)  # (B, N)
        last = m - 1 - member[:, ::-1].argmax(axis=1)  # (B, N)
        fill = np.where(in_any, 2 + first, fill)
        dot = np.where(member.sum(axis=1) > 1, last, dot)
    if masks.decoder is not None:
        keep = np.zeros((b, n), dtype=bool)
        keep[np.arange(b)[:, None], masks.decoder.cpu().numpy()] = True
        dot = np.where(keep, -2, dot)
    return fill, dot, bool(colour_groups)


def _palette(num_groups: int) -> np.ndarray:
    """(2 + M, 3) uint8 fill colours: visible, hidden, target groups."""
    groups = [TARGET_COLOURS[i % len(TARGET_COLOURS)] for i in range(num_groups)]
    return np.array([VISIBLE, HIDDEN, *groups], dtype=np.uint8)


def marker_square(cell: int) -> tuple[int, int, bool]:
    """The centre square of a marker in a cell of ``cell`` pixels (``cell - 1`` fill pixels, then a grid line).

    Returns:
        ``(start, size, outlined)``: the square covers offsets ``[start, start + size)`` from the cell's corner
        along x and y, ``size = max(1, round(0.45 (cell - 1)))``, ``start = (cell - size) // 2``; ``outlined``:
        a decoder-kept marker also has a one-pixel :data:`DECODER_EDGE` ring around it (offsets ``start - 1`` and
        ``start + size``), drawn when ``start >= 2`` and ``start + size <= cell - 2`` (so cells of 6 px or more).
    """
    fill = cell - 1
    size = max(1, round(MARKER_SHARE * fill))
    start = (fill - size + 1) // 2
    return start, size, start >= 2 and start + size <= fill - 1


def _panel(fill: np.ndarray, dot: np.ndarray, palette: np.ndarray, cell: int) -> np.ndarray:
    """One H x W block of cells: fill (H, W), dot (H, W) -> (H cell, W cell, 3) uint8 with grid lines and markers."""
    h, w = fill.shape
    img = palette[fill].repeat(cell, axis=0).repeat(cell, axis=1)  # (H cell, W cell, 3)
    img[cell - 1 :: cell, :] = LINE
    img[:, cell - 1 :: cell] = LINE
    if not (dot != -1).any():
        return img
    start, size, outlined = marker_square(cell)
    offset_y = np.arange(h * cell) % cell
    offset_x = np.arange(w * cell) % cell

    def square(lo: int, hi: int) -> np.ndarray:  # (H cell, W cell) bool: offsets in [lo, hi) along y and x
        return ((offset_y >= lo) & (offset_y < hi))[:, None] & ((offset_x >= lo) & (offset_x < hi))[None, :]

    dot_px = dot.repeat(cell, axis=0).repeat(cell, axis=1)  # (H cell, W cell)
    inner = square(start, start + size)
    group = inner & (dot_px >= 0)
    img[group] = palette[2 + dot_px[group]]
    kept = dot_px == -2
    if outlined:
        img[square(start - 1, start + size + 1) & ~inner & kept] = DECODER_EDGE
    img[inner & kept] = DECODER
    return img


def default_columns(grid: TokenGrid, samples: int) -> int:
    """Samples side by side in a T = 1 picture (or a GIF frame) when ``columns`` is not given.

    One for tables (H = 1: a sample is a long 1 x F strip); otherwise at most :data:`MAX_DEFAULT_COLUMNS` (4),
    balanced over the fewest rows: ``ceil(S / ceil(S / 4))`` (6 samples: 3 x 2, 8: 4 x 2, 5: 3 + 2, 3: 3 x 1).
    """
    if grid.h == 1:
        return 1
    return math.ceil(samples / math.ceil(samples / MAX_DEFAULT_COLUMNS))


def render_masks(
    masks: Masks,
    grid: TokenGrid,
    *,
    cell: int = 12,
    frame: int | None = None,
    columns: int | None = None,
    title: str | None = None,
) -> Image.Image:
    """Draw masks (see the module docstring for layout and colours).

    Args:
        masks: masks of S samples on ``grid`` (N = grid.num_tokens).
        grid: the token grid (T, H, W).
        cell: pixels per token (the last column and row of a cell are grid lines).
        frame: None for the whole grid (a video as frame strips, one row per sample); ``t`` for slot t only,
            below a progress band (a GIF frame).
        columns: samples side by side for a T = 1 grid or a GIF frame (default :func:`default_columns`; at most
            S are used). A video frame strip has one row per sample and takes no ``columns``.
        title: None for no caption; else a caption band of :data:`CAPTION_HEIGHT` pixels on top: ``title`` on the
            first line, a colour legend on the second (both cut with "..." to the picture's width).

    Returns:
        An RGB image.

    Raises:
        ValueError: tokens that do not match ``grid``, ``frame`` out of range, ``columns`` < 1 or given for a
            video frame strip.
    """
    if masks.num_tokens != grid.num_tokens:
        raise ValueError(f"masks have {masks.num_tokens} tokens but grid {grid.shape} has {grid.num_tokens}")
    s, (t_all, h, w) = masks.batch_size, grid.shape
    if frame is not None and not 0 <= frame < t_all:
        raise ValueError(f"render_masks: frame must be in [0, {t_all}), got {frame}")
    strip = frame is None and t_all > 1
    if columns is not None and (strip or columns < 1):
        raise ValueError(
            f"render_masks: columns must be >= 1 and applies to T = 1 grids and GIF frames (a video picture has one "
            f"row per sample), got columns={columns} for T={t_all}"
        )
    fill, dot, colour_groups = token_states(masks)
    gap, band = cell, (0 if title is None else CAPTION_HEIGHT)
    top = band + (0 if frame is None else gap)
    x_step = w * cell + gap
    if strip:  # row = sample, column = time slot; 2 gaps (and a separator line) between samples
        per_row, y_step = t_all, h * cell + 2 * gap
        panels = [(j, i, i, j) for i in range(s) for j in range(t_all)]  # (column, row, sample, slot)
        height = top + s * y_step
    else:
        per_row, y_step = min(s, columns or default_columns(grid, s)), h * cell + gap
        slot = 0 if frame is None else frame
        panels = [(i % per_row, i // per_row, i, slot) for i in range(s)]
        height = top + gap + math.ceil(s / per_row) * y_step
    width = gap + per_row * x_step
    img = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    palette = _palette(masks.targets.shape[1])
    fill = fill.reshape(s, t_all, h, w)  # (S, T, H, W)
    dot = dot.reshape(s, t_all, h, w)  # (S, T, H, W)
    for col, row, i, t in panels:
        x, y = gap + col * x_step, top + gap + row * y_step
        img[y : y + h * cell, x : x + w * cell] = _panel(fill[i, t], dot[i, t], palette, cell)
    if strip:
        thick = max(1, cell // 6)
        for i in range(1, s):
            y = top + i * y_step - thick // 2
            img[y : y + thick, gap // 2 : width - gap // 2] = SEPARATOR
    if frame is not None:
        length = max(1, round((width - 2 * gap) * (frame + 1) / t_all))
        img[band + cell // 4 : band + cell - cell // 4, gap : gap + length] = BAR
    picture = Image.fromarray(img)
    if title is not None:
        _caption(
            picture,
            title,
            num_groups=masks.targets.shape[1] if colour_groups else 0,
            overlap=bool((dot >= 0).any()),
            decoder=masks.decoder is not None,
            margin=gap,
        )
    return picture


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=CAPTION_FONT_SIZE)
    except TypeError:  # Pillow < 10.1: a fixed 11 px bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """``text``, cut and ended with "..." if it is wider than ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits with "..."
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if draw.textlength(text[:mid] + "...", font=font) <= width else (lo, mid - 1)
    return text[:lo] + "..." if lo else ""


def _caption(picture: Image.Image, title: str, *, num_groups: int, overlap: bool, decoder: bool, margin: int) -> None:
    """Write ``title`` and a legend of swatches into the top :data:`CAPTION_HEIGHT` pixels of ``picture``."""
    draw = ImageDraw.Draw(picture)
    font = _font()
    right = picture.width - margin
    draw.text((margin, 2), _fit(draw, title, font, right - margin), fill=TEXT, font=font)
    y, x = 2 + CAPTION_LINE, margin
    items: list[tuple[list[tuple[int, int, int]], str]] = [([VISIBLE], "visible"), ([HIDDEN], "hidden")]
    if num_groups:
        shown = [TARGET_COLOURS[m] for m in range(min(num_groups, len(TARGET_COLOURS)))]
        items.append((shown, f"target groups ({num_groups})" if num_groups > 1 else "targets"))
    if overlap:
        items.append(([OVERLAP], "in several groups"))
    if decoder:
        items.append(([DECODER], "decoder-kept"))
    swatch = CAPTION_LINE - 5
    for colours, label in items:
        need = len(colours) * (swatch + 1) + 3 + draw.textlength(label, font=font)
        if x + need > right:
            break
        for colour in colours:
            box = (x, y + 3, x + swatch - 1, y + 2 + swatch)
            if colour == DECODER:  # the cell marker: a ringed yellow square on a hidden cell
                draw.rectangle(box, fill=HIDDEN)
                draw.rectangle((x + 2, y + 5, x + swatch - 3, y + swatch), fill=DECODER, outline=DECODER_EDGE)
            elif colour == OVERLAP:  # a first group's cell with the last group's centre square
                draw.rectangle(box, fill=TARGET_COLOURS[0])
                draw.rectangle((x + 3, y + 6, x + swatch - 4, y + swatch - 1), fill=TARGET_COLOURS[1])
            else:
                draw.rectangle(box, fill=colour, outline=LINE)
            x += swatch + 1
        draw.text((x + 3, y), label, fill=TEXT, font=font)
        x += 3 + round(draw.textlength(label, font=font)) + 14


def save_images(images: Sequence[Image.Image], path: str | Path, *, duration_ms: int = 400) -> Path:
    """Write one PNG, or an animated GIF of all ``images`` (by suffix), atomically (temporary file, then rename)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".gif"):
        raise ValueError(f"--out must end with .png or .gif, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if suffix == ".png":
            images[0].save(tmp, format="PNG")
        else:
            first, *rest = images
            first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=duration_ms, loop=0)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------ command line
def parse_grid(text: str, frames: int | None) -> TokenGrid:
    """``"F"`` (a table: (1, 1, F)), ``"HxW"`` (with ``frames`` time slots) or ``"TxHxW"`` -> TokenGrid.

    Raises:
        ValueError: naming ``--grid`` / ``--frames``.
    """
    if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){0,2}", text.strip().lower()):
        raise ValueError(f"--grid must be F (table features), HxW or TxHxW with positive integers, got {text!r}")
    sides = [int(v) for v in text.strip().lower().split("x")]
    if len(sides) == 1:
        if frames not in (None, 1):
            raise ValueError(f"--frames {frames} needs an HxW --grid, got the table grid {text!r}")
        return TokenGrid(1, 1, sides[0])
    if len(sides) == 3:
        if frames not in (None, sides[0]):
            raise ValueError(f"--frames {frames} contradicts --grid {text!r} ({sides[0]} time slots)")
        return TokenGrid(*sides)
    return TokenGrid(1 if frames is None else frames, sides[0], sides[1])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mim masks",
        description="Draw sample masks of a masking strategy (images side by side, videos one frame strip per "
        "sample; light = visible, dark = hidden, colours = target groups, yellow square = kept by the decoder).",
    )
    p.add_argument("--strategy", help=f"short name ({', '.join(STRATEGIES)}) or a class path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="strategy argument (YAML value)")
    p.add_argument("--init", default=None, metavar="JSON", help="strategy arguments as a JSON object")
    p.add_argument("--grid", default="14x14", help="HxW token grid, TxHxW, or F for a table (default 14x14)")
    p.add_argument("--frames", type=int, default=None, help="time slots T of a video grid (default 1)")
    p.add_argument("--samples", type=int, default=8, help="samples drawn (default 8)")
    p.add_argument(
        "--columns",
        type=int,
        default=None,
        help="samples side by side for T = 1 grids and GIF frames (default: 1 for tables, else up to 4, balanced)",
    )
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--progress", type=float, default=0.0, help="training progress in [0, 1] for schedules")
    p.add_argument("--cell", type=int, default=12, help="pixels per token (default 12)")
    p.add_argument(
        "--caption",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a caption band on top: grid, strategy and a colour legend (default on)",
    )
    p.add_argument(
        "--out", default="masks.png", help="output .png (frame strips for video) or .gif (one frame per slot)"
    )
    p.add_argument("--list", action="store_true", help="print the available short names and exit")
    return p


def _title(strategy: MaskingStrategy, grid: TokenGrid, samples: int, gif: bool) -> str:
    """Caption line: the grid and layout first (so a narrow picture cuts the strategy's repr, not them)."""
    if grid.t == 1 and grid.h == 1:
        where = f"table of {grid.w} features"
    else:
        where = "grid " + "x".join(map(str, grid.shape if grid.t > 1 else grid.shape[1:]))
    if grid.t > 1:
        where += " (T x H x W)"
    layout = "one time slot per frame" if gif else "rows = samples, columns = time slots"
    return f"{where} \u00b7 {samples} samples" + (f" \u00b7 {layout}" if grid.t > 1 else "") + f"  |  {strategy!r}"


def _strategy_kwargs(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if args.init is not None:
        try:
            init = json.loads(args.init)
        except json.JSONDecodeError as err:
            p.error(f"--init is not valid JSON ({err}): {args.init!r}")
        if not isinstance(init, dict):
            p.error(f"--init must be a JSON object of strategy arguments, got {args.init!r}")
        kwargs.update(init)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            p.error(f"--set expects KEY=VALUE with a Python identifier as KEY, got {item!r}")
        try:
            kwargs[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            p.error(f"--set {key}: cannot parse the value {raw!r} as YAML ({err})")
    return kwargs


def main(argv: list[str] | None = None) -> int:
    """``mim masks``: draw masks and write a PNG (video: frame strips) or an animated GIF. Returns 0; bad input exits 2."""
    p = _parser()
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(available_strategies()))
        return 0
    if not args.strategy:
        p.error(f"--strategy is required: one of {', '.join(available_strategies())}, or a class path")
    for flag, value, lo, hi in (("samples", args.samples, 1, 256), ("cell", args.cell, 3, 64)):
        if not lo <= value <= hi:
            p.error(f"--{flag} must be in [{lo}, {hi}], got {value}")
    if args.columns is not None and not 1 <= args.columns <= 256:
        p.error(f"--columns must be in [1, 256], got {args.columns}")
    if args.frames is not None and args.frames < 1:
        p.error(f"--frames must be >= 1, got {args.frames}")
    if not 0.0 <= args.progress <= 1.0:
        p.error(f"--progress must be in [0, 1], got {args.progress}")
    if Path(args.out).suffix.lower() not in (".png", ".gif"):
        p.error(f"--out must end with .png or .gif, got {args.out!r}")
    try:
        grid = parse_grid(args.grid, args.frames)
        strategy = build_strategy(args.strategy, _strategy_kwargs(p, args))
    except ValueError as err:
        p.error(str(err))
    gif = Path(args.out).suffix.lower() == ".gif"
    if args.columns is not None and grid.t > 1 and not gif:
        p.error(
            f"--columns applies to T = 1 grids and GIF frames; a video PNG (--grid {args.grid}, T={grid.t}) has one "
            "frame strip per sample"
        )
    generator = torch.Generator().manual_seed(args.seed)
    scores = smooth_scores(args.samples, grid, generator) if strategy.needs_scores else None
    try:
        masks = strategy(
            args.samples, grid, generator=generator, device=torch.device("cpu"), scores=scores, progress=args.progress
        )
    except ValueError as err:
        p.error(f"--grid {args.grid} (T={grid.t}): {strategy!r} cannot mask it: {err}")
    draw = {
        "cell": args.cell,
        "columns": args.columns,
        "title": _title(strategy, grid, args.samples, gif) if args.caption else None,
    }
    if gif:
        images = [render_masks(masks, grid, frame=t, **draw) for t in range(grid.t)]
    else:
        images = [render_masks(masks, grid, **draw)]
    out = save_images(images, args.out)
    m, groups = masks.targets.shape[1], token_states(masks)[2]
    decoder = "" if masks.decoder is None else f", decoder keeps {masks.decoder.shape[1]} (yellow squares)"
    colours = f"{m} target group(s) in colour" if groups else "targets = hidden"
    print(
        f"wrote {out} ({images[0].width}x{images[0].height} px, {len(images)} frame(s)): {strategy!r} on grid "
        f"{'x'.join(map(str, grid.shape))}, {args.samples} samples; {masks.visible.shape[1]} of {grid.num_tokens} "
        f"visible (light), hidden dark, {colours}{decoder}"
    )
    return 0


if __name__ == "__main__":  # `python -m mim.viz ...` is `mim masks ...` without importing Lightning
    raise SystemExit(main())
