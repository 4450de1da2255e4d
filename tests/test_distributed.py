"""Sharded training on CPU (gloo, 2 processes): DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 through `mim fit`.

One tiny model carries every kind of target at once, so each strategy needs one fit: hard-patch masking driven by
``HardPatchTarget`` (MAE pixels + HPM's EMA teacher), a JEPA ``LatentTarget`` (EMA target encoder)
and a ``TeacherTarget`` (frozen teacher read from a file, outside the state dict). Each fit runs 4 steps (2 epochs
of 2 batches per process) and saves a checkpoint after every step. The tests then check

* consolidation: every sharded checkpoint -> one fp32 state dict that loads strictly into the module, whose
  encoder loads strictly into ``MaskedEncoder`` and timm;
* EMA under sharding: every update ran on this rank's shards with no collective communication, and the
  consolidated EMA weights equal a full-tensor EMA of the consolidated student weights (to 1e-6);
* EMA / frozen-teacher parameters never enter the optimizer state;
* resume from step 2 at the same world size reproduces the uninterrupted run's step-4 weights (EMA included);
* resume at another world size: refused with a clear message under DeepSpeed, supported (resharded, model and
  optimizer state restored exactly) under FSDP2.

The processes run `python -m mim fit` with the CPU-capable strategies of :mod:`mim.distributed` as ``class_path``
overrides (Lightning re-launches the command for rank 1; inside pytest itself ``ddp`` would re-launch pytest).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mim.checkpoint import (
    WorldSizeMismatchError,
    check_resume,
    checkpoint_kind,
    checkpoint_world_size,
    consolidate_checkpoint,
)
from mim.distributed import DeepSpeedStrategy, FSDP2Strategy
from mim.ema import EMA, local_shards

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
MOMENTUM = {"targets.0.teacher.module.": 0.9, "targets.1.target_encoder.module.": 0.8}
EMA_OF = {  # EMA key prefix -> the student key prefix it tracks
    "targets.0.teacher.module.encoder.": "encoder.",
    "targets.0.teacher.module.decoder_embed.": "targets.0.decoder.decoder_embed.",
    "targets.0.teacher.module.loss_predictor.": "targets.0.loss_predictor.",
    "targets.1.target_encoder.module.": "encoder.",
}
FROZEN_PREFIXES = tuple(MOMENTUM)
STRATEGIES = {
    "zero2": {"class_path": "mim.distributed.DeepSpeedStrategy", "init_args": {"stage": 2}},
    # A low persistence threshold: most ZeRO-3 parameters are partitioned, the small ones stay whole on every
    # rank (both paths of the EMA update run).
    "zero3": {
        "class_path": "mim.distributed.DeepSpeedStrategy",
        "init_args": {"stage": 3, "param_persistence_threshold": 100},
    },
    "fsdp2": {"class_path": "mim.distributed.FSDP2Strategy"},
}
ENCODER = {"embed_dim": 32, "depth": 2, "num_heads": 2}


# ---------------------------------------------------------------------------------------------- helpers
def _config(root: Path, strategy: str, teacher: Path, *, devices: int = 2, callbacks: list | None = None) -> Path:
    ckpt = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(root / "ckpt"), "filename": "{step}", "every_n_train_steps": 1, "save_top_k": -1},
    }
    probe = {"class_path": "tests.dist_helpers.EMAProbe", "init_args": {"out": str(root / "probe")}}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": STRATEGIES[strategy],
            "max_epochs": 2,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "callbacks": [ckpt, probe] + (callbacks or []),
        },
        "model": {
            "class_path": "mim.PretrainModule",
            "init_args": {
                "encoder": {
                    "class_path": "mim.models.MaskedEncoder",
                    "init_args": {
                        "arch": "vit_tiny_patch16_224",
                        "img_size": 16,
                        "patch_size": 4,
                        "in_chans": 3,
                        "model_kwargs": ENCODER,
                    },
                },
                "masking": {
                    "class_path": "mim.masking.HardPatchMasking",
                    "init_args": {"mask_ratio": 0.75, "max_hard_fraction": 0.5},
                },
                "targets": [
                    {
                        "class_path": "mim.targets.HardPatchTarget",
                        "init_args": {
                            "decoder_dim": 32,
                            "decoder_depth": 1,
                            "decoder_num_heads": 2,
                            "ema_momentum": [0.9, 0.9],
                        },
                    },
                    {
                        "class_path": "mim.targets.latent.LatentTarget",
                        "init_args": {
                            "predictor_dim": 32,
                            "predictor_depth": 1,
                            "momentum": [0.8, 0.8],
                            "monitor_every": 0,
                        },
                    },
                    {
                        "class_path": "mim.targets.teacher.TeacherTarget",
                        "init_args": {
                            "teacher_arch": "vit_tiny_patch16_224",
                            "teacher_checkpoint": str(teacher),
                            "teacher_kwargs": {"img_size": 16, "patch_size": 4, "in_chans": 3, **ENCODER},
                            "student_layers": "output",
                            "layers": 1,
                        },
                    },
                ],
                "lr": 1e-3,
                "warmup_steps": 0,
            },
        },
        "data": {"class_path": "tests.dist_helpers.RandomImageData", "init_args": {"num_samples": 16, "batch_size": 4}},
    }
    path = root / f"{strategy}_{devices}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _mim_fit(config: Path, *args: str, tmp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m mim fit -c CONFIG ARGS` in its own process group (killed whole on a timeout)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions"),  # DeepSpeed JIT builds stay out of the repo
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "mim", "fit", "-c", str(config), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mim fit timed out after {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@dataclass
class Run:
    strategy: str
    root: Path
    config: Path

    def ckpt(self, step: int) -> Path:
        return self.root / "ckpt" / f"step={step}.ckpt"


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    from tests.dist_helpers import write_teacher

    return write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", img_size=16, patch_size=4, **ENCODER)


@pytest.fixture(scope="module", params=list(STRATEGIES))
def fitted(request, tmp_path_factory, teacher_file) -> Run:
    root = tmp_path_factory.mktemp(f"fit_{request.param}")
    config = _config(root, request.param, teacher_file)
    run = _mim_fit(config, tmp=root)
    assert run.returncode == 0, run.stdout[-4000:]
    return Run(request.param, root, config)


def _reference_module(run: Run) -> nn.Module:
    """The run's PretrainModule built on one process (no strategy), for key sets and strict loading."""
    from mim.lightning_cli import build

    cli = build(
        ["--config", str(run.config), "--trainer.strategy=auto", "--trainer.devices=1", "--trainer.callbacks=[]"]
    )
    return cli.model


