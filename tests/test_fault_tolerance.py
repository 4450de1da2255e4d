"""FaultTolerance: atomic checkpoints installed, resume settings recorded and compared; the CLI's one-paragraph errors
for bad input (each through the real `mim fit` entry point, no traceback)."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mim.callbacks import FaultTolerance
from mim.callbacks.fault_tolerance import compare_run_settings, run_settings
from mim.cli import main
from mim.data import ImageFolderDataModule
from mim.distributed import AtomicCheckpointIO
from mim.masking import RandomMasking
from mim.module import PretrainModule
from mim.targets import PixelTarget
from tests.factories import cpu_trainer, tiny_encoder

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "recipes" / "debug"


def _folder(root: Path, n: int = 8) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def _fit(data: Path, root: Path, *, batch_size: int, num_workers: int = 0, ckpt_path=None, **trainer):
    module = PretrainModule(
        encoder=tiny_encoder(),
        masking=RandomMasking(mask_ratio=0.75),
        targets=[PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)],
        warmup_steps=1,
    )
    dm = ImageFolderDataModule(root=str(data), image_size=16, batch_size=batch_size, num_workers=num_workers)
    callback = FaultTolerance()
    checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
    fit = cpu_trainer(default_root_dir=root, callbacks=[callback, checkpoint], enable_checkpointing=True, **trainer)
    fit.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return fit, callback


def test_run_settings_are_recorded_and_a_changed_resume_says_what_changed(tmp_path: Path, caplog):
    data = _folder(tmp_path / "data")
    trainer, callback = _fit(data, tmp_path / "run", batch_size=2, max_steps=2)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # installed at setup
    path = tmp_path / "run" / "epoch=0-step=2.ckpt"
    saved = torch.load(path, weights_only=True)["callbacks"]["FaultTolerance"]["run_settings"]
    assert saved["world_size"] == 1 and saved["accumulate_grad_batches"] == 1 and saved["model_seed"] == 0
    assert saved["datamodule"] == "ImageFolderDataModule"
    assert saved["data"]["root"] == str(data) and saved["data"]["batch_size"] == 2 and saved["data"]["seed"] == 0

    with caplog.at_level(logging.INFO):
        _, same = _fit(data, tmp_path / "run", batch_size=2, max_steps=3, ckpt_path=path)
    assert same.resume_changes == [] and same.resume_exact
    assert "an exact resume" in caplog.text

    _, workers = _fit(data, tmp_path / "run", batch_size=2, num_workers=2, max_steps=3, ckpt_path=path)
    assert workers.resume_changes == ["data.num_workers: 0 -> 2"] and workers.resume_exact

    with pytest.warns(UserWarning, match=r"data.batch_size: 2 -> 4.*not exactly"):
        _, batch = _fit(data, tmp_path / "run", batch_size=4, max_steps=3, ckpt_path=path)
    assert batch.resume_changes == ["data.batch_size: 2 -> 4"] and batch.resume_exact is False


def test_compare_run_settings_names_every_change():
    old = {"world_size": 2, "accumulate_grad_batches": 1, "model_seed": 0, "datamodule": "A", "data": {"seed": 0}}
    new = {"world_size": 4, "accumulate_grad_batches": 1, "model_seed": 0, "datamodule": "A", "data": {"seed": 1}}
    assert compare_run_settings(old, new) == (["world_size: 2 -> 4", "data.seed: 0 -> 1"], False)
    assert compare_run_settings(old, old) == ([], True)
    assert compare_run_settings(old, {**old, "data": {"seed": 0, "num_workers": 8}}) == (
        ["data.num_workers: None -> 8"],
        True,
    )


def test_run_settings_without_a_datamodule():
    trainer = cpu_trainer(max_steps=1)
    module = PretrainModule(encoder=tiny_encoder(), masking=RandomMasking(), targets=[PixelTarget()])
    settings = run_settings(trainer, module)
    assert settings["datamodule"] is None and settings["data"] == {} and settings["model_seed"] == 0


# ------------------------------------------------------------------------------------------------ one-paragraph errors
def _error(capsys, args: list[str]) -> str:
    """Run `mim fit` in process; assert exit 2 and one error paragraph (no traceback); return its first line."""
    assert main(["fit", *args, "--trainer.enable_progress_bar=false", "--trainer.logger=false"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("mim fit: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_bad_inputs_are_one_paragraph_naming_the_field(tmp_path: Path, capsys):
    folder = ["-c", str(DEBUG / "mae_image_folder.yaml"), f"--trainer.default_root_dir={tmp_path / 'run'}"]
    missing = _error(capsys, [*folder, f"--data.init_args.root={tmp_path / 'nowhere'}"])
    assert "ImageFolderDataModule.root" in missing and "nowhere" in missing and "does not exist" in missing

    data = _folder(tmp_path / "data", n=4)
    big = _error(capsys, [*folder, f"--data.init_args.root={data}", "--data.init_args.batch_size=64"])
    assert "fewer than batch_size=64" in big and "lower batch_size" in big

    fashion = ["-c", str(DEBUG / "mae_fashion_mnist.yaml"), f"--trainer.default_root_dir={tmp_path / 'run'}"]
    ratio = _error(capsys, [*fashion, "--model.init_args.masking.init_args.mask_ratio=1.5"])
    assert "mask_ratio" in ratio and "1.5" in ratio

    arch = _error(capsys, [*fashion, "--model.init_args.encoder.init_args.arch=vit_tinyy_patch16_224"])
    assert "MaskedEncoder.arch" in arch and "vit_tiny_patch16_224" in arch

    chans = _error(capsys, [*fashion, "--model.init_args.encoder.init_args.in_chans=3"])
    assert "in_chans=3" in chans and "1-channel" in chans

    scheduler = _error(capsys, [*fashion, "--lr_scheduler=torch.optim.lr_scheduler.ConstantLR"])
    assert "--lr_scheduler is not supported with PretrainModule" in scheduler and "warmup_epochs" in scheduler


@pytest.mark.usefixtures("fashion_mnist")
def test_read_only_output_folder_is_one_paragraph_before_any_step(tmp_path: Path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:  # no mount: a read-only folder, which stops everyone but root
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs, and root writes into read-only folders")
        folder.chmod(0o555)
    try:
        recipe = ["-c", str(DEBUG / "mae_fashion_mnist.yaml"), f"--trainer.default_root_dir={folder / 'run'}"]
        line = _error(capsys, recipe)
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(folder)], check=False)
    assert f"trainer.default_root_dir={str(folder / 'run')!r} is not writable" in line
