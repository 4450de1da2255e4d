"""Optimizer parameter groups and the per-iteration warmup + cosine schedule of MAE.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (Appendix A.1; official
facebookresearch/mae main_pretrain.py and util/lr_sched.py): AdamW with betas (0.9, 0.95); no weight decay on
1-D parameters (norms) and biases; frozen parameters (the sin-cos tables) are in no group; base lr = blr *
effective batch / 256; linear warmup from 0 then half-cosine to ``min_lr``, updated every optimizer step.
:class:`LARS` is the optimizer of MAE's linear probe (facebookresearch/mae util/lars.py).

Guards shared by the training modules: :func:`clip_warmup` (a warmup longer than the run is clipped, with a warning)
and :class:`NonFiniteGuard` (optimizer steps with a non-finite loss or gradient are skipped, counted, and stop the
run after too many in a row).
"""

from __future__ import annotations

import ctypes
import math
import struct
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mim.checks import check_choice, check_int, check_range

__all__ = [
    "LARS",
    "LaggedRead",
    "NonFiniteGuard",
    "NonFiniteStepError",
    "clip_warmup",
    "cosine_anneal",
    "layer_decay_groups",
    "param_groups",
    "scaled_lr",
    "warmup_cosine",
]

NonFiniteMode = Literal["skip", "raise", "off"]


def scaled_lr(blr: float, effective_batch: int) -> float:
    """Linear scaling rule: ``lr = blr * effective_batch / 256``."""
    return blr * effective_batch / 256


def warmup_cosine(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    base_lr: float,
    min_lr: float = 0.0,
    start_lr: float = 0.0,
    decay: Literal["cosine", "linear"] = "cosine",
) -> float:
    """The learning rate at point ``step`` of the schedule.

    ``PretrainModule`` evaluates it at ``k`` for its 0-based optimizer step ``k`` (MAE) or at ``k + 1`` (I-JEPA's
    schedulers, stepped before each iteration: ``schedule_convention="ijepa"``).

    ``lr = start + (base - start) * step / warmup`` during warmup (MAE: start 0; I-JEPA: start 2e-4, base 1e-3), then
    ``min + (base - min) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2``; with ``decay="linear"``
    ``min + (base - min) * (1 - (step - warmup) / (total - warmup))`` instead (Hugging Face's
    ``get_linear_schedule_with_warmup``, which the self-distillation recipes use, with min 0).
    """
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if decay == "linear":
        return min_lr + (base_lr - min_lr) * (1.0 - progress)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_warmup(owner: str, warmup: int, total: int, *, source: str) -> tuple[int, str | None]:
    """The warmup to use in a run of ``total`` optimizer steps, and a warning when it had to be clipped.

    A warmup that does not end before the run does (``warmup >= total``) never lets the lr reach its target: the run
    would train at a fraction of the lr it asks for, silently (a production recipe run with ``max_steps 1``). It is
    clipped to ``total - 1`` steps, so that the last step runs at the target lr (a run of one step: no warmup); the
    cosine then has no room left, which is what such a short run can have.

    Args:
        owner: the module's name, for the warning.
        warmup: the requested warmup, in optimizer steps.
        total: the run's length in optimizer steps (>= 1).
        source: how ``warmup`` was derived, e.g. ``"warmup_epochs=40 x 40 steps per epoch"``.

    Returns:
        ``(warmup, None)`` when it fits, else ``(total - 1, warning)``.
    """
    if warmup < total:
        return warmup, None
    clipped = max(0, total - 1)
    run = f"{total} optimizer step{'s' if total != 1 else ''}"
    return clipped, (
        f"{owner}: warmup ({warmup} optimizer steps from {source}) is not shorter than the run ({run}), so the lr "
        f"would never reach its target; clipped to {clipped} steps (the last step runs at the target lr). For the "
        "recipe's schedule, run it to its end (trainer.max_epochs / max_steps) or set a shorter warmup_epochs or "
        "warmup_steps"
    )


