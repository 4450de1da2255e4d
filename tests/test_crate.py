"""CRATE-MAE (Pai et al., ICLR 2024; /work/shared/methods/MORE.md section 6): white-box layers (MSSA + ISTA) as an
encoder option (``MaskedEncoder(block="crate")``) and a decoder option (``MAEDecoder(block="crate")``).

Checked here: the layers against the spec's formulas written out independently (float64, tiny widths), the ISTA step's
exactness with a zero dictionary and its sparsity growing with lambda, symmetric per-head MSSA logits, parameter counts
(per layer 3D² + 5D; CRATE-MAE-B 44.3 M against MAE ViT-B's 143.5 M, 30.9 %), the encoder contract, and the debug
recipe learning.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import Tensor

from mim.models import MAEDecoder, MaskedEncoder
from mim.models.crate import MSSA, CrateBlock, CrateDecoderBlock, ista_step
from tests.factories import (
    E2E_VIT,
    TINY_VIT,
    TrainMetricsRecorder,
    fashion_mnist_probe,
    fashion_mnist_vit,
    fit_debug_recipe,
    tiny_encoder,
)
from tests.test_encoder_contract import _PixelEncoderContract

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn from N(0, 0.3²) (LayerNorm affines included), so no term of a formula is trivial."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


# ---------------------------------------------------------------------------------------------------- references
def ref_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_mssa(z: Tensor, u: Tensor, out_w: Tensor, out_b: Tensor, heads: int) -> Tensor:
    """sum over heads of the output projection of softmax((U_k z)(U_k z)ᵀ/√d) (U_k z), token by token.

    Args:
        z: (B, L, D); u: (D, D) the stacked U_k (rows k*d .. (k+1)*d - 1 are U_k); out_w (D, D), out_b (D,).
    """
    b, n, d = z.shape
    dh = d // heads
    outs = []
    for k in range(heads):
        uk = u[k * dh : (k + 1) * dh]  # (d_h, D)
        w = torch.einsum("hd,bld->blh", uk, z)  # (B, L, d_h): U_k z_i for every token i
        logits = torch.einsum("bih,bjh->bij", w, w) / math.sqrt(dh)  # (B, L, L)
        attn = torch.exp(logits - logits.amax(-1, keepdim=True))
        attn = attn / attn.sum(-1, keepdim=True)
        outs.append(torch.einsum("bij,bjh->bih", attn, w))  # (B, L, d_h)
    heads_out = torch.cat(outs, dim=-1)  # (B, L, D)
    return torch.einsum("ed,bld->ble", out_w, heads_out) + out_b  # (B, L, D)


def ref_ista(u: Tensor, dmat: Tensor, eta: float, lambd: float) -> Tensor:
    """ReLU(u + η Dᵀ(u − D u) − η λ), with D acting on column vectors (token rows here)."""
    du = torch.einsum("ed,bld->ble", dmat, u)  # (B, L, D): D u
    grad = torch.einsum("ed,ble->bld", dmat, u - du)  # (B, L, D): Dᵀ (u - D u), (Dᵀr)_d = sum_e D_ed r_e
    return torch.clamp(u + eta * grad - eta * lambd, min=0.0)


def _tokens(b: int = 2, n: int = 5, d: int = 8, seed: int = 1) -> Tensor:
    return torch.randn(b, n, d, generator=_gen(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- formulas
def test_mssa_matches_the_formula_and_its_logits_are_symmetric():
    mssa = MSSA(8, 2).double()
    _randomise_(mssa, 0)
    z = _tokens()
    expected = ref_mssa(z, mssa.subspaces.weight, mssa.proj.weight, mssa.proj.bias, heads=2)
    torch.testing.assert_close(mssa(z), expected, atol=1e-10, rtol=1e-10)
    w = mssa.subspaces(z).view(2, 5, 2, 4).transpose(1, 2)  # (B, h, L, d_h)
    logits = w @ w.transpose(-1, -2)  # (B, h, L, L): q = k, so symmetric per head
    torch.testing.assert_close(logits, logits.transpose(-1, -2))


@pytest.mark.parametrize("lambd", [0.0, 0.1, 0.5])
def test_crate_block_matches_the_formulas(lambd: float):
    """z½ = z + MSSA(LN(z)); z' = ReLU(u + η Dᵀ(u − D u) − η λ) with u = LN(z½)."""
    block = CrateBlock(8, 2, step_size=0.1, lambd=lambd).double()
    _randomise_(block, 2)
    z = _tokens()
    a = block.attn
    half = z + ref_mssa(
        ref_layer_norm(z, block.norm1.weight, block.norm1.bias, 1e-5),
        a.subspaces.weight,
        a.proj.weight,
        a.proj.bias,
        heads=2,
    )
    u = ref_layer_norm(half, block.norm2.weight, block.norm2.bias, 1e-5)
    expected = ref_ista(u, block.dictionary, 0.1, lambd)
    torch.testing.assert_close(block(z), expected, atol=1e-10, rtol=1e-10)


