"""Fine-tuning: MAE's layer-wise lr decay, Mixup/CutMix, erasing, top-k, FinetuneModule from every checkpoint kind,
the `mim finetune` debug recipes end to end, and the errors for data that does not fit the encoder."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mim.load
from mim.augment import MixupCutmix, random_erase, smooth_one_hot
from mim.checkpoint import CheckpointError
from mim.finetune import FinetuneModule, check_data, topk_correct
from mim.masking import RandomMasking
from mim.module import PretrainModule
from mim.optim import layer_decay_groups
from mim.targets import LatentTarget, PixelTarget
from tests.factories import TINY_VIT, tiny_encoder, tiny_video_encoder

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ROOT / "recipes" / "debug"
needs_data = pytest.mark.usefixtures("fashion_mnist")


# ---------------------------------------------------------------------------------------------- parts
def test_layer_decay_groups_match_mae_formula():
    """lr_scale = ld ** (num_layers - layer): embeddings ld^(depth+1), block i ld^(depth-i), head 1 (MAE lr_decay.py)."""
    encoder = tiny_encoder(model_kwargs={**TINY_VIT, "depth": 3})
    module = nn.ModuleDict({"encoder": encoder, "head": nn.Linear(64, 5)})
    groups = layer_decay_groups(
        module.named_parameters(),
        weight_decay=0.05,
        layer_decay=0.5,
        num_layers=4,
        layer_of=lambda n: encoder.layer_id(n.removeprefix("encoder.")) if n.startswith("encoder.") else 4,
        no_weight_decay={f"encoder.{n}" for n in encoder.no_weight_decay()},
    )
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["encoder.vit.patch_embed.proj.weight"] == 0.5**4
    assert scale["encoder.vit.cls_token"] == 0.5**4
    for i in range(3):
        assert scale[f"encoder.vit.blocks.{i}.attn.qkv.weight"] == 0.5 ** (3 - i)
    assert scale["head.weight"] == scale["encoder.vit.norm.weight"] == 1.0
    assert decay["encoder.vit.blocks.0.attn.qkv.weight"] == decay["head.weight"] == 0.05
    for name in ("encoder.vit.blocks.0.attn.qkv.bias", "encoder.vit.norm.weight", "encoder.vit.cls_token"):
        assert decay[name] == 0.0, name
    assert "encoder.vit.pos_embed" not in scale  # frozen sin-cos table: in no group
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert sorted(scale) == sorted(trainable)


def test_smooth_one_hot_values():
    y = smooth_one_hot(torch.tensor([2, 0]), 4, smoothing=0.1)
    torch.testing.assert_close(y[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    torch.testing.assert_close(y.sum(1), torch.ones(2))


def test_mixup_blends_inputs_and_targets_with_one_lambda():
    mixer = MixupCutmix(num_classes=3, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    kind, lam = mixer.draw(random.Random(5))
    assert kind == "mixup"
    mixed, target = mixer(x, labels, random.Random(5))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    expected = lam * nn.functional.one_hot(labels, 3).float() + (1 - lam) * nn.functional.one_hot(labels.flip(0), 3)
    torch.testing.assert_close(target, expected)


def test_cutmix_pastes_one_box_through_every_frame_and_corrects_lambda():
    mixer = MixupCutmix(num_classes=2, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    x = torch.arange(2 * 3 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 3, 4, 8, 8)  # clips (B, C, T, H, W)
    labels = torch.tensor([0, 1])
    found_box = False
    for seed in range(20):
        mixed, target = mixer(x, labels, random.Random(seed))
        changed = (mixed != x).any(dim=1)  # (B, T, H, W)
        assert torch.equal(changed[:, :1].expand_as(changed), changed)  # the same box in every frame
        area = changed[0, 0].float().mean().item()  # share of pixels from the partner
        torch.testing.assert_close(target[0], torch.tensor([1 - area, area]))
        torch.testing.assert_close(target.sum(1), torch.ones(2))
        found_box |= 0 < area < 1
    assert found_box


def test_mixer_is_deterministic_and_can_be_off():
    mixer = MixupCutmix(num_classes=4)
    x, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    a, b = mixer(x, labels, random.Random(1)), mixer(x, labels, random.Random(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    off = MixupCutmix(num_classes=4, mixup_alpha=0, cutmix_alpha=0, label_smoothing=0.1)
    assert not off.enabled
    same, target = off(x, labels, random.Random(1))
    assert same is x
    torch.testing.assert_close(target, smooth_one_hot(labels, 4, 0.1))
    with pytest.raises(ValueError, match="MixupCutmix.prob must be a number in \\[0, 1\\]"):
        MixupCutmix(num_classes=4, prob=1.5)


def test_random_erase_replaces_one_rectangle_per_erased_image():
    x = torch.zeros(8, 3, 16, 16)
    assert random_erase(x, random.Random(0), prob=0.0) is x
    erased = random_erase(x, random.Random(0), prob=1.0)
    assert torch.equal(x, torch.zeros_like(x))  # the input is not modified
    for image in erased:
        ys, xs = torch.nonzero((image != 0).any(0), as_tuple=True)
        assert len(ys) > 0
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert len(ys) == box  # one filled rectangle
        assert 0.02 * 256 * 0.5 <= box <= 256 / 3 * 1.5


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    hits = topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2, 5))
    assert hits[1].item() == 1 and hits[2].item() == 2 and hits[5].item() == 3


# ---------------------------------------------------------------------------------------------- module
def _pretrain_checkpoint(path: Path, *, jepa: bool = False) -> PretrainModule:
    """A PretrainModule on 16 x 16 RGB images, saved as a Lightning-style checkpoint with its mim block."""
    target = (
        LatentTarget(predictor_dim=32, predictor_depth=1)
        if jepa
        else PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=4)
    )
    module = PretrainModule(encoder=tiny_encoder(seed=3), masking=RandomMasking(mask_ratio=0.5), targets=[target])
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights that differ from any fresh init
    ckpt: dict = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return module


def test_finetune_module_from_a_pretraining_checkpoint(tmp_path: Path):
    pre = _pretrain_checkpoint(tmp_path / "pre.ckpt")
    ft = FinetuneModule(checkpoint=str(tmp_path / "pre.ckpt"), num_classes=7, drop_path_rate=0.2)
    own, src = ft.encoder.state_dict(), pre.encoder.state_dict()
    for key, value in src.items():
        if key.startswith("vit.norm."):
            assert key not in own  # MAE's global pooling drops the pretrained final norm ...
        else:
            assert torch.equal(own[key], value), key
    assert isinstance(ft.fc_norm, nn.LayerNorm)  # ... and normalises the pooled features instead
    assert ft.encoder.pos_embed.requires_grad  # the position table is trained from its sin-cos values
    assert ft.encoder.config["drop_path_rate"] == 0.2
    assert ft.head is not None and ft.head.weight.std().item() < 1e-4  # trunc-normal std 2e-5
    logits = ft(torch.randn(3, 3, 16, 16))
    assert logits.shape == (3, 7)


def test_finetune_module_reads_the_jepa_target_encoder(tmp_path: Path):
    pre = _pretrain_checkpoint(tmp_path / "jepa.ckpt", jepa=True)
    with torch.no_grad():
        pre.target_list[0].target_encoder.module.vit.blocks[0].attn.qkv.weight.add_(1.0)  # target != student
    ckpt: dict = {"state_dict": pre.state_dict()}
    pre.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "jepa.ckpt")
    student = FinetuneModule(checkpoint=str(tmp_path / "jepa.ckpt"), num_classes=3, global_pool="cls")
    target = FinetuneModule(
        checkpoint=str(tmp_path / "jepa.ckpt"), num_classes=3, which_encoder="target", global_pool="cls"
    )
    key = "vit.blocks.0.attn.qkv.weight"
    assert torch.equal(student.encoder.state_dict()[key], pre.encoder.state_dict()[key])
    assert torch.equal(target.encoder.state_dict()[key], pre.target_list[0].target_encoder.module.state_dict()[key])
    with pytest.raises(CheckpointError, match="no JEPA target encoder"):
        _pretrain_checkpoint(tmp_path / "mae.ckpt")
        FinetuneModule(checkpoint=str(tmp_path / "mae.ckpt"), num_classes=3, which_encoder="target")


def test_finetune_module_bad_inputs(tmp_path: Path):
    with pytest.raises(ValueError, match="needs a checkpoint"):
        FinetuneModule()
    with pytest.raises(ValueError, match="FinetuneModule.layer_decay must be a number in \\(0, 1\\], got 1.5"):
        FinetuneModule(encoder=tiny_encoder(), layer_decay=1.5)
    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="broken.ckpt: unreadable checkpoint") as err:
        FinetuneModule(checkpoint=str(tmp_path / "broken.ckpt"))
    assert "\n" not in str(err.value)
    (tmp_path / "notes.ckpt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.ckpt"):
        FinetuneModule(checkpoint=str(tmp_path / "notes.ckpt"))
    pre = tmp_path / "pre.ckpt"
    _pretrain_checkpoint(pre)
    with pytest.raises(CheckpointError, match="image encoder's checkpoint cannot initialise the recipe's video"):
        FinetuneModule(checkpoint=str(pre), encoder=tiny_video_encoder())
    with pytest.raises(CheckpointError, match="trained with in_chans=3, not 1"):
        mim.load.load_encoder(pre, in_chans=1)


class _Data:
    """A stand-in for a datamodule's attributes (check_data only reads them)."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def test_check_data_names_both_values():
    encoder = tiny_encoder()  # 16 x 16, 3 channels
    check_data(encoder, _Data(num_classes=4, in_chans=3, image_size=16), None)
    with pytest.raises(ValueError, match=r"img_size=\(16, 16\) but _Data yields 28 x 28 images: .*img_size=28"):
        check_data(encoder, _Data(num_classes=4, in_chans=3, image_size=28), None)
    with pytest.raises(ValueError, match="MaskedEncoder.in_chans=3 but _Data yields 1-channel images"):
        check_data(encoder, _Data(num_classes=4, in_chans=1, image_size=16), None)
    with pytest.raises(ValueError, match="num_classes is 10 but _Data has 4"):
        check_data(encoder, _Data(num_classes=4, in_chans=3, image_size=16), 10)
    with pytest.raises(ValueError, match="_Data has 1 class: fine-tuning a classifier needs at least 2"):
        check_data(encoder, _Data(num_classes=1, in_chans=3, image_size=16), None)
    with pytest.raises(ValueError, match="has no labels"):
        check_data(encoder, _Data(num_classes=None), None)
    with pytest.raises(ValueError, match="reads images but _Data yields tables"):
        check_data(encoder, _Data(num_classes=2, num_numeric=3, category_cardinalities=[]), None)


