"""``PretrainModule(compile=True)``: the step's model work through ``torch.compile`` (inductor, on the CPU here).

The compiled losses keep their autograd graph and give the eager gradients: a regression test for a torch 2.14
behaviour found while preparing issue 13's compiled rows: an output that inductor reduces to the same value as another,
detached output (``0 + 1.0 * loss`` next to ``loss.detach()``) came back without a ``grad_fn``, so the backward pass
did nothing and a compiled step "trained" at no cost.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from mim.masking import RandomMasking
from mim.module import PretrainModule
from mim.targets import PixelTarget
from tests.factories import cpu_trainer, tiny_encoder
from tests.test_host_syncs import Images


def _mae(**kwargs) -> PretrainModule:
    target = PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    encoder = tiny_encoder()
    return PretrainModule(encoder=encoder, masking=RandomMasking(mask_ratio=0.75), targets=[target], **kwargs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_losses_keep_their_gradients() -> None:
    module = _mae()
    batch = {"image": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    masks = module.draw_masks(batch, torch.Generator().manual_seed(1))
    eager = module.compute_losses(batch, masks)
    eager["loss"].backward()
    expected = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(module.compute_losses)(batch, masks)
    assert compiled["loss"].grad_fn is not None
    torch.testing.assert_close(compiled["loss"], eager["loss"])
    torch.testing.assert_close(compiled["pixel/loss"], eager["pixel/loss"])
    compiled["loss"].backward()
    got = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_compile_switch_trains_as_eager() -> None:
    """Two optimizer steps through Lightning: the compiled module's losses and weights follow the eager module's."""
    runs = {}
    for compiled in (False, True):
        module = _mae(compile=compiled, lr=1e-3, warmup_steps=0, batch_size=4)
        trainer = cpu_trainer(max_steps=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, DataLoader(Images(8, 16), batch_size=4))
        runs[compiled] = module
    assert runs[True]._compiled_losses is not None and runs[False]._compiled_losses is None
    for (name, a), b in zip(runs[False].named_parameters(), runs[True].parameters()):
        if name.endswith("qkv.bias"):  # the key bias has a zero gradient (softmax ignores a constant per query):
            d = a.shape[0] // 3  # Adam turns its rounding noise into full-size steps of either sign; skip it
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(runs[True].encoder.vit.cls_token, _mae().encoder.vit.cls_token)  # it did train


def test_compiled_losses_over_several_mask_sets() -> None:
    """V-JEPA's two masks per step (MultiMasking + LatentTarget's shared target pass) compile to the eager losses and
    gradients, and the target pass kept between the sets is released."""
    from tests.test_masking_multi import _clips, _vjepa_module, draw

    module = _vjepa_module()
    batch = _clips()
    masks = draw(module.masking, 4, module.encoder.grid, 1)
    eager = module.compute_losses(batch, masks)
    eager["loss"].backward()
    expected = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(module.compute_losses)(batch, masks)
    torch.testing.assert_close(compiled["loss"], eager["loss"])
    compiled["loss"].backward()
    got = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and module.target_list[0]._teacher is None  # type: ignore[attr-defined]
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