def test_crate_decoder_block_matches_the_formula():
    """v = A LN(x); x' = v − MSSA(LN(v))."""
    block = CrateDecoderBlock(8, 2).double()
    _randomise_(block, 3)
    x = _tokens()
    v = torch.einsum("ed,bld->ble", block.expand, ref_layer_norm(x, block.norm1.weight, block.norm1.bias, 1e-5))
    a = block.attn
    mssa = ref_mssa(
        ref_layer_norm(v, block.norm2.weight, block.norm2.bias, 1e-5), a.subspaces.weight, a.proj.weight, a.proj.bias, 2
    )
    torch.testing.assert_close(block(x), v - mssa, atol=1e-10, rtol=1e-10)


def test_ista_with_a_zero_dictionary_is_a_shifted_relu():
    """Spec check (a): with D = 0 the step is ReLU(u − ηλ), exactly."""
    u = _tokens(d=6, seed=4).float()
    out = ista_step(u, torch.zeros(6, 6), step_size=0.1, lambd=0.5)
    torch.testing.assert_close(out, torch.relu(u - 0.05), atol=1e-6, rtol=0)


def test_sparsity_is_positive_and_grows_with_lambda():
    """Spec check (d): the share of exact zeros after a block is > 0 and grows with λ (same weights)."""
    z = _tokens(b=4, n=16, d=32, seed=5).float()
    torch.manual_seed(0)
    block = CrateBlock(32, 4)
    zeros = []
    for lambd in (0.0, 0.5, 2.0, 8.0):
        block.lambd = lambd
        with torch.no_grad():
            out = block(z)
        assert bool((out >= 0).all())
        zeros.append(float((out == 0).float().mean()))
    assert zeros[0] > 0 and all(a < b for a, b in zip(zeros, zeros[1:])), zeros


def test_blocks_refuse_what_crate_has_no_counterpart_for():
    with pytest.raises(ValueError, match="CrateBlock.init_values"):
        CrateBlock(8, 2, init_values=1e-5)
    with pytest.raises(ValueError, match="CrateBlock.lambd"):
        CrateBlock(8, 2, lambd=-0.1)
    with pytest.raises(ValueError, match="MSSA.dim"):
        MSSA(10, 4)
    with pytest.raises(ValueError, match="MaskedEncoder.block"):
        tiny_encoder(block="mlp")
    with pytest.raises(ValueError, match="MAEDecoder.block"):
        MAEDecoder(grid=tiny_encoder().grid, in_dim=64, out_dim=48, dim=32, depth=1, num_heads=2, block="mlp")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- sizes
def _count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("d", [16, 48])
def test_parameters_per_layer(d: int):
    """A CRATE layer has 3D² + 5D parameters (U, output projection + bias, D or A, two LayerNorms); the MAE/ViT block
    at the same width has 12D² + 13D (qkv with bias, projection, MLP 4D, two LayerNorms): about a quarter."""
    crate, decoder = CrateBlock(d, 4), CrateDecoderBlock(d, 4)
    vit = Block(d, 4, mlp_ratio=4.0, qkv_bias=True)
    assert _count(crate) == _count(decoder) == 3 * d * d + 5 * d
    assert _count(vit) == 12 * d * d + 13 * d


