"""Sharded training: strategy presets and FSDP2 wrapping (checkpoint reading lives in :mod:`mim.checkpoint`).

mim trains under Lightning's ``ddp``, DeepSpeed ZeRO-1/2/3 (``lightning.pytorch.strategies.DeepSpeedStrategy``) and
FSDP2 (``lightning.pytorch.strategies.ModelParallelStrategy``; the older ``FSDPStrategy`` breaks with several forward
passes per step, which EMA teachers need). This module holds what those strategies leave to the user:

* :class:`DeepSpeedStrategy`: Lightning's DeepSpeed strategy that also runs on a CPU accelerator (gloo), can set
  ZeRO-3's ``stage3_param_persistence_threshold`` as an argument, and refuses a resume at another world size.
* :class:`FSDP2Strategy`: ``ModelParallelStrategy`` whose ``"auto"`` sizes mean pure data parallelism over every
  process (Lightning's ``"auto"`` makes the processes of a node a tensor-parallel group).
* :func:`apply_fsdp2`: ``fully_shard`` every transformer block (student, heads, EMA copies), then the whole
  ``PretrainModule`` as the root unit, whose ``training_step`` / ``validation_step`` count as forward passes.
* :class:`AtomicCheckpointIO` and :func:`use_atomic_checkpoints`: single-file checkpoints written under a temporary
  name, renamed when complete, with a SHA-256 sidecar verified on load. Both strategies above write their checkpoint
  folders the same way (``<name>.tmp``, then ``mim-info.json``, ``mim-manifest.json`` and a rename; verified on load).

EMA teachers and target encoders update on the local shards (:mod:`mim.ema`); frozen teachers are not registered
submodules, so no strategy partitions them or puts them in the optimizer or the checkpoint.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

from mim.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    check_resume,
    finalize_checkpoint_folder,
    remove_checkpoint,
    temporary_folder,
    verify_checkpoint,
    write_checkpoint_file,
)
from mim.checks import check_range

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "INFO_NAME",
    "AtomicCheckpointIO",
    "DeepSpeedStrategy",
    "FSDP2Strategy",
    "apply_fsdp2",
    "data_parallel_mesh",
    "read_checkpoint_info",
    "shard_if_fsdp2",
    "use_atomic_checkpoints",
    "write_checkpoint_info",
]


# ---------------------------------------------------------------------------------------------- checkpoint files
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic, checksummed writes and verified loads.

    ``save_checkpoint`` serialises to memory (as Lightning does), then :func:`mim.checkpoint.write_checkpoint_file`
    writes ``<name>.tmp-<pid>`` in the checkpoint's folder, fsyncs it, writes the SHA-256 (computed from the buffer) to
    ``<name>.sha256`` and renames the file to ``<name>``. A full disk or any other OSError raises one
    :class:`~mim.checkpoint.CheckpointWriteError` before anything is renamed, so ``ModelCheckpoint`` never gets to
    delete the previous checkpoint. ``load_checkpoint`` verifies the checksum first; ``remove_checkpoint`` removes the
    sidecar too. Paths on remote file systems (``s3://`` ...) go through Lightning's own code unchanged.

    Under DDP, Lightning's strategies call ``save_checkpoint`` on global rank 0 only (``Strategy.save_checkpoint``),
    so each checkpoint is written and renamed once.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically with a ``.sha256`` sidecar (see the class docstring).

        Raises:
            TypeError: ``storage_options`` given (as Lightning's ``TorchCheckpointIO``).
            CheckpointWriteError: the write failed (full disk, file-size limit, read-only folder ...).
        """
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_checkpoint_file(_local(path), buffer.getbuffer())

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Verify the checkpoint (:func:`mim.checkpoint.verify_checkpoint`), then load it as Lightning does.

        Raises:
            CheckpointError: a checksum mismatch, a truncated or corrupt file, naming the previous good checkpoint.
        """
        if _is_local_file_protocol(path) and Path(_local(path)).exists():
            verify_checkpoint(_local(path))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete a checkpoint file (or folder) and its ``.sha256`` sidecar."""
        if _is_local_file_protocol(path):
            remove_checkpoint(_local(path))
        else:
            super().remove_checkpoint(path)


