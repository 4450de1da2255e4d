"""HPM end to end: HardPatchTarget's loss predictor, its EMA teacher, token scores and HardPatchMasking in a real run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mim.masking import HardPatchMasking
from mim.masking.hard_patch import epoch_index, num_hard
from mim.module import PretrainModule
from mim.targets import HardPatchTarget
from mim.targets.loss_prediction import relative_loss, standardized_mse_loss
from tests.contracts import TargetContract
from tests.factories import TrainMetricsRecorder, tiny_encoder
from tests.syncs import count_host_syncs

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _target(**overrides) -> HardPatchTarget:
    kwargs = dict(decoder_dim=32, decoder_depth=1, decoder_num_heads=4, ema_ramp=0.5)
    kwargs.update(overrides)
    return HardPatchTarget(**kwargs)


class TestHardPatchTargetContract(TargetContract):
    target_cls = HardPatchTarget

    def make_target(self, **overrides) -> HardPatchTarget:
        return _target(**overrides)


class TestHardPatchTargetMSEContract(TargetContract):
    target_cls = HardPatchTarget

    def make_target(self, **overrides) -> HardPatchTarget:
        return _target(loss_predictor_loss="mse", **overrides)


class TestHardPatchTargetEpochRampContract(TargetContract):
    target_cls = HardPatchTarget

    def make_target(self, **overrides) -> HardPatchTarget:
        return _target(ramp_every="epoch", epochs=4, **overrides)


def _parts(**overrides):
    encoder = tiny_encoder()
    target = _target(**overrides)
    target.bind(encoder)
    batch = {"image": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))}
    return encoder, target, batch


def test_loss_is_reconstruction_plus_ranking_loss():
    encoder, target, batch = _parts(loss_predictor_weight=0.5)
    masks = HardPatchMasking()(
        4,
        encoder.grid,
        generator=torch.Generator().manual_seed(2),
        device=torch.device("cpu"),
        scores=torch.rand(4, 16),
    )
    latent = encoder(batch["image"], masks.visible)
    out = target(batch, masks, latent, encoder)
    # independent computation from the parts
    hidden = masks.targets.flatten(1)
    x = target.decoder.embed(latent, masks.visible)
    pred = target.decoder.decode(x, hidden)
    patches = encoder.patchify(batch["image"])
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    tgt = ((patches - mean) / (var + 1e-6).sqrt()).gather(1, hidden[..., None].expand(-1, -1, patches.shape[-1]))
    per_token = (pred - tgt).pow(2).mean(-1)
    predicted = target.loss_predictor(x).gather(1, hidden)
    torch.testing.assert_close(out["reconstruction"], per_token.mean())
    torch.testing.assert_close(out["loss_prediction"], relative_loss(predicted, per_token))
    torch.testing.assert_close(out["loss"], per_token.mean() + 0.5 * relative_loss(predicted, per_token))
    mse = _target(loss_predictor_loss="mse")
    mse.bind(encoder)
    mse.load_state_dict(target.state_dict())
    torch.testing.assert_close(
        mse(batch, masks, latent, encoder)["loss_prediction"], standardized_mse_loss(predicted, per_token)
    )


def test_ranking_gradient_reaches_shared_parts_not_teacher():
    """L_pred trains the loss predictor, the shared decoder embedding / mask token and the encoder
    (Haochen-Wang409/HPM engine_pretrain.py), never the reconstructor head or the teacher: compare gradients with
    loss_predictor_weight 1 and 0."""
    grads = {}
    for w in (0.0, 1.0):
        encoder, target, batch = _parts(loss_predictor_weight=w)
        masks = HardPatchMasking()(
            4,
            encoder.grid,
            generator=torch.Generator().manual_seed(3),
            device=torch.device("cpu"),
            scores=torch.rand(4, 16, generator=torch.Generator().manual_seed(4)),
        )
        target(batch, masks, encoder(batch["image"], masks.visible), encoder)["loss"].backward()
        assert all(p.grad is None and not p.requires_grad for p in target.teacher.parameters())
        grads[w] = {
            "predictor": target.loss_predictor.pred.weight.grad,
            "embed": target.decoder.decoder_embed.weight.grad,
            "mask_token": target.decoder.mask_token.grad,
            "encoder": encoder.vit.blocks[0].attn.qkv.weight.grad,
            "reconstructor": target.decoder.decoder_pred.weight.grad,
        }
    assert grads[0.0]["predictor"] is None or float(grads[0.0]["predictor"].abs().sum()) == 0
    assert float(grads[1.0]["predictor"].abs().sum()) > 0
    for shared in ("embed", "mask_token", "encoder"):
        assert float((grads[1.0][shared] - grads[0.0][shared]).abs().sum()) > 0, shared
    torch.testing.assert_close(grads[1.0]["reconstructor"], grads[0.0]["reconstructor"])


def test_token_scores_come_from_the_ema_teacher_on_the_full_image():
    encoder, target, batch = _parts()
    scores = target.token_scores(batch, encoder)
    assert scores.shape == (4, encoder.grid.num_tokens) and not scores.requires_grad
    # at bind time the teacher equals the student: the student's parts give the same scores
    latent = encoder(batch["image"])  # all tokens
    x = target.decoder.embed(latent)  # no mask tokens
    torch.testing.assert_close(scores, target.loss_predictor(x))
    # the teacher is a copy: changing the student does not change the scores until after_step
    with torch.no_grad():
        target.loss_predictor.pred.bias.add_(1.0)
    torch.testing.assert_close(target.token_scores(batch, encoder), scores)
    target.after_step(encoder, progress=1.0)  # momentum end 0.9999: moves by 1e-4 of the change
    torch.testing.assert_close(target.token_scores(batch, encoder), scores + 1e-4, rtol=0, atol=2e-6)


def test_after_step_is_the_ema_formula_with_the_momentum_schedule():
    encoder, target, _ = _parts(ema_momentum=(0.9, 0.99), ema_ramp=0.5)
    teacher_before = [p.clone() for p in target.teacher.parameters()]
    with torch.no_grad():
        for p in list(encoder.parameters()) + list(target.parameters()):
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    student = list(target._student(encoder).parameters())
    target.after_step(encoder, progress=0.25)  # halfway through the ramp: m = 0.945
    m = 0.945
    for t, t0, s in zip(target.teacher.parameters(), teacher_before, student):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s, rtol=1e-6, atol=1e-6)


def _official_decay(epoch: int) -> float:
    """HPM's EMA decay for an epoch (Haochen-Wang409/HPM engine_pretrain.py, verbatim)."""
    if epoch < 100:
        return 0.999 + epoch / 100 * (0.9999 - 0.999)
    return 0.9999


