"""Atomic, verified checkpoints: temporary name + rename, SHA-256 sidecars and folder manifests, verified on load.

Real Lightning trainers on CPU fit a tiny ``PretrainModule`` for a few steps and save a checkpoint after every step:

* single files (:class:`mim.distributed.AtomicCheckpointIO`, installed by :func:`use_atomic_checkpoints`): written
  under a temporary name with a ``.sha256`` sidecar; a truncated file, 16 zeroed bytes, a text file are one-line
  :class:`CheckpointError` s naming the file and the previous good checkpoint; ``newest_checkpoint`` (``--ckpt_path
  last``) skips them and temporary leftovers; a full disk (a patched writer, and a real ``RLIMIT_FSIZE`` limit) is one
  clear error, leaves nothing under the final name and no temporary file, and rotation (``save_top_k=1``) keeps the
  previous checkpoint;
* sharded folders (mim's ``DeepSpeedStrategy`` ZeRO-2 and ``FSDP2Strategy``, one gloo process, marked
  ``distributed``): written into ``<name>.tmp``, sealed with ``mim-manifest.json`` and renamed; a corrupted or missing
  shard is caught before anything loads.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

import mim.checkpoint as ckpt_module
from mim.checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointWriteError,
    consolidate_checkpoint,
    finalize_checkpoint_folder,
    is_complete,
    newest_checkpoint,
    read_checkpoint,
    temporary_folder,
    verify_checkpoint,
    write_checkpoint_file,
)
from mim.distributed import AtomicCheckpointIO, DeepSpeedStrategy, FSDP2Strategy, use_atomic_checkpoints
from mim.masking import RandomMasking
from mim.module import PretrainModule
from mim.targets import PixelTarget
from tests.dist_helpers import RandomImageData
from tests.factories import cpu_trainer, tiny_encoder

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- helpers
def _module() -> PretrainModule:
    return PretrainModule(
        encoder=tiny_encoder(),
        masking=RandomMasking(),
        targets=[PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)],
        warmup_steps=0,
    )


def _fit(folder: Path, *, steps: int, save_top_k: int = -1, ckpt_path: str | None = None, **trainer) -> L.Trainer:
    """Fit the tiny module for ``steps`` steps, a checkpoint ``step=<n>.ckpt`` in ``folder`` after every step."""
    L.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=1, save_top_k=save_top_k)
    trainer = cpu_trainer(
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        callbacks=[checkpoint],
        default_root_dir=folder.parent,
        **trainer,
    )
    use_atomic_checkpoints(trainer)
    trainer.fit(_module(), datamodule=RandomImageData(num_samples=16, batch_size=4), ckpt_path=ckpt_path)
    return trainer


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or ".old" in p.name)


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A folder with step=1.ckpt and step=2.ckpt (and their sidecars) written by a real 2-step fit."""
    folder = tmp_path_factory.mktemp("atomic") / "ckpt"
    _fit(folder, steps=2)
    return folder


