"""``PretrainModule(init_checkpoint=...)`` and ``lr_decay="linear"`` (the self-distillation recipes' further
pretraining), with real Lightning fits of the debug MAE model on Fashion-MNIST: a fit checkpoint initialises the
encoder and the decoder while the optimizer, step and schedule start fresh; a ``mim export`` file initialises the
encoder only; a checkpoint of another architecture is refused naming the file; the applied lr follows the linear
formula."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from mim.checkpoint import CheckpointError
from mim.masking import RandomMasking
from mim.models import MaskedEncoder
from mim.module import PretrainModule
from mim.targets import PixelTarget
from tests.factories import LossRecorder, cpu_trainer

pytestmark = pytest.mark.usefixtures("fashion_mnist")

DEBUG_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2}  # recipes/debug/mae_fashion_mnist.yaml


def mae_module(*, seed: int = 0, model_kwargs: dict[str, Any] | None = None, **overrides: Any) -> PretrainModule:
    """The debug MAE recipe's model (28 px grey, patch 4, 2 blocks of 64, a 1-block decoder of 32) built in Python."""
    torch.manual_seed(seed)
    encoder = MaskedEncoder(
        arch="vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, model_kwargs=model_kwargs or dict(DEBUG_VIT)
    )
    target = PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix=True)
    kwargs: dict[str, Any] = dict(lr=1e-3, warmup_steps=0, seed=0)
    kwargs.update(overrides)
    return PretrainModule(encoder=encoder, masking=RandomMasking(mask_ratio=0.75), targets=[target], **kwargs)


def data(**overrides: Any):
    from mim.data import FashionMNISTDataModule

    kwargs: dict[str, Any] = dict(batch_size=16, num_train=64, num_val=16)
    kwargs.update(overrides)
    return FashionMNISTDataModule(**kwargs)


def fit(module: PretrainModule, steps: int, *callbacks: L.Callback) -> L.Trainer:
    trainer = cpu_trainer(
        max_steps=steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0, callbacks=list(callbacks)
    )
    trainer.fit(module, datamodule=data())
    return trainer


class AtStart(L.Callback):
    """What the module and its optimizer hold when training starts (after configure_model / configure_optimizers)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if isinstance(v, torch.Tensor)}
        self.optimizer_state = dict(trainer.optimizers[0].state)
        self.global_step = trainer.global_step
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]


class AppliedLr(L.Callback):
    """The lr of every optimizer step, read before the step runs."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.fixture(scope="module")
def stage0(tmp_path_factory) -> Path:
    """A 2-step debug MAE fit, saved: the weights later runs start from."""
    module = mae_module(seed=0)
    trainer = fit(module, 2)
    path = tmp_path_factory.mktemp("stage0") / "stage0.ckpt"
    trainer.save_checkpoint(path)
    return path


def _file_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_a_fit_checkpoint_initialises_encoder_and_decoder_and_the_optimizer_starts_fresh(stage0: Path) -> None:
    saved = _file_state(stage0)
    module = mae_module(seed=1, init_checkpoint=str(stage0))  # other random weights, overwritten
    fresh = mae_module(seed=1)
    assert not torch.equal(fresh.encoder.vit.blocks[0].attn.qkv.weight, saved["encoder.vit.blocks.0.attn.qkv.weight"])
    start, losses = AtStart(), LossRecorder()
    trainer = fit(module, 2, start, losses)
    encoder_keys = [k for k in saved if k.startswith("encoder.")]
    decoder_keys = [k for k in saved if k.startswith("targets.0.")]
    assert encoder_keys and decoder_keys
    for key in encoder_keys + decoder_keys:
        assert torch.equal(start.state[key], saved[key]), key
    assert set(start.state) == set(saved)
    assert start.optimizer_state == {} and start.global_step == 0
    assert start.lr == pytest.approx(1e-3)  # the schedule's first value: no warmup, lr
    assert trainer.global_step == 2 and all(np.isfinite(losses.losses))
    assert not torch.equal(module.encoder.vit.blocks[0].attn.qkv.weight, saved["encoder.vit.blocks.0.attn.qkv.weight"])


