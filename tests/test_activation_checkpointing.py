"""Activation checkpointing (issue 13, memory): the same loss and gradients, fewer saved activations.

``PretrainModule(activation_checkpointing=True)`` / ``FinetuneModule(...)`` switch every block stack (the encoder's
timm blocks, MAE's decoder, the JEPA predictor, HPM's loss predictor) to recompute its activations in the backward
pass. Saved activations are counted deterministically with ``torch.autograd.graph.saved_tensors_hooks`` (bytes of
the tensors autograd keeps outside checkpointed regions, parameters excluded).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mim.finetune import FinetuneModule
from mim.masking import HardPatchMasking, MultiBlockMasking, RandomMasking
from mim.models.decoder import BlockStack, set_activation_checkpointing
from mim.module import PretrainModule
from mim.targets import LatentTarget, PixelTarget
from mim.targets.hard_patch import HardPatchTarget
from tests.factories import TINY_VIT, cpu_trainer, tiny_encoder, tiny_table_encoder

DEEP = {**TINY_VIT, "depth": 4}


def _mae() -> PretrainModule:
    target = PixelTarget(decoder_dim=32, decoder_depth=4, decoder_num_heads=2)
    encoder = tiny_encoder(model_kwargs=DEEP, drop_path_rate=0.2)  # drop path: the recomputation replays its draws
    return PretrainModule(encoder=encoder, masking=RandomMasking(mask_ratio=0.75), targets=[target], batch_size=4)


def _ijepa() -> PretrainModule:
    encoder = tiny_encoder(img_size=32, model_kwargs={**DEEP, "class_token": False, "global_pool": "avg"})
    target = LatentTarget(predictor_dim=32, predictor_depth=4, monitor_every=1000)
    masking = MultiBlockMasking(num_targets=2)
    return PretrainModule(encoder=encoder, masking=masking, targets=[target], batch_size=4)


def _hpm() -> PretrainModule:
    target = HardPatchTarget(decoder_dim=32, decoder_depth=4, decoder_num_heads=2, ema_ramp=0.5)
    return PretrainModule(encoder=tiny_encoder(model_kwargs=DEEP), masking=HardPatchMasking(), targets=[target])


def _step(module: PretrainModule, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """One forward and backward pass on fixed data and masks: (loss, gradients, saved activation bytes)."""
    params = {p.data_ptr() for p in module.parameters()}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if t.data_ptr() not in params:
            saved += t.numel() * t.element_size()
        return t

    batch = {"image": torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))}
    module.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # drop path draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        masks = module.draw_masks(batch, torch.Generator().manual_seed(2))
        loss = module.compute_losses(batch, masks)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved


@pytest.mark.parametrize(("build", "size"), [(_mae, 16), (_ijepa, 32), (_hpm, 16)], ids=["mae", "ijepa", "hpm"])
def test_same_loss_and_gradients_with_fewer_saved_activations(build: Callable[[], PretrainModule], size: int) -> None:
    module = build()
    module.train()
    loss, grads, saved = _step(module, size)
    switched = set_activation_checkpointing(module, True)
    assert switched >= 2  # the encoder and at least one decoder / predictor stack (EMA copies are switched too)
    loss_ckpt, grads_ckpt, saved_ckpt = _step(module, size)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert saved_ckpt < 0.5 * saved, (saved_ckpt, saved)
    set_activation_checkpointing(module, False)
    assert _step(module, size)[2] == saved


def test_every_block_stack_is_switched() -> None:
    module = _hpm()
    set_activation_checkpointing(module, True)
    stacks = [m for m in module.modules() if isinstance(m, BlockStack)]
    assert len(stacks) >= 2 and all(m.grad_checkpointing for m in stacks)
    assert module.encoder.vit.grad_checkpointing


def test_table_encoder_checkpoints_its_blocks() -> None:
    encoder = tiny_table_encoder(model_kwargs={**TINY_VIT, "depth": 3})
    tokens = torch.randn(4, 6, encoder.embed_dim, requires_grad=True)
    plain = encoder.encode_tokens(tokens)
    set_activation_checkpointing(encoder, True)
    checkpointed = encoder.encode_tokens(tokens)
    assert torch.equal(plain, checkpointed)
    assert checkpointed.grad_fn is not None


class Images(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)),
            "label": torch.tensor(i % 2),
        }


def _losses(module: L.LightningModule, **trainer_kwargs: Any) -> list[float]:
    losses: list[float] = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, idx) -> None:
            losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    trainer = cpu_trainer(max_steps=2, callbacks=[Recorder()], **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(Images(), batch_size=4))
    return losses


def test_the_module_switch_trains_identically() -> None:
    """Through Lightning (configure_model switches the stacks): the same losses over two optimizer steps."""
    plain = _losses(_mae())
    module = _mae()
    module.hparams.activation_checkpointing = True  # what the recipe's model.init_args.activation_checkpointing sets
    assert _losses(module) == plain
    assert module.encoder.vit.grad_checkpointing and module.target_list[0].decoder.decoder_blocks.grad_checkpointing


def test_finetune_switch() -> None:
    module = FinetuneModule(encoder=tiny_encoder(), num_classes=2, activation_checkpointing=True, warmup_steps=0)
    module.configure_model()
    assert module.encoder.vit.grad_checkpointing
