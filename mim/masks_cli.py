"""``mim masks``: draw sample masks of any masking strategy, so users see what they configure.

    mim masks --strategy multiblock --grid 14x14 --samples 8 --out masks.png
    mim masks --strategy tube --grid 14x14 --frames 8 --set mask_ratio=0.9 --out tube.gif
    mim masks --strategy feature_subset --grid 54 --out tjepa.png           # a table of 54 features
    mim masks --strategy mim.masking.RandomMasking --init '{"mask_ratio": 0.6}' --columns 2 --no-caption

``--strategy`` is a short name or a class path. The short names are every concrete MaskingStrategy that
``mim.masking`` exports, its class name in snake case without "Masking" (ColoredNoiseMasking -> colored_noise);
``--list`` prints them. Strategies that need per-token scores (hard-patch, attention) get a smooth random field
(:func:`smooth_scores`), so the "hard" or salient tokens come in blobs as in a real loss or attention map. The
picture's layout and colours: :func:`mim.viz.render_masks`. ``python -m mim.masks_cli`` is ``mim masks``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

import mim.masking
from mim.masking.base import MaskingStrategy
from mim.types import TokenGrid
from mim.viz import render_masks, save_images, token_states

__all__ = [
    "STRATEGIES",
    "build_strategy",
    "main",
    "parse_grid",
    "resolve_strategy",
    "short_name",
    "smooth_scores",
]

_SHORT_NAMES = {"MultiBlockMasking": "multiblock"}
"""Short names that are not the snake-case class name (I-JEPA's "multi-block" is one word here, as in its module)."""


# ------------------------------------------------------------------------------------------------ strategies
def short_name(cls: type) -> str:
    """The ``--strategy`` name of a class: snake case without "Masking" (RandomMasking -> random)."""
    if cls.__name__ in _SHORT_NAMES:
        return _SHORT_NAMES[cls.__name__]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", cls.__name__.removesuffix("Masking")).lower()


def _is_strategy(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, MaskingStrategy) and not inspect.isabstract(obj)


def _exported_strategies() -> dict[str, type[MaskingStrategy]]:
    """Every concrete MaskingStrategy in ``mim.masking.__all__``, by short name in alphabetical order."""
    classes = [getattr(mim.masking, name) for name in mim.masking.__all__]
    return dict(sorted((short_name(cls), cls) for cls in classes if _is_strategy(cls)))


STRATEGIES: dict[str, type[MaskingStrategy]] = _exported_strategies()
"""Short names of ``--strategy`` -> the strategy classes exported by :mod:`mim.masking`."""


def resolve_strategy(name: str) -> type[MaskingStrategy]:
    """A short name (:data:`STRATEGIES`) or a dotted class path -> a concrete MaskingStrategy class.

    Raises:
        ValueError: naming ``--strategy`` and listing the available short names.
    """
    if name in STRATEGIES:
        return STRATEGIES[name]
    if "." not in name:
        raise ValueError(
            f"--strategy {name!r} is unknown; available: {', '.join(STRATEGIES)}, "
            "or a class path such as mim.masking.RandomMasking"
        )
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--strategy {name}: cannot import it ({err})") from None
    if not _is_strategy(cls):
        raise ValueError(f"--strategy {name}: {cls!r} is not a concrete mim.masking.MaskingStrategy")
    return cls


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

    White Gaussian noise from ``generator``, blurred with a Gaussian of sigma = max(0.5, 0.15 * side) tokens along
    each of T, H, W, standardised per sample.

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
        print("\n".join(STRATEGIES))
        return 0
    if not args.strategy:
        p.error(f"--strategy is required: one of {', '.join(STRATEGIES)}, or a class path")
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
    for one in masks.sets:  # one picture per mask set (MultiMasking: out, then <stem>_set1<suffix>, ...)
        path = Path(args.out)
        if one.set_index:
            path = path.with_name(f"{path.stem}_set{one.set_index}{path.suffix}")
        if gif:
            images = [render_masks(one, grid, frame=t, **draw) for t in range(grid.t)]
        else:
            images = [render_masks(one, grid, **draw)]
        out = save_images(images, path)
        m, groups = one.targets.shape[1], token_states(one)[2]
        decoder = "" if one.decoder is None else f", decoder keeps {one.decoder.shape[1]} (yellow squares)"
        colours = f"{m} target group(s) in colour" if groups else "targets = hidden"
        which = f" mask set {one.set_index + 1} of {one.num_sets}:" if one.num_sets > 1 else ""
        print(
            f"wrote {out} ({images[0].width}x{images[0].height} px, {len(images)} frame(s)):{which} {strategy!r} on "
            f"grid {'x'.join(map(str, grid.shape))}, {args.samples} samples; {one.visible.shape[1]} of "
            f"{grid.num_tokens} visible (light), hidden dark, {colours}{decoder}"
        )
    return 0


if __name__ == "__main__":  # `python -m mim.masks_cli ...` is `mim masks ...` without importing Lightning
    raise SystemExit(main())
