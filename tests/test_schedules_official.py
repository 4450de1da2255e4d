"""The lr, weight decay and EMA momentum each optimizer step applies, against the official training loops.

The official schedules are written out here from their specifications (/work/shared/methods/JEPA_VIDEO.md §1(b),
§1(d) pitfall 10, §2(b); IMAGE.md "LR schedule"), not with mim's functions:

* MAE (facebookresearch/mae util/lr_sched.py ``adjust_learning_rate``, engine_pretrain.py): before the forward pass
  of the first micro-batch of each accumulation group, at the fractional epoch ``e = data_iter_step / len(loader) +
  epoch``, ``lr = base * e / warmup`` during warm-up, then ``min + (base - min) * (1 + cos(pi * (e - warmup) /
  (epochs - warmup))) / 2``. Optimizer step k (0-based) therefore uses the schedule at k.
* I-JEPA / V-JEPA (src/utils/schedulers.py ``WarmupCosineSchedule``, ``CosineWDSchedule``; src/train.py): each
  scheduler holds a step counter starting at 0; ``step()`` increments it and then sets the value, and both are
  called at the *start* of every iteration ("the first step uses warm-up step 1"), so iteration k uses the value at
  k + 1. The EMA momentum is ``next(momentum_scheduler)`` of a linear generator from index 0, taken after the
  optimizer step: iteration k uses index k.

A short Lightning fit records what each optimizer step really applies (the param groups' ``lr`` and
``weight_decay`` in ``on_before_optimizer_step``, the momentum the EMA update receives) and must equal the official
loop step for step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mim.masking import RandomMasking
from mim.module import PretrainModule
from mim.targets import PixelTarget
from mim.targets.latent import LatentTarget
from tests.factories import TINY_VIT, cpu_trainer, tiny_encoder

NO_CLS_VIT = {**TINY_VIT, "class_token": False, "global_pool": "avg", "fc_norm": False}


# ---------------------------------------------------------------------------------------------- official formulas
class WarmupCosineSchedule:
    """I-JEPA's lr scheduler: ``step()`` counts first, then returns the lr at the new count."""

    def __init__(self, *, warmup_steps: int, start_lr: float, ref_lr: float, t_max: int, final_lr: float) -> None:
        self.warmup_steps, self.start_lr, self.ref_lr, self.final_lr = warmup_steps, start_lr, ref_lr, final_lr
        self.t_max = t_max - warmup_steps  # the cosine's length
        self._step = 0

    def step(self) -> float:
        self._step += 1
        if self._step < self.warmup_steps:
            progress = self._step / max(1, self.warmup_steps)
            return self.start_lr + progress * (self.ref_lr - self.start_lr)
        progress = (self._step - self.warmup_steps) / max(1, self.t_max)
        return max(
            self.final_lr, self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        )


class CosineWDSchedule:
    """I-JEPA's weight-decay scheduler: ``step()`` counts first; a half-cosine from ``ref_wd`` to ``final_wd``."""

    def __init__(self, *, ref_wd: float, final_wd: float, t_max: int) -> None:
        self.ref_wd, self.final_wd, self.t_max = ref_wd, final_wd, t_max
        self._step = 0

    def step(self) -> float:
        self._step += 1
        progress = self._step / self.t_max
        wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_wd, wd) if self.final_wd <= self.ref_wd else min(self.final_wd, wd)


def momentum_scheduler(start: float, end: float, total: int) -> Iterator[float]:
    """I-JEPA's EMA momentum: linear from ``start`` (index 0) over ``total`` = ipe x epochs x ipe_scale steps."""
    return (start + i * (end - start) / total for i in range(total + 1))


