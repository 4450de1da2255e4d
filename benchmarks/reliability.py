"""What reliability costs: atomic checksummed checkpoint writes, verification, per-sample seeding, the non-finite check.

Each comparison runs both sides in interleaved rounds (order alternating) in one process and reports the medians and
their ratio (this machine is shared and noisy):

* **save**: Lightning's ``TorchCheckpointIO.save_checkpoint`` vs mim's ``AtomicCheckpointIO`` (temporary file, fsync,
  SHA-256 sidecar, rename) on a checkpoint of ``--mb`` megabytes of fp32 tensors;
* **verify**: ``mim.checkpoint.verify_checkpoint`` (re-read and hash) vs ``torch.load`` of the same file;
* **seeded sample**: one Fashion-MNIST sample through the MAE training transform under ``seeded_draws`` (per-sample
  seeds, what makes resume exact) vs the same transform on the global generator;
* **guarded step**: a tiny ViT's AdamW step through ``NonFiniteGuard.step_is_finite`` (max-abs norm of the gradients,
  one host read) vs the step alone (on CPU the host read is free: on a GPU it is one sync per optimizer step).

    .venv/bin/python benchmarks/reliability.py [--mb 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mim.checkpoint import verify_checkpoint
from mim.data.base import seeded_draws
from mim.data.transforms import mae_train_transform
from mim.distributed import AtomicCheckpointIO
from mim.optim import NonFiniteGuard


def _median_seconds(fn: Callable[[], object], repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def interleaved(a: Callable[[], object], b: Callable[[], object], rounds: int, repeat: int = 1) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b`` over ``rounds`` rounds, alternating which runs first."""
    ta, tb = [], []
    for r in range(rounds):
        pair = [(a, ta), (b, tb)] if r % 2 == 0 else [(b, tb), (a, ta)]
        for fn, out in pair:
            out.append(_median_seconds(fn, repeat))
    return statistics.median(ta), statistics.median(tb)


def row(name: str, ours: float, theirs: float, unit: str = "ms", scale: float = 1e3) -> None:
    print(f"| {name} | {ours * scale:.3g} {unit} | {theirs * scale:.3g} {unit} | {ours / theirs:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="checkpoint size in MB")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print("| what | mim | baseline | ratio |")
    print("|---|---|---|---|")
    n = args.mb * 2**20 // 4 // 16
    checkpoint = {"state_dict": {f"w{i}": torch.randn(n) for i in range(16)}, "global_step": 1}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        atomic, plain = AtomicCheckpointIO(), TorchCheckpointIO()
        ours, theirs = interleaved(
            lambda: atomic.save_checkpoint(checkpoint, folder / "atomic.ckpt"),
            lambda: plain.save_checkpoint(checkpoint, folder / "plain.ckpt"),
            args.rounds,
        )
        row(f"save a {args.mb} MB checkpoint (atomic + SHA-256 vs Lightning)", ours, theirs)
        path = folder / "atomic.ckpt"
        ours, theirs = interleaved(
            lambda: verify_checkpoint(path), lambda: torch.load(path, weights_only=True), args.rounds
        )
        row(f"verify a {args.mb} MB checkpoint (vs torch.load)", ours, theirs)

    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    transform = mae_train_transform(28, scale=(0.2, 1.0))
    counter = iter(range(10**9))

    def seeded() -> None:
        with seeded_draws(next(counter)):
            transform(image)

    ours, theirs = interleaved(seeded, lambda: transform(image), args.rounds, repeat=500)
    row("one 28x28 sample through the MAE transform (per-sample seed vs global RNG)", ours, theirs, "us", 1e6)

    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(32, 256)).square().mean().backward()
    guard = NonFiniteGuard("bench", mode="skip", max_consecutive=5)

    def guarded() -> None:
        if guard.step_is_finite(model.parameters(), lambda t: t):
            optimizer.step()

    ours, theirs = interleaved(guarded, optimizer.step, args.rounds, repeat=50)
    row("AdamW step of 0.5M parameters (non-finite check vs none)", ours, theirs, "us", 1e6)


if __name__ == "__main__":
    main()
