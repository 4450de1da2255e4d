"""Exponential moving averages of parameters (EMA teachers and target encoders).

Used by hard-patch mining (Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023: an EMA copy
of the student scores every token) and by JEPA target encoders (mim/targets/latent.py). One update is

    ema <- m * ema + (1 - m) * online        (for parameters only; buffers are left alone)

done as one fused ``torch._foreach_lerp_`` call over all parameters (``lerp(ema, online, 1 - m)`` is the same
convex combination), after the optimizer step, with no host synchronisation.

Sharded training: the EMA copy is sharded exactly like the student, and the update runs on each rank's local
shards with no gather and no collective (DeepSpeed ZeRO-3 partitions ``p.ds_tensor``, FSDP2 shards
``p.to_local()``, plain tensors otherwise); a 16-bit shard is updated through a float32 master saved with the
checkpoint. How parameters are paired, which ZeRO-3 parameters are also updated in full and when masters are
rebuilt: docs/design.md, "EMA". Nothing here imports DeepSpeed or Lightning: ZeRO-3 parameters are recognised by
their ``ds_tensor`` attribute.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["EMA", "ema_momentum", "local_shards"]


def ema_momentum(progress: float, *, start: float, end: float, ramp: float = 1.0) -> float:
    """Momentum that moves linearly from ``start`` to ``end`` over the first ``ramp`` fraction of training.

    HPM (official code Haochen-Wang409/HPM engine_pretrain.py, which sets it per epoch): ``0.999 -> 0.9999``
    over the first 100 of 800 epochs (``ramp = 0.125``), then constant. I-JEPA-style schedules are ``ramp = 1``.

    Args:
        progress: fraction of training done, in [0, 1].
        start: momentum at progress 0.
        end: momentum from ``progress >= ramp`` on.
        ramp: fraction of training over which the momentum moves; 0 means ``end`` from the start.

    Returns:
        The momentum, a Python float (host side: no device work).
    """
    if ramp <= 0 or progress >= ramp:
        return end
    return start + (end - start) * max(progress, 0.0) / ramp


class EMA(nn.Module):
    """A frozen copy of a module whose parameters track the online module's parameters.

    The copy holds no gradients (``requires_grad=False``), stays in eval mode, is part of the owner's state dict
    (so it is saved with checkpoints and restored on resume) and is never seen by the optimizer.

    Args:
        module: the online module to copy (its current weights become the EMA's initial weights).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self._master: list[Tensor] | None = None  # float32 copies of the 16-bit local shards (docs/design.md, "EMA")
        self._master_layout: list[Any] | None = None

    def get_extra_state(self) -> dict[str, Any]:
        """The float32 masters of 16-bit shards (None without any) and the layout they belong to."""
        return {"fp32_master": self._master, "layout": self._master_layout}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self._master, self._master_layout = state.get("fp32_master"), state.get("layout")

    def train(self, mode: bool = True) -> EMA:
        """The EMA copy always stays in eval mode (no dropout or drop-path in the teacher)."""
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float, *, applied: Tensor | None = None) -> None:
        """``ema = momentum * ema + (1 - momentum) * online`` for every parameter, in one fused call.

        Args:
            online: a module with the same parameter structure as the copy (the student).
            momentum: m in [0, 1]; 1 keeps the EMA unchanged, 0 copies the online weights.
            applied: a () float tensor on the device, 1.0 when the optimizer step was applied, 0.0 when it was skipped
                on the device (:func:`mim.module.guarded_optimizer_step`): the lerp weight becomes
                ``(1 - momentum) * applied``, so a skipped step leaves the EMA unchanged without a host sync (one lerp
                kernel per tensor instead of one fused call: torch has no fused lerp by a tensor weight).
        """
        if not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum!r}")
        sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
        if sharded:  # (FSDP2 needs a process group; without one, skip its import)
            _reshard(self.module)
            _reshard(online)
        ema_params = list(self.module.parameters())
        online_params = list(online.parameters())
        if len(ema_params) != len(online_params):
            raise ValueError(
                f"EMA.update: the online module has {len(online_params)} parameters, the EMA copy {len(ema_params)}; "
                "pass the module the EMA was made from"
            )
        if momentum == 1.0:
            return
        targets, sources = local_shards(ema_params, online_params, sharded=sharded)

        def lerp_(ema: list[Tensor], new: list[Tensor]) -> None:
            if applied is None:
                torch._foreach_lerp_(ema, new, 1.0 - momentum)
            else:
                weight = applied.to(device=ema[0].device, dtype=ema[0].dtype) * (1.0 - momentum)
                torch._foreach_lerp_(ema, new, [weight] * len(ema))

        low = [i for i, t in enumerate(targets) if t.dtype in (torch.bfloat16, torch.float16)]
        if low:  # 16-bit shards: lerp float32 masters, then copy them into the shards
            masters = self._masters([targets[i] for i in low])
            lerp_(masters, [sources[i].float() for i in low])
            torch._foreach_copy_([targets[i] for i in low], masters)
            keep = set(low)
            targets = [t for i, t in enumerate(targets) if i not in keep]
            sources = [t for i, t in enumerate(sources) if i not in keep]
        if targets:
            lerp_(targets, sources)

    def _masters(self, shards: list[Tensor]) -> list[Tensor]:
        """The float32 masters of ``shards``, (re)built from them when missing or made for another layout."""
        import torch.distributed as dist

        # Not the rank: ZeRO-1/2 ranks all restore rank 0's (whole, identical) masters; ZeRO-3 ranks their own file's.
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        layout = [world, *(list(t.shape) for t in shards)]
        master = self._master
        if master is None or self._master_layout != layout:
            master = [t.detach().float().clone() for t in shards]
        elif any(m.device != t.device for m, t in zip(master, shards)):  # restored on the CPU
            master = [m.to(t.device) for m, t in zip(master, shards)]
        self._master, self._master_layout = master, layout
        return master