def ijepa_loop(
    iterations: int,
    *,
    warmup: int,
    total: int,
    start_lr: float,
    ref_lr: float,
    final_lr: float,
    ref_wd: float,
    final_wd: float,
    ema: tuple[float, float],
) -> list[tuple[float, float, float]]:
    """(lr, wd, momentum) of each iteration of I-JEPA's train loop: schedulers stepped before the forward pass,
    momentum taken after the optimizer step."""
    lr_sched = WarmupCosineSchedule(
        warmup_steps=warmup, start_lr=start_lr, ref_lr=ref_lr, t_max=total, final_lr=final_lr
    )
    wd_sched = CosineWDSchedule(ref_wd=ref_wd, final_wd=final_wd, t_max=total)
    moms = momentum_scheduler(ema[0], ema[1], total)
    out = []
    for _ in range(iterations):
        lr, wd = lr_sched.step(), wd_sched.step()  # top of train_step
        # ... forward, backward, optimizer step with (lr, wd) ...
        m = next(moms)  # the target encoder's update, after the optimizer step
        out.append((lr, wd, m))
    return out


def adjust_learning_rate(e: float, *, base: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """MAE's lr at the fractional epoch ``e``."""
    if e < warmup_epochs:
        return base * e / warmup_epochs
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs)))


def mae_loop(epochs: int, num_batches: int, accum: int, **kw: float) -> list[float]:
    """The lr of each optimizer step of MAE's train_one_epoch (lr set at the first micro-batch of each group)."""
    out = []
    for epoch in range(epochs):
        lr = math.nan
        for data_iter_step in range(num_batches):
            if data_iter_step % accum == 0:
                lr = adjust_learning_rate(data_iter_step / num_batches + epoch, epochs=epochs, **kw)
            if (data_iter_step + 1) % accum == 0:
                out.append(lr)  # the optimizer steps
    return out


# ---------------------------------------------------------------------------------------------- the references
IJEPA = dict(warmup=25_000, total=187_500, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6, ref_wd=0.04, final_wd=0.4)
VJEPA = dict(warmup=12_000, total=112_500, start_lr=2e-4, ref_lr=6.25e-4, final_lr=1e-6, ref_wd=0.04, final_wd=0.4)


def _at(config: dict, iteration: int, ema: tuple[float, float]) -> tuple[float, float, float]:
    """(lr, wd, m) of the official loop's ``iteration``-th iteration (1-based, as the spec counts steps)."""
    c = dict(config)
    lr_sched = WarmupCosineSchedule(
        warmup_steps=c["warmup"], start_lr=c["start_lr"], ref_lr=c["ref_lr"], t_max=c["total"], final_lr=c["final_lr"]
    )
    wd_sched = CosineWDSchedule(ref_wd=c["ref_wd"], final_wd=c["final_wd"], t_max=c["total"])
    lr_sched._step = wd_sched._step = iteration - 1  # fast-forward: the iteration's step() brings them to `iteration`
    m = ema[0] + (iteration - 1) * (ema[1] - ema[0]) / c["total"]
    return lr_sched.step(), wd_sched.step(), m


def test_reference_reproduces_the_spec_check_values() -> None:
    """The measured values of JEPA_VIDEO.md §1(b) and §2(b) ("step n" = the n-th iteration)."""
    lr, wd, m = _at(IJEPA, 1, (0.996, 1.0))
    assert lr == pytest.approx(2.00032e-4, rel=1e-7) and wd == pytest.approx(0.04, abs=1e-4) and m == 0.996
    lr, wd, _ = _at(IJEPA, 25_000, (0.996, 1.0))
    assert lr == pytest.approx(1.0e-3) and wd == pytest.approx(0.05556, abs=5e-6)
    lr, wd, m = _at(IJEPA, 100_000, (0.996, 1.0))
    assert lr == pytest.approx(5.6071e-4, abs=5e-9) and wd == pytest.approx(0.23882, abs=5e-6)
    assert m == pytest.approx(0.99813, abs=5e-6)
    lr, wd, m = _at(IJEPA, 187_500, (0.996, 1.0))
    assert lr == pytest.approx(1e-6) and wd == pytest.approx(0.4) and m == pytest.approx(1.0, abs=1e-4)
    lr, wd, _ = _at(VJEPA, 12_000, (0.998, 1.0))
    assert lr == pytest.approx(6.25e-4, abs=5e-8) and wd == pytest.approx(0.05001, abs=5e-6)
    lr, wd, _ = _at(VJEPA, 45_000, (0.998, 1.0))
    assert lr == pytest.approx(4.732e-4, abs=5e-8) and wd == pytest.approx(0.16438, abs=5e-6)
    lr, wd, m = _at(VJEPA, 90_000, (0.998, 1.0))
    # 7.504e-5 is the lr after 90 000 scheduler steps (7.50422e-5); one step earlier it would read 7.505e-5
    assert lr == pytest.approx(7.504e-5, abs=5e-9) and wd == pytest.approx(0.36562, abs=5e-6)
    assert m == pytest.approx(0.99960, abs=5e-6)


