"""V-JEPA's masks: union-of-blocks targets with the complement as context (``MultiBlockMasking(context="complement")``)
and several mask sets per step (``MultiMasking``), through ``PretrainModule`` and ``LatentTarget``."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from mim import PretrainModule
from mim.masking import MultiBlockMasking, MultiMasking, RandomMasking
from mim.masking.hard_patch import HardPatchMasking
from mim.masking.multiblock import UNION_QUANTILE, union_counts
from mim.targets import LatentTarget, PixelTarget
from mim.targets.latent import latent_loss
from mim.types import Masks, TokenGrid
from tests.contracts import MaskingStrategyContract
from tests.factories import tiny_video_encoder

GRID = TokenGrid(8, 14, 14)  # V-JEPA ViT-L: 16 frames / tubelet 2, 224 px / patch 16


def short_range(**kw) -> MultiBlockMasking:
    """V-JEPA's short-range mask: the union of 8 blocks of 15 % of the frame over all time steps."""
    kw = {"num_targets": 8, "target_scale": (0.15, 0.15), "context": "complement", "placement": "inside", **kw}
    return MultiBlockMasking(**kw)


def long_range(**kw) -> MultiBlockMasking:
    """V-JEPA's long-range mask: the union of 2 blocks of 70 % of the frame."""
    kw = {"num_targets": 2, "target_scale": (0.7, 0.7), "context": "complement", "placement": "inside", **kw}
    return MultiBlockMasking(**kw)


