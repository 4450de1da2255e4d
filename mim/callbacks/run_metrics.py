"""RunMetrics: numbers that explain a run's speed and health, logged every ``trainer.log_every_n_steps`` steps.

Every ``trainer.log_every_n_steps`` optimizer steps (Lightning's own logging cadence, so the numbers land in the same
logger rows as ``train/loss``) it logs

========================================  ==========================================================================
``speed/samples_per_s``                    samples per second over all ranks (per-device rate x world size)
``speed/samples_per_s_per_device``         samples this rank trained per second of the interval's host wall time
``speed/data_wait``                        fraction of that wall time the host waited for the loader, in [0, 1]
``speed/flops_per_sample``                 training FLOPs (forward + backward) per sample, counted once (see below)
``speed/tflops_per_s_per_device``          flops_per_sample x samples_per_s_per_device / 1e12
``speed/mfu``                              tflops_per_s_per_device / peak TFLOP/s (only with a peak: ``device`` or
                                           ``peak_tflops``)
``memory/peak_gb``                         ``torch.cuda.max_memory_allocated`` since the process started, in GB
                                           (1e9 bytes); CUDA only
``train/grad_norm``                        total L2 norm of all gradients before the optimizer step (after AMP
                                           unscaling, before clipping), a device tensor read at Lightning's flush
``train/mask_ratio``                       the masking strategy's ratio in effect (``mask_ratio_at(progress)`` when
                                           the strategy schedules it, else ``mask_ratio``; DualMasking: its encoder's)
``train/<target>/ema_momentum``            the EMA momentum of each target that has a teacher or target encoder
                                           (``momentum_at(progress)``, or ``ema_momentum`` / ``ema_ramp``)
========================================  ==========================================================================

The lr and weight decay are logged by :class:`~mim.module.PretrainModule` (``train/lr``, ``train/weight_decay``) and
the collapse monitors by :class:`~mim.targets.latent.LatentTarget`; this callback does not repeat them.

**Timing without device syncs.** Speed comes from the host clock (``time.perf_counter``) at ``on_train_batch_start``
and ``on_train_batch_end``, never from a device synchronisation. On a GPU the host runs ahead of the device, so one
step's host time means little; over an interval of ``log_every_n_steps`` steps the host cannot stay further ahead
than the caching allocator and the loader let it, so the interval's average converges to the device's rate. An
interval runs from the previous logging step's ``on_train_batch_end`` (the fit's first ``on_train_batch_start`` for
the first one) to this logging step's ``on_train_batch_end``, less any validation run inside it; the data wait is the
sum, over its batches, of the time from the previous batch's end to this batch's start (validation left out). That
gap holds whatever the host does between batches: the loader, but also the work of callbacks that run after this one
at a batch's end (a checkpoint save, for instance). The first interval also holds warm-up (cuDNN autotuning,
``torch.compile``) and the FLOP count's own overhead: read the later ones.

**FLOPs.** ``count_flops=True`` runs the fit's first optimizer step (every micro-batch of it, forward and backward)
under ``torch.utils.flop_counter.FlopCounterMode`` and divides by the samples it saw: what the real step ran, whatever
the targets (HPM's teacher scoring pass, I-JEPA's target encoder, the decoder), with MAE's encoder on the visible
tokens only. No extra pass is run, so no state (EMA, monitor counters, generators) changes. Counting rules are
PyTorch's (a multiply-add is 2 FLOPs; only matrix products, convolutions and attention count), counting model FLOPs
(the convention of MFU, PaLM appendix B): attention is QK^T and AV, 4 n^2 D per block forward, and its backward
2x that, without the QK^T that flash / memory-efficient kernels recompute (which PyTorch's formula adds). On CPU,
PyTorch's counter does not know the fused attention op ``aten._scaled_dot_product_flash_attention_for_cpu``; it is
mapped here too, so the count is the same on CPU and GPU, fused or not, and equals the analytic ViT count of
``benchmarks/flops.py`` (checked exactly in tests/test_run_metrics.py). A ratio scheduled by the masking makes later steps differ from the first.
With ``activation_checkpointing`` the count includes the forward work recomputed in the backward pass (hardware
FLOPs, not model FLOPs: torch's non-reentrant checkpoint recomputes only what the backward needs, so the share is
not a fixed fraction; measured: +26 % on a 4-block MAE), so ``speed/mfu`` then reads high by that share.

**Peaks** (bf16 dense tensor-core TFLOP/s, vendor datasheets; the sparsity figures are twice these):
A100 SXM/PCIe 312 (NVIDIA A100 Tensor Core GPU datasheet), H100 SXM 989.4 (NVIDIA H100 Tensor Core GPU datasheet:
1,979 with sparsity; NVIDIA H100 architecture whitepaper: 989.4 dense), H200 SXM 989.4 (NVIDIA H200 Tensor Core GPU
datasheet: 1,979 with sparsity; the same compute as H100 SXM). Other devices: pass ``peak_tflops``.

**Host syncs.** A step that does not log reads two clock values and the batch's shape (host metadata): no device work,
no sync. A logging step converts the Python floats to tensors (``LightningModule.log``) and Lightning reads every
logged tensor at its flush, as it does for ``train/loss``.

Metrics are logged with ``pl_module.log(..., on_step=True, on_epoch=False)`` rather than straight to
``trainer.loggers``: they then go through Lightning's own flush (one logger row per step with ``train/loss``, every
logger, rank 0 only), appear in ``trainer.callback_metrics``, and ``train/grad_norm`` can stay a device tensor until
that flush. The values are this rank's (no cross-rank reduction: none is needed for DDP, whose gradients are already
all-reduced; under FSDP2 the gradient norm is that of this rank's shards, and under DeepSpeed ZeRO, which keeps
gradients out of ``param.grad``, it is not logged).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from mim.checks import check_bool, check_choice, check_range, invalid
from mim.ema import ema_momentum

__all__ = ["PEAK_TFLOPS", "IntervalTiming", "RunMetrics"]

Device = Literal["a100", "h100", "h200"]

PEAK_TFLOPS: dict[str, float] = {"a100": 312.0, "h100": 989.4, "h200": 989.4}
"""bf16 dense tensor-core peak TFLOP/s per device (sources in the module docstring)."""


@dataclass(frozen=True)
class IntervalTiming:
    """Host-clock measurements of one logging interval of one rank.

    Attributes:
        steps: optimizer steps in the interval.
        samples: samples this rank trained in it (every micro-batch's batch size).
        seconds: host wall time of the interval, in s.
        wait_seconds: part of ``seconds`` spent between a batch's end and the next batch's start (the loader), in s.
    """

    steps: int
    samples: int
    seconds: float
    wait_seconds: float


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV: 4 n^2 D per sample for n tokens of width D (PyTorch's SDPA formula)."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """Model FLOPs of attention's backward: 2 x forward (the input gradients of QK^T and AV), without the QK^T that
    flash / memory-efficient kernels recompute (PyTorch's own formula adds it: 5/2 x forward)."""
    return 2 * flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _flop_counter() -> FlopCounterMode:
    """PyTorch's counter, counting model FLOPs for every fused attention op (on CPU too).

    PyTorch's registry does not know CPU's fused op (``aten._scaled_dot_product_flash_attention_for_cpu``) and counts
    the backward's recomputation of QK^T on CUDA; both are mapped here to the formulas of an unfused attention, so the
    count is the same on CPU and GPU, fused or not, and equals the analytic ViT count.
    """
    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _attention_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward_flops),
        ("_scaled_dot_product_flash_attention_backward", _attention_backward_flops),
        ("_scaled_dot_product_efficient_attention_backward", _attention_backward_flops),
        ("_scaled_dot_product_cudnn_attention_backward", _attention_backward_flops),
    ):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return FlopCounterMode(display=False, custom_mapping=mapping)