@pytest.mark.parametrize("steps_per_epoch", [1, 5004])  # 5004: ImageNet-1k at batch 256
def test_epoch_momentum_is_the_official_step_function(steps_per_epoch: int):
    """ramp_every='epoch': at the first and last optimizer step of every epoch of 800 the momentum equals the
    official per-epoch decay exactly (0.999, 0.99945, 0.9999 at e = 0, 50, >= 100)."""
    target = HardPatchTarget(ema_momentum=(0.999, 0.9999), ema_ramp=0.125, ramp_every="epoch", epochs=800)
    total = 800 * steps_per_epoch
    for e in range(800):
        for k in (e * steps_per_epoch, (e + 1) * steps_per_epoch - 1):
            assert target.momentum(min(1.0, k / total)) == _official_decay(e)
    assert [_official_decay(e) for e in (0, 50, 100, 799)] == pytest.approx([0.999, 0.99945, 0.9999, 0.9999])
    per_step = HardPatchTarget(ema_momentum=(0.999, 0.9999), ema_ramp=0.125)  # the default: moves every step
    assert per_step.momentum(50.5 / 800) == pytest.approx(0.999 + 50.5 / 100 * (0.9999 - 0.999))


def test_epoch_ramps_follow_the_trainers_epochs_in_a_fit(tmp_path: Path):
    """In a real fit (3 epochs of 4 optimizer steps), the epoch the masking and the EMA read from ``progress`` is
    the trainer's current epoch at every step: the ramps step exactly at epoch boundaries."""
    from torch.utils.data import DataLoader

    from tests.factories import cpu_trainer

    masking = HardPatchMasking(ramp_every="epoch", epochs=3)
    target = _target(ramp_every="epoch", epochs=3)
    module = PretrainModule(encoder=tiny_encoder(), masking=masking, targets=[target], warmup_epochs=0, batch_size=2)
    seen: list[tuple[int, int, int]] = []  # (trainer epoch, masking epoch, EMA epoch)
    draw, after = module.draw_masks, target.after_step

    def draw_masks(batch, generator, inputs=None):
        seen.append((module.trainer.current_epoch, epoch_index(module.progress, 3), -1))
        return draw(batch, generator, inputs)

    def after_step(encoder, progress, **kw):
        epoch, mask_epoch, _ = seen[-1]
        seen[-1] = (epoch, mask_epoch, epoch_index(progress, 3))
        return after(encoder, progress, **kw)

    module.draw_masks = draw_masks  # type: ignore[method-assign]
    target.after_step = after_step  # type: ignore[method-assign]
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"image": x} for x in images], batch_size=2)  # 4 steps per epoch
    trainer = cpu_trainer(max_epochs=3, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=data)
    assert [s[0] for s in seen] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(s[0] == s[1] == s[2] for s in seen), seen


