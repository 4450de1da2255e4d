"""Mask-generation cost per image for every masking strategy, and its share of a training step (the performance
target: masks drawn inside the step cost ≤ 1 % of it).

For every strategy in ``mim.masking`` (those added later — hard-patch, dual / running-cell, feature subsets — are
timed when they import, and listed as absent otherwise) the script times one call at batch 256 on one thread,
on the token grid the strategy is meant for:

* images, 14 x 14 (ViT-B/16 at 224 px): random, multi-block, colored noise, hard-patch (random scores);
* video, 8 x 14 x 14 (16 frames, tubelet 2): tube, dual, running-cell, V-JEPA's two masks (K: the first mask's);
* tables, 1 x 1 x 54 (54 features): feature subsets.

In the same process and in the same interleaved rounds (the order shuffled every round), it times one MAE
ViT-B/16 training step (``MaskedEncoder`` + ``PixelTarget`` decoder 8 x 512, forward + backward, 224 px,
default batch 4, also one thread) and reports, per strategy, the median and minimum microseconds per image,
the ratio to random masking, and the share of the step per image: ``t_mask / t_step``. Interference from other
jobs only adds time, so the minima are the robust figures on a shared machine (see BENCHMARKS.md).

One CPU thread is the wrong yardstick for a GPU step, so the script also prints the GPU budget: at a target
of 40 % MFU for MAE ViT-B on one H100 (58.7 GFLOP per image against 989.4 TFLOP/s dense bf16: 6,742 img/s), a
step costs 148 µs per image and 1 % of it is 1.48 µs per image. The last column divides each strategy's time per
image by those 148 µs: the share of an H100 step the masks would take if drawn at the measured speed in the step's
critical path (with ``--device cpu``: on one host thread; it is also the fraction of one host core needed to keep
up, e.g. in a DataLoader worker). In training, mim draws the masks on the step's device (the generator lives
there), so for a GPU run the relevant figure is that column with ``--device cuda`` (masks timed on the GPU,
synchronised; the step stays on the CPU, ``--step-batch 0`` skips it).

    .venv/bin/python benchmarks/masking.py [--batch-size 256] [--rounds 15] [--step-batch 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mim.masking.base import MaskingStrategy  # noqa: E402
from mim.types import Masks, TokenGrid  # noqa: E402

IMAGE = TokenGrid(1, 14, 14)
VIDEO = TokenGrid(8, 14, 14)
TABLE = TokenGrid(1, 1, 54)
H100_VIT_B_IMG_S = 6742.0  # MAE ViT-B/16 at 40 % MFU on one H100: 0.4 x 989.4 TFLOP/s (bf16 dense) / 58.7 GFLOP


@dataclass
class Case:
    """One strategy on one grid, with its timings (seconds per call)."""

    name: str
    grid: TokenGrid
    build: Callable[[], MaskingStrategy | Callable[..., torch.Tensor]]
    strategy: MaskingStrategy | Callable[..., torch.Tensor] | None = None
    scores: torch.Tensor | None = None
    generator: torch.Generator | None = None
    num_visible: int = 0
    error: str = ""
    times: list[float] = field(default_factory=list)


def _lazy(name: str) -> Callable[[], type]:
    def get() -> type:
        import mim.masking

        return getattr(mim.masking, name)  # ImportError (ModuleNotFoundError) while the module does not exist

    return get


def cases() -> list[Case]:
    from mim.masking import MultiBlockMasking, RandomMasking, TubeMasking

    colored = _lazy("ColoredNoiseMasking")
    out = [
        Case("RandomMasking(mask_ratio=0.75)", IMAGE, lambda: RandomMasking(mask_ratio=0.75)),
        Case("MultiBlockMasking() (I-JEPA)", IMAGE, lambda: MultiBlockMasking()),
        Case("ColoredNoiseMasking(color=green)", IMAGE, lambda: colored()(color="green")),
        Case(
            "ColoredNoiseMasking(green, official sampling)",
            IMAGE,
            lambda: colored()(color="green", sample_mode="official_prefix", window="shared"),
        ),
        Case("HardPatchMasking() (random scores)", IMAGE, lambda: _lazy("HardPatchMasking")()()),
        Case("TubeMasking(mask_ratio=0.9)", VIDEO, lambda: TubeMasking(mask_ratio=0.9)),
        Case("DualMasking()", VIDEO, lambda: _lazy("DualMasking")()()),
        Case("RunningCellMasking()", VIDEO, lambda: _lazy("RunningCellMasking")()()),
        Case("MultiMasking() (V-JEPA: two complement masks)", VIDEO, lambda: _lazy("MultiMasking")()()),
        Case("FeatureSubsetMasking()", TABLE, lambda: _lazy("FeatureSubsetMasking")()()),
    ]
    return out


def prepare(case: Case, batch_size: int, device: torch.device) -> None:
    """Build the strategy and make one untimed call (loads the colored-noise bank, warms allocator caches)."""
    try:
        case.strategy = case.build()
    except ImportError as err:
        case.error = f"not available ({err.name or err})"
        return
    except Exception as err:  # a strategy whose defaults need arguments: report it, time the others
        case.error = f"not built: {type(err).__name__}: {err}"
        return
    case.generator = torch.Generator(device=device).manual_seed(0)
    if getattr(case.strategy, "needs_scores", False):
        g = torch.Generator(device=device).manual_seed(1)
        case.scores = torch.rand(batch_size, case.grid.num_tokens, generator=g, device=device)
    try:
        masks = call(case, batch_size, device)
    except Exception as err:
        case.error = f"failed: {type(err).__name__}: {err}"
        case.strategy = None
        return
    # K: visible tokens; for RunningCellMasking (a decoder-mask helper returning (B, Kd)) the decoder-kept count
    case.num_visible = masks.visible.shape[1] if isinstance(masks, Masks) else masks.shape[-1]


def call(case: Case, batch_size: int, device: torch.device) -> Masks | torch.Tensor:
    assert case.strategy is not None and case.generator is not None
    extra = {} if case.scores is None else {"scores": case.scores}  # helpers without a scores argument too
    return case.strategy(batch_size, case.grid, generator=case.generator, device=device, **extra)


def build_step(batch_size: int) -> Callable[[], None]:
    """One MAE ViT-B/16 training step (forward + backward, fp32, on the CPU); returns a closure that runs it."""
    from mim.masking import RandomMasking
    from mim.models.encoder import MaskedEncoder
    from mim.targets.pixels import PixelTarget

    torch.manual_seed(0)
    encoder = MaskedEncoder(arch="vit_base_patch16_224", img_size=224, patch_size=16)
    target = PixelTarget(decoder_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix=True)
    target.bind(encoder)
    params = [p for m in (encoder, target) for p in m.parameters() if p.requires_grad]
    batch = {"image": torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    masking = RandomMasking(mask_ratio=0.75)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        masks = masking(batch_size, encoder.grid, generator=gen, device=torch.device("cpu"))
        latent = encoder(encoder.inputs(batch), masks.visible)  # (B, 1+K, D)
        target(batch, masks, latent, encoder)["loss"].backward()
        for p in params:
            p.grad = None

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256, help="masks per call (default 256)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--calls", type=int, default=10, help="mask calls per strategy per round (default 10)")
    parser.add_argument("--step-batch", type=int, default=4, help="images per ViT-B step (default 4; 0: no step)")
    parser.add_argument("--step-every", type=int, default=3, help="time one step every N rounds (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for masks and step (default 1)")
    parser.add_argument("--device", default="cpu", help="device of the masks (cpu or cuda; the step is always CPU)")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    all_cases = cases()
    for case in all_cases:
        prepare(case, a.batch_size, device)
    live = [c for c in all_cases if c.strategy is not None]
    step = build_step(a.step_batch) if a.step_batch > 0 else None
    step_times: list[float] = []
    if step is not None:
        step()  # warm-up
    rng = random.Random(0)
    for r in range(a.rounds):
        jobs: list[object] = list(live)
        if step is not None and r % a.step_every == 0:
            jobs.append("step")
        rng.shuffle(jobs)
        for job in jobs:
            if job == "step":
                assert step is not None
                t0 = time.perf_counter()
                step()
                step_times.append(time.perf_counter() - t0)
                continue
            assert isinstance(job, Case)
            sync()
            t0 = time.perf_counter()
            for _ in range(a.calls):
                call(job, a.batch_size, device)
            sync()
            job.times.append((time.perf_counter() - t0) / a.calls)

    us = lambda seconds, n: seconds / n * 1e6
    step_med = us(statistics.median(step_times), a.step_batch) if step_times else float("nan")
    step_min = us(min(step_times), a.step_batch) if step_times else float("nan")
    budget_us = 1e6 / H100_VIT_B_IMG_S
    print(
        f"mim mask generation (target: ≤ 1 % of a step): batch {a.batch_size} on {device} "
        f"({a.threads} thread{'s' if a.threads > 1 else ''}), {a.rounds} interleaved rounds x {a.calls} calls"
    )
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    if step_times:
        print(
            f"MAE ViT-B/16 training step on the CPU (MaskedEncoder + PixelTarget 8 x 512, fwd + bwd, fp32, 224 px, "
            f"batch {a.step_batch}, {a.threads} thread{'s' if a.threads > 1 else ''}): median {step_med / 1e3:.1f} ms "
            f"per image, min {step_min / 1e3:.1f} ms ({len(step_times)} steps)"
        )
    print(
        f"GPU budget: at {H100_VIT_B_IMG_S:,.0f} img/s (the target for MAE ViT-B on one H100: 40 % MFU) a step costs "
        f"{budget_us:.0f} µs per image; 1 % of it is {budget_us / 100:.2f} µs per image "
        f"({budget_us / 100 * 512 / 1e3:.2f} ms per step at 512 images per GPU)"
    )
    print()
    random_case = next((c for c in live if c.name.startswith("RandomMasking")), None)
    ref = us(min(random_case.times), a.batch_size) if random_case else float("nan")
    header = (
        "| strategy | grid (T x H x W) | K | µs/img median | µs/img min | min vs random | "
        "% of the CPU ViT-B step (min/min) | % of an H100 ViT-B step (148 µs/img) at this speed |"
    )
    print(header)
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for case in all_cases:
        grid = "x".join(map(str, case.grid.shape))
        if case.strategy is None:
            print(f"| {case.name} | {grid} | | {case.error} | | | | |")
            continue
        med = us(statistics.median(case.times), a.batch_size)
        low = us(min(case.times), a.batch_size)
        share = f"{100 * low / step_min:.4f} %" if step_times else "n/a"
        core = f"{100 * low / budget_us:.1f} %"
        print(
            f"| {case.name} | {grid} | {case.num_visible} | {med:.2f} | {low:.2f} | {low / ref:.2f}x | {share} | "
            f"{core} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
