"""GPU smoke benchmark: MAE ViT-B/16 for a few hundred steps under ddp, ZeRO-2 and ZeRO-3, bf16, on one GPU.

For every strategy piece in ``recipes/_base/`` it names (default ``ddp``, ``deepspeed_stage_2``,
``deepspeed_stage_3``), the script runs the user's own path in a fresh process::

    python -m mim fit -c recipes/mae/vit_b16_in1k.yaml -c recipes/_base/<strategy>.yaml -c recipes/_base/bf16.yaml \\
        --data gpu_smoke.SyntheticImages ... --trainer.max_steps N --trainer.callbacks '[gpu_smoke.SmokeTimer]'

i.e. the production MAE recipe (ViT-B/16, 224 px, mask 0.75, decoder 8 x 512, norm-pix, AdamW), with the data
swapped for :class:`SyntheticImages`: smooth random uint8 images made once on the device (low-resolution noise,
bilinearly upsampled, so the loss has structure to learn and falls), normalised on the device as every mim
datamodule does. :class:`SmokeTimer` times the steps after ``--warmup`` (one device synchronisation at each end,
none per step), reads ``torch.cuda.max_memory_allocated`` and the first and last loss, and writes a JSON record.
The script prints one row per strategy: images/s, achieved TFLOP/s and MFU (58.7 GFLOP per image for a MAE
ViT-B/16 training step, 3 x the 19.56 GFLOP forward of the official models_mae.py (BENCHMARKS.md, "FLOPs per
image"), against the H100/H200 dense bf16 peak of 989.4 TFLOP/s), peak memory, first and last loss, wall time.
All runs start from the same seed, so their first losses agree (to bf16 noise).

``--cpu-dry-run`` runs the same code path on the CPU in seconds: a tiny encoder and decoder, 32 px images,
3 steps, ``ddp`` (tests/test_launch.py runs it). Lightning's DeepSpeedStrategy refuses a CPU accelerator; with a
CPU-capable subclass the ZeRO rows run on the CPU too, e.g. ``--cpu-dry-run --strategies deepspeed_stage_2,
deepspeed_stage_3 --deepspeed-class mim.distributed.DeepSpeedStrategy``.

    benchmarks/gpu_smoke.sh [--steps 300] [--warmup 30] [--batch-size 128] [--strategies ddp,deepspeed_stage_2,...]
    benchmarks/gpu_smoke.sh --cpu-dry-run

Records go to ``$OUT/gpu_smoke.jsonl`` (or ``--out``), with each run's log next to them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mim.data.base import ImageDataModule
from mim.types import Batch

ROOT = Path(__file__).resolve().parent.parent
MAE_VIT_B_GFLOP_PER_IMAGE = 58.7  # forward + backward, 224 px, mask 0.75, decoder 8 x 512 (3 x forward; BENCHMARKS.md)
PEAK_BF16_TFLOPS = 989.4  # H100 / H200 SXM dense bf16 spec


class _PooledBatches(Dataset):
    """``length`` batches of a small pool of pre-made batches, served round-robin without collation.

    The DataLoader keeps a batch sampler of ``batch_size`` (Lightning's DeepSpeed strategy reads its ``batch_size``)
    and fetches each batch with one :meth:`__getitems__` call, which returns the pool entry as is.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, length: int) -> None:
        self.images, self.labels, self.length = images, labels, length  # (P, B, C, H, W) uint8, (P, B)
        self.batch_size = images.shape[1]

    def __len__(self) -> int:
        return self.length * self.batch_size

    def __getitem__(self, index: int) -> Batch:
        slot, row = divmod(index, self.batch_size)
        slot %= self.images.shape[0]
        return {"image": self.images[slot, row], "label": self.labels[slot, row]}  # (C, H, W), ()

    def __getitems__(self, indices: list[int]) -> Batch:
        slot = (indices[0] // self.batch_size) % self.images.shape[0]
        return {"image": self.images[slot], "label": self.labels[slot]}  # (B, C, H, W), (B,)


def _as_is(batch: Batch) -> Batch:
    return batch


class SyntheticImages(ImageDataModule):
    """Smooth random uint8 images made once on the training device; batches are served without copies or collation.

    Args:
        batch_size: images per device and step.
        image_size: side of the square images.
        in_chans: channels C.
        num_pool: distinct batches in the pool (served round-robin).
        length: batches per epoch (set it >= the steps of the run).
        seed: seeds the pool.
    """

    def __init__(
        self,
        *,
        batch_size: int = 128,
        image_size: int = 224,
        in_chans: int = 3,
        num_pool: int = 8,
        length: int = 100_000,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            image_size=image_size,
            in_chans=in_chans,
            mean=(0.5,) * in_chans,
            std=(0.25,) * in_chans,
            num_classes=1,
            seed=seed,
        )
        self.num_pool, self.length = num_pool, length

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        shape = (self.num_pool * self.batch_size, self.in_chans, 8, 8)
        low = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(self.seed)).float()  # (P*B, C, 8, 8)
        size = (self.image_size, self.image_size)
        images = F.interpolate(low.to(device), size=size, mode="bilinear", align_corners=False)  # (P*B, C, H, W)
        images = images.round_().clamp_(0, 255).to(torch.uint8)
        images = images.view(self.num_pool, self.batch_size, self.in_chans, *size)  # (P, B, C, H, W)
        labels = torch.zeros(self.num_pool, self.batch_size, dtype=torch.int64, device=device)  # (P, B)
        return _PooledBatches(images, labels, self.length), None

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return DataLoader(self.train_dataset, batch_size=self.batch_size, drop_last=True, collate_fn=_as_is)


