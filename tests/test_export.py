"""mim export: checkpoint -> timm model folder (weights + config.json with the data settings) or mim's layout; atomic,
strict in timm, same features as the MaskedEncoder, other image sizes, one-line errors."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from timm.layers import resample_abs_pos_embed
from timm.models import PretrainedCfg

import mim.load
from mim.cli import main as cli_main
from mim.data import ImageFolderDataModule
from mim.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from mim.export import create_model, encoder_timm_kwargs, export_encoder
from mim.finetune import FinetuneModule
from mim.masking import RandomMasking
from mim.models import MaskedEncoder
from mim.models.embed import sincos_2d, sincos_for_grid
from mim.models.teacher import MIM_EXPORT_FORMAT, FrozenTeacher, read_weights
from mim.module import PretrainModule
from mim.targets import PixelTarget
from mim.types import TokenGrid
from tests.factories import TINY_ARCH, tiny_encoder, tiny_video_encoder

ARCH = TINY_ARCH
DEBUG = Path(__file__).resolve().parent.parent / "recipes" / "debug"
# one channel, a non-square 4 x 5 grid
_encoder = partial(
    tiny_encoder, img_size=(16, 20), in_chans=1, model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}
)


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():  # weights unlike any init (the frozen sin-cos table kept), so a mix-up cannot pass
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def _checkpoint(tmp_path: Path, encoder: MaskedEncoder | None = None) -> tuple[Path, MaskedEncoder]:
    """A checkpoint as Lightning writes it for a PretrainModule (state_dict + on_save_checkpoint's "mim" entry)."""
    encoder = encoder or _encoder()
    module = PretrainModule(
        encoder=encoder,
        masking=RandomMasking(),
        targets=[PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)],
    )
    _perturb(module)
    checkpoint = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 1}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / "run.ckpt"
    torch.save(checkpoint, path)
    return path, module.encoder


def _fit(recipe: str, root: Path, *args: str) -> Path:
    """A real checkpoint: ``recipe`` fitted for 2 steps by Lightning; returns the .ckpt."""
    from mim.lightning_cli import build

    cli = build(["--config", str(DEBUG / recipe), f"--trainer.default_root_dir={root}", "--trainer.max_steps=2",
                 "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", *args],
                save_config_callback=None)  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return next(root.rglob("*.ckpt"))


@pytest.fixture(scope="module")
def fashion_ckpt(tmp_path_factory, fashion_mnist) -> Path:
    """recipes/debug/mae_fashion_mnist.yaml after 2 steps: an encoder of 28-px grey images in patches of 4."""
    return _fit("mae_fashion_mnist.yaml", tmp_path_factory.mktemp("fashion"))


# ------------------------------------------------------------------------------------ data settings
def test_a_fit_checkpoint_records_its_data_settings(fashion_ckpt: Path):
    saved = torch.load(fashion_ckpt, map_location="cpu", weights_only=True)
    assert saved["mim"]["format"] == 1 and saved["mim"]["encoder"]["arch"] == ARCH  # the existing keys stay
    assert saved["mim"]["data"] == {
        "input_size": [1, 28, 28],
        "mean": list(FASHION_MNIST_MEAN),
        "std": list(FASHION_MNIST_STD),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
    }


def test_datamodules_give_timm_data_configs(tmp_path: Path):
    for i, name in enumerate(["a/1.png", "b/2.png"]):
        (tmp_path / name).parent.mkdir()
        Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(tmp_path / name)
    folder = ImageFolderDataModule(root=tmp_path, image_size=16, batch_size=2, eval_crop_pct=0.8)
    assert folder.data_config() == {
        "input_size": [3, 16, 16],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
        "crop_pct": 0.8,
    }
    assert PretrainedCfg(**folder.data_config()).input_size == [3, 16, 16]  # every field is one of timm's
    # FinetuneModule records them too (PretrainModule: test_a_fit_checkpoint_records_its_data_settings)
    module = FinetuneModule(encoder=_encoder(), num_classes=2)
    module._trainer = SimpleNamespace(datamodule=folder)  # type: ignore[assignment]
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["mim"]["data"] == folder.data_config() and checkpoint["mim"]["kind"] == "finetune"


