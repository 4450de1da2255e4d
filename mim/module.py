"""PretrainModule: an encoder, a masking strategy and one or more targets, trained with Lightning.

One step (docs/architecture.md, "One training step"): draw masks -> encode the visible tokens once -> every target
computes its loss from the shared latent -> weighted sum -> optimizer step -> ``target.after_step`` (EMA and the like).

Guards against silently wrong training, shared with ``FinetuneModule`` (the Lightning side lives here, the pure parts
in :mod:`mim.optim` and :mod:`mim.checks`): the data is checked against the encoder before the first step
(:func:`mim.checks.check_encoder_data`); a warmup longer than the run is clipped with a warning
(:func:`mim.optim.clip_warmup`); LightningCLI's ``--optimizer`` / ``--lr_scheduler`` (which would replace the module's
optimizer, lr scaling and schedule) are refused (:func:`refuse_cli_optimizer`); optimizer steps with a non-finite loss
or gradient are skipped and counted (:func:`guarded_optimizer_step`); and torch's global generators are reseeded at
every training batch (:func:`reseed_global_rng`), so model-side randomness (drop path, dropout) replays on resume.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from mim.checks import check_choice, check_encoder_data, check_int, check_range, invalid
from mim.masking.base import MaskingStrategy
from mim.models.base import Encoder
from mim.models.decoder import set_activation_checkpointing
from mim.optim import NonFiniteGuard, NonFiniteMode, clip_warmup, cosine_anneal, param_groups, scaled_lr, warmup_cosine
from mim.targets.base import Target
from mim.types import Batch, Masks, step_seed

__all__ = [
    "PretrainModule",
    "built_by_lightning_cli",
    "fused_adamw",
    "guarded_optimizer_step",
    "refuse_cli_optimizer",
    "reseed_global_rng",
    "step_seed",
]


def built_by_lightning_cli() -> bool:
    """True while LightningCLI constructs a module: it then hands the recipe's plain config over as hyperparameters."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - another Lightning: keep the plain arguments only
        return False
    return _given_hyperparameters.get() is not None


def refuse_cli_optimizer(module: L.LightningModule, supported: str) -> None:
    """Refuse a ``configure_optimizers`` that LightningCLI put in place of the module's own.

    ``--optimizer`` / ``--lr_scheduler`` (or ``optimizer:`` / ``lr_scheduler:`` in a config) make LightningCLI set an
    instance attribute ``configure_optimizers`` over the class's method (``LightningCLI.
    _add_configure_optimizers_method_to_model``): the module's parameter groups, lr scaling, warmup and cosine would be
    dropped without a word. mim refuses it rather than composing the two.

    Args:
        module: the module, at ``setup("fit")``.
        supported: the module's own optimizer arguments, for the message.

    Raises:
        ValueError: the method was replaced.
    """
    if "configure_optimizers" not in vars(module):
        return
    owner = type(module).__name__
    raise ValueError(
        f"{owner}.configure_optimizers was replaced by LightningCLI's --optimizer / --lr_scheduler (or an optimizer: "
        f"/ lr_scheduler: section of the config), which would silently drop {owner}'s parameter groups (no weight "
        "decay on norms, biases and special tokens), its lr scaling (lr = blr x effective batch / 256), warmup and "
        f"cosine schedule. Remove them and set {owner}'s own arguments instead: {supported}. For another optimizer, "
        f"subclass {owner} and override configure_optimizers"
    )


def _is_deepspeed(strategy: Any) -> bool:
    return any(c.__name__ == "DeepSpeedStrategy" for c in type(strategy).__mro__)


