"""DualMasking (VideoMAE V2): running-cell decoder masks, the decoder's subset path, the dual loss, per-channel
norm-pix, the recipes (Wang et al., "VideoMAE V2: Scaling Video Masked Autoencoders with Dual Masking", CVPR 2023;
official OpenGVLab/VideoMAEv2)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mim.masking import DualMasking, MultiBlockMasking, RandomMasking, RunningCellMasking, TubeMasking
from mim.masking.base import MaskingStrategy
from mim.masking.dual import running_cell_maps
from mim.models import MaskedEncoder
from mim.models.decoder import MAEDecoder
from mim.module import PretrainModule
from mim.targets.pixels import PixelTarget, norm_pix_channel
from mim.types import Masks, TokenGrid
from tests.contracts import MaskingStrategyContract, TargetContract
from tests.factories import ClipDataset, LossRecorder, cpu_trainer, tiny_video_encoder
from tests.reference import norm_pix_reference, tubelets_loop

CPU = torch.device("cpu")
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tube_k(grid: TokenGrid, ratio: float) -> int:
    """VideoMAE's TubeMaskingGenerator: ``num_masks_per_frame = int(mask_ratio * num_patches_per_frame)``."""
    return grid.t * (grid.h * grid.w - int(ratio * grid.h * grid.w))


