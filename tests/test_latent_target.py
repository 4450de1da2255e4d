"""LatentTarget (I-JEPA / V-JEPA / T-JEPA): contracts on image, video and table grids; the EMA formula; what the
predictor can see; targets, losses and collapse statistics against their formulas; no host syncs; debug recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mim.masking import FeatureSubsetMasking, MultiBlockMasking, RandomMasking
from mim.metrics import per_dimension_std, rankme
from mim.models import MaskedEncoder, MaskedTableEncoder
from mim.models.predictor import JEPAPredictor, predictor_pos_table
from mim.module import PretrainModule
from mim.targets.latent import LatentTarget, latent_loss
from mim.types import Masks, TokenGrid
from tests.contracts import TargetContract
from tests.factories import TINY_VIT, TrainMetricsRecorder, tiny_encoder, tiny_table_encoder, tiny_video_encoder
from tests.syncs import count_host_syncs

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CPU = torch.device("cpu")
NO_CLS = {"class_token": False, "global_pool": "avg", "fc_norm": False}
NO_CLS_VIT = {**TINY_VIT, **NO_CLS}  # I-JEPA's encoder: no class token, average pooling


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _target(**overrides) -> LatentTarget:
    kwargs = dict(predictor_dim=32, predictor_depth=1, monitor_every=1)
    kwargs.update(overrides)
    return LatentTarget(**kwargs)


TABLE_SCHEMA = {"num_numeric": 6, "category_cardinalities": [4, 3]}


def _table_batch(b: int) -> dict[str, torch.Tensor]:
    g = _gen(3)
    return {
        "numeric": torch.randn(b, 6, generator=g),
        "numeric_missing": torch.rand(b, 6, generator=g) < 0.1,
        "categorical": torch.stack([torch.randint(0, 4, (b,), generator=g), torch.randint(0, 3, (b,), generator=g)], 1),
    }


def _multiblock(grid: TokenGrid, b: int, seed: int = 2, **kwargs) -> Masks:
    return MultiBlockMasking(**kwargs)(b, grid, generator=_gen(seed), device=CPU)


# ---------------------------------------------------------------------------------------------- contracts


class TestLatentTargetContract(TargetContract):
    """Image grid, an encoder with a cls token (passed to the predictor as context), random masks."""

    target_cls = LatentTarget

    def make_target(self, **overrides) -> LatentTarget:
        return _target(**overrides)


class TestLatentTargetMultiBlockContract(TargetContract):
    """I-JEPA's setting: no cls token, multi-block masks (M = 4 groups), joint predictor sequence, L1."""

    target_cls = LatentTarget
    batch_size = 4

    def make_target(self, **overrides) -> LatentTarget:
        return _target(predictor_groups="joint", loss="l1", **overrides)

    def make_encoder(self) -> MaskedEncoder:
        return tiny_encoder(model_kwargs=NO_CLS_VIT)

    def make_masks(self, encoder) -> Masks:
        return _multiblock(encoder.grid, self.batch_size, num_targets=2, target_scale=(0.2, 0.3))


class TestLatentTargetVideoContract(TargetContract):
    """Video grid 2 x 4 x 4 with 3-D blocks spanning all time slots and a full-frame context block."""

    target_cls = LatentTarget

    def make_target(self, **overrides) -> LatentTarget:
        return _target(**overrides)

    def make_encoder(self) -> MaskedEncoder:
        return tiny_video_encoder(model_kwargs=NO_CLS_VIT)

    def make_batch(self, encoder) -> dict[str, torch.Tensor]:
        return {"video": torch.randn(self.batch_size, 3, 4, 16, 16, generator=_gen(1))}

    def make_masks(self, encoder) -> Masks:
        return _multiblock(encoder.grid, self.batch_size, num_targets=2, context_scale=(1.0, 1.0))


class TestLatentTargetTableContract(TargetContract):
    """Table grid (1, 1, F): T-JEPA's feature subsets, the [REG] (cls) token as predictor context, MSE, no norm."""

    target_cls = LatentTarget
    batch_size = 4

    def make_target(self, **overrides) -> LatentTarget:
        return _target(predictor_dim=16, predictor_num_heads=4, loss="mse", target_norm=False, **overrides)

    def make_encoder(self) -> MaskedTableEncoder:  # type: ignore[override]
        return tiny_table_encoder(**TABLE_SCHEMA)

    def make_batch(self, encoder) -> dict[str, torch.Tensor]:
        return _table_batch(self.batch_size)

    def make_masks(self, encoder) -> Masks:
        return FeatureSubsetMasking(context_share=(0.25, 0.5), target_share=(0.25, 0.5), num_targets=3)(
            self.batch_size, encoder.grid, generator=_gen(2), device=CPU
        )


