"""Pictures of masks: ``mim masks`` draws sample masks of any strategy so users can see what they configure.

    mim masks --strategy multiblock --grid 14x14 --samples 6 --out masks.png
    mim masks --strategy tube --grid 14x14 --frames 8 --set mask_ratio=0.9 --out tube.gif
    mim masks --strategy feature_subset --grid 54 --out tjepa.png           # a table of 54 features
    mim masks --strategy mim.masking.RandomMasking --init '{"mask_ratio": 0.6}'

Layout (``cell`` pixels per token, ``gap = cell``; the PNG): one row per sample; in each row the T time slots side
by side, each an H x W block of cells (a table of F features is one 1 x F strip). The picture is
``gap + T (W cell + gap)`` pixels wide and ``gap + S (H cell + gap)`` high for S samples; the cell of token
``(t, h, w)`` of sample ``s`` starts at ``x = gap + t (W cell + gap) + w cell``, ``y = gap + s (H cell + gap) + h cell``
and its last pixel column and row are grid lines. An animated GIF (``--out *.gif``) has one frame per time slot:
the same layout with T = 1, below a band of ``gap`` pixels whose bar grows with the slot (so frames differ).

Colours: light grey = visible (the encoder sees it); dark grey = hidden; for strategies with several target groups
(or targets that are not exactly the hidden tokens), target group m has colour ``TARGET_COLOURS[m % 8]``, a token in
several groups has the first group's colour with a centre dot in the last one's; a yellow centre dot marks the
tokens a decoder keeps (``masks.decoder``, dual masking). White is background.

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
from PIL import Image
from torch import Tensor

from mim.masking.base import MaskingStrategy
from mim.types import Masks, TokenGrid

__all__ = [
    "STRATEGIES",
    "TARGET_COLOURS",
    "available_strategies",
    "build_strategy",
    "main",
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
BAR = (31, 119, 180)
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


def _panel(fill: np.ndarray, dot: np.ndarray, palette: np.ndarray, cell: int) -> np.ndarray:
    """One H x W block of cells: fill (H, W), dot (H, W) -> (H cell, W cell, 3) uint8 with grid lines and dots."""
    h, w = fill.shape
    img = palette[fill].repeat(cell, axis=0).repeat(cell, axis=1)  # (H cell, W cell, 3)
    img[cell - 1 :: cell, :] = LINE
    img[:, cell - 1 :: cell] = LINE
    if (dot != -1).any():
        size = max(2, cell // 3)
        start = (cell - 1 - size) // 2
        offset_y = np.arange(h * cell) % cell
        offset_x = np.arange(w * cell) % cell
        inner = ((offset_y >= start) & (offset_y < start + size))[:, None] & (
            (offset_x >= start) & (offset_x < start + size)
        )[None, :]  # (H cell, W cell)
        dot_px = dot.repeat(cell, axis=0).repeat(cell, axis=1)  # (H cell, W cell)
        colours = np.concatenate([palette[2:], np.array([DECODER], dtype=np.uint8)])  # index -2 -> last row
        sel = inner & (dot_px != -1)
        img[sel] = colours[np.where(dot_px[sel] == -2, len(colours) - 1, dot_px[sel])]
    return img


def render_masks(masks: Masks, grid: TokenGrid, *, cell: int = 12, frame: int | None = None) -> Image.Image:
    """Draw masks (see the module docstring for layout and colours).

    Args:
        masks: masks of S samples on ``grid`` (N = grid.num_tokens).
        grid: the token grid (T, H, W).
        cell: pixels per token (the last column and row of a cell are grid lines).
        frame: None for every time slot side by side; ``t`` for slot t only, below a progress band (a GIF frame).

    Returns:
        An RGB image.
    """
    if masks.num_tokens != grid.num_tokens:
        raise ValueError(f"masks have {masks.num_tokens} tokens but grid {grid.shape} has {grid.num_tokens}")
    fill, dot, _ = token_states(masks)
    s, (t_all, h, w) = masks.batch_size, grid.shape
    slots = range(t_all) if frame is None else [frame]
    gap, top = cell, (0 if frame is None else cell)
    width = gap + len(slots) * (w * cell + gap)
    height = top + gap + s * (h * cell + gap)
    img = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    palette = _palette(masks.targets.shape[1])
    fill = fill.reshape(s, t_all, h, w)  # (S, T, H, W)
    dot = dot.reshape(s, t_all, h, w)  # (S, T, H, W)
    for i in range(s):
        for j, t in enumerate(slots):
            x, y = gap + j * (w * cell + gap), top + gap + i * (h * cell + gap)
            img[y : y + h * cell, x : x + w * cell] = _panel(fill[i, t], dot[i, t], palette, cell)
    if frame is not None:
        length = max(1, round(w * cell * (frame + 1) / t_all))
        img[cell // 4 : cell - cell // 4, gap : gap + length] = BAR
    return Image.fromarray(img, mode="RGB")


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
        description="Draw sample masks of a masking strategy (rows = samples; light = visible, dark = hidden, "
        "colours = target groups, yellow dot = kept by the decoder).",
    )
    p.add_argument("--strategy", help=f"short name ({', '.join(STRATEGIES)}) or a class path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="strategy argument (YAML value)")
    p.add_argument("--init", default=None, metavar="JSON", help="strategy arguments as a JSON object")
    p.add_argument("--grid", default="14x14", help="HxW token grid, TxHxW, or F for a table (default 14x14)")
    p.add_argument("--frames", type=int, default=None, help="time slots T of a video grid (default 1)")
    p.add_argument("--samples", type=int, default=8, help="samples drawn, one row each (default 8)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--progress", type=float, default=0.0, help="training progress in [0, 1] for schedules")
    p.add_argument("--cell", type=int, default=12, help="pixels per token (default 12)")
    p.add_argument(
        "--out", default="masks.png", help="output .png (frame strip for video) or .gif (one frame per slot)"
    )
    p.add_argument("--list", action="store_true", help="print the available short names and exit")
    return p


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
    """``mim masks``: draw masks and write a PNG (frame strip) or an animated GIF. Returns 0; bad input exits 2."""
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
    generator = torch.Generator().manual_seed(args.seed)
    scores = smooth_scores(args.samples, grid, generator) if strategy.needs_scores else None
    try:
        masks = strategy(
            args.samples, grid, generator=generator, device=torch.device("cpu"), scores=scores, progress=args.progress
        )
    except ValueError as err:
        p.error(f"--grid {args.grid} (T={grid.t}): {strategy!r} cannot mask it: {err}")
    if Path(args.out).suffix.lower() == ".gif":
        images = [render_masks(masks, grid, cell=args.cell, frame=t) for t in range(grid.t)]
    else:
        images = [render_masks(masks, grid, cell=args.cell)]
    out = save_images(images, args.out)
    m, groups = masks.targets.shape[1], token_states(masks)[2]
    decoder = "" if masks.decoder is None else f", decoder keeps {masks.decoder.shape[1]} (yellow dots)"
    colours = f"{m} target group(s) in colour" if groups else "targets = hidden"
    print(
        f"wrote {out} ({images[0].width}x{images[0].height} px, {len(images)} frame(s)): {strategy!r} on grid "
        f"{'x'.join(map(str, grid.shape))}, {args.samples} samples; {masks.visible.shape[1]} of {grid.num_tokens} "
        f"visible (light), hidden dark, {colours}{decoder}"
    )
    return 0


if __name__ == "__main__":  # `python -m mim.viz ...` is `mim masks ...` without importing Lightning
    raise SystemExit(main())
