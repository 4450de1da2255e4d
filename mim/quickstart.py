"""``mim quickstart``: pretrain a small ViT with MAE on Fashion-MNIST on CPU, then show that it learned.

Steps: (1) MAE pretraining with ``recipes/quickstart.yaml`` (a Lightning run with a progress bar and a
checkpoint); (2) a linear probe on frozen features of the pretrained encoder, of the same encoder at random
initialisation, and of raw pixels; (3) a short fine-tune (``recipes/quickstart_finetune.yaml``) of the pretrained
encoder and of the same encoder from random init, same steps; (4) a PNG grid original | masked | reconstruction and a
loss curve. The pretraining and fine-tuning runs are sized to ``--max-minutes``: the first steps are timed on this
machine, and the step counts are chosen so that warmup and cosine complete within the budget (a busy machine gets a
shorter but complete schedule, never a cut one). Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``
(``make data``); nothing downloads.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from pathlib import Path

import torch

__all__ = ["main"]

_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
_FINETUNE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart_finetune.yaml"
PRETRAIN_SHARE, FINETUNE_SHARE = 0.5, 0.25  # of --max-minutes; the rest: probes, pictures, start-up


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mim quickstart",
        description="MAE on Fashion-MNIST on CPU (~10 min), then a linear-probe table: pretrained vs random vs pixels.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder (default: %(default)s)")
    p.add_argument("--recipe", type=Path, default=_RECIPE, help="pretraining recipe (default: recipes/quickstart.yaml)")
    p.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: sized to --max-minutes)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=10.0,
        help="time budget of the whole quickstart; pretraining gets 50 %%, the two fine-tunes 25 %% (default: 10)",
    )
    p.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default: sized to the budget)")
    p.add_argument(
        "--finetune-steps", type=int, default=None, help="steps of each fine-tune (default: sized; 0 skips them)"
    )
    p.add_argument(
        "--finetune-test", type=int, default=None, help="test images for the fine-tunes (default: all 10000)"
    )
    p.add_argument("--finetune-recipe", type=Path, default=_FINETUNE, help="default: recipes/quickstart_finetune.yaml")
    p.add_argument("--num-train", type=int, default=None, help="pretraining images (default: all 60000)")
    p.add_argument("--probe-train", type=int, default=10000, help="images to fit the probe on (default: 10000)")
    p.add_argument("--probe-test", type=int, default=10000, help="images to test the probe on (default: 10000)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides, e.g. --trainer.max_steps=50 (after --)")
    args = p.parse_args(argv)
    for name in ("epochs", "num_train", "probe_train", "probe_test", "pretrain_steps", "finetune_test"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.finetune_steps is not None and args.finetune_steps < 0:
        p.error(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.max_minutes <= 0:
        p.error(f"--max-minutes must be > 0, got {args.max_minutes}")
    if not args.recipe.is_file():
        p.error(f"recipe not found: {args.recipe} (run from a mim checkout, or pass --recipe PATH)")
    return args


def _time_limit(minutes: float) -> str:
    """``DD:HH:MM:SS`` for Lightning's ``max_time``."""
    total = max(1, round(minutes * 60))
    days, rest = divmod(total, 86400)
    return f"{days:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def time_recipe(recipe_args: list[str], *, steps: int = 16, skip: int = 4) -> tuple[float, float]:
    """Time a recipe on this machine: seconds per optimizer step (data loading included; the median of the steps after
    the first ``skip``, robust to a busy moment) and seconds for one full validation pass (from 3 batches). The
    throwaway module is discarded.
    """
    import lightning as L

    from mim.lightning_cli import build

    quiet = ["--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
             "--trainer.limit_val_batches=3", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
             "--trainer.enable_model_summary=false", "--trainer.max_epochs=-1", f"--trainer.max_steps={steps}",
             "--trainer.check_val_every_n_epoch=1000000"]  # fmt: skip
    cli = build([*recipe_args, *quiet], save_config_callback=None)
    stamps: list[float] = []

    class _Clock(L.Callback):
        def on_train_batch_end(self, *args, **kwargs) -> None:
            stamps.append(time.perf_counter())

    cli.trainer.callbacks.append(_Clock())  # type: ignore[attr-defined]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    start = time.perf_counter()
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    per_val_batch = (time.perf_counter() - start) / 3
    num_val_batches = len(cli.datamodule.val_dataloader())
    intervals = sorted(b - a for a, b in zip(stamps[skip - 1 : -1], stamps[skip:]))
    return intervals[len(intervals) // 2], per_val_batch * num_val_batches


def size_run(budget_s: float, per_step_s: float, *, minimum: int = 20) -> int:
    """Optimizer steps that fit ``budget_s`` at ``per_step_s`` each, with 15 % kept for evaluation and start-up."""
    return max(minimum, int(0.85 * budget_s / per_step_s))


def _pretrain_args(args: argparse.Namespace) -> list[str]:
    out = args.out.resolve()
    cli_args = ["--config", str(args.recipe), f"--trainer.default_root_dir={out}"]
    cli_args.append(f"--trainer.logger.init_args.save_dir={out}")
    if args.num_train is not None:
        cli_args.append(f"--data.init_args.num_train={args.num_train}")
    return cli_args + args.overrides


def _build(args: argparse.Namespace):
    from mim.lightning_cli import build

    cli_args = _pretrain_args(args)
    if args.epochs is not None:
        cli_args.append(f"--trainer.max_epochs={args.epochs}")
        cli_args.append(f"--trainer.max_time={_time_limit(args.max_minutes * PRETRAIN_SHARE * 1.5)}")
    else:
        steps = args.pretrain_steps
        if steps is None:
            per_step, _ = time_recipe(cli_args)
            steps = size_run(args.max_minutes * PRETRAIN_SHARE * 60, per_step)
            print(
                f"mim quickstart: {per_step:.2f} s per pretraining step measured here; "
                f"{steps} steps fit {args.max_minutes * PRETRAIN_SHARE:.1f} of the {args.max_minutes:g} minutes"
            )
        # warmup: a quarter of the run, as the recipe's 1 of 4 epochs; max_time is only a safety net
        cli_args += ["--trainer.max_epochs=-1", f"--trainer.max_steps={steps}",
                     f"--model.init_args.warmup_steps={max(1, steps // 4)}",
                     f"--trainer.max_time={_time_limit(args.max_minutes * PRETRAIN_SHARE * 3)}"]  # fmt: skip
    return build(cli_args)


def _finetune(args: argparse.Namespace, checkpoint: str, steps: int | None) -> tuple[dict[str, float], int, int]:
    """Fine-tune from ``checkpoint`` and from random init, same steps: test accuracy (10 000 images) of each."""
    from mim.lightning_cli import build

    base = ["--config", str(args.finetune_recipe), f"--trainer.default_root_dir={args.out.resolve() / 'finetune'}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    if args.finetune_test is not None:
        base.append(f"--data.init_args.num_val={args.finetune_test}")
    if steps is None:
        per_step, validation = time_recipe(base)
        evaluation = validation + 10  # the test images, plus building the run
        steps = size_run(args.max_minutes * FINETUNE_SHARE * 60 / 2 - evaluation, per_step)
        print(
            f"mim quickstart: {per_step:.2f} s per fine-tuning step and {evaluation:.0f} s of evaluation measured here; "
            f"{steps} steps per fine-tune"
        )
    results: dict[str, float] = {}
    num_test = 0
    for name, extra in (("MAE-pretrained", [f"--model.init_args.checkpoint={checkpoint}"]), ("random init", [])):
        print(f"fine-tuning the {name} ViT for {steps} steps ...")
        cli = build([*base, *extra, "--trainer.max_epochs=-1", f"--trainer.max_steps={steps}",
                     f"--model.init_args.warmup_steps={max(1, steps // 10)}",
                     "--trainer.check_val_every_n_epoch=1000000", "--trainer.num_sanity_val_steps=0"],
                    save_config_callback=None)  # fmt: skip
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        results[name] = float(metrics["val/top1"])
        num_test = len(cli.datamodule.val_dataset)
    return results, steps, num_test


def _loss_curve(metrics_csv: Path, out_png: Path) -> Path | None:
    """Plot train/loss per step and val/loss per epoch from Lightning's CSV log."""
    if not metrics_csv.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                train.append((int(row["step"]), float(row["train/loss"])))
            if row.get("val/loss"):
                val.append((int(row["step"]), float(row["val/loss"])))
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("norm-pix MSE (hidden patches)")
    ax.set_title("MAE pretraining on Fashion-MNIST")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _reconstruction_grid(module, images_u8: torch.Tensor, mean, std, out_png: Path, seed: int = 0) -> Path:
    """Save rows of original | masked | reconstruction (| reconstruction with visible patches pasted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mim.data import normalize_image

    encoder, target = module.encoder, module.targets[0]
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    batch = {"image": normalize_image(images_u8.to(device), mean, std)}
    gen = torch.Generator(device=device).manual_seed(seed)
    masks = module.masking(images_u8.shape[0], encoder.grid, generator=gen, device=device)
    with torch.no_grad():
        latent = encoder(batch["image"], masks.visible)
        recon = target.reconstruct(batch, masks, latent, encoder)  # (B, C, H, W) normalised
    module.train(was_training)
    m = torch.as_tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=device).view(1, -1, 1, 1)
    to_img = lambda x: (x * s + m).clamp(0, 1).cpu()  # noqa: E731  (B, C, H, W) in [0, 1]
    original = to_img(batch["image"])
    rgb = lambda x: x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]  # noqa: E731
    # Hidden patches drawn in a colour that no grayscale pixel has, so "hidden" never reads as "black".
    hidden = masks.hidden.cpu()  # (B, N)
    colour = torch.tensor([0.15, 0.35, 0.75]).view(1, 3, 1, 1).expand_as(rgb(original))
    hidden_px = encoder.unpatchify(
        hidden.unsqueeze(-1).float().expand(-1, -1, math.prod(encoder.patch_size) * encoder.in_chans)
    )
    hidden_px = hidden_px[:, :1].expand(-1, 3, -1, -1) > 0.5  # (B, 3, H, W)
    masked = torch.where(hidden_px, colour, rgb(original))
    cols = [("original", rgb(original)), ("masked (encoder input)", masked), ("reconstruction", rgb(to_img(recon)))]
    n = images_u8.shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.6 * n))
    for i in range(n):
        for j, (title, imgs) in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(imgs[i].permute(1, 2, 0).numpy(), vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


def _probe_table(module, datamodule, args: argparse.Namespace) -> dict[str, float]:
    from mim.data import load_fashion_mnist, normalize_image
    from mim.models import MaskedEncoder
    from mim.probe import encoder_features, linear_probe

    root = getattr(datamodule, "root", None)
    x_train, y_train = load_fashion_mnist("train", root=root)
    x_test, y_test = load_fashion_mnist("test", root=root)
    g = torch.Generator().manual_seed(1234)
    tr = torch.randperm(x_train.shape[0], generator=g)[: args.probe_train]
    te = torch.randperm(x_test.shape[0], generator=g)[: args.probe_test]
    x_train, y_train, x_test, y_test = x_train[tr], y_train[tr], x_test[te], y_test[te]
    mean, std = datamodule.mean, datamodule.std
    normalize = lambda u: normalize_image(u, mean, std)  # noqa: E731

    torch.manual_seed(0)
    random_encoder = MaskedEncoder(**module.encoder.config)
    results = {}
    rows = [("MAE-pretrained ViT (frozen)", module.encoder), ("same ViT, random init (frozen)", random_encoder)]
    for name, encoder in rows:
        f_train = encoder_features(encoder, x_train, normalize=normalize, pool="avg")
        f_test = encoder_features(encoder, x_test, normalize=normalize, pool="avg")
        results[name] = linear_probe(f_train, y_train, f_test, y_test, num_classes=10).test_accuracy
    pixels = linear_probe(
        x_train.flatten(1).float() / 255, y_train, x_test.flatten(1).float() / 255, y_test, num_classes=10
    )
    results[f"raw pixels ({x_train[0].numel()} values)"] = pixels.test_accuracy
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse(list(argv or []))
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"mim quickstart: MAE on Fashion-MNIST, recipe {args.recipe}, output in {args.out.resolve()}")
    cli = _build(args)
    module, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    trainer.fit(module, datamodule=datamodule)
    pretrain_s = time.time() - start
    if trainer.global_step < trainer.estimated_stepping_batches:
        print(f"note: pretraining hit its safety time limit at step {trainer.global_step}, before the schedule ended")

    print("\nfitting linear probes on frozen features ...")
    probe_start = time.time()
    results = _probe_table(module, datamodule, args)
    probe_s = time.time() - probe_start

    out = args.out.resolve()
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", ""
    )
    finetune: dict[str, float] = {}
    finetune_steps, finetune_s, n = 0, 0.0, 0
    if args.finetune_steps != 0 and ckpt:
        finetune_start = time.time()
        finetune, finetune_steps, n = _finetune(args, ckpt, args.finetune_steps)
        finetune_s = time.time() - finetune_start
    from mim.data import load_fashion_mnist

    x_test, _ = load_fashion_mnist("test", root=getattr(datamodule, "root", None))
    grid_png = _reconstruction_grid(module, x_test[:8], datamodule.mean, datamodule.std, out / "reconstructions.png")
    curve_png = (
        _loss_curve(Path(trainer.logger.log_dir) / "metrics.csv", out / "loss_curve.png") if trainer.logger else None
    )

    width = max(len(k) for k in results) + 2
    print(f"\nLinear probe on Fashion-MNIST ({args.probe_train} train / {args.probe_test} test images), test accuracy:")
    print(f"  {'features'.ljust(width)}accuracy")
    for name, acc in results.items():
        print(f"  {name.ljust(width)}{acc:.4f}")
    first, second = list(results.values())[:2]
    verdict = "ahead of" if first > second else "NOT ahead of"
    print(f"  pretrained is {verdict} random init by {100 * (first - second):+.1f} points (chance: 0.1000)")
    if finetune:
        print(f"\nFine-tuned end to end, {finetune_steps} steps each, top-1 on the {n} test images (± standard error):")
        se = {k: math.sqrt(v * (1 - v) / n) for k, v in finetune.items()}
        for name, acc in finetune.items():
            print(f"  {name.ljust(width)}{acc:.4f} ± {se[name]:.4f}")
        (a, b), (sa, sb) = finetune.values(), se.values()
        gap, gap_se = a - b, math.sqrt(sa**2 + sb**2)
        verdict = "outside the noise" if gap > 2 * gap_se else "NOT outside the noise"
        print(
            f"  pretrained - random init = {100 * gap:+.2f} points ± {100 * gap_se:.2f} ({verdict}: 2 standard errors)"
        )
    summary = {
        "probe_test_accuracy": results,
        "finetune_test_top1": finetune,
        "finetune_steps": finetune_steps,
        "finetune_seconds": round(finetune_s, 1),
        "pretrain_seconds": round(pretrain_s, 1),
        "probe_seconds": round(probe_s, 1),
        "optimizer_steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "checkpoint": ckpt,
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "results.json")
    print(
        f"\npretraining {pretrain_s / 60:.1f} min ({trainer.global_step} steps), probes {probe_s / 60:.1f} min, "
        f"fine-tuning {finetune_s / 60:.1f} min, total {(time.time() - start) / 60:.1f} min"
    )
    print(f"checkpoint:       {ckpt}")
    print(f"reconstructions:  {grid_png}")
    if curve_png:
        print(f"loss curve:       {curve_png}")
    print(f"results:          {out / 'results.json'}")
    return 0
