"""Sharded training: strategy presets, FSDP2 wrapping, checkpoint consolidation and resume checks.

mim trains under Lightning's ``ddp``, DeepSpeed ZeRO-1/2/3 (``lightning.pytorch.strategies.DeepSpeedStrategy``) and
FSDP2 (``lightning.pytorch.strategies.ModelParallelStrategy``; the older ``FSDPStrategy`` breaks with several forward
passes per step, which EMA teachers need). This module holds what those strategies leave to the user:

* :class:`DeepSpeedStrategy`: Lightning's DeepSpeed strategy that also runs on a CPU accelerator (gloo; Lightning's
  refuses anything but CUDA), can set ZeRO-3's ``stage3_param_persistence_threshold`` as an argument, and refuses a
  resume at another world size with a clear message. On a GPU it behaves exactly like Lightning's.
* :class:`FSDP2Strategy`: ``ModelParallelStrategy`` whose ``"auto"`` sizes mean pure data parallelism over every
  process (Lightning's ``"auto"`` makes the processes of a node a tensor-parallel group, so they would all read the
  same batches).
* :func:`apply_fsdp2`: ``fully_shard`` every transformer block (student, heads, EMA copies), then the whole
  ``PretrainModule`` as the root unit, whose ``training_step`` / ``validation_step`` count as forward passes.
* :func:`consolidate_checkpoint`: a DeepSpeed checkpoint directory (any ZeRO stage) or an FSDP2 distributed
  checkpoint directory (or a plain ``.ckpt`` file) -> one fp32 state dict plus the checkpoint's ``mim`` block and
  counters, without a process group.
* :func:`checkpoint_world_size` / :func:`check_resume`: DeepSpeed shards optimizer state by world size and cannot
  resume at another one; FSDP2 distributed checkpoints reshard on load (torch.distributed.checkpoint) and can.

EMA teachers and target encoders update on the local shards (:mod:`mim.ema`); frozen teachers are not registered
submodules, so no strategy partitions them or puts them in the optimizer or the checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "DeepSpeedStrategy",
    "FSDP2Strategy",
    "WorldSizeMismatchError",
    "apply_fsdp2",
    "check_resume",
    "checkpoint_kind",
    "checkpoint_world_size",
    "consolidate_checkpoint",
]

_DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index file
_LIGHTNING_META = "meta.pt"  # Lightning's non-tensor part of a distributed checkpoint
_DEEPSPEED_KEYS = {  # DeepSpeed's own entries in a model-states file (everything else is Lightning's client state)
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "ds_config",
    "ds_version",
    "autoep_layers",
    "ds_autotp_universal_checkpoint_info",
    "compiled_autograd_config",
    "checkpoint_parallel_dimensions",
}


class WorldSizeMismatchError(RuntimeError):
    """A sharded checkpoint cannot be resumed by this run (another world size, or another strategy family)."""


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_kind(path: str | os.PathLike) -> str:
    """What ``path`` holds: ``"deepspeed"``, ``"dcp"`` (torch.distributed.checkpoint, FSDP2) or ``"file"``.

    Raises:
        FileNotFoundError: when ``path`` does not exist or is a directory of neither kind.
    """
    p = Path(path)
    if p.is_file():
        return "file"
    if p.is_dir():
        if (p / _DCP_METADATA).is_file():
            return "dcp"
        if _deepspeed_tag_dir(p) is not None:
            return "deepspeed"
        raise FileNotFoundError(
            f"{p} is a directory but neither a DeepSpeed checkpoint (no 'latest' file or '*_model_states.pt') "
            f"nor a torch.distributed.checkpoint one (no '{_DCP_METADATA}')"
        )
    raise FileNotFoundError(f"checkpoint {p} does not exist")


def _deepspeed_tag_dir(path: Path) -> Path | None:
    """The folder with DeepSpeed's ``*_model_states.pt`` files (``path/<tag from 'latest'>``), or None."""
    latest = path / "latest"
    tags = [latest.read_text().strip()] if latest.is_file() else []
    tags += [d.name for d in sorted(path.iterdir()) if d.is_dir()]
    for tag in tags:
        if any((path / tag).glob("*_model_states.pt")):
            return path / tag
    return None