# ---------------------------------------------------------------------------------------------- EMA


def test_after_step_is_the_ema_formula_on_parameters_only():
    encoder = tiny_table_encoder(**TABLE_SCHEMA)  # has a buffer (the tokenizer's category offsets)
    target = _target(predictor_dim=16, predictor_num_heads=4, momentum=(0.9, 0.99), momentum_ramp=0.5)
    target.bind(encoder)
    teacher_before = [p.clone() for p in target.target_encoder.parameters()]
    buffers_before = [b.clone() for b in target.target_encoder.buffers()]
    assert buffers_before, "expected a buffer to check"
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))
        for b in encoder.buffers():
            b.add_(1)
    target.after_step(encoder, progress=0.25)  # halfway through the ramp: m = 0.9 + 0.09 / 2
    m = 0.945
    assert target.momentum_at(0.25) == pytest.approx(m)
    for t, t0, s in zip(target.target_encoder.parameters(), teacher_before, encoder.parameters(), strict=True):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s.detach(), rtol=1e-6, atol=1e-6)
    for b, b0 in zip(target.target_encoder.buffers(), buffers_before, strict=True):
        assert torch.equal(b, b0), "the EMA update changed a buffer"


def test_after_step_is_one_fused_foreach_call(monkeypatch):
    encoder = tiny_encoder(model_kwargs=NO_CLS_VIT)
    target = _target(momentum=(0.9, 0.9))
    target.bind(encoder)
    calls = []
    original = torch._foreach_lerp_

    def spy(tensors, others, weight):
        calls.append((len(tensors), weight))
        return original(tensors, others, weight)

    monkeypatch.setattr(torch, "_foreach_lerp_", spy)
    target.after_step(encoder, progress=0.3)
    assert calls == [(len(list(encoder.parameters())), pytest.approx(0.1))]


def test_momentum_schedule_endpoints():
    target = _target(momentum=(0.996, 1.0))
    assert [target.momentum_at(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.996, 0.998, 1.0])
    encoder = tiny_encoder()
    target.bind(encoder)
    kept = [p.clone() for p in target.target_encoder.parameters()]
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
    target.after_step(encoder, progress=1.0)  # m = 1: the target encoder does not move
    assert all(torch.equal(a, b) for a, b in zip(target.target_encoder.parameters(), kept))


# ---------------------------------------------------------------------------------------------- visibility


def _patch_perturbed(images: torch.Tensor, token: int, grid_w: int, patch: int = 4) -> torch.Tensor:
    out = images.clone()
    r, c = divmod(token, grid_w)
    out[:, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] += 3.0
    return out


def test_predictions_see_only_the_context():
    """Perturbing a token outside the context (a target token or one in neither) leaves predictions unchanged;
    perturbing a context token changes them. The targets change in every case (the target encoder sees all)."""
    encoder = tiny_encoder(model_kwargs=NO_CLS_VIT)
    target = _target(predictor_depth=2)
    target.bind(encoder)
    images = torch.randn(1, 3, 16, 16, generator=_gen(0))
    visible = torch.tensor([[0, 1, 2, 4, 5, 6]])
    targets = torch.tensor([[[10, 11], [14, 15]]])  # (1, M=2, T=2); tokens 3, 7, 8, 9, 12, 13 are in neither
    masks = Masks(visible=visible, targets=targets, num_tokens=16)

    def predict(x):
        return target.predictor(encoder(x, visible), visible, targets)

    base, base_target = predict(images), target.target_features({"image": images}, targets)
    for token, seen in ((8, False), (15, False), (5, True)):
        x = _patch_perturbed(images, token, encoder.grid.w)
        pred = predict(x)
        if seen:
            assert not torch.allclose(pred, base), f"context token {token} had no effect"
        else:
            assert torch.equal(pred, base), f"token {token} outside the context changed the predictions"
        assert not torch.allclose(target.target_features({"image": x}, masks.targets), base_target)


