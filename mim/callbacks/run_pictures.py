"""RunPictures: pictures of the run every N optimizer steps (reconstructions, masks, hardness, per-token loss).

The reconstruction layout is MAE's visualisation (He et al., "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022, Fig. 2; official demo facebookresearch/mae ``demo/mae_visualize.ipynb``): per sample, ``input | masked
input | reconstruction``, the reconstruction being the prediction pasted into the hidden patches with the visible ones
taken from the input, predictions de-normalised per patch with the true patch's mean and std under norm-pix.

Everything is drawn from a fixed batch (the first ``num_samples`` samples of the first training batch seen, kept on
the device) with masks from the module's own generator path seeded with the tag ``-3`` (validation uses ``-1``,
test ``-2``), in eval mode under ``torch.no_grad()``; only explicit generators are used, so a run with the callback
trains exactly as one without it. Under FSDP2 and DeepSpeed ZeRO-3 every rank runs the same picture forward on its own
fixed batch (the parameters are gathered by collectives that every rank must join); rank 0 alone saves and logs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from mim.checks import check_int
from mim.targets.pixels import PixelTarget
from mim.types import Batch
from mim.viz import BACKGROUND, BAR, CAPTION_FONT_SIZE, TEXT, render_masks

__all__ = ["GREY", "HEAT_COLOURS", "RunPictures", "heat_colours", "picture_size"]

GREY = 128
"""uint8 value of every channel of a hidden pixel in the masked-input panel."""
HEAT_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 4),
    (87, 16, 110),
    (188, 55, 84),
    (249, 142, 9),
    (252, 255, 164),
)
"""Anchors of the hardness colour map (inferno-like), from easiest (0) to hardest (1), interpolated linearly."""
MAX_FRAMES = 4
"""Time steps of a video drawn in a strip."""
HIST_BINS, HIST_BAR, HIST_HEIGHT = 32, 8, 128
"""Histogram picture: bins, pixels per bin, pixels of the bar area."""


def picture_size(rows: int, cols: int, panel_h: int, panel_w: int, *, scale: int, gap: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of ``rows`` x ``cols`` panels of ``panel_h`` x ``panel_w`` pixels.

    Each panel is enlarged ``scale`` times (nearest neighbour); ``gap`` white pixels surround every panel:
    ``width = gap + cols (panel_w scale + gap)``, ``height = gap + rows (panel_h scale + gap)``. Panel ``(r, c)``
    starts at ``x = gap + c (panel_w scale + gap)``, ``y = gap + r (panel_h scale + gap)``.
    """
    return gap + cols * (panel_w * scale + gap), gap + rows * (panel_h * scale + gap)


def _grid_picture(panels: np.ndarray, *, scale: int, gap: int) -> Image.Image:
    """(R, K, h, w, 3) uint8 panels -> the RGB picture of :func:`picture_size` (rows R, columns K)."""
    rows, cols, h, w, _ = panels.shape
    width, height = picture_size(rows, cols, h, w, scale=scale, gap=gap)
    img = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    big = panels.repeat(scale, axis=2).repeat(scale, axis=3)  # (R, K, h s, w s, 3)
    for r in range(rows):
        for c in range(cols):
            x, y = gap + c * (w * scale + gap), gap + r * (h * scale + gap)
            img[y : y + h * scale, x : x + w * scale] = big[r, c]
    return Image.fromarray(img)


def heat_colours(values: Tensor) -> Tensor:
    """Map values in [0, 1] to RGB through :data:`HEAT_COLOURS` (piecewise linear).

    Args:
        values: (...) floats in [0, 1] (clamped).

    Returns:
        (..., 3) uint8.
    """
    anchors = torch.tensor(HEAT_COLOURS, dtype=torch.float32, device=values.device)  # (A, 3)
    pos = values.float().clamp(0, 1) * (len(HEAT_COLOURS) - 1)  # (...)
    lo = pos.floor().long().clamp(max=len(HEAT_COLOURS) - 2)  # (...)
    frac = (pos - lo).unsqueeze(-1)  # (..., 1)
    rgb = anchors[lo] * (1 - frac) + anchors[lo + 1] * frac  # (..., 3)
    return rgb.round().to(torch.uint8)