def draw(strategy, b: int, grid: TokenGrid, seed: int) -> Masks:
    return strategy(b, grid, generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- contracts


class TestComplementMaskingContract(MaskingStrategyContract):
    strategy_cls = MultiBlockMasking
    grids = [TokenGrid(8, 14, 14), TokenGrid(2, 4, 4), TokenGrid(1, 14, 14)]

    def make_strategy(self) -> MultiBlockMasking:
        return short_range()


class TestComplementMaskingContractLong(TestComplementMaskingContract):
    def make_strategy(self) -> MultiBlockMasking:
        return long_range(placement="overlap")


class TestMultiMaskingContract(MaskingStrategyContract):
    """The first set is checked as any mask; the others in the test below."""

    strategy_cls = MultiMasking
    grids = [TokenGrid(8, 14, 14), TokenGrid(2, 4, 4)]

    def make_strategy(self) -> MultiMasking:
        return MultiMasking(strategies=[short_range(), long_range()])

    def test_every_set_keeps_the_convention(self) -> None:
        for grid in self.grids:
            for m in self.draw(self.make_strategy(), grid).sets:
                assert m.visible.shape[0] == self.batch_size and bool((m.visible.diff(dim=1) > 0).all())
                hit = torch.zeros(self.batch_size, grid.num_tokens, dtype=torch.bool).scatter_(1, m.targets[:, 0], True)
                assert not bool(hit.gather(1, m.visible).any())


# ---------------------------------------------------------------------------------------------- complement masks


def test_union_counts_are_the_quantiles_of_the_exact_distribution() -> None:
    """3 blocks of 2 x 2 placed inside a 6 x 6 grid: all 25^3 placements enumerated independently."""
    grid, block, m = TokenGrid(1, 6, 6), (1, 2, 2), 3
    cells = [
        {(r + dr) * 6 + c + dc for dr in range(2) for dc in range(2)} for r, c in itertools.product(range(5), range(5))
    ]
    sizes = np.array([len(set().union(*combo)) for combo in itertools.product(cells, repeat=m)])

    def lower_quantile(values: np.ndarray) -> int:
        ordered = np.sort(values)
        return int(ordered[int(np.floor(UNION_QUANTILE * (len(ordered) - 1)))])

    t_exact, k_exact = lower_quantile(sizes), lower_quantile(36 - sizes)
    for exact, values in ((t_exact, sizes), (k_exact, 36 - sizes)):  # the quantile is not at a knife edge
        assert (values < exact).mean() < UNION_QUANTILE - 0.02 < UNION_QUANTILE + 0.02 < (values <= exact).mean()
    assert union_counts(grid, block, m, "inside") == (t_exact, k_exact)
    assert union_counts(grid, block, m, "inside") == (t_exact, k_exact)  # cached and deterministic


def test_one_block_gives_a_box_target_and_its_exact_complement() -> None:
    grid = TokenGrid(2, 6, 6)
    masking = MultiBlockMasking(num_targets=1, target_scale=(0.2, 0.3), context="complement", temporal_scale=(1, 1))
    for seed in range(5):
        masks = draw(masking, 6, grid, seed)
        targets = masks.targets[:, 0]  # (B, T)
        s = masking.sizes(grid, torch.Generator().manual_seed(seed))
        t, h, w = s["t"], s["h"], s["w"]
        assert targets.shape[1] == t * h * w and masks.visible.shape[1] == grid.num_tokens - t * h * w
        for row, vis in zip(targets.tolist(), masks.visible.tolist()):
            ts, hs, ws = zip(*[(k // 36, k // 6 % 6, k % 6) for k in row])
            assert (max(ts) - min(ts) + 1, max(hs) - min(hs) + 1, max(ws) - min(ws) + 1) == (t, h, w)  # one box
            assert sorted(set(row) | set(vis)) == list(range(grid.num_tokens))  # context = the complement


@pytest.mark.parametrize("build", [short_range, long_range], ids=["short", "long"])
def test_complement_masks_are_disjoint_with_counts_from_the_shape(build) -> None:
    masking = build()
    for seed in range(10):
        masks = draw(masking, 8, GRID, seed)
        s = masking.sizes(GRID, torch.Generator().manual_seed(seed))
        assert masks.targets.shape == (8, 1, s["targets"]) and masks.visible.shape == (8, s["k"])
        assert (s["targets"], s["k"]) == union_counts(GRID, (s["t"], s["h"], s["w"]), masking.num_targets, "inside")
        for row in (masks.visible, masks.targets[:, 0]):
            assert bool((row.diff(dim=1) > 0).all())  # sorted, no repeats
        hit = torch.zeros(8, GRID.num_tokens, dtype=torch.bool).scatter_(1, masks.targets[:, 0], True)
        assert not bool(hit.gather(1, masks.visible).any())  # no context token is a target
        assert masks.targets.shape[1] + masks.visible.shape[1] <= GRID.num_tokens
        # the counts depend on the shape only, not on the batch size
        assert draw(masking, 2, GRID, seed).visible.shape[1] == s["k"]


def official_vjepa_counts(grid: TokenGrid, blocks: int, scale: float, batch: int, batches: int) -> tuple[float, float]:
    """V-JEPA's sampler (facebookresearch/jepa src/masks/multiblock3d.py, as MORE.md / JEPA_VIDEO.md describe it),
    simulated independently: per batch one block shape (n = int(H W s), a separate aspect draw in (0.75, 1.5), h =
    round(sqrt(n a)), w = round(sqrt(n / a)) clamped to the grid, all time steps); per clip ``blocks`` blocks placed
    with inclusive bounds, target = their union, context = the rest (redrawn if empty); both lists cut to the batch
    minimum. Returns the mean context and target shares after the cut."""
    rng = np.random.default_rng(0)
    n_tok, ctx, tgt = grid.num_tokens, [], []
    for _ in range(batches):
        n, a = int(grid.h * grid.w * scale), 0.75 + rng.random() * 0.75
        h, w = min(round(math.sqrt(n * a)), grid.h), min(round(math.sqrt(n / a)), grid.w)
        keep_ctx = keep_tgt = n_tok
        for _ in range(batch):
            while True:
                union = np.zeros(grid.shape, dtype=bool)
                for _ in range(blocks):
                    top, left = rng.integers(0, grid.h - h + 1), rng.integers(0, grid.w - w + 1)
                    union[:, top : top + h, left : left + w] = True
                if union.sum() < n_tok:
                    break
            keep_ctx, keep_tgt = min(keep_ctx, n_tok - int(union.sum())), min(keep_tgt, int(union.sum()))
        ctx.append(keep_ctx / n_tok)
        tgt.append(keep_tgt / n_tok)
    return float(np.mean(ctx)), float(np.mean(tgt))


@pytest.mark.parametrize("build", [short_range, long_range], ids=["short", "long"])
def test_complement_counts_match_vjepa_after_its_cut(build) -> None:
    """mim's fixed counts against the official counts at V-JEPA's 24 clips per GPU (short range: context 22 %,
    targets 48 %; long range: 6 % and 70 %), without the official's dependence on the batch size."""
    masking = build()
    official_ctx, official_tgt = official_vjepa_counts(GRID, masking.num_targets, masking.target_scale[0], 24, 60)
    sizes = [masking.sizes(GRID, torch.Generator().manual_seed(i)) for i in range(60)]
    ctx = sum(s["k"] for s in sizes) / len(sizes) / GRID.num_tokens
    tgt = sum(s["targets"] for s in sizes) / len(sizes) / GRID.num_tokens
    assert abs(ctx - official_ctx) < 0.04 and abs(tgt - official_tgt) < 0.03, (ctx, official_ctx, tgt, official_tgt)


def test_complement_tokens_come_from_blocks() -> None:
    """Blocks as wide as the frame and one time slot long: each union is whole frames (1 or 2 of the 4), so the
    context (drawn from the complement) never shares a frame with a target."""
    grid = TokenGrid(4, 3, 3)
    masking = MultiBlockMasking(
        num_targets=2, target_scale=(1.0, 1.0), target_aspect=(1.0, 1.0), temporal_scale=(0.25, 0.25),
        context="complement",
    )  # fmt: skip
    masks = draw(masking, 32, grid, 0)
    assert (masks.targets.shape[2], masks.visible.shape[1]) == (9, 18)  # 5 % quantiles: one frame, two frames
    for targets, visible in zip(masks.targets[:, 0].tolist(), masks.visible.tolist()):
        assert not {k // 9 for k in targets} & {k // 9 for k in visible}


def test_complement_validation() -> None:
    with pytest.raises(ValueError, match=r"MultiBlockMasking.context must be one of"):
        MultiBlockMasking(context="union")
    with pytest.raises(ValueError, match=r"MultiBlockMasking.sampler must be 'mim' with context='complement'"):
        MultiBlockMasking(context="complement", sampler="official")


# ---------------------------------------------------------------------------------------------- several mask sets


def test_multi_masking_draws_each_strategy_in_order() -> None:
    grid = TokenGrid(2, 4, 4)
    strategies = [short_range(), RandomMasking(mask_ratio=0.5), long_range()]
    masks = draw(MultiMasking(strategies=strategies), 3, grid, 7)
    gen = torch.Generator().manual_seed(7)
    expected = [s(3, grid, generator=gen, device=torch.device("cpu")) for s in strategies]
    assert [(m.set_index, m.num_sets, m.more) for m in masks.sets] == [(0, 3, ()), (1, 3, ()), (2, 3, ())]
    assert len(masks.more) == 2
    for got, want in zip(masks.sets, expected):
        assert torch.equal(got.visible, want.visible) and torch.equal(got.targets, want.targets)
    moved = masks.to("cpu")
    assert [m.set_index for m in moved.sets] == [0, 1, 2] and torch.equal(moved.more[1].visible, masks.more[1].visible)
    assert bool(masks.hidden.sum(1).eq(grid.num_tokens - masks.visible.shape[1]).all())  # the first set's view


def test_multi_masking_validation() -> None:
    with pytest.raises(ValueError, match=r"MultiMasking.strategies must be a list of at least two"):
        MultiMasking(strategies=[short_range()])
    with pytest.raises(ValueError, match=r"MultiMasking.strategies\[1\] must be a strategy without per-token scores"):
        MultiMasking(strategies=[short_range(), HardPatchMasking()])
    with pytest.raises(ValueError, match=r"MultiMasking.strategies\[0\] must be a MaskingStrategy other than"):
        MultiMasking(strategies=[MultiMasking(strategies=[short_range(), long_range()]), long_range()])


def _clips(b: int = 4) -> dict[str, torch.Tensor]:
    return {"video": torch.randn(b, 3, 4, 16, 16, generator=torch.Generator().manual_seed(3))}


def test_module_averages_the_losses_of_the_sets() -> None:
    target = PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    masking = MultiMasking(strategies=[RandomMasking(mask_ratio=0.5), RandomMasking(mask_ratio=0.75)])
    module = PretrainModule(encoder=tiny_video_encoder(), masking=masking, targets=[target], batch_size=4)
    batch = _clips()
    masks = draw(masking, 4, module.encoder.grid, 0)
    out = module.compute_losses(batch, masks)
    single = [module.compute_losses(batch, replace(m, set_index=0, num_sets=1)) for m in masks.sets]
    assert masks.sets[0].visible.shape[1] != masks.sets[1].visible.shape[1]  # two different masks
    torch.testing.assert_close(out["loss"], (single[0]["loss"] + single[1]["loss"]) / 2, rtol=0, atol=0)
    out["loss"].backward()
    assert module.encoder.vit.patch_embed.proj.weight.grad is not None


def _vjepa_module(num_sets: int = 2, num_mask_tokens: int = 2) -> PretrainModule:
    strategies = [short_range(), long_range(), short_range()][:num_sets]
    target = LatentTarget(
        predictor_dim=16, predictor_depth=1, predictor_groups="joint", loss="l1", num_mask_tokens=num_mask_tokens,
        mask_token_init="zeros", monitor_every=1,
    )  # fmt: skip
    return PretrainModule(
        encoder=tiny_video_encoder(), masking=MultiMasking(strategies=strategies), targets=[target], batch_size=4
    )


def test_latent_target_runs_the_teacher_once_and_a_mask_token_per_set() -> None:
    module = _vjepa_module()
    target = module.target_list[0]
    assert isinstance(target, LatentTarget) and target.predictor is not None and target.target_encoder is not None
    assert target.predictor.mask_token.shape == (2, 1, 16) and not bool(target.predictor.mask_token.any())
    calls: list[int] = []
    target.target_encoder.module.register_forward_hook(lambda *_: calls.append(1))
    batch = _clips()
    masks = draw(module.masking, 4, module.encoder.grid, 1)
    out = module.compute_losses(batch, masks)
    assert len(calls) == 1 and target._teacher is None  # one target pass per step, released after the last set
    # independently: the teacher's normed tokens, the predictor with mask token i, the mean of the two L1 losses
    with torch.no_grad():
        h = target.target_encoder.module(batch["video"])[:, target.target_encoder.module.num_prefix_tokens :]
        h = torch.nn.functional.layer_norm(h, h.shape[-1:])
    losses = []
    for i, m in enumerate(masks.sets):
        latent = module.encoder(batch["video"], m.visible)
        pred = target.predictor(latent, m.visible, m.targets, mask_index=i)
        want = torch.stack([h[b, m.targets[b, 0]] for b in range(4)]).unsqueeze(1)  # (B, 1, T, D)
        losses.append(latent_loss(pred, want, "l1"))
    torch.testing.assert_close(out["loss"], (losses[0] + losses[1]) / 2)
    assert {"latent/std_target", "latent/rankme_pred"} <= set(out)  # the monitor, from the first set
    out["loss"].backward()
    grad = target.predictor.mask_token.grad
    assert grad is not None and bool(grad[0].abs().sum() > 0) and bool(grad[1].abs().sum() > 0)


def test_mask_token_count_must_cover_the_sets() -> None:
    module = _vjepa_module(num_sets=3, num_mask_tokens=2)
    masks = draw(module.masking, 4, module.encoder.grid, 0)
    with pytest.raises(ValueError, match=r"num_mask_tokens=2 but the step has 3 mask sets"):
        module.compute_losses(_clips(), masks)
    shared = _vjepa_module(num_sets=3, num_mask_tokens=1)  # one shared token: any number of sets
    assert torch.isfinite(shared.compute_losses(_clips(), draw(shared.masking, 4, shared.encoder.grid, 0))["loss"])


def test_default_is_vjepa_and_mim_masks_draws_every_set(tmp_path, capsys) -> None:
    from PIL import Image

    from mim.cli import main

    default = MultiMasking()
    assert [(s.num_targets, s.target_scale, s.context, s.placement) for s in default.strategies] == [
        (8, (0.15, 0.15), "complement", "inside"),
        (2, (0.7, 0.7), "complement", "inside"),
    ]
    out = tmp_path / "vjepa.png"
    assert main(["masks", "--strategy", "multi", "--grid", "2x14x14", "--samples", "2", "--out", str(out)]) == 0
    second = tmp_path / "vjepa_set1.png"
    assert out.is_file() and second.is_file()
    assert Image.open(out).tobytes() != Image.open(second).tobytes()
    printed = capsys.readouterr().out
    assert "mask set 1 of 2" in printed and "mask set 2 of 2" in printed


def test_run_pictures_draws_every_mask_set(tmp_path) -> None:
    import warnings

    from torch.utils.data import DataLoader

    from mim.callbacks.run_pictures import RunPictures
    from tests.factories import cpu_trainer

    module = _vjepa_module()
    clips = [{"video": v} for v in _clips(4)["video"]]
    trainer = cpu_trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[RunPictures(every_n_steps=1)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(clips, batch_size=4))
    names = sorted(p.name for p in tmp_path.rglob("pictures/*.png"))
    assert names == ["step_1_masks.png", "step_1_masks_set1.png"], names
