"""Fault tests: real `mim fit` processes killed, preempted, starved of disk, fed corrupt checkpoints and NaNs.

Each test runs the debug MAE recipe on Fashion-MNIST in subprocesses (CPU), injects one fault, and asserts what mim
promises in RELIABILITY.md: nothing written before the fault is lost, the resumed run continues bit-identically to an
uninterrupted one, and the user reads one clear line. Marked ``faults``: not in the default run, run by `make
test-faults` (CI runs both).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mim.checkpoint import CheckpointError, verify_checkpoint

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("fashion_mnist")]

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "debug" / "mae_fashion_mnist.yaml"
STEPS = 16  # two epochs of the debug recipe (512 images, batch 64)
MIM = str(Path(sys.executable).parent / "mim")  # the console script (Lightning's DDP launcher re-runs its command)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **extra}


def _callback(name: str, **init_args: object) -> str:
    module = {"ModelCheckpoint": "lightning.pytorch.callbacks", "StopAt": "tests.factories"}.get(
        name, "tests.launch_helpers"
    )
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"{module}.{name}", "init_args": init_args})


def _fit_args(root: Path, log: Path, *extra: str, steps: int = STEPS) -> list[str]:
    """The debug recipe for ``steps`` steps under ``root``: a checkpoint every 2 steps (all kept), one log line per
    step in ``log``, no validation, logger or progress bar."""
    return [
        "fit",
        "-c",
        str(RECIPE),
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}",
        "--trainer.max_epochs=-1",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        _callback("ModelCheckpoint", dirpath=str(root / "ckpt"), every_n_train_steps=2, save_top_k=-1),
        _callback("StepLog", path=str(log)),
        *extra,
    ]


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [MIM, *args], cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _run(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([MIM, *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {path.name}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {path.name} within {timeout} s")
        time.sleep(0.05)


def _steps(log: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, lr) from a StepLog file."""
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {d["step"]: (d["loss"], d["lr"]) for d in lines}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, tuple[float, float]]:
    """The uninterrupted run: (loss, lr) of steps 1..STEPS."""
    root = tmp_path_factory.mktemp("reference")
    done = _run(_fit_args(root, root / "steps.jsonl"))
    assert done.returncode == 0, done.stderr[-3000:]
    steps = _steps(root / "steps.jsonl")
    assert sorted(steps) == list(range(1, STEPS + 1))
    return steps


def _assert_continues(log: Path, reference: dict[int, tuple[float, float]], first: int) -> None:
    """The resumed run logged exactly steps first..STEPS with the uninterrupted run's losses and lrs (bit-equal)."""
    resumed = _steps(log)
    assert sorted(resumed) == list(range(first, STEPS + 1))
    assert resumed == {s: reference[s] for s in resumed}