def _to_rgb(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Un-normalise and convert to uint8 RGB.

    Args:
        images: (S, C, F, H, W) normalised float (F frames; F = 1 for images).
        mean: (C,) per-channel means of the [0, 1] pixels.
        std: (C,) per-channel standard deviations.

    Returns:
        (S, F, H, W, 3) uint8: ``round(clamp(x std + mean, 0, 1) 255)``; one channel repeated as grey, more than
        three: the first three.
    """
    x = images.float() * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)  # (S, C, F, H, W)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)  # (S, C, F, H, W)
    x = x.expand(-1, 3, -1, -1, -1) if x.shape[1] == 1 else x[:, :3]  # (S, 3, F, H, W)
    return x.permute(0, 2, 3, 4, 1)  # (S, F, H, W, 3)


def _frames(x: Tensor) -> Tensor:
    """(S, C, H, W) -> (S, C, 1, H, W); (S, C, T, H, W) -> its first :data:`MAX_FRAMES` time steps."""
    return x.unsqueeze(2) if x.dim() == 4 else x[:, :, :MAX_FRAMES]


def _histogram_picture(values: Tensor, title: str) -> Image.Image:
    """A bar chart of ``values`` (any shape) in :data:`HIST_BINS` equal bins between their min and max.

    The picture is ``HIST_BINS HIST_BAR + 2 HIST_BAR`` pixels wide and ``HIST_HEIGHT + 40`` high: a caption line
    (``title``, min, max) on top, bars whose heights are proportional to the counts (the fullest bin is
    ``HIST_HEIGHT`` pixels high).
    """
    v = values.detach().float().flatten().cpu()
    lo, hi = float(v.min()), float(v.max())
    counts = torch.histc(v, bins=HIST_BINS, min=lo, max=hi if hi > lo else lo + 1)  # (bins,)
    width, height = (HIST_BINS + 2) * HIST_BAR, HIST_HEIGHT + 40
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    try:
        font: Any = ImageFont.load_default(size=CAPTION_FONT_SIZE)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw.text((HIST_BAR, 2), f"{title}  [{lo:.3g}, {hi:.3g}]", fill=TEXT, font=font)
    base = height - 8
    top = float(counts.max()) or 1.0
    for i, c in enumerate(counts.tolist()):
        h = round(HIST_HEIGHT * c / top)
        if h:
            x = HIST_BAR * (i + 1)
            draw.rectangle((x, base - h, x + HIST_BAR - 2, base - 1), fill=BAR)
    return img


def _save_png(picture: Image.Image, path: Path) -> None:
    """Write ``picture`` as PNG atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_HOLD = -7  # a submodule id no DeepSpeed module has: marks parameters held whole for the pictures


@contextlib.contextmanager
def _gathered(trainer: L.Trainer, module: Any) -> Iterator[None]:
    """Within: the parameters of a sharded module whole on every rank (a collective: every rank enters together).

    FSDP2: the root unit is unsharded (the blocks gather in their own forward hooks), every unit resharded after.
    DeepSpeed ZeRO-3: every parameter is gathered (``deepspeed.zero.GatheredParameters``: the picture code also reads
    parameters outside their module's forward, which ZeRO-3's hooks would not fetch) and held whole until the end
    (marked as in use by a submodule, in DeepSpeed's ``ds_active_sub_modules``, so that the post-forward hooks of the
    modules run in between do not release them). Otherwise nothing happens.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]  # the module itself first, if it is one
    if units and units[0] is module:
        units[0].unshard()
        try:
            yield
        finally:  # every unit, as after a training step (blocks with reshard_after_forward=False stay gathered)
            for unit in units:
                unit.reshard()
    elif getattr(trainer.strategy, "zero_stage_3", False) is True:
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            held = [p for p in params if isinstance(getattr(p, "ds_active_sub_modules", None), set)]
            for p in held:  # ZeRO-3's post-forward hooks release a parameter no active submodule holds
                p.ds_active_sub_modules.add(_HOLD)
            try:
                yield
            finally:
                for p in held:
                    p.ds_active_sub_modules.discard(_HOLD)
    else:
        yield


class RunPictures(L.Callback):
    """Pictures of the run every ``every_n_steps`` optimizer steps, drawn and logged on global rank 0.

    At step N (``trainer.global_step`` after the N-th optimizer step, N a multiple of ``every_n_steps``) it writes
    ``<trainer.log_dir>/pictures/step_<N>_<kind>.png`` (``trainer.log_dir`` is ``default_root_dir`` without a
    logger), logs the pictures to every logger with ``log_image`` under ``pictures/<kind>``, and logs
    ``histograms/token_loss`` as a ``wandb.Histogram`` to a :class:`~lightning.pytorch.loggers.WandbLogger`.
    Kinds:

    * ``reconstruction`` (a :class:`~mim.targets.PixelTarget`, e.g. :class:`~mim.targets.HardPatchTarget`): one row
      per sample, panels ``input | masked input | reconstruction`` (MAE's layout; hidden pixels :data:`GREY` in the
      masked input). A video panel is a strip of its first :data:`MAX_FRAMES` frames, so a row has ``3 F``
      panels of one frame. Pixel size: :func:`picture_size` with ``rows = num_samples``, ``cols = 3 F`` and a panel
      of ``grid.h ph x grid.w pw`` pixels (image size). Images are un-normalised with the datamodule's ``mean`` and
      ``std`` (0 and 1 if it has none).
    * ``token_loss`` (pixel targets): a bar chart of the per-token squared error (mean over the P values of each
      patch, against the target patches, norm-pix applied as in training) of the hidden tokens of the batch; the
      values of the last picture are in :attr:`token_losses`.
    * ``masks`` (no pixel target): :func:`mim.viz.render_masks` of the masks, titled with the step; with several mask
      sets per step (V-JEPA) also ``masks_set1``, ...
    * ``hardness`` (a target with token scores, such as HPM's teacher): rows ``input | hardness`` (``2 F`` panels
      of one frame), the predicted difficulty of each token min-max scaled per sample and coloured with
      :data:`HEAT_COLOURS` (dark: easy, bright: hard) over the token's pixels.

    The fixed batch is the first ``num_samples`` samples of the first training batch the callback sees (after a
    resume: the first batch of the resumed run), kept on the device. Masks come from
    ``pl_module.draw_masks(batch, pl_module.generator(device, -3, 0, 0))``; the forward runs under
    ``torch.no_grad()`` with the module in eval mode (each submodule's mode is restored). Under strategies that shard
    the parameters (FSDP2 ``ModelParallelStrategy``, DeepSpeed ZeRO-3) every rank keeps its own fixed batch and runs
    the same forward at the same steps, so the collectives that gather the parameters line up (FSDP2: the root unit
    is unsharded around it, the blocks gather in their own hooks); only rank 0 saves and logs. Lightning's older
    ``FSDPStrategy`` (flat parameters) is not supported: there the callback warns once and draws nothing.

    Args:
        every_n_steps: optimizer steps between pictures; 0 or None: off.
        num_samples: samples drawn (at most the batch size).
        scale: integer enlargement of image panels (nearest neighbour).
        gap: white pixels around every panel.
    """

    def __init__(self, *, every_n_steps: int | None = 500, num_samples: int = 8, scale: int = 1, gap: int = 2) -> None:
        super().__init__()
        owner = "RunPictures"
        self.every_n_steps = 0 if every_n_steps is None else check_int(owner, "every_n_steps", every_n_steps, minimum=0)
        self.num_samples = check_int(owner, "num_samples", num_samples)
        self.scale = check_int(owner, "scale", scale)
        self.gap = check_int(owner, "gap", gap, minimum=0)
        self.batch: Batch | None = None
        self.directory: Path | None = None
        self.token_losses: Tensor | None = None
        self._last_step = -1
        self._disabled = False
        self._every_rank = False

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Resolve the picture folder on every rank (``trainer.log_dir`` is a collective call) and whether every rank
        joins the picture forward (sharded parameters)."""
        if stage != "fit" or not self.every_n_steps:
            return
        root = trainer.log_dir or trainer.default_root_dir
        self.directory = Path(root) / "pictures"
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        strategy = trainer.strategy
        self._every_rank = (
            isinstance(strategy, ModelParallelStrategy) or getattr(strategy, "zero_stage_3", False) is True
        )
        if isinstance(strategy, FSDPStrategy):
            rank_zero_warn(
                f"RunPictures: the {type(strategy).__name__} strategy flattens the model's parameters, so no pictures "
                "are drawn; use mim.distributed.FSDP2Strategy (recipes/_base/fsdp.yaml), where they are"
            )
            self._disabled = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.every_n_steps or self._disabled or not (trainer.is_global_zero or self._every_rank):
            return
        if self.batch is None:
            self.batch = self._first_samples(batch)
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        self.draw(trainer, pl_module, step)

    # ------------------------------------------------------------------ drawing
    def _first_samples(self, batch: Batch) -> Batch:
        """The first ``num_samples`` of every tensor entry (a detached copy on the same device)."""
        return {k: (v[: self.num_samples].detach().clone() if isinstance(v, Tensor) else v) for k, v in batch.items()}  # type: ignore[return-value]

    def _stats(self, trainer: L.Trainer, channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(C,) mean and std of the datamodule (0 and 1 without them)."""
        data = getattr(trainer, "datamodule", None)
        mean, std = getattr(data, "mean", None), getattr(data, "std", None)
        if mean is None or std is None:
            mean, std = (0.0,) * channels, (1.0,) * channels
        as_t = lambda v: torch.as_tensor(v, dtype=torch.float32, device=device).flatten()  # noqa: E731
        return as_t(mean), as_t(std)

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, Image.Image]:
        """Render every picture of ``step`` and, on rank 0, save and log them; returns them by kind.

        With sharded parameters every rank calls this at the same step (see the class docstring)."""
        assert self.batch is not None and self.directory is not None
        batch, module = self.batch, pl_module
        modes = {m: m.training for m in module.modules()}
        module.eval()
        try:
            with _gathered(trainer, module), trainer.strategy.precision_plugin.forward_context():
                pictures = self._render(trainer, module, batch, step)
        finally:
            for m, mode in modes.items():
                m.training = mode
        if not trainer.is_global_zero:
            return pictures
        for kind, picture in pictures.items():
            path = self.directory / f"step_{step}_{kind}.png"
            _save_png(picture, path)
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key=f"pictures/{kind}", images=[picture], step=step)
        if self.token_losses is not None and "token_loss" in pictures:
            self._log_histogram(trainer, self.token_losses, step)
        return pictures

    def _render(self, trainer: L.Trainer, module: Any, batch: Batch, step: int) -> dict[str, Image.Image]:
        encoder = module.encoder
        inputs = module.inputs(batch)  # (S, C, H, W) or (S, C, T, H, W)
        gen = module.generator(inputs.device, -3, 0, 0)
        masks = module.draw_masks(batch, gen, inputs)
        targets = module.target_list
        pictures: dict[str, Image.Image] = {}
        pixel = next((t for t in targets if isinstance(t, PixelTarget)), None)
        if pixel is not None:
            mean, std = self._stats(trainer, inputs.shape[1], inputs.device)
            latent = encoder(inputs, masks.visible)  # (S, prefix+K, D)
            recon = pixel.reconstruct(batch, masks, latent, encoder)  # like inputs
            patches = encoder.patchify(inputs)  # (S, N, P)
            hidden_px = encoder.unpatchify(masks.hidden.unsqueeze(-1).expand_as(patches).to(patches.dtype)) > 0.5
            shown = _to_rgb(_frames(inputs), mean, std)  # (S, F, H, W, 3)
            masked = shown.clone()
            masked[_frames(hidden_px)[:, 0]] = GREY  # (S, F, H, W) mask over every channel
            rebuilt = _to_rgb(_frames(recon), mean, std)  # (S, F, H, W, 3)
            panels = torch.cat([shown, masked, rebuilt], dim=1)  # (S, 3F, H, W, 3)
            pictures["reconstruction"] = _grid_picture(panels.cpu().numpy(), scale=self.scale, gap=self.gap)
            pred = pixel._decoder()(latent, masks.visible).float()  # (S, N, P)
            target = pixel.target_patches(inputs, encoder)  # (S, N, P)
            per_token = (pred - target).pow(2).mean(dim=-1)  # (S, N)
            self.token_losses = per_token.gather(1, masks.targets.flatten(1)).cpu()  # (S, M*T) hidden tokens
            pictures["token_loss"] = _histogram_picture(self.token_losses, f"step {step}: per-token MSE")
        else:  # every mask set of the step (V-JEPA: two): masks, masks_set1, ...
            for one in masks.sets:
                of = f" (set {one.set_index + 1} of {one.num_sets})" if one.num_sets > 1 else ""
                key = f"masks_set{one.set_index}" if one.set_index else "masks"
                pictures[key] = render_masks(one, encoder.grid, title=f"step {step}: masks{of}")
        scores = next((s for s in (t.token_scores(batch, encoder) for t in targets) if s is not None), None)
        if scores is not None and hasattr(encoder, "unpatchify"):
            pictures["hardness"] = self._hardness(trainer, encoder, inputs, scores)
        return pictures

    def _hardness(self, trainer: L.Trainer, encoder: Any, inputs: Tensor, scores: Tensor) -> Image.Image:
        """Rows ``input | hardness``: (S, N) scores min-max scaled per sample, coloured over each token's pixels."""
        mean, std = self._stats(trainer, inputs.shape[1], inputs.device)
        lo, hi = scores.min(dim=1, keepdim=True).values, scores.max(dim=1, keepdim=True).values  # (S, 1)
        scaled = (scores - lo) / (hi - lo).clamp_min(torch.finfo(scores.dtype).tiny)  # (S, N)
        patches = encoder.patchify(inputs)  # (S, N, P)
        per_px = encoder.unpatchify(scaled.unsqueeze(-1).expand_as(patches).to(patches.dtype))  # like inputs
        heat = heat_colours(_frames(per_px)[:, 0])  # (S, F, H, W, 3)
        panels = torch.cat([_to_rgb(_frames(inputs), mean, std), heat], dim=1)  # (S, 2F, H, W, 3)
        return _grid_picture(panels.cpu().numpy(), scale=self.scale, gap=self.gap)

    def _log_histogram(self, trainer: L.Trainer, values: Tensor, step: int) -> None:
        """``histograms/token_loss`` as a ``wandb.Histogram`` to each WandbLogger, on its ``trainer/global_step`` axis.

        Logged through ``logger.log_metrics`` (as ``log_image`` does) rather than ``experiment.log(step=...)``:
        Lightning steps wandb by ``trainer/global_step``, and wandb drops data logged with a lower own ``step``.
        """
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover - lightning always ships it
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        histogram = wandb.Histogram(values.flatten().tolist())
        for logger in loggers:
            logger.log_metrics({"histograms/token_loss": histogram}, step=step)  # type: ignore[dict-item]