def guarded_optimizer_step(
    module: L.LightningModule, guard: NonFiniteGuard, optimizer: Any, closure: Any
) -> bool | Tensor:
    """``LightningModule.optimizer_step`` that skips a step whose loss or gradients are not finite.

    Runs Lightning's closure (the last micro-batch's forward and backward), takes ``guard``'s verdict (losses of every
    micro-batch of the group, fed by ``training_step``; every gradient; reduced across ranks), then steps through
    Lightning's optimizer wrapper, so precision plugins, gradient clipping and ``on_before_optimizer_step`` work as
    usual. The lr schedule and ``global_step`` advance either way (as for a step fp16's GradScaler skips).

    * A fused optimizer (``AdamW(fused=True)``, the modules' default) gets the verdict as ``found_inf`` and skips on the
      device: no host sync. The counts are read a step late (:meth:`NonFiniteGuard.record_on_device`).
    * Other optimizers: the verdict is read on the host (one sync per optimizer step); a non-finite step is not
      taken and its gradients are zeroed.

    Under fp16 AMP (a GradScaler) only the losses are checked, on the host: the scaler skips overflowing gradients
    itself and lowers its scale. DeepSpeed strategies run the closure inside their engine and handle overflow
    themselves: the step is left to them unchecked. ``guard.mode == "off"`` steps without a check or a sync.

    Returns:
        Whether the step was applied: a bool when known on the host, else a () float tensor on the device, 1.0 when
        applied (pass it on to EMA updates, which then skip on the device too).
    """
    trainer = module.trainer
    if not guard.enabled or closure is None or _is_deepspeed(trainer.strategy):
        guard.forget_losses()
        optimizer.step(closure=closure)
        return True
    loss = closure()
    scaler = getattr(trainer.precision_plugin, "scaler", None)

    def reduce(t: Tensor) -> Tensor:
        return trainer.strategy.reduce(t, reduce_op="sum")

    if scaler is None and guard.skips_on_device(optimizer):
        bad = guard.verdict(module.parameters(), reduce)
        if bad is None:
            optimizer.step(closure=lambda: loss)
            return True
        # counted first: the previous step's counts are read here and may stop the run before this step applies
        module.log("train/nonfinite_steps", guard.record_on_device(bad, trainer.global_step, rank_zero_warn))
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.found_inf, inner.grad_scale = bad, None  # what torch's GradScaler hands a fused optimizer
        try:
            optimizer.step(closure=lambda: loss)
        finally:
            del inner.found_inf, inner.grad_scale
        return 1.0 - bad
    finite = guard.step_is_finite(module.parameters(), reduce, check_grads=scaler is None)
    if guard.record(finite, trainer.global_step, rank_zero_warn):
        optimizer.step(closure=lambda: loss)
    else:
        optimizer.zero_grad(set_to_none=True)
    module.log("train/nonfinite_steps", float(guard.total))
    return finite


def fused_adamw(module: nn.Module, requested: bool) -> bool | None:
    """``AdamW(fused=...)``: True when requested and every trainable parameter is a plain tensor on a device torch's
    fused kernel supports; None (torch's default, foreach) otherwise (FSDP2's DTensors, other devices)."""
    if not requested:
        return None
    params = [p for p in module.parameters() if p.requires_grad]
    supported = {"cpu", "cuda", "mps", "xpu"}
    plain = not any(hasattr(p, "to_local") for p in params)  # DTensor (FSDP2) has to_local
    ok = params and plain and all(p.is_floating_point() and p.device.type in supported for p in params)
    return True if ok else None