def _max_diff(a: dict, b: dict) -> float:
    return max(
        ((a[k] - b[k]).abs().max().item() for k in a if isinstance(a[k], torch.Tensor) and a[k].is_floating_point()),
        default=0.0,
    )


# ---------------------------------------------------------------------------------------------- 2-process runs
@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_sharded_checkpoints_consolidate_to_fp32(fitted: Run):
    import timm

    from mim.models import MaskedEncoder

    path = fitted.ckpt(STEPS)
    assert checkpoint_kind(path) == ("dcp" if fitted.strategy == "fsdp2" else "deepspeed")
    assert checkpoint_world_size(path) == 2
    ckpt = consolidate_checkpoint(path)
    assert ckpt["global_step"] == STEPS and "optimizer_states" not in ckpt
    state = ckpt["state_dict"]
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    # The whole module loads strictly: EMA copies included, the TeacherTarget's _extra_state (teacher hash) too,
    # and no frozen-teacher weights (they are not part of the module).
    module = _reference_module(fitted)
    assert set(state) == set(module.state_dict()), set(state) ^ set(module.state_dict())
    assert "targets.2._extra_state" in state
    assert not any(k.startswith("targets.2.") and ".blocks." in k for k in state)  # no frozen-teacher weights
    module.load_state_dict(state, strict=True)
    # The encoder alone loads strictly into MaskedEncoder and into timm.
    config = ckpt["mim"]["encoder"]
    encoder = MaskedEncoder(**config)
    encoder.load_state_dict({k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")})
    vit = {k[len("encoder.vit.") :]: v for k, v in state.items() if k.startswith("encoder.vit.")}
    kwargs = {"img_size": 16, "patch_size": 4, "in_chans": 3, **config["model_kwargs"]}
    timm.create_model(config["arch"], pretrained=False, num_classes=0, **kwargs).load_state_dict(vit, strict=True)
    # The weights moved from the first checkpoint to the last (the run trained).
    assert _max_diff(state, consolidate_checkpoint(fitted.ckpt(1))["state_dict"]) > 0


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_ema_updates_run_on_local_shards_without_communication(fitted: Run):
    for rank in (0, 1):
        probe = json.loads((fitted.root / "probe" / f"probe_rank{rank}.json").read_text())
        assert probe["control_comm_events"] > 0, "the profiler must see a deliberate all-reduce"
        updates = probe["updates"]
        assert len(updates) == 2 * STEPS  # HPM teacher + JEPA target encoder, every step
        assert {u["ema"] for u in updates} == {"targets.0.teacher", "targets.1.target_encoder"}
        for u in updates:
            assert u["comm_events"] == 0, u
            assert u["max_formula_error"] < 1e-6, u
            if fitted.strategy == "zero3":
                assert u["zero3"] > 0 and u["local_numel"] < u["full_numel"], u
                assert 0 < u["whole_zero3"] < u["zero3"], u  # partitioned and persistent parameters both occur
            elif fitted.strategy == "fsdp2":
                assert u["dtensor"] > 0 and u["local_numel"] < u["full_numel"], u
            else:  # ZeRO-2 keeps whole parameters on every rank
                assert u["zero3"] == u["dtensor"] == 0 and u["local_numel"] == u["full_numel"], u
        assert max(u["max_change"] for u in updates) > 0


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_ema_equals_full_tensor_ema_of_consolidated_weights(fitted: Run):
    before = consolidate_checkpoint(fitted.ckpt(STEPS - 1))["state_dict"]
    after = consolidate_checkpoint(fitted.ckpt(STEPS))["state_dict"]
    checked = 0
    for key, ema in after.items():
        for prefix, student in EMA_OF.items():
            if key.startswith(prefix):
                m = next(v for p, v in MOMENTUM.items() if key.startswith(p))
                expected = m * before[key] + (1 - m) * after[student + key[len(prefix) :]]
                torch.testing.assert_close(ema, expected, rtol=0, atol=1e-6, msg=key)
                checked += 1
    assert checked >= 60
    assert _max_diff({k: after[k] for k in after if k.startswith(FROZEN_PREFIXES)}, before) > 0


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_ema_and_teacher_parameters_never_in_optimizer_state(fitted: Run):
    module = _reference_module(fitted)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert not any(n.startswith(FROZEN_PREFIXES) for n in trainable)
    path = fitted.ckpt(STEPS)
    if fitted.strategy == "fsdp2":
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        in_optimizer = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in keys if k.startswith("optimizer_0.state.")}
    else:
        states = sorted((path / "checkpoint").glob("*model_states.pt"))[0]
        saved = torch.load(states, map_location="cpu", weights_only=False)
        in_optimizer = {n for group in saved["param_shapes"] for n in group}
        frozen = set(saved["frozen_param_shapes"])
        assert {n for n, _ in module.named_parameters() if n.startswith(FROZEN_PREFIXES)} <= frozen
    assert in_optimizer == trainable, in_optimizer ^ trainable


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_resume_same_world_size_matches_uninterrupted_run(fitted: Run, tmp_path: Path):
    config = _config(tmp_path, fitted.strategy, Path(_teacher_path(fitted)))
    run = _mim_fit(config, f"--ckpt_path={fitted.ckpt(2)}", tmp=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:]
    resumed = consolidate_checkpoint(tmp_path / "ckpt" / f"step={STEPS}.ckpt")
    uninterrupted = consolidate_checkpoint(fitted.ckpt(STEPS))
    assert resumed["global_step"] == STEPS
    assert not (tmp_path / "ckpt" / "step=2.ckpt").exists()  # it continued from step 2
    assert set(resumed["state_dict"]) == set(uninterrupted["state_dict"])
    # Same data order, masks and optimizer state: the same weights, EMA copies included.
    assert _max_diff(resumed["state_dict"], uninterrupted["state_dict"]) <= 1e-6


def _teacher_path(run: Run) -> str:
    config = yaml.safe_load(run.config.read_text())
    return config["model"]["init_args"]["targets"][2]["init_args"]["teacher_checkpoint"]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_resume_at_another_world_size(fitted: Run, tmp_path: Path):
    state_probe = {"class_path": "tests.dist_helpers.StateProbe", "init_args": {"out": str(tmp_path / "state")}}
    config = _config(tmp_path, fitted.strategy, Path(_teacher_path(fitted)), devices=1, callbacks=[state_probe])
    run = _mim_fit(config, f"--ckpt_path={fitted.ckpt(2)}", tmp=tmp_path)
    if fitted.strategy != "fsdp2":  # DeepSpeed: refused before anything is loaded, with what to do instead
        assert run.returncode == 2  # one line (mim fit: error: ...), no traceback
        assert "mim fit: error: " in run.stdout and "Traceback" not in run.stdout
        assert "DeepSpeed checkpoint written by 2 ranks, but this run has world size 1" in run.stdout
        assert "consolidate" in run.stdout
        return
    # FSDP2: torch.distributed.checkpoint reshards on load; model and optimizer state are restored exactly.
    assert run.returncode == 0, run.stdout[-4000:]
    start = torch.load(tmp_path / "state" / "start_state.pt", map_location="cpu", weights_only=False)
    assert start["global_step"] == 2
    saved = consolidate_checkpoint(fitted.ckpt(2))["state_dict"]
    params = {k: v for k, v in start["params"].items() if isinstance(v, torch.Tensor)}
    assert set(params) == {k for k, v in saved.items() if isinstance(v, torch.Tensor)}
    assert _max_diff(params, saved) == 0.0
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "no process group: loading in one process" is the intent
        warnings.simplefilter("ignore", UserWarning)
        saved_optimizer = _load_state_dict_from_keys(keys={"optimizer_0"}, checkpoint_id=str(fitted.ckpt(2)))
    moments = saved_optimizer["optimizer_0"]["state"]  # {parameter name: {"step", "exp_avg", "exp_avg_sq"}}
    assert set(start["optimizer"]) == set(moments)
    for name, state in start["optimizer"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], moments[name][key], rtol=0, atol=0, msg=f"{name}.{key}")
    assert (tmp_path / "ckpt" / f"step={STEPS}.ckpt").exists()  # and it trained on


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_consolidated_checkpoint_exports_to_timm(fitted: Run, tmp_path: Path):
    import timm

    from mim.export import export_encoder

    consolidated = consolidate_checkpoint(fitted.ckpt(STEPS))
    torch.save(consolidated, tmp_path / "consolidated.ckpt")  # a plain checkpoint file

    def check(out: Path) -> None:
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=True,
            num_classes=0,
            img_size=16,
            patch_size=4,
            in_chans=3,
            **ENCODER,
            pretrained_cfg_overlay={"file": str(out)},
        )
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, consolidated["state_dict"][f"encoder.vit.{name}"], msg=name)

    check(export_encoder(tmp_path / "consolidated.ckpt", tmp_path / "from_file.safetensors"))
    assert fitted.ckpt(STEPS).is_dir()  # `mim export` reads the sharded directory directly
    check(export_encoder(fitted.ckpt(STEPS), tmp_path / "from_dir.safetensors"))


