"""RunMetrics: metric keys exactly on Lightning's logging steps, speeds from a scripted clock, the FLOP count against
the analytic ViT + MAE-decoder formula, MFU only with a peak, schedules, and no host syncs in the callback."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.data import DataLoader, Dataset

from mim.callbacks import RunMetrics
from mim.callbacks.run_metrics import PEAK_TFLOPS, IntervalTiming, ema_momentum_of, mask_ratio_of
from mim.masking import DualMasking, RandomMasking, TubeMasking
from mim.module import PretrainModule
from mim.targets import PixelTarget
from mim.targets.hard_patch import HardPatchTarget
from mim.targets.latent import LatentTarget
from tests.factories import cpu_trainer, tiny_encoder
from tests.syncs import count_host_syncs

BATCH = 4
SPEED_KEYS = {
    "speed/samples_per_s",
    "speed/samples_per_s_per_device",
    "speed/data_wait",
    "speed/flops_per_sample",
    "speed/tflops_per_s_per_device",
    "train/grad_norm",
    "train/mask_ratio",
}


class Images(Dataset):
    """``n`` random 3 x 16 x 16 images (the tiny encoder's input)."""

    def __init__(self, n: int) -> None:
        self.x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i]}


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, {name: float})``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), dict(metrics)))


class ScriptedClock:
    """A clock that advances by ``tick`` seconds at every read."""

    def __init__(self, tick: float = 0.5) -> None:
        self.t, self.tick = 100.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def _module() -> PretrainModule:
    return PretrainModule(
        encoder=tiny_encoder(),
        masking=RandomMasking(mask_ratio=0.75),
        targets=[PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=4)],
        batch_size=BATCH,
        warmup_steps=1,
    )


def _fit(
    callback: RunMetrics,
    *,
    steps: int,
    every: int,
    logger: Logger | bool = False,
    fused: bool = True,
    accumulate: int = 1,
) -> PretrainModule:
    module = _module()
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused  # timm's Attention: F.scaled_dot_product_attention, or two matmuls
    trainer = cpu_trainer(
        max_steps=steps,
        log_every_n_steps=every,
        callbacks=[callback],
        logger=logger,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, DataLoader(Images(BATCH * steps * accumulate), batch_size=BATCH, shuffle=False))
    return module


def _f32(x: float) -> float:
    """``x`` as Lightning logs a Python float: a float32 tensor."""
    return float(torch.tensor(x, dtype=torch.float32))


def analytic_train_flops(*, n: int, k: int, prefix: int, p: int, d: int, depth: int, h: int, dd: int, ddepth: int,
                         dh: int) -> int:  # fmt: skip
    """Forward + backward FLOPs per image of an MAE step (benchmarks/flops.py ``analytic_flops()["train"]``).

    ViT block on n tokens: 2 n (4 D^2 + 2 D H) + 4 n^2 D; patch embedding 2 N P D (all N patches); decoder embedding
    2 (K + c) D Dd; decoder blocks on N + c tokens; prediction head 2 (N - K) Dd P; backward 2 x forward, less the
    patch embedding's input gradient.
    """

    def block(tokens: int, dim: int, hidden: int) -> int:
        return 2 * tokens * (4 * dim * dim + 2 * dim * hidden) + 4 * tokens * tokens * dim

    patch = 2 * n * p * d
    forward = (
        patch
        + depth * block(k + prefix, d, h)
        + 2 * (k + prefix) * d * dd
        + ddepth * block(n + prefix, dd, dh)
        + 2 * (n - k) * dd * p
    )
    return 3 * forward - patch


