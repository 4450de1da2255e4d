"""FinetuneModule: full fine-tuning of a pretrained encoder with a linear classifier (``mim finetune``).

MAE's fine-tuning recipe (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Appendix A.2;
facebookresearch/mae main_finetune.py, models_vit.py, util/lr_decay.py) is the reference: global average pooling of
the patch tokens normalised by a new ``fc_norm`` (the pretrained final norm is dropped) or the cls token after the
final norm; a linear head initialised with a truncated normal of std 2e-5; the position table trained; drop path;
AdamW with layer-wise lr decay and no decay on 1-D parameters and special tokens; lr = blr x effective batch / 256 with
per-step warmup and cosine; Mixup / CutMix with label smoothing and random erasing on the device (:mod:`mim.augment`);
RandAugment in the datamodule (``rand_augment``); optionally an EMA of the weights. Validation logs top-1 / top-5.
The encoder comes from any checkpoint mim reads (:func:`mim.load.load_encoder`) or is given in the recipe.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Literal, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from mim.augment import MixupCutmix, random_erase
from mim.checkpoint import CheckpointError, read_checkpoint
from mim.checks import DataMismatchError, check_choice, check_encoder_data, check_int, check_range
from mim.ema import EMA
from mim.load import build_encoder, encoder_state, load_encoder_weights
from mim.models.base import Encoder
from mim.models.decoder import set_activation_checkpointing
from mim.module import (
    built_by_lightning_cli,
    fused_adamw,
    guarded_optimizer_step,
    refuse_cli_optimizer,
    reseed_global_rng,
)
from mim.optim import NonFiniteGuard, NonFiniteMode, clip_warmup, layer_decay_groups, scaled_lr, warmup_cosine
from mim.types import Batch, step_seed

__all__ = ["FinetuneModule", "check_data", "topk_correct"]


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, Tensor]:
    """Number of samples whose label is among the k highest logits, for each k (k is capped at the class count).

    Args:
        logits: (B, K).
        labels: (B,) int64.

    Returns:
        k -> scalar count (float32), on the logits' device.
    """
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
    hit = top == labels.unsqueeze(1)  # (B, kmax)
    return {k: hit[:, : min(k, logits.shape[1])].any(dim=1).float().sum() for k in ks}


class FinetuneModule(L.LightningModule):
    """An encoder plus a linear classifier, fine-tuned end to end with MAE's recipe.

    Args:
        checkpoint: pretrained weights: a ``mim fit`` checkpoint (``.ckpt``, DeepSpeed or FSDP2 folder), a
            ``mim export`` file, or ``timm:NAME`` (a pretrained timm ViT: a registry name such as
            ``timm:vit_base_patch16_224.mae``, which timm downloads unless cached, or ``timm:local-dir:FOLDER``); None
            trains from random init (a baseline). Without ``encoder`` the encoder is rebuilt from the config the
            checkpoint records.
        encoder: the encoder; None: rebuilt from ``checkpoint``. Given with ``checkpoint``, the checkpoint's weights
            are loaded into it (its architecture must match; another image size keeps the fixed sin-cos table).
        which_encoder: which encoder of the checkpoint: ``student``, ``target`` (a JEPA target encoder, what I-JEPA
            evaluates) or a state-dict prefix.
        img_size: with an encoder rebuilt from ``checkpoint``: fine-tune at this image size instead of the recorded
            one (the sin-cos position table is computed for the new grid).
        drop_path_rate: stochastic depth of an encoder rebuilt from ``checkpoint`` (MAE ViT-B: 0.1, ViT-L: 0.2).
        num_classes: classes; None: the datamodule's ``num_classes``.
        global_pool: ``avg`` (mean of the patch tokens, then ``fc_norm``; MAE's default) or ``cls``.
        train_pos_embed: train the position table (MAE fine-tuning does; it starts from the sin-cos values).
        head_init_std: std of the head's truncated-normal init (MAE: 2e-5).
        blr: base lr; lr = blr x effective batch / 256 (MAE ViT-B: 5e-4, ViT-L: 1e-3).
        lr: absolute lr, overriding ``blr``.
        layer_decay: layer-wise lr decay (MAE ViT-B: 0.65, ViT-L: 0.75; 1 disables it).
        weight_decay: AdamW weight decay (MAE: 0.05).
        betas: AdamW betas (MAE fine-tuning: PyTorch's default (0.9, 0.999)).
        warmup_epochs: linear warmup in epochs (MAE: 5); ``warmup_steps`` overrides it.
        warmup_steps: linear warmup in optimizer steps.
        min_lr: final lr of the cosine (MAE: 1e-6).
        label_smoothing: label smoothing (MAE: 0.1).
        mixup: Mixup alpha (MAE: 0.8; 0 disables it). Images and clips only.
        cutmix: CutMix alpha (MAE: 1.0; 0 disables it). Images and clips only.
        mixup_prob: probability that a batch is mixed.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        random_erasing: random-erasing probability per image (MAE: 0.25). Images only.
        ema_decay: keep an EMA of the weights with this decay (e.g. 0.9999) and validate it too; None: no EMA.
        batch_size: per-device batch for the lr scaling; default: the datamodule's ``batch_size``.
        seed: seeds the per-step augmentation draws (Mixup, CutMix, erasing) and reseeds torch's global generators at
            every training batch (drop path replays on resume).
        nonfinite: an optimizer step with a non-finite loss or gradient: ``skip`` (counted in
            ``train/nonfinite_steps``, warned once, ``max_nonfinite_steps`` in a row stop the run), ``raise`` or
            ``off``; as ``PretrainModule.nonfinite`` (on the device with the fused optimizer, else one host sync
            per optimizer step; DeepSpeed keeps its own handling).
        max_nonfinite_steps: consecutive non-finite optimizer steps that stop a ``skip`` run.
        fused_optimizer: AdamW's fused implementation, as ``PretrainModule.fused_optimizer``.
        activation_checkpointing: recompute the encoder blocks' activations in the backward pass, as
            ``PretrainModule.activation_checkpointing``.

    A warmup that does not end before the run does is clipped to the run (with a warning); LightningCLI's
    ``--optimizer`` / ``--lr_scheduler`` are refused (use the arguments above).
    """

    def __init__(
        self,
        *,
        checkpoint: str | None = None,
        encoder: Encoder | None = None,
        which_encoder: str = "student",
        img_size: int | None = None,
        drop_path_rate: float = 0.1,
        num_classes: int | None = None,
        global_pool: Literal["avg", "cls"] = "avg",
        train_pos_embed: bool = True,
        head_init_std: float = 2e-5,
        blr: float = 1e-3,
        lr: float | None = None,
        layer_decay: float = 0.75,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        warmup_steps: int | None = None,
        min_lr: float = 1e-6,
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        random_erasing: float = 0.25,
        ema_decay: float | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        nonfinite: NonFiniteMode = "skip",
        max_nonfinite_steps: int = 5,
        fused_optimizer: bool = True,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        owner = "FinetuneModule"
        if checkpoint is None and encoder is None:
            raise ValueError(
                "FinetuneModule needs a checkpoint (pretrained weights) or an encoder (to train from random init)"
            )
        check_range(owner, "drop_path_rate", drop_path_rate, 0, 1, high_open=True)
        check_choice(owner, "global_pool", global_pool, ("avg", "cls"))
        check_range(owner, "head_init_std", head_init_std, 0, math.inf, low_open=True)
        check_range(owner, "blr", blr, 0, math.inf, low_open=True)
        if lr is not None:
            check_range(owner, "lr", lr, 0, math.inf, low_open=True)
        check_range(owner, "layer_decay", layer_decay, 0, 1, low_open=True)
        check_range(owner, "weight_decay", weight_decay, 0, math.inf)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"FinetuneModule.betas must be two numbers in [0, 1), got {betas}")
        check_range(owner, "warmup_epochs", warmup_epochs, 0, math.inf)
        if warmup_steps is not None:
            check_int(owner, "warmup_steps", warmup_steps, minimum=0)
        check_range(owner, "min_lr", min_lr, 0, math.inf)
        check_range(owner, "random_erasing", random_erasing, 0, 1)
        if ema_decay is not None:
            check_range(owner, "ema_decay", ema_decay, 0, 1, high_open=True)
        if batch_size is not None:
            check_int(owner, "batch_size", batch_size)
        if num_classes is not None:
            check_int(owner, "num_classes", num_classes, minimum=2)
        self.guard = NonFiniteGuard(owner, mode=nonfinite, max_consecutive=max_nonfinite_steps)
        self.save_hyperparameters(ignore=["encoder"] if not built_by_lightning_cli() else [])
        self.encoder = self._build_encoder(checkpoint, encoder, which_encoder, img_size, drop_path_rate)
        pos_embed = getattr(self.encoder, "pos_embed", None)
        if isinstance(pos_embed, nn.Parameter):  # MAE trains the table, starting from the sin-cos values
            pos_embed.requires_grad_(train_pos_embed)
        self.fc_norm: nn.Module = nn.Identity()
        if global_pool == "avg":
            norm = self.encoder.drop_final_norm()  # MAE: the pretrained norm is deleted, a new fc_norm follows the pool
            self.fc_norm = nn.LayerNorm(self.encoder.embed_dim, eps=getattr(norm, "eps", 1e-6))
        elif not self.encoder.has_class_token:
            raise ValueError("FinetuneModule.global_pool 'cls' needs an encoder with a class token; use 'avg'")
        self.head: nn.Linear | None = None
        self.ema: EMA | None = None
        self.mixer: MixupCutmix | None = None
        self._mix_kwargs = dict(
            mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=mixup_switch_prob,
            label_smoothing=label_smoothing,
        )  # fmt: skip
        MixupCutmix(num_classes=2, **self._mix_kwargs)  # validate now, not at the first step
        if num_classes is not None:
            self._build_head(num_classes)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _build_encoder(
        checkpoint: str | None, encoder: Encoder | None, which: str, img_size: int | None, drop_path_rate: float
    ) -> Encoder:
        if checkpoint is None:
            assert encoder is not None
            return encoder
        if checkpoint.startswith("timm:"):
            return _timm_encoder(checkpoint.removeprefix("timm:"), encoder, img_size, drop_path_rate)
        ckpt = read_checkpoint(checkpoint)
        config = ckpt["mim"].get("encoder")
        if not isinstance(config, dict):
            raise CheckpointError(f"{checkpoint}: the checkpoint records no encoder config")
        if encoder is None:
            overrides: dict[str, Any] = {}
            if config.get("class", "MaskedEncoder") == "MaskedEncoder":
                overrides["drop_path_rate"] = drop_path_rate
                if img_size is not None:
                    overrides["img_size"] = img_size
            encoder = build_encoder(config, **overrides)
        elif encoder.modality != _modality(config):
            raise CheckpointError(
                f"{checkpoint}: a {_modality(config)} encoder's checkpoint cannot initialise the recipe's "
                f"{encoder.modality} encoder"
            )
        elif not encoder.is_configured:  # a table encoder: the schema the checkpoint was trained on
            encoder.configure_data(SimpleNamespace(**{k: config[k] for k in ("num_numeric", "category_cardinalities")}))
        prefix, state = encoder_state(ckpt, which)
        load_encoder_weights(encoder, state, source=str(checkpoint))
        rank_zero_info(f"mim: fine-tuning the {which} encoder ({prefix.rstrip('.')}) of {checkpoint}")
        return encoder

    def _build_head(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=self.hparams.head_init_std)  # type: ignore[attr-defined]
        nn.init.zeros_(self.head.bias)
        hp: Any = self.hparams
        if hp.ema_decay is not None:
            self.ema = EMA(nn.ModuleDict({"encoder": self.encoder, "fc_norm": self.fc_norm, "head": self.head}))
        if self.encoder.modality in ("image", "video"):
            mixer = MixupCutmix(num_classes=num_classes, **self._mix_kwargs)
            self.mixer = mixer if mixer.enabled else None

    def configure_model(self) -> None:
        """Lightning hook: :meth:`configure_data` with the trainer's datamodule, before optimizers and wrappers.

        Under FSDP2 (``ModelParallelStrategy``, which sets a device mesh) the module is then sharded in place, the
        weight EMA included (:func:`mim.distributed.apply_fsdp2`), as ``PretrainModule`` is.
        """
        self.configure_data(self._trainer.datamodule if self._trainer is not None else None)  # type: ignore[attr-defined]
        if self.hparams.activation_checkpointing:  # type: ignore[attr-defined]
            set_activation_checkpointing(self, True)
        from mim.distributed import shard_if_fsdp2

        shard_if_fsdp2(self)

    def configure_data(self, data: Any) -> None:
        """Check the datamodule's inputs against the encoder, then take the class count (and a table's schema) from it."""
        check_data(self.encoder, data, self.num_classes if self.head is not None else None)
        if not self.encoder.is_configured:
            self.encoder.configure_data(data)  # a table encoder trained from scratch takes the table's schema
        if self.head is None:
            self._build_head(int(data.num_classes))  # type: ignore[union-attr]

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: Tensor) -> Tensor:
        """(encoder input) -> (B, num_classes) logits."""
        return self._logits(self.encoder, self.fc_norm, self._head(), inputs)

    def _head(self) -> nn.Linear:
        if self.head is None:
            raise RuntimeError("FinetuneModule has no head yet: set num_classes or fit with a labelled datamodule")
        return self.head

    def _logits(self, encoder: Encoder, fc_norm: nn.Module, head: nn.Module, inputs: Tensor) -> Tensor:
        latent = encoder(inputs)  # (B, prefix + N, D)
        features = fc_norm(encoder.pool(latent, self.hparams.global_pool))  # type: ignore[attr-defined]  # (B, D)
        return head(features)  # (B, K)

    def setup(self, stage: str) -> None:
        """Lightning hook: refuse LightningCLI's ``--optimizer`` / ``--lr_scheduler`` before anything runs."""
        if stage == "fit":
            refuse_cli_optimizer(self, _OPTIMIZER_ARGUMENTS)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed torch's global generators from (seed, step, rank, micro-batch): drop path replays on resume."""
        reseed_global_rng(self, self.hparams.seed, batch_idx)  # type: ignore[attr-defined]

    def _rng(self, *parts: int) -> random.Random:
        return random.Random(step_seed(self.hparams.seed, *parts))  # type: ignore[attr-defined]

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        hp: Any = self.hparams
        inputs, labels = self.encoder.inputs(batch), _labels(batch)
        rng = self._rng(self.trainer.global_step, self.global_rank, batch_idx % self.trainer.accumulate_grad_batches)
        if hp.random_erasing > 0 and self.encoder.modality == "image":
            inputs = random_erase(inputs, rng, prob=hp.random_erasing)
        if self.mixer is not None and inputs.shape[0] > 1:
            inputs, target = self.mixer(inputs, labels, rng)  # (B, K) soft targets
            logits = self(inputs).float()
            loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            logits = self(inputs).float()
            loss = F.cross_entropy(logits, labels, label_smoothing=hp.label_smoothing)
        self.guard.observe_loss(loss)  # a device op: the optimizer step reads it
        self.log("train/loss", loss.detach(), batch_size=labels.shape[0])  # shown by RunProgressBar, no per-step sync
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"], batch_size=labels.shape[0])
        return loss

    def _evaluate(self, batch: Batch, stage: str) -> None:
        inputs, labels = self.encoder.inputs(batch), _labels(batch)
        bs = labels.shape[0]
        runs: list[tuple[str, Any, nn.Module, nn.Module]] = [("", self.encoder, self.fc_norm, self._head())]
        if self.ema is not None:
            parts = cast(nn.ModuleDict, self.ema.module)
            runs.append(("ema_", parts["encoder"], parts["fc_norm"], parts["head"]))
        for tag, encoder, fc_norm, head in runs:
            logits = self._logits(encoder, fc_norm, head, inputs).float()  # (B, K)
            hits = topk_correct(logits, labels)
            values = {
                f"{stage}/{tag}loss": F.cross_entropy(logits, labels),
                f"{stage}/{tag}top1": hits[1] / bs,
                f"{stage}/{tag}top5": hits[5] / bs,
            }
            self.log_dict(values, prog_bar=not tag, sync_dist=True, batch_size=bs)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """``{"probs": (B, K), "pred": (B,)}`` (and ``label`` when the batch has one)."""
        probs = self(self.encoder.inputs(batch)).float().softmax(dim=-1)
        out = {"probs": probs, "pred": probs.argmax(dim=-1)}
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Callable[[], Any] | None = None
    ) -> None:
        """The optimizer step (skipped when its loss or gradients are not finite), then the weight EMA."""
        applied = guarded_optimizer_step(self, self.guard, optimizer, optimizer_closure)
        if self.ema is not None and (isinstance(applied, Tensor) or applied):
            parts = nn.ModuleDict({"encoder": self.encoder, "fc_norm": self.fc_norm, "head": self._head()})
            gate = applied if isinstance(applied, Tensor) else None  # decided on the device: the EMA skips there too
            self.ema.update(parts, self.hparams.ema_decay, applied=gate)  # type: ignore[attr-defined]

    def on_train_end(self) -> None:
        """Read the last step's non-finite count (counted on the device, a step late)."""
        self.guard.flush(rank_zero_warn)

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        per_device = hp.batch_size or getattr(self.trainer.datamodule, "batch_size", None)  # type: ignore[attr-defined]
        if per_device is None:
            raise ValueError("FinetuneModule.batch_size is not set and the datamodule has no batch_size")
        accum, world = self.trainer.accumulate_grad_batches, self.trainer.world_size
        eff = per_device * accum * world
        lr = hp.lr if hp.lr is not None else scaled_lr(hp.blr, eff)
        if self.trainer.estimated_stepping_batches == float("inf"):
            raise ValueError(
                "FinetuneModule: set trainer.max_epochs or trainer.max_steps (the lr schedule needs an end)"
            )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.warmup_steps is not None:
            warmup = hp.warmup_steps
        else:
            if self.trainer.train_dataloader is None:
                self.trainer.fit_loop.setup_data()
            batches = self.trainer.num_training_batches
            per_epoch = math.ceil(batches / accum) if 0 < batches < float("inf") else total
            warmup = round(hp.warmup_epochs * per_epoch)
        source = (
            f"warmup_steps={hp.warmup_steps}"
            if hp.warmup_steps is not None
            else f"warmup_epochs={hp.warmup_epochs:g} x {per_epoch:g} steps per epoch"
        )
        warmup, warning = clip_warmup("FinetuneModule", warmup, total, source=source)
        if warning:
            rank_zero_warn(warning)
        rank_zero_info(
            f"mim: fine-tuning, effective batch = {per_device} x {accum} x {world} = {eff}; "
            f"lr = {'' if hp.lr is not None else f'blr {hp.blr:g} x {eff}/256 = '}{lr:.4g}; layer decay "
            f"{hp.layer_decay}; {total} optimizer steps, {warmup} warmup"
        )
        encoder_names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        depth = self.encoder.depth

        def layer_of(name: str) -> int:
            return self.encoder.layer_id(name.removeprefix("encoder.")) if name.startswith("encoder.") else depth + 1

        groups = layer_decay_groups(
            ((n, p) for n, p in self.named_parameters() if not n.startswith("ema.")),  # the EMA copy is not optimized
            weight_decay=hp.weight_decay,
            layer_decay=hp.layer_decay,
            num_layers=depth + 1,
            layer_of=layer_of,
            no_weight_decay=encoder_names,
        )
        for group in groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas), fused=fused_adamw(self, hp.fused_optimizer))

        def factor(step: int) -> float:
            return warmup_cosine(step, warmup_steps=warmup, total_steps=total, base_lr=1.0, min_lr=hp.min_lr / lr)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mim"] = {
            "encoder": self.encoder.config,
            "format": 1,
            "kind": "finetune",
            "num_classes": self.num_classes if self.head is not None else None,
            "nonfinite_steps": self.guard.state_dict(),
        }
        data_config = getattr(getattr(self._trainer, "datamodule", None), "data_config", None)
        if callable(data_config):  # input size, mean, std ...: what `mim export` writes for timm
            checkpoint["mim"]["data"] = data_config()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the non-finite step counters (a resumed run keeps counting)."""
        self.guard.load_state_dict(checkpoint.get("mim", {}).get("nonfinite_steps", {}))


_OPTIMIZER_ARGUMENTS = (
    "model.init_args.lr or blr (lr = blr x effective batch / 256), layer_decay, betas, weight_decay, warmup_epochs "
    "or warmup_steps, min_lr"
)


def _timm_encoder(name: str, encoder: Encoder | None, img_size: int | None, drop_path_rate: float) -> Encoder:
    """A MaskedEncoder with the weights of a pretrained timm ViT: a registry name (``vit_base_patch16_224.mae``,
    downloaded by timm unless cached) or ``local-dir:FOLDER`` (a hub-layout folder, e.g. a ``mim export``)."""
    import json
    from pathlib import Path

    import timm

    from mim.models.encoder import MaskedEncoder, check_timm_name

    check_timm_name("FinetuneModule", "checkpoint", name, pretrained=True)  # close matches for a misspelt name
    kwargs: dict[str, Any] = {"img_size": img_size} if img_size is not None else {}
    try:  # timm resamples a learned position table to img_size on load
        model: Any = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm raises many types (no network, unknown name, bad folder)
        raise CheckpointError(f"timm:{name}: timm could not load it ({type(e).__name__}: {str(e)[:200]})") from None
    model_args: dict[str, Any] = {}
    if name.startswith("local-dir:"):
        config = Path(name.removeprefix("local-dir:")) / "config.json"
        model_args = dict(json.loads(config.read_text()).get("model_args", {})) if config.is_file() else {}
    for key in ("img_size", "patch_size", "in_chans", "num_classes", "drop_path_rate"):
        model_args.pop(key, None)
    if encoder is None:
        arch = model.pretrained_cfg.get("architecture") or name.split(".")[0]
        encoder = MaskedEncoder(
            arch=arch,
            img_size=tuple(model.patch_embed.img_size),
            patch_size=tuple(model.patch_embed.patch_size),
            in_chans=model.patch_embed.proj.in_channels,
            drop_path_rate=drop_path_rate,
            init="timm",
            model_kwargs=model_args,
        )
    load_encoder_weights(encoder, {f"vit.{k}": v for k, v in model.state_dict().items()}, source=f"timm:{name}")
    rank_zero_info(f"mim: fine-tuning the timm model {name}")
    return encoder


def _labels(batch: Batch) -> Tensor:
    labels = batch.get("label")  # type: ignore[union-attr]
    if labels is None:
        raise ValueError(f"FinetuneModule needs labelled batches (a 'label' entry); the batch has {sorted(batch)}")
    return labels


def _modality(config: dict[str, Any]) -> str:
    if config.get("class") == "MaskedTableEncoder":
        return "table"
    return "video" if int(config.get("num_frames", 1)) > 1 else "image"


def check_data(encoder: Encoder, datamodule: Any, num_classes: int | None) -> None:
    """Refuse a datamodule the encoder cannot read, before training, naming both values.

    Args:
        encoder: the encoder.
        datamodule: the trainer's datamodule (None: nothing to check).
        num_classes: the head's class count, if already set.

    Raises:
        DataMismatchError: no or too few labels, another class count, or inputs the encoder cannot read
            (:func:`mim.checks.check_encoder_data`).
    """
    if datamodule is None:
        if num_classes is None:
            raise DataMismatchError("FinetuneModule.num_classes is not set and there is no datamodule to take it from")
        return
    classes = getattr(datamodule, "num_classes", None)
    if classes is None:
        raise DataMismatchError(
            f"{type(datamodule).__name__} has no labels (num_classes is None): fine-tuning needs a labelled dataset "
            "(for a table, set label_column)"
        )
    if int(classes) < 2:
        raise DataMismatchError(
            f"{type(datamodule).__name__} has {classes} class: fine-tuning a classifier needs at least 2 (a folder "
            "needs one subfolder per class, a list file a label per line)"
        )
    if num_classes is not None and int(classes) != num_classes:
        raise DataMismatchError(
            f"FinetuneModule.num_classes is {num_classes} but {type(datamodule).__name__} has {classes}"
        )
    # channels, image size, frames or table schema (an encoder rebuilt from a checkpoint takes model.init_args.img_size,
    # for which the sin-cos position table is recomputed)
    check_encoder_data(encoder, datamodule, img_size_field="model.init_args.img_size")
