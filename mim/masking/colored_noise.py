"""Colored-noise masking (Hinojosa, Liu, Ghanem, "ColorMAE: Exploring data-independent masking strategies in
Masked AutoEncoders", ECCV 2024; official sampler carlosh93/ColorMAE, models/utils/masking_generator.py).

ColorMAE replaces MAE's i.i.d. uniform noise by filtered ("colored") noise: each sample's scores are a window
of a noise pattern at patch-grid resolution, and the K tokens with the **highest** noise stay visible. The
filter decides the mask's spatial structure; nothing depends on the image and nothing is learned.

The official code downloads pre-computed noise banks; mim generates them by filtering seeded white noise in the
FFT domain with the project page's filter definitions (red low-pass, blue high-pass, green band-pass, purple
band-stop), caches them on disk with their SHA-256 and loads them lazily, one copy per device. Per call, each
sample takes a bank slice, a random crop of the grid and random flips, all from the passed generator (vectorised,
no host sync); the scores are the negated window, so ``ScoreMasking`` keeps the K highest values visible.
``sample_mode="official_prefix", window="shared"`` reproduces the official sampler. The filters, the default
sigmas, the bank and its cache, the differences from the official sampler, video and table grids and the
sampler's statistics: docs/design.md, "ColorMAE masking"; cost: BENCHMARKS.md, "Mask generation cost".
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from mim.checks import check_choice, check_int, invalid
from mim.masking.base import ScoreMasking
from mim.types import TokenGrid

__all__ = [
    "BANK_FORMAT",
    "DEFAULT_SIGMAS",
    "ColoredNoiseMasking",
    "bank_cache_dir",
    "bank_path",
    "crop_windows",
    "filter_response",
    "generate_bank",
    "load_or_generate_bank",
    "noise_seed",
]

log = logging.getLogger(__name__)

Color = Literal["red", "blue", "green", "purple"]
SampleMode = Literal["random_index", "official_prefix"]
Window = Literal["per_sample", "shared"]

COLORS: tuple[str, ...] = ("red", "blue", "green", "purple")
DEFAULT_SIGMAS: dict[str, tuple[float, ...]] = {
    "red": (1.5,),
    "blue": (1.0,),
    "green": (0.7, 1.4),
    "purple": (0.7, 1.4),
}
BANK_FORMAT = 1
"""Version of the on-disk bank format (and of the generator): bump it when either changes."""


# ---------------------------------------------------------------------------------------------- bank generation
def _gaussian(freq2: Tensor, sigma: float) -> Tensor:
    """Frequency response of a Gaussian of std ``sigma`` tokens at squared frequencies ``freq2`` (cycles/token)."""
    return torch.exp(-2.0 * math.pi**2 * sigma**2 * freq2)


def filter_response(color: str, size: int, sigmas: tuple[float, ...]) -> Tensor:
    """The colour's filter ``H(f)`` on the ``rfft2`` frequency grid of an ``size x size`` pattern.

    Args:
        color: "red", "blue", "green" or "purple".
        size: n, the pattern side in tokens.
        sigmas: (s,) for red and blue; (s1, s2) with s1 < s2 for green and purple.

    Returns:
        (n, n // 2 + 1) float64, real and non-negative.
    """
    fy = torch.fft.fftfreq(size, dtype=torch.float64)  # (n,)
    fx = torch.fft.rfftfreq(size, dtype=torch.float64)  # (n//2+1,)
    freq2 = fy[:, None] ** 2 + fx[None, :] ** 2  # (n, n//2+1)
    if color == "red":
        return _gaussian(freq2, sigmas[0])
    if color == "blue":
        return 1.0 - _gaussian(freq2, sigmas[0])
    band = _gaussian(freq2, sigmas[0]) - _gaussian(freq2, sigmas[1])  # difference of Gaussians
    if color == "green":
        return band
    if color == "purple":
        return 1.0 - band
    raise ValueError(f"color must be one of {COLORS}, got {color!r}")


def noise_seed(color: str, seed: int) -> int:
    """Seed of a colour's white noise: mixed from (colour, seed), so banks of different colours are independent."""
    digest = hashlib.blake2b(f"colored_noise/{color}/{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generate_bank(color: str, *, num_patterns: int, size: int, sigmas: tuple[float, ...], seed: int) -> Tensor:
    """Filter seeded white noise in the FFT domain (periodic) and normalise each pattern.

    Args:
        color: "red", "blue", "green" or "purple".
        num_patterns: S.
        size: n, the side of each square pattern in tokens.
        sigmas: the colour's Gaussian stds in tokens (see :func:`filter_response`).
        seed: bank seed; the CPU generator that draws the white noise is seeded with ``noise_seed(color, seed)``.

    Returns:
        (S, n, n) float32 on the CPU, each pattern with zero mean and unit (population) variance.
    """
    gen = torch.Generator(device="cpu").manual_seed(noise_seed(color, seed))
    white = torch.randn(num_patterns, size, size, generator=gen, dtype=torch.float64)  # (S, n, n)
    spectrum = torch.fft.rfft2(white) * filter_response(color, size, sigmas)  # (S, n, n//2+1)
    noise = torch.fft.irfft2(spectrum, s=(size, size))  # (S, n, n)
    noise = noise - noise.mean(dim=(1, 2), keepdim=True)
    noise = noise / noise.std(dim=(1, 2), keepdim=True, correction=0).clamp_min(1e-12)
    return noise.to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------- disk cache
def bank_cache_dir() -> Path:
    """``$MIM_CACHE`` if set, else ``$XDG_CACHE_HOME/mim``, else ``~/.cache/mim``; plus ``colored_noise``."""
    root = os.environ.get("MIM_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "mim") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "mim")
    return Path(root) / "colored_noise"


def bank_path(
    color: str, *, num_patterns: int, size: int, sigmas: tuple[float, ...], seed: int, cache_dir: str | Path | None
) -> Path:
    """The cache file of one bank: every generation parameter and the format version are in its name."""
    folder = Path(cache_dir) if cache_dir is not None else bank_cache_dir()
    sig = "-".join(f"{s:g}" for s in sigmas)
    return folder / f"{color}_S{num_patterns}_n{size}_sigma{sig}_seed{seed}_v{BANK_FORMAT}.pt"


def _digest(bank: Tensor) -> str:
    return hashlib.sha256(bank.contiguous().numpy().tobytes()).hexdigest()


def _read_bank(path: Path, meta: dict[str, Any]) -> Tensor:
    """Load and verify a cached bank; raise ``ValueError``/``OSError``/``RuntimeError`` on any mismatch."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not isinstance(blob.get("bank"), Tensor):
        raise ValueError("not a noise-bank file")
    for key, value in meta.items():
        if blob.get(key) != value:
            raise ValueError(f"{key} is {blob.get(key)!r}, expected {value!r}")
    bank = blob["bank"]
    expected_shape = (meta["num_patterns"], meta["size"], meta["size"])
    if bank.dtype != torch.float32 or tuple(bank.shape) != expected_shape:
        raise ValueError(f"bank is {bank.dtype} {tuple(bank.shape)}, expected float32 {expected_shape}")
    if _digest(bank) != blob.get("sha256"):
        raise ValueError("SHA-256 mismatch")
    return bank


def _write_bank(path: Path, bank: Tensor, meta: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**meta, "bank": bank, "sha256": _digest(bank)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared (e.g. MIM_CACHE on a team disk)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_generate_bank(
    color: str,
    *,
    num_patterns: int,
    size: int,
    sigmas: tuple[float, ...],
    seed: int,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> Tensor:
    """The bank from the disk cache, or generated (and cached) when missing, unreadable or corrupt.

    Args:
        color, num_patterns, size, sigmas, seed: see :func:`generate_bank`.
        cache: False: generate in memory and never touch the disk.
        cache_dir: folder of the cache files; default :func:`bank_cache_dir`.

    Returns:
        (S, n, n) float32 on the CPU.
    """
    sigmas = tuple(float(s) for s in sigmas)
    make = lambda: generate_bank(color, num_patterns=num_patterns, size=size, sigmas=sigmas, seed=seed)
    if not cache:
        return make()
    meta = {"format": BANK_FORMAT, "color": color, "num_patterns": num_patterns, "size": size}
    meta.update({"sigmas": list(sigmas), "seed": seed})
    path = bank_path(color, num_patterns=num_patterns, size=size, sigmas=sigmas, seed=seed, cache_dir=cache_dir)
    if path.exists():
        try:
            return _read_bank(path, meta)
        except Exception as err:  # truncated zip, pickle error, wrong metadata or checksum: regenerate
            warnings.warn(f"noise bank cache {path} is unreadable or corrupt ({err}); regenerating it", stacklevel=3)
    else:
        log.info("generating the %s noise bank (first use); caching it in %s", color, path)
    bank = make()
    try:
        _write_bank(path, bank, meta)
    except OSError as err:
        warnings.warn(f"could not write the noise bank cache {path} ({err}); using the bank in memory", stacklevel=3)
    return bank


# ---------------------------------------------------------------------------------------------- windows
def crop_windows(
    bank: Tensor, index: Tensor, top: Tensor, left: Tensor, flip_v: Tensor, flip_h: Tensor, height: int, width: int
) -> Tensor:
    """Per-sample crops of bank slices, optionally flipped, gathered with index arithmetic.

    Sample b reads ``bank[index[b], top[b] : top[b] + height, left[b] : left[b] + width]``, with its rows
    reversed where ``flip_v[b]`` and its columns reversed where ``flip_h[b]``.

    Args:
        bank: (S, n_h, n_w).
        index: (B,) int64 slice per sample, in [0, S).
        top: (B,) int64 first row, in [0, n_h - height].
        left: (B,) int64 first column, in [0, n_w - width].
        flip_v: (B,) bool, reverse the rows (vertical flip).
        flip_h: (B,) bool, reverse the columns (horizontal flip).
        height: H, rows of the window.
        width: W, columns of the window.

    Returns:
        (B, H, W) windows, same dtype and device as ``bank``.
    """
    _, n_h, n_w = bank.shape
    r = torch.arange(height, device=bank.device)  # (H,)
    c = torch.arange(width, device=bank.device)  # (W,)
    rows = top[:, None] + torch.where(flip_v[:, None], height - 1 - r, r)  # (B, H)
    cols = left[:, None] + torch.where(flip_h[:, None], width - 1 - c, c)  # (B, W)
    flat = (index[:, None, None] * n_h + rows[:, :, None]) * n_w + cols[:, None, :]  # (B, H, W) into S*n_h*n_w
    return torch.take(bank, flat)  # (B, H, W)


# ---------------------------------------------------------------------------------------------- strategy
class ColoredNoiseMasking(ScoreMasking):
    """ColorMAE's masking: keep the K highest values of a random window of filtered noise visible.

    See docs/design.md ("ColorMAE masking") for the filters, the bank and its cache, and the differences from the
    official sampler. Exactly K = int(N * (1 - mask_ratio)) tokens stay visible in every sample.

    Args:
        color: "green" (band-pass; default, the paper's best and released colour), "red" (low-pass: large
            blobs), "blue" (high-pass: scattered tokens) or "purple" (band-stop).
        mask_ratio: fraction of tokens hidden, in (0, 1). ColorMAE uses 0.75.
        sample_mode: "random_index" (default: each sample draws a bank slice uniformly) or "official_prefix"
            (sample i uses slice i mod S, as the official code).
        window: "per_sample" (default: crop offset and flips drawn per sample) or "shared" (one offset and
            one pair of flips per chunk of S samples, as the official code).
        num_patterns: S, patterns in the bank (default 1024).
        bank_size: n, side of each square pattern in tokens (default 64); grids up to n x n can be cropped.
        sigmas: Gaussian stds in tokens: (s,) for red / blue, (s1, s2) with s1 < s2 for green / purple.
            Default None: ``DEFAULT_SIGMAS[color]`` (red 1.5, blue 1.0, green and purple (0.7, 1.4)).
        seed: seed of the bank's white noise (the bank is a deterministic function of all bank arguments).
        cache: keep the bank in the disk cache (default True); False generates it in memory on first use.
        cache_dir: cache folder; default None: ``$MIM_CACHE``, ``$XDG_CACHE_HOME/mim`` or ``~/.cache/mim``,
            plus ``colored_noise``.
    """

    def __init__(
        self,
        *,
        color: Color = "green",
        mask_ratio: float = 0.75,
        sample_mode: SampleMode = "random_index",
        window: Window = "per_sample",
        num_patterns: int = 1024,
        bank_size: int = 64,
        sigmas: tuple[float, ...] | None = None,
        seed: int = 0,
        cache: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(mask_ratio=mask_ratio)
        owner = type(self).__name__
        self.color: Color = check_choice(owner, "color", color, COLORS)
        modes = ("random_index", "official_prefix")
        self.sample_mode: SampleMode = check_choice(owner, "sample_mode", sample_mode, modes)
        self.window: Window = check_choice(owner, "window", window, ("per_sample", "shared"))
        self.seed = check_int(owner, "seed", seed, minimum=0)
        self.num_patterns = check_int(owner, "num_patterns", num_patterns)
        self.bank_size = check_int(owner, "bank_size", bank_size)
        self.sigmas = self._check_sigmas(owner, color, DEFAULT_SIGMAS[color] if sigmas is None else sigmas)
        self.cache = bool(cache)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self._banks: dict[str, Tensor] = {}

    @staticmethod
    def _check_sigmas(owner: str, color: str, sigmas: Any) -> tuple[float, ...]:
        count = 1 if color in ("red", "blue") else 2
        try:
            values = tuple(float(s) for s in sigmas)
        except TypeError:
            values = ()
        if len(values) != count or not all(math.isfinite(s) and s > 0 for s in values):
            raise invalid(owner, "sigmas", f"{count} positive finite number(s) for {color}", sigmas)
        if count == 2 and not values[0] < values[1]:
            raise invalid(owner, "sigmas", f"(s1, s2) with s1 < s2 for {color}", values)
        return values

    # ------------------------------------------------------------------ pickling: config only, never the bank
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_banks", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._banks = {}

    # ------------------------------------------------------------------ bank
    def bank(self, device: torch.device | str = "cpu") -> Tensor:
        """The (S, n, n) float32 bank on ``device``: loaded (or generated) on first use, then one copy per device."""
        key = str(torch.device(device))
        bank = self._banks.get(key)
        if bank is None:
            cpu = self._banks.get("cpu")
            if cpu is None:
                cpu = load_or_generate_bank(
                    self.color,
                    num_patterns=self.num_patterns,
                    size=self.bank_size,
                    sigmas=self.sigmas,
                    seed=self.seed,
                    cache=self.cache,
                    cache_dir=self.cache_dir,
                )
                self._banks["cpu"] = cpu
            bank = self._banks[key] = cpu.to(device)
        return bank

    def windows(self, batch_size: int, grid: TokenGrid, *, generator: torch.Generator, device: torch.device) -> Tensor:
        """Draw each sample's noise window (the values before negation; high = visible).

        Random draws, in order: slice indices (``random_index`` only), crop rows, crop columns, flips.

        Args:
            batch_size: B.
            grid: the token grid; its H x W must fit in the bank's n x n.
            generator: the only source of randomness; lives on ``device``.
            device: where the windows are made.

        Returns:
            (B, H, W) float32.
        """
        n, s = self.bank_size, self.num_patterns
        if grid.h > n or grid.w > n:
            raise ValueError(
                f"{type(self).__name__}.bank_size={n} cannot cover the {grid.h} x {grid.w} token grid; "
                f"set bank_size >= {max(grid.h, grid.w)}"
            )
        bank = self.bank(device)  # (S, n, n)
        if self.sample_mode == "random_index":
            index = torch.randint(0, s, (batch_size,), generator=generator, device=device)  # (B,)
        else:
            index = torch.arange(batch_size, device=device) % s  # (B,) official: sample i uses slice i mod S
        draws = batch_size if self.window == "per_sample" else -(-batch_size // s)  # shared: one per chunk of S
        top = torch.randint(0, n - grid.h + 1, (draws,), generator=generator, device=device)
        left = torch.randint(0, n - grid.w + 1, (draws,), generator=generator, device=device)
        flips = torch.randint(0, 2, (2, draws), generator=generator, device=device).bool()  # (2, draws)
        flip_v, flip_h = flips[0], flips[1]
        if self.window == "shared":
            chunk = torch.arange(batch_size, device=device) // s  # (B,)
            top, left, flip_v, flip_h = top[chunk], left[chunk], flip_v[chunk], flip_h[chunk]  # (B,) each
        return crop_windows(bank, index, top, left, flip_v, flip_h, grid.h, grid.w)  # (B, H, W)

    def scores(
        self,
        batch_size: int,
        grid: TokenGrid,
        *,
        generator: torch.Generator,
        device: torch.device,
        scores: Tensor | None,
        progress: float,
    ) -> Tensor:
        window = self.windows(batch_size, grid, generator=generator, device=device)  # (B, H, W)
        spatial = -window.reshape(batch_size, grid.h * grid.w)  # (B, HW) lowest score = highest noise
        if grid.t == 1:
            return spatial  # (B, N)
        return spatial.repeat(1, grid.t)  # (B, T*HW) the same window in every time slot, t-major
