"""benchmarks/gpu_mfu.py: the reference MAE against mim's pieces, and the whole CPU dry run with its records.

The dry run (``--cpu-dry-run``, about 20 s on 2 cores) runs every section the GPU run does except the compiled rows:
the checks are on what the records say (FLOPs counted and equal to the analytic count, reference and mim losses equal
for the same weights and masks, throughput and losses sane, ``mim fit`` counting the same FLOPs as the plain step).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mfu() -> ModuleType:
    return _load("gpu_mfu")


@pytest.mark.timeout(60)
def test_reference_layout_and_positions_match_mim(mfu: ModuleType):
    from mim.models.embed import patchify, sincos_for_grid
    from mim.types import TokenGrid

    arch = mfu.archs(cpu=True)[0]
    module = arch.build_mim(seed=0)
    ref = arch.build_reference(module)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ref.patchify(images), patchify(images, (8, 8)), rtol=0, atol=0)  # (B, N, P)
    for dim in (64, 32):
        torch.testing.assert_close(mfu.sincos_table(dim, (4, 4)), sincos_for_grid(dim, TokenGrid(1, 4, 4), 1))
    # same weights, same noise: the same loss in fp32
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))  # (B, N)
    masks = module.masking(2, module.encoder.grid, generator=torch.Generator().manual_seed(2), device=images.device)
    expected = module.compute_losses({"image": images}, masks)["loss"]
    torch.testing.assert_close(ref(images, noise), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(30)
def test_load_mim_weights_refuses_a_mismatch(mfu: ModuleType):
    small, large = mfu.archs(cpu=True)
    module = small.build_mim(seed=0)
    with pytest.raises(RuntimeError, match="unmatched parameters"):
        mfu.load_mim_weights(mfu.ReferenceMAE(img_size=32, patch_size=8, dim=64, depth=3, num_heads=2), module)


@pytest.mark.slow
@pytest.mark.scale  # `make test-scale`: three `mim fit` subprocesses
@pytest.mark.timeout(240)
def test_cpu_dry_run_records(mfu: ModuleType, tmp_path: Path, capsys):
    flops = _load("flops")
    assert mfu.main(["--cpu-dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "gpu_mfu.jsonl").read_text().splitlines()]
    by = lambda section: [r for r in records if r["section"] == section]  # noqa: E731
    for r in records:
        assert r["torch"] == torch.__version__ and r["device"] and r["cpu_dry_run"] is True and "cuda" in r

    (gemm,) = by("gemm")
    assert gemm["status"] == "ok" and gemm["size"] == 256 and gemm["tflops"] > 0

    counted = {r["model"]: r for r in by("flops")}
    assert sorted(counted) == ["vit_b16", "vit_l16"]
    for key, arch in zip(("vit_b16", "vit_l16"), mfu.archs(cpu=True)):
        r = counted[key]
        assert r["status"] == "ok" and r["pos_tables_match"] is True
        assert r["loss_abs_diff"] < 1e-5 and r["grad_norm_rel_diff"] < 1e-4, r
        d, depth = arch.kwargs["embed_dim"], arch.kwargs["depth"]
        dec_dim, dec_depth, _ = arch.dec
        analytic = flops.analytic_flops(
            n=16, k=4, prefix=1, patch_values=192, dim=d, depth=depth, hidden=4 * d,
            dec_dim=dec_dim, dec_depth=dec_depth, dec_hidden=4 * dec_dim,
        )  # fmt: skip
        assert r["gflop_per_image_mim"] == pytest.approx(analytic["train"] / 1e9, rel=1e-9)
        # the reference predicts every token (as the paper's decoder), mim only the hidden ones: a little more
        assert r["gflop_per_image_mim"] < r["gflop_per_image_reference"] < 1.1 * r["gflop_per_image_mim"]

    switches = mfu.available_switches()  # module switches another change may add: extra rows when they exist
    adamw = "fused" if "fused_optimizer" in switches and switches["fused_optimizer"].default is True else "foreach"
    plain = by("plain")
    expected = [(m, i, adamw) for m in ("vit_b16", "vit_l16") for i in ("reference", "mim")]
    if "fused_optimizer" in switches:
        expected.append(("vit_b16", "mim", "foreach" if adamw == "fused" else "fused"))
    assert [(r["model"], r["impl"], r["adamw"]) for r in plain] == expected
    assert all(r["status"] == "ok" and r["mode"] == "eager" for r in plain), plain
    for r in plain:
        assert r["images_per_s"] > 0 and r["timed_steps"] == 2 and r["batch"] == 4
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
        assert r["gflop_per_image"] == counted[r["model"]][f"gflop_per_image_{r['impl']}"] and r["mfu_spec"] > 0
    for ref, mim in (plain[0:2], plain[2:4]):  # same weights, same masks, bf16 autocast: the same first loss
        assert ref["first_loss"] == pytest.approx(mim["first_loss"], rel=2e-2)

    fits = by("fit")
    assert [r["switch"] for r in fits] == [None] + [  # the compile row only with --compile-on-cpu
        f"{s.name}={str(v).lower()}" for s in switches.values() for v in s.values() if s.name != "compile"
    ]
    for r in fits[1:]:  # a switch row runs and counts the same FLOPs (activation checkpointing: plus the recompute)
        assert r["status"] == "ok" and r["images_per_s"] > 0, r
        if r["switch"].startswith("activation_checkpointing"):
            assert fits[0]["gflop_per_image"] < r["gflop_per_image"] < 4 / 3 * fits[0]["gflop_per_image"], r
        else:
            assert r["gflop_per_image"] == fits[0]["gflop_per_image"], r
    fit = fits[0]
    assert fit["status"] == "ok" and fit["model"] == "mae_vit_b16" and fit["strategy"] == "ddp", fit
    assert fit["strategy_class"] == "DDPStrategy" and fit["precision"] == "bf16-mixed"
    assert fit["images_per_s"] > 0 and fit["timed_steps"] == 2 and fit["batch_per_device"] == 4
    assert math.isfinite(fit["first_loss"]) and math.isfinite(fit["last_loss"])
    # RunMetrics inside `mim fit` counts what the in-process step counted for the same tiny model
    assert fit["gflop_per_image"] == pytest.approx(counted["vit_b16"]["gflop_per_image_mim"], rel=1e-9)

    compiled = by("compiled")
    assert len(compiled) == 4 and all(r["status"] == "skipped" and "--compile-on-cpu" in r["reason"] for r in compiled)
    (tax,) = by("tax")
    assert tax["model"] == "vit_b16" and tax["ratio"] == pytest.approx(
        tax["fit_images_per_s"] / tax["plain_images_per_s"]
    )

    assert "benchmarks/gpu_mfu.sh --cpu-dry-run" in printed
    for title in ("bf16 GEMM ceiling", "FLOPs per image", "Plain loop", "`mim fit`", "Framework tax"):
        assert f"### {title}" in printed
    assert (tmp_path / "gpu_mfu.md").read_text().startswith("```\nbenchmarks/gpu_mfu.sh --cpu-dry-run")
    log = (tmp_path / "fit_mae_vit_b16_ddp.log").read_text()
    assert "effective batch = 4 per device x 1 accumulation x 1 devices = 4" in log