# ---------------------------------------------------------------------------------------------- no processes
def test_check_resume_refuses_deepspeed_world_size_change(tmp_path: Path):
    tag = tmp_path / "ds.ckpt" / "checkpoint"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text("checkpoint")
    for rank in range(4):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").touch()
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    assert checkpoint_kind(tag.parent) == "deepspeed" and checkpoint_world_size(tag.parent) == 4
    check_resume(tag.parent, 4)
    with pytest.raises(WorldSizeMismatchError, match="written by 4 ranks, but this run has world size 2"):
        check_resume(tag.parent, 2)
    with pytest.raises(WorldSizeMismatchError, match="DeepSpeed checkpoint directory, but this run uses FSDP2Strategy"):
        check_resume(tag.parent, 4, strategy=FSDP2Strategy())
    check_resume(None, 3)  # nothing to resume
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2, dtype=torch.bfloat16)}, "mim": {"format": 1}}, plain)
    check_resume(plain, 7)
    assert checkpoint_kind(plain) == "file" and checkpoint_world_size(plain) is None
    ckpt = consolidate_checkpoint(plain)
    assert ckpt["state_dict"]["w"].dtype == torch.float32 and ckpt["mim"] == {"format": 1}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a DeepSpeed checkpoint"):
        checkpoint_kind(tmp_path / "empty")