def mask_ratio_of(masking: Any, progress: float) -> float | None:
    """The ratio of tokens hidden from the encoder at ``progress``, or None when the strategy has no single ratio.

    ``mask_ratio_at(progress)`` when the strategy schedules its ratio, else its ``mask_ratio`` attribute; a strategy
    that wraps another one for the encoder (``DualMasking.encoder``) reports the wrapped one's.
    """
    at = getattr(masking, "mask_ratio_at", None)
    if callable(at):
        return float(at(progress))
    ratio = getattr(masking, "mask_ratio", None)
    if isinstance(ratio, Real) and not isinstance(ratio, bool):
        return float(ratio)
    inner = getattr(masking, "encoder", None)
    if inner is not None and inner is not masking:
        return mask_ratio_of(inner, progress)
    return None


def ema_momentum_of(target: Any, progress: float) -> float | None:
    """The EMA momentum a target's teacher / target encoder uses at ``progress``, or None when it has no EMA."""
    at = getattr(target, "momentum_at", None)
    if callable(at):
        return float(at(progress))
    schedule = getattr(target, "ema_momentum", None)
    if isinstance(schedule, tuple) and len(schedule) == 2:
        return ema_momentum(progress, start=schedule[0], end=schedule[1], ramp=getattr(target, "ema_ramp", 1.0))
    return None


