"""Helpers for tests/test_distributed.py that run inside the `mim fit` subprocesses (importable by class_path).

* :class:`RandomImageData`: seeded random images, so the 2-process runs need no dataset.
* :class:`EMAProbe`: wraps every :class:`mim.ema.EMA` ``update`` of the module and records, per rank, whether the
  update ran on local shards (ZeRO-3 partitions / FSDP2 local shards), whether it issued any collective
  communication (from the profiler's ``record_param_comms`` events, checked against a deliberate all-reduce), and
  the largest deviation of the updated shards from ``m * ema + (1 - m) * online``. Written as JSON to
  ``<out>/probe_rank<r>.json`` at the end of training.
* :class:`StateProbe`: the full parameters and optimizer state right after a resume (FSDP2 at another world size).
* :func:`write_teacher`: a tiny random timm ViT saved as a frozen-teacher weights file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from mim.ema import EMA, local_shards

__all__ = ["EMAProbe", "RandomImageData", "StateProbe", "write_teacher"]


class _Images(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i]}


class RandomImageData(L.LightningDataModule):
    """``num_samples`` seeded normal images (C, H, W) as ``{"image": float32}`` batches.

    Args:
        num_samples: dataset size.
        batch_size: per-process batch size.
        img_size: H = W.
        in_chans: C.
        seed: data seed.
    """

    def __init__(
        self, *, num_samples: int = 32, batch_size: int = 4, img_size: int = 16, in_chans: int = 3, seed: int = 0
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(num_samples, in_chans, img_size, img_size, generator=gen)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Images(self.images), batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Images(self.images[: 2 * self.batch_size]), batch_size=self.batch_size)


class _LabelledImages(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


class RandomLabelledImageData(RandomImageData):
    """``RandomImageData`` with ``num_classes`` seeded labels, image size and channels exposed (fine-tuning)."""

    def __init__(self, *, num_classes: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.image_size, self.in_chans = num_classes, self.images.shape[-1], self.images.shape[1]
        self.labels = torch.randint(0, num_classes, (self.images.shape[0],), generator=torch.Generator().manual_seed(1))

    def train_dataloader(self) -> DataLoader:
        data = _LabelledImages(self.images, self.labels)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        n = 2 * self.batch_size
        return DataLoader(_LabelledImages(self.images[:n], self.labels[:n]), batch_size=self.batch_size)


def _comm_events(fn) -> int:
    """Run ``fn`` under the profiler; the number of collective-communication events it recorded."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return sum(1 for n in names if n == "record_param_comms" or n.startswith(("gloo:", "c10d::", "nccl:")))


class EMAProbe(Callback):
    """Check every EMA update of the run on this rank's shards (see the module docstring).

    Args:
        out: folder for ``probe_rank<r>.json``.
    """

    def __init__(self, *, out: str) -> None:
        self.out = out
        self.records: list[dict[str, Any]] = []
        self.control = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if dist.is_available() and dist.is_initialized():
            self.control = _comm_events(lambda: dist.all_reduce(torch.zeros(1)))
        for name, module in pl_module.named_modules():
            if isinstance(module, EMA):
                self._wrap(name, module)

    def _wrap(self, name: str, ema: EMA) -> None:
        original = ema.update

        def update(online: torch.nn.Module, momentum: float, *, applied: torch.Tensor | None = None) -> None:
            ema_params, online_params = list(ema.module.parameters()), list(online.parameters())
            kinds = {
                "zero3": sum(hasattr(p, "ds_tensor") for p in ema_params),
                "dtensor": sum(type(p).__name__ == "DTensor" for p in ema_params),
                "whole_zero3": sum(
                    hasattr(p, "ds_tensor") and p.data.numel() == p.ds_numel and p.data.numel() > 0 for p in ema_params
                ),
            }
            with torch.no_grad():
                targets, sources = local_shards(ema_params, online_params)
                before = [t.detach().clone() for t in targets]
                sources = [s.detach().clone() for s in sources]
            comms = _comm_events(lambda: original(online, momentum, applied=applied))
            weight = (1 - momentum) * (1.0 if applied is None else float(applied))  # applied: skipped on the device?
            with torch.no_grad():
                after, _ = local_shards(list(ema.module.parameters()), list(online.parameters()))
                err = max(
                    (
                        (a - ((1 - weight) * b + weight * s)).abs().max().item()
                        for a, b, s in zip(after, before, sources)
                        if a.numel()
                    ),
                    default=0.0,
                )
                moved = max(((a - b).abs().max().item() for a, b in zip(after, before) if a.numel()), default=0.0)
                local = sum(t.numel() for t in after)
                full = sum(p.ds_numel if hasattr(p, "ds_tensor") else p.numel() for p in ema.module.parameters())
            self.records.append(
                {
                    "ema": name,
                    "momentum": momentum,
                    "comm_events": comms,
                    "max_formula_error": err,
                    "max_change": moved,
                    "local_numel": local,
                    "full_numel": full,
                    **kinds,
                }
            )

        ema.update = update  # type: ignore[method-assign]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        path = Path(self.out) / f"probe_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"control_comm_events": self.control, "updates": self.records}, indent=1))


class StateProbe(Callback):
    """Save the full (gathered) parameters and optimizer state at the start of training, after any resume.

    Written by rank 0 to ``<out>/start_state.pt`` as ``{"params": {name: fp32}, "optimizer": {name: {key: fp32}},
    "global_step": int}`` (optimizer state keyed by parameter name, from ``get_optimizer_state_dict``). For FSDP2.

    Args:
        out: output folder.
    """

    def __init__(self, *, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        params = get_model_state_dict(pl_module, options=options)
        optim = get_optimizer_state_dict(pl_module, trainer.optimizers[0], options=options)
        if trainer.global_rank == 0:
            Path(self.out).mkdir(parents=True, exist_ok=True)
            state = {k: {n: t for n, t in v.items() if isinstance(t, torch.Tensor)} for k, v in optim["state"].items()}
            torch.save(
                {"params": params, "optimizer": state, "global_step": trainer.global_step},
                Path(self.out) / "start_state.pt",
            )


def write_teacher(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Save a tiny random timm ViT's state dict (a stand-in frozen teacher) to ``path``."""
    import timm

    torch.manual_seed(123)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
    torch.save(model.state_dict(), path)
    return Path(path)