def test_dcp_directory_world_size_and_family(tmp_path: Path):
    path = tmp_path / "fsdp.ckpt"
    path.mkdir()
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "meta.pt"):
        (path / name).touch()
    assert checkpoint_kind(path) == "dcp" and checkpoint_world_size(path) == 3
    check_resume(path, 1, strategy=FSDP2Strategy())  # FSDP2 reshards on load
    with pytest.raises(
        WorldSizeMismatchError, match="FSDP2 .* checkpoint directory, but this run uses DeepSpeedStrategy"
    ):
        check_resume(path, 3, strategy=DeepSpeedStrategy(stage=3))


def test_deepspeed_strategy_is_a_drop_in_with_persistence_threshold():
    from lightning.pytorch.strategies import DeepSpeedStrategy as Lightning

    strategy = DeepSpeedStrategy(stage=3, param_persistence_threshold=0)
    assert isinstance(strategy, Lightning)
    assert strategy.config["zero_optimization"]["stage"] == 3
    assert strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert "stage3_param_persistence_threshold" not in DeepSpeedStrategy(stage=3).config["zero_optimization"]
    with pytest.raises(ValueError, match="DeepSpeedStrategy.param_persistence_threshold must be a number >= 0"):
        DeepSpeedStrategy(param_persistence_threshold=-1)


