"""mim export: checkpoint -> timm state dict + config, atomic, strict in timm, same features as the MaskedEncoder."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from mim.cli import main as cli_main
from mim.export import encoder_timm_kwargs, export_encoder
from mim.masking import RandomMasking
from mim.models import MaskedEncoder
from mim.models.teacher import MIM_EXPORT_FORMAT, FrozenTeacher, read_weights
from mim.module import PretrainModule
from mim.targets import PixelTarget
from tests.factories import TINY_ARCH, tiny_encoder

ARCH = TINY_ARCH
# one channel, a non-square 4 x 5 grid
_encoder = partial(
    tiny_encoder, img_size=(16, 20), in_chans=1, model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}
)


def _checkpoint(tmp_path: Path, encoder: MaskedEncoder | None = None) -> tuple[Path, MaskedEncoder]:
    """A checkpoint as Lightning writes it for a PretrainModule (state_dict + on_save_checkpoint's "mim" entry)."""
    encoder = encoder or _encoder()
    module = PretrainModule(
        encoder=encoder,
        masking=RandomMasking(),
        targets=[PixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)],
    )
    with torch.no_grad():  # weights unlike any init, so a mix-up cannot pass
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    checkpoint = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 1}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / "run.ckpt"
    torch.save(checkpoint, path)
    return path, module.encoder


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_loads_strictly_into_timm_with_the_same_features(tmp_path: Path, suffix: str):
    ckpt, encoder = _checkpoint(tmp_path)
    out = export_encoder(ckpt, tmp_path / "out" / f"encoder{suffix}")
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left behind
    state, meta = read_weights(out)
    assert (
        meta["format"] == MIM_EXPORT_FORMAT
        and meta["arch"] == ARCH
        and meta["encoder"] == json.loads(json.dumps(encoder.config))
    )
    kwargs = meta["timm_kwargs"]
    assert kwargs == encoder_timm_kwargs(encoder.config)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **kwargs).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(3, 1, 16, 20)
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encoder(x), rtol=1e-5, atol=1e-5)
        # timm's own pretrained-file path: create_model(..., pretrained=True, overlay file=OUT)
        via_timm = timm.create_model(
            ARCH, pretrained=True, pretrained_cfg_overlay={"file": str(out)}, num_classes=0, **kwargs
        )
        torch.testing.assert_close(via_timm.eval().forward_features(x), encoder(x), rtol=1e-5, atol=1e-5)
    if suffix == ".safetensors":
        with safe_open(str(out), framework="pt") as f:
            assert json.loads(f.metadata()["mim"])["timm_kwargs"] == kwargs
    else:
        raw = torch.load(out, weights_only=True)
        assert set(raw) == {"state_dict", "mim"}


def test_export_is_a_teacher_file(tmp_path: Path):
    """The export serves as a FrozenTeacher file; its block outputs are the encoder's (before the final norm)."""
    ckpt, encoder = _checkpoint(tmp_path, _encoder(img_size=16, in_chans=3))
    out = export_encoder(ckpt, tmp_path / "teacher.safetensors")
    meta = read_weights(out)[1]
    teacher = FrozenTeacher(arch=meta["arch"], checkpoint=out, model_kwargs=meta["timm_kwargs"])
    x = torch.randn(2, 3, 16, 16)
    vit = encoder.vit.eval()
    with torch.no_grad():
        expected = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))
    torch.testing.assert_close(teacher(x, [-1]).features[1], expected, rtol=1e-5, atol=1e-5)


def test_cli_export(tmp_path: Path, capsys):
    ckpt, _ = _checkpoint(tmp_path)
    out = tmp_path / "enc.safetensors"
    assert cli_main(["export", str(ckpt), str(out)]) == 0
    assert out.is_file()
    printed = capsys.readouterr().out
    assert "wrote" in printed and "teacher_checkpoint" in printed
    with pytest.raises(SystemExit):
        cli_main(["export", str(tmp_path / "missing.ckpt"), str(out)])
    assert "checkpoint not found" in capsys.readouterr().err


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


def test_export_rejects_what_it_cannot_export(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        export_encoder(tmp_path / "nope.ckpt", tmp_path / "x.pt")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    with pytest.raises(ValueError, match="not a mim pretraining checkpoint"):
        export_encoder(plain, tmp_path / "x.pt")
    video, _ = _checkpoint(tmp_path, _encoder(img_size=16, num_frames=4, tubelet_size=2))
    with pytest.raises(ValueError, match="video encoder"):
        export_encoder(video, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_export_the_jepa_target_encoder(tmp_path: Path):
    """`--encoder targets.0.target_encoder.module` exports the EMA target encoder (what I-JEPA evaluates)."""
    from mim.targets import LatentTarget

    module = PretrainModule(
        encoder=_encoder(),
        masking=RandomMasking(),
        targets=[LatentTarget(predictor_dim=16, predictor_depth=1, predictor_num_heads=2)],
    )
    with torch.no_grad():  # student and target encoder differ, so a mix-up cannot pass
        for p in module.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    checkpoint = {"state_dict": module.state_dict(), "epoch": 0, "global_step": 1}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "jepa.ckpt")
    assert (
        cli_main(
            [
                "export",
                str(tmp_path / "jepa.ckpt"),
                str(tmp_path / "target.pt"),
                "--encoder",
                "targets.0.target_encoder.module",
            ]
        )
        == 0
    )
    exported = read_weights(tmp_path / "target.pt")[0]
    target = module.target_list[0].target_encoder.module.vit.state_dict()
    assert exported.keys() == target.keys()
    for name, value in target.items():
        torch.testing.assert_close(exported[name], value, msg=name)
    student = export_encoder(tmp_path / "jepa.ckpt", tmp_path / "student.pt")
    assert not torch.equal(read_weights(student)[0]["blocks.0.attn.qkv.weight"], target["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="encoders found"):
        export_encoder(tmp_path / "jepa.ckpt", tmp_path / "x.pt", encoder="targets.3.nothing")
