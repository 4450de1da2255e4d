"""`mim fit` records its run: wandb (offline) by default with the resolved config and the recipe, the same run id on
resume, CSV when wandb is disabled or cannot start, a quiet terminal and an end summary (mim/run_logging.py)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mim.cli import main
from mim.run_logging import (
    RUN_ID_KEY,
    OfflineRun,
    checkpoint_run_id,
    finetune_command,
    finetune_recipes,
    read_offline_run,
    summary,
)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "debug" / "mae_fashion_mnist.yaml"
needs_data = pytest.mark.usefixtures("fashion_mnist")


def _args(root: Path, *extra: str) -> list[str]:
    return ["fit", "-c", str(RECIPE), f"--trainer.default_root_dir={root}", "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            *extra]  # fmt: skip


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """wandb offline, with no account and nothing written outside ``tmp_path``."""
    for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_GROUP", "SLURM_JOB_ID", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path / "run"


def _offline_run(root: Path) -> tuple[str, dict, list[dict], Path]:
    """The one offline run under ``root``: its id, config (key -> value), history rows and folder."""
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run = _read_when_written(runs[0])
    return run.run_id, run.config, run.history, runs[0]


def _read_when_written(folder: Path) -> OfflineRun:
    """:func:`read_offline_run` once wandb's service process has written the run's records (it flushes its
    transaction log asynchronously: right after ``finish`` a loaded machine may show an empty log for a moment)."""
    deadline = time.monotonic() + 30
    while True:
        run = read_offline_run(folder)
        if (run.run_id and run.history) or time.monotonic() > deadline:
            assert run.run_id, f"{folder}: no run record after 30 s"
            return run
        time.sleep(0.2)


@needs_data
def test_wandb_offline_by_default_logs_the_resolved_config_recipe_and_history(offline: Path, caplog, monkeypatch):
    """The offline run's log (``<default_root_dir>/wandb/offline-run-*/run-<id>.wandb``) holds the resolved config,
    the ``mim`` block and ``train/loss``; the recipe is a file of the run; the summary names the checkpoint and the
    exact fine-tune command (run here for a step)."""
    monkeypatch.chdir(ROOT)  # the fine-tune recipe is shown relative to the working directory
    pictures = {"class_path": "mim.callbacks.RunPictures", "init_args": {"every_n_steps": 2}}
    with caplog.at_level(logging.INFO):
        assert main([*_args(offline), f"--trainer.callbacks+={json.dumps(pictures)}"]) == 0
    run_id, config, history, folder = _offline_run(offline)
    encoder = config["model"]["init_args"]["encoder"]
    assert encoder["init_args"]["arch"] == "vit_tiny_patch16_224"
    assert config["model"]["init_args"]["masking"]["class_path"] == "mim.masking.RandomMasking"
    assert [t["class_path"] for t in config["model"]["init_args"]["targets"]] == ["mim.targets.PixelTarget"]
    assert config["data"]["class_path"] == "mim.data.FashionMNISTDataModule"
    assert config["trainer"]["strategy"] == "auto" and config["trainer"]["max_steps"] == 2
    mim = config["mim"]
    assert mim["recipes"] == [str(RECIPE)] and mim["recipe_text"][str(RECIPE)] == RECIPE.read_text()
    assert mim["world_size"] == 1 and mim["versions"]["torch"] is not None
    assert set(mim["versions"]) >= {"torch", "lightning", "timm", "mim"} and "git_commit" in mim
    assert (folder / "files" / "recipes" / RECIPE.name).read_text() == RECIPE.read_text()
    assert any("train/loss" in row for row in history)
    logged = {key for row in history for key in row}
    speed = {"speed/samples_per_s", "speed/samples_per_s_per_device", "speed/data_wait", "speed/flops_per_sample"}
    assert speed | {"train/grad_norm", "train/mask_ratio", "train/lr"} <= logged, logged  # RunMetrics, by default
    assert {"pictures/reconstruction/_type", "pictures/token_loss/_type", "histograms/token_loss/_type"} <= logged
    images = sorted(p.name.split("_")[0] for p in (folder / "files" / "media" / "images").rglob("*.png"))
    assert images == ["reconstruction", "token"]  # RunPictures at step 2: input | masked | reconstruction, loss bars

    ckpt = next(offline.rglob("*.ckpt"))
    assert checkpoint_run_id(ckpt) == run_id
    text = caplog.text
    assert f"best checkpoint:  {ckpt}" in text and f"logs:             {folder}" in text
    assert f"mim export {ckpt}" in text and f"--trainer.default_root_dir={offline}" in text and "--resume auto" in text
    (command,) = [line.split("fine-tune: ", 1)[1] for line in text.splitlines() if "fine-tune: " in line]
    recipe = "recipes/debug/finetune_fashion_mnist.yaml"
    assert command == f"mim finetune -c {recipe} --model.init_args.checkpoint={shlex.quote(str(ckpt))}"
    # the printed command runs as printed (a step here), and so does its variant that rebuilds the encoder
    for extra in ([], ["--model.init_args.encoder=null"]):
        tuned = offline.parent / f"finetune{len(extra)}"
        one_step = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tuned}"]
        assert main([*shlex.split(command)[1:], *extra, *one_step, "--trainer.enable_progress_bar=false"]) == 0
        assert list(tuned.rglob("*.ckpt"))


@needs_data
def test_resume_continues_the_same_wandb_run(offline: Path):
    assert main(_args(offline)) == 0
    (first,) = (offline / "wandb").glob("offline-run-*")
    run_id = next(first.glob("run-*.wandb")).stem.removeprefix("run-")
    resume = ["--trainer.max_epochs=2", "--trainer.max_steps=3", "--resume", "auto"]  # epoch 0 ended at the stop
    assert main([*_args(offline), *resume]) == 0
    runs = sorted((offline / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # offline-run-<time>-<id>[-1]: `wandb sync` appends the second to the first run
    assert all((r / f"run-{run_id}.wandb").is_file() for r in runs)
    newest = max(offline.rglob("*.ckpt"), key=lambda p: torch.load(p, weights_only=True)["global_step"])
    assert torch.load(newest, weights_only=True)["global_step"] == 3
    assert torch.load(newest, weights_only=True)[RUN_ID_KEY] == run_id


@needs_data
def test_wandb_disabled_logs_csv_and_writes_no_wandb_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(_args(tmp_path)) == 0
    assert (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").is_file()
    assert not list(tmp_path.rglob("wandb"))
    assert RUN_ID_KEY not in torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)


@needs_data
def test_wandb_that_cannot_start_falls_back_to_csv_with_one_warning(offline: Path, monkeypatch: pytest.MonkeyPatch):
    import lightning.pytorch.loggers as loggers

    class Broken:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("wandb-core could not start")

    monkeypatch.setattr(loggers, "WandbLogger", Broken)
    with pytest.warns(UserWarning, match=r"wandb could not start \(RuntimeError: wandb-core could not start\)"):
        assert main(_args(offline)) == 0
    metrics = offline / "lightning_logs" / "version_0" / "metrics.csv"
    assert "train/loss" in metrics.read_text().splitlines()[0]


@needs_data
def test_an_explicit_logger_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([*_args(tmp_path), "--trainer.logger=false"]) == 0
    assert not list(tmp_path.rglob("wandb")) and not list(tmp_path.rglob("metrics.csv"))


@needs_data
def test_terminal_is_quiet_and_ends_with_the_summary(tmp_path: Path):
    """A debug `mim fit` prints none of Lightning's start-up noise, and says where the checkpoint is."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_DIR=str(tmp_path), NETRC=str(tmp_path / "none"),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"))  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "mim", *_args(tmp_path / "run")[:-1], "--trainer.max_steps=3"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    for noise in ("args parameter is intended", "tensorboardX", "Tip:", "LeafSpec", "across ranks is zero",
                  "in eval mode at the start", "anonymous"):  # fmt: skip
        assert noise not in out, noise
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    assert f"best checkpoint:  {ckpt}" in out