def test_ema_local_shards_refuses_mixed_sharding():
    class FakeZero3(nn.Parameter):
        pass

    online = nn.Linear(3, 2)
    ema = EMA(online)
    targets, sources = local_shards(list(ema.module.parameters()), list(online.parameters()))
    assert [t.shape for t in targets] == [s.shape for s in sources] == [torch.Size([2, 3]), torch.Size([2])]
    weight = ema.module.weight
    weight.ds_tensor = torch.zeros(3)  # as if only the EMA copy had been partitioned by ZeRO-3
    weight.ds_numel = 6
    with pytest.raises(RuntimeError, match="sharded in one module and not in the other"):
        ema.update(online, 0.5)


def test_ema_keeps_fp32_master_for_16_bit_weights():
    """A 16-bit EMA with m = 0.999 barely moves (its updates are below bf16's resolution); the float32 master tracks
    a float32 EMA of the float32 student closely, and it is saved and restored with the state dict."""
    torch.manual_seed(0)
    student = nn.Linear(32, 32)
    reference = EMA(student)  # float32 throughout
    ema = EMA(student).to(torch.bfloat16)
    naive = [p.detach().to(torch.bfloat16).clone() for p in student.parameters()]
    gen = torch.Generator().manual_seed(1)
    m = 0.999

    def train(steps: int) -> None:
        for _ in range(steps):
            with torch.no_grad():
                for p in student.parameters():
                    p.add_(0.002 + 0.002 * torch.randn(p.shape, generator=gen))  # a steady drift
            online = copy.deepcopy(student).to(torch.bfloat16)  # what DeepSpeed's bf16 module holds
            reference.update(student, m)
            ema.update(online, m)
            torch._foreach_lerp_(naive, [p.detach() for p in online.parameters()], 1 - m)

    train(300)
    ref = list(reference.module.parameters())
    drift = max((r - s).abs().max().item() for r, s in zip(ref, student.parameters()))
    assert drift > 0.2  # the EMA lags the student by a lot
    master_err = max((a - r).abs().max().item() for a, r in zip(ema._master, ref))
    weight_err = max((a.float() - r).abs().max().item() for a, r in zip(ema.module.parameters(), ref))
    naive_err = max((a.float() - r).abs().max().item() for a, r in zip(naive, ref))
    assert master_err < 2e-3 and weight_err < 1e-2, (master_err, weight_err)
    assert naive_err > 20 * weight_err, (naive_err, weight_err)  # the stall the master prevents
    # Saved and restored with the state dict; an update after the restore continues exactly.
    clone = EMA(student).to(torch.bfloat16)
    clone.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(clone._master, ema._master))
    online = copy.deepcopy(student).to(torch.bfloat16)
    ema.update(online, m)
    clone.update(online, m)
    assert all(torch.equal(a, b) for a, b in zip(clone._master, ema._master))
    # A master made for another layout (here: other shapes) is rebuilt from the 16-bit weights.
    other = EMA(nn.Linear(32, 8)).to(torch.bfloat16)
    other.set_extra_state(ema.get_extra_state())
    other.update(nn.Linear(32, 8).to(torch.bfloat16), m)
    assert [t.shape for t in other._master] == [torch.Size([8, 32]), torch.Size([8])]
    # float32 weights need no master
    assert reference.get_extra_state()["fp32_master"] is None