def checkpoint_world_size(path: str | os.PathLike) -> int | None:
    """The number of ranks that wrote a sharded checkpoint (None for a plain file).

    DeepSpeed writes one ``*_optim_states.pt`` per data-parallel rank; torch.distributed.checkpoint one
    ``__<rank>_<i>.distcp`` file (at least) per rank.
    """
    kind = checkpoint_kind(path)
    if kind == "file":
        return None
    if kind == "deepspeed":
        tag = _deepspeed_tag_dir(Path(path))
        assert tag is not None
        return len(list(tag.glob("*_optim_states.pt"))) or None
    ranks = {int(m.group(1)) for f in Path(path).iterdir() if (m := re.fullmatch(r"__(\d+)_\d+\.distcp", f.name))}
    return len(ranks) or None


def check_resume(path: str | os.PathLike | None, world_size: int, *, strategy: object | None = None) -> None:
    """Refuse, before anything is loaded, to resume a checkpoint that this world size cannot read.

    * DeepSpeed checkpoints (any ZeRO stage) partition the optimizer state (and, in ZeRO-3, the weights) by
      data-parallel rank: they resume only at the world size that wrote them.
    * FSDP2 distributed checkpoints reshard on load (torch.distributed.checkpoint): any world size works.
    * A sharded directory cannot be resumed by a strategy of the other family (e.g. ``ddp``).

    Args:
        path: the ``ckpt_path`` of the run (None: nothing to check).
        world_size: the resuming run's world size (``trainer.world_size``).
        strategy: the resuming run's strategy (to check the family), optional.

    Raises:
        WorldSizeMismatchError: with what to do instead.
    """
    if path is None or str(path) in ("last", "best", "hpc", "registry") or not Path(path).exists():
        return
    kind = checkpoint_kind(path)
    if kind == "file":
        return
    saved = checkpoint_world_size(path)
    family = None
    if strategy is not None:
        family = (
            "deepspeed"
            if isinstance(strategy, _LightningDeepSpeedStrategy)
            else "dcp"
            if isinstance(strategy, ModelParallelStrategy)
            else "other"
        )
    if family is not None and family != kind:
        raise WorldSizeMismatchError(
            f"{path} is a {'DeepSpeed' if kind == 'deepspeed' else 'FSDP2 (torch.distributed.checkpoint)'} checkpoint "
            f"directory, but this run uses {type(strategy).__name__}. Resume it with the strategy that wrote it, or "
            "start a new run from its consolidated weights (mim.distributed.consolidate_checkpoint / mim export)."
        )
    if kind == "deepspeed" and saved is not None and saved != world_size:
        raise WorldSizeMismatchError(
            f"{path} is a DeepSpeed checkpoint written by {saved} ranks, but this run has world size {world_size}. "
            f"DeepSpeed partitions the optimizer state (and, in ZeRO-3, the weights) by rank, so it resumes only at "
            f"world size {saved}: run with {saved} processes in total (trainer.devices x trainer.num_nodes), or "
            "consolidate it (mim.distributed.consolidate_checkpoint, `mim export`) and start a new run from the fp32 "
            "weights (optimizer state and step counters are not carried over)."
        )