def test_crate_mae_base_has_31_percent_of_mae_base():
    """Spec 6.3 and check (c): CRATE-MAE-B (768 x 12 encoder, 768 x 12 CRATE decoder) has 44.3 M trainable
    parameters, MAE ViT-B with a 768 x 8 decoder 143.5 M: 30.9 %. Built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        crate = MaskedEncoder(arch="vit_base_patch16_224", block="crate")
        crate_dec = MAEDecoder(grid=crate.grid, in_dim=768, out_dim=768, dim=768, depth=12, num_heads=12, block="crate")
        mae = MaskedEncoder(arch="vit_base_patch16_224")
        mae_dec = MAEDecoder(grid=mae.grid, in_dim=768, out_dim=768, dim=768, depth=8, num_heads=12)
    d = 768
    # patch embed, cls, decoder_embed, two final norms, pred, mask token
    embed = (d * d + d) + d + (d * d + d) + 4 * d + (d * d + d) + d
    assert _count(crate, crate_dec) == embed + 24 * (3 * d * d + 5 * d) == 44_335_872
    assert _count(mae, mae_dec) == embed + 20 * (12 * d * d + 13 * d) == 143_533_824
    assert _count(crate, crate_dec) / _count(mae, mae_dec) == pytest.approx(0.309, abs=5e-4)


# ---------------------------------------------------------------------------------------------------- encoder
def crate_encoder(**overrides) -> MaskedEncoder:
    return tiny_encoder(block="crate", **overrides)


class TestCrateEncoderContract(_PixelEncoderContract):
    encoder_cls = MaskedEncoder

    def make_encoder(self) -> MaskedEncoder:
        return crate_encoder(model_kwargs={**TINY_VIT, "depth": 2})


def test_encoder_swaps_every_block_and_keeps_the_rest():
    encoder = crate_encoder(model_kwargs={**TINY_VIT, "depth": 3})
    assert [type(b) for b in encoder.vit.blocks] == [CrateBlock] * 3
    assert (encoder.depth, encoder.num_heads, encoder.embed_dim) == (3, 4, 64)
    assert encoder.config["block"] == "crate" and "block" not in tiny_encoder().config
    assert isinstance(encoder.vit.norm, torch.nn.LayerNorm)  # timm's single final norm, as CRATE's
    # MAE init: Xavier on the linears, the raw dictionaries keep Kaiming-uniform (bound 1/sqrt(D))
    block = encoder.vit.blocks[0]
    assert float(block.dictionary.abs().max()) <= 1 / math.sqrt(64)
    assert float(block.attn.subspaces.weight.abs().max()) <= math.sqrt(6 / 128)
    with pytest.raises(ValueError, match="no plain timm equivalent"):
        encoder.timm_state_dict()


def test_crate_decoder_reconstructs_with_gradients():
    encoder = crate_encoder()
    decoder = MAEDecoder(grid=encoder.grid, in_dim=64, out_dim=48, dim=32, depth=2, num_heads=2, block="crate")
    assert [type(b) for b in decoder.decoder_blocks] == [CrateDecoderBlock] * 2
    images = torch.randn(2, 3, 16, 16, generator=_gen(6))
    visible = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]])
    out = decoder(encoder(images, visible), visible)  # (B, N, P)
    assert out.shape == (2, 16, 48)
    out.square().mean().backward()
    assert all(p.grad is not None for p in decoder.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------- recipes
@pytest.mark.usefixtures("fashion_mnist")
def test_pixel_target_with_crate_decoder_layers_trains_a_step():
    """``PixelTarget(decoder_block="crate")``: a CRATE encoder and CRATE decoder layers, as the paper's model."""
    from mim.masking import RandomMasking
    from mim.module import PretrainModule
    from mim.targets import PixelTarget

    encoder = tiny_encoder(block="crate")
    target = PixelTarget(decoder_dim=32, decoder_depth=2, decoder_num_heads=2, decoder_block="crate")
    module = PretrainModule(encoder=encoder, masking=RandomMasking(mask_ratio=0.75), targets=[target])
    assert all(isinstance(b, CrateDecoderBlock) for b in target.decoder.decoder_blocks)
    batch = {"image": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    loss = module.compute_losses(batch, module.draw_masks(batch, torch.Generator().manual_seed(1)))["loss"]
    loss.backward()
    assert math.isfinite(float(loss))
    assert all(p.grad is not None for p in target.decoder.decoder_blocks.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="decoder_block"):
        PixelTarget(decoder_block="mlp")  # type: ignore[arg-type]


def test_crate_debug_recipe_trains(tmp_path: Path):
    """recipes/debug/crate_mae_fashion_mnist.yaml through the CLI's builder: the loss goes down over 30 steps."""
    cli, seen = fit_debug_recipe("crate_mae_fashion_mnist.yaml", tmp_path, 30, "--trainer.max_epochs=-1")
    assert all(isinstance(b, CrateBlock) for b in cli.model.encoder.vit.blocks)
    losses = [s["train/loss"] for s in seen]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_paper_recipe_states_result_and_cost(tmp_path: Path):
    from PIL import Image

    from mim.lightning_cli import build

    recipe = RECIPES / "crate_mae" / "crate_b16_in1k.yaml"
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "Expected" in header and "Cost" in header and "44.3 M" in header and "30.9 %" in header
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), (90, 90, 200)).save(tmp_path / "images" / cls / "0.png")
    args = [
        "--config",
        str(recipe),
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.root={tmp_path}/images",
    ]
    m = build(args, save_config_callback=None).model
    assert m.encoder.block == "crate" and m.encoder.embed_dim == 768 and m.encoder.depth == 12
    assert [type(b) for b in m.encoder.vit.blocks] == [CrateBlock] * 12
    assert m.masking.mask_ratio == 0.75
    assert round(_count(m) / 1e6, 1) == 44.3  # the released CRATE-MAE-B's count, with a parameter-matched decoder