def test_keys_exactly_on_logging_steps_with_scripted_clock():
    callback = RunMetrics()
    callback._clock = ScriptedClock(0.5)  # start / end of every batch: 0.5 s of compute, then 0.5 s of loader wait
    logger = RecordingLogger()
    _fit(callback, steps=6, every=2, logger=logger)

    logged = {step: row for step, row in logger.rows if SPEED_KEYS & row.keys()}
    assert sorted(logged) == [1, 3, 5]  # Lightning's row index: optimizer steps 2, 4 and 6 (0-based 1, 3, 5)
    for row in logged.values():
        assert SPEED_KEYS <= row.keys(), SPEED_KEYS - row.keys()
        assert "speed/mfu" not in row and "memory/peak_gb" not in row  # no peak given; CPU
        assert row["train/mask_ratio"] == 0.75
        assert row["train/grad_norm"] > 0
    # First interval: first batch start -> second batch end = 3 ticks, one wait; later ones: 4 ticks, two waits.
    first, later = logged[1], logged[3]
    assert first["speed/samples_per_s_per_device"] == _f32(2 * BATCH / 1.5)
    assert first["speed/samples_per_s"] == _f32(2 * BATCH / 1.5)  # world size 1
    assert first["speed/data_wait"] == _f32(0.5 / 1.5)
    assert later["speed/samples_per_s_per_device"] == _f32(2 * BATCH / 2.0)
    assert later["speed/data_wait"] == 0.5
    same = SPEED_KEYS - {"train/grad_norm"}
    assert {k: logged[5][k] for k in same} == {k: later[k] for k in same}
    flops = callback.flops_per_sample
    assert later["speed/flops_per_sample"] == _f32(flops)
    assert later["speed/tflops_per_s_per_device"] == _f32(flops * 2 * BATCH / 2.0 / 1e12)
    assert _get_current_dispatch_mode() is None  # the FLOP counter is closed


def test_validation_inside_the_interval_is_left_out():
    callback = RunMetrics()
    callback._clock = ScriptedClock(0.5)  # every read: batch start / end, validation start / end
    module = _module()
    trainer = cpu_trainer(max_steps=4, log_every_n_steps=4, val_check_interval=2, limit_val_batches=1,
                          num_sanity_val_steps=0, callbacks=[callback])  # fmt: skip
    images = DataLoader(Images(4 * BATCH), batch_size=BATCH)
    trainer.fit(module, images, DataLoader(Images(BATCH), batch_size=BATCH))
    # Reads: b1 start, b1 end, b2 start, b2 end, val start, val end, b3 start, b3 end, b4 start, b4 end: 9 ticks of
    # which 1 is validation; waits: b2 0.5 s, b3 0.5 + 0.5 s around the validation, b4 0.5 s.
    assert callback.last_interval == IntervalTiming(steps=4, samples=4 * BATCH, seconds=4.0, wait_seconds=2.0)
    assert float(trainer.callback_metrics["speed/data_wait"]) == 0.5


@pytest.mark.parametrize(("fused", "accumulate"), [(True, 1), (False, 1), (True, 2)])
def test_flops_per_sample_equals_the_analytic_count(fused: bool, accumulate: int):
    """Fused attention (CPU's flash op) or two matmuls count the same; accumulated micro-batches all count."""
    callback = RunMetrics()
    module = _fit(callback, steps=2, every=1, fused=fused, accumulate=accumulate)
    encoder, decoder = module.encoder, module.target_list[0].decoder
    assert encoder.vit.blocks[0].attn.fused_attn == fused
    timing = callback.last_interval
    assert timing is not None and (timing.steps, timing.samples) == (1, accumulate * BATCH)
    n = encoder.grid.num_tokens
    expected = analytic_train_flops(
        n=n,
        k=int(n * 0.25),
        prefix=encoder.num_prefix_tokens,
        p=4 * 4 * 3,
        d=encoder.embed_dim,
        depth=len(encoder.vit.blocks),
        h=encoder.vit.blocks[0].mlp.fc1.out_features,
        dd=32,
        ddepth=1,
        dh=decoder.decoder_blocks[0].mlp.fc1.out_features,
    )
    assert callback.flops_per_sample == expected
    assert RunMetrics(count_flops=False).flops_per_sample is None