@pytest.fixture
def copy_of_run(run: Path, tmp_path: Path) -> Path:
    """A private copy of ``run`` whose step=2.ckpt is the newest (for tests that damage it)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for i, name in enumerate(["step=1.ckpt", "step=1.ckpt.sha256", "step=2.ckpt", "step=2.ckpt.sha256"]):
        (folder / name).write_bytes((run / name).read_bytes())
        os.utime(folder / name, (1000 + i, 1000 + i))
    return folder


# ---------------------------------------------------------------------------------------------- single files
def test_checkpoints_are_written_atomically_with_a_sidecar(run: Path):
    assert sorted(p.name for p in run.iterdir()) == [
        "step=1.ckpt",
        "step=1.ckpt.sha256",
        "step=2.ckpt",
        "step=2.ckpt.sha256",
    ]
    for name in ("step=1.ckpt", "step=2.ckpt"):
        digest, listed = (run / f"{name}.sha256").read_text().split()
        assert digest == hashlib.sha256((run / name).read_bytes()).hexdigest() and listed == name  # sha256sum -c
        verify_checkpoint(run / name)
        assert is_complete(run / name)
    assert newest_checkpoint(run.parent) == run / "step=2.ckpt"
    assert read_checkpoint(run / "step=2.ckpt")["global_step"] == 2
    assert consolidate_checkpoint(run / "step=1.ckpt")["global_step"] == 1


def test_use_atomic_checkpoints_replaces_only_lightnings_plain_io():
    trainer = cpu_trainer()
    assert use_atomic_checkpoints(trainer) and type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert not use_atomic_checkpoints(trainer)  # already atomic

    class Custom(TorchCheckpointIO):
        pass

    trainer = cpu_trainer(plugins=[Custom()])
    assert not use_atomic_checkpoints(trainer) and type(trainer.strategy.checkpoint_io) is Custom
    trainer = cpu_trainer(plugins=[AsyncCheckpointIO()])  # a wrapper around Lightning's default: the default replaced
    assert use_atomic_checkpoints(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO)
    assert type(trainer.strategy.checkpoint_io.checkpoint_io) is AtomicCheckpointIO
    # the sharded strategies default to it for the files they write through their checkpoint_io
    assert type(DeepSpeedStrategy(stage=2).checkpoint_io) is AtomicCheckpointIO
    assert type(FSDP2Strategy().checkpoint_io) is AtomicCheckpointIO


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero_16_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    path.write_bytes(bytes(data))


def _text(path: Path) -> None:
    path.write_text("oops, a log file saved under the checkpoint's name\n")


DAMAGE = {"truncated": _truncate, "zeroed": _zero_16_bytes, "text": _text}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_one_error_naming_the_previous_good_one(damage: str, copy_of_run: Path, capsys):
    good, bad = copy_of_run / "step=1.ckpt", copy_of_run / "step=2.ckpt"
    DAMAGE[damage](bad)
    os.utime(bad, (2000, 2000))  # still the newest
    for read in (verify_checkpoint, read_checkpoint, consolidate_checkpoint, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError) as error:
            read(bad)
        text = _one_line(error)
        assert text.startswith(f"{bad}: ") and f"use {good} instead" in text, text
        assert "corrupt checkpoint: checksum mismatch" in text  # the sidecar catches all three
    # --ckpt_path last (and the SLURM requeue) skip it for the previous good one and say why on stderr
    assert newest_checkpoint(copy_of_run) == good
    err = capsys.readouterr().err
    assert f"skipping incomplete checkpoint {bad}: corrupt checkpoint: checksum mismatch" in err
    assert not is_complete(bad) and is_complete(good)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_without_a_sidecar_is_caught_by_the_format(damage: str, copy_of_run: Path):
    """Checkpoints of older mim or other tools have no sidecar: the zip archive's CRC-32s and structure catch the
    damage, and an undamaged one still loads."""
    for sidecar in copy_of_run.glob("*.sha256"):
        sidecar.unlink()
    good, bad = copy_of_run / "step=1.ckpt", copy_of_run / "step=2.ckpt"
    assert read_checkpoint(good)["global_step"] == 1
    DAMAGE[damage](bad)
    expected = {
        "truncated": "unreadable checkpoint (not a complete zip archive): the file is truncated or corrupt",
        "zeroed": "fails its CRC-32 check",
        "text": 'a text file, not a checkpoint (it begins "oops',
    }[damage]
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(bad)
    text = _one_line(error)
    assert text.startswith(f"{bad}: ") and expected in text and f"use {good} instead" in text, text
    assert newest_checkpoint(copy_of_run) == good


def test_zeroed_bytes_are_refused_on_resume_instead_of_loading_changed_values(copy_of_run: Path, tmp_path: Path):
    """Lightning itself loads a checkpoint with 16 zeroed bytes in a tensor silently; resuming through the atomic
    CheckpointIO refuses it before anything is restored."""
    bad = copy_of_run / "step=2.ckpt"
    _zero_16_bytes(bad)
    torch.load(bad, map_location="cpu", weights_only=True)  # what Lightning would load without a word
    with pytest.raises(CheckpointError, match="checksum mismatch") as error:
        _fit(tmp_path / "resumed", steps=3, ckpt_path=str(bad))
    assert f"use {copy_of_run / 'step=1.ckpt'} instead" in _one_line(error)


def test_newest_checkpoint_ignores_temporary_leftovers(copy_of_run: Path):
    (copy_of_run / "step=3.ckpt.tmp-4242").write_bytes((copy_of_run / "step=2.ckpt").read_bytes())
    folder = copy_of_run / "step=4.ckpt.tmp"  # an interrupted sharded save, with a complete-looking inside
    folder.mkdir()
    (folder / "nested.ckpt").write_bytes((copy_of_run / "step=2.ckpt").read_bytes())
    (copy_of_run / "step=5.ckpt.old-17").mkdir()
    assert newest_checkpoint(copy_of_run) == copy_of_run / "step=2.ckpt"
    with pytest.raises(CheckpointError, match="unfinished temporary file"):
        verify_checkpoint(copy_of_run / "step=3.ckpt.tmp-4242")


def _enospc_inside(monkeypatch, fail_on: str, *, after: int = 1000) -> None:
    """Make the write of a temporary file whose name contains ``fail_on`` fail with ENOSPC after ``after`` bytes."""
    original = ckpt_module._write_fully

    def write(fd: int, data: memoryview) -> None:
        if fail_on in os.readlink(f"/proc/self/fd/{fd}"):
            original(fd, data[:after])  # part of it reaches the disk, as when a device fills up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(fd, data)

    monkeypatch.setattr(ckpt_module, "_write_fully", write)


def test_disk_full_keeps_the_previous_checkpoint_through_rotation(tmp_path: Path, monkeypatch):
    """save_top_k=1: step 1 is rotated away (with its sidecar) when step 2 is saved; the save of step 3 hits a full
    disk: one clear error, nothing under step=3.ckpt, no temporary file, and step 2 (the only good one) intact."""
    folder = tmp_path / "ckpt"
    _enospc_inside(monkeypatch, "step=3.ckpt.tmp-")
    with pytest.raises(CheckpointWriteError) as error:
        _fit(folder, steps=4, save_top_k=1)
    text = _one_line(error)
    previous = folder / "step=2.ckpt"
    assert text.startswith(f"{folder / 'step=3.ckpt'}: could not write the checkpoint (No space left on device")
    assert f"the previous checkpoint {previous} is intact" in text, text
    assert sorted(p.name for p in folder.iterdir()) == ["step=2.ckpt", "step=2.ckpt.sha256"]
    verify_checkpoint(previous)
    assert read_checkpoint(previous)["global_step"] == 2
    monkeypatch.undo()
    trainer = _fit(tmp_path / "resumed", steps=3, ckpt_path=str(previous))  # and resumes
    assert trainer.global_step == 3


@pytest.mark.parametrize("fail_on", ["last.ckpt.tmp-", "last.ckpt.sha256.tmp-"])
def test_disk_full_while_overwriting_keeps_the_old_file(fail_on: str, tmp_path: Path, monkeypatch):
    """Overwriting a name (``last.ckpt``): a full disk while writing the data or the sidecar leaves the old file and
    its sidecar as they were."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes(), (tmp_path / "last.ckpt.sha256").read_bytes()
    _enospc_inside(monkeypatch, fail_on, after=10)
    with pytest.raises(CheckpointWriteError, match="No space left on device .ENOSPC.") as error:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    assert f"the previous checkpoint {path} is intact" in _one_line(error)
    assert (path.read_bytes(), (tmp_path / "last.ckpt.sha256").read_bytes()) == before
    assert _leftovers(tmp_path) == []
    assert io.load_checkpoint(path)["global_step"] == 1