def test_summary_lists_checkpoints_logs_and_commands():
    command = "mim finetune -c recipes/debug/finetune_fashion_mnist.yaml --model.init_args.checkpoint=/r/a.ckpt"
    text = summary(
        best="/r/a.ckpt", last="/r/last.ckpt", logs="/r/wandb/offline-run-x", resume=["-c", "r.yaml"], finetune=command
    )
    assert "best checkpoint:  /r/a.ckpt" in text and "last checkpoint:  /r/last.ckpt" in text
    assert "mim fit -c r.yaml" in text and "mim export /r/a.ckpt /r/export/" in text
    assert f"fine-tune: {command}" in text
    assert "fine-tune" not in summary(best=None, last="/r/l.ckpt", logs=None, resume=[])
    assert "no checkpoint written" in summary(best=None, last=None, logs=None, resume=[], finetune=command)


def _pretraining_recipes() -> list[Path]:
    recipes = ROOT / "recipes"
    return [p for p in sorted(recipes.rglob("*.yaml")) if p not in finetune_recipes() and "_base" not in p.parts]


# What each shipped pretraining recipe is fine-tuned with: its own matching recipe where one exists (the same encoder,
# or the folder's, or one that rebuilds the encoder from the checkpoint, named after the architecture).
EXPECTED_FINETUNE = {
    "quickstart.yaml": "quickstart_finetune.yaml",
    "mae/vit_b16_in1k.yaml": "finetune/mae_vit_b16_in1k.yaml",
    "hpm/vit_b16_in1k.yaml": "finetune/mae_vit_b16_in1k.yaml",
    "videomae_v2/vit_b16_k400.yaml": "finetune/videomae_vit_b16_k400.yaml",
    "debug/mae_fashion_mnist.yaml": "debug/finetune_fashion_mnist.yaml",
    "debug/ijepa_fashion_mnist.yaml": "debug/finetune_fashion_mnist.yaml",  # + encoder=null (another encoder)
    "debug/mae_video.yaml": "debug/finetune_video.yaml",
    "debug/vjepa_video.yaml": "debug/finetune_video.yaml",
    "debug/tjepa_table.yaml": "debug/finetune_table.yaml",
}