def test_an_export_file_initialises_only_the_encoder(stage0: Path, tmp_path: Path) -> None:
    from mim.export import export_encoder

    exported = export_encoder(stage0, tmp_path / "encoder.safetensors")
    saved = _file_state(stage0)
    own = mae_module(seed=1).state_dict()  # the decoder this module builds itself
    start = AtStart()
    fit(mae_module(seed=1, init_checkpoint=str(exported)), 1, start)
    for key, value in saved.items():
        if key.startswith("encoder."):
            assert torch.equal(start.state[key], value), key
        elif key.startswith("targets.0.") and "pos_embed" not in key:  # the fixed sin-cos tables are equal anyway
            assert torch.equal(start.state[key], own[key]), key
            assert not torch.equal(start.state[key], value), key


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_file(stage0: Path) -> None:
    module = mae_module(model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}, init_checkpoint=str(stage0))
    with pytest.raises(CheckpointError, match=str(stage0.name)) as info:
        fit(module, 1)
    assert str(stage0) in str(info.value)
    deeper = mae_module(model_kwargs={"embed_dim": 64, "depth": 3, "num_heads": 2}, init_checkpoint=str(stage0))
    with pytest.raises(CheckpointError, match="missing"):
        fit(deeper, 1)


def test_a_missing_init_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.ckpt does not exist.*init_checkpoint null"):
        fit(mae_module(init_checkpoint=str(tmp_path / "nothing.ckpt")), 1)
    with pytest.raises(ValueError, match="PretrainModule.init_checkpoint"):
        mae_module(init_checkpoint=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("steps", "warmup", "lr", "min_lr", "start_lr"),
    [(8, 0, 1.5e-4, 0.0, 0.0), (8, 3, 1e-3, 1e-4, 1e-5)],  # the SD recipes' schedule; one with warmup and a floor
)
def test_linear_decay_applies_the_linear_formula(steps, warmup, lr, min_lr, start_lr) -> None:
    """Optimizer step k (0-based) runs at start + (lr - start) k / W during warmup, then
    min + (lr - min) (1 - (k - W) / (T - W)) (Hugging Face's get_linear_schedule_with_warmup, floored at min)."""
    applied = AppliedLr()
    module = mae_module(
        lr=lr, min_lr=min_lr, warmup_steps=warmup, warmup_start_lr=start_lr, lr_decay="linear", fused_optimizer=False
    )
    fit(module, steps, applied)
    expected = []
    for k in range(steps):
        if k < warmup:
            expected.append(start_lr + (lr - start_lr) * k / warmup)
        else:
            expected.append(min_lr + (lr - min_lr) * (1 - (k - warmup) / (steps - warmup)))
    assert applied.lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert applied.lrs[-1] == pytest.approx(min_lr + (lr - min_lr) / (steps - warmup))  # one step above the floor


def test_linear_decay_is_validated() -> None:
    with pytest.raises(ValueError, match="PretrainModule.lr_decay"):
        mae_module(lr_decay="step")  # type: ignore[arg-type]


def test_a_checkpoint_with_target_extra_state_initialises(stage0: Path, tmp_path: Path) -> None:
    """Start a self-distillation run from a self-distillation checkpoint: the teacher's provenance record
    (``targets.1._extra_state``) is no tensor and must be skipped, not compared by shape."""
    from mim.export import export_encoder
    from mim.targets import SelfDistillTarget

    teacher = export_encoder(stage0, tmp_path / "teacher.safetensors")

    def sd_module(seed: int = 0, **kw: Any) -> PretrainModule:
        mae = mae_module(seed=seed)
        sd = SelfDistillTarget(teacher_arch="vit_tiny_patch16_224", teacher_checkpoint=str(teacher))
        targets = [mae.targets[0], sd]
        return PretrainModule(encoder=mae.encoder, masking=mae.masking, targets=targets, lr=1e-3, warmup_steps=0, **kw)

    trainer = fit(sd_module(), 1)
    trainer.save_checkpoint(tmp_path / "sd.ckpt")
    start = AtStart()
    fit(sd_module(seed=1, init_checkpoint=str(tmp_path / "sd.ckpt")), 1, start)
    saved = _file_state(tmp_path / "sd.ckpt")
    assert torch.equal(start.state["encoder.vit.cls_token"], saved["encoder.vit.cls_token"])