def test_separate_groups_do_not_attend_to_each_other_joint_ones_do():
    encoder = tiny_encoder(model_kwargs=NO_CLS_VIT)
    latent = torch.randn(2, 5, 64, generator=_gen(1))
    visible = torch.tensor([[0, 1, 2, 3, 4]] * 2)
    a = torch.tensor([[[8, 9], [12, 13]]] * 2)
    b = torch.tensor([[[8, 9], [14, 15]]] * 2)  # same first group, different second group
    for groups in ("separate", "joint"):
        torch.manual_seed(0)
        pred = JEPAPredictor(grid=encoder.grid, in_dim=64, dim=32, depth=2, num_heads=4, groups=groups)
        pa, pb = pred(latent, visible, a), pred(latent, visible, b)
        assert pa.shape == (2, 2, 2, 64)
        if groups == "separate":
            torch.testing.assert_close(pa[:, 0], pb[:, 0], rtol=0, atol=1e-6)
        else:
            assert not torch.allclose(pa[:, 0], pb[:, 0])


def test_joint_equals_separate_for_one_group_and_samples_stay_in_place():
    encoder = tiny_encoder(model_kwargs=NO_CLS_VIT)
    latent = torch.randn(3, 4, 64, generator=_gen(1))
    visible = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [0, 5, 10, 15]])
    targets = torch.tensor([[[8, 9, 10]], [[0, 1, 2]], [[3, 6, 9]]])  # (3, 1, 3)
    preds = {}
    for groups in ("separate", "joint"):
        torch.manual_seed(0)
        preds[groups] = JEPAPredictor(grid=encoder.grid, in_dim=64, dim=32, depth=1, num_heads=4, groups=groups)(
            latent, visible, targets
        )
    torch.testing.assert_close(preds["separate"], preds["joint"])
    # sample-major layout: sample 1 alone gives the same predictions as inside the batch
    torch.manual_seed(0)
    pred = JEPAPredictor(grid=encoder.grid, in_dim=64, dim=32, depth=1, num_heads=4)
    multi = torch.tensor([[[8, 9], [12, 13], [1, 2]]] * 3)  # (3, M=3, 2)
    full = pred(latent, visible, multi)
    torch.testing.assert_close(full[1], pred(latent[1:2], visible[1:2], multi[1:2])[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full[:, 2], pred(latent, visible, multi[:, 2:3])[:, 0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- formulas


def test_targets_are_layer_normed_target_encoder_features_at_the_target_tokens():
    encoder = tiny_encoder(model_kwargs=NO_CLS_VIT)
    target = _target()
    target.bind(encoder)
    with torch.no_grad():  # the online encoder moves on; the targets come from the target encoder only
        encoder.vit.blocks[0].mlp.fc2.weight.add_(1.0)
        norm = target.target_encoder.module.vit.norm  # a non-trivial affine final norm, so the extra norm matters
        norm.weight.uniform_(0.5, 2.0, generator=_gen(11))
        norm.bias.uniform_(-1.0, 1.0, generator=_gen(12))
    images = torch.randn(3, 3, 16, 16, generator=_gen(4))
    masks = _multiblock(encoder.grid, 3, num_targets=2, target_scale=(0.2, 0.3))
    got = target.target_features({"image": images}, masks.targets)
    with torch.no_grad():
        h = target.target_encoder.module(images)  # (B, N, D): no prefix tokens
        mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        normed = (h - mean) / torch.sqrt(var + 1e-5)
    b, m, t = masks.targets.shape
    expected = torch.stack([torch.stack([normed[i, masks.targets[i, j]] for j in range(m)]) for i in range(b)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not got.requires_grad
    # without target_norm (T-JEPA) and with a prefix token: the raw features of the patch tokens
    encoder = tiny_encoder()
    raw = _target(target_norm=False)
    raw.bind(encoder)
    h = raw.target_encoder.module(images)[:, 1:]  # (B, N, D) cls row dropped
    expected = torch.stack([torch.stack([h[i, masks.targets[i, j]] for j in range(m)]) for i in range(b)])
    torch.testing.assert_close(raw.target_features({"image": images}, masks.targets), expected)


def test_video_and_table_targets_use_the_target_encoders_own_inputs():
    encoder = tiny_table_encoder(**TABLE_SCHEMA)
    target = _target(predictor_dim=16, predictor_num_heads=4, target_norm=False)
    target.bind(encoder)
    batch = _table_batch(2)
    with torch.no_grad():
        encoder.tokenizer.numeric_weight.add_(1.0)  # the online tokenizer moves, the target encoder's does not
    idx = torch.tensor([[[0, 7]], [[3, 5]]])
    teacher = target.target_encoder.module
    h = teacher(teacher.tokenizer(batch))[:, 1:]  # (B, F, D)
    torch.testing.assert_close(target.target_features(batch, idx), torch.stack([h[0, [0, 7]], h[1, [3, 5]]])[:, None])
    video = tiny_video_encoder(model_kwargs=NO_CLS_VIT)
    vt = _target()
    vt.bind(video)
    clips = torch.randn(2, 3, 4, 16, 16, generator=_gen(5))
    idx = torch.tensor([[[0, 31]], [[16, 17]]])
    h = F.layer_norm(vt.target_encoder.module(clips), (64,))
    torch.testing.assert_close(
        vt.target_features({"video": clips}, idx), torch.stack([h[0, [0, 31]], h[1, [16, 17]]])[:, None]
    )


def test_losses_match_their_formulas():
    g = _gen(7)
    pred, tgt = 2 * torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    x = (pred - tgt).abs()
    huber = torch.where(x < 1, 0.5 * x**2, x - 0.5).mean()
    torch.testing.assert_close(latent_loss(pred, tgt, "smooth_l1"), huber)
    assert float((x < 1).float().mean()) not in (0.0, 1.0)  # both branches of the Huber loss are exercised
    torch.testing.assert_close(latent_loss(pred, tgt, "l1"), x.mean())
    torch.testing.assert_close(latent_loss(pred, tgt, "mse"), (x**2).mean())
    assert latent_loss(pred.bfloat16(), tgt, "l1").dtype == torch.float32


@pytest.mark.parametrize("loss", ["smooth_l1", "l1", "mse"])
def test_forward_loss_is_the_loss_of_predictor_and_targets(loss: str):
    encoder = tiny_encoder(model_kwargs=NO_CLS_VIT)
    target = _target(loss=loss, monitor_every=0)
    target.bind(encoder)
    images = torch.randn(2, 3, 16, 16, generator=_gen(8))
    masks = _multiblock(encoder.grid, 2, num_targets=2, target_scale=(0.2, 0.3))
    latent = encoder(images, masks.visible)
    out = target({"image": images}, masks, latent, encoder)
    assert set(out) == {"loss"}
    pred = target.predictor(latent, masks.visible, masks.targets)
    expected = latent_loss(pred, target.target_features({"image": images}, masks.targets), loss)
    torch.testing.assert_close(out["loss"], expected)


def test_rankme_and_std_match_their_formulas():
    # r equal singular values -> RankMe = r (up to the paper's eps)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=_gen(0), dtype=torch.float64))
    for r in (1, 3, 10):
        x = (q[:, :r] @ q[:r, :] * 2.5).float()  # (50, 50) rank r, singular values all 2.5
        assert float(rankme(x)) == pytest.approx(r, rel=1e-3)
    x = torch.randn(4, 30, 16, generator=_gen(1)) * torch.linspace(0.1, 3, 16)
    s = torch.linalg.svdvals(x.reshape(-1, 16).double())
    p = s / s.sum() + 1e-7
    assert float(rankme(x)) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)
    assert 1.0 <= float(rankme(x)) <= 16.0
    assert float(rankme(torch.zeros(5, 4))) == pytest.approx(1.0, abs=1e-4)
    rows = x.reshape(-1, 16)
    expected = ((rows - rows.mean(0)) ** 2).mean(0).sqrt()
    torch.testing.assert_close(per_dimension_std(x), expected)
    assert float(per_dimension_std(torch.ones(7, 3)).abs().max()) == 0.0


def test_collapse_stats_every_monitor_every_training_calls():
    encoder = tiny_encoder(model_kwargs=NO_CLS_VIT)
    target = _target(monitor_every=3)
    target.bind(encoder)
    images = torch.randn(2, 3, 16, 16, generator=_gen(9))
    masks = _multiblock(encoder.grid, 2, num_targets=2, target_scale=(0.2, 0.3))
    latent = encoder(images, masks.visible).detach()
    stats = {"std_target", "std_pred", "rankme_target", "rankme_pred"}
    seen = [set(target({"image": images}, masks, latent, encoder)) - {"loss"} for _ in range(7)]
    assert seen == [stats, set(), set(), stats, set(), set(), stats]
    target.eval()
    assert all(set(target({"image": images}, masks, latent, encoder)) == {"loss"} for _ in range(3))
    target.train()
    out = target({"image": images}, masks, latent, encoder)  # eval calls were not counted: call 7 is no monitor
    assert set(out) == {"loss"}
    # the values are the formulas on the predictions and targets of the call
    target._calls = 0
    out = target({"image": images}, masks, latent, encoder)
    pred = target.predictor(latent, masks.visible, masks.targets)
    tgt = target.target_features({"image": images}, masks.targets)
    torch.testing.assert_close(out["std_pred"], per_dimension_std(pred).mean())
    torch.testing.assert_close(out["rankme_target"], rankme(tgt))
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")


# ---------------------------------------------------------------------------------------------- module


def _module(monitor_every: int = 100, **target_kwargs) -> PretrainModule:
    return PretrainModule(
        encoder=tiny_encoder(model_kwargs=NO_CLS_VIT),
        masking=RandomMasking(mask_ratio=0.75),
        targets=[_target(monitor_every=monitor_every, **target_kwargs)],
    )


def test_target_encoder_frozen_eval_saved_and_not_optimised():
    module = _module()
    module.train()
    target = module.target_list[0]
    assert not target.target_encoder.module.training, "the target encoder must stay in eval mode"
    keys = module.state_dict().keys()
    assert any(k.startswith("targets.0.target_encoder.module.vit.blocks.0") for k in keys)
    assert any(k.startswith("targets.0.predictor.predictor_blocks.0") for k in keys)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert not any(".target_encoder." in n for n in trainable)
    assert any(n.startswith("targets.0.predictor.") for n in trainable)
    batch = {"image": torch.randn(2, 3, 16, 16)}
    masks = module.draw_masks(batch, _gen(0))
    module.compute_losses(batch, masks)["loss"].backward()
    assert all(p.grad is None for p in target.target_encoder.parameters())


def test_non_monitor_step_has_no_host_syncs():
    """Masks, loss, backward and the EMA update: no .item()/.cpu()/nonzero/boolean indexing outside monitor steps."""
    module = _module(monitor_every=100)
    batch = {"image": torch.randn(4, 3, 16, 16)}
    module.compute_losses(batch, module.draw_masks(batch, _gen(0)))  # call 0 is a monitor step
    with count_host_syncs() as syncs:
        masks = module.draw_masks(batch, _gen(1))
        out = module.compute_losses(batch, masks)
        out["loss"].backward()
        module.target_list[0].after_step(module.encoder, 0.5)
    assert syncs.count == 0, syncs.calls
    assert "latent/rankme_target" not in out


def test_validation_errors():
    for kwargs, field in (
        ({"predictor_dim": 30}, "predictor_dim"),
        ({"predictor_depth": 0}, "predictor_depth"),
        ({"predictor_dim": 32, "predictor_num_heads": 5}, "predictor_num_heads"),
        ({"predictor_groups": "union"}, "predictor_groups"),
        ({"loss": "l2"}, "loss"),
        ({"momentum": (0.9, 1.5)}, "momentum"),
        ({"momentum_ramp": 2.0}, "momentum_ramp"),
        ({"monitor_every": -1}, "monitor_every"),
    ):
        with pytest.raises(ValueError, match=field):
            LatentTarget(**kwargs)
    with pytest.raises(ValueError, match="predictor_dim"):  # 36 is not divisible by the encoder's 8 heads
        LatentTarget(predictor_dim=36).bind(tiny_encoder(model_kwargs={**TINY_VIT, "num_heads": 8}))
    grid = TokenGrid(1, 4, 4)
    for kwargs, field in (({"depth": 0}, "depth"), ({"dim": 30}, "dim"), ({"groups": "all"}, "groups")):
        with pytest.raises(ValueError, match=f"JEPAPredictor.{field}"):
            JEPAPredictor(grid=grid, in_dim=8, num_heads=2, **kwargs)
    with pytest.raises(RuntimeError, match="bind"):
        _target().after_step(tiny_encoder(), 0.0)


def test_predictor_position_tables():
    table = predictor_pos_table(16, TokenGrid(1, 1, 9))  # a table: 1-D over the feature index
    assert table.shape == (9, 16) and len({tuple(r) for r in table.tolist()}) == 9
    assert predictor_pos_table(16, TokenGrid(1, 4, 4)).shape == (16, 16)
    assert predictor_pos_table(24, TokenGrid(2, 4, 4)).shape == (32, 24)


# ---------------------------------------------------------------------------------------------- recipes


def _run_recipe(name: str, tmp_path: Path, steps: int, *extra: str) -> tuple[list[dict[str, float]], LatentTarget]:
    from mim.lightning_cli import build

    cli = build(
        [
            "--config",
            str(RECIPES / "debug" / name),
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            *extra,
        ],
        save_config_callback=None,
    )
    cli.model.configure_data(cli.datamodule)  # a table encoder binds its targets once the schema is known
    target = cli.model.target_list[0]
    assert isinstance(target, LatentTarget)
    teacher0 = [p.clone() for p in target.target_encoder.parameters()]
    record = TrainMetricsRecorder()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seen = record.seen
    assert len(seen) == steps
    assert all(math.isfinite(v) for s in seen for v in s.values())
    assert {"train/latent/std_target", "train/latent/rankme_pred"} <= set(seen[0])
    moved = sum(float((p - p0).abs().sum()) for p, p0 in zip(target.target_encoder.parameters(), teacher0))
    assert moved > 0, "the target encoder never moved"
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), map_location="cpu", weights_only=True)
    assert any(".target_encoder.module." in k for k in ckpt["state_dict"])
    return seen, target


@pytest.mark.usefixtures("fashion_mnist")
def test_ijepa_debug_recipe_trains(tmp_path: Path):
    seen, target = _run_recipe("ijepa_fashion_mnist.yaml", tmp_path, 4)
    assert target.target_encoder.module.num_prefix_tokens == 0  # I-JEPA: no class token
    assert seen[0]["train/weight_decay"] == pytest.approx(0.04)  # cosine-increasing 0.04 -> 0.4
    assert seen[-1]["train/weight_decay"] > seen[0]["train/weight_decay"]


def test_vjepa_debug_recipe_trains(tmp_path: Path, real_clips: Path):
    seen, target = _run_recipe("vjepa_video.yaml", tmp_path, 3, f"--data.init_args.root={real_clips}")
    assert target.target_encoder.module.grid.t == 2 and target.predictor.groups == "joint"
    assert target.predictor.mask_token.shape[0] == 2  # V-JEPA: a mask token per mask set (MultiMasking)


def test_tjepa_debug_recipe_trains(tmp_path: Path):
    pytest.importorskip("sklearn")
    from mim.data.tables import sklearn_table

    table = sklearn_table("wine", tmp_path / "table")
    seen, target = _run_recipe("tjepa_table.yaml", tmp_path, 4, f"--data.init_args.train_path={table}")
    assert target.predictor.grid.w == 13 and target.predictor.num_prefix_tokens == 1  # 13 features, [REG]


def _recipe(path: str) -> tuple[str, dict]:
    text = (RECIPES / path).read_text()
    return text.split("seed_everything")[0], yaml.safe_load(text)


def test_ijepa_recipe_states_the_paper_settings():
    header, cfg = _recipe("ijepa/vit_h14_in1k.yaml")
    assert "79.3" in header and "Expected" in header
    model = cfg["model"]["init_args"]
    enc = model["encoder"]["init_args"]
    assert enc["arch"] == "vit_huge_patch14_224" and enc["model_kwargs"]["class_token"] is False
    tgt = model["targets"][0]["init_args"]
    assert (tgt["predictor_dim"], tgt["predictor_depth"], tgt["predictor_num_heads"]) == (384, 12, 16)
    assert tgt["loss"] == "smooth_l1" and tuple(tgt["momentum"]) == (0.996, 1.0)
    mask = model["masking"]["init_args"]
    assert mask["num_targets"] == 4 and tuple(mask["target_scale"]) == (0.15, 0.2)
    assert tuple(mask["context_scale"]) == (0.85, 1.0) and tuple(mask["target_aspect"]) == (0.75, 1.5)
    assert (model["lr"], model["warmup_start_lr"], model["min_lr"]) == (1.0e-3, 2.0e-4, 1.0e-6)
    assert (model["weight_decay"], model["weight_decay_end"], tuple(model["betas"])) == (0.04, 0.4, (0.9, 0.999))
    assert model["warmup_epochs"] == 40 and cfg["trainer"]["max_epochs"] == 300
    assert model["schedule_convention"] == "ijepa"  # step k uses the lr / wd at k + 1, as the official schedulers
    assert cfg["data"]["init_args"]["batch_size"] == 128
