"""RunPictures: pictures at the configured steps, their layout and pixels, the per-token loss, and no effect on training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mim.callbacks import RunPictures
from mim.callbacks.run_pictures import GREY, picture_size
from mim.masking import HardPatchMasking, RandomMasking
from mim.module import PretrainModule
from mim.targets import HardPatchTarget, LatentTarget, PixelTarget
from mim.viz import render_masks
from tests.factories import TINY_VIT, LossRecorder, cpu_trainer, tiny_encoder, tiny_video_encoder

CPU = torch.device("cpu")
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


class _Samples(Dataset):
    def __init__(self, key: str, x: torch.Tensor) -> None:
        self.key, self.x = key, x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {self.key: self.x[i]}


class _Data(L.LightningDataModule):
    """16 seeded uint8 images (or clips of 4 frames) of 16 x 16, normalised with MEAN / STD; in order, batches of 4."""

    def __init__(self, *, video: bool = False, batch_size: int = 4) -> None:
        super().__init__()
        self.mean, self.std, self.batch_size = MEAN, STD, batch_size
        shape = (16, 3, 4, 16, 16) if video else (16, 3, 16, 16)
        self.raw = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        view = (1, 3, 1, 1, 1) if video else (1, 3, 1, 1)
        mean, std = torch.tensor(MEAN).view(view), torch.tensor(STD).view(view)
        self.x = (self.raw.float() / 255 - mean) / std
        self.key = "video" if video else "image"

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Samples(self.key, self.x), batch_size=self.batch_size, shuffle=False, drop_last=True)


def _pixel_module(**target_kwargs: Any) -> PretrainModule:
    target = PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=4, **target_kwargs)
    return PretrainModule(
        encoder=tiny_encoder(), masking=RandomMasking(mask_ratio=0.75), targets=[target], lr=1e-3, warmup_steps=1
    )


def _fit(module: PretrainModule, root: Path, steps: int, callbacks: list, data: _Data | None = None, **kw) -> None:
    cpu_trainer(default_root_dir=root, max_steps=steps, callbacks=callbacks, **kw).fit(
        module, datamodule=data or _Data()
    )


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "pictures").iterdir())


def _panel(img: np.ndarray, row: int, col: int, h: int, w: int, scale: int, gap: int) -> np.ndarray:
    """Panel (row, col) of a picture, shrunk back to (h, w, 3)."""
    x, y = gap + col * (w * scale + gap), gap + row * (h * scale + gap)
    return img[y : y + h * scale : scale, x : x + w * scale : scale]


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="RunPictures.every_n_steps must be an integer >= 0"):
        RunPictures(every_n_steps=-1)
    with pytest.raises(ValueError, match="RunPictures.num_samples must be an integer >= 1"):
        RunPictures(num_samples=0)
    with pytest.raises(ValueError, match="RunPictures.scale"):
        RunPictures(scale=0)
    with pytest.raises(ValueError, match="RunPictures.every_n_steps"):
        RunPictures(every_n_steps=True)
    assert RunPictures(every_n_steps=None).every_n_steps == 0


def test_picture_size_formula():
    assert picture_size(2, 3, 16, 16, scale=2, gap=3) == (3 + 3 * 35, 3 + 2 * 35)
    assert picture_size(8, 12, 16, 16, scale=1, gap=0) == (12 * 16, 8 * 16)


def test_pixel_pictures_at_the_steps_with_exact_panels(tmp_path: Path):
    pictures = RunPictures(every_n_steps=2, num_samples=3, scale=2, gap=3)
    module = _pixel_module()
    data = _Data()
    _fit(module, tmp_path, 5, [pictures], data)
    assert _files(tmp_path) == [f"step_{n}_{k}.png" for n in (2, 4) for k in ("reconstruction", "token_loss")]
    img = np.asarray(Image.open(tmp_path / "pictures" / "step_4_reconstruction.png").convert("RGB"))
    assert (img.shape[1], img.shape[0]) == picture_size(3, 3, 16, 16, scale=2, gap=3) == (108, 108)
    # the same masks as the callback's: its generator path on its fixed batch (the first 3 samples)
    assert torch.equal(pictures.batch["image"], data.x[:3])
    masks = module.draw_masks(pictures.batch, module.generator(CPU, -3, 0, 0))
    hidden = module.encoder.unpatchify(masks.hidden[..., None].expand(-1, -1, 48).float())[:, 0] > 0.5  # (S, H, W)
    for s in range(3):
        given = _panel(img, s, 0, 16, 16, 2, 3)
        masked, rebuilt = _panel(img, s, 1, 16, 16, 2, 3), _panel(img, s, 2, 16, 16, 2, 3)
        assert np.array_equal(given, data.raw[s].permute(1, 2, 0).numpy())  # exact un-normalisation
        h = hidden[s].numpy()
        assert h.sum() == 12 * 16  # 12 of 16 patches of 4 x 4 hidden
        assert np.array_equal(rebuilt[~h], given[~h])
        assert np.array_equal(masked[~h], given[~h])
        assert (masked[h] == GREY).all()
        assert not np.array_equal(rebuilt[h], given[h])  # predictions, not the input
    hist = Image.open(tmp_path / "pictures" / "step_4_token_loss.png")
    assert hist.size == (34 * 8, 128 + 40)


def _drop_path_module(target: str) -> PretrainModule:
    """Drop path draws from torch's global generator in train mode: a callback that left the module in eval mode or
    drew from the global generator would change the losses."""
    encoder = tiny_encoder(drop_path_rate=0.5)
    if target == "pixel":
        parts = dict(masking=RandomMasking(mask_ratio=0.75), targets=[PixelTarget(decoder_dim=32, decoder_depth=1)])
    else:
        parts = dict(masking=HardPatchMasking(), targets=[HardPatchTarget(decoder_dim=32, decoder_depth=1)])
    return PretrainModule(encoder=encoder, lr=1e-3, warmup_steps=1, **parts)


@pytest.mark.parametrize("target", ["pixel", "hard_patch"])
def test_training_is_unchanged_by_the_pictures(tmp_path: Path, target: str):
    losses, states = [], []
    for callbacks in ([], [RunPictures(every_n_steps=1, num_samples=2)]):
        record = LossRecorder()
        module = _drop_path_module(target)
        _fit(module, tmp_path / str(len(callbacks)), 4, [record, *callbacks])
        losses.append(record.losses)
        states.append(module.state_dict())
        assert module.training and all(m.training for m in module.encoder.modules())
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert states[0].keys() == states[1].keys()
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]) if isinstance(v, torch.Tensor) else v == states[1][k], k
    kinds = ("reconstruction", "token_loss") if target == "pixel" else ("hardness", "reconstruction", "token_loss")
    assert _files(tmp_path / "1") == [f"step_{n}_{k}.png" for n in range(1, 5) for k in kinds]


class _FakeRun:
    id, name = "fake", "fake"

    def __init__(self) -> None:
        self.config = SimpleNamespace(update=lambda *a, **k: None)
        self.logged: list[dict] = []

    def log(self, data: dict) -> None:
        self.logged.append(data)


def test_token_loss_is_the_per_patch_mse_and_reaches_wandb(tmp_path: Path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    seen = []
    monkeypatch.setattr(wandb, "Histogram", lambda values: seen.append(np.array(values)) or "histogram")
    run = _FakeRun()
    logger = WandbLogger(experiment=run, save_dir=str(tmp_path))
    pictures = RunPictures(every_n_steps=3, num_samples=4)
    module = _pixel_module()
    _fit(module, tmp_path, 3, [pictures], logger=logger)
    # independently: norm-pix targets (unbiased variance, eps 1e-6) against the decoder's prediction of all tokens
    module.eval()
    with torch.no_grad():
        x = pictures.batch["image"]
        masks = module.draw_masks(pictures.batch, module.generator(CPU, -3, 0, 0))
        latent = module.encoder(x, masks.visible)
        pred = module.target_list[0].decoder(latent, masks.visible).float()
        p = module.encoder.patchify(x)
        target = (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True, unbiased=True) + 1e-6).sqrt()
        expected = (pred - target).pow(2).mean(-1).gather(1, masks.targets.flatten(1))
    assert pictures.token_losses.shape == (4, 12)
    assert torch.equal(pictures.token_losses, expected)
    assert len(seen) == 1 and np.array_equal(seen[0], expected.flatten().numpy())
    logged = [d for d in run.logged if any(k.startswith(("pictures/", "histograms/")) for k in d)]
    assert [sorted(d) for d in logged] == [
        ["pictures/reconstruction", "trainer/global_step"],
        ["pictures/token_loss", "trainer/global_step"],
        ["histograms/token_loss", "trainer/global_step"],
    ]
    assert logged[-1]["histograms/token_loss"] == "histogram" and all(d["trainer/global_step"] == 3 for d in logged)
    assert _files(tmp_path) == ["step_3_reconstruction.png", "step_3_token_loss.png"]


def test_video_strip(tmp_path: Path):
    target = PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=4, norm_pix_mode="channel")
    module = PretrainModule(encoder=tiny_video_encoder(), masking=RandomMasking(mask_ratio=0.75), targets=[target])
    pictures = RunPictures(every_n_steps=1, num_samples=2, gap=1)
    data = _Data(video=True)
    _fit(module, tmp_path, 1, [pictures], data)
    assert _files(tmp_path) == ["step_1_reconstruction.png", "step_1_token_loss.png"]
    img = np.asarray(Image.open(tmp_path / "pictures" / "step_1_reconstruction.png").convert("RGB"))
    assert (img.shape[1], img.shape[0]) == picture_size(2, 3 * 4, 16, 16, scale=1, gap=1) == (205, 35)
    masks = module.draw_masks(pictures.batch, module.generator(CPU, -3, 0, 0))
    hidden = module.encoder.unpatchify(masks.hidden[..., None].expand(-1, -1, 96).float())[:, 0] > 0.5  # (S,T,H,W)
    for s in range(2):
        for t in range(4):
            given = _panel(img, s, t, 16, 16, 1, 1)
            assert np.array_equal(given, data.raw[s, :, t].permute(1, 2, 0).numpy())
            h = hidden[s, t].numpy()
            assert (_panel(img, s, 4 + t, 16, 16, 1, 1)[h] == GREY).all()
            assert np.array_equal(_panel(img, s, 8 + t, 16, 16, 1, 1)[~h], given[~h])


def test_hard_patch_hardness_map(tmp_path: Path):
    target = HardPatchTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=4, ema_ramp=0.5)
    module = PretrainModule(encoder=tiny_encoder(), masking=HardPatchMasking(), targets=[target], warmup_steps=1)
    pictures = RunPictures(every_n_steps=2, num_samples=2, gap=0)
    _fit(module, tmp_path, 2, [pictures])
    assert _files(tmp_path) == ["step_2_hardness.png", "step_2_reconstruction.png", "step_2_token_loss.png"]
    img = np.asarray(Image.open(tmp_path / "pictures" / "step_2_hardness.png").convert("RGB"))
    assert (img.shape[1], img.shape[0]) == picture_size(2, 2, 16, 16, scale=1, gap=0) == (32, 32)
    module.eval()
    scores = target.token_scores(pictures.batch, module.encoder)  # (S, N)
    for s in range(2):
        heat = img[:16, 16:] if s == 0 else img[16:, 16:]
        cells = heat[::4, ::4].reshape(16, 3)  # one pixel per token, raster order
        # the hardest token is the brightest colour, the easiest the darkest
        assert tuple(cells[int(scores[s].argmax())]) == (252, 255, 164)
        assert tuple(cells[int(scores[s].argmin())]) == (0, 0, 4)


def test_masks_for_other_targets(tmp_path: Path):
    target = LatentTarget(predictor_dim=32, predictor_depth=1, monitor_every=1)
    encoder = tiny_encoder(model_kwargs={**TINY_VIT, "class_token": False, "global_pool": "avg", "fc_norm": False})
    module = PretrainModule(encoder=encoder, masking=RandomMasking(mask_ratio=0.75), targets=[target])
    pictures = RunPictures(every_n_steps=1, num_samples=3)
    _fit(module, tmp_path, 1, [pictures])
    assert _files(tmp_path) == ["step_1_masks.png"] and pictures.token_losses is None
    masks = module.draw_masks(pictures.batch, module.generator(CPU, -3, 0, 0))
    expected = np.asarray(render_masks(masks, module.encoder.grid, title="step 1: masks"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pictures" / "step_1_masks.png").convert("RGB")), expected)


def test_off(tmp_path: Path):
    for every in (0, None):
        pictures = RunPictures(every_n_steps=every)
        _fit(_pixel_module(), tmp_path, 2, [pictures])
        assert not (tmp_path / "pictures").exists() and pictures.batch is None


def test_accumulation_draws_once_per_optimizer_step_into_the_csv_log_dir(tmp_path: Path):
    from lightning.pytorch.loggers import CSVLogger

    pictures = RunPictures(every_n_steps=1, num_samples=2)
    _fit(_pixel_module(), tmp_path, 2, [pictures], accumulate_grad_batches=2, logger=CSVLogger(tmp_path))
    assert _files(tmp_path / "lightning_logs" / "version_0") == [
        f"step_{n}_{k}.png" for n in (1, 2) for k in ("reconstruction", "token_loss")
    ]
