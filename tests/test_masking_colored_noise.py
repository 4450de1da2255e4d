"""ColoredNoiseMasking (ColorMAE): contract, filters against their formulas, spectral signature of banks and
masks, crops/flips, the disk cache, per-position statistics, validation, and the debug recipe end to end."""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

import mim.masking.colored_noise as cn
from mim.masking import ColoredNoiseMasking
from mim.masking.base import MaskingStrategy
from mim.types import TokenGrid
from tests.contracts import MaskingStrategyContract
from tests.factories import LossRecorder

CPU = torch.device("cpu")
COLORS = ("red", "blue", "green", "purple")
SMALL = {"num_patterns": 64, "bank_size": 32}  # fast banks for the tests


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _module_cache(tmp_path_factory):
    """Every test of this file caches banks in a temporary folder, never in the real home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIM_CACHE", str(tmp_path_factory.mktemp("mim_cache")))
        yield


def radial_mean(values: Tensor) -> Tensor:
    """Mean of an (n, n) array over the FFT frequencies with round(n |f|) = r, for r = 1 .. n // 2."""
    n = values.shape[-1]
    f = torch.fft.fftfreq(n, dtype=torch.float64)
    radius = torch.round(torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2) * n).long().flatten()  # (n*n,)
    total = torch.zeros(int(radius.max()) + 1, dtype=torch.float64).index_add_(0, radius, values.double().flatten())
    count = torch.zeros_like(total).index_add_(0, radius, torch.ones(n * n, dtype=torch.float64))
    return (total / count)[1 : n // 2 + 1]


def radial_power(x: Tensor) -> Tensor:
    """Radially averaged power spectrum of square fields.

    Args:
        x: (B, n, n); each field's mean is removed first.

    Returns:
        (n // 2,) mean |FFT|^2 per radius r = 1 .. n // 2 (see :func:`radial_mean`), averaged over B.
    """
    x = x.double() - x.double().mean(dim=(-2, -1), keepdim=True)
    return radial_mean(torch.fft.fft2(x).abs().pow(2).mean(0))  # (n//2,)


# ---------------------------------------------------------------------------------------------- contract
class TestColoredNoiseMaskingContract(MaskingStrategyContract):
    strategy_cls = ColoredNoiseMasking
    grids = [TokenGrid(1, 14, 14), TokenGrid(1, 7, 5), TokenGrid(1, 2, 3), TokenGrid(4, 7, 7), TokenGrid(1, 1, 20)]

    def make_strategy(self) -> ColoredNoiseMasking:
        return ColoredNoiseMasking(color="green", mask_ratio=0.75, **SMALL)


class TestColoredNoiseMaskingOfficialContract(TestColoredNoiseMaskingContract):
    """The official sampling (prefix slices, one shared window per chunk of S samples), red noise, B > S."""

    batch_size = 10
    grids = [TokenGrid(1, 14, 14), TokenGrid(1, 7, 5), TokenGrid(3, 4, 4), TokenGrid(1, 1, 16)]

    def make_strategy(self) -> ColoredNoiseMasking:
        return ColoredNoiseMasking(
            color="red", mask_ratio=0.6, sample_mode="official_prefix", window="shared", num_patterns=4, bank_size=16
        )


class TestColoredNoiseMaskingDefaultContract(TestColoredNoiseMaskingContract):
    """The default bank (1024 x 64 x 64): generated once into the module's cache, then loaded from disk."""

    grids = [TokenGrid(1, 14, 14), TokenGrid(8, 14, 14), TokenGrid(1, 64, 64)]

    def make_strategy(self) -> ColoredNoiseMasking:
        return ColoredNoiseMasking()


# ---------------------------------------------------------------------------------------------- filters and banks
def test_filter_response_matches_the_formulas() -> None:
    n = 16
    f2 = torch.fft.fftfreq(n, dtype=torch.float64)[:, None] ** 2 + torch.fft.rfftfreq(n, dtype=torch.float64) ** 2
    g = lambda s: torch.exp(-2 * math.pi**2 * s**2 * f2)
    torch.testing.assert_close(cn.filter_response("red", n, (1.5,)), g(1.5))
    torch.testing.assert_close(cn.filter_response("blue", n, (1.0,)), 1 - g(1.0))
    torch.testing.assert_close(cn.filter_response("green", n, (0.7, 1.4)), g(0.7) - g(1.4))
    torch.testing.assert_close(cn.filter_response("purple", n, (0.7, 1.4)), 1 - g(0.7) + g(1.4))
    assert cn.filter_response("red", n, (1.5,))[0, 0] == 1 and cn.filter_response("blue", n, (1.0,))[0, 0] == 0
    # the documented band-pass peak: |f|^2 = ln(s2^2 / s1^2) / (2 pi^2 (s2^2 - s1^2)) = 0.22^2 for (0.7, 1.4)
    s1, s2 = cn.DEFAULT_SIGMAS["green"]
    peak = math.sqrt(math.log(s2**2 / s1**2) / (2 * math.pi**2 * (s2**2 - s1**2)))
    assert abs(peak - 0.22) < 0.005
    value = math.exp(-2 * math.pi**2 * s1**2 * peak**2) - math.exp(-2 * math.pi**2 * s2**2 * peak**2)
    assert abs(value - 0.47) < 0.005


@pytest.mark.parametrize("color", COLORS)
def test_bank_is_normalised_seeded_and_periodic(color: str) -> None:
    sig = cn.DEFAULT_SIGMAS[color]
    bank = cn.generate_bank(color, num_patterns=16, size=24, sigmas=sig, seed=3)
    assert bank.shape == (16, 24, 24) and bank.dtype == torch.float32
    torch.testing.assert_close(bank.double().mean(dim=(1, 2)), torch.zeros(16, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(bank.double().std(dim=(1, 2), correction=0), torch.ones(16, dtype=torch.float64))
    assert torch.equal(bank, cn.generate_bank(color, num_patterns=16, size=24, sigmas=sig, seed=3))
    assert not torch.equal(bank, cn.generate_bank(color, num_patterns=16, size=24, sigmas=sig, seed=4))
    # periodic filtering commutes with circular shifts of the white noise: the FFT filter has no boundary
    white = torch.randn(2, 24, 24, generator=_gen(0), dtype=torch.float64)
    h = cn.filter_response(color, 24, sig)
    filt = lambda w: torch.fft.irfft2(torch.fft.rfft2(w) * h, s=(24, 24))
    torch.testing.assert_close(filt(white.roll((5, -7), (1, 2))), filt(white).roll((5, -7), (1, 2)))


def test_colours_use_independent_noise() -> None:
    """Each colour's white noise has its own seed stream, so banks of two colours are uncorrelated."""
    blue = cn.generate_bank("blue", num_patterns=32, size=32, sigmas=(1.0,), seed=0)
    purple = cn.generate_bank("purple", num_patterns=32, size=32, sigmas=(0.7, 1.4), seed=0)
    corr = (blue * purple).mean()  # both have zero mean and unit variance per pattern
    assert abs(float(corr)) < 5 / math.sqrt(32 * 32 * 32)


@pytest.mark.parametrize("color", COLORS)
def test_bank_power_spectrum_follows_the_filter(color: str) -> None:
    """E |FFT(bank)|^2 is proportional to |H|^2: the ratio is flat across radial bins (formula check)."""
    n, s = 32, 256
    sig = cn.DEFAULT_SIGMAS[color]
    bank = cn.generate_bank(color, num_patterns=s, size=n, sigmas=sig, seed=1)
    f2 = torch.fft.fftfreq(n, dtype=torch.float64)[:, None] ** 2 + torch.fft.fftfreq(n, dtype=torch.float64) ** 2
    g = lambda sd: torch.exp(-2 * math.pi**2 * sd**2 * f2)  # (n, n) full-FFT grid
    band = g(sig[0]) - g(sig[-1])
    h = {"red": g(sig[0]), "blue": 1 - g(sig[0]), "green": band, "purple": 1 - band}[color]
    expected = radial_mean(h.pow(2))
    measured = radial_power(bank)
    keep = expected > 1e-2 * expected.max()
    ratio = measured[keep] / expected[keep]
    assert int(keep.sum()) >= 6
    assert float(ratio.max() / ratio.min()) < 1.25, f"{color}: power / |H|^2 varies {ratio.tolist()}"


def _assert_signature(color: str, p: Tensor, where: str) -> None:
    """red peaks at the lowest frequency, blue at the highest, green mid-band; purple is depleted mid-band."""
    r = len(p)
    peak = int(p.argmax()) + 1  # radius of the maximum, 1 .. r
    mid = p[r // 4 : (3 * r) // 4 + 1]
    if color == "red":
        assert peak == 1 and p[-1] < 0.2 * p[0], f"{where} red: {p.tolist()}"
    elif color == "blue":
        assert peak >= r - 1 and p[0] < 0.6 * p[-1], f"{where} blue: {p.tolist()}"
    elif color == "green":
        assert r / 4 <= peak <= 3 * r / 4 and p[0] < 0.8 * p.max() and p[-1] < 0.8 * p.max(), f"{where}: {p.tolist()}"
    else:
        assert float(mid.min()) < 0.8 * float(min(p[0], p[-1])), f"{where} purple: {p.tolist()}"


@pytest.mark.parametrize("color", COLORS)
def test_spectral_signature_of_banks_and_masks(color: str) -> None:
    strategy = ColoredNoiseMasking(color=color, **SMALL)
    _assert_signature(color, radial_power(strategy.bank()), "bank")
    grid = TokenGrid(1, 16, 16)
    masks = strategy(2048, grid, generator=_gen(11), device=CPU)
    visible = (~masks.hidden).double().view(2048, 16, 16)  # (B, H, W) 1 = visible
    _assert_signature(color, radial_power(visible), "binary masks")


def test_random_masks_are_white() -> None:
    """Control: uniform random masks have a flat radial spectrum, which none of the colours has."""
    from mim.masking import RandomMasking

    masks = RandomMasking(mask_ratio=0.75)(2048, TokenGrid(1, 16, 16), generator=_gen(0), device=CPU)
    p = radial_power((~masks.hidden).double().view(2048, 16, 16))
    assert float(p.max() / p.min()) < 1.1


def test_crops_and_flips_preserve_the_radial_spectrum() -> None:
    bank = cn.generate_bank("green", num_patterns=512, size=32, sigmas=(0.7, 1.4), seed=2)
    crops = bank[:, :16, :16]  # fixed offset, no flip
    for dims in ((1,), (2,), (1, 2)):  # flips: exactly the same radial spectrum, window by window
        for i in range(4):
            torch.testing.assert_close(radial_power(crops[i : i + 1].flip(dims)), radial_power(crops[i : i + 1]))
    strategy = ColoredNoiseMasking(color="green", num_patterns=512, bank_size=32, seed=2)
    assert torch.equal(strategy.bank(), bank)
    random_windows = strategy.windows(4096, TokenGrid(1, 16, 16), generator=_gen(3), device=CPU)
    centre = bank[:, 8:24, 8:24]
    ref = radial_power(torch.cat([crops, centre]))
    got = radial_power(random_windows)
    assert float(((got - ref) / ref).abs().max()) < 0.04, ((got - ref) / ref).tolist()


# ---------------------------------------------------------------------------------------------- windows and masks
def test_crop_windows_matches_a_loop_reference() -> None:
    bank = torch.randn(5, 9, 11, generator=_gen(0))
    index = torch.tensor([0, 4, 2, 2, 1, 3])
    top = torch.tensor([0, 5, 1, 3, 0, 2])  # in [0, 9 - 4]
    left = torch.tensor([0, 4, 3, 2, 1, 0])  # in [0, 11 - 7]
    flip_v = torch.tensor([False, True, False, True, True, False])
    flip_h = torch.tensor([False, False, True, True, False, True])
    got = cn.crop_windows(bank, index, top, left, flip_v, flip_h, 4, 7)
    for b in range(6):
        ref = bank[index[b], top[b] : top[b] + 4, left[b] : left[b] + 7]
        ref = ref.flip(0) if flip_v[b] else ref
        ref = ref.flip(1) if flip_h[b] else ref
        assert torch.equal(got[b], ref)


def _locate(bank: Tensor, window: Tensor) -> list[tuple[int, int, int, bool, bool]]:
    """Every (slice, top, left, flip_v, flip_h) whose crop of ``bank`` equals ``window``."""
    h, w = window.shape
    patches = bank.unfold(1, h, 1).unfold(2, w, 1)  # (S, n-h+1, n-w+1, h, w)
    found = []
    for fv in (False, True):
        for fh in (False, True):
            crop = window.flip(0) if fv else window
            crop = crop.flip(1) if fh else crop
            hits = (patches == crop).flatten(-2).all(-1).nonzero().tolist()
            found += [(s, t, l, fv, fh) for s, t, l in hits]
    return found


@pytest.mark.parametrize("window", ["per_sample", "shared"])
@pytest.mark.parametrize("sample_mode", ["random_index", "official_prefix"])
def test_windows_are_crops_and_flips_of_bank_slices(sample_mode: str, window: str) -> None:
    s, b = 8, 40
    strategy = ColoredNoiseMasking(color="blue", sample_mode=sample_mode, window=window, num_patterns=s, bank_size=12)
    bank = strategy.bank()
    windows = strategy.windows(b, TokenGrid(1, 5, 6), generator=_gen(4), device=CPU)
    where = []
    for i in range(b):
        hits = _locate(bank, windows[i])
        assert len(hits) == 1, f"sample {i}: {hits}"
        where.append(hits[0])
    slices = [w[0] for w in where]
    if sample_mode == "official_prefix":
        assert slices == [i % s for i in range(b)]  # sample i uses slice i mod S
    else:
        assert len(set(slices)) == s  # uniform draws over 40 samples touch every one of the 8 slices
    transforms = [w[1:] for w in where]
    if window == "shared":  # one crop and flip per chunk of S samples (B = 40: 5 chunks)
        chunks = [set(transforms[c * s : (c + 1) * s]) for c in range(b // s)]
        assert all(len(t) == 1 for t in chunks)
        assert len(set.union(*chunks)) > 1
    else:
        assert len(set(transforms)) > b // 2


@pytest.mark.parametrize("color", COLORS)
def test_visible_tokens_are_the_top_k_window_values(color: str) -> None:
    strategy = ColoredNoiseMasking(color=color, mask_ratio=0.75, **SMALL)
    grid = TokenGrid(1, 14, 14)
    windows = strategy.windows(32, grid, generator=_gen(9), device=CPU).reshape(32, 196)  # (B, N)
    masks = strategy(32, grid, generator=_gen(9), device=CPU)  # same stream: the same windows
    k = int(196 * 0.25)
    assert masks.visible.shape == (32, k) == (32, 49)
    top = windows.topk(k, dim=1).indices.sort(dim=1).values
    assert torch.equal(masks.visible, top)
    vis_min = windows.gather(1, masks.visible).min(dim=1).values
    hid_max = windows.gather(1, masks.targets[:, 0]).max(dim=1).values
    assert bool((vis_min > hid_max).all())


def test_video_grids_reuse_the_window_in_every_time_slot() -> None:
    strategy = ColoredNoiseMasking(**SMALL)
    grid = TokenGrid(4, 7, 7)  # N = 196, K = 49 = 4 * 12 + 1: 12 full tubes and one position in slot 0 only
    windows = strategy.windows(16, grid, generator=_gen(5), device=CPU).reshape(16, 49)
    masks = strategy(16, grid, generator=_gen(5), device=CPU)
    assert masks.visible.shape == (16, 49)
    vis = (~masks.hidden).view(16, 4, 49)  # (B, T, HW)
    per_position = vis.sum(dim=1)  # (B, HW)
    assert bool(((per_position == 0) | (per_position == 4) | (per_position == 1)).all())
    assert (per_position == 4).sum(dim=1).tolist() == [12] * 16 and (per_position == 1).sum(dim=1).tolist() == [1] * 16
    assert bool(vis[:, 0][per_position == 1].all())  # the partial tube is visible in slot 0 (raster tie-break)
    top13 = windows.topk(13, dim=1).indices.sort(dim=1).values
    assert torch.equal((per_position > 0).nonzero()[:, 1].view(16, 13), top13)


@pytest.mark.parametrize("color", ["green", "blue", "purple"])
def test_per_position_visible_frequency_is_uniform(color: str) -> None:
    """With a random window per sample, every token is visible K / N of the time (within sampling noise)."""
    draws, grid = 20_000, TokenGrid(1, 14, 14)
    masks = ColoredNoiseMasking(color=color, num_patterns=256, bank_size=32)(draws, grid, generator=_gen(6), device=CPU)
    freq = (~masks.hidden).double().mean(dim=0)  # (N,)
    p = 49 / 196
    # tokens of one mask are correlated, but each position's count is still a sum of 20 000 draws
    assert float((freq - p).abs().max()) < 5 * math.sqrt(p * (1 - p) / draws), freq.view(14, 14)


def test_red_masks_favour_the_window_border() -> None:
    """Documented property: the extremes of a smooth field within a window lie on its border more often."""
    draws = 20_000
    masks = ColoredNoiseMasking(color="red", num_patterns=256, bank_size=32)(
        draws, TokenGrid(1, 14, 14), generator=_gen(7), device=CPU
    )
    freq = (~masks.hidden).double().mean(dim=0).view(14, 14)
    corners = freq[[0, 0, 13, 13], [0, 13, 0, 13]].mean()
    centre = freq[5:9, 5:9].mean()
    assert 0.255 < float(corners) < 0.28 and 0.23 < float(centre) < 0.25, freq
    assert abs(float(freq.mean()) - 0.25) < 1e-9  # exact K per sample


def test_samples_and_calls_differ() -> None:
    strategy = ColoredNoiseMasking(**SMALL)
    masks = strategy(256, TokenGrid(1, 14, 14), generator=_gen(8), device=CPU)
    assert len({tuple(r) for r in masks.visible.tolist()}) == 256
    # two samples' visible sets overlap about as much as independent K-subsets do: K^2 / N = 12.25 tokens
    hidden = masks.hidden
    overlap = (~hidden[0::2] & ~hidden[1::2]).sum(dim=1).double().mean()
    assert abs(float(overlap) - 49 * 49 / 196) < 1.0


@pytest.mark.parametrize("window", ["per_sample", "shared"])
def test_no_host_syncs_per_call(window: str) -> None:
    syncs = pytest.importorskip("tests.syncs")
    strategy = ColoredNoiseMasking(window=window, **SMALL)
    strategy(4, TokenGrid(1, 14, 14), generator=_gen(0), device=CPU)  # first call: loads the bank (checksum)
    for grid in (TokenGrid(1, 14, 14), TokenGrid(4, 7, 7)):
        with syncs.count_host_syncs() as counter:
            strategy(64, grid, generator=_gen(1), device=CPU)
        assert counter.count == 0, counter.calls


# ---------------------------------------------------------------------------------------------- cache
def _kwargs(tmp_path: Path | None = None, **over) -> dict:
    return {"num_patterns": 16, "bank_size": 16, **({"cache_dir": str(tmp_path)} if tmp_path else {}), **over}


def test_cache_dir_resolution(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MIM_CACHE", str(tmp_path / "a"))
    assert cn.bank_cache_dir() == tmp_path / "a" / "colored_noise"
    monkeypatch.delenv("MIM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cn.bank_cache_dir() == tmp_path / "xdg" / "mim" / "colored_noise"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cn.bank_cache_dir() == tmp_path / "home" / ".cache" / "mim" / "colored_noise"
    path = cn.bank_path("purple", num_patterns=7, size=20, sigmas=(0.5, 1.25), seed=3, cache_dir=None)
    assert path.name == f"purple_S7_n20_sigma0.5-1.25_seed3_v{cn.BANK_FORMAT}.pt"


def test_cache_is_written_once_then_loaded(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MIM_CACHE", str(tmp_path))
    calls = []
    real = cn.generate_bank
    monkeypatch.setattr(cn, "generate_bank", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = ColoredNoiseMasking(**_kwargs())
    bank = first.bank()
    files = list((tmp_path / "colored_noise").iterdir())
    assert len(calls) == 1 and [f.name for f in files] == [f"green_S16_n16_sigma0.7-1.4_seed0_v{cn.BANK_FORMAT}.pt"]
    mtime = files[0].stat().st_mtime_ns
    second = ColoredNoiseMasking(**_kwargs())
    assert torch.equal(second.bank(), bank) and len(calls) == 1  # loaded, not regenerated
    assert files[0].stat().st_mtime_ns == mtime
    assert second.bank() is second.bank()  # memoised per device
    ColoredNoiseMasking(**_kwargs(seed=1)).bank()  # another configuration: another file
    assert len(calls) == 2 and len(list((tmp_path / "colored_noise").iterdir())) == 2
    blob = torch.load(files[0], weights_only=True)
    assert blob["format"] == cn.BANK_FORMAT and blob["color"] == "green" and len(blob["sha256"]) == 64


@pytest.mark.parametrize("damage", ["truncate", "garbage", "tamper", "wrong_meta"])
def test_corrupt_cache_is_regenerated_with_a_warning(tmp_path: Path, damage: str) -> None:
    kwargs = _kwargs(tmp_path)
    bank = ColoredNoiseMasking(**kwargs).bank()
    (path,) = tmp_path.iterdir()
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        blob = torch.load(path, weights_only=True)
        if damage == "tamper":
            blob["bank"][0, 0, 0] += 1.0  # the checksum no longer matches
        else:
            blob["seed"] = 99
        torch.save(blob, path)
    with pytest.warns(UserWarning, match="corrupt"):
        again = ColoredNoiseMasking(**kwargs).bank()
    assert torch.equal(again, bank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is valid again
        assert torch.equal(ColoredNoiseMasking(**kwargs).bank(), bank)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_unwritable_cache_warns_and_uses_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write"):
        bank = ColoredNoiseMasking(**_kwargs(blocker)).bank()
    assert bank.shape == (16, 16, 16)


def test_interrupted_write_leaves_no_partial_file(monkeypatch, tmp_path: Path) -> None:
    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(cn.torch, "save", broken_save)
    with pytest.warns(UserWarning, match="could not write"):
        bank = ColoredNoiseMasking(**_kwargs(tmp_path)).bank()
    assert bank.shape == (16, 16, 16) and not list(tmp_path.iterdir())  # neither the file nor its temporary


def test_cache_false_never_touches_the_disk(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MIM_CACHE", str(tmp_path))
    strategy = ColoredNoiseMasking(**_kwargs(cache=False))
    strategy(4, TokenGrid(1, 14, 14), generator=_gen(0), device=CPU)
    assert not list(tmp_path.iterdir())


def test_pickle_carries_config_not_the_bank() -> None:
    strategy = ColoredNoiseMasking(num_patterns=256, bank_size=32)
    empty = len(pickle.dumps(strategy))
    strategy(8, TokenGrid(1, 14, 14), generator=_gen(0), device=CPU)  # loads the 1 MiB bank
    data = pickle.dumps(strategy)
    assert len(data) == empty < 2000
    clone = pickle.loads(data)
    assert clone._banks == {} and clone.sigmas == strategy.sigmas
    assert "_banks" not in repr(strategy) and "sigmas=(0.7, 1.4)" in repr(strategy)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": float("nan")}, "mask_ratio"),
        ({"color": "pink"}, "color"),
        ({"sample_mode": "prefix"}, "sample_mode"),
        ({"window": "batch"}, "window"),
        ({"num_patterns": 0}, "num_patterns"),
        ({"num_patterns": 2.5}, "num_patterns"),
        ({"bank_size": True}, "bank_size"),
        ({"bank_size": -4}, "bank_size"),
        ({"seed": -1}, "seed"),
        ({"color": "red", "sigmas": (1.0, 2.0)}, "sigmas"),
        ({"color": "green", "sigmas": (1.0,)}, "sigmas"),
        ({"color": "green", "sigmas": (1.4, 0.7)}, "sigmas"),
        ({"color": "purple", "sigmas": (1.0, 1.0)}, "sigmas"),
        ({"color": "blue", "sigmas": (-1.0,)}, "sigmas"),
        ({"color": "blue", "sigmas": (float("inf"),)}, "sigmas"),
        ({"color": "blue", "sigmas": 1.0}, "sigmas"),
    ],
)
def test_bad_config_raises(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"ColoredNoiseMasking.{field}"):
        ColoredNoiseMasking(**kwargs)


def test_grid_larger_than_the_bank_names_the_bank_size() -> None:
    strategy = ColoredNoiseMasking(num_patterns=4, bank_size=16)
    with pytest.raises(ValueError, match=r"bank_size=16 .* set bank_size >= 20"):
        strategy(2, TokenGrid(1, 20, 8), generator=_gen(0), device=CPU)
    with pytest.raises(ValueError, match="set bank_size >= 54"):
        strategy(2, TokenGrid(1, 1, 54), generator=_gen(0), device=CPU)  # a 54-feature table
    masks = strategy(2, TokenGrid(1, 16, 16), generator=_gen(0), device=CPU)  # exactly the bank size is fine
    assert masks.visible.shape == (2, 64)


def test_default_sigmas_are_the_documented_ones() -> None:
    assert {c: ColoredNoiseMasking(color=c).sigmas for c in COLORS} == {
        "red": (1.5,),
        "blue": (1.0,),
        "green": (0.7, 1.4),
        "purple": (0.7, 1.4),
    }
    s = ColoredNoiseMasking()
    assert (s.color, s.mask_ratio, s.sample_mode, s.window, s.num_patterns, s.bank_size) == (
        "green",
        0.75,
        "random_index",
        "per_sample",
        1024,
        64,
    )
    assert isinstance(s, MaskingStrategy) and not s.needs_scores


# ---------------------------------------------------------------------------------------------- debug recipe
def test_debug_recipe_trains_with_colored_noise_masks(fashion_mnist, monkeypatch, tmp_path: Path) -> None:
    from mim.lightning_cli import build

    monkeypatch.setenv("MIM_CACHE", str(tmp_path / "cache"))
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "debug" / "colormae_fashion_mnist.yaml"
    cli = build(
        [
            "--config",
            str(recipe),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=4",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.masking.init_args.cache=true",  # the recipe keeps its bank in memory
        ],
        save_config_callback=None,
    )
    strategy = cli.model.masking
    assert isinstance(strategy, ColoredNoiseMasking) and strategy.color == "green"
    drawn: list[Tensor] = []
    scores = strategy.scores
    strategy.scores = lambda *a, **k: drawn.append(scores(*a, **k)) or drawn[-1]  # spy (instance attribute)
    record = LossRecorder()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    losses = record.losses
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert len(drawn) == 4 and all(d.shape == (64, 49) for d in drawn)  # 7 x 7 grid, batch 64
    bank = strategy.bank()
    assert bank.shape == (64, 16, 16)
    values = set((-drawn[0]).flatten().tolist())
    assert values <= set(bank.flatten().tolist())  # every score is a bank value
    assert len(list((tmp_path / "cache" / "colored_noise").glob("green_S64_n16_*.pt"))) == 1
