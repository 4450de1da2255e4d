"""SelfDistillTarget (self-distillation for further pretraining, Lee et al., ICLR 2023): contracts, the loss against an
independent computation, a zero loss and gradient when the student is the teacher, the frozen unregistered teacher,
the gradient through the unmasked pass, weight 0 = plain MAE, config errors, Fashion-MNIST class subsets, the debug
recipes, and (marker ``e2e``) the paper's comparison at CPU scale on a Fashion-MNIST domain shift."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from mim.masking import RandomMasking
from mim.models import MaskedEncoder
from mim.models.teacher import encoder_timm_kwargs, weights_sha256
from mim.module import PretrainModule
from mim.optim import param_groups
from mim.targets import PixelTarget, SelfDistillTarget
from mim.targets.self_distill import self_distill_loss
from tests.contracts import TargetContract
from tests.factories import (
    TINY_ARCH,
    LossRecorder,
    TrainMetricsRecorder,
    cpu_trainer,
    fashion_mnist_vit,
    fit_debug_recipe,
    tiny_encoder,
)

CPU = torch.device("cpu")
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
NO_CLS = {"depth": 1, "embed_dim": 64, "num_heads": 4, "class_token": False, "global_pool": "avg", "fc_norm": False}
FILES: dict[str, Path] = {}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write_weights(encoder: MaskedEncoder, path: Path) -> Path:
    """``encoder``'s weights under timm's names, as a .safetensors teacher file."""
    save_file({k: v.detach().contiguous() for k, v in encoder.timm_state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module", autouse=True)
def _teacher_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_teachers")
    FILES["cls"] = write_weights(tiny_encoder(seed=7), root / "teacher_cls.safetensors")
    FILES["avg"] = write_weights(tiny_encoder(seed=7, model_kwargs=dict(NO_CLS)), root / "teacher_avg.safetensors")
    yield
    FILES.clear()


def sd_target(feature: str = "cls", **overrides: Any) -> SelfDistillTarget:
    kwargs: dict[str, Any] = dict(teacher_arch=TINY_ARCH, teacher_checkpoint=str(FILES.get(feature, FILES["cls"])))
    kwargs["feature"] = feature
    kwargs.update(overrides)
    return SelfDistillTarget(**kwargs)


class TestSelfDistillTargetContract(TargetContract):
    target_cls = SelfDistillTarget

    def make_target(self, **overrides) -> SelfDistillTarget:
        return sd_target(**overrides)


class TestSelfDistillTargetAvgContract(TargetContract):
    """``feature="avg"`` on an encoder without a class token."""

    target_cls = SelfDistillTarget

    def make_encoder(self) -> MaskedEncoder:
        return tiny_encoder(model_kwargs=dict(NO_CLS))

    def make_target(self, **overrides) -> SelfDistillTarget:
        return sd_target("avg", **overrides)


def _setup(feature: str = "cls", b: int = 4, seed: int = 0):
    kwargs = {} if feature == "cls" else {"model_kwargs": dict(NO_CLS)}
    encoder = tiny_encoder(seed=seed, **kwargs)
    target = sd_target(feature)
    target.bind(encoder)
    images = torch.randn(b, 3, 16, 16, generator=_gen(seed + 1))
    masks = RandomMasking(mask_ratio=0.75)(b, encoder.grid, generator=_gen(seed + 2), device=CPU)
    return encoder, target, {"image": images}, masks


# ---------------------------------------------------------------------- the loss
@pytest.mark.parametrize("feature", ["cls", "avg"])
def test_loss_matches_an_independent_computation(feature: str) -> None:
    """(1/B) sum_b sum_d (s_bd - t_bd)^2 in float64, s from timm's own forward_features over the student's weights and
    t from a timm model loaded from the teacher file (not through mim's encoder or FrozenTeacher)."""
    encoder, target, batch, masks = _setup(feature)
    latent = encoder(batch["image"], masks.visible)
    loss = target(batch, masks, latent, encoder)["loss"].detach()

    kwargs = encoder_timm_kwargs(encoder.config)
    teacher = timm.create_model(TINY_ARCH, pretrained=False, num_classes=0, **kwargs).eval()
    from safetensors.torch import load_file

    teacher.load_state_dict(load_file(str(FILES[feature])), strict=True)
    with torch.no_grad():
        s_all = encoder.vit.forward_features(batch["image"]).double()  # (B, prefix + N, D)
        t_all = teacher.forward_features(batch["image"]).double()
    if feature == "cls":
        s, t = s_all[:, 0], t_all[:, 0]
    else:
        s, t = s_all.mean(dim=1), t_all.mean(dim=1)  # no prefix tokens
    expected = sum(float(((s[b] - t[b]) ** 2).sum()) for b in range(s.shape[0])) / s.shape[0]
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(loss) > 0.1  # two different random models
    assert float(self_distill_loss(s, t)) == pytest.approx(expected, rel=1e-6)  # fp32


def test_loss_and_gradient_are_zero_when_the_student_is_the_teacher(tmp_path: Path) -> None:
    encoder = tiny_encoder(seed=3)
    target = sd_target(teacher_checkpoint=str(write_weights(encoder, tmp_path / "self.safetensors")))
    target.bind(encoder)
    images = torch.randn(4, 3, 16, 16, generator=_gen(1))
    masks = RandomMasking(mask_ratio=0.75)(4, encoder.grid, generator=_gen(2), device=CPU)
    loss = target({"image": images}, masks, encoder(images, masks.visible), encoder)["loss"]
    assert float(loss.detach()) == 0.0
    loss.backward()
    grads = {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and bool((g == 0).all()) for g in grads.values())


def test_the_gradient_comes_through_the_unmasked_pass() -> None:
    """The term depends on the full images only: the same gradient under two different masks, reaching every trainable
    encoder parameter, and the masked pass's captured block outputs stay readable."""
    encoder, target, batch, _ = _setup()
    encoder.capture_blocks([0])
    grads = []
    for seed in (2, 3):
        masks = RandomMasking(mask_ratio=0.75)(4, encoder.grid, generator=_gen(seed), device=CPU)
        encoder.zero_grad()
        latent = encoder(batch["image"], masks.visible)  # (B, 1 + K, D)
        target(batch, masks, latent, encoder)["loss"].backward()
        assert encoder.captured_blocks(latent)[0].shape == latent.shape  # still the masked pass's blocks
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        assert bool(g.abs().sum() > 0), f"{name} received no gradient"
        torch.testing.assert_close(g, grads[1][name], rtol=0, atol=0)
    with torch.no_grad():  # and it equals the gradient of an explicit full pass
        t = target.teacher_feature(batch["image"])
    encoder.zero_grad()
    ((encoder(batch["image"])[:, 0] - t) ** 2).sum(-1).mean().backward()
    for name, p in encoder.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[0][name], rtol=1e-6, atol=1e-8)