def test_reference_loop_matches_the_fast_forward() -> None:
    loop = ijepa_loop(5, **IJEPA, ema=(0.996, 1.0))
    assert loop == [pytest.approx(_at(IJEPA, i + 1, (0.996, 1.0))) for i in range(5)]


# ---------------------------------------------------------------------------------------------- Lightning fits
class Images(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i]}


class Applied(L.Callback):
    """What each optimizer step applies: (global step, lr of every group, decayed / undecayed weight decay)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[float], float, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        decay = [g for g in optimizer.param_groups if g["decay"]]
        no_decay = [g for g in optimizer.param_groups if not g["decay"]]
        assert len(decay) == 1 and len(no_decay) == 1
        lrs = [g["lr"] for g in optimizer.param_groups]
        self.seen.append((trainer.global_step, lrs, decay[0]["weight_decay"], no_decay[0]["weight_decay"]))


def _jepa_module(**kwargs) -> tuple[PretrainModule, list[float]]:
    """A tiny I-JEPA-style module, and the list that collects the momentum of every EMA update."""
    target = LatentTarget(
        predictor_dim=16, predictor_depth=1, predictor_num_heads=2, monitor_every=1000, momentum=(0.9, 0.99)
    )
    module = PretrainModule(
        encoder=tiny_encoder(model_kwargs=NO_CLS_VIT),
        masking=RandomMasking(mask_ratio=0.75),
        targets=[target],
        batch_size=2,
        fused_optimizer=False,
        **kwargs,
    )
    momenta: list[float] = []
    ema = target.target_encoder
    update = ema.update

    def recording_update(online, momentum: float, **kw) -> None:
        momenta.append(momentum)
        update(online, momentum, **kw)

    ema.update = recording_update  # type: ignore[method-assign]
    return module, momenta


IJEPA_TINY = dict(
    lr=1e-3, warmup_start_lr=2e-4, min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, betas=(0.9, 0.999)
)


@pytest.mark.parametrize(("max_steps", "warmup_steps"), [(9, 3), (5, 0)])
def test_ijepa_convention_applies_the_official_values_at_every_step(max_steps: int, warmup_steps: int) -> None:
    module, momenta = _jepa_module(schedule_convention="ijepa", warmup_steps=warmup_steps, **IJEPA_TINY)
    rec = Applied()
    trainer = cpu_trainer(max_steps=max_steps, callbacks=[rec])
    trainer.fit(module, DataLoader(Images(2 * max_steps), batch_size=2))
    official = ijepa_loop(
        max_steps,
        warmup=warmup_steps,
        total=max_steps,
        start_lr=2e-4,
        ref_lr=1e-3,
        final_lr=1e-6,
        ref_wd=0.04,
        final_wd=0.4,
        ema=(0.9, 0.99),
    )
    assert [s[0] for s in rec.seen] == list(range(max_steps)), "one record per optimizer step"
    assert len(momenta) == max_steps
    for k, ((_, lrs, wd, wd_no), m, (lr_off, wd_off, m_off)) in enumerate(zip(rec.seen, momenta, official)):
        assert lrs == [pytest.approx(lr_off, rel=1e-12, abs=1e-18)] * len(lrs), f"lr at optimizer step {k}"
        assert wd == pytest.approx(wd_off, rel=1e-12), f"weight decay at optimizer step {k}"
        assert wd_no == 0.0
        assert m == pytest.approx(m_off, rel=1e-12), f"momentum at optimizer step {k}"
    # the first step is warm-up step 1, the last one the end of both schedules
    assert rec.seen[-1][1][0] == pytest.approx(1e-6) and rec.seen[-1][2] == pytest.approx(0.4)
    assert momenta[0] == 0.9


def test_schedule_scale_is_vjepas_ipe_scale() -> None:
    """V-JEPA builds its schedules for ipe_scale = 1.25 x the run and stops at the run's end: 8 steps of a 10-step
    schedule; the momentum over the run, with its end set to where the official 10-step ramp is after 8 steps."""
    module, momenta = _jepa_module(schedule_convention="ijepa", warmup_steps=2, schedule_scale=1.25, **IJEPA_TINY)
    module.target_list[0].momentum = (0.9, 0.9 + (0.99 - 0.9) * 8 / 10)  # type: ignore[attr-defined]
    rec = Applied()
    cpu_trainer(max_steps=8, callbacks=[rec]).fit(module, DataLoader(Images(16), batch_size=2))
    official = ijepa_loop(
        8, warmup=2, total=10, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6, ref_wd=0.04, final_wd=0.4, ema=(0.9, 0.99)
    )
    assert [s[0] for s in rec.seen] == list(range(8))
    for (_, lrs, wd, _), m, (lr_off, wd_off, m_off) in zip(rec.seen, momenta, official):
        assert lrs[0] == pytest.approx(lr_off, rel=1e-12) and wd == pytest.approx(wd_off, rel=1e-12)
        assert m == pytest.approx(m_off, rel=1e-12)
    assert rec.seen[-1][1][0] > 1e-4 and rec.seen[-1][2] < 0.4  # the run ends before its schedules do
    with pytest.raises(ValueError, match="PretrainModule.schedule_scale must be a finite number >= 1"):
        _jepa_module(schedule_scale=0.5)


def test_vjepa_recipe_reaches_the_official_check_values() -> None:
    """recipes/vjepa: the lr / weight decay that mim's formulas give at V-JEPA's check steps (JEPA_VIDEO.md §2(b)),
    with the recipe's settings (warm-up, ipe scale, I-JEPA convention: iteration n applies the value at n)."""
    import yaml

    from mim.optim import cosine_anneal, warmup_cosine

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/vjepa/vit_l16_videomix2m.yaml").read_text())
    hp, steps = cfg["model"]["init_args"], cfg["trainer"]["max_steps"]
    schedule = round(steps * hp["schedule_scale"])
    assert hp["schedule_convention"] == "ijepa" and schedule == VJEPA["total"]

    def at(n: int) -> tuple[float, float]:  # the n-th iteration (1-based) = optimizer step n - 1, applying point n
        lr = warmup_cosine(
            n, warmup_steps=hp["warmup_steps"], total_steps=schedule, base_lr=hp["lr"], min_lr=hp["min_lr"],
            start_lr=hp["warmup_start_lr"],
        )  # fmt: skip
        return lr, cosine_anneal(n, total_steps=schedule, start=hp["weight_decay"], end=hp["weight_decay_end"])

    for n in (1, 12_000, 45_000, 90_000):
        official = _at(VJEPA, n, (0.998, 1.0))
        assert at(n) == (pytest.approx(official[0], rel=1e-9), pytest.approx(official[1], rel=1e-9))
    assert at(90_000)[0] == pytest.approx(7.504e-5, abs=5e-9) and at(90_000)[1] == pytest.approx(0.36562, abs=5e-6)