class RunMetrics(L.Callback):
    """Speed, FLOPs, MFU, memory, gradient norm and schedules, every ``trainer.log_every_n_steps`` optimizer steps.

    Metric names, units and method: module docstring. Constructible without arguments (no MFU then); cheap on the
    steps that do not log (two clock reads, no device work).

    Args:
        device: a preset peak (bf16 dense TFLOP/s): ``"a100"`` 312, ``"h100"`` (SXM) 989.4, ``"h200"`` 989.4.
            None: no preset.
        peak_tflops: the peak TFLOP/s per device that ``speed/mfu`` divides by, for any other device or precision;
            excludes ``device``. With neither, MFU is not logged (e.g. on CPU).
        count_flops: count the first optimizer step's FLOPs (``speed/flops_per_sample``, and with it
            ``speed/tflops_per_s_per_device`` and ``speed/mfu``). False: none of the three.
    """

    def __init__(
        self, *, device: Device | None = None, peak_tflops: float | None = None, count_flops: bool = True
    ) -> None:
        super().__init__()
        if device is not None:
            check_choice(self, "device", device, tuple(PEAK_TFLOPS))
        if peak_tflops is not None:
            if device is not None:
                raise invalid(self, "peak_tflops", "None when device is set", peak_tflops, hint=f"device={device!r}")
            peak_tflops = check_range(self, "peak_tflops", peak_tflops, 0, float("inf"), low_open=True, high_open=True)
        self.device = device
        self.peak_tflops: float | None = PEAK_TFLOPS[device] if device is not None else peak_tflops
        self.count_flops = check_bool(self, "count_flops", count_flops)
        self._clock: Callable[[], float] = time.perf_counter
        self.flops_per_sample: float | None = None
        self.last_interval: IntervalTiming | None = None
        self._reset()

    def _reset(self) -> None:
        self._counter: FlopCounterMode | None = None
        self._counted_samples = 0
        self._interval_start: float | None = None
        self._last_end: float | None = None
        self._last_step: int | None = None
        self._steps = self._samples = 0
        self._wait = self._paused = 0.0
        self._pause_start: float | None = None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._last_step = trainer.global_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = self._clock()
        if self._interval_start is None:
            self._interval_start = now
        elif self._last_end is not None:
            self._wait += now - self._last_end
        self._samples += extract_batch_size(batch)  # shapes only: host metadata
        if self.count_flops and self.flops_per_sample is None:
            if self._counter is None:
                self._counter = _flop_counter()
                self._counter.__enter__()
            self._counted_samples += extract_batch_size(batch)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._logs(trainer, trainer.global_step + 1):  # global_step counts this step only after it
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self._clock()
        self._last_end = now
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch that accumulates: no optimizer step yet
            return
        self._steps += 1 if self._last_step is None else step - self._last_step
        self._last_step = step
        if self._counter is not None:  # the first optimizer step is done: stop counting
            self._stop_counting(self._counted_samples)
        if not self._logs(trainer, step) or self._interval_start is None:
            return
        timing = IntervalTiming(self._steps, self._samples, now - self._interval_start - self._paused, self._wait)
        self.last_interval = timing
        self._interval_start, self._steps, self._samples, self._wait, self._paused = now, 0, 0, 0.0, 0.0
        self._log_all(trainer, pl_module, timing)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause_start = self._clock()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validation inside training is neither step time nor data wait: the interval leaves it out."""
        if self._pause_start is None:
            return
        paused, self._pause_start = self._clock() - self._pause_start, None
        if self._interval_start is not None:
            self._paused += paused
        if self._last_end is not None:
            self._last_end += paused

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_counting(0)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_counting(0)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _logs(trainer: L.Trainer, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, as ``global_step`` after it) is one Lightning logs."""
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning in Trainer.__init__
        return every > 0 and step > 0 and step % every == 0

    def _stop_counting(self, samples: int) -> None:
        counter, self._counter = self._counter, None
        if counter is None:
            return
        counter.__exit__(None, None, None)
        if samples > 0:
            self.flops_per_sample = counter.get_total_flops() / samples

    def _log_all(self, trainer: L.Trainer, pl_module: L.LightningModule, timing: IntervalTiming) -> None:
        metrics: dict[str, float] = {}
        if timing.seconds > 0:
            per_device = timing.samples / timing.seconds
            metrics["speed/samples_per_s_per_device"] = per_device
            metrics["speed/samples_per_s"] = per_device * trainer.world_size
            metrics["speed/data_wait"] = min(1.0, max(0.0, timing.wait_seconds / timing.seconds))
            if self.flops_per_sample is not None:
                tflops = self.flops_per_sample * per_device / 1e12
                metrics["speed/tflops_per_s_per_device"] = tflops
                if self.peak_tflops is not None:
                    metrics["speed/mfu"] = tflops / self.peak_tflops
        if self.flops_per_sample is not None:
            metrics["speed/flops_per_sample"] = self.flops_per_sample
        if pl_module.device.type == "cuda":
            metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 1e9
        progress = float(getattr(pl_module, "progress", 0.0))
        masking = getattr(pl_module, "masking", None)
        if masking is not None and (ratio := mask_ratio_of(masking, progress)) is not None:
            metrics["train/mask_ratio"] = ratio
        names = getattr(pl_module, "target_names", None)
        targets = getattr(pl_module, "target_list", None)
        if names is not None and targets is not None:
            for name, target in zip(names, targets):
                if (momentum := ema_momentum_of(target, progress)) is not None:
                    metrics[f"train/{name}/ema_momentum"] = momentum
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=1)