def _reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit in ``module`` (no communication; a no-op without FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local_shards(
    ema_params: Sequence[Tensor], online_params: Sequence[Tensor], *, sharded: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    """Pair each EMA parameter with its online parameter as the tensors this rank holds (no communication).

    Args:
        ema_params: the EMA copy's parameters.
        online_params: the online module's parameters, in the same order.
        sharded: whether DTensors may occur (False skips importing ``torch.distributed.tensor``, ~3 s, when no
            process group exists).

    Returns:
        ``(targets, sources)``: the EMA tensors to update in place and the online tensors (detached, cast to the
        EMA's dtype) of the same shapes: ZeRO-3 partitions ``ds_tensor`` (plus the full ``data`` of parameters ZeRO-3
        keeps whole), FSDP2 local shards, or the parameters themselves.

    Raises:
        RuntimeError: when a pair is sharded differently (one partitioned and the other not, or different local
            shapes), which means the EMA copy was made after the model was sharded.
    """
    if sharded:
        from torch.distributed.tensor import DTensor
    else:  # no process group: no DTensor parameters
        DTensor = type(None)  # type: ignore[assignment,misc]  # noqa: N806
    targets: list[Tensor] = []
    sources: list[Tensor] = []

    def add(e: Tensor, o: Tensor, what: str) -> None:
        if e.shape != o.shape:
            raise RuntimeError(
                f"EMA.update: {what} shapes differ ({tuple(e.shape)} vs {tuple(o.shape)}); build the EMA copy before "
                "DeepSpeed / FSDP shards the model (in the target's bind, at module construction)"
            )
        targets.append(e)
        sources.append(o.detach() if o.dtype == e.dtype else o.detach().to(e.dtype))

    for i, (e, o) in enumerate(zip(ema_params, online_params)):
        zero_e, zero_o = hasattr(e, "ds_tensor"), hasattr(o, "ds_tensor")
        dt_e, dt_o = isinstance(e, DTensor), isinstance(o, DTensor)
        if zero_e != zero_o or dt_e != dt_o:
            raise RuntimeError(
                f"EMA.update: parameter {i} is sharded in one module and not in the other (ZeRO-3: {zero_e} vs "
                f"{zero_o}, FSDP2: {dt_e} vs {dt_o}); shard the EMA copy together with the student"
            )
        if zero_e:  # DeepSpeed ZeRO-3: the local partition, (numel / world,) padded on the last rank
            add(e.ds_tensor, o.ds_tensor, f"ZeRO-3 partitions of parameter {i}")  # type: ignore[attr-defined]
            if e.data.numel() > 0 and e.data.numel() == e.ds_numel:  # type: ignore[attr-defined]
                # Kept whole (persistent, or gathered): ZeRO-3 refreshes it only at the next step.
                add(e.data, o.data, f"whole ZeRO-3 parameter {i}")
        elif dt_e:  # FSDP2: the local shard of a DTensor (same placements for equal shapes)
            de, do = cast(DTensor, e), cast(DTensor, o)
            if de.placements != do.placements:
                raise RuntimeError(f"EMA.update: parameter {i} has placements {de.placements} vs {do.placements}")
            add(de.to_local(), do.to_local(), f"FSDP2 local shards of parameter {i}")
        else:
            add(e, o, f"parameter {i}")
    return targets, sources