def test_the_teacher_is_frozen_unregistered_and_hash_pinned() -> None:
    encoder, target, batch, masks = _setup()
    module = PretrainModule(
        encoder=encoder, masking=RandomMasking(mask_ratio=0.75), targets=[PixelTarget(decoder_dim=16), target], lr=1e-3
    )
    module.configure_data(None)
    target(batch, masks, encoder(batch["image"], masks.visible), encoder)  # loads the teacher
    teacher_params = {id(p) for p in target.teacher.parameters()}
    assert not teacher_params & {id(p) for p in module.parameters()}
    groups = param_groups(module, weight_decay=0.05)
    assert not teacher_params & {id(p) for g in groups for p in g["params"]}
    assert all(not p.requires_grad for p in target.teacher.parameters())
    state = module.state_dict()
    assert [k for k in state if k.startswith("targets.1.")] == ["targets.1._extra_state"]
    from safetensors.torch import load_file

    extra = state["targets.1._extra_state"]
    assert extra["sha256"] == weights_sha256(load_file(str(FILES["cls"])))
    assert extra["teacher_checkpoint"] == str(FILES["cls"]) and extra["teacher_arch"] == TINY_ARCH
    module.train()
    assert not target.teacher.training and not target.teacher.model.training
    # a resumed run with another teacher file is refused
    other = sd_target()
    other.bind(tiny_encoder())
    with pytest.raises(ValueError, match="teacher file changed"):
        other.set_extra_state({**extra, "sha256": "0" * 64})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"feature": "max"}, "SelfDistillTarget.feature"),
        ({"teacher_arch": "no_such_model_xyz"}, "teacher_arch"),
        ({"teacher_checkpoint": ""}, "SelfDistillTarget.teacher_checkpoint"),
        ({"teacher_kwargs": [1, 2]}, "SelfDistillTarget.teacher_kwargs"),
        ({"weight": -1.0}, "weight"),
    ],
)
def test_rejects_bad_arguments(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        sd_target(**kwargs)


def test_bind_checks_the_teacher(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="width 32 differs from the student's 64"):
        sd_target(teacher_kwargs={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}).bind(
            tiny_encoder()
        )
    with pytest.raises(ValueError, match="feature='cls' needs a class token"):
        sd_target("cls").bind(tiny_encoder(model_kwargs=dict(NO_CLS)))
    with pytest.raises(RuntimeError, match="bind"):
        _ = sd_target().teacher
    target = sd_target(teacher_checkpoint=str(tmp_path / "missing.safetensors"))
    enc = tiny_encoder()
    target.bind(enc)  # the file is read on first use
    images = torch.randn(2, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        target({"image": images}, None, None, enc)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- Fashion-MNIST class subsets
@pytest.mark.usefixtures("fashion_mnist")
def test_fashion_mnist_class_subset_is_deterministic_and_renumbered() -> None:
    from mim.data import FashionMNISTDataModule, load_fashion_mnist

    make = lambda seed, **kw: FashionMNISTDataModule(  # noqa: E731
        classes=[7, 5, 9], num_train=300, num_val=60, batch_size=20, seed=seed, **kw
    )
    first, again, other = make(0), make(0), make(1)
    for dm in (first, again, other):
        dm.setup("fit")
    assert first.num_classes == 3
    x, y = load_fashion_mnist("train")
    idx = first.train_indices()
    assert idx is not None and len(idx) == 300 and torch.equal(idx, idx.unique())
    assert torch.equal(idx, again.train_indices()) and not torch.equal(idx, other.train_indices())
    assert set(y[idx].tolist()) == {5, 7, 9}
    assert torch.equal(first.train_dataset.images, x[idx])
    lookup = {7: 0, 5: 1, 9: 2}  # renumbered in the order given
    assert first.train_dataset.labels.tolist() == [lookup[int(c)] for c in y[idx]]
    _, y_test = load_fashion_mnist("test")
    val = first.val_indices()
    assert val is not None and set(y_test[val].tolist()) <= {5, 7, 9} and len(val) == 60
    every = FashionMNISTDataModule(classes=[5, 6], num_val=None)
    every_idx = every.train_indices()
    assert every_idx is not None and torch.equal(every_idx, torch.isin(y, torch.tensor([5, 6])).nonzero().flatten())
    assert FashionMNISTDataModule(num_train=300).train_indices() is not None  # no classes: unchanged behaviour
    with pytest.raises(ValueError, match=r"num_train must be <= 6000"):
        FashionMNISTDataModule(classes=[3], num_train=7000).train_indices()


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.parametrize("classes", [[], [10], [1, 1], [-1], "5", [True]])
def test_fashion_mnist_rejects_bad_classes(classes) -> None:
    from mim.data import FashionMNISTDataModule

    with pytest.raises(ValueError, match="FashionMNISTDataModule.classes"):
        FashionMNISTDataModule(classes=classes)


# ---------------------------------------------------------------------- stage 2 in the module
def _debug_module(targets: list, init: Path, **kw: Any) -> PretrainModule:
    """recipes/debug/sd_stage2_fashion_mnist.yaml's model, built in Python."""
    torch.manual_seed(11)  # other random weights than theta_0's: the init checkpoint overwrites them
    encoder = MaskedEncoder(
        arch=TINY_ARCH,
        img_size=28,
        patch_size=4,
        in_chans=1,
        model_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2},
    )
    return PretrainModule(
        encoder=encoder, masking=RandomMasking(mask_ratio=0.75), targets=targets, init_checkpoint=str(init), lr=1e-3,
        lr_decay="linear", warmup_steps=0, weight_decay=0.01, betas=(0.9, 0.95), seed=0, **kw,
    )  # fmt: skip


def _debug_pixel() -> PixelTarget:
    return PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=2, norm_pix=True)


