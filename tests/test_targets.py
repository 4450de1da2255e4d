"""PixelTarget (MAE): contract, norm-pix loss against an independent computation, validation, reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mim.masking import RandomMasking
from mim.models import MaskedEncoder
from mim.targets import PixelTarget, norm_pix
from mim.tokens import gather_tokens
from tests import reference as ref
from tests.contracts import TargetContract

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_pixel_target(**overrides) -> PixelTarget:
    kwargs = dict(decoder_dim=32, decoder_depth=1, decoder_num_heads=4)
    kwargs.update(overrides)
    return PixelTarget(**kwargs)


class TestPixelTargetContract(TargetContract):
    target_cls = PixelTarget

    def make_target(self, **overrides) -> PixelTarget:
        return tiny_pixel_target(**overrides)


class TestPixelTargetContractNoNormPix(TargetContract):
    target_cls = PixelTarget
    mask_ratio = 0.5

    def make_target(self, **overrides) -> PixelTarget:
        return tiny_pixel_target(norm_pix=False, **overrides)


# ---------------------------------------------------------------------- setup
def _setup(norm_pix: bool, in_chans: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    encoder = MaskedEncoder(
        arch="vit_tiny_patch16_224",
        img_size=(16, 20),
        patch_size=4,
        in_chans=in_chans,
        model_kwargs={"depth": 1, "embed_dim": 64, "num_heads": 4},
    )
    target = tiny_pixel_target(norm_pix=norm_pix)
    target.bind(encoder)
    g = _gen(seed + 1)
    b, n = 4, encoder.grid.num_tokens  # grid 4 x 5
    images = torch.randn(b, in_chans, 16, 20, generator=g)
    # per-patch scales: ordinary, tiny variance (where eps placement matters) and constant patches
    scale = torch.tensor([1.0, 1e-3, 0.0])[torch.randint(0, 3, (b, 4, 5), generator=g)]
    images = images * scale.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    images = images + torch.randn(b, 1, 1, 1, generator=g)  # constant patches are not all zero
    masks = RandomMasking(mask_ratio=0.75)(b, encoder.grid, generator=g, device=CPU)
    assert masks.visible.shape == (b, 5) and n == 20
    return encoder, target, {"image": images}, masks


# ---------------------------------------------------------------------- loss against the specification
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_loss_matches_reference(norm: bool, in_chans: int) -> None:
    encoder, target, batch, masks = _setup(norm, in_chans)
    latent = encoder(batch["image"], masks.visible)
    loss = target(batch, masks, latent, encoder)["loss"]
    with torch.no_grad():
        pred = target.decoder(latent, masks.visible).double().numpy()  # (B, N, P): prediction at every token
    patches = ref.patchify_loop(batch["image"].double().numpy(), 4, 4)  # (B, N, P)
    tgt = ref.norm_pix_reference(patches, eps=1e-6) if norm else patches
    mask = ref.hidden_mask_loop(masks.visible.numpy(), 20)  # (B, N), 1 = hidden
    expected = ref.mae_loss_reference(pred, tgt, mask)
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)  # float32 vs float64


def test_loss_sensitive_to_variance_convention() -> None:
    """The reference distinguishes the biased variance and ``std + eps``: the check above can fail."""
    encoder, target, batch, masks = _setup(True)
    latent = encoder(batch["image"], masks.visible)
    loss = target(batch, masks, latent, encoder)["loss"].item()
    with torch.no_grad():
        pred = target.decoder(latent, masks.visible).double().numpy()
    patches = ref.patchify_loop(batch["image"].double().numpy(), 4, 4)
    mask = ref.hidden_mask_loop(masks.visible.numpy(), 20)
    mean = patches.mean(-1, keepdims=True)
    biased = (patches - mean) / np.sqrt(patches.var(-1, keepdims=True) + 1e-6)
    std_eps = (patches - mean) / (patches.std(-1, ddof=1, keepdims=True) + 1e-6)
    for wrong in (biased, std_eps):
        assert abs(ref.mae_loss_reference(pred, wrong, mask) - loss) > 1e-4 * loss


def test_norm_pix_function() -> None:
    x = torch.randn(3, 7, 48, generator=_gen(5), dtype=torch.float64)
    x[0, 0] = 2.5  # constant patch -> zeros
    expected = ref.norm_pix_reference(x.numpy(), eps=1e-6)
    np.testing.assert_allclose(norm_pix(x).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(norm_pix(x)[0, 0], torch.zeros(48, dtype=torch.float64))


def test_loss_ignores_predictions_at_visible_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder, target, batch, masks = _setup(True)
    latent = encoder(batch["image"], masks.visible)
    clean = target(batch, masks, latent, encoder)["loss"]
    decode = target.decoder.decode  # (the prediction step after the decoder's input is built)
    visible_onehot = (~masks.hidden).float()[..., None]  # (B, N, 1)

    def corrupted(x, outputs=None):
        full = decode(x) + 1e3 * visible_onehot  # garbage at visible tokens
        return full if outputs is None else gather_tokens(full, outputs)

    monkeypatch.setattr(target.decoder, "decode", corrupted)
    torch.testing.assert_close(target(batch, masks, latent, encoder)["loss"], clean, rtol=1e-6, atol=0)
    # control: garbage at one hidden token does change the loss
    hidden_onehot = torch.zeros_like(visible_onehot)
    hidden_onehot[0, masks.targets[0, 0, 0]] = 1.0

    def corrupted_hidden(x, outputs=None):
        full = decode(x) + 1e3 * hidden_onehot
        return full if outputs is None else gather_tokens(full, outputs)

    monkeypatch.setattr(target.decoder, "decode", corrupted_hidden)
    assert target(batch, masks, latent, encoder)["loss"].item() > clean.item() + 1.0


def test_loss_ignores_pixels_of_visible_patches() -> None:
    encoder, target, batch, masks = _setup(True)
    latent = encoder(batch["image"], masks.visible).detach()  # the latent is held fixed
    clean = target(batch, masks, latent, encoder)["loss"]
    images = batch["image"].clone()
    for b in range(images.shape[0]):
        for tok in masks.visible[b].tolist():
            gy, gx = divmod(tok, 5)
            images[b, :, gy * 4 : gy * 4 + 4, gx * 4 : gx * 4 + 4] = 100.0 * torch.randn(3, 4, 4)
    assert torch.equal(target({"image": images}, masks, latent, encoder)["loss"], clean)


def test_loss_does_not_depend_on_visible_order() -> None:
    """MAE feeds visible tokens in shuffle order, we sort them: the loss is the same either way."""
    encoder, target, batch, masks = _setup(True)
    perm = torch.stack([torch.randperm(5, generator=_gen(b)) for b in range(4)])
    shuffled = type(masks)(visible=masks.visible.gather(1, perm), targets=masks.targets, num_tokens=20)
    a = target(batch, masks, encoder(batch["image"], masks.visible), encoder)["loss"]
    b = target(batch, shuffled, encoder(batch["image"], shuffled.visible), encoder)["loss"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_unbound_target_raises() -> None:
    encoder, _, batch, masks = _setup(True)
    target = tiny_pixel_target()
    with pytest.raises(RuntimeError, match="bind"):
        target(batch, masks, encoder(batch["image"], masks.visible), encoder)


def test_decoder_geometry_follows_encoder() -> None:
    encoder, target, _, _ = _setup(True, in_chans=1)
    dec = target.decoder
    assert dec.decoder_pred.out_features == 4 * 4 * 1
    assert dec.decoder_embed.in_features == 64
    assert dec.grid == encoder.grid
    assert len(dec.decoder_blocks) == 1
    names = {n for n, _ in target.named_parameters()}
    assert target.no_weight_decay() <= names


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"decoder_dim": 30, "decoder_num_heads": 4}, "decoder_dim"),
        ({"decoder_dim": 32, "decoder_num_heads": 0}, "decoder_num_heads"),
        ({"decoder_dim": 6, "decoder_num_heads": 3}, "decoder_dim"),  # divisible by heads, not by 4
        ({"decoder_depth": 0}, "decoder_depth"),
        ({"weight": -0.5}, "weight"),
        ({"weight": float("inf")}, "weight"),
        ({"norm_pix_eps": 0.0}, "norm_pix_eps"),
    ],
)
def test_bad_config_raises(kwargs, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PixelTarget(**kwargs)


def test_zero_weight_allowed() -> None:
    assert PixelTarget(weight=0.0).weight == 0.0


# ---------------------------------------------------------------------- reconstruction
@pytest.mark.parametrize("norm", [True, False])
def test_reconstruct_keeps_visible_patches_exactly(norm: bool) -> None:
    encoder, target, batch, masks = _setup(norm)
    latent = encoder(batch["image"], masks.visible)
    recon = target.reconstruct(batch, masks, latent, encoder)
    assert recon.shape == batch["image"].shape
    got = ref.patchify_loop(recon.numpy(), 4, 4)
    original = ref.patchify_loop(batch["image"].numpy(), 4, 4)
    pred = target.decoder(latent, masks.visible).detach().double().numpy()
    for b in range(4):
        vis = set(masks.visible[b].tolist())
        for n in range(20):
            if n in vis:
                np.testing.assert_array_equal(got[b, n], original[b, n])
            else:
                x = original[b, n].astype(np.float64)
                if norm:  # de-normalised with the true patch's mean and unbiased std
                    expected = pred[b, n] * np.sqrt(x.var(ddof=1) + 1e-6) + x.mean()
                else:
                    expected = pred[b, n]
                np.testing.assert_allclose(got[b, n], expected, rtol=1e-5, atol=1e-6)