def test_speed_is_samples_over_measured_time_and_mfu_needs_a_peak():
    callback = RunMetrics(peak_tflops=1e-6)
    start = time.perf_counter()
    module = _fit(callback, steps=4, every=2)
    elapsed = time.perf_counter() - start
    timing = callback.last_interval
    assert timing is not None and timing.steps == 2 and timing.samples == 2 * BATCH
    assert 0 < timing.wait_seconds < timing.seconds <= elapsed
    metrics = module.trainer.callback_metrics
    per_device = timing.samples / timing.seconds
    assert float(metrics["speed/samples_per_s"]) == _f32(per_device) > 0
    assert 0 <= float(metrics["speed/data_wait"]) == _f32(timing.wait_seconds / timing.seconds) <= 1
    tflops = callback.flops_per_sample * per_device / 1e12
    assert float(metrics["speed/tflops_per_s_per_device"]) == _f32(tflops)
    assert float(metrics["speed/mfu"]) == _f32(tflops / 1e-6)


class SyncCountingRunMetrics(RunMetrics):
    """RunMetrics whose every hook runs under ``count_host_syncs``: only the callback's own calls are counted."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.syncs: list[str] = []

    def _counted(self, hook: str, *args: Any) -> None:
        with count_host_syncs() as syncs:
            getattr(super(), hook)(*args)
        self.syncs += syncs.calls

    def on_train_batch_start(self, *args: Any) -> None:
        self._counted("on_train_batch_start", *args)

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._counted("on_before_optimizer_step", *args)

    def on_train_batch_end(self, *args: Any) -> None:
        self._counted("on_train_batch_end", *args)


@pytest.mark.parametrize("every", [100, 1])
def test_no_host_syncs_in_the_callback(every: int):
    """Steps that do not log (every=100) make none; logging steps neither: Lightning reads the values at its flush."""
    callback = SyncCountingRunMetrics(peak_tflops=1.0)
    _fit(callback, steps=3, every=every)
    assert callback.syncs == []
    assert callback.flops_per_sample is not None


def test_mask_ratio_and_ema_momentum_of_parts():
    assert mask_ratio_of(RandomMasking(mask_ratio=0.6), 0.5) == 0.6
    assert mask_ratio_of(DualMasking(encoder=TubeMasking(mask_ratio=0.9)), 0.5) == 0.9

    class Scheduled:
        def mask_ratio_at(self, progress: float) -> float:
            return 0.5 + 0.25 * progress

    assert mask_ratio_of(Scheduled(), 0.5) == 0.625
    assert mask_ratio_of(object(), 0.5) is None
    latent = LatentTarget(predictor_dim=32, predictor_depth=1, momentum=(0.9, 1.0), momentum_ramp=1.0)
    assert ema_momentum_of(latent, 0.5) == latent.momentum_at(0.5)
    hard = HardPatchTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=4, ema_ramp=0.5)
    start, end = hard.ema_momentum
    assert ema_momentum_of(hard, 1.0) == end and ema_momentum_of(hard, 0.0) == start
    assert ema_momentum_of(PixelTarget(), 0.5) is None


def test_constructor_presets_and_validation():
    assert RunMetrics().peak_tflops is None
    assert RunMetrics(device="h100").peak_tflops == PEAK_TFLOPS["h100"] == 989.4
    assert RunMetrics(device="a100").peak_tflops == 312.0
    assert RunMetrics(peak_tflops=100).peak_tflops == 100.0
    with pytest.raises(ValueError, match=r"RunMetrics.device must be one of"):
        RunMetrics(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"RunMetrics.peak_tflops must be a finite number > 0, got 0"):
        RunMetrics(peak_tflops=0)
    with pytest.raises(ValueError, match=r"RunMetrics.peak_tflops must be None when device is set"):
        RunMetrics(device="h100", peak_tflops=100.0)
    with pytest.raises(ValueError, match=r"RunMetrics.count_flops must be True or False"):
        RunMetrics(count_flops=1)  # type: ignore[arg-type]