def param_groups(
    module: nn.Module,
    *,
    weight_decay: float,
    special_tokens: Iterable[str] = (),
    decay_special_tokens: bool = True,
    never_decay: Iterable[str] = (),
) -> list[dict]:
    """Split trainable parameters into a decay and a no-decay group.

    No decay: every parameter with ``ndim <= 1`` (norms, biases of any shape) and every name ending in
    ``.bias``. ``special_tokens`` (cls / register / mask tokens, learned position embeddings) are decayed
    when ``decay_special_tokens`` is True (official MAE) and not decayed otherwise (mmpretrain, ColorMAE).
    ``never_decay`` names are never decayed (MaskAlign's layer-mixing matrix).
    Parameters with ``requires_grad=False`` are left out.

    Returns:
        Two param-group dicts: ``{"params", "weight_decay", "names", "decay"}`` (``decay`` marks the group whose
        weight decay a schedule updates).
    """
    special, never = set(special_tokens), set(never_decay)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name in never or (not decay_special_tokens and name in special)
        (no_decay if skip else decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "weight_decay": weight_decay, "names": [n for n, _ in decay], "decay": True},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0, "names": [n for n, _ in no_decay], "decay": False},
    ]


def layer_decay_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    *,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    layer_of: Callable[[str], int],
    no_weight_decay: Iterable[str] = (),
) -> list[dict]:
    """Parameter groups with layer-wise lr decay, as MAE's fine-tuning (facebookresearch/mae util/lr_decay.py).

    Each trainable parameter gets ``lr_scale = layer_decay ** (num_layers - layer_of(name))``: with ``num_layers =
    depth + 1`` the embeddings (layer 0) get ``ld^(depth+1)``, block ``i`` (layer ``i + 1``) ``ld^(depth-i)`` and the
    head and final norms (layer ``depth + 1``) 1. No weight decay for 1-D parameters and for ``no_weight_decay``
    names (position embeddings, cls and register tokens). One group per (layer, decay) pair.

    Args:
        named_parameters: (name, parameter) pairs, e.g. ``module.named_parameters()``.
        weight_decay: the decay of the decayed groups.
        layer_decay: the per-layer factor (MAE ViT-B: 0.65, ViT-L: 0.75); 1 gives every group scale 1.
        num_layers: depth + 1.
        layer_of: parameter name -> layer id in ``[0, num_layers]``.
        no_weight_decay: names never decayed.

    Returns:
        Param-group dicts ``{"params", "weight_decay", "lr_scale", "names", "decay", "layer"}``, ordered by layer.
    """
    skip = set(no_weight_decay)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        layer = layer_of(name)
        if not 0 <= layer <= num_layers:
            raise ValueError(f"layer_decay_groups: layer id {layer} of {name!r} is outside [0, {num_layers}]")
        decay = not (p.ndim == 1 or name in skip)
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers - layer),
                "decay": decay,
                "layer": layer,
            },
        )
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def cosine_anneal(step: int, *, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total_steps`` and later).

    ``end + (start - end) * (1 + cos(pi * min(1, step / total))) / 2``. I-JEPA's weight decay *increases* this way
    from 0.04 to 0.4 over training (facebookresearch/ijepa configs/in1k_vith14_ep300.yaml); its ``CosineWDSchedule``
    applies point ``k + 1`` at iteration ``k`` (``PretrainModule(schedule_convention="ijepa")``).
    """
    progress = min(1.0, max(step, 0) / max(total_steps, 1))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LARS(torch.optim.Optimizer):
    """LARS (You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks", 2017) as MAE's linear probe
    uses it (He et al., CVPR 2022, Appendix A.1; facebookresearch/mae util/lars.py, from MoCo v3).

    For a parameter with ``ndim > 1`` the update is ``d = grad + weight_decay * p``, rescaled by the trust ratio
    ``trust_coefficient * ||p|| / ||d||`` (1 when either norm is 0); biases and norm parameters (``ndim <= 1``) take
    the plain gradient, without decay or trust ratio. Then heavy-ball momentum: ``mu = momentum * mu + d``,
    ``p -= lr * mu``.

    The trust ratio makes each step move a weight matrix by about ``lr * trust_coefficient`` of its norm, so the
    probe's progress per epoch grows with the number of steps: MAE's blr 0.1 is tuned for ImageNet (16384-sample
    batches, 78 steps per epoch).

    Args:
        params: parameters or param groups.
        lr: learning rate (MAE: blr 0.1 x batch / 256).
        weight_decay: decay of the ``ndim > 1`` parameters (MAE's probe: 0).
        momentum: heavy-ball momentum (MAE: 0.9).
        trust_coefficient: eta of the trust ratio (MAE: 0.001).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        check_range("LARS", "lr", lr, 0, math.inf)
        check_range("LARS", "weight_decay", weight_decay, 0, math.inf)
        check_range("LARS", "momentum", momentum, 0, 1, high_open=True)
        check_range("LARS", "trust_coefficient", trust_coefficient, 0, math.inf, low_open=True)
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:  # not a bias or norm parameter
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = group["trust_coefficient"] * p_norm / d_norm
                    d = d.mul(torch.where((p_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio)))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


class LaggedRead:
    """Reads a few device numbers one step late, so that reading them never drains the device's queue.

    ``.item()`` on a value the step just computed makes the host wait for every kernel queued so far: the next step's
    launches then start from an idle device (a host sync). :meth:`push` instead copies the values to host memory
    asynchronously (pinned memory and a CUDA event on a GPU); :meth:`pop`, a step later, returns them: by then the
    device finished that copy long ago, so the wait ends at once and the queue stays full. On the CPU the copy is
    immediate. The values are read from host memory directly (no Tensor method: nothing a sync counter would count).
    """

    def __init__(self) -> None:
        self._pending: tuple[Tensor, Any, Any] | None = None

    def push(self, values: Tensor, tag: Any = None) -> None:
        """Start copying the 1-D ``values`` (float32 on the host) and keep ``tag`` with them; drops an unread push."""
        values = values.detach().to(torch.float32)
        host = torch.empty(values.shape, dtype=torch.float32, pin_memory=values.is_cuda)
        host.copy_(values, non_blocking=True)
        event = None
        if values.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending = (host, event, tag)

    def pop(self) -> tuple[list[float], Any] | None:
        """The values and tag of the last :meth:`push` (waiting for its copy), or None when there is none."""
        if self._pending is None:
            return None
        host, event, tag = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        n = host.numel()
        return list(struct.unpack(f"{n}f", ctypes.string_at(host.data_ptr(), 4 * n))), tag


class NonFiniteStepError(RuntimeError):
    """A non-finite loss or gradient too many optimizer steps in a row (or once, in ``raise`` mode)."""


class NonFiniteGuard:
    """Decides whether an optimizer step may apply: not when a loss or a gradient of it is NaN or infinite.

    The training module feeds every micro-batch's loss to :meth:`observe_loss` (device work only), then, after the
    backward pass of an accumulation group and before the optimizer step, takes the :meth:`verdict` (reduced across
    ranks, on the device). Two ways to act on it:

    * **on the device, no host sync** (:meth:`skips_on_device`: a fused torch optimizer, ``AdamW(fused=True)``): the
      verdict goes to the optimizer as ``found_inf``, as fp16 AMP's GradScaler passes it, and the fused kernel leaves
      the weights and the optimizer state (step count included) unchanged; :meth:`record_on_device` counts it on the
      device and reads the counts one step late (:class:`LaggedRead`), so warnings and the stop come one optimizer
      step after the step they concern;
    * **on the host**, for other optimizers: :meth:`step_is_finite` reads the verdict (one host sync per optimizer
      step) and :meth:`record` counts it; the caller skips the step.

    A skipped step changes neither the weights nor the optimizer state; ``skip`` mode stops the run with
    :class:`NonFiniteStepError` after ``max_consecutive`` non-finite steps in a row, ``raise`` mode at the first.

    Args:
        owner: the module's name, for messages.
        mode: ``skip`` (skip, count, warn once, stop after ``max_consecutive`` in a row), ``raise`` (stop at the
            first) or ``off`` (no check and no sync: a non-finite update reaches the weights).
        max_consecutive: non-finite steps in a row that stop a ``skip`` run.

    Attributes:
        total: non-finite (skipped) optimizer steps so far.
        consecutive: non-finite optimizer steps in a row, up to the last one.
    """

    def __init__(self, owner: str, *, mode: NonFiniteMode = "skip", max_consecutive: int = 5) -> None:
        self.owner = owner
        self.mode: NonFiniteMode = check_choice(owner, "nonfinite", mode, ("skip", "raise", "off"))
        self.max_consecutive = check_int(owner, "max_nonfinite_steps", max_consecutive, minimum=1)
        self.total = 0
        self.consecutive = 0
        self._loss_bad: Tensor | None = None
        self._warned = False
        self._counts: Tensor | None = None  # (2,) [total, consecutive] on the device, ahead of the host's by a step
        self._lagged = LaggedRead()

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def observe_loss(self, loss: Tensor) -> None:
        """Remember whether one micro-batch's loss is finite: a device op, no host sync."""
        if not self.enabled:
            return
        bad = ~torch.isfinite(loss.detach()).all()  # () bool
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def forget_losses(self) -> None:
        """Drop the losses observed since the last check (a step taken without one, e.g. under DeepSpeed)."""
        self._loss_bad = None

    @staticmethod
    def skips_on_device(optimizer: Any) -> bool:
        """Whether ``optimizer`` (or the one a Lightning wrapper holds) can skip a step on the device: a fused torch
        optimizer (it takes ``found_inf``) over plain tensors (not FSDP2's DTensors)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if not getattr(inner, "_step_supports_amp_scaling", False):
            return False
        if not all(group.get("fused") for group in inner.param_groups):
            return False
        return not any(hasattr(p, "to_local") for group in inner.param_groups for p in group["params"])

    def verdict(
        self,
        parameters: Iterable[nn.Parameter],
        reduce: Callable[[Tensor], Tensor],
        *,
        check_grads: bool = True,
    ) -> Tensor | None:
        """A () float tensor on the device, 1.0 when a loss (since the last call) or, with ``check_grads``, a gradient
        is not finite on any rank; None when there was nothing to check. No host sync.

        Args: as :meth:`step_is_finite`.
        """
        flags: list[Tensor] = []
        if self._loss_bad is not None:
            flags.append(self._loss_bad)
        self._loss_bad = None
        if check_grads:
            grads = [p.grad for p in parameters if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this rank's shard
            grads = [g for g in grads if g.numel() > 0]  # FSDP2 gives a rank an empty shard of a small parameter
            if grads:
                # The L2 norm (torch's fused foreach kernel; the max-abs norm has a 25x slower CPU path): NaN and inf
                # propagate; a finite gradient large enough to overflow it (|g| ~ 1e19 in fp32) is refused as well.
                norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)  # ()
                flags.append(~torch.isfinite(norm))
        if not flags:
            return None
        device = flags[-1].device
        bad = torch.stack([f.to(device) for f in flags]).any().float()  # () 1.0 when anything is non-finite
        return (reduce(bad) > 0).float()

    def record_on_device(self, bad: Tensor, step: int, warn: Callable[[str], None]) -> Tensor:
        """Count the verdict of optimizer step ``step`` on the device, then read and :meth:`record` the previous step's.

        Returns:
            The () float tensor of skipped steps so far, on the device (for logging without a sync).

        Raises:
            NonFiniteStepError: as :meth:`record`, one optimizer step late.
        """
        if self._counts is None or self._counts.device != bad.device:
            self._counts = torch.tensor([float(self.total), float(self.consecutive)], device=bad.device)
        total, consecutive = self._counts.unbind()
        self._counts = torch.stack([total + bad, (consecutive + bad) * bad])  # a new tensor: logged values stay put
        self._read_lagged(warn)
        self._lagged.push(self._counts, step)
        return self._counts[0]

    def _read_lagged(self, warn: Callable[[str], None]) -> None:
        read = self._lagged.pop()
        if read is None:
            return
        (total, consecutive), step = read
        if int(total) > self.total:  # that step was skipped: count, warn and stop as record() does
            self.total, self.consecutive = int(total) - 1, int(consecutive) - 1
            self.record(False, step, warn)
        else:
            self.consecutive = 0

    def flush(self, warn: Callable[[str], None] | None = None) -> None:
        """Read the last counts still on the device (a host sync: at checkpoints and at the end of training)."""
        self._read_lagged(warn or (lambda message: None))

    def step_is_finite(
        self,
        parameters: Iterable[nn.Parameter],
        reduce: Callable[[Tensor], Tensor],
        *,
        check_grads: bool = True,
    ) -> bool:
        """Whether the step's losses (since the last call) and, with ``check_grads``, its gradients are all finite.

        Args:
            parameters: the optimized parameters (their ``.grad``; sharded DTensor gradients are checked locally).
            reduce: sums a () float tensor over the ranks (``strategy.reduce(t, reduce_op="sum")``), so that every
                rank decides the same: losses are per rank, and sharded gradients too.
            check_grads: False under fp16 AMP, whose GradScaler skips steps with overflowing gradients itself (and
                lowers its scale); the losses are still checked, so that a NaN from the data does not shrink the scale
                step after step.

        Returns:
            True when the step may apply. One host sync (the reduced verdict is read on the host).
        """
        bad = self.verdict(parameters, reduce, check_grads=check_grads)
        return bad is None or float(bad) == 0.0  # the one host sync per optimizer step

    def record(self, finite: bool, step: int, warn: Callable[[str], None]) -> bool:
        """Count the verdict of optimizer step ``step``; warn at the first skip; raise when it is time to stop.

        Returns:
            ``finite``: whether to apply the step.

        Raises:
            NonFiniteStepError: ``raise`` mode, or ``max_consecutive`` non-finite steps in a row.
        """
        if finite:
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        hints = (
            "lower the lr (blr / lr) or lengthen the warmup, train in bf16-mixed rather than 16-mixed, clip gradients "
            "(trainer.gradient_clip_val=1.0), or check the data for NaN / inf values"
        )
        if self.mode == "raise":
            raise NonFiniteStepError(
                f"{self.owner}: non-finite loss or gradients at optimizer step {step} (nonfinite='raise'): {hints}"
            )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteStepError(
                f"{self.owner}: {self.consecutive} optimizer steps in a row with a non-finite loss or gradients, the "
                f"last at step {step} ({self.total} skipped in all; max_nonfinite_steps={self.max_consecutive}); "
                f"stopping. Try: {hints}"
            )
        if not self._warned:
            warn(
                f"{self.owner}: non-finite loss or gradients at optimizer step {step}: the step is skipped (weights "
                f"and optimizer state unchanged); skipped steps are counted in train/nonfinite_steps and "
                f"{self.max_consecutive} in a row stop the run (max_nonfinite_steps). Warned once"
            )
            self._warned = True
        return False

    def state_dict(self) -> dict[str, int]:
        """The counters, for checkpoints (the last step's included: read from the device)."""
        self.flush()
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the counters of :meth:`state_dict`."""
        self.total, self.consecutive = int(state.get("total", 0)), int(state.get("consecutive", 0))
        self._counts, self._lagged = None, LaggedRead()
