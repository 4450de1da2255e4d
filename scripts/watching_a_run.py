"""The README's "Watching a run" figure, from a real offline wandb run: its logged reconstruction picture next to the
loss and speed curves of its history (read with :func:`mim.run_logging.read_offline_run`, no network).

    WANDB_MODE=offline mim fit -c recipes/debug/mae_fashion_mnist.yaml --trainer.default_root_dir=runs/watch \\
        --trainer.max_epochs=12 --trainer.log_every_n_steps=4 \\
        '--trainer.callbacks+={"class_path":"mim.callbacks.RunPictures","init_args":{"every_n_steps":96}}'
    python scripts/watching_a_run.py runs/watch/wandb/offline-run-* docs/images/watching_a_run.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

from mim.run_logging import read_offline_run


def main(folder: str, out: str) -> None:
    run = read_offline_run(folder)
    rows = [r for r in run.history if "train/loss" in r]
    speed = [r for r in run.history if "speed/samples_per_s" in r]
    picture = sorted(Path(folder, "files", "media", "images").rglob("reconstruction_*.png"))[-1]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    axes[0].imshow(Image.open(picture), cmap="gray")
    axes[0].set_title("pictures/reconstruction\n(input | masked | reconstruction)", fontsize=9)
    axes[0].axis("off")
    axes[1].plot([r["trainer/global_step"] for r in rows], [r["train/loss"] for r in rows])
    axes[1].set(title="train/loss", xlabel="step")
    axes[2].plot([r["trainer/global_step"] for r in speed], [r["speed/samples_per_s"] for r in speed], label="samples/s")
    axes[2].set(title="speed/samples_per_s (data wait on the right)", xlabel="step")
    twin = axes[2].twinx()
    twin.plot([r["trainer/global_step"] for r in speed], [r["speed/data_wait"] for r in speed], color="tab:orange")
    twin.set_ylim(0, 1)
    figure.suptitle(f"offline wandb run {run.run_id} ({Path(folder).name}), read back with read_offline_run", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