def test_img_size_override_rebuilds_the_sincos_table(tmp_path: Path):
    _pretrain_checkpoint(tmp_path / "pre.ckpt")
    ft = FinetuneModule(checkpoint=str(tmp_path / "pre.ckpt"), num_classes=2, img_size=24)
    assert ft.encoder.img_size == (24, 24) and ft.encoder.pos_embed.shape[1] == 1 + 36
    assert ft(torch.randn(2, 3, 24, 24)).shape == (2, 2)


# ---------------------------------------------------------------------------------------------- end to end
def _mim(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "mim", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@needs_data
def test_mim_finetune_debug_recipe_from_a_pretraining_run(tmp_path: Path):
    """`mim fit` then `mim finetune` on Fashion-MNIST: top-1/top-5 logged, the best checkpoint kept, `mim.load` and
    `mim test` read it back."""
    pre = _mim("fit", "-c", str(DEBUG / "mae_fashion_mnist.yaml"), f"--trainer.default_root_dir={tmp_path / 'pre'}",
               "--trainer.max_steps=3", "--trainer.limit_val_batches=1", cwd=tmp_path)  # fmt: skip
    assert pre.returncode == 0, pre.stderr[-3000:]
    ckpt = next((tmp_path / "pre").rglob("*.ckpt"))
    run = _mim("finetune", "-c", str(DEBUG / "finetune_fashion_mnist.yaml"), f"--model.init_args.checkpoint={ckpt}",
               "--encoder", "student", f"--trainer.default_root_dir={tmp_path / 'ft'}", "--trainer.max_epochs=2",
               cwd=tmp_path)  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "mim: fine-tuning the student encoder (encoder) of" in out
    assert "layer decay 0.75" in out
    best = [p for p in (tmp_path / "ft").rglob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best) == 1
    saved = torch.load(best[0], map_location="cpu", weights_only=True)
    assert saved["mim"]["kind"] == "finetune" and saved["mim"]["num_classes"] == 10
    assert any(k.startswith("ema.") for k in saved["state_dict"])
    metrics = (next((tmp_path / "ft").rglob("metrics.csv"))).read_text().splitlines()[0].split(",")
    assert {"val/top1", "val/top5", "val/ema_top1", "train/loss"} <= set(metrics)
    module = mim.load.load(best[0])
    assert isinstance(module, FinetuneModule) and not module.training
    for key, value in saved["state_dict"].items():
        if isinstance(value, torch.Tensor):  # (EMA copies also hold an _extra_state dict)
            assert torch.equal(module.state_dict()[key], value), key
    test = _mim("test", "-c", str(DEBUG / "finetune_fashion_mnist.yaml"), f"--ckpt_path={best[0]}",
                f"--trainer.default_root_dir={tmp_path / 'test'}", cwd=tmp_path)  # fmt: skip
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/top1" in test.stdout


@needs_data
def test_finetuning_learns_fashion_mnist(tmp_path: Path):
    """128 steps on 2048 images from random init, without augmentation: top-1 far above chance (0.1) on 128 held-out
    test images (measured 0.58)."""
    from mim.lightning_cli import build

    cli = build(["--config", str(DEBUG / "finetune_fashion_mnist.yaml"), f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.max_epochs=4", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=null",
                 "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
                 "--model.init_args.mixup=0", "--model.init_args.cutmix=0", "--model.init_args.random_erasing=0",
                 "--model.init_args.blr=5e-3", "--model.init_args.layer_decay=1.0", "--data.init_args.num_train=2048",
                 "--data.init_args.augment=false"], save_config_callback=None)  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    top1 = cli.trainer.callback_metrics["val/top1"].item()
    assert top1 > 0.45, top1


def test_finetune_video_recipe_on_real_clips(real_clips: Path, tmp_path: Path):
    """Two classes of real H.264 clips: Mixup/CutMix on whole clips, top-1 logged."""
    from mim.lightning_cli import build

    for i, clip in enumerate(sorted(real_clips.glob("*.mp4"))):
        (tmp_path / "clips" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, tmp_path / "clips" / f"class{i % 2}" / clip.name)
    cli = build(["--config", str(DEBUG / "finetune_video.yaml"), f"--data.init_args.root={tmp_path / 'clips'}",
                 f"--data.init_args.val_root={tmp_path / 'clips'}", f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.enable_progress_bar=false"], save_config_callback=None)  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.num_classes == 2
    assert 0.0 <= cli.trainer.callback_metrics["val/top1"].item() <= 1.0
    assert math.isfinite(cli.trainer.callback_metrics["train/loss"].item())


def test_finetune_table_recipe_from_a_table_checkpoint(tmp_path: Path):
    """A table encoder pretrained with recipes/debug/mae_table.yaml fine-tunes on the same columns; loads by path."""
    from mim.data.tables import sklearn_table
    from mim.lightning_cli import build

    csv = sklearn_table("breast_cancer", tmp_path)
    pre = build(["--config", str(DEBUG / "mae_table.yaml"), f"--data.init_args.train_path={csv}",
                 f"--trainer.default_root_dir={tmp_path / 'pre'}", "--trainer.max_epochs=1",
                 "--trainer.enable_progress_bar=false"], save_config_callback=None)  # fmt: skip
    pre.trainer.fit(pre.model, datamodule=pre.datamodule)
    ckpt = next((tmp_path / "pre").rglob("*.ckpt"))
    loaded = mim.load.load(ckpt)  # a PretrainModule with a table encoder, schema from the checkpoint
    assert isinstance(loaded, PretrainModule) and loaded.encoder.is_configured
    cli = build(["--config", str(DEBUG / "finetune_table.yaml"), f"--data.init_args.train_path={csv}",
                 f"--model.init_args.checkpoint={ckpt}", f"--trainer.default_root_dir={tmp_path / 'ft'}",
                 "--trainer.max_epochs=4", "--trainer.enable_progress_bar=false"], save_config_callback=None)  # fmt: skip
    encoder_before = {k: v.clone() for k, v in cli.model.encoder.state_dict().items()}
    for key, value in loaded.encoder.state_dict().items():
        if not key.startswith("vit.norm."):
            assert torch.equal(encoder_before[key], value), key
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.callback_metrics["val/top1"].item() > 0.8  # breast cancer: two well-separated classes


def test_pretrain_module_loads_from_its_checkpoint_alone(tmp_path: Path, fashion_mnist):
    """`mim.load(ckpt)` and `PretrainModule.load_from_checkpoint(ckpt)` rebuild the module from the recorded recipe."""
    from mim.lightning_cli import build

    cli = build(["--config", str(DEBUG / "mae_fashion_mnist.yaml"), f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"],
                save_config_callback=None)  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    hp = saved["hyper_parameters"]
    assert hp["_class_path"] == "mim.PretrainModule" or hp["_class_path"].endswith("PretrainModule")
    assert hp["encoder"]["init_args"]["arch"] == "vit_tiny_patch16_224"
    json.dumps(hp)  # the recipe is plain data
    for module in (mim.load.load(ckpt), PretrainModule.load_from_checkpoint(ckpt, map_location="cpu")):
        assert isinstance(module, PretrainModule)
        for key, value in saved["state_dict"].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(module.state_dict()[key], value), key
    encoder = mim.load.load(ckpt, what="encoder")
    assert torch.equal(
        encoder.vit.blocks[0].attn.qkv.weight, saved["state_dict"]["encoder.vit.blocks.0.attn.qkv.weight"]
    )


def test_load_refuses_a_module_built_in_python(tmp_path: Path):
    _pretrain_checkpoint(tmp_path / "pre.ckpt")
    with pytest.raises(CheckpointError, match="holds no recipe"):
        mim.load.load(tmp_path / "pre.ckpt")
    encoder = mim.load.load(tmp_path / "pre.ckpt", what="encoder")  # the encoder alone always loads
    assert not encoder.training


def test_rand_augment_transform_on_tensors_and_pil():
    """MAE's fine-tuning augmentation runs on grey tensors (Fashion-MNIST) and RGB PIL images, uint8 out."""
    from PIL import Image

    from mim.data.transforms import mae_train_transform

    tf = mae_train_transform(28, scale=(0.08, 1.0), rand_augment=9)
    torch.manual_seed(0)
    grey = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    outs = [tf(grey) for _ in range(8)]
    assert all(o.shape == (1, 28, 28) and o.dtype == torch.uint8 for o in outs)
    assert len({o.sum().item() for o in outs}) > 1  # random
    rgb = Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy())
    assert tf(rgb).shape == (3, 28, 28)
    with pytest.raises(ValueError, match="mae_train_transform.rand_augment must be an integer in \\[0, 30\\], got 31"):
        mae_train_transform(28, rand_augment=31)


def test_finetune_on_labelled_shards(tmp_path: Path):
    """`mim pack` shards keep each image's class; FinetuneModule trains and validates on them."""
    from PIL import Image

    from mim.data import ShardDataModule
    from mim.data.pack import pack
    from tests.factories import cpu_trainer

    for cls, colour in (("dark", (30, 30, 30)), ("light", (220, 220, 220))):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 20), tuple(c + 3 * i for c in colour)).save(tmp_path / "images" / cls / f"{i}.png")
    pack(tmp_path / "images", tmp_path / "shards", shard_samples=4, progress=False)
    data = ShardDataModule(urls=str(tmp_path / "shards"), val_urls=str(tmp_path / "shards"), image_size=16,
                           batch_size=4, crop_scale=(0.5, 1.0), rand_augment=9)  # fmt: skip
    module = FinetuneModule(encoder=tiny_encoder(), lr=1e-3, warmup_steps=0, mixup=0, cutmix=0, random_erasing=0)
    trainer = cpu_trainer(max_steps=6, max_epochs=-1, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert module.num_classes == 2
    assert 0.0 <= trainer.callback_metrics["val/top1"].item() <= 1.0


def test_finetune_from_a_timm_model(tmp_path: Path):
    """`checkpoint="timm:local-dir:FOLDER"`: a timm hub-layout folder (here a `mim export`) initialises the encoder;
    a name timm cannot load is one clear error."""
    from mim.export import export_encoder

    pre = _pretrain_checkpoint(tmp_path / "pre.ckpt")
    export_encoder(tmp_path / "pre.ckpt", tmp_path / "vit")
    ft = FinetuneModule(checkpoint=f"timm:local-dir:{tmp_path / 'vit'}", num_classes=4)
    for key, value in pre.encoder.state_dict().items():
        if not key.startswith("vit.norm."):
            assert torch.equal(ft.encoder.state_dict()[key], value), key
    assert ft(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    with pytest.raises(CheckpointError, match="timm:local-dir:.*nope: timm could not load it"):
        FinetuneModule(checkpoint=f"timm:local-dir:{tmp_path / 'nope'}", num_classes=4)


@needs_data
def test_mim_finetune_bad_input_is_one_line(tmp_path: Path, capsys):
    """A text file as checkpoint, and images of another size than the encoder's: `mim finetune` says so in one line
    (exit 2) before training, without a traceback."""
    from mim.cli import main

    (tmp_path / "notes.ckpt").write_text("hello")
    recipe = str(DEBUG / "finetune_fashion_mnist.yaml")
    root = f"--trainer.default_root_dir={tmp_path}"
    assert main(["finetune", "-c", recipe, f"--model.init_args.checkpoint={tmp_path / 'notes.ckpt'}", root]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("mim finetune: error:")]
    assert line.startswith(
        f"mim finetune: error: {tmp_path / 'notes.ckpt'}: a text file, not a checkpoint (it begins 'hello')"
    )
    assert main(["finetune", "-c", recipe, "--data.init_args.image_size=32", root]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("mim finetune: error:")]
    assert "yields 32" in line and "28" in line, line
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))[1:]  # only the text file: nothing was trained


@needs_data
def test_predict_returns_probabilities(tmp_path: Path):
    """`mim predict` on a fine-tuning recipe: class probabilities, the argmax and the labels of the held-out split."""
    from mim.lightning_cli import build

    cli = build(["--config", str(DEBUG / "finetune_fashion_mnist.yaml"), f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.limit_predict_batches=2", "--trainer.enable_progress_bar=false",
                 "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"],
                save_config_callback=None)  # fmt: skip
    cli.model.configure_data(cli.datamodule)
    outs = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert outs
    for out in outs:  # one dict per batch of the held-out split
        b = out["label"].shape[0]
        assert out["probs"].shape == (b, 10)
        torch.testing.assert_close(out["probs"].sum(1), torch.ones(b))
        assert torch.equal(out["pred"], out["probs"].argmax(1))


def test_seeded_rand_augment_replays_with_the_same_draws():
    """The shard readers' RandAugment is a function of the per-sample generator (resume replays it) and leaves
    torch's global generator alone."""
    from mim.data.transforms import seeded_rand_augment

    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    a = seeded_rand_augment(image, 9, random.Random(1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, seeded_rand_augment(image, 9, random.Random(1)))
    assert any(not torch.equal(a, seeded_rand_augment(image, 9, random.Random(s))) for s in range(2, 6))