@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp2_strategy_full_shard_or_shard_grad_op(reshard: bool, tmp_path: Path):
    """recipes/_base/fsdp.yaml (full shard) frees each block's gathered weights after its forward;
    fsdp_shard_grad_op.yaml keeps them until the backward. One gloo process is enough to see the difference."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from mim.distributed import apply_fsdp2

    assert FSDP2Strategy(reshard_after_forward=reshard).reshard_after_forward is reshard
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Module()
        model.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2))
        model.head = nn.Linear(8, 1)
        model.forward = lambda x: model.head(model.blocks[1](model.blocks[0](x)))
        apply_fsdp2(model, init_device_mesh("cpu", (1,)), reshard_after_forward=reshard)
        assert isinstance(model.blocks[0][0].weight, DTensor)  # sharded before the step
        model(torch.randn(4, 8)).sum()
        gathered = not isinstance(model.blocks[0][0].weight, DTensor)
        assert gathered is (not reshard)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["zero2", "fsdp2"])
def test_finetune_runs_sharded(strategy: str, tmp_path: Path):
    """`mim fit` with a FinetuneModule (layer decay groups, Mixup, weight EMA) under 2-process ZeRO-2 and FSDP2; the
    sharded checkpoint consolidates with the classifier head and the EMA copy."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": STRATEGIES[strategy], "max_steps": 2,
            "limit_val_batches": 1, "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "filename": "last"}}],
        },
        "model": {
            "class_path": "mim.finetune.FinetuneModule",
            "init_args": {
                "encoder": {"class_path": "mim.models.MaskedEncoder",
                            "init_args": {"arch": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4,
                                          "model_kwargs": ENCODER}},
                "lr": 1e-3, "warmup_steps": 0, "ema_decay": 0.9, "random_erasing": 0.25,
            },
        },
        "data": {"class_path": "tests.dist_helpers.RandomLabelledImageData",
                 "init_args": {"num_samples": 16, "batch_size": 4, "num_classes": 3}},
    }  # fmt: skip
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    run = _mim_fit(path, tmp=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:]
    state = consolidate_checkpoint(next((tmp_path / "ckpt").iterdir()))["state_dict"]
    assert state["head.weight"].shape == (3, ENCODER["embed_dim"])
    assert any(k.startswith("ema.module.head.") for k in state)
    assert "encoder.vit.norm.weight" not in state and "fc_norm.weight" in state
