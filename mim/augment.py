"""Batch augmentations of fine-tuning that run on the device: Mixup / CutMix with label smoothing, random erasing.

MAE's fine-tuning recipe (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Appendix A.2;
facebookresearch/mae main_finetune.py) uses timm's ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
switch_prob=0.5, mode="batch", label_smoothing=0.1)`` and ``RandomErasing(0.25, mode="pixel")``. These are the same
operations re-implemented for mim: one lambda per batch, the partner of sample ``i`` is sample ``B - 1 - i`` (the
flipped batch), CutMix cuts one box through the last two axes (so a clip (B, C, T, H, W) gets the same box in every
frame), and the mixed target is ``lam * smooth(y) + (1 - lam) * smooth(y_flipped)``. The random draws come from a
host-side ``random.Random`` the caller seeds per step, so a resumed run replays them and nothing syncs the device.
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

from mim.checks import check_int, check_range

__all__ = ["MixupCutmix", "random_erase", "smooth_one_hot"]


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """(B,) int64 -> (B, num_classes) float: ``1 - smoothing + smoothing / K`` on the label, ``smoothing / K`` elsewhere."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)  # (B, K)


def _box(rng: random.Random, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box of area ``(1 - lam) * H * W`` centred uniformly (clipped at the borders): (y0, y1, x0, x1)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    return max(cy - ch // 2, 0), min(cy + ch // 2, height), max(cx - cw // 2, 0), min(cx + cw // 2, width)


class MixupCutmix:
    """Mixup and CutMix on a batch, with label smoothing (timm's ``Mixup`` in ``batch`` mode).

    Args:
        num_classes: K.
        mixup_alpha: Beta(alpha, alpha) for Mixup's lambda; 0 disables Mixup.
        cutmix_alpha: Beta(alpha, alpha) for CutMix's lambda; 0 disables CutMix.
        prob: probability that a batch is mixed at all.
        switch_prob: probability of CutMix instead of Mixup when both are enabled.
        label_smoothing: smoothing of the one-hot targets (MAE: 0.1).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        owner = "MixupCutmix"
        self.num_classes = check_int(owner, "num_classes", num_classes, minimum=2)
        self.mixup_alpha = check_range(owner, "mixup_alpha", mixup_alpha, 0, math.inf)
        self.cutmix_alpha = check_range(owner, "cutmix_alpha", cutmix_alpha, 0, math.inf)
        self.prob = check_range(owner, "prob", prob, 0, 1)
        self.switch_prob = check_range(owner, "switch_prob", switch_prob, 0, 1)
        self.label_smoothing = check_range(owner, "label_smoothing", label_smoothing, 0, 1, high_open=True)

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, rng: random.Random) -> tuple[str, float]:
        """(``none`` | ``mixup`` | ``cutmix``, lambda) for one batch."""
        if not self.enabled or rng.random() >= self.prob:
            return "none", 1.0
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        if use_cutmix:
            return "cutmix", rng.betavariate(self.cutmix_alpha, self.cutmix_alpha)
        return "mixup", rng.betavariate(self.mixup_alpha, self.mixup_alpha)

    def __call__(self, x: Tensor, labels: Tensor, rng: random.Random) -> tuple[Tensor, Tensor]:
        """Mix a batch.

        Args:
            x: (B, C, H, W) or (B, C, T, H, W) normalised inputs (not modified).
            labels: (B,) int64.
            rng: the step's host-side generator.

        Returns:
            (mixed inputs, same shape; soft targets (B, K) summing to 1).
        """
        kind, lam = self.draw(rng)
        if kind == "cutmix":
            y0, y1, x0, x1 = _box(rng, x.shape[-2], x.shape[-1], lam)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (x.shape[-2] * x.shape[-1])  # the area actually cut
        elif kind == "mixup":
            x = x * lam + x.flip(0) * (1.0 - lam)
        target = smooth_one_hot(labels, self.num_classes, self.label_smoothing)  # (B, K)
        if kind != "none":
            target = target * lam + target.flip(0) * (1.0 - lam)
        return x, target


def random_erase(
    x: Tensor,
    rng: random.Random,
    *,
    prob: float = 0.25,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
    attempts: int = 10,
) -> Tensor:
    """Random erasing (Zhong et al., AAAI 2020) in timm's ``pixel`` mode on a normalised batch.

    With probability ``prob`` per sample, one rectangle of area ``scale`` x (H W) and aspect ratio drawn log-uniformly
    from ``ratio`` is replaced by standard-normal noise (per pixel and channel), as timm's ``RandomErasing``.

    Args:
        x: (B, C, H, W) normalised images (not modified).
        rng: the step's host-side generator (boxes); the noise uses a torch generator seeded from it.

    Returns:
        (B, C, H, W).
    """
    b, c, h, w = x.shape
    out = None
    noise_gen = torch.Generator(device=x.device).manual_seed(rng.getrandbits(62))
    for i in range(b):
        if rng.random() >= prob:
            continue
        for _ in range(attempts):
            area = rng.uniform(*scale) * h * w
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < eh < h and 0 < ew < w:
                top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
                if out is None:
                    out = x.clone()
                noise = torch.randn((c, eh, ew), generator=noise_gen, device=x.device, dtype=x.dtype)
                out[i, :, top : top + eh, left : left + ew] = noise
                break
    return x if out is None else out