def test_finetune_command_of_every_shipped_recipe_parses(monkeypatch: pytest.MonkeyPatch, capsys):
    """The fine-tune command printed for each shipped pretraining recipe names an existing recipe (the expected one for
    those above) and the checkpoint, and `mim finetune` parses it (``--print_config``)."""
    import yaml

    monkeypatch.chdir(ROOT)
    commands = {}
    for recipe in _pretraining_recipes():
        config = yaml.safe_load(recipe.read_text())
        commands[recipe.relative_to(ROOT / "recipes").as_posix()] = finetune_command(
            "/r/last.ckpt", config, recipes=[recipe]
        )
    assert len(commands) >= 20
    for name, tuned in EXPECTED_FINETUNE.items():
        assert f" -c recipes/{tuned} " in commands[name], (name, commands[name])
    assert "--model.init_args.encoder=null" in commands["debug/ijepa_fashion_mnist.yaml"]
    assert "--model.init_args.encoder=null" not in commands["debug/mae_fashion_mnist.yaml"]
    for command in sorted(set(commands.values())):
        args = shlex.split(command)
        assert args[:2] == ["mim", "finetune"] and "--model.init_args.checkpoint=/r/last.ckpt" in args
        with pytest.raises(SystemExit) as stop:
            main([*args[1:], "--print_config"])
        assert stop.value.code in (0, None), command
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["class_path"] == "mim.finetune.FinetuneModule", command
        assert printed["model"]["init_args"]["checkpoint"] == "/r/last.ckpt", command


def test_finetune_command_without_a_recipe_for_the_data_uses_the_runs_datamodule(capsys):
    config = {"model": {"init_args": {}}, "data": {"class_path": "tests.dist_helpers.RandomLabelledImageData",
                                                   "init_args": {"num_samples": 8, "num_classes": 3}}}  # fmt: skip
    command = finetune_command("/r/a b.ckpt", config)
    assert command.startswith("mim finetune --model=mim.finetune.FinetuneModule '--model.init_args.checkpoint=/r/a b")
    with pytest.raises(SystemExit):
        main([*shlex.split(command)[1:], "--print_config"])
    printed = __import__("yaml").safe_load(capsys.readouterr().out)
    assert (
        printed["data"]["init_args"]["num_classes"] == 3
        and printed["model"]["init_args"]["checkpoint"] == "/r/a b.ckpt"
    )


def test_checkpoint_run_id_tolerates_missing_and_foreign_files(tmp_path: Path):
    assert checkpoint_run_id(None) is None and checkpoint_run_id(tmp_path / "absent.ckpt") is None
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert checkpoint_run_id(tmp_path / "junk.ckpt") is None
    torch.save({RUN_ID_KEY: "abc123", "state_dict": {}}, tmp_path / "ok.ckpt")
    assert checkpoint_run_id(tmp_path / "ok.ckpt") == "abc123"


@needs_data
def test_recipe_wandb_section_names_the_run(offline: Path, tmp_path: Path):
    recipe = tmp_path / "named.yaml"
    recipe.write_text("wandb:\n  project: mim-tests\n  name: my-run\n  group: g1\n  tags: [debug, cpu]\n")
    assert main([*_args(offline), "-c", str(recipe)]) == 0
    folder = next((offline / "wandb").glob("offline-run-*"))
    from mim.run_logging import _records

    _read_when_written(folder)
    records = list(_records(next(folder.glob("run-*.wandb"))))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
    assert (run.project, run.display_name, run.run_group, list(run.tags)) == (
        "mim-tests",
        "my-run",
        "g1",
        ["debug", "cpu"],
    )