def reseed_global_rng(module: L.LightningModule, seed: int, batch_idx: int) -> None:
    """Reseed torch's default CPU and CUDA generators from (seed, "global", step, rank, micro-batch).

    Model-side randomness that draws from the global generators (drop path, dropout) then depends only on the step, so
    a resumed run replays it. ``torch.manual_seed`` sets the generators' seeds on the host: no device sync.
    """
    trainer = module.trainer
    micro = batch_idx % trainer.accumulate_grad_batches
    parts: tuple[Any, ...] = (seed, "global", trainer.global_step, trainer.global_rank, micro)
    torch.manual_seed(step_seed(*parts))


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
        weight_decay: AdamW weight decay (MAE: 0.05); with ``weight_decay_end`` the schedule's start value.
        weight_decay_end: when set, the weight decay follows a half-cosine from ``weight_decay`` to this value over
            training, updated every optimizer step (I-JEPA: 0.04 -> 0.4).
        betas: AdamW betas (MAE pretraining: (0.9, 0.95)).
        warmup_epochs: linear warmup length in epochs (MAE: 40); may be fractional.
        warmup_steps: warmup length in optimizer steps; overrides ``warmup_epochs`` when set.
        warmup_start_lr: learning rate at the start of the warmup (MAE: 0; I-JEPA: 2e-4, rising to ``lr`` 1e-3).
        min_lr: final learning rate of the decay.
        lr_decay: the decay after the warmup: ``cosine`` (MAE, I-JEPA) or ``linear`` to ``min_lr`` at the end of the run
            (Hugging Face's ``get_linear_schedule_with_warmup``: the self-distillation recipes).
        schedule_scale: the lr and weight-decay schedules are built for ``schedule_scale`` x the run's optimizer
            steps, and the run stops at its own end (V-JEPA's ``ipe_scale`` 1.25: its lr ends at 7.5e-5, not at
            ``min_lr``, and its weight decay at 0.366, not 0.4). The warmup and the EMA momentum follow the run (a
            momentum schedule built for the scaled length ends at ``start + (end - start) / scale``: set that end).
        schedule_convention: which point of the lr and weight-decay schedules optimizer step ``k`` (0-based: ``k``
            steps done before it) applies. ``"mae"``: the value at ``k`` (MAE's ``adjust_learning_rate``, called
            before the forward pass at the iteration's fractional epoch; the first step has the warmup's start
            value). ``"ijepa"``: the value at ``k + 1`` (I-JEPA / V-JEPA step their ``WarmupCosineSchedule`` and
            ``CosineWDSchedule`` at the start of every iteration, so the first iteration uses warm-up step 1 and the
            last one the schedule's end value). The EMA momentum of a target is the same in both: ``m(k)``, from
            ``progress = k / total`` (I-JEPA's ``next(momentum_scheduler)`` after the optimizer step, from index 0).
            docs/design.md, "Schedule alignment".
        decay_special_tokens: apply weight decay to cls / mask tokens (official MAE: True).
        batch_size: per-device batch size for lr scaling; default: the datamodule's ``batch_size``.
        seed: seed of the mask generator; masks depend only on (seed, step, rank, micro-batch). Also reseeds torch's
            global generators at every training batch (drop path and dropout replay on resume).
        nonfinite: what an optimizer step with a non-finite loss or gradient does: ``skip`` (no weight or optimizer
            state change; counted in ``train/nonfinite_steps``, warned once; ``max_nonfinite_steps`` in a row stop the
            run), ``raise`` (stop at the first) or ``off`` (no check). With the fused optimizer the step is skipped on
            the device and the counts are read a step late (no host sync); otherwise one flag, reduced across ranks,
            is read on the host per optimizer step (as fp16 AMP does). DeepSpeed strategies keep their own overflow
            handling.
        max_nonfinite_steps: consecutive non-finite optimizer steps that stop a ``skip`` run with
            :class:`mim.optim.NonFiniteStepError`.
        fused_optimizer: AdamW's fused implementation (``torch.optim.AdamW(fused=True)``: one kernel over all
            parameters; a non-finite step is skipped on the device, without a host sync). False: torch's default
            (foreach) implementation, and the non-finite check reads its flag on the host once per optimizer step.
        activation_checkpointing: recompute each transformer block's activations in the backward pass instead of
            keeping them (encoder, decoder, predictor: :func:`mim.models.decoder.set_activation_checkpointing`): less
            memory for about one more forward pass of compute.
        init_checkpoint: weights to start from (a fresh start; a resumed run loads its own checkpoint over them):
            a ``mim fit`` checkpoint (``.ckpt``, DeepSpeed or FSDP2 folder) gives the encoder and every target
            parameter whose name and shape match (an MAE's decoder: further pretraining, self-distillation), or a
            ``mim export`` file the encoder only. The encoder loads strictly; EMA copies the file does not hold start
            from the loaded encoder. The optimizer, step and schedules start fresh.
            (:meth:`load_init_checkpoint`).
        compile: run the training step's model work (:meth:`compute_losses`: encoder, targets, losses) through
            ``torch.compile``; the masks are drawn outside the compiled graph. The first steps pay the compilation
            (minutes for large models); validation stays eager.

    A warmup that does not end before the run does is clipped to the run (with a warning), so the lr reaches its
    target; LightningCLI's ``--optimizer`` / ``--lr_scheduler`` are refused (use the arguments above).
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
        lr_decay: Literal["cosine", "linear"] = "cosine",
        schedule_scale: float = 1.0,
        schedule_convention: Literal["mae", "ijepa"] = "mae",
        decay_special_tokens: bool = True,
        batch_size: int | None = None,
        seed: int = 0,
        nonfinite: NonFiniteMode = "skip",
        max_nonfinite_steps: int = 5,
        fused_optimizer: bool = True,
        activation_checkpointing: bool = False,
        init_checkpoint: str | None = None,
        compile: bool = False,
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
        check_choice(owner, "schedule_convention", schedule_convention, ("mae", "ijepa"))
        check_choice(owner, "lr_decay", lr_decay, ("cosine", "linear"))
        check_range(owner, "schedule_scale", schedule_scale, 1, math.inf, high_open=True, hint="1: the run's length")
        if init_checkpoint is not None and not isinstance(init_checkpoint, str | os.PathLike):
            raise invalid(owner, "init_checkpoint", "a path to a mim checkpoint or export file", init_checkpoint)
        self.guard = NonFiniteGuard(owner, mode=nonfinite, max_consecutive=max_nonfinite_steps)
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
        self._schedule_steps = 1  # the lr and weight-decay schedules' length: schedule_scale x _total_steps
        self._compiled_losses: Callable[..., dict[str, Tensor]] | None = None
        self._initialised = False  # init_checkpoint loaded (configure_model runs again in some trainer calls)

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
        path = self.hparams.get("init_checkpoint")
        if path is not None and not self._initialised:
            self.load_init_checkpoint(path)
        if self.hparams.activation_checkpointing:  # type: ignore[attr-defined]
            set_activation_checkpointing(self, True)
        from mim.distributed import shard_if_fsdp2

        shard_if_fsdp2(self)

    def configure_data(self, datamodule: Any) -> None:
        """Check the data against the encoder, build what depends on it (a table encoder's tokenizer), then the
        targets' heads (once).

        Raises:
            DataMismatchError: the datamodule announces channels, an image size, frames or a table schema that the
                encoder does not take (:func:`mim.checks.check_encoder_data`).
        """
        check_encoder_data(self.encoder, datamodule)
        if self._bound:
            return
        self.encoder.configure_data(datamodule)
        self._bind_targets()

    def load_init_checkpoint(self, path: str | os.PathLike) -> None:
        """Start from the weights of ``path``: the encoder (strictly) and every target parameter or buffer whose name
        and shape match; EMA copies the file does not hold are reset to the loaded encoder.

        Raises:
            CheckpointError: ``path`` is no mim checkpoint or export, or its encoder does not fit this one.
        """
        from mim.checkpoint import encoder_state, load_encoder_weights, read_checkpoint
        from mim.ema import EMA

        if not os.path.exists(path):
            raise FileNotFoundError(
                f"PretrainModule.init_checkpoint: {path} does not exist. A resumed run reads it again before loading its "
                "own checkpoint, which holds every weight: to resume without it, pass "
                "--model.init_args.init_checkpoint null"
            )
        ckpt = read_checkpoint(path)
        load_encoder_weights(self.encoder, encoder_state(ckpt, "student")[1], source=str(path))
        own = self.state_dict()
        heads = {  # tensors only: a target's _extra_state (a teacher's hash, EMA bookkeeping) is not a weight
            k: v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("targets.")
            and isinstance(v, Tensor)
            and isinstance(own.get(k), Tensor)
            and own[k].shape == v.shape
        }
        self.load_state_dict(heads, strict=False)
        for i, target in enumerate(self.target_list):
            for name, sub in target.named_modules():
                if isinstance(sub, EMA) and not any(k.startswith(f"targets.{i}.{name}.module.") for k in heads):
                    sub.module.load_state_dict(self.encoder.state_dict())
        self._initialised = True
        parts = sorted({".".join(k.split(".")[:3]) for k in heads})
        rank_zero_info(
            f"mim: initialised from {path}: the encoder{', ' + ', '.join(parts) if parts else ''} "
            f"({len(heads)} target tensors)"
        )

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
        """One encoder pass shared by all targets; returns ``loss`` and ``<target>/<key>`` entries.

        With several mask sets (``masks.sets``, V-JEPA): one encoder pass per set, every target once per set, and the
        loss and every entry averaged over the sets (an entry over the sets that returned it).
        """
        inputs = self.inputs(batch) if inputs is None else inputs
        sets = masks.sets
        entries: dict[str, list[Tensor]] = {}
        total: Tensor | None = None
        for m in sets:
            latent = self.shared_latent(batch, m, inputs)  # (B, prefix+K, D)
            for name, target in zip(self.target_names, self.target_list):
                result = target(batch, m, latent, self.encoder)
                # No identity arithmetic (0 + 1.0 x loss) on a loss also returned detached: under torch.compile (torch
                # 2.14) such an output loses its autograd graph (tests/test_compile.py).
                term = result["loss"].float() if target.weight == 1.0 else target.weight * result["loss"].float()
                total = term if total is None else total + term
                for k, v in result.items():
                    entries.setdefault(f"{name}/{k}", []).append(v.detach())
        assert total is not None  # at least one target (checked at construction)
        if len(sets) == 1:
            out = {k: v[0] for k, v in entries.items()}
            out["loss"] = total
            return out
        out = {k: torch.stack([x.float() for x in v]).mean() if len(v) > 1 else v[0] for k, v in entries.items()}
        out["loss"] = total / len(sets)
        return out

    def shared_latent(self, batch: Batch, masks: Masks, inputs: Tensor) -> Tensor:
        """The latent every target of the step receives: ``encoder(inputs, masks.visible)``, unless a target encodes
        the visible tokens itself (:meth:`Target.encode`, MixedAE's mixed pass)."""
        found = [
            (n, z)
            for n, t in zip(self.target_names, self.target_list)
            if (z := t.encode(batch, masks, inputs, self.encoder)) is not None
        ]
        if len(found) > 1:
            raise ValueError(
                f"PretrainModule: targets {[n for n, _ in found]} each run their own encoder pass (Target.encode); "
                "at most one target of a module may"
            )
        return found[0][1] if found else self.encoder(inputs, masks.visible)  # (B, prefix+K, D)

    def training_losses(self, batch: Batch, masks: Masks, inputs: Tensor) -> dict[str, Tensor]:
        """:meth:`compute_losses`, compiled with ``torch.compile`` when the module was built with ``compile=True``."""
        if not self.hparams.get("compile", False):
            return self.compute_losses(batch, masks, inputs)
        if self._compiled_losses is None:
            self._compiled_losses = torch.compile(self.compute_losses)
        return self._compiled_losses(batch, masks, inputs)

    def setup(self, stage: str) -> None:
        """Lightning hook: refuse LightningCLI's ``--optimizer`` / ``--lr_scheduler`` before anything runs."""
        if stage == "fit":
            refuse_cli_optimizer(self, _OPTIMIZER_ARGUMENTS)

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed torch's global generators from (seed, step, rank, micro-batch): drop path replays on resume."""
        reseed_global_rng(self, self.seed, batch_idx)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        micro = batch_idx % self.trainer.accumulate_grad_batches
        inputs = self.inputs(batch)
        gen = self.generator(inputs.device, self.trainer.global_step, self.global_rank, micro)
        masks = self.draw_masks(batch, gen, inputs)
        out = self.training_losses(batch, masks, inputs)
        self.guard.observe_loss(out["loss"])  # a device op: the optimizer step reads it
        bs = inputs.shape[0]
        # not prog_bar: Lightning reads progress-bar values every step (a host sync); RunProgressBar shows the loss
        # at logging steps instead
        self.log("train/loss", out["loss"].detach(), batch_size=bs)
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

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """``mim predict``: the encoder's features with every token visible, ``{"features": (B, D)}`` (the mean of the
        patch tokens, as the linear probes read them) and ``label`` (B,) when the batch has one."""
        latent = self.encoder(self.inputs(batch))  # (B, prefix + N, D)
        out = {"features": self.encoder.pool(latent, "avg")}  # (B, D)
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def on_train_epoch_end(self) -> None:
        # Corrupt samples the datamodule skipped so far (a host-side counter: no device sync).
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        skipped = getattr(data, "num_skipped", getattr(data, "num_corrupt", None))
        if isinstance(skipped, int):
            self.log("data/skipped_samples", float(skipped), rank_zero_only=True)

    @property
    def schedule_offset(self) -> int:
        """Optimizer step ``k`` applies the lr and weight-decay schedules at ``k + schedule_offset`` (``mae``: 0,
        ``ijepa``: 1; see ``schedule_convention``)."""
        return 1 if getattr(self.hparams, "schedule_convention", "mae") == "ijepa" else 0

    def weight_decay_at(self, step: int) -> float:
        """The weight decay that optimizer step ``step`` (0-based) applies to the decayed parameter group: the
        half-cosine at ``step + schedule_offset`` (constant without a schedule)."""
        hp: Any = self.hparams
        if hp.weight_decay_end is None:
            return hp.weight_decay
        return cosine_anneal(
            step + self.schedule_offset,
            total_steps=self._schedule_steps,
            start=hp.weight_decay,
            end=hp.weight_decay_end,
        )

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        """The optimizer step (skipped when its loss or gradients are not finite), then ``target.after_step``."""
        if self.hparams.weight_decay_end is not None:  # type: ignore[attr-defined]
            wd = self.weight_decay_at(self.trainer.global_step)
            for opt in self.trainer.optimizers:
                for group in opt.param_groups:
                    if group.get("decay", False):
                        group["weight_decay"] = wd
        applied = guarded_optimizer_step(self, self.guard, optimizer, optimizer_closure)
        if isinstance(applied, Tensor):  # decided on the device: EMA updates are gated there too
            for target in self.target_list:
                if "applied" in inspect.signature(target.after_step).parameters:
                    target.after_step(self.encoder, self.progress, applied=applied)
                else:  # a target written before ``applied`` existed: called after skipped steps too
                    target.after_step(self.encoder, self.progress)
        elif applied:
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
        self._schedule_steps = max(1, round(total * getattr(hp, "schedule_scale", 1.0)))
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
        source = (
            f"warmup_steps={hp.warmup_steps}"
            if hp.warmup_steps is not None
            else f"warmup_epochs={hp.warmup_epochs:g} x {steps_per_epoch:g} steps per epoch"
        )
        warmup, warning = clip_warmup(type(self).__name__, warmup, self._total_steps, source=source)
        if warning:
            rank_zero_warn(warning)
        lr_text = f"lr {lr:.3g}" if hp.lr is not None else f"lr = blr {hp.blr:g} x {eff}/256 = {lr:.4g}"
        rank_zero_info(
            f"mim: effective batch = {per_device} per device x {accum} accumulation x {world} devices = {eff}; "
            f"{lr_text}; {total} optimizer steps, {warmup} warmup"
            + (f"; schedules built for {self._schedule_steps} steps" if self._schedule_steps != total else "")
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
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas), fused=fused_adamw(self, hp.fused_optimizer))
        offset, schedule = self.schedule_offset, self._schedule_steps

        # LambdaLR calls factor(k) at construction (k = 0) and after every optimizer step (Lightning steps it with
        # interval "step"), so optimizer step k runs at factor(k): the schedule at k + offset.
        def factor(step: int) -> float:
            return warmup_cosine(
                step + offset,
                warmup_steps=warmup,
                total_steps=schedule,
                base_lr=1.0,
                min_lr=hp.min_lr / lr,
                start_lr=hp.warmup_start_lr / lr,
                decay=getattr(hp, "lr_decay", "cosine"),
            )

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mim"] = {"encoder": self.encoder.config, "format": 1, "nonfinite_steps": self.guard.state_dict()}
        data_config = getattr(getattr(self._trainer, "datamodule", None), "data_config", None)
        if callable(data_config):  # input size, mean, std ...: what `mim export` writes for timm
            checkpoint["mim"]["data"] = data_config()

    def on_train_end(self) -> None:
        """Read the last step's non-finite count (counted on the device, a step late)."""
        self.guard.flush(rank_zero_warn)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the non-finite step counters (a resumed run keeps counting)."""
        self.guard.load_state_dict(checkpoint.get("mim", {}).get("nonfinite_steps", {}))


_OPTIMIZER_ARGUMENTS = (
    "model.init_args.lr or blr (lr = blr x effective batch / 256), betas, weight_decay, weight_decay_end, "
    "warmup_epochs or warmup_steps, warmup_start_lr, min_lr, lr_decay, schedule_scale, schedule_convention, "
    "decay_special_tokens"
)
