"""The video path of the encoder (3-D tubelets, 3-D sin-cos) and MAE on clips."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mim.masking import RandomMasking
from mim.models.embed import patchify_3d, sincos_3d, unpatchify_3d
from mim.module import PretrainModule
from mim.targets import PixelTarget
from mim.types import TokenGrid
from tests.factories import ClipDataset, LossRecorder, cpu_trainer, tiny_video_encoder
from tests.reference import norm_pix_reference, sincos_3d_uniform, tubelets_loop

VIDEO_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2}


def test_tubelet_layout_matches_loop():
    v = torch.randn(2, 3, 4, 8, 12, dtype=torch.float64)
    ours = patchify_3d(v, (2, 4, 4)).numpy()
    np.testing.assert_array_equal(ours, tubelets_loop(v.numpy(), 2, 4, 4))
    assert torch.equal(unpatchify_3d(patchify_3d(v, (2, 4, 4)), (2, 4, 4), TokenGrid(2, 2, 3), 3), v)


@pytest.mark.parametrize(("dim", "grid"), [(48, (2, 4, 4)), (1024, (8, 3, 2)), (64, (3, 2, 5))])
def test_sincos_3d_matches_reference(dim, grid):
    ours = sincos_3d(dim, TokenGrid(*grid)).numpy()
    np.testing.assert_allclose(ours, sincos_3d_uniform(dim, *grid), atol=1e-7)


def test_video_encoder_geometry_and_frozen_table():
    enc = tiny_video_encoder(seed=None, model_kwargs=VIDEO_VIT)
    assert enc.grid == TokenGrid(2, 4, 4) and enc.patch_dim == 2 * 4 * 4 * 3 and enc.input_key == "video"
    table = enc.vit.pos_embed[0]
    assert not enc.vit.pos_embed.requires_grad
    torch.testing.assert_close(table[0], torch.zeros(48))  # cls row
    torch.testing.assert_close(table[1:], torch.from_numpy(sincos_3d_uniform(48, 2, 4, 4)))


def test_video_encoder_never_sees_hidden_tubelets():
    enc = tiny_video_encoder(seed=None, model_kwargs=VIDEO_VIT).eval()
    x = torch.randn(1, 3, 4, 16, 16)
    visible = torch.tensor([[0, 5, 17, 30]])  # tubelets (t, y, x) in a (2, 4, 4) grid
    out = enc(x, visible)
    hidden = 6  # t=0, y=1, x=2
    y = x.clone()
    y[:, :, 0:2, 4:8, 8:12] += 5.0  # perturb only that tubelet's pixels
    torch.testing.assert_close(enc(y, visible), out, rtol=0, atol=0)
    z = x.clone()
    z[:, :, 2:4, 0:4, 4:8] += 5.0  # tubelet 17 = (1, 0, 1) is visible
    assert not torch.allclose(enc(z, visible), out)
    assert hidden not in visible


def test_pixel_target_on_video_matches_formula():
    enc = tiny_video_encoder(model_kwargs=VIDEO_VIT)
    target = PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
    target.bind(enc)
    x = torch.randn(2, 3, 4, 16, 16)
    masks = RandomMasking(mask_ratio=0.75)(
        2, enc.grid, generator=torch.Generator().manual_seed(1), device=torch.device("cpu")
    )
    latent = enc(x, masks.visible)
    loss = target({"video": x}, masks, latent, enc)["loss"]
    pred = target.decoder(latent, masks.visible).detach().double().numpy()  # (B, N, P)
    tgt = norm_pix_reference(tubelets_loop(x.double().numpy(), 2, 4, 4))
    hidden = masks.hidden.numpy()
    per_token = ((pred - tgt) ** 2).mean(-1)
    expected = (per_token * hidden).sum() / hidden.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_video_config_errors():
    with pytest.raises(ValueError, match="tubelet_size"):
        tiny_video_encoder(seed=None, model_kwargs=VIDEO_VIT, num_frames=5, tubelet_size=2)
    with pytest.raises(ValueError, match="tubelet_size"):
        tiny_video_encoder(seed=None, model_kwargs=VIDEO_VIT, num_frames=1, tubelet_size=2)
    with pytest.raises(ValueError, match="clips"):
        tiny_video_encoder(seed=None, model_kwargs=VIDEO_VIT)(torch.randn(1, 3, 2, 16, 16))


def test_mae_on_clips_trains():
    module = PretrainModule(
        encoder=tiny_video_encoder(model_kwargs=VIDEO_VIT),
        masking=RandomMasking(mask_ratio=0.9),
        targets=[PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=2)],
        blr=1e-2,
        warmup_steps=2,
        batch_size=4,
    )
    record = LossRecorder()
    cpu_trainer(max_steps=24, callbacks=[record]).fit(module, DataLoader(ClipDataset(noise=0.1), batch_size=4))
    losses = record.losses
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4


def test_video_debug_recipe_trains_on_real_clips(real_clips, tmp_path):
    """`recipes/debug/mae_video.yaml` end to end on the real H.264 clips: decode, tubelets, masking, decoder."""
    from pathlib import Path

    from mim.lightning_cli import build

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "debug" / "mae_video.yaml"
    cli = build(
        [
            "--config",
            str(recipe),
            f"--data.init_args.root={real_clips}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=3",
            "--trainer.enable_progress_bar=false",
        ],
        save_config_callback=None,
    )
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert batch["video"].shape == (4, 3, 4, 32, 32)  # 2 videos x 2 repeats, normalised float
            assert batch["video"].dtype == torch.float32
            losses.append(float(outputs["loss"]))
            # tube masking: the same 4 of 16 spatial positions are visible in both time slots
            masks = pl_module.draw_masks(batch, torch.Generator().manual_seed(batch_idx))
            visible = masks.visible.view(4, 2, 4)  # (B, T, K_s)
            assert torch.equal(visible[:, 1] - 16, visible[:, 0])

    cli.trainer.callbacks.append(Record())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(losses) == 6  # 4 clips / batch 2 = 2 steps per epoch, 3 epochs
    assert all(np.isfinite(losses))
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), map_location="cpu", weights_only=True)
    assert ckpt["mim"]["encoder"]["num_frames"] == 4 and ckpt["mim"]["encoder"]["tubelet_size"] == 2
