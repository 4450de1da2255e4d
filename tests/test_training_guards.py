"""No silently wrong training: the guards of PretrainModule and FinetuneModule, with a real Lightning Trainer on CPU.

A warmup longer than the run is clipped with a warning; LightningCLI's ``--optimizer`` is refused; data that the encoder
cannot read is refused before the first step; an optimizer step with a non-finite loss or gradient is skipped (weights
and optimizer state unchanged), counted, and stops the run after ``max_nonfinite_steps`` in a row; torch's global
generators are reseeded per step, so drop path replays on resume.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mim.checks import DataMismatchError
from mim.finetune import FinetuneModule
from mim.masking import RandomMasking
from mim.module import PretrainModule
from mim.optim import NonFiniteGuard, NonFiniteStepError, clip_warmup
from mim.targets import LatentTarget, PixelTarget
from tests.factories import TINY_VIT, LossRecorder, cpu_trainer, tiny_encoder


class _Images(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class TensorImages(L.LightningDataModule):
    """Fixed float images in memory, in order (no shuffle, no augmentation), with the attributes mim's image
    datamodules announce (``in_chans``, ``image_size``, ``num_classes``, ``batch_size``).

    Args:
        num_images: samples in the training set.
        in_chans: channels of the images.
        image_size: side of the square images.
        batch_size: samples per step.
        nan_at: indices of samples whose pixels are all NaN (sample ``i`` is in batch ``i // batch_size``).
    """

    def __init__(
        self,
        *,
        num_images: int = 8,
        in_chans: int = 3,
        image_size: int = 16,
        batch_size: int = 2,
        nan_at: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.in_chans, self.image_size, self.batch_size, self.num_classes = in_chans, image_size, batch_size, 2
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(num_images, in_chans, image_size, image_size, generator=g)  # (N, C, S, S)
        self.images[list(nan_at or [])] = float("nan")
        self.labels = torch.arange(num_images) % 2  # (N,)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Images(self.images, self.labels), batch_size=self.batch_size, shuffle=False)


def _encoder(in_chans: int = 3, drop_path_rate: float = 0.0) -> Any:
    """``tiny_encoder``; with drop path, 2 blocks (timm's per-block rates run from 0: one block would get none)."""
    if drop_path_rate == 0:
        return tiny_encoder(in_chans=in_chans)
    blocks = {**TINY_VIT, "depth": 2}
    return tiny_encoder(in_chans=in_chans, drop_path_rate=drop_path_rate, model_kwargs=blocks)


def pretrain_module(*, in_chans: int = 3, drop_path_rate: float = 0.0, **kwargs: Any) -> PretrainModule:
    """A tiny MAE (16 x 16 images, patches of 4) at lr 1e-3 without warmup unless ``kwargs`` say otherwise."""
    encoder = _encoder(in_chans, drop_path_rate)
    target = PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    kwargs = {"lr": 1e-3, "warmup_steps": 0, **kwargs}
    return PretrainModule(encoder=encoder, masking=RandomMasking(mask_ratio=0.75), targets=[target], **kwargs)


def finetune_module(**kwargs: Any) -> FinetuneModule:
    """A tiny classifier at lr 1e-3, no warmup, Mixup, CutMix or erasing unless ``kwargs`` say otherwise."""
    encoder = _encoder(drop_path_rate=kwargs.pop("drop_path_rate", 0.0))
    kwargs = {"lr": 1e-3, "warmup_steps": 0, "mixup": 0.0, "cutmix": 0.0, "random_erasing": 0.0, **kwargs}
    return FinetuneModule(encoder=encoder, **kwargs)


def _state_equal(a: dict, b: dict) -> bool:
    """Equal optimizer ``state_dict()["state"]`` entries (tensors compared exactly)."""
    if a.keys() != b.keys():
        return False
    for key in a:
        if a[key].keys() != b[key].keys():
            return False
        for name, value in a[key].items():
            other = b[key][name]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            if not same:
                return False
    return True


class StepWatcher(L.Callback):
    """Per training batch: did the weights change, did the optimizer state change, and the lr it ran at."""

    def __init__(self) -> None:
        self.weights_changed: list[bool] = []
        self.state_changed: list[bool] = []
        self.lrs: list[float] = []

    @staticmethod
    def _state(trainer: L.Trainer) -> dict:
        state = trainer.optimizers[0].state_dict()["state"]
        return {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()} for k, s in state.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self._opt_state = self._state(trainer)
        self.lrs.append(trainer.optimizers[0].param_groups[-1]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = dict(pl_module.named_parameters())
        self.weights_changed.append(any(not torch.equal(params[n], w) for n, w in self._weights.items()))
        self.state_changed.append(not _state_equal(self._opt_state, self._state(trainer)))


def _fit(module: L.LightningModule, data: L.LightningDataModule, **trainer_kwargs: Any) -> L.Trainer:
    trainer = cpu_trainer(**{"max_steps": 4, **trainer_kwargs})
    trainer.fit(module, datamodule=data)
    return trainer


# ---------------------------------------------------------------------------------------------- warmup
def test_clip_warmup_keeps_a_warmup_that_fits_and_clips_one_that_does_not() -> None:
    assert clip_warmup("M", 3, 4, source="warmup_steps=3") == (3, None)
    assert clip_warmup("M", 4, 4, source="s")[0] == 3  # 4 steps of warmup in a 4-step run: the lr never arrives
    clipped, text = clip_warmup("PretrainModule", 1600, 1, source="warmup_epochs=40 x 40 steps per epoch")
    assert clipped == 0
    assert text == (
        "PretrainModule: warmup (1600 optimizer steps from warmup_epochs=40 x 40 steps per epoch) is not shorter than "
        "the run (1 optimizer step), so the lr would never reach its target; clipped to 0 steps (the last step runs "
        "at the target lr). For the recipe's schedule, run it to its end (trainer.max_epochs / max_steps) or set a "
        "shorter warmup_epochs or warmup_steps"
    )


def test_pretrain_warmup_longer_than_the_run_is_clipped_with_a_warning() -> None:
    """40 warmup epochs of 4 steps in a 3-step run: clipped to 2, so the last step runs at the target lr."""
    module = pretrain_module(lr=0.01, warmup_steps=None, warmup_epochs=40.0)
    watcher = StepWatcher()
    with pytest.warns(UserWarning) as record:
        _fit(module, TensorImages(), max_steps=3, callbacks=[watcher])
    texts = [str(w.message) for w in record if "warmup" in str(w.message)]
    assert texts == [
        "PretrainModule: warmup (160 optimizer steps from warmup_epochs=40 x 4 steps per epoch) is not shorter than "
        "the run (3 optimizer steps), so the lr would never reach its target; clipped to 2 steps (the last step runs "
        "at the target lr). For the recipe's schedule, run it to its end (trainer.max_epochs / max_steps) or set a "
        "shorter warmup_epochs or warmup_steps"
    ]
    assert watcher.lrs == pytest.approx([0.0, 0.005, 0.01], rel=1e-12)


def test_finetune_warmup_longer_than_the_run_is_clipped_with_a_warning() -> None:
    module = finetune_module(lr=0.01, warmup_steps=10, layer_decay=1.0, min_lr=0.0)
    watcher = StepWatcher()
    with pytest.warns(UserWarning, match=re.escape("FinetuneModule: warmup (10 optimizer steps from warmup_steps=10)")):
        _fit(module, TensorImages(), max_steps=3, callbacks=[watcher])
    assert watcher.lrs == pytest.approx([0.0, 0.005, 0.01], rel=1e-12)


# ---------------------------------------------------------------------------------------------- CLI optimizer
def _recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
model:
  class_path: mim.PretrainModule
  init_args:
    encoder:
      class_path: mim.models.MaskedEncoder
      init_args:
        arch: vit_tiny_patch16_224
        img_size: 16
        patch_size: 4
        in_chans: 3
        model_kwargs: {{embed_dim: 32, depth: 1, num_heads: 2}}
    masking:
      class_path: mim.masking.RandomMasking
      init_args: {{mask_ratio: 0.75}}
    targets:
      - class_path: mim.targets.PixelTarget
        init_args: {{decoder_dim: 16, decoder_depth: 1, decoder_num_heads: 2}}
data:
  class_path: tests.test_training_guards.TensorImages
"""
    )
    return recipe


def test_cli_optimizer_override_is_refused(tmp_path: Path) -> None:
    """`--optimizer torch.optim.SGD --optimizer.lr 0.1` would drop the lr scaling, warmup and cosine: refused."""
    from mim.lightning_cli import UserInputError, run

    recipe = str(_recipe(tmp_path))
    with pytest.raises((ValueError, UserInputError)) as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightningCLI warns that it overrides configure_optimizers
        run(["fit", "-c", recipe, "--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"])
    text = str(error.value)
    assert text.startswith(  # mim.lightning_cli.run may turn the ValueError into a UserInputError (one paragraph)
        "PretrainModule.configure_optimizers was replaced by LightningCLI's --optimizer / --lr_scheduler"
    )
    assert "set PretrainModule's own arguments instead: model.init_args.lr or blr" in text
    assert not list(tmp_path.rglob("*.ckpt"))


def test_finetune_refuses_a_replaced_configure_optimizers() -> None:
    """What LightningCLI does (an instance attribute over the method), on FinetuneModule."""
    module = finetune_module()
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)  # type: ignore[method-assign]
    watcher = StepWatcher()
    with pytest.raises(ValueError, match=r"^FinetuneModule.configure_optimizers was replaced by LightningCLI"):
        _fit(module, TensorImages(), callbacks=[watcher])
    assert watcher.lrs == []


# ---------------------------------------------------------------------------------------------- data vs encoder
@pytest.mark.parametrize(
    ("encoder_kwargs", "data_kwargs", "message"),
    [
        (
            {"in_chans": 1},
            {"in_chans": 3},
            "MaskedEncoder.in_chans=1 but TensorImages yields 3-channel images: set "
            "model.init_args.encoder.init_args.in_chans=3 or data.init_args.in_chans=1",
        ),
        (
            {},
            {"image_size": 28},
            "MaskedEncoder.img_size=(16, 16) but TensorImages yields 28 x 28 images: set "
            "model.init_args.encoder.init_args.img_size=28 or data.init_args.image_size=16",
        ),
    ],
)
def test_pretrain_refuses_data_the_encoder_cannot_read_before_any_step(
    encoder_kwargs: dict, data_kwargs: dict, message: str
) -> None:
    module = pretrain_module(**encoder_kwargs)
    watcher = StepWatcher()
    trainer = cpu_trainer(max_steps=2, callbacks=[watcher])
    with pytest.raises(DataMismatchError) as error:
        trainer.fit(module, datamodule=TensorImages(**data_kwargs))
    assert str(error.value) == message
    assert watcher.lrs == [] and trainer.global_step == 0  # refused before the first batch, not by a conv error


def test_finetune_refuses_data_the_encoder_cannot_read_before_any_step() -> None:
    watcher = StepWatcher()
    with pytest.raises(DataMismatchError) as error:
        _fit(finetune_module(), TensorImages(image_size=28), callbacks=[watcher])
    assert str(error.value) == (
        "MaskedEncoder.img_size=(16, 16) but TensorImages yields 28 x 28 images: set model.init_args.img_size=28 or "
        "data.init_args.image_size=16"
    )
    assert watcher.lrs == []


# ---------------------------------------------------------------------------------------------- non-finite steps
def _nonfinite_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "non-finite" in str(w.message)]


def _precision(precision: str) -> dict[str, Any]:
    """Trainer arguments for ``precision``; fp16 AMP with a GradScaler on CPU needs the plugin spelled out (Lightning
    turns ``16-mixed`` on CPU into ``bf16-mixed``)."""
    if precision != "16-mixed":
        return {"precision": precision}
    from lightning.pytorch.plugins import MixedPrecision

    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}


@pytest.mark.parametrize(
    ("precision", "fused"), [("32-true", True), ("32-true", False), ("bf16-mixed", True), ("16-mixed", True)]
)
def test_nonfinite_steps_are_skipped_counted_and_warned_once(precision: str, fused: bool) -> None:
    """NaN images in batches 1 and 3: those steps change neither the weights nor the optimizer state; the others do.

    Skipped on the device by the fused AdamW (no host sync), or on the host (foreach AdamW, and 16-mixed's scaler)."""
    module = pretrain_module(fused_optimizer=fused)
    watcher = StepWatcher()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        data = TensorImages(nan_at=[2, 7])
        trainer = _fit(module, data, max_steps=4, callbacks=[watcher], **_precision(precision))
    assert watcher.weights_changed == [True, False, True, False]
    assert watcher.state_changed == [True, False, True, False]
    assert trainer.global_step == 4
    assert module.guard.total == 2 and module.guard.consecutive == 1
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 2.0
    optimizer = trainer.optimizers[0]
    assert {float(s["step"]) for s in optimizer.state.values()} == {2.0}  # AdamW stepped twice
    assert all(torch.isfinite(p).all() for p in module.parameters())
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if precision == "16-mixed":  # the guard skipped the NaN steps itself: the GradScaler never saw an overflow
        assert scaler is not None and scaler.get_scale() == 2.0**16
    assert _nonfinite_warnings(record) == [
        "PretrainModule: non-finite loss or gradients at optimizer step 1: the step is skipped (weights and optimizer "
        "state unchanged); skipped steps are counted in train/nonfinite_steps and 5 in a row stop the run "
        "(max_nonfinite_steps). Warned once"
    ]


def test_nonfinite_micro_batch_skips_its_accumulation_group() -> None:
    """With 2 micro-batches per step, a NaN in the first micro-batch of step 1 skips step 1."""
    module = pretrain_module(batch_size=2)
    watcher = StepWatcher()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _fit(module, TensorImages(nan_at=[4]), max_steps=2, accumulate_grad_batches=2, callbacks=[watcher])
    # micro-batches 0, 1 (step 0), 2 (NaN), 3 (step 1): the weights change only at the end of step 0
    assert watcher.weights_changed == [False, True, False, False]
    assert module.guard.total == 1 and trainer.global_step == 2


@pytest.mark.parametrize("fused", [True, False])
def test_consecutive_nonfinite_steps_stop_the_run(fused: bool) -> None:
    """On the host (foreach AdamW) the run stops inside step 2; on the device (fused) the counts are read a step late:
    inside step 3, before its weights change."""
    module = pretrain_module(max_nonfinite_steps=2, fused_optimizer=fused)
    watcher = StepWatcher()
    with pytest.raises(NonFiniteStepError) as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(module, TensorImages(nan_at=[2, 4]), max_steps=4, callbacks=[watcher])
    assert str(error.value) == (
        "PretrainModule: 2 optimizer steps in a row with a non-finite loss or gradients, the last at step 2 (2 skipped "
        "in all; max_nonfinite_steps=2); stopping. Try: lower the lr (blr / lr) or lengthen the warmup, train in "
        "bf16-mixed rather than 16-mixed, clip gradients (trainer.gradient_clip_val=1.0), or check the data for NaN / "
        "inf values"
    )
    assert watcher.weights_changed == ([True, False, False] if fused else [True, False])
    assert isinstance(error.value, RuntimeError)


def test_raise_mode_stops_at_the_first_nonfinite_step_and_off_mode_lets_it_through() -> None:
    with pytest.raises(NonFiniteStepError, match=r"^PretrainModule: non-finite loss or gradients at optimizer step 1 "):
        _fit(pretrain_module(nonfinite="raise"), TensorImages(nan_at=[2]), max_steps=3)
    module = pretrain_module(nonfinite="off")
    _fit(module, TensorImages(nan_at=[2]), max_steps=2)
    assert torch.isnan(module.encoder.vit.cls_token).all()  # unguarded: the NaN reached the weights


@pytest.mark.parametrize("fused", [True, False])
def test_skipped_steps_leave_ema_targets_unchanged(fused: bool) -> None:
    """I-JEPA's EMA target encoder: no EMA update after a skipped step, also when the skip is decided on the device."""
    encoder = tiny_encoder(model_kwargs={**TINY_VIT, "class_token": False, "global_pool": "avg"})
    target = LatentTarget(predictor_dim=16, predictor_depth=1, monitor_every=100)
    module = PretrainModule(
        encoder=encoder,
        masking=RandomMasking(mask_ratio=0.75),
        targets=[target],
        lr=1e-3,
        warmup_steps=0,
        fused_optimizer=fused,
    )
    watcher = StepWatcher()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(module, TensorImages(nan_at=[2]), max_steps=3, callbacks=[watcher])
    assert watcher.weights_changed == [True, False, True]  # the EMA copy's parameters included
    assert module.guard.total == 1


@pytest.mark.parametrize("fused", [True, False])
def test_finetune_ema_skips_with_the_step(fused: bool) -> None:
    module = finetune_module(ema_decay=0.5, fused_optimizer=fused)
    watcher = StepWatcher()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(module, TensorImages(nan_at=[5]), max_steps=4, callbacks=[watcher])
    assert watcher.weights_changed == [True, True, False, True]


def test_finetune_skips_nonfinite_steps() -> None:
    module = finetune_module()
    watcher = StepWatcher()
    with pytest.warns(UserWarning, match="FinetuneModule: non-finite loss or gradients at optimizer step 2"):
        trainer = _fit(module, TensorImages(nan_at=[5]), max_steps=4, callbacks=[watcher])
    assert watcher.weights_changed == [True, True, False, True]
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nonfinite": "ignore"}, "PretrainModule.nonfinite must be one of ('skip', 'raise', 'off'), got 'ignore'"),
        ({"max_nonfinite_steps": 0}, "PretrainModule.max_nonfinite_steps must be an integer >= 1, got 0"),
    ],
)
def test_nonfinite_arguments_are_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        pretrain_module(**kwargs)
    with pytest.raises(ValueError, match=re.escape(message.replace("PretrainModule", "FinetuneModule"))):
        finetune_module(**kwargs)


def test_guard_counters_survive_a_checkpoint() -> None:
    guard = NonFiniteGuard("M", max_consecutive=3)
    assert guard.record(False, 7, warn=lambda text: None) is False
    other = NonFiniteGuard("M")
    other.load_state_dict(guard.state_dict())
    assert (other.total, other.consecutive) == (1, 1)


# ---------------------------------------------------------------------------------------------- global RNG per step
def test_drop_path_replays_with_the_same_seed_and_on_resume(tmp_path: Path) -> None:
    """Drop path draws from torch's global generator, reseeded per step: a run resumed from the checkpoint of its
    first epoch continues bit-identically, whatever the global generator held before the resumed fit."""

    def run(epochs: int, ckpt: Path | None = None, seed: int = 3) -> tuple[list[float], PretrainModule, L.Trainer]:
        module = pretrain_module(drop_path_rate=0.5, seed=seed, lr=1e-2, min_lr=1e-2)  # a constant lr: 1 or 2 epochs
        recorder = LossRecorder()
        trainer = cpu_trainer(max_epochs=epochs, callbacks=[recorder])
        torch.manual_seed(1234)  # a fresh process's global generator: what the reseeding makes irrelevant
        trainer.fit(module, datamodule=TensorImages(), ckpt_path=None if ckpt is None else str(ckpt))
        return recorder.losses, module, trainer

    full, _, _ = run(2)
    assert len(full) == 8
    again, _, _ = run(2)
    assert again == full  # bit-identical floats
    other_seed, _, _ = run(1, seed=4)
    assert other_seed != full[:4]
    first, _, trainer = run(1)
    assert first == full[:4]
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _, _ = run(2, ckpt=tmp_path / "epoch1.ckpt")
    assert resumed == full[4:]


def test_finetune_drop_path_replays_on_resume(tmp_path: Path) -> None:
    def run(epochs: int, ckpt: Path | None = None) -> tuple[list[float], L.Trainer]:
        module = finetune_module(drop_path_rate=0.5, seed=3, lr=1e-2, min_lr=1e-2)
        recorder = LossRecorder()
        trainer = cpu_trainer(max_epochs=epochs, callbacks=[recorder])
        torch.manual_seed(1234)
        trainer.fit(module, datamodule=TensorImages(), ckpt_path=None if ckpt is None else str(ckpt))
        return recorder.losses, trainer

    full, _ = run(2)
    first, trainer = run(1)
    assert first == full[:4]
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = run(2, ckpt=tmp_path / "epoch1.ckpt")
    assert resumed == full[4:]