def test_teacher_is_saved_and_not_optimised(tmp_path: Path):
    encoder = tiny_encoder()
    module = PretrainModule(encoder=encoder, masking=HardPatchMasking(), targets=[_target()])
    keys = module.state_dict().keys()
    assert any(k.startswith("targets.0.teacher.module.encoder.vit.blocks") for k in keys)
    assert any(k.startswith("targets.0.teacher.module.loss_predictor") for k in keys)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert not any(".teacher." in n for n in trainable)


def test_hpm_step_has_no_host_syncs():
    """Scores, masks, both losses, backward and the EMA update: no .item()/.cpu()/nonzero/boolean indexing."""
    encoder = tiny_encoder()
    module = PretrainModule(encoder=encoder, masking=HardPatchMasking(), targets=[_target()])
    batch = {"image": torch.randn(4, 3, 16, 16)}
    gen = torch.Generator().manual_seed(0)
    with count_host_syncs() as syncs:
        masks = module.draw_masks(batch, gen)
        out = module.compute_losses(batch, masks)
        out["loss"].backward()
        module.target_list[0].after_step(module.encoder, 0.5)
    assert syncs.count == 0, syncs.calls


def test_hard_tokens_follow_teacher_scores_in_the_module():
    encoder = tiny_encoder()
    module = PretrainModule(encoder=encoder, masking=HardPatchMasking(), targets=[_target()])
    batch = {"image": torch.randn(8, 3, 16, 16)}
    scores = module.target_list[0].token_scores(batch, module.encoder)
    masking = module.masking
    masks = masking(
        8,
        encoder.grid,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        scores=scores,
        progress=1.0,
    )
    k = num_hard(16, masking.num_visible(16), masking.alpha(1.0))
    assert k == 6
    hardest = torch.topk(scores, k, dim=1).indices
    assert bool(masks.hidden.gather(1, hardest).all())


def test_validation_errors():
    with pytest.raises(ValueError, match="loss_predictor_loss"):
        HardPatchTarget(loss_predictor_loss="l1")
    with pytest.raises(ValueError, match="ema_momentum"):
        HardPatchTarget(ema_momentum=(0.9, 1.5))
    with pytest.raises(ValueError, match="ema_ramp"):
        HardPatchTarget(ema_ramp=2.0)
    with pytest.raises(ValueError, match="loss_predictor_weight"):
        HardPatchTarget(loss_predictor_weight=-1.0)
    with pytest.raises(ValueError, match="ramp_every"):
        HardPatchTarget(ramp_every="iteration")
    with pytest.raises(ValueError, match="epochs"):
        HardPatchTarget(ramp_every="epoch")
    with pytest.raises(ValueError, match="epochs"):
        HardPatchTarget(ramp_every="epoch", epochs=-1)


def test_production_recipe_ramps_per_epoch_as_the_official_code():
    """recipes/hpm: ramp_every=epoch in the masking and the target, with ``epochs`` = trainer.max_epochs (800)."""
    import yaml

    cfg = yaml.safe_load((RECIPES / "hpm" / "vit_b16_in1k.yaml").read_text())
    model = cfg["model"]["init_args"]
    masking, target = model["masking"]["init_args"], model["targets"][0]["init_args"]
    epochs = cfg["trainer"]["max_epochs"]
    assert epochs == 800
    assert (masking["ramp_every"], masking["epochs"]) == ("epoch", epochs)
    assert (target["ramp_every"], target["epochs"], target["ema_ramp"]) == ("epoch", epochs, 100 / 800)
    built = HardPatchTarget(**target)
    assert built.momentum(0.0) == 0.999 and built.momentum(50 / 800) == _official_decay(50)
    assert HardPatchMasking(**masking).alpha(799 / 800) == 0.5


@pytest.mark.usefixtures("fashion_mnist")
def test_hpm_debug_recipe_trains(tmp_path: Path):
    """recipes/debug/hpm_fashion_mnist.yaml end to end: finite losses, the teacher moves, masks follow its scores."""
    from mim.lightning_cli import build

    cli = build(
        [
            "--config",
            str(RECIPES / "debug" / "hpm_fashion_mnist.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=6",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
        ],
        save_config_callback=None,
    )
    target = cli.model.target_list[0]
    teacher0 = [p.clone() for p in target.teacher.parameters()]
    record = TrainMetricsRecorder()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seen = record.seen
    assert len(seen) == 6
    assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in seen)
    assert "train/hard_patch/loss_prediction" in seen[-1] and "train/hard_patch/reconstruction" in seen[-1]
    moved = sum(float((p - p0).abs().sum()) for p, p0 in zip(target.teacher.parameters(), teacher0))
    assert moved > 0, "the EMA teacher never moved"
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), map_location="cpu", weights_only=True)
    assert any(".teacher.module.loss_predictor" in k for k in ckpt["state_dict"])