# ------------------------------------------------------------------------------------------------ SIGKILL, SIGTERM
def test_sigkill_mid_run_resumes_from_the_last_checkpoint_bit_identically(tmp_path: Path, reference):
    marker = tmp_path / "hung"
    proc = _start(_fit_args(tmp_path, tmp_path / "a.jsonl", _callback("Hang", at_step=11, marker=str(marker))))
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before = _steps(tmp_path / "a.jsonl")
    assert before == {s: reference[s] for s in range(1, 12)}  # the killed run was the reference run so far

    done = _run(_fit_args(tmp_path, tmp_path / "b.jsonl", "--ckpt_path=last"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {tmp_path / 'ckpt' / 'epoch=1-step=10.ckpt'}" in done.stderr
    _assert_continues(tmp_path / "b.jsonl", reference, first=11)


def test_sigterm_saves_the_current_step_and_exits(tmp_path: Path, reference):
    marker = tmp_path / "hung"
    proc = _start(_fit_args(tmp_path, tmp_path / "a.jsonl", _callback("Hang", at_step=7, marker=str(marker))))
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    saved = tmp_path / "ckpt" / "preempted-step=7.ckpt"
    assert f"SIGTERM at step 7: saved {saved}" in stderr and "Traceback" not in stderr
    verify_checkpoint(saved)  # complete and checksummed

    # a scheduler's restart: --resume auto continues from step 7 (not from the periodic step=6 checkpoint)
    done = _run(_fit_args(tmp_path, tmp_path / "b.jsonl", "--resume", "auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {saved}" in done.stderr
    _assert_continues(tmp_path / "b.jsonl", reference, first=8)


def test_resume_auto_starts_a_new_run_when_there_is_nothing_to_resume(tmp_path: Path):
    done = _run(_fit_args(tmp_path, tmp_path / "a.jsonl", "--resume=auto", steps=2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no complete checkpoint" in done.stderr and "starting a new run" in done.stderr
    assert sorted(_steps(tmp_path / "a.jsonl")) == [1, 2]


# ------------------------------------------------------------------------------------------------ checkpoint writes
_HANG_IN_WRITE = """
import os, sys, time
from pathlib import Path
real_fsync, marker = os.fsync, Path(sys.argv.pop(1))
def fsync(fd):
    name = os.readlink(f"/proc/self/fd/{fd}")
    if "step=12" in name and ".tmp" in name:  # the 6th checkpoint, half written: truncate it and wait to be killed
        os.truncate(fd, os.fstat(fd).st_size // 2)
        marker.write_text(name)
        time.sleep(600)
    return real_fsync(fd)
os.fsync = fsync
from mim.cli import main
sys.exit(main())
"""


def test_sigkill_mid_checkpoint_write_leaves_no_partial_checkpoint(tmp_path: Path, reference):
    marker = tmp_path / "writing"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANG_IN_WRITE, str(marker), *_fit_args(tmp_path, tmp_path / "a.jsonl")],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.suffix == ".ckpt")
    assert "epoch=1-step=12.ckpt" not in names  # nothing incomplete under a final name
    assert "epoch=1-step=10.ckpt" in names
    for name in names:
        verify_checkpoint(tmp_path / "ckpt" / name)

    done = _run(_fit_args(tmp_path, tmp_path / "b.jsonl", "--ckpt_path=last"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {tmp_path / 'ckpt' / 'epoch=1-step=10.ckpt'}" in done.stderr
    _assert_continues(tmp_path / "b.jsonl", reference, first=11)


def _checkpoint_size(reference_root: Path) -> int:
    return max(p.stat().st_size for p in reference_root.rglob("*.ckpt"))


_ENOSPC_AT = """
import errno, os, sys
real_fsync = os.fsync
def fsync(fd):
    if "step=6" in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)
os.fsync = fsync
from mim.cli import main
sys.exit(main())
"""


def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    except OSError:
        return False
    return result.returncode == 0


def test_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path: Path):
    # One checkpoint's size, from a short run.
    probe = _run(_fit_args(tmp_path / "probe", tmp_path / "probe.jsonl", steps=2))
    assert probe.returncode == 0, probe.stderr[-3000:]
    size = _checkpoint_size(tmp_path / "probe")

    disk = tmp_path / "disk"
    if _mount_tmpfs(disk, size * 5 // 2):  # a real full disk: room for two checkpoints and a half
        try:
            done = _run(_fit_args(disk, tmp_path / "a.jsonl"))
            listing = sorted(p.name for p in (disk / "ckpt").iterdir())
            kept = [disk / "ckpt" / n for n in listing]
            for path in kept:
                verify_checkpoint(path) if path.suffix == ".ckpt" else None
        finally:
            subprocess.run(["umount", str(disk)], check=False)
        failed = "epoch=0-step=6.ckpt"
    else:  # no tmpfs (not root): the writer fails as on a full disk at the third checkpoint
        done = subprocess.run(
            [sys.executable, "-c", _ENOSPC_AT, *_fit_args(disk, tmp_path / "a.jsonl")],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        listing = sorted(p.name for p in (disk / "ckpt").iterdir())
        for name in listing:
            verify_checkpoint(disk / "ckpt" / name) if name.endswith(".ckpt") else None
        failed = "epoch=0-step=6.ckpt"
    assert done.returncode == 2, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("mim fit: error:")]
    assert len(error) == 1 and "No space left on device" in error[0] and failed in error[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert [n for n in listing if n.endswith(".ckpt")] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    assert not [n for n in listing if ".tmp" in n]  # no temporary leftovers


# ------------------------------------------------------------------------------------------------ corrupt checkpoints
def test_corrupt_checkpoint_is_named_and_the_previous_good_one_is_used(tmp_path: Path, reference):
    done = _run(_fit_args(tmp_path, tmp_path / "a.jsonl", _callback("StopAt", step=8)))  # the reference, cut short
    assert done.returncode == 0, done.stderr[-3000:]
    newest = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)  # 16 bytes zeroed: still a readable zip, changed tensor values
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="step=8"):
        verify_checkpoint(newest)

    explicit = _run(_fit_args(tmp_path, tmp_path / "b.jsonl", f"--ckpt_path={newest}"))
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    (line,) = [line for line in explicit.stderr.splitlines() if line.startswith("mim fit: error:")]
    assert str(newest) in line and "epoch=0-step=6.ckpt" in line  # names the bad file and offers the previous one

    done = _run(_fit_args(tmp_path, tmp_path / "c.jsonl", "--ckpt_path=last"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {tmp_path / 'ckpt' / 'epoch=0-step=6.ckpt'}" in done.stderr
    _assert_continues(tmp_path / "c.jsonl", reference, first=7)


# ------------------------------------------------------------------------------------------------ NaN
def test_nan_batches_are_skipped_and_counted_and_the_run_goes_on(tmp_path: Path, reference):
    done = _run(_fit_args(tmp_path, tmp_path / "a.jsonl", _callback("PoisonBatch", steps=[4]), steps=8))
    assert done.returncode == 0, done.stderr[-3000:]
    steps = _steps(tmp_path / "a.jsonl")
    assert sorted(steps) == list(range(1, 9))
    assert math.isnan(steps[5][0])  # the poisoned batch (index 4) is the 5th step
    assert all(math.isfinite(loss) for step, (loss, _) in steps.items() if step != 5)
    assert "non-finite" in done.stderr


def test_nan_in_a_row_stops_the_run_with_one_paragraph_and_keeps_the_checkpoints(tmp_path: Path):
    poison = _callback("PoisonBatch", steps=list(range(4, 8)))  # batches 4.. of every epoch: steps 5, 6, ... NaN
    done = _run(_fit_args(tmp_path, tmp_path / "a.jsonl", poison, "--model.init_args.max_nonfinite_steps=3"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("mim fit: error:")]
    assert "non-finite" in line and "3" in line
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    # steps 5, 6, 7 were skipped (no update; the step counter still advances), the third one stopped the run
    assert kept == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]
    for name in kept:
        verify_checkpoint(tmp_path / "ckpt" / name)


# ------------------------------------------------------------------------------------------------ a rank dies
@pytest.mark.distributed
def test_a_dying_rank_stops_the_others_with_an_error_instead_of_a_hang(tmp_path: Path):
    marker = tmp_path / "hung"
    args = _fit_args(tmp_path, tmp_path / "a.jsonl", _callback("Hang", at_step=3, marker=str(marker), rank=1))
    args[3:3] = ["-c", str(ROOT / "recipes" / "_base" / "ddp.yaml")]  # after the recipe, before the flags
    args.append("--trainer.devices=2")
    proc = _start(args)
    _wait_for(marker, proc)
    killed = time.monotonic()
    os.kill(int(marker.read_text()), signal.SIGKILL)  # rank 1 dies; rank 0 waits for it in the next collective
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - killed < 120
    assert proc.returncode == 2, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("mim fit: error:")]
    assert "another process of this run died" in line and "--ckpt_path last" in line
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert kept == ["epoch=0-step=2.ckpt"]  # written before the fault, intact
    verify_checkpoint(tmp_path / "ckpt" / kept[0])


@pytest.mark.distributed
def test_sigterm_in_a_two_process_run_saves_once_and_resumes_bit_identically(tmp_path: Path):
    def ddp(root: Path, log: Path, *extra: str) -> list[str]:
        args = _fit_args(root, log, *extra)
        args[3:3] = ["-c", str(ROOT / "recipes" / "_base" / "ddp.yaml")]  # after the recipe, before the flags
        return [*args, "--trainer.devices=2"]

    reference = _run(ddp(tmp_path / "reference", tmp_path / "reference.jsonl"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _steps(tmp_path / "reference.jsonl")
    assert sorted(expected) == list(range(1, STEPS + 1))

    marker = tmp_path / "hung"
    proc = _start(ddp(tmp_path, tmp_path / "a.jsonl", _callback("Hang", at_step=5, marker=str(marker))))
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)  # to the launching process (rank 0); Lightning forwards it to rank 1
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    # the ranks read the flag they agreed on one step late (no host sync per step): both save after step 6
    saved = tmp_path / "ckpt" / "preempted-step=6.ckpt"
    verify_checkpoint(saved)
    assert not (tmp_path / "ckpt" / "preempted-step=5.ckpt").exists()
    assert "another process of this run died" not in stderr  # rank 1 reports the preemption, not a crash

    done = _run(ddp(tmp_path, tmp_path / "b.jsonl", "--resume=auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {saved}" in done.stderr
    resumed = _steps(tmp_path / "b.jsonl")
    assert sorted(resumed) == list(range(7, STEPS + 1))
    assert resumed == {s: expected[s] for s in resumed}