def _fp32(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Floating tensors to contiguous CPU float32; other entries (integer buffers, ``_extra_state``) unchanged."""
    out: dict[str, Any] = {}
    for k, v in state_dict.items():
        if isinstance(v, Tensor):
            v = v.detach().cpu()
            if v.is_floating_point():
                v = v.float()
            v = v.contiguous()
        out[k] = v
    return out


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _consolidate_deepspeed(path: Path) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = _deepspeed_tag_dir(path)
    assert tag is not None
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-1/2, ZeRO-3
    files = sorted(tag.glob("*_model_states.pt"))
    client = _load(next((f for f in files if f.name in names), files[0]))
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints its progress
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag.name)
    # zero_to_fp32 rebuilds parameters and buffers; module entries that are neither (``_extra_state``) come from the
    # module state dict DeepSpeed saved next to them.
    module = client.get("module") or {}
    for k, v in module.items():
        if k not in weights and not isinstance(v, Tensor):
            weights[k] = v
    out = {k: v for k, v in client.items() if k not in _DEEPSPEED_KEYS}
    out["state_dict"] = _strip_wrapper(_fp32(weights))
    return out


def _consolidate_dcp(path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(keys={"state_dict"}, checkpoint_id=str(path))
    out = _load(path / _LIGHTNING_META) if (path / _LIGHTNING_META).is_file() else {}
    out.pop("optimizer_states", None)
    out["state_dict"] = _strip_wrapper(_fp32(loaded["state_dict"]))
    return out


def _strip_wrapper(state_dict: dict[str, Any]) -> dict[str, Any]:
    prefix = "_forward_module."  # Lightning's wrapper around the module under some strategies
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def consolidate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """One fp32 state dict (and the checkpoint's metadata) from a sharded or plain checkpoint.

    Needs no process group and reads only the model part (optimizer shards are skipped where the format allows).

    Args:
        path: a DeepSpeed checkpoint directory (ZeRO-1/2/3, as Lightning's ``DeepSpeedStrategy`` saves it), an FSDP2
            distributed checkpoint directory (``ModelParallelStrategy``), or a plain Lightning ``.ckpt`` file.

    Returns:
        A dict shaped like a plain Lightning checkpoint without optimizer state: ``state_dict`` (the module's keys,
        e.g. ``encoder.vit.blocks.0.attn.qkv.weight``, floating tensors as contiguous fp32 CPU tensors, EMA copies
        included, ``_extra_state`` entries kept), ``mim`` (the block ``PretrainModule.on_save_checkpoint`` writes)
        and Lightning's counters (``epoch``, ``global_step``, ``hyper_parameters`` ...) where present.
    """
    p = Path(path)
    kind = checkpoint_kind(p)
    if kind == "deepspeed":
        return _consolidate_deepspeed(p)
    if kind == "dcp":
        return _consolidate_dcp(p)
    ckpt = _load(p)
    ckpt.pop("optimizer_states", None)
    ckpt["state_dict"] = _strip_wrapper(_fp32(ckpt.get("state_dict", {})))
    return ckpt


# ---------------------------------------------------------------------------------------------- strategies
class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy``, also on a CPU accelerator, with a ZeRO-3 persistence knob and resume check.

    A drop-in ``class_path`` for ``lightning.pytorch.strategies.DeepSpeedStrategy`` (every argument is passed on).
    On CUDA it is Lightning's strategy unchanged apart from the two additions below; on a CPU accelerator it skips
    Lightning's "only supported on CUDA GPUs" check, which is all DeepSpeed needs to run ZeRO-1/2/3 over gloo
    (tests and laptops; use ``torch.optim.AdamW``, not DeepSpeed's own Adam, which compiles for minutes on CPU).

    Args:
        param_persistence_threshold: ZeRO-3 keeps parameters with at most this many elements whole on every rank
            (DeepSpeed's ``stage3_param_persistence_threshold``, default 1e5); None leaves DeepSpeed's default.
        *args: Lightning's ``DeepSpeedStrategy`` arguments.
        **kwargs: Lightning's ``DeepSpeedStrategy`` arguments.
    """

    strategy_name = "mim_deepspeed"

    def __init__(self, *args: Any, param_persistence_threshold: int | None = None, **kwargs: Any) -> None:
        if param_persistence_threshold is not None and param_persistence_threshold < 0:
            raise ValueError(
                f"DeepSpeedStrategy.param_persistence_threshold must be >= 0, got {param_persistence_threshold}"
            )
        super().__init__(*args, **kwargs)
        if param_persistence_threshold is not None and isinstance(self.config, dict):
            zero = self.config.setdefault("zero_optimization", {})
            zero["stage3_param_persistence_threshold"] = int(param_persistence_threshold)

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            super().setup_environment()
            return
        # Lightning's DeepSpeedStrategy.setup_environment only adds the CUDA check on top of DDPStrategy's.
        super(_LightningDeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            super().setup_distributed()
            return
        # Lightning's version first checks CUDA device indices against local ranks (CPU devices have none).
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        _skip_shm_comm_build()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> Any:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import argparse

        import deepspeed

        # Lightning passes ``device_rank=root_device.index``, which is None on CPU; DeepSpeed wants -1 there.
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=-1),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        check_resume(checkpoint_path, self.world_size, strategy=self)
        return super().load_checkpoint(checkpoint_path, weights_only)


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend on plain gloo instead of JIT-compiling its shared-memory collectives (~40 s).

    DeepSpeed builds ``deepspeed_shm_comm`` (a faster intra-node all-reduce for CPU training) the first time its comm
    backend starts on a CPU machine; mim's CPU runs are tests and smoke runs, where gloo is fast enough.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2) for data parallelism: ``"auto"`` sizes shard over every process.

    Lightning's ``"auto"`` sets ``data_parallel_size`` to the number of nodes and ``tensor_parallel_size`` to the
    processes per node; mim has no tensor parallelism, so here ``"auto"`` means ``data_parallel_size = world size``
    and ``tensor_parallel_size = 1`` (the sampler then gives every process its own batches). Explicit sizes are
    passed on. Runs on CPU (gloo) unchanged.
    """

    strategy_name = "mim_fsdp2"

    def __init__(self, *args: Any, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        """Args as ``ModelParallelStrategy``, plus ``reshard_after_forward``: True = full shard (each block's weights
        are freed after its forward and gathered again for the backward), False = shard-grad-op (weights stay
        gathered from forward to backward: less communication, more memory), as FSDP2's ``fully_shard`` takes it."""
        super().__init__(*args, **kwargs)
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


# ---------------------------------------------------------------------------------------------- FSDP2 wrapping
def _block_lists(module: nn.Module) -> list[nn.ModuleList]:
    """Every ``nn.ModuleList`` named ``blocks`` (timm ViT blocks, mim decoders and predictors)."""
    return [
        m for name, m in module.named_modules() if name.rsplit(".", 1)[-1] == "blocks" and isinstance(m, nn.ModuleList)
    ]


def apply_fsdp2(module: nn.Module, mesh: DeviceMesh, **fsdp_kwargs: Any) -> nn.Module:
    """Shard a module with FSDP2: every transformer block is a unit, the module itself the root unit.

    The blocks of the student, of the targets' heads and of EMA copies (registered submodules, built before this
    call) become FSDP2 units; the remaining parameters (patch embedding, tokens, norms, heads) form the root unit.
    EMA copies are sharded exactly like the student (same shapes, same mesh), so :meth:`mim.ema.EMA.update` pairs
    local shards. ``training_step``, ``validation_step``, ``test_step`` and ``predict_step`` are registered as forward
    methods, since Lightning calls them directly and the root's parameters must be gathered around them. Frozen
    teachers that are not registered submodules stay whole on every rank. Idempotent.

    Args:
        module: the LightningModule (or any module) to shard in place.
        mesh: the data-parallel device mesh (1-D).
        **fsdp_kwargs: extra ``fully_shard`` arguments (e.g. ``mp_policy``).

    Returns:
        ``module``, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(module, FSDPModule):
        return module
    if mesh.ndim != 1:
        raise ValueError(f"apply_fsdp2 shards over a 1-D data-parallel mesh, got a {mesh.ndim}-D mesh {mesh}")
    for blocks in _block_lists(module):
        for block in blocks:
            if not isinstance(block, FSDPModule):
                fully_shard(block, mesh=mesh, **fsdp_kwargs)
    fully_shard(module, mesh=mesh, **fsdp_kwargs)
    for name in ("training_step", "validation_step", "test_step", "predict_step"):
        if hasattr(module, name):
            register_fsdp_forward_method(module, name)
    return module


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel sub-mesh of Lightning's ``(data_parallel, tensor_parallel)`` mesh, refusing tensor parallelism.

    Raises:
        ValueError: when the tensor-parallel dimension is larger than 1 (mim has no tensor-parallel layers).
    """
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy: tensor_parallel_size is {mesh['tensor_parallel'].size()}, but mim shards with "
            "FSDP2 over data parallelism only. Use mim.distributed.FSDP2Strategy, or set "
            "trainer.strategy.init_args.data_parallel_size to the world size and tensor_parallel_size to 1."
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh
