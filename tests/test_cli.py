"""`mim fit` end to end on debug recipes, bad configs fail at construction, `mim quickstart` runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mim.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ROOT / "recipes" / "debug"
needs_data = pytest.mark.usefixtures("fashion_mnist")


def _mim(*args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "mim", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fit" in out and "quickstart" in out


@needs_data
def test_fit_debug_recipe_writes_checkpoint(tmp_path: Path):
    run = _mim(
        "fit",
        "-c",
        str(DEBUG / "mae_fashion_mnist.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=4",
        "--trainer.limit_val_batches=1",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "effective batch = 64 per device x 1 accumulation x 1 devices = 64" in run.stdout + run.stderr
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert len(ckpts) == 1
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["mim"]["encoder"]["arch"] == "vit_tiny_patch16_224"
    keys = ckpt["state_dict"].keys()
    assert "encoder.vit.pos_embed" in keys and "targets.0.decoder.mask_token" in keys
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()


def test_fit_image_folder_recipe(tmp_path: Path):
    rng = torch.Generator().manual_seed(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (48, 40, 3), generator=rng, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.jpg", quality=90)
    run = _mim(
        "fit",
        "-c",
        str(DEBUG / "mae_image_folder.yaml"),
        f"--data.init_args.root={tmp_path / 'data'}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list((tmp_path / "run").rglob("*.ckpt"))) == 1


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("--model.init_args.masking.init_args.mask_ratio=1.5", "mask_ratio"),
        ("--model.init_args.masking.init_args.mask_ratio=0", "mask_ratio"),
        ("--model.init_args.encoder.init_args.arch=vit_does_not_exist", "arch"),
        ("--model.init_args.encoder.init_args.img_size=30", "img_size"),
        ("--model.init_args.blr=-1", "blr"),
    ],
)
def test_bad_config_fails_before_training(tmp_path: Path, override: str, field: str, capsys):
    """In process (the console script is `main`; a subprocess per case would cost ~6 s of imports each)."""
    recipe = str(DEBUG / "mae_fashion_mnist.yaml")
    try:  # a parse error exits; a constructor's ValueError is one line and exit code 2
        code = main(["fit", "-c", recipe, override, f"--trainer.default_root_dir={tmp_path}"])
    except SystemExit as e:
        code = e.code
    assert code not in (0, None)
    err = capsys.readouterr().err
    assert field in err
    assert not list(tmp_path.rglob("*.ckpt"))
    assert "Epoch 0" not in err  # failed at construction, not inside a step


def test_missing_data_path_is_a_clear_error(tmp_path: Path):
    missing = tmp_path / "nope"
    run = _mim(
        "fit",
        "-c",
        str(DEBUG / "mae_image_folder.yaml"),
        f"--data.init_args.root={missing}",
        f"--trainer.default_root_dir={tmp_path}",
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode != 0
    assert str(missing) in run.stderr


@needs_data
def test_quickstart_small(tmp_path: Path):
    run = _mim(
        "quickstart",
        "--out",
        str(tmp_path / "qs"),
        "--epochs",
        "1",
        "--num-train",
        "512",
        "--probe-train",
        "300",
        "--probe-test",
        "300",
        "--finetune-steps",
        "3",
        "--finetune-test",
        "500",
        "--",
        "--data.init_args.num_val=256",
        "--trainer.log_every_n_steps=1",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "Linear probe on Fashion-MNIST" in out
    for row in ("MAE-pretrained ViT", "random init", "raw pixels"):
        assert row in out
    assert "Fine-tuned end to end, 3 steps each, top-1 on the 500 test images" in out
    assert "pretrained - random init = " in out
    for name in ("reconstructions.png", "loss_curve.png", "results.json"):
        assert (tmp_path / "qs" / name).stat().st_size > 1000 or name == "results.json"
    assert list((tmp_path / "qs").rglob("last.ckpt"))
    with Image.open(tmp_path / "qs" / "reconstructions.png") as img:
        assert img.width > 200 and img.height > 600  # 8 rows x 3 columns


def test_quickstart_sizes_runs_to_the_budget():
    from mim.quickstart import size_run

    assert size_run(300, 0.5) == 510  # 85 % of 300 s at 0.5 s per step
    assert size_run(300, 60.0) == 20  # a very slow machine still gets a (short) complete schedule


@needs_data
def test_ckpt_path_last_resumes_the_newest_complete_checkpoint_or_stops(tmp_path: Path, capsys, caplog):
    """`--ckpt_path last` finds the newest complete checkpoint across version folders and says so; with nothing to
    resume it stops (exit 2) instead of silently starting over."""
    import logging

    recipe = str(DEBUG / "mae_fashion_mnist.yaml")
    base = ["fit", "-c", recipe, f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false"]  # fmt: skip
    assert main([*base, "--ckpt_path=last"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main([*base, "--trainer.max_steps=2"]) == 0
    first = next(tmp_path.rglob("*.ckpt"))
    (first.parent / "broken.ckpt").write_bytes(b"PK\x03\x04 cut short")  # newer, but incomplete: skipped
    with caplog.at_level(logging.INFO):
        assert main([*base, "--trainer.max_steps=3", "--ckpt_path=last"]) == 0
    text = caplog.text + capsys.readouterr().err
    assert f"mim: resuming from {first}" in text  # the broken, newer file was skipped
    assert f"Restored all states from the checkpoint at {first}" in text  # Lightning resumed from it (a new version)


@needs_data
def test_mim_test_and_predict_run_on_a_pretraining_recipe(tmp_path: Path):
    """`mim test` logs the held-out loss; `mim predict` gives the encoder's features of every sample (no mask)."""
    from mim.lightning_cli import build

    base = ["-c", str(DEBUG / "mae_fashion_mnist.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--trainer.logger=false"]  # fmt: skip
    assert main(["test", *base, "--trainer.limit_test_batches=1"]) == 0
    assert main(["predict", *base, "--trainer.limit_predict_batches=1"]) == 0
    cli = build([*base, "--trainer.limit_predict_batches=2"], save_config_callback=None)
    (first, second) = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert first["features"].shape == (64, 64) and first["label"].shape == (64,)  # batch 64, width 64
    assert torch.isfinite(first["features"]).all() and not torch.equal(first["features"], second["features"])