def test_video_datamodule_data_config(real_clips: Path):
    from mim.data import VideoDataModule

    dm = VideoDataModule(root=real_clips, num_frames=4, image_size=16, resize_short=20, in_chans=1, batch_size=1)
    assert dm.data_config() == {
        "input_size": [1, 16, 16],
        "num_frames": 4,
        "mean": [0.449],
        "std": [0.226],
        "interpolation": "bicubic",
        "crop_pct": 0.8,  # validation: shorter side to 20, centre crop 16
    }


# ------------------------------------------------------------------------------------ timm layout
def test_timm_builds_the_export_from_its_folder_alone(fashion_ckpt: Path, tmp_path: Path, capsys):
    """`mim export CKPT DIR`; then `timm.create_model("local-dir:DIR", pretrained=True, num_classes=N)` with nothing
    else has the training input (28 px, patches of 4, 1 channel), a new head of N classes, the encoder's weights, and
    `resolve_data_config` returns the training input size, mean and std. `mim.export.create_model` does the same."""
    out = tmp_path / "fmnist"
    assert cli_main(["export", str(fashion_ckpt), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"timm.create_model('local-dir:{out}', pretrained=True, num_classes=N)" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temporary left
    hub = json.loads((out / "config.json").read_text())
    assert hub["architecture"] == ARCH and hub["num_classes"] == 0 and hub["num_features"] == 64
    assert hub["model_args"] == {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": [28, 28],
                                 "patch_size": [4, 4], "in_chans": 1}  # fmt: skip
    saved = torch.load(fashion_ckpt, map_location="cpu", weights_only=True)
    trained = {
        k.removeprefix("encoder.vit."): v for k, v in saved["state_dict"].items() if k.startswith("encoder.vit.")
    }
    reference = mim.load.load_encoder(fashion_ckpt).eval()
    x = torch.randn(2, 1, 28, 28)
    for build in (
        lambda n: timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=n),
        lambda n: create_model(out, num_classes=n),
        lambda n: create_model(out / "model.safetensors", num_classes=n),
    ):
        model = build(10).eval()
        assert model.patch_embed.img_size == (28, 28) and model.patch_embed.patch_size == (4, 4)
        assert model.patch_embed.proj.in_channels == 1 and model.head.weight.shape == (10, 64)
        state = model.state_dict()
        assert set(state) - set(trained) == {"head.weight", "head.bias"}  # the new head, nothing else missing
        for name, value in trained.items():
            assert torch.equal(state[name], value), name
        data = timm.data.resolve_data_config({}, model=model)
        assert data["input_size"] == (1, 28, 28) and data["interpolation"] == "bicubic" and data["crop_pct"] == 1.0
        assert tuple(data["mean"]) == FASHION_MNIST_MEAN and tuple(data["std"]) == FASHION_MNIST_STD
        with torch.no_grad():
            assert model(x).shape == (2, 10)
            features = build(0).eval()  # num_classes=0: the bare encoder, loaded strictly
            torch.testing.assert_close(features.forward_features(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_loads_strictly_into_timm_with_the_same_features(tmp_path: Path, suffix: str):
    ckpt, encoder = _checkpoint(tmp_path)
    out = export_encoder(ckpt, tmp_path / "out" / f"encoder{suffix}")
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, "config.json"])  # no temporary left
    state, meta = read_weights(out)
    assert meta is not None
    assert meta["format"] == MIM_EXPORT_FORMAT and meta["layout"] == "timm" and meta["arch"] == ARCH
    assert meta["encoder"] == json.loads(json.dumps(encoder.config))
    kwargs = meta["timm_kwargs"]
    assert kwargs == encoder_timm_kwargs(encoder.config)
    assert meta["data"] is None and meta["pretrained_cfg"]["input_size"] == [1, 16, 20]  # no datamodule: defaults
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **kwargs).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(3, 1, 16, 20)
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encoder(x), rtol=1e-5, atol=1e-5)
        # timm's plain pretrained-file path: the file gives only the tensors, the arguments are the caller's
        via_timm = timm.create_model(
            ARCH, pretrained=True, pretrained_cfg_overlay={"file": str(out)}, num_classes=0, **kwargs
        )
        torch.testing.assert_close(via_timm.eval().forward_features(x), encoder(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(create_model(out).eval().forward_features(x), encoder(x), rtol=1e-5, atol=1e-5)
    if suffix == ".safetensors":
        with safe_open(str(out), framework="pt") as f:
            assert json.loads(f.metadata()["mim"])["timm_kwargs"] == kwargs
    else:
        raw = torch.load(out, weights_only=True)
        assert set(raw) == {"state_dict", "mim"}


def test_export_at_another_image_size(tmp_path: Path, capsys):
    """`--img-size 24 28`: the model runs at 24 x 28 and its table is the sin-cos table of the 6 x 7 grid."""
    ckpt, _ = _checkpoint(tmp_path)
    out = tmp_path / "big"
    assert cli_main(["export", str(ckpt), str(out), "--img-size", "24", "28"]) == 0
    assert "input_size (1, 24, 28)" in capsys.readouterr().out
    model = create_model(out).eval()
    assert model.patch_embed.img_size == (24, 28)
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(32, (6, 7), num_prefix_tokens=1), rtol=0, atol=0)
    reference = mim.load.load_encoder(ckpt, img_size=(24, 28)).eval()  # mim's own resize: the same table
    x = torch.randn(2, 1, 24, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference(x), rtol=1e-5, atol=1e-5)
    assert mim.load.load_encoder(out / "model.safetensors").img_size == (24, 28)
    with pytest.raises(SystemExit):
        cli_main(["export", str(ckpt), str(tmp_path / "odd"), "--img-size", "26"])
    assert "multiple of the patch size (4, 4)" in capsys.readouterr().err


def test_a_finetuned_checkpoint_exports_its_classifier_and_resamples_its_trained_table(tmp_path: Path):
    """MAE fine-tuning (avg pool + fc_norm + head, trained position table) is timm's ViT with global_pool='avg'."""
    module = FinetuneModule(encoder=_encoder(), num_classes=3).eval()
    _perturb(module)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "ft.ckpt")
    export_encoder(tmp_path / "ft.ckpt", tmp_path / "ft")
    classifier = timm.create_model(f"local-dir:{tmp_path / 'ft'}", pretrained=True).eval()
    assert classifier.num_classes == 3 and classifier.global_pool == "avg"
    x = torch.randn(2, 1, 16, 20)
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), module(x), rtol=1e-5, atol=1e-5)
    out = export_encoder(tmp_path / "ft.ckpt", tmp_path / "ft384", img_size=(24, 28))
    table = module.encoder.pos_embed.detach()  # (1, 1 + 4 * 5, D), trained
    expected = resample_abs_pos_embed(table, new_size=[6, 7], old_size=[4, 5], num_prefix_tokens=1)
    torch.testing.assert_close(read_weights(out)[0]["pos_embed"], expected)
    assert create_model(out, num_classes=5)(torch.randn(1, 1, 24, 28)).shape == (1, 5)


