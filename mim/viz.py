"""Pictures of masks: :class:`~mim.types.Masks` drawn on their token grid, as a PNG or the frames of a GIF.

Pure functions of the masks (no strategy, no command line), shared by ``mim masks`` (:mod:`mim.masks_cli`) and
any other picture of masks. Light grey = visible, dark grey = hidden, one colour per target group, a yellow
centre square for the tokens a decoder keeps; :func:`render_masks` states the layout and colours exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mim.types import Masks, TokenGrid

__all__ = [
    "CAPTION_HEIGHT",
    "TARGET_COLOURS",
    "default_columns",
    "marker_square",
    "render_masks",
    "save_images",
    "token_states",
]

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
    """Draw masks: a picture of S samples, with an optional caption band on top.

    Layout (``cell`` pixels per token, ``gap = cell``; every cell's last pixel column and row are grid lines). On
    top, when ``title`` is given, a caption band of ``top = CAPTION_HEIGHT`` (36) pixels: ``title`` (cut with "..."
    to the picture's width), then a legend of swatches: visible, hidden, and the target groups, overlaps and decoder
    marker when the masks have them (no title: ``top = 0``). Below it:

    * T = 1 grids (images, tables): samples side by side, C per row (``columns``, default :func:`default_columns`),
      R = ceil(S / C) rows. The picture is ``gap + C (W cell + gap)`` pixels wide and ``top + gap + R (H cell +
      gap)`` high; token ``(h, w)`` of sample ``s`` starts at ``x = gap + (s mod C)(W cell + gap) + w cell``,
      ``y = top + gap + (s div C)(H cell + gap) + h cell``.
    * Video (T > 1, ``frame`` None): a frame strip per sample, one row per sample with its T time slots side by
      side, and twice the gap (with a grey separator line of ``max(1, cell div 6)`` pixels in its middle) between
      samples. The picture is ``gap + T (W cell + gap)`` wide and ``top + S (H cell + 2 gap)`` high; token
      ``(t, h, w)`` of sample ``s`` starts at ``x = gap + t (W cell + gap) + w cell``,
      ``y = top + gap + s (H cell + 2 gap) + h cell``.
    * A GIF frame (``frame = t``): the T = 1 layout of slot t, with a band of ``gap`` pixels under the caption (so
      ``top = CAPTION_HEIGHT + gap``) whose blue bar, from ``x = gap``, is ``round((width - 2 gap)(t + 1) / T)``
      pixels long (the last frame's spans the panels).

    Colours (the caption's legend repeats them): light grey = visible (the encoder sees it); dark grey = hidden;
    when target groups are coloured (M > 1, or targets that are not exactly the hidden tokens), target group m has
    colour ``TARGET_COLOURS[m % 8]`` (blue, red, green, purple, brown, pink, cyan, olive), and a token in several
    groups has the first group's colour with a centre square in the last one's. A yellow centre square with a dark
    ring marks the tokens a decoder keeps (``Masks.decoder``, dual masking); the square is about 45 % of the cell
    (:func:`marker_square`). White is background.

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
        raise ValueError(f"save_images: path must end with .png or .gif, got {str(path)!r}")
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