# ---------------------------------------------------------------------------------------------------- e2e
PROBE_IMAGES = 4000
MARGIN = 0.015


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("fashion_mnist")
def test_crate_mae_beats_random_init_on_the_linear_probe() -> None:
    """Spec check (e): CRATE-MAE pretraining on Fashion-MNIST beats the same CRATE encoder at its random
    initialisation on the linear probe (mim.probe: logistic regression on standardised average-pooled frozen features).

    Settings: a 4-layer, 64-wide CRATE encoder (4 heads, step size 0.1, lambda 0.5) with 7 x 7 patches (a 4 x 4 grid,
    no class token), 75 % of the tokens hidden, PixelTarget with a 2-block 64-wide decoder, norm-pix, 1024 steps of
    128 images, AdamW lr 1.5e-3 (absolute, betas 0.9 / 0.95, wd 0.05), warmup 0.25 epoch, cosine to 1e-5.
    Measured (4 000 / 4 000 probe images, seed 0, this test, one run): 0.744 against 0.649 at random init (+9.5
    points); loss 1.74 -> 0.70; 51 s of training, 53 s in all on 2 CPU cores.
    """
    import copy
    import time

    import lightning as L

    from mim.data import FashionMNISTDataModule
    from mim.masking import RandomMasking
    from mim.module import PretrainModule
    from mim.targets import PixelTarget
    from tests.factories import cpu_trainer

    start = time.time()
    L.seed_everything(0, verbose=False)
    encoder = fashion_mnist_vit(block="crate", model_kwargs={**E2E_VIT, "class_token": False, "global_pool": "avg"})
    random_init = copy.deepcopy(encoder)  # the baseline: exactly the weights pretraining starts from
    module = PretrainModule(
        encoder=encoder,
        masking=RandomMasking(mask_ratio=0.75),
        targets=[PixelTarget(decoder_dim=64, decoder_depth=2, decoder_num_heads=4)],
        lr=1.5e-3,
        min_lr=1e-5,
        weight_decay=0.05,
        betas=(0.9, 0.95),
        warmup_epochs=0.25,
        seed=0,
    )
    data = FashionMNISTDataModule(batch_size=128, num_train=32768, num_val=128)
    record = TrainMetricsRecorder()
    trainer = cpu_trainer(max_epochs=4, limit_val_batches=0, log_every_n_steps=16, callbacks=[record])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1024
    train_s = time.time() - start

    probe = fashion_mnist_probe(data, PROBE_IMAGES)

    pretrained, random = probe(module.encoder), probe(random_init)
    print(
        f"CRATE-MAE linear probe: pretrained {pretrained:.4f}, random init {random:.4f}; "
        f"loss {record.seen[0]['train/loss']:.3f} -> {record.seen[-1]['train/loss']:.3f}; "
        f"train {train_s:.0f} s, total {time.time() - start:.0f} s"
    )
    assert pretrained > random + MARGIN, f"pretrained {pretrained:.4f} vs random init {random:.4f}"