def _debug_data():
    from mim.data import FashionMNISTDataModule

    return FashionMNISTDataModule(batch_size=16, classes=[5, 6, 7, 8, 9], num_train=64, num_val=16, augment=False)


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """theta_0 (a 3-step MAE fit on classes 0-4, encoder + decoder) and a teacher file (a 3-step further MAE from
    theta_0 on classes 5-9, exported)."""
    from mim.data import FashionMNISTDataModule
    from mim.export import export_encoder

    root = tmp_path_factory.mktemp("sd_stages")
    torch.manual_seed(0)
    encoder = MaskedEncoder(
        arch=TINY_ARCH,
        img_size=28,
        patch_size=4,
        in_chans=1,
        model_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2},
    )
    module = PretrainModule(encoder=encoder, masking=RandomMasking(mask_ratio=0.75), targets=[_debug_pixel()], lr=1e-3)
    trainer = cpu_trainer(max_steps=3, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=FashionMNISTDataModule(batch_size=16, classes=[0, 1, 2, 3, 4], num_train=64))
    trainer.save_checkpoint(root / "theta0.ckpt")
    stage1 = _debug_module([_debug_pixel()], root / "theta0.ckpt")
    trainer = cpu_trainer(max_steps=3, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(stage1, datamodule=_debug_data())
    trainer.save_checkpoint(root / "theta1.ckpt")
    return {
        "theta0": root / "theta0.ckpt",
        "teacher": export_encoder(root / "theta1.ckpt", root / "theta1.safetensors"),
    }


@pytest.mark.usefixtures("fashion_mnist")
def test_weight_zero_is_plain_mae_from_the_same_init(stages: dict[str, Path]) -> None:
    """Stage 2 with the distillation weight 0 and stage 1 from theta_0 take bit-identical steps (the same losses and
    weights after 2 steps with the same seed): the target adds nothing to the MAE step but its own forward passes."""
    runs = []
    for extra in ([], [SelfDistillTarget(teacher_arch=TINY_ARCH, teacher_checkpoint=str(stages["teacher"]), weight=0)]):
        module = _debug_module([_debug_pixel(), *extra], stages["theta0"])
        losses = LossRecorder()
        trainer = cpu_trainer(
            max_steps=2, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[losses]
        )
        trainer.fit(module, datamodule=_debug_data())
        state = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
        runs.append((losses.losses, state))
    (plain_losses, plain), (sd_losses, sd) = runs
    assert len(plain_losses) == 2 and plain_losses == sd_losses
    assert plain.keys() == sd.keys()
    for key in plain:
        assert torch.equal(plain[key], sd[key]), key


@pytest.mark.usefixtures("fashion_mnist")
def test_stage2_trains_from_theta0_with_the_teacher(stages: dict[str, Path], tmp_path: Path) -> None:
    """A real stage-2 fit: the student starts from theta_0 (not theta_1), both losses are logged, the distillation term
    falls, the checkpoint records the teacher's hash and no teacher weight, and the teacher stays unchanged."""
    from mim.models.teacher import read_weights

    theta0 = torch.load(stages["theta0"], map_location="cpu", weights_only=True)["state_dict"]
    teacher_state, _ = read_weights(stages["teacher"])
    sd = SelfDistillTarget(teacher_arch=TINY_ARCH, teacher_checkpoint=str(stages["teacher"]))
    module = _debug_module([_debug_pixel(), sd], stages["theta0"])

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.qkv = pl_module.encoder.vit.blocks[0].attn.qkv.weight.detach().clone()

    start, record = AtStart(), TrainMetricsRecorder()
    trainer = cpu_trainer(
        max_steps=12, max_epochs=-1, limit_val_batches=0, log_every_n_steps=1, callbacks=[start, record]
    )
    trainer.fit(module, datamodule=_debug_data())
    assert torch.equal(start.qkv, theta0["encoder.vit.blocks.0.attn.qkv.weight"])
    distill = np.array([s["train/self_distill/loss"] for s in record.seen])
    mae = np.array([s["train/pixel/loss"] for s in record.seen])
    assert len(distill) == 12 and np.isfinite(distill).all() and np.isfinite(mae).all()
    assert distill[-3:].mean() < 0.5 * distill[:3].mean(), distill
    for name, p in sd.teacher.model.state_dict().items():
        assert torch.equal(p, teacher_state[name]), name
    trainer.save_checkpoint(tmp_path / "stage2.ckpt")
    saved = torch.load(tmp_path / "stage2.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert [k for k in saved if k.startswith("targets.1.")] == ["targets.1._extra_state"]
    assert saved["targets.1._extra_state"]["sha256"] == weights_sha256(teacher_state)


def sd_recipe_overrides(recipe: Path, tmp_path: Path) -> list[str]:
    """CLI overrides that point a debug SD recipe's ``init_checkpoint`` and SelfDistillTarget at files written to
    ``tmp_path``: a 1-step fit of recipes/debug/mae_fashion_mnist.yaml (the debug SD recipes' architecture) as
    theta_0, and its encoder exported as the teacher. For tests that instantiate and run recipes."""
    from mim.export import export_encoder
    from mim.lightning_cli import build

    mae = RECIPES / "debug" / "mae_fashion_mnist.yaml"
    cli = build(["--config", str(mae), f"--trainer.default_root_dir={tmp_path}"], save_config_callback=None)
    trainer = cpu_trainer(max_steps=1, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(cli.model, datamodule=cli.datamodule)
    theta0 = tmp_path / "theta0.ckpt"
    trainer.save_checkpoint(theta0)
    out = [f"--model.init_args.init_checkpoint={theta0}"]
    targets = yaml.safe_load(recipe.read_text())["model"]["init_args"].get("targets") or []
    if targets and str(targets[-1].get("class_path", "")).endswith("SelfDistillTarget"):
        teacher = export_encoder(theta0, tmp_path / "theta1.safetensors")
        out.append(f"--model.init_args.targets.init_args.teacher_checkpoint={teacher}")
    return out


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.parametrize("name", ["sd_stage1_fashion_mnist.yaml", "sd_stage2_fashion_mnist.yaml"])
def test_debug_recipes_train(name: str, tmp_path: Path) -> None:
    cli, seen = fit_debug_recipe(name, tmp_path, 6, *sd_recipe_overrides(RECIPES / "debug" / name, tmp_path))
    assert len(seen) == 6 and all(np.isfinite(s["train/loss"]) for s in seen)
    assert cli.model.hparams.lr_decay == "linear" and cli.datamodule.num_classes == 5
    if "stage2" in name:
        assert isinstance(cli.model.target_list[1], SelfDistillTarget)
        assert "train/self_distill/loss" in seen[-1]


# ---------------------------------------------------------------------- end to end (slow)
SOURCE, SHIFTED = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]  # stage 0 pretrains on the first five classes, SD adapts to the rest
STAGE0_STEPS, ADAPT_STEPS, ADAPT_IMAGES, FINETUNE_STEPS, EVAL_IMAGES = 600, 600, 128, 150, 2000


def _e2e_encoder(seed: int) -> MaskedEncoder:
    torch.manual_seed(seed)
    return fashion_mnist_vit()  # E2E_VIT with a class token (feature="cls", the paper's), a 4 x 4 grid


def _pretrain(seed: int, targets: list, data, steps: int, *, init: Path | None, lr: float, **kw: Any):
    """A PretrainModule fit of ``steps`` steps; returns (module, trainer, per-step train metrics)."""
    module = PretrainModule(
        encoder=_e2e_encoder(seed),
        masking=RandomMasking(mask_ratio=0.75),
        targets=targets,
        lr=lr,
        seed=seed,
        init_checkpoint=None if init is None else str(init),
        **kw,
    )
    record = TrainMetricsRecorder()
    trainer = cpu_trainer(max_steps=steps, max_epochs=-1, limit_val_batches=0, log_every_n_steps=1, callbacks=[record])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == steps
    return module, trainer, record.seen


def _finetune_top1(encoder: MaskedEncoder, train_data, eval_data, seed: int) -> float:
    """Fine-tune a copy of ``encoder`` (CLS head, MAE-style layer decay, no Mixup / CutMix / erasing) on the labelled
    adaptation split; top-1 on the held-out test images of the shifted classes."""
    from mim.finetune import FinetuneModule

    L.seed_everything(seed, verbose=False)
    module = FinetuneModule(
        encoder=copy.deepcopy(encoder), global_pool="cls", lr=1e-3, layer_decay=0.75, warmup_steps=15,
        drop_path_rate=0.0, mixup=0.0, cutmix=0.0, random_erasing=0.0, label_smoothing=0.0, seed=seed,
    )  # fmt: skip
    trainer = cpu_trainer(max_steps=FINETUNE_STEPS, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=train_data)
    return float(cpu_trainer().validate(module, datamodule=eval_data, verbose=False)[0]["val/top1"])


def _shifted_probe(seed: int):
    """Linear-probe test accuracy (avg-pooled frozen features) on the shifted classes: EVAL_IMAGES train and test
    images of classes 5-9 (5-way), the same for every encoder."""
    from mim.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, normalize_image
    from mim.probe import encoder_features, linear_probe

    sets = []
    g = torch.Generator().manual_seed(seed + 1000)
    for split in ("train", "test"):
        x, y = load_fashion_mnist(split)  # type: ignore[arg-type]
        keep = torch.isin(y, torch.tensor(SHIFTED)).nonzero().flatten()
        pick = keep[torch.randperm(len(keep), generator=g)[:EVAL_IMAGES]]
        sets.append((x[pick], y[pick] - SHIFTED[0]))

    def probe(encoder: MaskedEncoder) -> float:
        norm = lambda u: normalize_image(u, FASHION_MNIST_MEAN, FASHION_MNIST_STD)  # noqa: E731
        (xtr, ytr), (xte, yte) = sets
        ftr = encoder_features(encoder, xtr, normalize=norm, pool="avg")
        fte = encoder_features(encoder, xte, normalize=norm, pool="avg")
        return linear_probe(ftr, ytr, fte, yte, num_classes=len(SHIFTED)).test_accuracy

    return probe


def sd_comparison(seed: int, root: Path) -> dict[str, Any]:
    """Stage 0 MAE on classes 0-4 (theta_0); stage 1 further MAE from theta_0 on ADAPT_IMAGES images of classes 5-9
    (theta_1, long enough to overfit them); stage 2 SD from theta_0 with teacher theta_1 (same data, steps and
    schedule); then fine-tuning and linear probes on classes 5-9. Returns the measurements."""
    from mim.data import FashionMNISTDataModule
    from mim.export import export_encoder

    L.seed_everything(seed, verbose=False)
    out: dict[str, Any] = {"seed": seed}
    t0 = time.time()
    source = FashionMNISTDataModule(batch_size=128, classes=SOURCE, num_train=16384, num_val=128, seed=seed)
    stage0, trainer, _ = _pretrain(
        seed, [PixelTarget(decoder_dim=64, decoder_depth=1, decoder_num_heads=4, norm_pix=True)], source,
        STAGE0_STEPS, init=None, lr=1.5e-3, min_lr=1e-5, warmup_steps=STAGE0_STEPS // 10, weight_decay=0.05,
        betas=(0.9, 0.95),
    )  # fmt: skip
    theta0 = root / f"theta0_{seed}.ckpt"
    trainer.save_checkpoint(theta0)
    out["time_stage0"] = time.time() - t0

    # stages 1 and 2: the paper's further-pretraining settings (no augmentation, AdamW (0.9, 0.95), wd 0.01, linear
    # decay to 0 without warmup), with a CPU-scale lr
    adapt = dict(batch_size=64, classes=SHIFTED, num_train=ADAPT_IMAGES, num_val=64, augment=False, seed=seed)
    stage = dict(lr=1e-3, lr_decay="linear", warmup_steps=0, weight_decay=0.01, betas=(0.9, 0.95))

    def pixel() -> PixelTarget:
        return PixelTarget(decoder_dim=64, decoder_depth=1, decoder_num_heads=4, norm_pix=True)

    t1 = time.time()
    stage1, trainer, seen1 = _pretrain(
        seed, [pixel()], FashionMNISTDataModule(**adapt), ADAPT_STEPS, init=theta0, **stage
    )
    theta1 = root / f"theta1_{seed}.ckpt"
    trainer.save_checkpoint(theta1)
    teacher = export_encoder(theta1, root / f"theta1_{seed}.safetensors")
    out["time_stage1"] = time.time() - t1

    t2 = time.time()
    sd = SelfDistillTarget(teacher_arch=TINY_ARCH, teacher_checkpoint=str(teacher), feature="cls")
    stage2, _, seen2 = _pretrain(
        seed, [pixel(), sd], FashionMNISTDataModule(**adapt), ADAPT_STEPS, init=theta0, **stage
    )
    out["time_stage2"] = time.time() - t2
    first, last = slice(0, 20), slice(-20, None)
    for key, seen, name in (
        ("stage1_mae", seen1, "train/loss"),
        ("stage2_total", seen2, "train/loss"),
        ("stage2_mae", seen2, "train/pixel/loss"),
        ("stage2_distill", seen2, "train/self_distill/loss"),
    ):
        values = np.array([s[name] for s in seen])
        assert np.isfinite(values).all()
        out[f"{key}_first"], out[f"{key}_last"] = float(values[first].mean()), float(values[last].mean())

    t3 = time.time()
    labelled = FashionMNISTDataModule(**{**adapt, "augment": True, "crop_scale": (0.5, 1.0)})
    held_out = FashionMNISTDataModule(batch_size=256, classes=SHIFTED, num_train=64, num_val=EVAL_IMAGES, seed=seed)
    random_init = _e2e_encoder(seed + 100)
    encoders = {"theta0": stage0.encoder, "theta1": stage1.encoder, "sd": stage2.encoder, "random": random_init}
    for name in ("theta0", "theta1", "sd"):
        out[f"finetune_{name}"] = _finetune_top1(encoders[name], labelled, held_out, seed)
    out["time_finetune"] = time.time() - t3
    t4 = time.time()
    probe = _shifted_probe(seed)
    for name, encoder in encoders.items():
        out[f"probe_{name}"] = probe(encoder)
    out["time_probe"] = time.time() - t4
    out["time_total"] = time.time() - t0
    return out


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("fashion_mnist")
def test_self_distillation_on_a_fashion_mnist_domain_shift(tmp_path: Path) -> None:
    """The paper's comparison at CPU scale: theta_0 = MAE on classes 0-4; theta_1 = further MAE from theta_0 on 128
    images of classes 5-9 for 600 steps (300 epochs: it fits them); SD = stage 2 from theta_0 with teacher theta_1.
    Fine-tuned top-1 (on the 128 labelled images, 2 000 held-out test images of 5-9) with and without SD, and the
    5-way linear probe (2 000 / 2 000 images of 5-9) of theta_0, theta_1, SD and a random encoder.

    Settings: ViT 4 x 64 with a class token, patch 7 (4 x 4 grid), mask 0.75, norm-pix, decoder 1 x 64; stage 0: 600
    steps of 128 images (16 384 images of 0-4, MAE crops), lr 1.5e-3, warmup 60, cosine, wd 0.05; stages 1 and 2: batch
    64, no augmentation, AdamW (0.9, 0.95), lr 1e-3 linear to 0 without warmup, wd 0.01, SD feature cls, weight 1;
    fine-tuning: 150 steps of 64 (crops 0.5-1 + flip), CLS head, lr 1e-3, layer decay 0.75, warmup 15.
    Measured (seeds 0 / 1 / 2, BENCHMARKS.md): fine-tuned top-1 theta_0 0.752 / 0.746 / 0.761, theta_1 0.766 / 0.791 /
    0.758, SD 0.781 / 0.787 / 0.763; probe theta_0 0.875 / 0.864 / 0.886, theta_1 0.896 / 0.887 / 0.893, SD 0.894 /
    0.884 / 0.893, random 0.833 / 0.832 / 0.849. Only what held on every seed is asserted: every pretrained encoder
    beats the random one on the probe, and SD's total and distillation losses fall; SD minus theta_1 (fine-tune +1.5 /
    -0.4 / +0.5 points, probe -0.2 / -0.4 / 0.0) is within the noise, so it is printed, not asserted.
    About 95 s on 2 CPU cores.
    """
    out = sd_comparison(0, tmp_path)
    print("SD e2e:", ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    for name in ("theta0", "theta1", "sd"):
        assert out[f"probe_{name}"] > out["probe_random"] + 0.015, out
    assert out["stage2_total_last"] < 0.5 * out["stage2_total_first"], out
    assert out["stage2_distill_last"] < 0.1 * out["stage2_distill_first"], out
    assert out["stage2_mae_last"] < out["stage2_mae_first"], out