def _local(path: Any) -> Path:
    """A local ``str`` / ``PathLike`` / ``file://`` path as a Path."""
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def use_atomic_checkpoints(trainer: Any) -> bool:
    """Give a trainer's strategy :class:`AtomicCheckpointIO` when it would use Lightning's plain ``TorchCheckpointIO``.

    Single-device and DDP strategies write ``.ckpt`` files through their ``checkpoint_io``; a user's own
    ``CheckpointIO`` (another class, or a subclass) is left alone, and inside a wrapper (``AsyncCheckpointIO``) only a
    plain ``TorchCheckpointIO`` (or none yet) is replaced. mim's :class:`DeepSpeedStrategy` and :class:`FSDP2Strategy`
    write their checkpoint folders atomically themselves (and default to :class:`AtomicCheckpointIO` for any file they
    write). Call it before ``trainer.fit`` (e.g. from the CLI or a callback's ``setup``).

    Args:
        trainer: a ``lightning.pytorch.Trainer``.

    Returns:
        Whether the checkpoint IO was replaced.
    """
    strategy: Strategy = trainer.strategy
    current = strategy._checkpoint_io  # the property would create (and keep) a plain TorchCheckpointIO
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    if isinstance(current, _WrappingCheckpointIO):
        inner = current._checkpoint_io
        if inner is None or type(inner) is TorchCheckpointIO:
            current._checkpoint_io = AtomicCheckpointIO()
            current._base_checkpoint_io_configured = True
            return True
        if isinstance(inner, _WrappingCheckpointIO):
            return False  # nested wrappers: a user's arrangement, left alone
    return False


INFO_NAME = "mim-info.json"
"""Inside a sharded checkpoint folder: the checkpoint's plain top-level entries (:func:`write_checkpoint_info`)."""


