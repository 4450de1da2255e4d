"""`mim fit` fixes two of Lightning's start-up warnings at their cause (mim/lightning_cli.py ``_StartChecks``): a
datamodule without validation data runs no validation (instead of Lightning's "Total length of `list` across ranks is
zero"), and only modules in eval mode that are not EMA copies are named (Lightning's blanket warning is dropped by an
exact filter)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mim.cli import main
from mim.lightning_cli import _EVAL_MODE_WARNING, _StartChecks
from mim.masking import HardPatchMasking
from mim.module import PretrainModule
from mim.targets import HardPatchTarget
from tests.factories import cpu_trainer, tiny_encoder
from tests.test_run_pictures import _Data

ROOT = Path(__file__).resolve().parent.parent


def test_image_folder_without_validation_data_runs_no_validation_and_warns_nothing(tmp_path: Path, monkeypatch):
    """recipes/debug/mae_image_folder.yaml without ``val_root``: its ``val_dataloader()`` is ``[]``."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    args = ["fit", "-c", str(ROOT / "recipes" / "debug" / "mae_image_folder.yaml"),
            f"--data.init_args.root={tmp_path / 'images'}", f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.max_steps=2", "--trainer.enable_progress_bar=false"]  # fmt: skip
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(args) == 0
    messages = [str(w.message) for w in seen]
    assert not [m for m in messages if "across ranks is zero" in m or "in eval mode" in m], messages
    metrics = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "train/loss" in metrics and "val/" not in metrics


def _hpm_module() -> PretrainModule:
    target = HardPatchTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=4)
    return PretrainModule(encoder=tiny_encoder(), masking=HardPatchMasking(), targets=[target], lr=1e-3, warmup_steps=0)


def test_ema_copies_in_eval_mode_are_expected_other_modules_are_named(tmp_path: Path):
    module = _hpm_module()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cpu_trainer(default_root_dir=tmp_path, max_steps=1, callbacks=[_StartChecks()]).fit(module, datamodule=_Data())
    lightning = [str(w.message) for w in seen if "in eval mode at the start of training" in str(w.message)]
    assert len(lightning) == 1 and re.match(_EVAL_MODE_WARNING, lightning[0])  # the filter matches it exactly
    assert not [w for w in seen if str(w.message).startswith("mim:")]  # the EMA teacher only

    module = _hpm_module()
    module.encoder.vit.norm.eval()  # a mistake: the encoder's final norm left in eval mode
    with pytest.warns(UserWarning, match=r"mim: 1 module\(s\) are in eval mode .*\(encoder\.vit\.norm\)"):
        cpu_trainer(default_root_dir=tmp_path, max_steps=1, callbacks=[_StartChecks()]).fit(module, datamodule=_Data())
    assert not re.match(_EVAL_MODE_WARNING, lightning[0] + " And more.")