def test_read_only_folder_is_one_clear_error(tmp_path: Path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(CheckpointWriteError, match="Permission denied .EACCES.*no earlier complete checkpoint"):
            write_checkpoint_file(folder / "a.ckpt", b"data")
    finally:
        folder.chmod(0o755)


_FSIZE_SCRIPT = """
import json, resource, signal, sys
import torch
from mim.checkpoint import CheckpointWriteError
from mim.distributed import AtomicCheckpointIO

folder = sys.argv[1]
io = AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1, "w": torch.ones(100)}, folder + "/step=1.ckpt")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    io.save_checkpoint({"global_step": 2, "w": torch.ones(100_000)}, folder + "/step=2.ckpt")  # 400 kB
except CheckpointWriteError as e:
    print(json.dumps({"error": str(e)}))
"""


def test_real_file_size_limit_is_one_clear_error(tmp_path: Path):
    """A real write failure, without root: RLIMIT_FSIZE with SIGXFSZ ignored makes the kernel refuse the write (EFBIG)
    part-way through the temporary file."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    script = textwrap.dedent(_FSIZE_SCRIPT)
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    error = json.loads(run.stdout.strip().splitlines()[-1])["error"]
    assert "\n" not in error and error.startswith(f"{tmp_path / 'step=2.ckpt'}: could not write the checkpoint")
    assert (
        "File too large (EFBIG)" in error and f"the previous checkpoint {tmp_path / 'step=1.ckpt'} is intact" in error
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=1.ckpt", "step=1.ckpt.sha256"]
    assert _verified_load(tmp_path / "step=1.ckpt")["global_step"] == 1


def _verified_load(path: Path) -> dict:
    """Verify, then load a checkpoint that is not a mim pretraining checkpoint."""
    verify_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- folders
def _fake_shards(folder: Path, marker: str) -> None:
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "shard_0.pt").write_bytes(marker.encode() * 100)
    (folder / "latest").write_text("checkpoint")


@pytest.mark.parametrize("swap", [True, False])
def test_folder_is_sealed_and_replaces_an_older_one_only_when_complete(swap: bool, tmp_path: Path, monkeypatch):
    """finalize_checkpoint_folder: manifest of every file, rename; an existing folder of that name is replaced in one
    step (renameat2 exchange) or, where the file system cannot swap, renamed aside for the instant of the rename."""
    if not swap:
        monkeypatch.setattr(ckpt_module, "_exchange", lambda a, b: False)
    final = tmp_path / "last.ckpt"
    for marker in ("old", "new"):
        tmp = temporary_folder(final)
        _fake_shards(tmp, marker)
        manifest = finalize_checkpoint_folder(tmp, final)
    assert (final / "checkpoint" / "shard_0.pt").read_text() == "new" * 100
    assert set(manifest["files"]) == {"checkpoint/shard_0.pt", "latest"}
    assert manifest["files"]["latest"] == {"size": 10, "sha256": hashlib.sha256(b"checkpoint").hexdigest()}
    assert json.loads((final / MANIFEST_NAME).read_text()) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no .tmp, no .old
    verify_checkpoint(final)


# ---------------------------------------------------------------------------------------------- sharded strategies
@pytest.fixture
def _process_group_cleanup():
    """The one-process DeepSpeed / FSDP2 fits leave a gloo process group and rendezvous variables (MASTER_PORT, RANK
    ...) in this process: destroy the one and restore the environment afterwards."""
    environ = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def _sharded(name: str):
    if name == "zero2":
        return DeepSpeedStrategy(stage=2)
    return FSDP2Strategy()


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("_process_group_cleanup")
@pytest.mark.parametrize("name", ["zero2", "fsdp2"])
def test_sharded_checkpoints_are_sealed_and_verified(name: str, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    folder = tmp_path / "ckpt"
    _fit(folder, steps=2, strategy=_sharded(name))
    assert sorted(p.name for p in folder.iterdir()) == ["step=1.ckpt", "step=2.ckpt"]  # no .tmp leftovers
    for step in (1, 2):
        path = folder / f"step={step}.ckpt"
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        files = sorted(
            f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file() and f.name != MANIFEST_NAME
        )
        assert sorted(manifest["files"]) == files and files
        for rel, entry in manifest["files"].items():
            data = (path / rel).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        verify_checkpoint(path)
        assert consolidate_checkpoint(path)["global_step"] == step
    # a corrupted shard: caught (naming the shard and the previous checkpoint) before anything loads
    bad = folder / "step=2.ckpt"
    shard = max((f for f in bad.rglob("*") if f.is_file() and f.name != MANIFEST_NAME), key=lambda f: f.stat().st_size)
    _zero_16_bytes(shard)
    with pytest.raises(CheckpointError) as error:
        verify_checkpoint(bad)
    text = _one_line(error)
    rel = shard.relative_to(bad).as_posix()
    assert text.startswith(f"{bad}: {rel}: checksum mismatch") and f"use {folder / 'step=1.ckpt'} instead" in text
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        consolidate_checkpoint(bad)
    assert newest_checkpoint(folder) == folder / "step=1.ckpt"
    assert f"skipping incomplete checkpoint {bad}: {rel}: checksum mismatch" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=f"{rel}: checksum mismatch"):  # the strategy's load refuses it
        _fit(tmp_path / "resumed_bad", steps=3, strategy=_sharded(name), ckpt_path=str(bad))
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{rel} is missing"):
        verify_checkpoint(bad)
    # the good one resumes
    trainer = _fit(tmp_path / "resumed", steps=3, strategy=_sharded(name), ckpt_path=str(folder / "step=1.ckpt"))
    assert trainer.global_step == 3
    assert (tmp_path / "resumed" / "step=3.ckpt" / MANIFEST_NAME).is_file()


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_ddp_writes_each_checkpoint_once_on_rank_zero(tmp_path: Path):
    """Under DDP (2 gloo processes), Lightning's ``Strategy.save_checkpoint`` calls the CheckpointIO on global rank 0
    only: one temporary file, one rename and one sidecar per checkpoint, nothing left behind."""
    folder = tmp_path / "ckpt"
    _fit(folder, steps=2, strategy="ddp_spawn", devices=2)
    assert sorted(p.name for p in folder.iterdir()) == [
        "step=1.ckpt",
        "step=1.ckpt.sha256",
        "step=2.ckpt",
        "step=2.ckpt.sha256",
    ]
    for step in (1, 2):
        verify_checkpoint(folder / f"step={step}.ckpt")
        assert read_checkpoint(folder / f"step={step}.ckpt")["global_step"] == step