def test_mae_convention_is_one_scheduler_step_earlier() -> None:
    """The default ("mae") applies at step k what the I-JEPA loop applies at step k - 1: f(k), not f(k + 1)."""
    module, momenta = _jepa_module(warmup_steps=3, **IJEPA_TINY)
    rec = Applied()
    cpu_trainer(max_steps=6, callbacks=[rec]).fit(module, DataLoader(Images(12), batch_size=2))
    official = ijepa_loop(
        6, warmup=3, total=6, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6, ref_wd=0.04, final_wd=0.4, ema=(0.9, 0.99)
    )
    assert rec.seen[0][1][0] == pytest.approx(2e-4) and rec.seen[0][2] == pytest.approx(0.04)
    for k in range(1, 6):
        assert rec.seen[k][1][0] == pytest.approx(official[k - 1][0], rel=1e-12)
        assert rec.seen[k][2] == pytest.approx(official[k - 1][1], rel=1e-12)
    assert momenta == [pytest.approx(m, rel=1e-12) for _, _, m in official]  # the momentum is the same in both


@pytest.mark.parametrize("accum", [1, 2])
def test_mae_convention_matches_adjust_learning_rate(accum: int) -> None:
    """MAE: warm-up 1 epoch of 3, 4 batches per epoch; the lr of every optimizer step equals MAE's loop."""
    torch.manual_seed(0)
    module = PretrainModule(
        encoder=tiny_encoder(),
        masking=RandomMasking(mask_ratio=0.75),
        targets=[PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)],
        blr=1.5e-4,
        min_lr=1e-6,
        warmup_epochs=1.0,
        batch_size=2,
        fused_optimizer=False,
    )
    rec = Applied()
    cpu_trainer(max_epochs=3, accumulate_grad_batches=accum, callbacks=[rec]).fit(
        module, DataLoader(Images(8), batch_size=2)
    )
    base = 1.5e-4 * 2 * accum / 256
    official = mae_loop(3, 4, accum, base=base, min_lr=1e-6, warmup_epochs=1.0)
    assert len(rec.seen) == len(official) == 3 * 4 // accum
    for k, ((_, lrs, wd, _), lr_off) in enumerate(zip(rec.seen, official)):
        assert lrs == [pytest.approx(lr_off, rel=1e-12, abs=1e-18)] * len(lrs), f"lr at optimizer step {k}"
        assert wd == 0.05  # MAE: constant weight decay
    assert official[0] == 0.0


