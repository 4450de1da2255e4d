"""MaskAlign end to end on real data (Fashion-MNIST): a short MAE run -> `mim export` -> MaskAlign with that file
as the frozen teacher -> the quickstart's linear probe: the MaskAlign student beats the same ViT at random init.
On the way, the MAE run's encoder fine-tunes better than the same ViT from random init (same steps)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
import torch

from mim.export import export_encoder
from mim.lightning_cli import build
from mim.models.teacher import read_weights
from mim.probe import encoder_features, linear_probe
from mim.quickstart import _probe_table
from tests.factories import binomial_se, finetune_top1

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "debug"
FINETUNE_STEPS, FINETUNE_TEST = 150, 2000
# A 4-block width-64 ViT on 7x7 patches (16 tokens): small enough for ~1 min of MAE on one thread, where a
# 4x4-patch model needs several minutes before its probe leaves random init behind (measured).
ENCODER = [
    "--model.init_args.encoder.init_args.patch_size=7",
    "--model.init_args.encoder.init_args.model_kwargs={embed_dim: 64, depth: 4, num_heads: 4}",
]
COMMON = [
    "--data.init_args.num_train=10000",
    "--data.init_args.batch_size=128",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.max_epochs=-1",
]


def _fit(recipe: str, root: Path, *overrides: str):
    cli = build(
        ["--config", str(RECIPES / recipe), f"--trainer.default_root_dir={root}", *ENCODER, *COMMON, *overrides],
        save_config_callback=None,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("fashion_mnist")
def test_maskalign_student_beats_random_init(tmp_path: Path):
    start = time.time()
    mae = _fit(
        "mae_fashion_mnist.yaml",
        tmp_path / "mae",
        "--trainer.max_steps=600",
        "--model.init_args.lr=3e-3",
        "--model.init_args.warmup_steps=60",
        "--model.init_args.targets.init_args.decoder_dim=64",
        "--model.init_args.targets.init_args.decoder_num_heads=4",
    )
    mae.trainer.save_checkpoint(tmp_path / "mae.ckpt")  # a real Lightning checkpoint (with the "mim" entry)
    mae_s = time.time() - start

    # Downstream: fine-tuning the MAE encoder beats fine-tuning the same ViT from random init, same steps, by more
    # than two standard errors of the difference (test images: binomial standard error per accuracy).
    from mim.load import load_encoder

    pretrained_encoder = load_encoder(tmp_path / "mae.ckpt")
    random_encoder = type(pretrained_encoder)(**pretrained_encoder.config)
    tuned, scratch = (
        finetune_top1(e, steps=FINETUNE_STEPS, num_test=FINETUNE_TEST) for e in (pretrained_encoder, random_encoder)
    )
    gap_se = (binomial_se(tuned, FINETUNE_TEST) ** 2 + binomial_se(scratch, FINETUNE_TEST) ** 2) ** 0.5
    print(
        f"\nfine-tuned {FINETUNE_STEPS} steps: MAE {tuned:.4f}, random init {scratch:.4f} (difference SE {gap_se:.4f})"
    )
    assert tuned - scratch > 2 * gap_se, (tuned, scratch, gap_se)

    teacher = export_encoder(tmp_path / "mae.ckpt", tmp_path / "teacher.safetensors")
    meta = read_weights(teacher)[1]
    maskalign = _fit(
        "maskalign_fashion_mnist.yaml",
        tmp_path / "maskalign",
        f"--model.init_args.targets.init_args.teacher_checkpoint={teacher}",
        f"--model.init_args.targets.init_args.teacher_kwargs={json.dumps(meta['timm_kwargs'])}",
        "--model.init_args.targets.init_args.layers=2",  # the last 2 of 4 teacher blocks
        "--trainer.max_steps=300",
        "--model.init_args.lr=3e-3",
        "--model.init_args.warmup_steps=30",
    )
    maskalign_s = time.time() - start - mae_s
    target = maskalign.model.target_list[0]
    assert target.teacher.sha256 is not None and not any(m.training for m in target.teacher.modules())

    probe_start = time.time()
    args = argparse.Namespace(probe_train=3000, probe_test=2000)
    results = list(_probe_table(maskalign.model, maskalign.datamodule, args).items())
    (_, student), (_, random_init), (_, pixels) = results
    # the teacher, on the same images (the quickstart's selection), for the record
    from mim.data import load_fashion_mnist, normalize_image

    dm = maskalign.datamodule
    x_tr, y_tr = load_fashion_mnist("train", root=getattr(dm, "root", None))
    x_te, y_te = load_fashion_mnist("test", root=getattr(dm, "root", None))
    g = torch.Generator().manual_seed(1234)
    tr, te = torch.randperm(60000, generator=g)[:3000], torch.randperm(10000, generator=g)[:2000]
    norm = lambda u: normalize_image(u, dm.mean, dm.std)  # noqa: E731
    feats = [encoder_features(mae.model.encoder, x, normalize=norm) for x in (x_tr[tr], x_te[te])]
    teacher_acc = linear_probe(feats[0], y_tr[tr], feats[1], y_te[te], num_classes=10).test_accuracy
    probe_s = time.time() - probe_start
    print(
        f"\nlinear probe (3000 train / 2000 test): MaskAlign student {student:.4f}, MAE teacher {teacher_acc:.4f}, "
        f"random init {random_init:.4f}, raw pixels {pixels:.4f}; MAE {mae_s:.0f} s, MaskAlign {maskalign_s:.0f} s, "
        f"probes {probe_s:.0f} s, total {time.time() - start:.0f} s"
    )
    assert student > random_init + 0.03, (student, random_init)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("fashion_mnist")
def test_mr_mae_debug_recipe_trains_and_resume_checks_the_teacher(tmp_path: Path):
    """recipes/debug/mr_mae_fashion_mnist.yaml through Lightning: both losses logged, the checkpoint holds no teacher
    tensors but its provenance; resuming with a replaced teacher file stops with a clear error."""
    import timm
    from safetensors.torch import save_file

    def write_teacher(seed: int) -> Path:
        torch.manual_seed(seed)
        kwargs = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 2, "num_heads": 2}
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
        path = tmp_path / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path

    teacher = write_teacher(0)
    args = [
        "--config",
        str(RECIPES / "mr_mae_fashion_mnist.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.targets.init_args.teacher_checkpoint={teacher}",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=3",
    ]
    cli = build([*args, "--trainer.max_steps=4"], save_config_callback=None)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    logged = cli.trainer.callback_metrics
    assert {"train/pixel/loss", "train/teacher/loss"} <= logged.keys()
    assert all(bool(torch.isfinite(logged[k])) for k in ("train/pixel/loss", "train/teacher/loss", "train/loss"))
    ckpt = next(tmp_path.rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert state["targets.1._extra_state"]["sha256"] == cli.model.target_list[1].teacher.sha256
    assert not any(".teacher." in k or k.startswith("targets.1.model") for k in state)

    resumed = build([*args, "--trainer.max_steps=6"], save_config_callback=None)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(ckpt))  # same teacher: fine
    assert resumed.trainer.global_step == 6
    write_teacher(1)  # the teacher file was replaced
    again = build([*args, "--trainer.max_steps=8"], save_config_callback=None)
    with pytest.raises(ValueError, match="teacher file changed"):
        again.trainer.fit(again.model, datamodule=again.datamodule, ckpt_path=str(ckpt))
