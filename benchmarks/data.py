"""C7: images/s of the ShardDataModule loader vs torchvision ImageFolder + DataLoader (same MAE transforms).

Generates N synthetic noisy-texture 500x375 JPEGs (q90) in a temp dir, packs them with ``mim pack``, then
times full passes of both loaders in interleaved rounds (the order shuffled per round) for each
``num_workers``; reports img/s (best round), img/s per core (workers, or 1 for 0 workers), and the ratio of
the best rounds. Both yield (B, 3, 224, 224) uint8 batches (no ToTensor/Normalize on the CPU).

    .venv/bin/python benchmarks/data.py [--images 1000] [--rounds 3] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from mim.data.pack import pack
from mim.data.shards import ShardDataModule
from mim.data.transforms import mae_train_transform


def make_corpus(root: Path, num_images: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (47, 63, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(base).resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:05d}.jpg", quality=90)


def time_pass(loader: DataLoader) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        assert images.dtype == torch.uint8
        n += images.shape[0]
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=50)
    a = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root / "images", a.images)
        mb = sum(p.stat().st_size for p in (root / "images").rglob("*.jpg")) / a.images / 1024
        pack(root / "images", root / "shards", shard_size="16MB", progress=False)
        print(f"corpus: {a.images} JPEGs 500x375 q90, {mb:.0f} KB average; batch {a.batch_size}, 224 px")
        print(f"{'workers':>7} {'loader':>22} {'best img/s':>10} {'img/s/core':>10}")
        for workers in a.workers:
            dm = ShardDataModule(
                urls=str(root / "shards"),
                image_size=224,
                batch_size=a.batch_size,
                num_workers=workers,
                shuffle_buffer=200,
            )
            shards = dm.train_dataloader()
            folder = DataLoader(
                ImageFolder(str(root / "images"), transform=mae_train_transform(224)),
                batch_size=a.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=workers,
                persistent_workers=workers > 0,
            )
            times: dict[str, list[float]] = {"ShardDataModule": [], "ImageFolder+DataLoader": []}
            loaders = {"ShardDataModule": shards, "ImageFolder+DataLoader": folder}
            for name in loaders:  # warm-up (worker start, page cache)
                time_pass(loaders[name])
            for r in range(a.rounds):
                order = list(loaders)
                random.Random(r).shuffle(order)
                for name in order:
                    seconds, n = time_pass(loaders[name])
                    times[name].append(n / seconds)
            cores = max(workers, 1)
            for name, rates in times.items():
                print(f"{workers:>7} {name:>22} {max(rates):>10.0f} {max(rates) / cores:>10.0f}")
            ratio = max(times["ShardDataModule"]) / max(times["ImageFolder+DataLoader"])
            print(f"{workers:>7} {'ratio (best rounds)':>22} {ratio:>10.2f}x")


if __name__ == "__main__":
    main()
