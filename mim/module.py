"""PretrainModule: an encoder, a masking strategy and one or more targets, trained with Lightning.

One step (docs/architecture.md, "One training step"): draw masks -> encode the visible tokens once -> every target
computes its loss from the shared latent -> weighted sum -> optimizer step -> ``target.after_step`` (EMA and the like).
"""

from __future__ import annotations

import math
import re
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from mim.checks import check_int, check_range, invalid
from mim.masking.base import MaskingStrategy
from mim.models.base import Encoder
from mim.optim import cosine_anneal, param_groups, scaled_lr, warmup_cosine
from mim.targets.base import Target
from mim.types import Batch, Masks, step_seed

__all__ = ["PretrainModule", "built_by_lightning_cli", "step_seed"]


def built_by_lightning_cli() -> bool:
    """True while LightningCLI constructs a module: it then hands the recipe's plain config over as hyperparameters."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - another Lightning: keep the plain arguments only
        return False
    return _given_hyperparameters.get() is not None


def _target_names(targets: list[Target]) -> list[str]:
    names: list[str] = []
    for t in targets:
        base = re.sub(r"(?<!^)(?=[A-Z])", "_", type(t).__name__.removesuffix("Target")).lower() or "target"
        name, i = base, 1
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


class PretrainModule(L.LightningModule):
    """Masked pretraining: ``masking`` decides where to hide, ``targets`` what to predict.

    Args:
        encoder: the encoder over visible tokens.
        masking: the masking strategy.
        targets: one or more targets; the loss is ``sum(target.weight * target_loss)``.
        blr: base learning rate; the lr is ``blr * effective_batch / 256`` (MAE: 1.5e-4).
        lr: absolute learning rate; overrides ``blr`` scaling when set.
        weight_decay: AdamW weight decay (MAE: 0.05); with ``weight_decay_end`` the value at the first step.
        weight_decay_end: when set, the weight decay follows a half-cosine from ``weight_decay`` to this value over
            training, updated every optimizer step (I-JEPA: 0.04 -> 0.4).
        betas: AdamW betas (MAE pretraining: (0.9, 0.95)).
        warmup_epochs: linear warmup length in epochs (MAE: 40); may be fractional.
        warmup_steps: warmup length in optimizer steps; overrides ``warmup_epochs`` when set.
        warmup_start_lr: learning rate at the first warmup step (MAE: 0; I-JEPA: 2e-4, rising to ``lr`` 1e-3).
        min_lr: final learning rate of the cosine schedule.
        decay_special_tokens: apply weight decay to cls / mask tokens (official MAE: True).
        batch_size: per-device batch size for lr scaling; default: the datamodule's ``batch_size``.
        seed: seed of the mask generator; masks depend only on (seed, step, rank, micro-batch).
    """

    def __init__(
        self,
        *,
        encoder: Encoder,
        masking: MaskingStrategy,
        targets: list[Target],
        blr: float = 1.5e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        weight_decay_end: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40.0,
        warmup_steps: int | None = None,
        warmup_start_lr: float = 0.0,
        min_lr: float = 0.0,
        decay_special_tokens: bool = True,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not targets:
            raise ValueError("PretrainModule.targets must hold at least one Target, got []")
        checks = [
            ("blr", blr),
            ("weight_decay", weight_decay),
            ("min_lr", min_lr),
            ("warmup_start_lr", warmup_start_lr),
        ]
        if weight_decay_end is not None:
            checks.append(("weight_decay_end", weight_decay_end))
        owner = "PretrainModule"
        for field, value in checks:
            check_range(owner, field, value, 0, math.inf)
        if lr is not None:
            check_range(owner, "lr", lr, 0, math.inf, low_open=True)
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise invalid(owner, "betas", "two numbers in [0, 1)", betas)
        check_range(owner, "warmup_epochs", warmup_epochs, 0, math.inf)
        if warmup_steps is not None:
            check_int(owner, "warmup_steps", warmup_steps, minimum=0)
        if batch_size is not None:
            check_int(owner, "batch_size", batch_size)
        # Under LightningCLI the hyperparameters are the recipe's plain config (every class_path and init_args), which
        # mim.load and load_from_checkpoint rebuild the module from; built in Python, the parts are objects: not saved.
        self.save_hyperparameters(ignore=["encoder", "masking", "targets"] if not built_by_lightning_cli() else [])
        self.seed, self.batch_size = seed, batch_size
        self.encoder = encoder
        self.masking: MaskingStrategy = masking
        self.targets = nn.ModuleList(targets)
        self.target_names = _target_names(targets)
        self._bound = False
        if encoder.is_configured:  # a table encoder may wait for the datamodule's schema
            self._bind_targets()
        self._generator: torch.Generator | None = None
        self._total_steps = 1

    def _bind_targets(self) -> None:
        for target in self.target_list:
            target.bind(self.encoder)
        self._bound = True

    def configure_model(self) -> None:
        """Lightning hook: finish data-dependent construction before optimizers and distributed wrappers.

        Under FSDP2 (``ModelParallelStrategy``, which sets a device mesh) the module is then sharded in place,
        EMA copies included (:func:`mim.distributed.apply_fsdp2`).
        """
        self.configure_data(getattr(self._trainer, "datamodule", None) if self._trainer is not None else None)
        from mim.distributed import shard_if_fsdp2

        shard_if_fsdp2(self)

    def configure_data(self, datamodule: Any) -> None:
        """Build what depends on the data (a table encoder's tokenizer), then the targets' heads (once)."""
        if self._bound:
            return
        self.encoder.configure_data(datamodule)
        self._bind_targets()

    # ------------------------------------------------------------------ helpers
    @property
    def target_list(self) -> list[Target]:
        """The targets, typed (``self.targets`` is the ``nn.ModuleList`` that registers them)."""
        return [t for t in self.targets if isinstance(t, Target)]

    def generator(self, device: torch.device, *parts: int) -> torch.Generator:
        """The mask generator on ``device``, reseeded from (seed, *parts) without a host sync."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        self._generator.manual_seed(step_seed(self.seed, *parts))
        return self._generator

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        if self._trainer is None:
            return 0.0
        return min(1.0, self.trainer.global_step / max(1, self._total_steps))

    def inputs(self, batch: Batch) -> Tensor:
        """The encoder's input from the batch (``image`` (B, C, H, W) or ``video`` (B, C, T, H, W))."""
        return self.encoder.inputs(batch)

    def draw_masks(self, batch: Batch, generator: torch.Generator, inputs: Tensor | None = None) -> Masks:
        """Masks for one batch (scores from the targets when the strategy needs them)."""
        images = self.inputs(batch) if inputs is None else inputs
        scores = None
        if self.masking.needs_scores:
            found = [t.token_scores(batch, self.encoder) for t in self.target_list]
            scores = next((s for s in found if s is not None), None)
        return self.masking(
            images.shape[0],
            self.encoder.grid,
            generator=generator,
            device=images.device,
            scores=scores,
            progress=self.progress,
        )

    def compute_losses(self, batch: Batch, masks: Masks, inputs: Tensor | None = None) -> dict[str, Tensor]:
        """One encoder pass shared by all targets; returns ``loss`` and ``<target>/<key>`` entries."""
        inputs = self.inputs(batch) if inputs is None else inputs
        latent = self.encoder(inputs, masks.visible)  # (B, prefix+K, D)
        out: dict[str, Tensor] = {}
        total = latent.new_zeros((), dtype=torch.float32)
        for name, target in zip(self.target_names, self.target_list):
            result = target(batch, masks, latent, self.encoder)
            total = total + target.weight * result["loss"]
            out.update({f"{name}/{k}": v.detach() for k, v in result.items()})
        out["loss"] = total
        return out

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        micro = batch_idx % self.trainer.accumulate_grad_batches
        inputs = self.inputs(batch)
        gen = self.generator(inputs.device, self.trainer.global_step, self.global_rank, micro)
        masks = self.draw_masks(batch, gen, inputs)
        out = self.compute_losses(batch, masks, inputs)
        bs = inputs.shape[0]
        self.log("train/loss", out["loss"].detach(), prog_bar=True, batch_size=bs)
        single = len(self.targets) == 1  # then "<target>/loss" is train/loss again
        extra = {f"train/{k}": v for k, v in out.items() if k != "loss" and not (single and k.endswith("/loss"))}
        if extra:
            self.log_dict(extra, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        if self.hparams.weight_decay_end is not None:  # type: ignore[attr-defined]
            self.log("train/weight_decay", self.weight_decay_at(self.trainer.global_step), batch_size=bs)
        return out["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # Fixed masks per validation batch, so validation losses are comparable across epochs.
        inputs = self.inputs(batch)
        gen = self.generator(inputs.device, -1, self.global_rank, batch_idx)
        out = self.compute_losses(batch, self.draw_masks(batch, gen, inputs), inputs)
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True, batch_size=inputs.shape[0])

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """The validation loss on the test loader (fixed masks per batch), logged as ``test/loss``."""
        inputs = self.inputs(batch)
        gen = self.generator(inputs.device, -2, self.global_rank, batch_idx)
        out = self.compute_losses(batch, self.draw_masks(batch, gen, inputs), inputs)
        self.log("test/loss", out["loss"], sync_dist=True, batch_size=inputs.shape[0])

    def on_train_epoch_end(self) -> None:
        # Corrupt samples the datamodule skipped so far (a host-side counter: no device sync).
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        skipped = getattr(data, "num_skipped", getattr(data, "num_corrupt", None))
        if isinstance(skipped, int):
            self.log("data/skipped_samples", float(skipped), rank_zero_only=True)

    def weight_decay_at(self, step: int) -> float:
        """The weight decay of the decayed parameter group at optimizer step ``step`` (constant without a schedule)."""
        hp: Any = self.hparams
        if hp.weight_decay_end is None:
            return hp.weight_decay
        return cosine_anneal(step, total_steps=self._total_steps, start=hp.weight_decay, end=hp.weight_decay_end)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        if self.hparams.weight_decay_end is not None:  # type: ignore[attr-defined]
            wd = self.weight_decay_at(self.trainer.global_step)
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    if group.get("decay", False):
                        group["weight_decay"] = wd
        super().optimizer_step(*args, **kwargs)
        for target in self.target_list:
            target.after_step(self.encoder, self.progress)

    # ------------------------------------------------------------------ optimization
    def effective_batch(self) -> tuple[int, int, int, int]:
        """(per-device batch, accumulation, world size, effective batch)."""
        per_device = self.batch_size
        if per_device is None:
            per_device = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if per_device is None:
            raise ValueError(
                "PretrainModule.batch_size is not set and the datamodule has no batch_size attribute; "
                "set model.init_args.batch_size to the per-device batch size"
            )
        accum, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        return per_device, accum, world, per_device * accum * world

    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        per_device, accum, world, eff = self.effective_batch()
        lr = hp.lr if hp.lr is not None else scaled_lr(hp.blr, eff)
        if self.trainer.estimated_stepping_batches == float("inf"):
            raise ValueError(
                "PretrainModule: the run has no end (trainer.max_epochs = -1 and trainer.max_steps = -1), "
                "but the lr schedule needs one; set trainer.max_epochs or trainer.max_steps"
            )
        total = int(self.trainer.estimated_stepping_batches)
        self._total_steps = max(1, total)
        if hp.warmup_steps is not None:
            warmup = hp.warmup_steps
        else:
            # Optimizer steps per epoch from the loader's length (Lightning steps on a partial group at epoch
            # end), so warmup_epochs means epochs also when max_steps ends the run (as MAE's per-iteration schedule,
            # facebookresearch/mae util/lr_sched.py).
            if self.trainer.train_dataloader is None:  # max_steps-only runs: Lightning has not loaded the data yet
                self.trainer.fit_loop.setup_data()  # (what estimated_stepping_batches does otherwise)
            batches: float = self.trainer.num_training_batches
            steps_per_epoch: float
            if 0 < batches < float("inf"):
                steps_per_epoch = math.ceil(batches / accum)
            else:  # a loader without a length: fall back to max_epochs
                epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
                steps_per_epoch = total / epochs if epochs else float(total)
            warmup = round(hp.warmup_epochs * steps_per_epoch)
        lr_text = f"lr {lr:.3g}" if hp.lr is not None else f"lr = blr {hp.blr:g} x {eff}/256 = {lr:.4g}"
        rank_zero_info(
            f"mim: effective batch = {per_device} per device x {accum} accumulation x {world} devices = {eff}; "
            f"{lr_text}; {total} optimizer steps, {warmup} warmup"
        )
        named = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        named |= {f"targets.{i}.{n}" for i, t in enumerate(self.target_list) for n in t.no_weight_decay()}
        groups = param_groups(
            self,
            weight_decay=hp.weight_decay,
            special_tokens=named,
            decay_special_tokens=hp.decay_special_tokens,
            never_decay={f"targets.{i}.{n}" for i, t in enumerate(self.target_list) for n in t.never_decay()},
        )
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))

        def factor(step: int) -> float:
            return warmup_cosine(
                step,
                warmup_steps=warmup,
                total_steps=total,
                base_lr=1.0,
                min_lr=hp.min_lr / lr,
                start_lr=hp.warmup_start_lr / lr,
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mim"] = {"encoder": self.encoder.config, "format": 1}
        data_config = getattr(getattr(self._trainer, "datamodule", None), "data_config", None)
        if callable(data_config):  # input size, mean, std ...: what `mim export` writes for timm
            checkpoint["mim"]["data"] = data_config()