class SmokeTimer(L.Callback):
    """Times the steps after ``warmup`` and records throughput, peak memory and the first and last loss.

    Args:
        warmup: steps excluded from the timing (kernel selection, allocator growth, DeepSpeed's first gathers).
        out: JSON file written by global rank 0 at the last step.
        label: the strategy name to record.
    """

    def __init__(self, *, warmup: int, out: str, label: str) -> None:
        self.warmup, self.out, self.label = warmup, out, label
        self.t0 = 0.0
        self.first: torch.Tensor | None = None
        self.last: torch.Tensor | None = None

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.warmup:
            self._sync(pl_module.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        loss = outputs["loss"].detach()  # kept on the device: no host sync per step
        self.first = loss if self.first is None else self.first
        self.last = loss
        if trainer.global_step < trainer.max_steps:
            return
        self._sync(pl_module.device)
        seconds = time.perf_counter() - self.t0
        steps = trainer.max_steps - self.warmup
        images = steps * batch["image"].shape[0] * trainer.world_size
        cuda = pl_module.device.type == "cuda"
        record = {
            "strategy": self.label,
            "device": torch.cuda.get_device_name(pl_module.device) if cuda else platform.processor() or "cpu",
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "batch_per_device": batch["image"].shape[0],
            "timed_steps": steps,
            "seconds": seconds,
            "images_per_s": images / seconds,
            "peak_memory_GiB": torch.cuda.max_memory_allocated(pl_module.device) / 2**30 if cuda else None,
            "peak_reserved_GiB": torch.cuda.max_memory_reserved(pl_module.device) / 2**30 if cuda else None,
            "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "first_loss": float(self.first),  # type: ignore[arg-type]
            "last_loss": float(loss),
        }
        if trainer.is_global_zero:
            Path(self.out).write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------------- driver
_TINY_MODEL = {
    "encoder": {
        "class_path": "mim.models.MaskedEncoder",
        "init_args": {
            "arch": "vit_base_patch16_224",
            "img_size": 32,
            "patch_size": 8,
            "in_chans": 3,
            "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2},
        },
    },
    "targets": [
        {
            "class_path": "mim.targets.PixelTarget",
            "init_args": {"decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, "norm_pix": True},
        }
    ],
}


def fit_command(strategy: str, result: Path, args: argparse.Namespace) -> list[str]:
    """The ``mim fit`` command line of one run."""
    data = {
        "class_path": "gpu_smoke.SyntheticImages",
        "init_args": {"batch_size": args.batch_size, "image_size": 32 if args.cpu_dry_run else 224},
    }
    timer = {
        "class_path": "gpu_smoke.SmokeTimer",
        "init_args": {"warmup": args.warmup, "out": str(result), "label": strategy},
    }
    command = [sys.executable, "-m", "mim", "fit", "-c", str(args.recipe)]
    command += ["-c", str(ROOT / "recipes" / "_base" / f"{strategy}.yaml")]
    if args.precision == "bf16-mixed":
        command += ["-c", str(ROOT / "recipes" / "_base" / "bf16.yaml")]
    else:
        command.append(f"--trainer.precision={args.precision}")
    if args.deepspeed_class and strategy.startswith("deepspeed"):
        command.append(f"--trainer.strategy.class_path={args.deepspeed_class}")
    command += [
        f"--data={json.dumps(data)}",
        f"--trainer.callbacks={json.dumps([timer])}",  # replaces the recipe's checkpoint / lr-monitor callbacks
        f"--trainer.max_steps={args.steps}",
        f"--trainer.accelerator={'cpu' if args.cpu_dry_run else 'gpu'}",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={result.parent / strategy}",
        "--model.init_args.warmup_steps=10",  # the recipe's 40-epoch warmup would keep the lr near 0 in a short run
    ]
    if args.cpu_dry_run:
        command += [f"--model.init_args.{key}={json.dumps(value)}" for key, value in _TINY_MODEL.items()]
    return command


def _row(record: dict[str, Any], full_size: bool) -> str:
    ips = record["images_per_s"]
    flops = (
        f"{ips * MAE_VIT_B_GFLOP_PER_IMAGE / 1e3:8.1f} {ips * MAE_VIT_B_GFLOP_PER_IMAGE / 1e3 / PEAK_BF16_TFLOPS:6.1%}"
    )
    memory = record["peak_memory_GiB"] if record["peak_memory_GiB"] is not None else record["peak_rss_GiB"]
    return (
        f"{record['strategy']:<20} {ips:10.1f} {flops if full_size else '       -      -'} {memory:9.2f}"
        f"   {record['first_loss']:.4f} -> {record['last_loss']:.4f} {record['wall_s']:8.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--strategies",
        default=None,
        help="recipes/_base pieces [ddp,deepspeed_stage_2,deepspeed_stage_3; dry run: ddp]",
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per strategy (incl. warmup)")
    parser.add_argument("--warmup", type=int, default=30, help="steps excluded from the timing")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step on the GPU")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "mae" / "vit_b16_in1k.yaml")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per strategy before it is stopped")
    parser.add_argument("--out", type=Path, default=None, help="records and logs [$OUT, else a temporary folder]")
    parser.add_argument(
        "--precision", default="bf16-mixed", help="bf16-mixed (recipes/_base/bf16.yaml) or e.g. 32-true"
    )
    parser.add_argument(
        "--deepspeed-class",
        default=None,
        help="class_path replacing the DeepSpeed pieces' strategy class (a CPU-capable subclass for a dry run)",
    )
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny model, 3 steps, ddp (by default) on the CPU")
    args = parser.parse_args(argv)
    if args.cpu_dry_run:
        args.steps, args.warmup, args.batch_size = min(args.steps, 3), min(args.warmup, 1), min(args.batch_size, 4)
        args.strategies = args.strategies or "ddp"  # Lightning's DeepSpeedStrategy refuses a CPU: see --deepspeed-class
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --cpu-dry-run")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_smoke_"))
    out.mkdir(parents=True, exist_ok=True)
    strategies = [
        s.strip() for s in (args.strategies or "ddp,deepspeed_stage_2,deepspeed_stage_3").split(",") if s.strip()
    ]
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu_dry_run else "cpu"
    print(
        f"gpu_smoke: {device}, torch {torch.__version__}, lightning {L.__version__}, deepspeed "
        f"{'yes' if has_deepspeed else 'not installed'}; {args.steps} steps ({args.warmup} warm-up), "
        f"batch {args.batch_size}, {args.precision}; logs in {out}",
        flush=True,
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("WANDB_MODE", "disabled")
    rows, failed = [], []
    for strategy in strategies:
        if strategy.startswith("deepspeed") and not has_deepspeed:
            print(f"  {strategy}: skipped (deepspeed is not installed)", flush=True)
            failed.append(strategy)
            continue
        result, log = out / f"{strategy}.json", out / f"{strategy}.log"
        result.unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            with log.open("w") as handle:
                run = subprocess.run(
                    fit_command(strategy, result, args),
                    cwd=ROOT,
                    env=env,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=args.timeout,
                )
            code = run.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        wall = time.perf_counter() - start
        if code != 0 or not result.is_file():
            tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-15:])
            print(f"  {strategy}: FAILED ({code}) after {wall:.0f} s; last lines of {log}:\n    {tail}", flush=True)
            failed.append(strategy)
            continue
        record = {**json.loads(result.read_text()), "wall_s": wall, "cpu_dry_run": args.cpu_dry_run}
        with (out / "gpu_smoke.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        rows.append(record)
        print(f"  {strategy}: {record['images_per_s']:.1f} images/s, {wall:.0f} s", flush=True)
    memory = "peak GiB" if not args.cpu_dry_run else "RSS GiB"
    print(
        f"\n{'strategy':<20} {'images/s':>10} {'TFLOP/s':>8} {'MFU':>6} {memory:>9}   loss first -> last  {'wall s':>8}"
    )
    for record in rows:
        print(_row(record, full_size=not args.cpu_dry_run))
    if len(rows) > 1:
        spread = max(r["first_loss"] for r in rows) - min(r["first_loss"] for r in rows)
        print(f"first-loss spread across strategies: {spread:.2e} (same seed and data: should be ~bf16 noise)")
    if failed:
        print(f"failed or skipped: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