def write_checkpoint_info(folder: str | os.PathLike, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Write :data:`INFO_NAME` into a sharded checkpoint folder: every top-level entry of ``checkpoint`` that is a
    string, number or boolean (``epoch``, ``global_step``, ``wandb_run_id`` ...), as JSON.

    A single ``.ckpt`` file holds these entries itself; a DeepSpeed or FSDP2 folder buries them in a rank's pickle, so
    a reader that wants one of them (the wandb run id on resume, :func:`mim.run_logging.checkpoint_run_id`) reads this
    small file instead. Written by rank 0 before the folder is sealed, so the manifest covers it.

    Returns:
        What was written.
    """
    info = {k: v for k, v in checkpoint.items() if isinstance(k, str) and isinstance(v, str | int | float | bool)}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / INFO_NAME).write_text(json.dumps(info, indent=1, sort_keys=True))
    return info


def read_checkpoint_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The :data:`INFO_NAME` entries of a sharded checkpoint folder; ``{}`` when it has none or it cannot be read."""
    try:
        info = json.loads((Path(folder) / INFO_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


class _AtomicFolders:
    """Mixin for the sharded strategies: checkpoint folders written into ``<name>.tmp`` and sealed by rank 0.

    ``save_checkpoint``: rank 0 clears a stale ``<name>.tmp``; every rank writes into it (the strategy's own save);
    barrier; rank 0 writes :data:`INFO_NAME` (:func:`write_checkpoint_info`: step, wandb run id ...) and
    ``mim-manifest.json`` (each file's relative path, size and SHA-256) and renames the folder to ``<name>``,
    replacing an older one only now (:func:`mim.checkpoint.finalize_checkpoint_folder`); its outcome is broadcast, so
    every rank returns or raises the same one-line error together. ``load_checkpoint`` verifies the
    manifest on rank 0 and broadcasts the verdict before any rank loads. Assumes a file system every rank sees (as
    resuming sharded checkpoints does).
    """

    def _save_atomically(self, save: Callable[[Any], None], filepath: Any, checkpoint: dict[str, Any]) -> None:
        strategy: Any = self
        final = Path(strategy.broadcast(str(_local(filepath))))
        tmp = final.with_name(final.name + ".tmp")
        error: str | None = None
        if strategy.is_global_zero:
            try:
                tmp = temporary_folder(final)
            except OSError as e:
                error = f"{tmp}: could not clear a leftover temporary folder ({e.strerror or e}); remove it by hand"
        error = strategy.broadcast(error)
        if error is not None:
            raise CheckpointWriteError(error)
        try:
            save(str(tmp))
        except (OSError, RuntimeError) as e:  # torch.save reports a failed file write as a RuntimeError
            if not isinstance(e, OSError) and "write" not in str(e).lower():
                raise
            cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1][:160]
            raise CheckpointWriteError(
                f"{final}: could not write this rank's part of the checkpoint into {tmp} ({cause}); nothing was "
                "written under that name and the previous checkpoints are intact: free space (or fix the folder's "
                "permissions), then resume with --ckpt_path last"
            ) from None
        strategy.barrier("mim.save_checkpoint")
        if strategy.is_global_zero:
            try:
                write_checkpoint_info(tmp, checkpoint)
                finalize_checkpoint_folder(tmp, final)
            except CheckpointWriteError as e:
                error = str(e)
            except OSError as e:
                error = (
                    f"{final}: could not write {INFO_NAME} into {tmp} ({e.strerror or e}); the previous checkpoints "
                    "are intact: free space (or fix the folder's permissions), then resume with --ckpt_path last"
                )
        error = strategy.broadcast(error)
        if error is not None:
            raise CheckpointWriteError(error)

    def _verify_on_rank_zero(self, checkpoint_path: Any) -> None:
        strategy: Any = self
        error: str | None = None
        if strategy.is_global_zero and _is_local_file_protocol(checkpoint_path):
            path = _local(checkpoint_path)
            if path.exists():
                try:
                    verify_checkpoint(path)
                except CheckpointError as e:
                    error = str(e)
        error = strategy.broadcast(error)
        if error is not None:
            raise CheckpointError(error)

    @property
    def checkpoint_io(self) -> CheckpointIO:
        """:class:`AtomicCheckpointIO` unless one was set (files these strategies write through it)."""
        strategy: Any = self
        if strategy._checkpoint_io is None:
            strategy._checkpoint_io = AtomicCheckpointIO()
        return Strategy.checkpoint_io.fget(strategy)  # type: ignore[attr-defined]

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        strategy: Any = self
        strategy._checkpoint_io = io


# ---------------------------------------------------------------------------------------------- strategies
class DeepSpeedStrategy(_AtomicFolders, _LightningDeepSpeedStrategy):
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
        if param_persistence_threshold is not None:
            check_range("DeepSpeedStrategy", "param_persistence_threshold", param_persistence_threshold, 0, math.inf)
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

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        """DeepSpeed's checkpoint folder, written into ``<filepath>.tmp`` and renamed with a manifest when complete."""
        if storage_options is not None:
            super().save_checkpoint(checkpoint, filepath, storage_options)  # Lightning's TypeError
        save = lambda tmp: super(DeepSpeedStrategy, self).save_checkpoint(checkpoint, tmp)  # noqa: E731
        self._save_atomically(save, filepath, checkpoint)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Refuse another world size (:func:`mim.checkpoint.check_resume`), verify the manifest, then load."""
        check_resume(checkpoint_path, self.world_size, strategy=self)
        self._verify_on_rank_zero(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only)


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU backend on plain gloo instead of JIT-compiling its shared-memory collectives (~40 s).

    DeepSpeed builds ``deepspeed_shm_comm`` (a faster intra-node all-reduce for CPU training) the first time its comm
    backend starts on a CPU machine; mim's CPU runs are tests and smoke runs, where gloo is fast enough.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class FSDP2Strategy(_AtomicFolders, ModelParallelStrategy):
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

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """A distributed checkpoint folder, written into ``<filepath>.tmp`` and renamed with a manifest when complete
        (a full-state-dict file, ``save_distributed_checkpoint=False``, goes through :class:`AtomicCheckpointIO`)."""
        if storage_options is not None or not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        self._save_atomically(
            lambda tmp: super(FSDP2Strategy, self).save_checkpoint(checkpoint, tmp), filepath, checkpoint
        )

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Verify the checkpoint (the manifest of a folder, the checksum of a file) on rank 0, then load it."""
        self._verify_on_rank_zero(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only)

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


def shard_if_fsdp2(module: Any) -> None:
    """In a LightningModule's ``configure_model``: shard it with :func:`apply_fsdp2` when the strategy is FSDP2.

    ``ModelParallelStrategy`` gives the module a device mesh before ``configure_model``; under any other strategy
    there is none and nothing happens. ``reshard_after_forward`` comes from :class:`FSDP2Strategy` (default True).
    """
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return
    trainer = getattr(module, "_trainer", None)
    reshard = getattr(trainer.strategy, "reshard_after_forward", True) if trainer is not None else True
    apply_fsdp2(module, data_parallel_mesh(mesh), reshard_after_forward=reshard)


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