def _official_loss_tokens(grid: TokenGrid, tube_ratio: float, cell_ratio: float, rng: np.random.Generator) -> int:
    """Loss tokens of one clip as OpenGVLab/VideoMAEv2: tube mask (dataset/masking_generator.py
    ``TubeMaskingGenerator``), running-cell decoder mask (``Cell`` / ``RunningCellMaskingGenerator``, 1 = dropped
    from the decoder) and engine_for_pretraining.py's ``cal_loss_mask = bool_masked_pos[~decode_masked_pos]``,
    whose sum is the loss's denominator."""
    hw = grid.h * grid.w
    num_masks_per_frame = int(tube_ratio * hw)
    mask_per_frame = np.hstack([np.zeros(hw - num_masks_per_frame), np.ones(num_masks_per_frame)])
    rng.shuffle(mask_per_frame)
    bool_masked_pos = np.tile(mask_per_frame, (grid.t, 1)).flatten().astype(bool)  # (N,)
    num_masks_per_cell = int(4 * cell_ratio)
    queue = np.hstack([np.ones(num_masks_per_cell), np.zeros(4 - num_masks_per_cell)])
    maps = []
    for ptr_pos in range(4):
        queue_ptr, frames = ptr_pos, []
        for _ in range(grid.t):
            queue_ptr += 1  # run_cell
            cell = queue[(np.arange(4) + queue_ptr) % 4].reshape(2, 2)  # get_cell
            frames.append(np.tile(cell, [grid.h // 2, grid.w // 2]).flatten())
        maps.append(np.stack(frames, axis=0))
    decode_masked_pos = maps[rng.integers(4)].flatten().astype(bool)  # (N,) True = dropped from the decoder
    cal_loss_mask = bool_masked_pos[~decode_masked_pos]
    return int(cal_loss_mask.sum())


# ---------------------------------------------------------------------------------------------- contracts
class TestDualMaskingContract(MaskingStrategyContract):
    strategy_cls = DualMasking
    grids = [TokenGrid(8, 14, 14), TokenGrid(2, 4, 6), TokenGrid(1, 14, 14)]
    targets_cover_hidden = True  # the targets are the wrapped tube strategy's: every hidden token

    def make_strategy(self) -> DualMasking:
        return DualMasking(encoder=TubeMasking(mask_ratio=0.75), decoder_mask_ratio=0.5)

    def expected_num_visible(self, strategy: MaskingStrategy, grid: TokenGrid) -> int | None:
        assert isinstance(strategy, DualMasking) and isinstance(strategy.encoder, TubeMasking)
        return _tube_k(grid, strategy.encoder.mask_ratio)


class TestDualMaskingContractDefaultRandomDecoder(TestDualMaskingContract):
    grids = [TokenGrid(8, 14, 14), TokenGrid(3, 7, 5), TokenGrid(1, 4, 4)]  # the random decoder mask allows odd grids

    def make_strategy(self) -> DualMasking:
        return DualMasking(encoder=TubeMasking(), decoder_mask="random", decoder_mask_ratio=0.4)


class TestDualMaskingContractRandomEncoder(MaskingStrategyContract):
    strategy_cls = DualMasking
    grids = [TokenGrid(1, 14, 14), TokenGrid(1, 2, 4), TokenGrid(2, 4, 6)]
    targets_cover_hidden = True

    def make_strategy(self) -> DualMasking:
        return DualMasking(encoder=RandomMasking(mask_ratio=0.75), decoder_mask_ratio=0.25)

    def expected_num_visible(self, strategy: MaskingStrategy, grid: TokenGrid) -> int | None:
        return int(grid.num_tokens * 0.25)


# ---------------------------------------------------------------------------------------------- running cell
def test_running_cell_phase_zero_matches_the_spec() -> None:
    """Top-left cell of phase 0 over time (row-major TL, TR, BL, BR; 1 = dropped): 1001, 0011, 0110, 1100, ..."""
    maps = running_cell_maps(TokenGrid(9, 6, 4), 2)  # (4, T, H, W)
    cells = ["".join(str(int(v)) for v in maps[0, t, :2, :2].flatten().tolist()) for t in range(9)]
    assert cells == ["1001", "0011", "0110", "1100", "1001", "0011", "0110", "1100", "1001"]
    # the other phases are the same sequence started p slots later (cyclic shifts); the cell tiles (H, W)
    for p in range(4):
        for t in range(5):
            assert torch.equal(maps[p, t], maps[0, t + p])
    tiled = maps[:, :, :2, :2].repeat(1, 1, 3, 2)  # (4, T, 6, 4)
    assert torch.equal(maps, tiled)
    # ratios 0.25 / 0.75: 1 or 3 of the 4 cell positions dropped in every slot
    for dropped in (1, 3):
        m = running_cell_maps(TokenGrid(4, 2, 2), dropped)
        assert m.flatten(2).sum(-1).unique().tolist() == [dropped]


@pytest.mark.parametrize("grid", [TokenGrid(8, 14, 14), TokenGrid(12, 4, 6), TokenGrid(5, 2, 2)])
def test_running_cell_counts_per_frame_and_per_four_slots(grid: TokenGrid) -> None:
    b, hw = 64, grid.h * grid.w
    masks = DualMasking(encoder=TubeMasking(mask_ratio=0.5))(b, grid, generator=_gen(0), device=CPU)
    dec = masks.decoder
    assert dec is not None and dec.shape == (b, grid.num_tokens // 2)
    assert bool((dec[:, 1:] > dec[:, :-1]).all()), "decoder indices not strictly ascending"
    kept = torch.zeros(b, grid.num_tokens, dtype=torch.bool).scatter_(1, dec, True).view(b, grid.t, hw)
    # every frame keeps exactly Kd / T positions
    assert kept.sum(-1).unique().tolist() == [dec.shape[1] // grid.t] == [hw // 2]
    # over any 4 consecutive slots, every spatial position is decoder-kept exactly twice
    for t0 in range(grid.t - 3):
        assert kept[:, t0 : t0 + 4].sum(1).unique().tolist() == [2]


def test_single_frame_grid_is_a_2x2_cell_pattern() -> None:
    grid = TokenGrid(1, 14, 14)
    masks = DualMasking(encoder=RandomMasking(mask_ratio=0.75))(256, grid, generator=_gen(1), device=CPU)
    kept = torch.zeros(256, 196, dtype=torch.bool).scatter_(1, masks.decoder, True).view(256, 14, 14)
    cell = kept[:, :2, :2]
    assert torch.equal(kept, cell.repeat(1, 7, 7)), "the 2x2 cell does not tile the image"
    patterns = {tuple(c.flatten().tolist()) for c in cell}
    # the four phases at t = 0: kept = NOT q[(i + p + 1) % 4] with q = 1100
    expected = {tuple(not ((i + p + 1) % 4 < 2) for i in range(4)) for p in range(4)}
    assert patterns == expected


def test_phases_are_chosen_uniformly() -> None:
    """One of the 4 phase maps per sample, uniformly: chi-square over 8000 draws (3 dof)."""
    grid, draws = TokenGrid(4, 4, 4), 8000
    cell = RunningCellMasking(mask_ratio=0.5)
    table = cell.phase_indices(grid)  # (4, Kd)
    dec = DualMasking(encoder=TubeMasking(mask_ratio=0.5))(draws, grid, generator=_gen(7), device=CPU).decoder
    match = (dec[:, None, :] == table[None]).all(-1)  # (draws, 4)
    assert match.sum(1).tolist() == [1] * draws, "a decoder mask is not one of the four phase maps"
    counts = match.sum(0).double()
    chi2 = float(((counts - draws / 4) ** 2 / (draws / 4)).sum())
    assert chi2 < 16.27, f"phase counts {counts.tolist()} (chi-square {chi2:.1f}, p < 0.001 for 3 dof)"
    # consecutive samples are independent: the pair (phase_i, phase_i+1) is uniform over 16 cells
    phase = match.int().argmax(1)
    pairs = torch.bincount(phase[0::2] * 4 + phase[1::2], minlength=16).double()
    expected = draws / 2 / 16
    chi2 = float(((pairs - expected) ** 2 / expected).sum())
    assert chi2 < 37.7, f"phase pairs chi-square {chi2:.1f} (p < 0.001 for 15 dof)"


def test_running_cell_mask_standalone() -> None:
    cell = RunningCellMasking()
    grid = TokenGrid(8, 14, 14)
    assert cell.num_kept(grid) == 784 and cell.num_dropped == 2
    table = cell.phase_indices(grid)
    maps = running_cell_maps(grid, 2).flatten(1)  # (4, N)
    for p in range(4):
        assert table[p].tolist() == [n for n in range(1568) if not maps[p, n]]
    a = cell(16, grid, generator=_gen(3), device=CPU)
    assert torch.equal(a, cell(16, grid, generator=_gen(3), device=CPU))
    assert a.shape == (16, 784) and a.dtype == torch.int64
    assert repr(cell) == "RunningCellMasking(mask_ratio=0.5)"


@pytest.mark.parametrize(
    ("grid", "visible", "decoder_kept", "loss"),
    [
        (TokenGrid(16 // 2, 224 // 16, 224 // 16), 160, 784, 704),  # ViT-B/16, VideoMAE (V1 ViT-B settings)
        (TokenGrid(16 // 2, 224 // 14, 224 // 14), 208, 1024, 920),  # ViT-g/14, VideoMAE V2
    ],
)
def test_loss_token_count_on_the_reference_grids(grid: TokenGrid, visible: int, decoder_kept: int, loss: int) -> None:
    """Tube 0.9 + running cell 0.5: the official code's visible, decoder-kept and loss-token counts per clip.

    The tube hides int(0.9 * H*W) positions in every slot; each position is decoder-kept in exactly 4 of the 8
    slots, so the loss (encoder-hidden and decoder-kept) covers 4 x int(0.9 * H*W) tokens, every clip.
    """
    hw = grid.h * grid.w
    assert (grid.t * (hw - int(0.9 * hw)), grid.num_tokens // 2, 4 * int(0.9 * hw)) == (visible, decoder_kept, loss)
    rng = np.random.default_rng(0)
    assert {_official_loss_tokens(grid, 0.9, 0.5, rng) for _ in range(8)} == {loss}
    masks = DualMasking()(32, grid, generator=_gen(11), device=CPU)
    assert masks.visible.shape == (32, visible) and masks.decoder.shape == (32, decoder_kept)
    loss_tokens = masks.hidden.gather(1, masks.decoder).sum(1)  # (B,)
    assert loss_tokens.tolist() == [loss] * 32
    # decoder input: K visible + Kd mask tokens instead of N (944 on the ViT-B grid, V1: 1568)
    assert masks.visible.shape[1] + masks.decoder.shape[1] == visible + decoder_kept


@pytest.mark.parametrize(
    ("grid", "visible", "loss"), [(TokenGrid(8, 14, 14), 152, 708), (TokenGrid(8, 16, 16), 200, 924)]
)
def test_mae_count_tube_keeps_the_old_counts(grid: TokenGrid, visible: int, loss: int) -> None:
    """TubeMasking(count="mae"): int(H*W * (1 - 0.9)) visible per slot (19 on 14x14, 25 on 16x16)."""
    masks = DualMasking(encoder=TubeMasking(count="mae"))(8, grid, generator=_gen(4), device=CPU)
    assert grid.t * int(grid.h * grid.w * (1 - 0.9)) == visible
    assert masks.visible.shape == (8, visible)
    assert masks.hidden.gather(1, masks.decoder).sum(1).tolist() == [loss] * 8


@pytest.mark.parametrize(("tube_ratio", "cell_ratio"), [(0.9, 0.25), (0.75, 0.5), (0.6, 0.75), (0.5, 0.5)])
def test_loss_token_count_matches_the_official_code(tube_ratio: float, cell_ratio: float) -> None:
    """Other ratios on a small even grid: mim's loss-token count equals the official code's (a fixed count when T is a
    multiple of 4, because every position is then kept in the same number of slots)."""
    grid = TokenGrid(4, 6, 4)
    rng = np.random.default_rng(1)
    expected = {_official_loss_tokens(grid, tube_ratio, cell_ratio, rng) for _ in range(16)}
    assert len(expected) == 1
    masks = DualMasking(encoder=TubeMasking(mask_ratio=tube_ratio), decoder_mask_ratio=cell_ratio)(
        16, grid, generator=_gen(2), device=CPU
    )
    assert set(masks.hidden.gather(1, masks.decoder).sum(1).tolist()) == expected


def test_zero_decoder_ratio_is_videomae_v1() -> None:
    """decoder_mask_ratio = 0: the decoder keeps the complement of the visible tokens, which is
    VideoMAE V1 (as in OpenGVLab/VideoMAEv2)."""
    grid = TokenGrid(4, 6, 6)
    for kind in ("running_cell", "random"):
        dual = DualMasking(encoder=TubeMasking(mask_ratio=0.75), decoder_mask_ratio=0.0, decoder_mask=kind)
        a = dual(8, grid, generator=_gen(5), device=CPU)
        b = TubeMasking(mask_ratio=0.75)(8, grid, generator=_gen(5), device=CPU)
        assert torch.equal(a.visible, b.visible) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.decoder, b.targets[:, 0])


def test_random_decoder_mask_statistics() -> None:
    grid, draws, ratio = TokenGrid(2, 3, 5), 6000, 0.6
    n, kd = 30, int(30 * (1 - ratio))
    masks = DualMasking(encoder=TubeMasking(mask_ratio=0.5), decoder_mask="random", decoder_mask_ratio=ratio)(
        draws, grid, generator=_gen(9), device=CPU
    )
    assert masks.decoder.shape == (draws, kd)
    assert bool((masks.decoder[:, 1:] > masks.decoder[:, :-1]).all())
    counts = torch.zeros(draws, n).scatter_(1, masks.decoder, 1.0).sum(0).double().numpy()
    p = kd / n
    z = (counts - draws * p) / math.sqrt(draws * p * (1 - p))
    stat, dof = float((z**2).sum()) * (n - 1) / n, n - 1  # fixed count per sample
    assert abs(stat - dof) < 5 * math.sqrt(2 * dof), f"chi-square {stat:.1f} for {dof} dof"
    # the decoder mask does not depend on the encoder mask: kept-and-hidden is hypergeometric in mean
    both = masks.hidden.gather(1, masks.decoder).sum(1).double()
    hidden = n - masks.visible.shape[1]
    assert abs(both.mean().item() - kd * hidden / n) < 0.05 * kd


def test_decoder_mask_is_deterministic_under_the_generator() -> None:
    dual = DualMasking()
    grid = TokenGrid(8, 14, 14)
    a = dual(8, grid, generator=_gen(1), device=CPU)
    b = dual(8, grid, generator=_gen(1), device=CPU)
    assert torch.equal(a.decoder, b.decoder)
    phases = {tuple(r) for r in dual(64, grid, generator=_gen(2), device=CPU).decoder[:, :8].tolist()}
    assert len(phases) == 4  # all four phases appear in a batch of 64


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"decoder_mask_ratio": 1.0}, "decoder_mask_ratio"),
        ({"decoder_mask_ratio": -0.1}, "decoder_mask_ratio"),
        ({"decoder_mask_ratio": float("nan")}, "decoder_mask_ratio"),
        ({"decoder_mask_ratio": 0.3}, "decoder_mask_ratio"),  # not a multiple of 1/4 of a 2x2 cell
        ({"decoder_mask": "tube"}, "decoder_mask"),
        ({"encoder": "tube"}, "encoder"),
        ({"encoder": DualMasking()}, "encoder"),
    ],
)
def test_bad_config_raises(kwargs, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DualMasking(**kwargs)


def test_random_decoder_allows_any_ratio() -> None:
    assert DualMasking(decoder_mask="random", decoder_mask_ratio=0.3).decoder_mask_ratio == 0.3
    with pytest.raises(ValueError, match="mask_ratio"):
        RunningCellMasking(mask_ratio=0.5001)


@pytest.mark.parametrize("grid", [TokenGrid(8, 7, 14), TokenGrid(1, 14, 7), TokenGrid(2, 3, 3)])
def test_running_cell_needs_even_grid(grid: TokenGrid) -> None:
    with pytest.raises(ValueError, match="even"):
        DualMasking(encoder=TubeMasking(mask_ratio=0.5))(2, grid, generator=_gen(0), device=CPU)


def test_wrapped_strategy_must_give_one_hidden_group() -> None:
    dual = DualMasking(encoder=MultiBlockMasking())  # I-JEPA blocks: M = 4 groups, not the hidden tokens
    with pytest.raises(ValueError, match="one target group"):
        dual(2, TokenGrid(1, 14, 14), generator=_gen(0), device=CPU)


def test_lightning_cli_configures_the_nested_strategy() -> None:
    """A strategy inside DualMasking's init_args, as recipes write it (and the default when it is left out)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--masking", type=MaskingStrategy)
    nested = """
    masking:
      class_path: mim.masking.DualMasking
      init_args:
        encoder: {class_path: mim.masking.TubeMasking, init_args: {mask_ratio: 0.75}}
        decoder_mask_ratio: 0.25
        decoder_mask: running_cell
    """
    masking = parser.instantiate_classes(parser.parse_string(nested)).masking
    assert isinstance(masking, DualMasking) and isinstance(masking.encoder, TubeMasking)
    assert (masking.encoder.mask_ratio, masking.decoder_mask_ratio, masking.decoder_mask) == (
        0.75,
        0.25,
        "running_cell",
    )
    default = parser.instantiate_classes(parser.parse_string("masking: {class_path: mim.masking.DualMasking}")).masking
    assert repr(default) == (
        "DualMasking(encoder=TubeMasking(mask_ratio=0.9, count='videomae'), decoder_mask_ratio=0.5, "
        "decoder_mask='running_cell')"
    )


# ---------------------------------------------------------------------------------------------- decoder subset path
def _decoder(grid: TokenGrid, depth: int = 2, prefix: int = 1) -> MAEDecoder:
    torch.manual_seed(0)
    dec = MAEDecoder(grid=grid, in_dim=24, out_dim=10, num_prefix_tokens=prefix, dim=16, depth=depth, num_heads=2)
    with torch.no_grad():
        dec.mask_token.normal_(generator=_gen(9))
    return dec


@pytest.mark.parametrize("prefix", [1, 0])
@pytest.mark.parametrize("grid", [TokenGrid(2, 4, 6), TokenGrid(1, 4, 4)])
def test_subset_path_with_all_hidden_equals_full_path(grid: TokenGrid, prefix: int) -> None:
    """keep = every hidden token: the same token set as the full path, permuted; attention is equivariant."""
    dec = _decoder(grid, prefix=prefix)
    masks = TubeMasking(mask_ratio=0.5)(3, grid, generator=_gen(1), device=CPU)
    latent = torch.randn(3, prefix + masks.visible.shape[1], 24, generator=_gen(2))
    hidden = masks.targets[:, 0]
    with torch.no_grad():
        full = dec(latent, masks.visible)  # (B, N, out)
        sub = dec(latent, masks.visible, keep=hidden)  # (B, N-K, out)
        perm = torch.randperm(hidden.shape[1], generator=_gen(3))
        shuffled = dec(latent, masks.visible, keep=hidden[:, perm])
    assert sub.shape == (3, hidden.shape[1], 10)
    torch.testing.assert_close(sub, full.gather(1, hidden[..., None].expand(-1, -1, 10)), rtol=0, atol=1e-5)
    torch.testing.assert_close(shuffled, sub[:, perm], rtol=0, atol=1e-5)


def test_subset_path_without_blocks_is_mask_token_plus_position() -> None:
    grid = TokenGrid(2, 2, 4)
    dec = _decoder(grid, depth=0)
    visible = torch.tensor([[0, 5, 9], [1, 2, 14]])
    keep = torch.tensor([[0, 3, 11, 15], [2, 4, 6, 8]])  # includes encoder-visible positions 0 and 2
    latent = torch.randn(2, 1 + 3, 24, generator=_gen(4))
    with torch.no_grad():
        out = dec(latent, visible, keep=keep)
        pos = dec.decoder_pos_embed[0, 1:]  # (N, Dd)
        for b in range(2):
            for i, n in enumerate(keep[b].tolist()):
                expected = dec.decoder_pred(dec.decoder_norm(dec.mask_token[0, 0] + pos[n]))
                torch.testing.assert_close(out[b, i], expected, rtol=0, atol=1e-6)


def test_mask_tokens_at_visible_kept_positions_change_the_context() -> None:
    """The decoder gets a mask token at every kept position, visible or not; they matter (OpenGVLab/VideoMAEv2
    models/modeling_pretrain.py)."""
    grid = TokenGrid(2, 4, 4)
    dec = _decoder(grid)
    visible = torch.tensor([[0, 3, 6, 9, 12, 15, 18, 21]])
    latent = torch.randn(1, 1 + 8, 24, generator=_gen(5))
    hidden_kept = torch.tensor([[1, 2, 7, 30]])
    with_visible = torch.tensor([[0, 1, 2, 3, 7, 30]])  # adds mask tokens at visible positions 0 and 3
    with torch.no_grad():
        a = dec(latent, visible, keep=hidden_kept)
        b = dec(latent, visible, keep=with_visible)[:, [1, 2, 4, 5]]
        full = dec(latent, visible).gather(1, hidden_kept[..., None].expand(-1, -1, 10))
    assert not torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, full, atol=1e-4), "a strict subset must not see the other mask tokens"
    with pytest.raises(ValueError, match="not both"):
        dec(latent, visible, hidden_kept, keep=hidden_kept)
    with pytest.raises(ValueError, match="keep"):
        dec(latent, visible, keep=torch.zeros(1, 0, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- per-channel norm-pix
def _norm_pix_channel_loop(patches: np.ndarray, channels: int, eps: float = 1e-6) -> np.ndarray:
    """VideoMAE's target (MCG-NJU/VideoMAE engine_for_pretraining.py): per token and channel,
    (x - mean) / (unbiased std + eps)."""
    out = np.empty_like(patches)
    for idx in np.ndindex(*patches.shape[:-1]):
        for c in range(channels):
            values = patches[idx][c::channels]  # channel fastest in mim's layout
            mean = values.sum() / len(values)
            std = math.sqrt(((values - mean) ** 2).sum() / (len(values) - 1))
            out[idx][c::channels] = (values - mean) / (std + eps)
    return out


def test_norm_pix_channel_matches_loop_reference() -> None:
    g = _gen(6)
    video = torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64)
    video[:, 1] *= 5.0  # channels with different scales and offsets
    video[:, 2] += 3.0
    video[0, 0, :2, :4, :4] = 1.5  # one constant channel of one tubelet -> zeros
    video[1, :, 2:, 4:, 4:] *= 1e-4  # tiny variance: where the eps placement matters
    patches = tubelets_loop(video.numpy(), 2, 4, 4)  # (B, N, P)
    ours = norm_pix_channel(torch.from_numpy(patches), 3).numpy()
    expected = _norm_pix_channel_loop(patches, 3)
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-10)
    assert np.all(ours[0, 0][0::3] == 0.0)
    # differs from per-patch norm-pix and from eps inside the square root
    assert not np.allclose(ours, norm_pix_reference(patches), atol=1e-3)
    x = patches.reshape(*patches.shape[:-1], -1, 3)
    eps_inside = (x - x.mean(-2, keepdims=True)) / np.sqrt(x.var(-2, ddof=1, keepdims=True) + 1e-6)
    assert not np.allclose(ours, eps_inside.reshape(patches.shape), atol=1e-3)


def test_pixel_target_channel_mode_validation() -> None:
    with pytest.raises(ValueError, match="norm_pix_mode"):
        PixelTarget(norm_pix_mode="tubelet")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- the dual loss
def _dual_setup(norm_pix: bool = True, mode: str = "channel", seed: int = 0):
    vit = {"depth": 1, "embed_dim": 48, "num_heads": 2}
    encoder = tiny_video_encoder(seed=seed, model_kwargs=vit)  # grid (2, 4, 4)
    target = PixelTarget(decoder_dim=32, decoder_depth=2, decoder_num_heads=2, norm_pix=norm_pix, norm_pix_mode=mode)
    target.bind(encoder)
    g = _gen(seed + 1)
    video = torch.randn(3, 3, 4, 16, 16, generator=g) * torch.tensor([1.0, 4.0, 0.5]).view(1, 3, 1, 1, 1)
    masks = DualMasking(encoder=TubeMasking(mask_ratio=0.5))(3, encoder.grid, generator=g, device=CPU)
    return encoder, target, {"video": video}, masks


@pytest.mark.parametrize(("norm_pix", "mode"), [(True, "channel"), (True, "patch"), (False, "patch")])
def test_dual_loss_matches_formula(norm_pix: bool, mode: str) -> None:
    encoder, target, batch, masks = _dual_setup(norm_pix, mode)
    latent = encoder(batch["video"], masks.visible)
    loss = target(batch, masks, latent, encoder)["loss"]
    with torch.no_grad():
        pred = target.decoder(latent, masks.visible, keep=masks.decoder).double().numpy()  # (B, Kd, P)
    patches = tubelets_loop(batch["video"].double().numpy(), 2, 4, 4)  # (B, N, P)
    if norm_pix:
        patches = _norm_pix_channel_loop(patches, 3) if mode == "channel" else norm_pix_reference(patches)
    num, den = 0.0, 0
    for b in range(3):
        hidden = set(masks.targets[b, 0].tolist())
        for i, token in enumerate(masks.decoder[b].tolist()):
            if token in hidden:  # hidden from the encoder AND kept by the decoder
                num += float(((pred[b, i] - patches[b, token]) ** 2).mean())
                den += 1
    assert den == int(masks.hidden.gather(1, masks.decoder).sum()) and den > 0
    np.testing.assert_allclose(loss.item(), num / den, rtol=1e-5)


def test_dual_loss_ignores_pixels_outside_the_loss_tokens() -> None:
    """Pixels of visible tokens and of decoder-dropped hidden tokens cannot change the loss (latent held fixed)."""
    encoder, target, batch, masks = _dual_setup()
    latent = encoder(batch["video"], masks.visible).detach()
    clean = target(batch, masks, latent, encoder)["loss"]
    loss_tokens = masks.hidden & torch.zeros_like(masks.hidden).scatter_(1, masks.decoder, True)  # (B, N)
    video = batch["video"].clone()
    for b in range(3):
        for n in range(32):
            if not loss_tokens[b, n]:
                t, rest = divmod(n, 16)
                y, x = divmod(rest, 4)
                video[b, :, 2 * t : 2 * t + 2, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4] = 50.0 * torch.randn(3, 2, 4, 4)
    assert torch.equal(target({"video": video}, masks, latent, encoder)["loss"], clean)


def test_zero_decoder_ratio_gives_the_v1_loss() -> None:
    encoder, target, batch, _ = _dual_setup(seed=3)
    tube = TubeMasking(mask_ratio=0.5)
    v1 = tube(3, encoder.grid, generator=_gen(8), device=CPU)
    v0 = DualMasking(encoder=tube, decoder_mask_ratio=0.0)(3, encoder.grid, generator=_gen(8), device=CPU)
    latent = encoder(batch["video"], v1.visible)
    a = target(batch, v1, latent, encoder)["loss"]
    b = target(batch, v0, latent, encoder)["loss"]
    torch.testing.assert_close(b, a, rtol=1e-6, atol=0)


def test_no_loss_token_gives_zero_loss_and_finite_grads() -> None:
    encoder, target, batch, _ = _dual_setup()
    visible = torch.arange(16).expand(3, -1)  # first time slot visible
    masks = Masks(visible=visible, targets=(16 + torch.arange(16)).expand(3, 1, -1), num_tokens=32)
    masks.decoder = visible[:, ::2]  # decoder keeps only visible positions
    loss = target(batch, masks, encoder(batch["video"], visible), encoder)["loss"]
    assert loss.item() == 0.0
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in target.parameters() if p.grad is not None)


def test_dual_loss_has_no_host_syncs() -> None:
    """Run the dual loss forward and backward on the meta device: .item(), nonzero, boolean indexing, .cpu() and
    tolist() all raise there, so passing means no host sync on the hot path."""
    encoder, target, batch, masks = _dual_setup()
    meta = torch.device("meta")
    encoder, target = encoder.to(meta), target.to(meta)
    video, masks = batch["video"].to(meta), masks.to(meta)
    loss = target({"video": video}, masks, encoder(video, masks.visible), encoder)["loss"]
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()


@pytest.mark.gpu
def test_dual_masks_and_loss_have_no_syncs_on_cuda() -> None:
    """Masks drawn on the device, the dual loss and its backward under CUDA's sync debug mode "error"."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    encoder, target, batch, _ = _dual_setup()
    encoder, target, video = encoder.to(dev), target.to(dev), batch["video"].to(dev)
    dual = DualMasking(encoder=TubeMasking(mask_ratio=0.5))
    gen = torch.Generator(device=dev).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks = dual(3, encoder.grid, generator=gen, device=dev)
        loss = target({"video": video}, masks, encoder(video, masks.visible), encoder)["loss"]
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu = dual(3, encoder.grid, generator=_gen(0), device=CPU)
    assert masks.decoder.shape == cpu.decoder.shape and bool(torch.isfinite(loss))


class TestPixelTargetDualMaskingContract(TargetContract):
    """PixelTarget's contract on a video encoder with dual masks (subset decoder path, per-channel norm-pix)."""

    target_cls = PixelTarget

    def make_target(self, **overrides) -> PixelTarget:
        kwargs = dict(decoder_dim=32, decoder_depth=1, decoder_num_heads=4, norm_pix_mode="channel")
        kwargs.update(overrides)
        return PixelTarget(**kwargs)

    def make_encoder(self) -> MaskedEncoder:
        return tiny_video_encoder()

    def make_batch(self, encoder: MaskedEncoder) -> dict[str, torch.Tensor]:
        return {"video": torch.randn(self.batch_size, 3, 4, 16, 16, generator=_gen(1))}

    def make_masks(self, encoder: MaskedEncoder) -> Masks:
        return DualMasking(encoder=TubeMasking(mask_ratio=0.5))(
            self.batch_size, encoder.grid, generator=_gen(2), device=CPU
        )


def test_reconstruct_with_channel_norm_pix_denormalises() -> None:
    """If the decoder predicted the normalised targets exactly, reconstruct would return the input clip."""
    encoder, target, batch, masks = _dual_setup()
    latent = encoder(batch["video"], masks.visible)
    normalised = target.target_patches(batch["video"], encoder)  # (B, N, P)
    target.decoder.forward = lambda latent, visible, outputs=None, **_: normalised  # type: ignore[method-assign]
    recon = target.reconstruct(batch, masks, latent, encoder)
    torch.testing.assert_close(recon, batch["video"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- training
def test_dual_masking_trains() -> None:
    module = PretrainModule(
        encoder=tiny_video_encoder(model_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 2}),
        masking=DualMasking(encoder=TubeMasking(mask_ratio=0.75)),
        targets=[PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix_mode="channel")],
        blr=3e-2,
        warmup_steps=2,
        batch_size=4,
    )
    record = LossRecorder()
    cpu_trainer(max_steps=40, callbacks=[record]).fit(module, DataLoader(ClipDataset(noise=0.03), batch_size=4))
    losses = record.losses
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < 0.85 * sum(losses[:8]) / 8


def test_dual_debug_recipe_trains_on_real_clips(real_clips, tmp_path) -> None:
    """`recipes/debug/videomae_v2_video.yaml` end to end on real H.264 clips; the decoder runs on K + Kd tokens."""
    from mim.lightning_cli import build

    cli = build(
        [
            "--config",
            str(RECIPES / "debug" / "videomae_v2_video.yaml"),
            f"--data.init_args.root={real_clips}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
        ],
        save_config_callback=None,
    )
    module = cli.model
    assert isinstance(module.masking, DualMasking) and isinstance(module.masking.encoder, TubeMasking)
    assert module.encoder.grid == TokenGrid(2, 4, 4)
    target = module.target_list[0]
    assert isinstance(target, PixelTarget) and target.norm_pix_mode == "channel"
    decoder_inputs: list[tuple[int, ...]] = []
    subset = target.decoder.forward_subset

    def spy(latent, visible, keep):
        decoder_inputs.append((visible.shape[1], keep.shape[1]))
        return subset(latent, visible, keep)

    target.decoder.forward_subset = spy  # type: ignore[method-assign]
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert batch["video"].shape == (4, 3, 4, 32, 32)
            losses.append(float(outputs["loss"]))

    cli.trainer.callbacks.append(Record())
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert len(losses) == 4 and all(np.isfinite(losses))
    # tube 0.75 on 4x4: K = 2 * 4 visible; running cell 0.5: Kd = 32 / 2 = 16 decoder queries
    assert decoder_inputs and set(decoder_inputs) == {(8, 16)}


# ---------------------------------------------------------------------------------------------- production recipe
def test_videomae_v2_recipe_matches_the_paper(tmp_path, real_clips) -> None:
    from mim.lightning_cli import build

    recipe = RECIPES / "videomae_v2" / "vit_b16_k400.yaml"
    header = recipe.read_text().split("seed_everything")[0]
    for text in ("VideoMAE V2", "Dual Masking", "CVPR 2023", "Expected", "80.0", "87.2", "GFLOP"):
        assert text in header, text
    for text in ("8 x 20 = 160 visible", "4 x 176 = 704 loss tokens"):  # the official code's counts
        assert text in header, text
    assert "152" not in header and "708" not in header
    cli = build(
        ["--config", str(recipe), f"--data.init_args.root={real_clips}", f"--trainer.default_root_dir={tmp_path}"],
        save_config_callback=None,
    )
    m = cli.model
    enc = m.encoder
    assert (enc.embed_dim, len(enc.vit.blocks), enc.patch_size, enc.num_frames, enc.tubelet_size) == (
        768,
        12,
        (16, 16),
        16,
        2,
    )
    assert enc.grid == TokenGrid(8, 14, 14) and enc.num_prefix_tokens == 0  # VideoMAE has no cls token
    masking = m.masking
    assert isinstance(masking, DualMasking) and isinstance(masking.encoder, TubeMasking)
    assert (masking.encoder.mask_ratio, masking.decoder_mask, masking.decoder_mask_ratio) == (0.9, "running_cell", 0.5)
    assert masking.encoder.count == "videomae"
    t = m.targets[0]
    assert (t.decoder_dim, t.decoder_depth, t.decoder_num_heads, t.norm_pix, t.norm_pix_mode) == (
        384,
        4,
        6,
        True,
        "channel",
    )
    hp = m.hparams
    assert (hp.blr, hp.weight_decay, tuple(hp.betas), hp.warmup_epochs) == (1.5e-4, 0.05, (0.9, 0.95), 40)
    assert cli.trainer.max_epochs == 800
    data = cli.datamodule
    assert (data.num_frames, data.frame_stride, data.image_size) == (16, 4, 224)