def test_schedule_convention_is_validated() -> None:
    with pytest.raises(ValueError, match="schedule_convention"):
        _jepa_module(schedule_convention="jepa")


def test_recipes_choose_the_convention_of_their_method() -> None:
    """The JEPA recipes step the schedules as I-JEPA's loop; every other recipe keeps MAE's convention."""
    import yaml

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    jepa = {"ijepa/vit_h14_in1k.yaml", "vjepa/vit_l16_videomix2m.yaml", "tjepa/jannis.yaml"}
    for name in sorted(jepa):
        model = yaml.safe_load((recipes / name).read_text())["model"]["init_args"]
        assert model["schedule_convention"] == "ijepa", name
    for name in ("mae/vit_b16_in1k.yaml", "hpm/vit_b16_in1k.yaml", "videomae_v2/vit_b16_k400.yaml"):
        model = yaml.safe_load((recipes / name).read_text())["model"]["init_args"]
        assert model.get("schedule_convention", "mae") == "mae", name


def test_ijepa_convention_resumes_on_schedule(tmp_path: Path) -> None:
    """Stopped after 3 of 6 steps and resumed from the checkpoint, steps 3-5 apply the official values."""

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 3:
                trainer.should_stop = True

    module, _ = _jepa_module(schedule_convention="ijepa", warmup_steps=2, **IJEPA_TINY)
    trainer = cpu_trainer(max_steps=6, callbacks=[StopAt()])
    trainer.fit(module, DataLoader(Images(12), batch_size=2))
    assert trainer.global_step == 3
    trainer.save_checkpoint(tmp_path / "stop.ckpt")
    module, momenta = _jepa_module(schedule_convention="ijepa", warmup_steps=2, **IJEPA_TINY)
    rec = Applied()
    cpu_trainer(max_steps=6, callbacks=[rec]).fit(
        module, DataLoader(Images(12), batch_size=2), ckpt_path=tmp_path / "stop.ckpt"
    )
    official = ijepa_loop(
        6, warmup=2, total=6, start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6, ref_wd=0.04, final_wd=0.4, ema=(0.9, 0.99)
    )
    assert [s[0] for s in rec.seen] == [3, 4, 5]
    for (_, lrs, wd, _), m, (lr_off, wd_off, m_off) in zip(rec.seen, momenta, official[3:]):
        assert lrs[0] == pytest.approx(lr_off, rel=1e-12) and wd == pytest.approx(wd_off, rel=1e-12)
        assert m == pytest.approx(m_off, rel=1e-12)
