"""Seeing a sharded run (2 processes, gloo on CPU, `mim fit` under FSDP2 and DeepSpeed ZeRO-3): the wandb run id
travels with the checkpoint folder, so a resume continues the same offline wandb run; RunPictures draws on rank 0 while
every rank runs the picture forward, without a hang and without changing training by a bit (mim/run_logging.py,
mim/distributed.py, mim/callbacks/run_pictures.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from mim.checkpoint import consolidate_checkpoint
from mim.distributed import INFO_NAME, read_checkpoint_info
from mim.run_logging import RUN_ID_KEY, checkpoint_run_id, read_offline_run

pytestmark = [pytest.mark.distributed, pytest.mark.scale]  # `make test-scale` (about a minute)

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = {
    "fsdp2": {"class_path": "mim.distributed.FSDP2Strategy"},
    "zero3": {  # most parameters partitioned, the small ones whole on every rank
        "class_path": "mim.distributed.DeepSpeedStrategy",
        "init_args": {"stage": 3, "param_persistence_threshold": 100},
    },
}
KINDS = ("hardness", "reconstruction", "token_loss")  # HardPatchTarget: pixels and an EMA teacher's token scores


def _config(root: Path, *, strategy: str = "fsdp2", pictures: bool, wandb: bool) -> Path:
    """A tiny HPM run (hard-patch masking, pixel target, EMA teacher) of 2 processes, a checkpoint folder per step."""
    ckpt = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(root / "ckpt"), "filename": "{step}", "every_n_train_steps": 1, "save_top_k": -1},
    }
    every = 1 if pictures else 0
    run_pictures = {"class_path": "mim.callbacks.RunPictures", "init_args": {"every_n_steps": every, "num_samples": 2}}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": STRATEGIES[strategy], "max_steps": 2,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "log_every_n_steps": 1, "default_root_dir": str(root),
            "callbacks": [ckpt, run_pictures], **({} if wandb else {"logger": False}),
        },
        "model": {
            "class_path": "mim.PretrainModule",
            "init_args": {
                "encoder": {"class_path": "mim.models.MaskedEncoder",
                            "init_args": {"arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4,
                                          "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}},
                "masking": {"class_path": "mim.masking.HardPatchMasking"},
                "targets": [{"class_path": "mim.targets.HardPatchTarget",
                             "init_args": {"decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}}],
                "lr": 1e-3, "warmup_steps": 0,
            },
        },
        "data": {"class_path": "tests.dist_helpers.RandomImageData", "init_args": {"num_samples": 16, "batch_size": 4}},
    }  # fmt: skip
    path = root / f"{strategy}_{'pictures' if pictures else 'plain'}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _mim_fit(config: Path, *args: str, tmp: Path, timeout: int = 240) -> str:
    """`python -m mim fit -c CONFIG ARGS` with wandb offline (nothing written outside ``tmp``), in its own process
    group, killed whole on a timeout (a hang fails the test); returns the output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(tmp / "wandb_dir"),
        WANDB_CONFIG_DIR=str(tmp / "wandb_config"), WANDB_CACHE_DIR=str(tmp / "wandb_cache"),
        NETRC=str(tmp / "no-netrc"), TORCH_EXTENSIONS_DIR=str(tmp / "torch_extensions"),
    )  # fmt: skip
    env.pop("SLURM_JOB_ID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mim", "fit", "-c", str(config), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mim fit hung (killed after {timeout} s):\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


@dataclass
class Fit:
    root: Path
    config: Path
    output: str


@pytest.fixture(scope="module")
def with_pictures(tmp_path_factory) -> Fit:
    """2 FSDP2 steps with wandb offline and a picture at every step."""
    root = tmp_path_factory.mktemp("fsdp2_pictures")
    config = _config(root, pictures=True, wandb=True)
    return Fit(root, config, _mim_fit(config, tmp=root))


def _run_ids(root: Path) -> list[str]:
    """The run id of every offline wandb run under ``root``, in folder order."""
    return [read_offline_run(folder).run_id for folder in sorted((root / "wandb").glob("offline-run-*"))]


@pytest.mark.timeout(300)
def test_sharded_checkpoint_folder_carries_the_wandb_run_id_and_resume_continues_it(with_pictures: Fit):
    root = with_pictures.root
    (run_id,) = _run_ids(root)
    assert run_id
    folder = root / "ckpt" / "step=2.ckpt"
    assert folder.is_dir() and (folder / ".metadata").is_file()  # a torch.distributed.checkpoint folder
    info = read_checkpoint_info(folder)
    assert info[RUN_ID_KEY] == run_id and info["global_step"] == 2
    assert INFO_NAME in json.loads((folder / "mim-manifest.json").read_text())["files"]  # sealed with the shards
    assert checkpoint_run_id(folder) == run_id

    out = _mim_fit(with_pictures.config, "--trainer.max_steps=3", "--resume", "auto", tmp=root)
    assert f"resuming from {folder}" in out
    assert _run_ids(root) == [run_id, run_id]  # the resumed run appends to the same wandb run
    assert checkpoint_run_id(root / "ckpt" / "step=3.ckpt") == run_id


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_sharded_pictures_are_drawn_on_rank_zero_and_leave_training_unchanged(strategy: str, request, tmp_path: Path):
    """Every rank runs the picture forward (FSDP2: root unit unsharded; ZeRO-3: parameters gathered), rank 0 draws;
    a hang would be killed by the timeout. The weights after 2 steps equal those of a run without pictures exactly."""
    if strategy == "fsdp2":
        drawn_run = request.getfixturevalue("with_pictures")
        folder = min((drawn_run.root / "wandb").glob("offline-run-*"))  # the first fit's run
        logged = {key for row in read_offline_run(folder).history for key in row}
        assert {f"pictures/{k}/_type" for k in KINDS} <= logged
    else:
        config = _config(tmp_path / "pictures", strategy=strategy, pictures=True, wandb=True)
        drawn_run = Fit(tmp_path / "pictures", config, _mim_fit(config, tmp=tmp_path / "pictures"))
        (run_id,) = _run_ids(drawn_run.root)  # a DeepSpeed folder carries the wandb run id as well
        assert checkpoint_run_id(drawn_run.root / "ckpt" / "step=2.ckpt") == run_id
    drawn = {p.name for p in drawn_run.root.rglob("step_*.png") if p.parent.name == "pictures"}
    assert {f"step_{n}_{k}.png" for n in (1, 2) for k in KINDS} <= drawn  # (step 3 too once the resume test ran)
    assert "no pictures are drawn" not in drawn_run.output

    plain = _config(tmp_path / "plain", strategy=strategy, pictures=False, wandb=False)
    _mim_fit(plain, tmp=tmp_path / "plain")
    assert not list((tmp_path / "plain").rglob("step_*.png"))
    a = consolidate_checkpoint(drawn_run.root / "ckpt" / "step=2.ckpt")["state_dict"]
    b = consolidate_checkpoint(tmp_path / "plain" / "ckpt" / "step=2.ckpt")["state_dict"]
    assert a.keys() == b.keys() and len(a) > 0
    for key, value in a.items():
        assert _same(value, b[key]), key  # bit-identical with the pictures on and off


def _same(a: object, b: object) -> bool:
    """Exact equality of tensors, and of dicts / lists of them (EMA extra state)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