def test_export_is_a_teacher_file(tmp_path: Path):
    """The export serves as a FrozenTeacher file; its block outputs are the encoder's (before the final norm)."""
    ckpt, encoder = _checkpoint(tmp_path, _encoder(img_size=16, in_chans=3))
    out = export_encoder(ckpt, tmp_path / "teacher.safetensors")
    meta = read_weights(out)[1]
    assert meta is not None
    teacher = FrozenTeacher(arch=meta["arch"], checkpoint=out, model_kwargs=meta["timm_kwargs"])
    x = torch.randn(2, 3, 16, 16)
    vit = encoder.vit.eval()
    with torch.no_grad():
        expected = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))
    torch.testing.assert_close(teacher(x, [-1]).features[1], expected, rtol=1e-5, atol=1e-5)


def test_export_is_atomic(tmp_path: Path, monkeypatch):
    ckpt, _ = _checkpoint(tmp_path)
    out = tmp_path / "out" / "enc.pt"
    out.parent.mkdir()
    out.write_bytes(b"previous export")

    def failing_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_encoder(ckpt, out)
    assert out.read_bytes() == b"previous export"  # the old file is intact, the partial one removed
    assert [p.name for p in out.parent.iterdir()] == ["enc.pt"]


def test_export_the_jepa_target_encoder(tmp_path: Path):
    """`--encoder targets.0.target_encoder.module` exports the EMA target encoder (what I-JEPA evaluates)."""
    from mim.targets import LatentTarget

    module = PretrainModule(
        encoder=_encoder(),
        masking=RandomMasking(),
        targets=[LatentTarget(predictor_dim=16, predictor_depth=1, predictor_num_heads=2)],
    )
    _perturb(module.encoder)  # student and target encoder differ, so a mix-up cannot pass
    checkpoint = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 1}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "jepa.ckpt")
    args = [
        "export",
        str(tmp_path / "jepa.ckpt"),
        str(tmp_path / "target.pt"),
        "--encoder",
        "targets.0.target_encoder.module",
    ]
    assert cli_main(args) == 0
    exported = read_weights(tmp_path / "target.pt")[0]
    target = module.target_list[0].target_encoder.module.vit.state_dict()
    assert exported.keys() == target.keys()
    for name, value in target.items():
        torch.testing.assert_close(exported[name], value, msg=name)
    student = export_encoder(tmp_path / "jepa.ckpt", tmp_path / "student.pt")
    assert not torch.equal(read_weights(student)[0]["blocks.0.attn.qkv.weight"], target["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="encoders found"):
        export_encoder(tmp_path / "jepa.ckpt", tmp_path / "x.pt", encoder="targets.3.nothing")


# ------------------------------------------------------------------------------------ mim layout
def test_a_table_checkpoint_exports_in_mim_layout(tmp_path: Path, capsys):
    """A table encoder (no timm equivalent) is written with its config and the fitted preprocessing; mim reads it."""
    from mim.data.tables import sklearn_table

    csv = sklearn_table("breast_cancer", tmp_path)
    ckpt = _fit("mae_table.yaml", tmp_path / "run", f"--data.init_args.train_path={csv}")
    out = tmp_path / "table.safetensors"
    assert cli_main(["export", str(ckpt), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no timm equivalent" in printed and "mim.load.load_encoder" in printed
    assert not (tmp_path / "config.json").exists()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = json.loads(safe_open(str(out), framework="pt").metadata()["mim"])
    assert meta["layout"] == "mim" and meta["encoder"]["class"] == "MaskedTableEncoder"
    assert meta["data"] == saved["mim"]["data"] and meta["data"]["input_size"] == [30]  # 30 features
    assert meta["data"]["preprocessor"] == saved["TableDataModule"]["preprocessor"]
    expected = mim.load.load_encoder(ckpt).state_dict()
    loaded = mim.load.load_encoder(out).state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())
    tuned = FinetuneModule(checkpoint=str(out), num_classes=2).encoder.state_dict()  # its final norm dropped (MAE)
    assert all(torch.equal(v, expected[k]) for k, v in tuned.items())


def test_a_video_checkpoint_exports_in_mim_layout(tmp_path: Path):
    ckpt, encoder = _checkpoint(tmp_path, tiny_video_encoder())
    out = export_encoder(ckpt, tmp_path / "video.pt")
    assert not (tmp_path / "config.json").exists()
    loaded = mim.load.load_encoder(out).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder.eval()(x))
    bigger = mim.load.load_encoder(export_encoder(ckpt, tmp_path / "video24.pt", img_size=24))
    assert bigger.grid == TokenGrid(2, 6, 6)
    torch.testing.assert_close(bigger.pos_embed[0], sincos_for_grid(64, TokenGrid(2, 6, 6), 1), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ errors
def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    ckpt, _ = _checkpoint(tmp_path)
    data = ckpt.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    return {
        "missing": (tmp_path / "missing.ckpt", "no such checkpoint"),
        "truncated": (tmp_path / "truncated.ckpt", "truncated or corrupt"),
        "text": (tmp_path / "notes.txt", "a text file, not a checkpoint"),
        "other kind": (tmp_path / "other.ckpt", "not a mim checkpoint"),
        "corrupt safetensors": (tmp_path / "corrupt.safetensors", "truncated or corrupt"),
    }


def test_unreadable_input_is_one_error_line_naming_the_file(tmp_path: Path, capsys):
    for case, (path, reason) in _bad_inputs(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["export", str(path), str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, case
        assert err.startswith("mim export: error: ") and err.count("\n") == 1, (case, err)
        assert str(path) in err and reason in err and "Traceback" not in err, (case, err)
    assert not (tmp_path / "out").exists()
