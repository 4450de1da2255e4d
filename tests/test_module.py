"""PretrainModule with a real Lightning Trainer on CPU: schedule, determinism, hooks and validation."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mim.masking import RandomMasking
from mim.models import MaskedEncoder
from mim.module import PretrainModule
from mim.targets import PixelTarget
from tests.factories import cpu_trainer, tiny_encoder
from tests.reference import warmup_cosine_epochs

IMG, PATCH = 16, 4  # 4 x 4 grid


class Images(Dataset):
    def __init__(self, n: int = 8, channels: int = 3, seed: int = 0) -> None:
        self.x = torch.randn(n, channels, IMG, IMG, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i]}


class RecordingMasking(RandomMasking):
    """RandomMasking that keeps every mask it draws (test-local: no contract needed)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.drawn: list[torch.Tensor] = []

    def __call__(self, *args, **kwargs):
        masks = super().__call__(*args, **kwargs)
        self.drawn.append(masks.visible.clone())
        return masks


class CountingPixelTarget(PixelTarget):
    """PixelTarget that records every ``after_step`` call (test-local: no contract needed)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[float] = []
        self.seen_cls: list[torch.Tensor] = []

    def after_step(self, encoder, progress: float) -> None:
        self.calls.append(progress)
        self.seen_cls.append(encoder.vit.cls_token.detach().clone())


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[tuple[int, int, float]] = []
        self.losses: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append((trainer.global_step, batch_idx, trainer.optimizers[0].param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def make_module(
    *, seed: int = 0, init_seed: int = 0, masking=None, target=None, in_chans: int = 3, **kwargs
) -> PretrainModule:
    encoder = tiny_encoder(
        seed=init_seed,
        img_size=IMG,
        patch_size=PATCH,
        in_chans=in_chans,
        model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2},
    )
    target = target or PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    masking = masking or RandomMasking(mask_ratio=0.75)
    kwargs.setdefault("batch_size", 2)
    return PretrainModule(encoder=encoder, masking=masking, targets=[target], seed=seed, **kwargs)


def fit(
    module: PretrainModule,
    *,
    accumulate: int = 1,
    max_epochs: int | None = 2,
    data_seed: int = 0,
    in_chans: int = 3,
    num_images: int = 8,
    callbacks=(),
    **trainer_kwargs,
) -> L.Trainer:
    trainer = cpu_trainer(
        max_epochs=max_epochs,
        accumulate_grad_batches=accumulate,
        **trainer_kwargs,
        callbacks=list(callbacks),
        deterministic=True,
    )
    loader = DataLoader(Images(num_images, in_chans, data_seed), batch_size=2, shuffle=False)
    trainer.fit(module, loader)
    return trainer


# ---------------------------------------------------------------------- learning-rate schedule
@pytest.mark.parametrize("accumulate", [1, 2])
def test_applied_lr_follows_warmup_cosine(accumulate: int) -> None:
    blr, batch, epochs = 0.05, 2, 3
    module = make_module(blr=blr, warmup_epochs=1.0, min_lr=1e-4)
    rec = Recorder()
    trainer = fit(module, accumulate=accumulate, max_epochs=epochs, callbacks=[rec])
    steps_per_epoch = 4 // accumulate  # 8 images / batch 2 = 4 micro-batches per epoch
    assert trainer.global_step == epochs * steps_per_epoch
    base = blr * batch * accumulate / 256  # blr * effective batch / 256, one device
    assert len(rec.lrs) == epochs * 4
    for i, (step, _, lr) in enumerate(rec.lrs):
        assert step == i // accumulate, "the optimizer stepped at the wrong micro-batch"
        expected = warmup_cosine_epochs(
            step, iters_per_epoch=steps_per_epoch, warmup_epochs=1.0, epochs=epochs, base=base, min_lr=1e-4
        )
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-15), f"micro-batch {i} (optimizer step {step})"
    # the lr is constant within an accumulation group and changes between groups
    per_step = [lr for _, _, lr in rec.lrs][::accumulate]
    assert len(set(per_step)) == len(per_step)
    assert rec.lrs[0][2] == 0.0


@pytest.mark.parametrize(
    ("num_images", "accumulate", "max_epochs", "max_steps"),
    [(8, 1, None, 6), (8, 1, 100, 6), (10, 2, None, 7), (10, 2, 2, -1)],
)
def test_warmup_epochs_are_loader_epochs(num_images: int, accumulate: int, max_epochs, max_steps: int) -> None:
    """``warmup_epochs`` counts passes over the loader, also when ``max_steps`` ends the run first.

    Lightning steps on the partial accumulation group at the end of an epoch, so an epoch is
    ceil(batches / accumulate) optimizer steps; e = step / that (as in facebookresearch/mae util/lr_sched.py).
    """
    blr, warmup_epochs = 0.05, 1.0
    module = make_module(blr=blr, warmup_epochs=warmup_epochs)
    rec = Recorder()
    trainer = fit(
        module,
        accumulate=accumulate,
        max_epochs=max_epochs,
        max_steps=max_steps,
        num_images=num_images,
        callbacks=[rec],
    )
    steps_per_epoch = math.ceil(num_images // 2 / accumulate)
    total = trainer.global_step
    assert total == (max_steps if max_steps > 0 else max_epochs * steps_per_epoch)
    base = blr * 2 * accumulate / 256
    steps = sorted({step for step, _, _ in rec.lrs})
    assert steps == list(range(total))
    for step, _, lr in rec.lrs:
        expected = warmup_cosine_epochs(
            step,
            iters_per_epoch=steps_per_epoch,
            warmup_epochs=warmup_epochs,
            epochs=total / steps_per_epoch,
            base=base,
        )
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-15), f"optimizer step {step}"


def test_absolute_lr_overrides_blr() -> None:
    module = make_module(blr=0.05, lr=0.01, warmup_steps=0)
    rec = Recorder()
    fit(module, max_epochs=1, callbacks=[rec])
    assert rec.lrs[0][2] == pytest.approx(0.01)  # no warmup: step 0 runs at the base lr
    expected = warmup_cosine_epochs(2, iters_per_epoch=4, warmup_epochs=0.0, epochs=1, base=0.01)
    assert rec.lrs[2][2] == pytest.approx(expected)


@pytest.mark.parametrize("decay_special", [True, False])
def test_optimizer_groups_in_module(decay_special: bool) -> None:
    module = make_module(decay_special_tokens=decay_special, weight_decay=0.05)
    trainer = fit(module, max_epochs=1)
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert "encoder.vit.pos_embed" not in wd and "targets.0.decoder.decoder_pos_embed" not in wd
    assert wd["encoder.vit.blocks.0.norm1.weight"] == 0.0 and wd["encoder.vit.blocks.0.attn.qkv.bias"] == 0.0
    assert wd["encoder.vit.blocks.0.attn.qkv.weight"] == 0.05
    special = 0.05 if decay_special else 0.0
    assert wd["encoder.vit.cls_token"] == special and wd["targets.0.decoder.mask_token"] == special
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(wd) == trainable


# ---------------------------------------------------------------------- determinism
def test_runs_with_same_seed_are_bit_identical() -> None:
    runs = []
    for _ in range(2):
        masking, rec = RecordingMasking(mask_ratio=0.75), Recorder()
        fit(make_module(seed=7, masking=masking, warmup_epochs=0.5, blr=0.05), accumulate=2, callbacks=[rec])
        runs.append((masking.drawn, rec.losses))
    (masks_a, losses_a), (masks_b, losses_b) = runs
    assert len(losses_a) == 8
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b, strict=True)), "losses differ between runs"
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b, strict=True))
    assert len({tuple(m.flatten().tolist()) for m in masks_a}) == len(masks_a), "a mask repeated across steps"


def test_masks_depend_only_on_seed_and_step() -> None:
    """Same (seed, step): same masks whatever the data and the weights; another seed: other masks."""
    drawn = {}
    for key, seed, init_seed, data_seed in [("a", 3, 0, 0), ("b", 3, 1, 5), ("c", 4, 0, 0)]:
        masking = RecordingMasking(mask_ratio=0.75)
        fit(
            make_module(seed=seed, init_seed=init_seed, masking=masking),
            accumulate=2,
            max_epochs=1,
            data_seed=data_seed,
        )
        drawn[key] = masking.drawn
    assert len(drawn["a"]) == 4
    assert all(torch.equal(x, y) for x, y in zip(drawn["a"], drawn["b"], strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(drawn["a"], drawn["c"], strict=True))
    # the two micro-batches of one accumulation group get different masks
    assert not torch.equal(drawn["a"][0], drawn["a"][1])


# ---------------------------------------------------------------------- hooks
def test_after_step_called_once_per_optimizer_step() -> None:
    target = CountingPixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    module = make_module(target=target, blr=0.05, warmup_steps=0)
    initial_cls = module.encoder.vit.cls_token.detach().clone()
    trainer = fit(module, accumulate=2, max_epochs=2)
    assert trainer.global_step == 4
    assert len(target.calls) == 4, f"after_step called {len(target.calls)} times for 4 optimizer steps"
    # progress advances by exactly one step's share of training per call
    steps = [p * 4 for p in target.calls]
    assert all(0.0 <= p <= 1.0 for p in target.calls)
    assert [b - a for a, b in zip(steps, steps[1:])] == pytest.approx([1.0, 1.0, 1.0])
    # the hook runs after the weights were updated (what an EMA update needs)
    assert not torch.equal(target.seen_cls[0], initial_cls)
    assert torch.equal(target.seen_cls[-1], module.encoder.vit.cls_token.detach())
    assert all(not torch.equal(a, b) for a, b in zip(target.seen_cls, target.seen_cls[1:]))


# ---------------------------------------------------------------------- validation
def test_empty_targets_rejected() -> None:
    encoder = MaskedEncoder(arch="vit_tiny_patch16_224", img_size=IMG, patch_size=PATCH, model_kwargs={"depth": 1})
    with pytest.raises(ValueError, match="targets"):
        PretrainModule(encoder=encoder, masking=RandomMasking(), targets=[])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"blr": -1e-3}, "blr"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"min_lr": -1.0}, "min_lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"warmup_epochs": -1.0}, "warmup_epochs"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_invalid_hyperparameters_rejected(kwargs, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make_module(**kwargs)


def test_missing_batch_size_reported() -> None:
    module = make_module(batch_size=None)
    with pytest.raises(ValueError, match="batch_size"):
        fit(module, max_epochs=1)


def test_targets_bound_to_encoder() -> None:
    module = make_module(in_chans=1)
    decoder = module.targets[0].decoder
    assert decoder is not None and decoder.decoder_pred.out_features == PATCH * PATCH * 1
    assert module.target_names == ["pixel"]


def test_run_without_end_is_a_clear_error() -> None:
    module = PretrainModule(
        encoder=tiny_encoder(
            seed=None, img_size=IMG, patch_size=PATCH, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}
        ),
        masking=RandomMasking(mask_ratio=0.75),
        targets=[PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)],
        batch_size=4,
    )
    trainer = cpu_trainer(max_epochs=-1, max_steps=-1)
    with pytest.raises(ValueError, match="max_epochs or trainer.max_steps"):
        trainer.fit(module, DataLoader(Images(8), batch_size=4))


def test_ijepa_schedules_warmup_start_and_weight_decay() -> None:
    """I-JEPA: lr warms up from warmup_start_lr (not 0); weight decay rises on a cosine
    (facebookresearch/ijepa src/utils/schedulers.py)."""
    from mim.optim import cosine_anneal

    module = make_module(
        lr=1e-2, warmup_start_lr=2e-3, warmup_steps=4, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.4
    )

    class WD(L.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, float, float, float]] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            decay, no_decay = optimizer.param_groups
            self.seen.append((trainer.global_step, decay["lr"], decay["weight_decay"], no_decay["weight_decay"]))

    rec = WD()
    trainer = fit(module, max_epochs=3, callbacks=[rec])
    total = trainer.global_step
    assert total == 12 and len(rec.seen) == 12
    for step, lr, wd, wd_no in rec.seen:
        assert wd == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * step / total)))
        assert wd == pytest.approx(cosine_anneal(step, total_steps=total, start=0.04, end=0.4))
        assert wd_no == 0.0  # biases and norms stay undecayed
        if step < 4:
            assert lr == pytest.approx(2e-3 + (1e-2 - 2e-3) * step / 4)
    assert rec.seen[0][1] == pytest.approx(2e-3) and rec.seen[0][2] == pytest.approx(0.04)
    assert rec.seen[-1][2] > 0.39
