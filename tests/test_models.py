"""Models: patch layout, sin-cos tables, MAE initialisation, the masked encoder and the MAE decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

from mim.masking import RandomMasking
from mim.models import MAEDecoder, MaskedEncoder, patchify, sincos_2d, unpatchify
from mim.types import TokenGrid
from tests import reference as ref
from tests.factories import TINY_VIT, tiny_encoder

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


TWO_BLOCKS = {**TINY_VIT, "depth": 2}


# -------------------------------------------------- patch layout (facebookresearch/mae models_mae.py ``patchify``)
@pytest.mark.parametrize(
    ("channels", "height", "width", "patch"),
    [(3, 12, 20, (4, 4)), (1, 12, 20, (4, 4)), (3, 8, 8, (2, 2)), (1, 6, 9, (2, 3)), (3, 6, 12, (3, 4))],
)
def test_patchify_matches_loop_layout(channels: int, height: int, width: int, patch: tuple[int, int]) -> None:
    images = np.random.default_rng(0).standard_normal((2, channels, height, width)).astype(np.float32)
    ours = patchify(torch.from_numpy(images), patch).numpy()
    expected = ref.patchify_loop(images, *patch)
    np.testing.assert_array_equal(ours, expected)


def test_patchify_channel_fastest_by_hand() -> None:
    # 1 image, 2 channels, 2x4 pixels, patch 2x2 -> 2 tokens of 8 values
    img = torch.arange(16.0).reshape(1, 2, 2, 4)  # channel 0: 0..7, channel 1: 8..15
    p = patchify(img, (2, 2))
    # token 0 = columns 0-1; order (row, col, c): (0,0,0)=0 (0,0,1)=8 (0,1,0)=1 (0,1,1)=9 (1,0,0)=4 ...
    assert p[0, 0].tolist() == [0, 8, 1, 9, 4, 12, 5, 13]
    assert p[0, 1].tolist() == [2, 10, 3, 11, 6, 14, 7, 15]


@pytest.mark.parametrize(("channels", "height", "width", "patch"), [(3, 12, 20, (4, 4)), (1, 6, 9, (2, 3))])
def test_unpatchify_is_exact_inverse(channels: int, height: int, width: int, patch: tuple[int, int]) -> None:
    g = _gen(0)
    images = torch.randn(2, channels, height, width, generator=g)
    grid = (height // patch[0], width // patch[1])
    assert torch.equal(unpatchify(patchify(images, patch), patch, grid, channels), images)
    patches = torch.randn(2, grid[0] * grid[1], patch[0] * patch[1] * channels, generator=g)
    assert torch.equal(patchify(unpatchify(patches, patch, grid, channels), patch), patches)


def test_patchify_rejects_indivisible_size() -> None:
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 3, 10, 12), (4, 4))


# ------------------------------------------------------ sin-cos tables (facebookresearch/mae util/pos_embed.py)
@pytest.mark.parametrize("dim", [64, 768])
@pytest.mark.parametrize("grid", [(14, 14), (7, 7), (3, 5)])
def test_sincos_2d_matches_reference(dim: int, grid: tuple[int, int]) -> None:
    ours = sincos_2d(dim, grid, num_prefix_tokens=1)
    assert ours.dtype == torch.float32
    expected = ref.sincos_2d(dim, *grid, cls_token=True)
    assert ours.shape == expected.shape == (1 + grid[0] * grid[1], dim)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(sincos_2d(dim, grid).numpy(), expected[1:], rtol=0, atol=1e-7)


def test_sincos_2d_first_half_is_column() -> None:
    dim, q = 16, 4  # E/4 = 4 frequencies
    table = sincos_2d(dim, (3, 5), num_prefix_tokens=1)
    assert torch.equal(table[0], torch.zeros(dim))  # zero CLS row
    token = table[1 + 1 * 5 + 2]  # row y = 1, column x = 2
    omega = [1.0 / 10000 ** (i / q) for i in range(q)]
    expected = [math.sin(2 * w) for w in omega] + [math.cos(2 * w) for w in omega]
    expected += [math.sin(1 * w) for w in omega] + [math.cos(1 * w) for w in omega]
    torch.testing.assert_close(token, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-7)


def test_encoder_pos_embed_is_frozen_sincos_table() -> None:
    enc = tiny_encoder(model_kwargs=TWO_BLOCKS, img_size=(16, 24))  # non-square grid 4 x 6
    pos = enc.vit.pos_embed
    assert not pos.requires_grad
    expected = ref.sincos_2d(64, 4, 6, cls_token=True)[None]
    np.testing.assert_allclose(pos.detach().numpy(), expected, rtol=0, atol=1e-7)
    assert "vit.pos_embed" in enc.state_dict()
    assert torch.equal(enc.timm_state_dict()["pos_embed"], pos.detach())
    # tokenize adds exactly the patch rows of the table
    images = torch.randn(2, 3, 16, 24, generator=_gen(0))
    expected_tokens = enc.vit.patch_embed(images) + torch.from_numpy(expected[:, 1:])
    torch.testing.assert_close(enc.tokenize(images), expected_tokens, rtol=0, atol=1e-6)


# --------------------------------------- MAE initialisation (facebookresearch/mae models_mae.py ``initialize_weights``)
def _assert_xavier_uniform(weight: torch.Tensor, fan_out: int, fan_in: int, name: str) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    w = weight.detach().double().flatten()
    assert float(w.abs().max()) <= bound * (1 + 1e-6), f"{name}: |w| exceeds the Xavier bound {bound:.4f}"
    n = w.numel()
    # the max of n uniform draws is within a few /n of the bound
    assert float(w.abs().max()) >= bound * (1 - 20 / n), f"{name}: max |w| {float(w.abs().max()):.4f} << {bound:.4f}"
    var, expected_var = float(w.var()), bound**2 / 3
    rel_sd = math.sqrt(0.8 / n)  # sd of the sample variance of U(-a, a), relative to a^2/3
    assert abs(var / expected_var - 1) < 6 * rel_sd, f"{name}: variance {var:.3g} vs {expected_var:.3g}"
    assert abs(float(w.mean())) < 6 * math.sqrt(expected_var / n), f"{name}: mean not ~0"


def test_mae_init_of_encoder() -> None:
    enc = tiny_encoder(img_size=32, patch_size=8, model_kwargs={"depth": 1, "embed_dim": 192, "num_heads": 3})
    linears = [(n, m) for n, m in enc.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4  # qkv, proj, fc1, fc2
    for name, m in linears:
        _assert_xavier_uniform(m.weight, m.weight.shape[0], m.weight.shape[1], name)
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), f"{name}: bias not zero"
    qkv = enc.vit.blocks[0].attn.qkv.weight
    assert qkv.shape == (3 * 192, 192)  # fused qkv treated as one (3D, D) matrix
    norms = [m for m in enc.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 3  # norm1, norm2, final norm
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
        assert m.eps == 1e-6
    # patch projection viewed as (D, C*p*p): Xavier bound sqrt(6 / (3*8*8 + 192)), not PyTorch's 1/sqrt(fan_in)
    proj = enc.vit.patch_embed.proj
    _assert_xavier_uniform(proj.weight.reshape(192, -1), 192, 3 * 8 * 8, "patch_embed.proj")
    cls = enc.vit.cls_token.detach().flatten().double()
    assert abs(float(cls.std()) - 0.02) < 0.004, f"cls token std {float(cls.std()):.4f}"
    assert abs(float(cls.mean())) < 0.006


def test_timm_init_keeps_timm_defaults() -> None:
    enc = tiny_encoder(init="timm", img_size=32, patch_size=8, model_kwargs={"depth": 1, "embed_dim": 192})
    # timm initialises Linear weights with trunc_normal(std=0.02), not Xavier-uniform (std ~0.051 for qkv)
    qkv = enc.vit.blocks[0].attn.qkv.weight.detach()
    assert abs(float(qkv.std()) - 0.02) < 0.002
    assert not enc.vit.pos_embed.requires_grad  # the sin-cos table is used in both modes


def test_mae_init_of_decoder() -> None:
    torch.manual_seed(0)
    dec = MAEDecoder(grid=TokenGrid(1, 4, 4), in_dim=192, out_dim=48, dim=256, depth=1, num_heads=4)
    for name, m in dec.named_modules():
        if isinstance(m, nn.Linear):
            _assert_xavier_uniform(m.weight, m.weight.shape[0], m.weight.shape[1], name)
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
        elif isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    tok = dec.mask_token.detach().flatten().double()
    assert abs(float(tok.std()) - 0.02) < 0.004
    assert not dec.decoder_pos_embed.requires_grad
    np.testing.assert_allclose(dec.decoder_pos_embed[0].detach().numpy(), ref.sincos_2d(256, 4, 4), atol=1e-7)


# ---------------------------------------------------------------------- the masked encoder
def test_encoder_never_sees_hidden_tokens() -> None:
    enc = tiny_encoder(model_kwargs=TWO_BLOCKS)
    g = _gen(1)
    images = torch.randn(2, 3, 16, 16, generator=g)
    masks = RandomMasking(mask_ratio=0.75)(2, enc.grid, generator=g, device=CPU)
    with torch.no_grad():
        base = enc(images, masks.visible)
    assert base.shape == (2, 1 + 4, 64)  # cls + K = int(16 * 0.25) = 4 tokens

    def perturb(token: int, sample: int) -> torch.Tensor:
        out = images.clone()
        gy, gx = divmod(token, 4)
        out[sample, :, gy * 4 : gy * 4 + 4, gx * 4 : gx * 4 + 4] += 10 * torch.randn(3, 4, 4, generator=g)
        return out

    for sample in range(2):
        hidden_tok = masks.targets[sample, 0, 0].item()
        visible_tok = masks.visible[sample, 0].item()
        with torch.no_grad():
            assert torch.equal(enc(perturb(hidden_tok, sample), masks.visible), base), "a hidden patch leaked"
            changed = enc(perturb(visible_tok, sample), masks.visible)
        assert not torch.allclose(changed[sample], base[sample]), "a visible patch did not matter"
        other = 1 - sample
        assert torch.equal(changed[other], base[other]), "samples leak into each other"


def test_encoder_matches_timm_forward_features() -> None:
    enc = tiny_encoder(model_kwargs=TWO_BLOCKS, in_chans=1, img_size=(16, 24))
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=(16, 24),
        patch_size=4,
        in_chans=1,
        depth=2,
        embed_dim=64,
        num_heads=4,
    )
    model.load_state_dict(enc.timm_state_dict(), strict=True)
    model.eval()
    enc.eval()
    images = torch.randn(3, 1, 16, 24, generator=_gen(2))
    with torch.no_grad():
        expected = model.forward_features(images)
        ours = enc(images, visible=None)
        all_visible = enc(images, torch.arange(24).expand(3, -1))
    assert ours.shape == expected.shape == (3, 25, 64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(all_visible, expected, rtol=0, atol=1e-5)


def test_encoder_rejects_wrong_image_size() -> None:
    enc = tiny_encoder(model_kwargs=TWO_BLOCKS)
    with pytest.raises(ValueError, match="size"):
        enc(torch.zeros(1, 3, 20, 20))


def test_encoder_pool() -> None:
    enc = tiny_encoder(model_kwargs=TWO_BLOCKS)
    latent = torch.randn(2, 5, 64, generator=_gen(3))
    assert torch.equal(enc.pool(latent, "cls"), latent[:, 0])
    torch.testing.assert_close(enc.pool(latent, "avg"), latent[:, 1:].sum(1) / 4)


@pytest.mark.parametrize("arch", ["vit_does_not_exist_patch16_224", "resnet18"])
def test_encoder_rejects_bad_arch(arch: str) -> None:
    with pytest.raises(ValueError, match="MaskedEncoder.arch"):
        MaskedEncoder(arch=arch)


@pytest.mark.parametrize(("img_size", "patch_size"), [(30, 4), (40, None), ((16, 18), 4)])
def test_encoder_rejects_indivisible_image(img_size, patch_size) -> None:
    with pytest.raises(ValueError, match="img_size") as info:
        MaskedEncoder(arch="vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size, model_kwargs={"depth": 1})
    assert "patch_size" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"in_chans": 0}, "in_chans"), ({"drop_path_rate": 1.5}, "drop_path_rate"), ({"init": "xavier"}, "init")],
)
def test_encoder_rejects_bad_fields(kwargs, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MaskedEncoder(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, model_kwargs={"depth": 1}, **kwargs)


def test_encoder_geometry_attributes() -> None:
    enc = tiny_encoder(model_kwargs=TWO_BLOCKS, img_size=(16, 24))
    assert enc.grid == TokenGrid(1, 4, 6)
    assert enc.patch_size == (4, 4) and enc.img_size == (16, 24)
    assert enc.embed_dim == 64 and enc.num_prefix_tokens == 1


# ---------------------------------------------------------------------- the MAE decoder
def _decoder(depth: int, prefix: int = 1) -> MAEDecoder:
    torch.manual_seed(0)
    return MAEDecoder(
        grid=TokenGrid(1, 3, 4), in_dim=24, out_dim=10, num_prefix_tokens=prefix, dim=16, depth=depth, num_heads=2
    )


def test_decoder_shapes() -> None:
    dec = _decoder(depth=2)
    g = _gen(0)
    masks = RandomMasking(mask_ratio=0.5)(5, TokenGrid(1, 3, 4), generator=g, device=CPU)
    latent = torch.randn(5, 1 + 6, 24, generator=g)
    assert dec(latent, masks.visible).shape == (5, 12, 10)
    assert dec(latent, masks.visible, masks.targets[:, 0]).shape == (5, 6, 10)


def test_decoder_places_latents_at_their_positions() -> None:
    """With no blocks, output n = pred(norm(embed(latent_j) + pos_n)) if n = visible_j, else from the mask token."""
    dec = _decoder(depth=0)
    with torch.no_grad():
        dec.mask_token.normal_(generator=_gen(9))
    g = _gen(1)
    visible = torch.tensor([[0, 5, 6, 11], [2, 3, 8, 9]])
    latent = torch.randn(2, 1 + 4, 24, generator=g)
    with torch.no_grad():
        out = dec(latent, visible)
        pos = dec.decoder_pos_embed[0, 1:]  # (N, Dd), CLS row dropped
        for b in range(2):
            for n in range(12):
                hits = (visible[b] == n).nonzero().flatten().tolist()
                x = dec.decoder_embed(latent[b, 1 + hits[0]]) if hits else dec.mask_token[0, 0]
                expected = dec.decoder_pred(dec.decoder_norm(x + pos[n]))
                torch.testing.assert_close(out[b, n], expected, rtol=0, atol=1e-6)
        subset = torch.tensor([[11, 1], [3, 0]])
        torch.testing.assert_close(dec(latent, visible, subset), out.gather(1, subset[..., None].expand(-1, -1, 10)))


def test_decoder_follows_indices_not_order() -> None:
    """Permuting the visible latents together with their indices leaves the reconstruction unchanged."""
    dec = _decoder(depth=2)
    g = _gen(2)
    visible = torch.tensor([[0, 5, 6, 11], [2, 3, 8, 9]])
    latent = torch.randn(2, 1 + 4, 24, generator=g)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = dec(latent, visible)
        shuffled = dec(torch.cat([latent[:, :1], latent[:, 1:][:, perm]], dim=1), visible[:, perm])
        moved = dec(latent, torch.tensor([[0, 5, 7, 11], [2, 3, 8, 9]]))
    torch.testing.assert_close(shuffled, out, rtol=0, atol=1e-5)
    assert not torch.allclose(moved[0], out[0]), "the decoder ignored where a latent belongs"
    torch.testing.assert_close(moved[1], out[1], rtol=0, atol=0)


def test_decoder_uses_prefix_tokens() -> None:
    dec = _decoder(depth=1)
    g = _gen(3)
    visible = torch.tensor([[0, 5, 6, 11]])
    latent = torch.randn(1, 1 + 4, 24, generator=g)
    other = latent.clone()
    other[:, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(dec(latent, visible), dec(other, visible))
    dec0 = _decoder(depth=0)
    with torch.no_grad():  # without blocks the prefix token is dropped and cannot matter
        assert torch.equal(dec0(latent, visible), dec0(other, visible))


def test_decoder_without_prefix_tokens() -> None:
    dec = _decoder(depth=1, prefix=0)
    assert dec.decoder_pos_embed.shape == (1, 12, 16)
    latent = torch.randn(2, 4, 24, generator=_gen(4))
    assert dec(latent, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])).shape == (2, 12, 10)


def test_decoder_on_3d_grid_uses_the_3d_table() -> None:
    from tests.reference import sincos_3d_uniform

    dec = MAEDecoder(grid=TokenGrid(2, 3, 4), in_dim=8, out_dim=4, dim=16, depth=1, num_heads=2)
    table = dec.decoder_pos_embed[0]
    torch.testing.assert_close(table[0], torch.zeros(16))
    torch.testing.assert_close(table[1:], torch.from_numpy(sincos_3d_uniform(16, 2, 3, 4)))


def test_half_precision_encoder_takes_fp32_images():
    """DeepSpeed bf16 casts the model, while the datamodule normalises images to fp32 on the device."""
    encoder = tiny_encoder(seed=None, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}).to(torch.bfloat16)
    images = torch.randn(2, 3, 16, 16)
    out = encoder(images, torch.arange(4).expand(2, 4))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 32)
