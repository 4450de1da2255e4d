"""Frozen-feature evaluation: DINO's k-NN and MAE's LARS against independent computations, the probes on real
Fashion-MNIST features and on breast_cancer next to gradient-boosted trees, V-JEPA's attentive probe, `mim eval` end to
end, and the OnlineKNN callback in a fit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mim.callbacks import OnlineKNN
from mim.evaluation import evaluate, format_table, main
from mim.optim import LARS
from mim.probe import knn_classify, linear_probe, loader_features
from mim.probe_train import AttentiveClassifier, attentive_probe, minibatches, sgd_linear_probe
from tests.factories import cpu_trainer, tiny_encoder, tiny_table_encoder

ROOT = Path(__file__).resolve().parent.parent
DEBUG = ROOT / "recipes" / "debug"
needs_data = pytest.mark.usefixtures("fashion_mnist")


# ---------------------------------------------------------------------------------------------- k-NN and LARS
def _brute_force_knn(train_x, train_y, test_x, test_y, k, temperature):
    """DINO's weighted vote, one test sample at a time in plain Python."""
    top1 = top5 = 0
    for x, y in zip(test_x.tolist(), test_y.tolist()):
        sims = []
        for t, label in zip(train_x.tolist(), train_y.tolist()):
            dot = sum(a * b for a, b in zip(x, t))
            sims.append((dot / math.sqrt(sum(a * a for a in x) * sum(b * b for b in t)), label))
        votes: dict[int, float] = {}
        for sim, label in sorted(sims, reverse=True)[:k]:
            votes[label] = votes.get(label, 0.0) + math.exp(sim / temperature)
        ranked = sorted(votes, key=votes.get, reverse=True)
        top1 += ranked[0] == y
        top5 += y in ranked[:5]
    return top1 / len(test_y), top5 / len(test_y)


def test_knn_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(60, 6, generator=g), torch.randn(25, 6, generator=g)
    train_y, test_y = torch.randint(0, 7, (60,), generator=g), torch.randint(0, 7, (25,), generator=g)
    for k, temperature in ((20, 0.07), (3, 0.5), (100, 0.1)):
        got = knn_classify(train_x, train_y, test_x, test_y, k=k, temperature=temperature, chunk_size=7)
        top1, top5 = _brute_force_knn(train_x, train_y, test_x, test_y, min(k, 60), temperature)
        assert (got.top1, got.top5) == (top1, top5), (k, temperature)
    with pytest.raises(ValueError, match="knn_classify.k must be an integer >= 1, got 0"):
        knn_classify(train_x, train_y, test_x, test_y, k=0)


def test_lars_step_matches_the_trust_ratio_formula():
    """d = g + wd p, q = eta ||p|| / ||d|| for ndim > 1 (1 if a norm is 0); biases plain; mu = m mu + d; p -= lr mu."""
    g = torch.Generator().manual_seed(1)
    w, b, z = torch.randn(3, 4, generator=g), torch.randn(3, generator=g), torch.zeros(2, 2)
    params = [nn.Parameter(w.clone()), nn.Parameter(b.clone()), nn.Parameter(z.clone())]
    opt = LARS(params, lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    expected, mus = [w.clone().double(), b.clone().double(), z.clone().double()], [None, None, None]
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        for i, grad in enumerate(grads):
            d = grad.double()
            if expected[i].ndim > 1:
                d = d + 0.1 * expected[i]
                p_norm, d_norm = expected[i].norm().item(), d.norm().item()
                d = d * (0.001 * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0)
            mus[i] = d if mus[i] is None else 0.9 * mus[i] + d
            expected[i] = expected[i] - 0.5 * mus[i]
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.data.double(), e)
    assert not torch.equal(params[2].data, z)  # a zero matrix moves by its plain gradient (ratio 1)
    with pytest.raises(ValueError, match="LARS.momentum must be a number in \\[0, 1\\), got 1"):
        LARS(params, lr=0.1, momentum=1)


# ---------------------------------------------------------------------------------------------- real features
@needs_data
def test_probes_on_fashion_mnist_features_of_a_random_encoder():
    """1000 train / 1000 test images, the debug recipe's encoder at random init: every probe far above chance (0.1).

    Measured: LARS linear probe 0.65, L-BFGS 0.67, k-NN 0.50."""
    from mim.data import FashionMNISTDataModule

    data = FashionMNISTDataModule(num_train=1000, num_val=1000, augment=False, batch_size=250)
    data.setup("fit")
    encoder = tiny_encoder(img_size=28, in_chans=1, model_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2})
    encoder.train()

    def transfer(batch):
        return data.on_after_batch_transfer(batch, 0)

    train_x, train_y = loader_features(encoder, data.train_dataloader(), transfer=transfer)
    test_x, test_y = loader_features(encoder, data.val_dataloader(), transfer=transfer)
    assert encoder.training  # restored
    assert train_x.shape == (1000, 64) and test_x.shape == (1000, 64)
    linear = sgd_linear_probe(train_x, train_y, test_x, test_y, num_classes=10)
    knn = knn_classify(train_x, train_y, test_x, test_y)
    lbfgs = linear_probe(train_x, train_y, test_x, test_y, num_classes=10)
    assert linear.top1 > 0.55 and linear.top5 > 0.9, linear
    assert knn.top1 > 0.4, knn
    assert lbfgs.test_accuracy > 0.55, lbfgs
    mae_lr = sgd_linear_probe(train_x, train_y, test_x, test_y, num_classes=10, blr=0.1)
    assert mae_lr.top1 < linear.top1 - 0.2  # MAE's ImageNet blr barely moves a probe on 1000 samples


# ---------------------------------------------------------------------------------------------- attentive probe
def _token_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise tokens (n, 12, 16) where averaging loses the class: one token carries its class's prototype and a marker
    (last channel), another the negated prototype without marker, so the token mean holds no class information."""
    g = torch.Generator().manual_seed(seed)
    prototypes = 3 * torch.randn(4, 15, generator=torch.Generator().manual_seed(99))  # (C, D - 1)
    labels = torch.randint(0, 4, (n,), generator=g)  # (n,)
    tokens = torch.randn(n, 12, 16, generator=g)  # (n, N, D)
    where = torch.stack([torch.randperm(12, generator=g)[:2] for _ in range(n)])  # (n, 2): signal, cancel
    rows = torch.arange(n)
    tokens[rows, where[:, 0], :15] += prototypes[labels]
    tokens[rows, where[:, 0], 15] += 5.0  # the marker the query can attend to
    tokens[rows, where[:, 1], :15] -= prototypes[labels]
    return tokens, labels


def test_attentive_classifier_shapes_and_token_order():
    model = AttentiveClassifier(dim=16, num_classes=5, num_heads=4).eval()
    tokens = torch.randn(3, 12, 16)
    logits = model(tokens)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(model(tokens[:, torch.randperm(12)]), logits)  # a pooling: the order does not matter
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="CrossAttentionBlock.num_heads must divide dim=16, got 3"):
        AttentiveClassifier(dim=16, num_classes=5, num_heads=3)


def test_attentive_probe_learns_a_separable_token_task():
    train, test = _token_task(512, 0), _token_task(256, 1)
    common = {"dim": 16, "num_classes": 4, "num_heads": 4, "epochs": 20, "batch_size": 64, "lr": 3e-3}
    cached = attentive_probe(train, test, **common)
    assert cached.top1 > 0.9, cached
    pooled = linear_probe(train[0].mean(1), train[1], test[0].mean(1), test[1])  # the mean of the tokens: chance
    assert pooled.test_accuracy < 0.45, pooled
    batches = minibatches(*train, batch_size=64)  # the same batches, as an encoder run every epoch would give
    streamed = attentive_probe(batches, [(test[0][i : i + 64], test[1][i : i + 64]) for i in range(0, 256, 64)],
                               **common)  # fmt: skip
    assert streamed == cached


# ---------------------------------------------------------------------------------------------- tables
def test_table_probes_next_to_gradient_boosting(tmp_path: Path):
    """breast_cancer: probes on a random-init table encoder's features and HistGradientBoosting on the raw columns.

    Measured: linear 0.96, lbfgs 0.96, knn 0.96, mlp 0.95, hgb 0.96 top-1."""
    from mim.data.tables import TableDataModule, sklearn_table

    data = TableDataModule(train_path=sklearn_table("breast_cancer", tmp_path), label_column="target",
                           val_fraction=0.3, batch_size=64)  # fmt: skip
    encoder = tiny_table_encoder(num_numeric=data.num_numeric, category_cardinalities=data.category_cardinalities)
    lines: list[str] = []
    out = evaluate(encoder, data, epochs=30, progress=False, log=lines.append)
    rows = {r["probe"]: r for r in out["results"]}
    assert list(rows) == ["linear", "lbfgs", "knn", "mlp", "hgb"]
    assert out["num_train"] == 398 and out["num_val"] == 171 and out["modality"] == "table"
    assert rows["hgb"]["top1"] > 0.9
    for name in ("linear", "lbfgs", "knn", "mlp"):
        assert rows[name]["top1"] > 0.85, rows[name]
    assert rows["hgb"]["top5"] == 1.0  # two classes
    table = format_table(out["results"])
    assert table.splitlines()[0].split(" | ")[:4] == ["probe ", " top-1", " top-5", " time"]


# ---------------------------------------------------------------------------------------------- mim eval
def _write_checkpoint(path: Path, encoder: nn.Module) -> Path:
    """A checkpoint as `mim fit` writes one, holding only the encoder (all `load_encoder` reads)."""
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    torch.save({"state_dict": state, "mim": {"encoder": encoder.config, "format": 1}}, path)
    return path


def test_mim_eval_refuses_bad_input_in_one_line(tmp_path: Path, capsys):
    from mim.data.tables import sklearn_table

    csv = sklearn_table("breast_cancer", tmp_path)
    table = ["--data", str(DEBUG / "mae_table.yaml"), f"--data.init_args.train_path={csv}", "--no-progress"]
    image_ckpt = _write_checkpoint(tmp_path / "image.ckpt", tiny_encoder())
    table_ckpt = _write_checkpoint(
        tmp_path / "table.ckpt", tiny_table_encoder(num_numeric=30, category_cardinalities=[])
    )
    cases = [
        ([str(image_ckpt), *table], "the checkpoint's encoder reads images but TableDataModule yields tables"),
        ([str(table_ckpt), *table, "--data.init_args.label_column=null"], "TableDataModule has no class labels"),
        ([str(image_ckpt), *table, "--encoder", "target"], "the checkpoint has no JEPA target encoder"),
        ([str(tmp_path / "missing.ckpt"), *table], "missing.ckpt: no such checkpoint"),
        ([str(table_ckpt), *table, "--data.init_args.bogus=1"], "bad data section or override"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit):
        main([str(table_ckpt), *table, "--probes", "linear,nope"])


@needs_data
def test_mim_eval_end_to_end_on_a_debug_checkpoint(tmp_path: Path):
    """`mim fit` (2 steps of the debug recipe), then `mim eval` as a command: the table printed, the JSON written."""
    from mim.lightning_cli import build

    cli = build(["--config", str(DEBUG / "mae_fashion_mnist.yaml"), f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"],
                save_config_callback=None)  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    out = tmp_path / "eval" / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mim", "eval", str(ckpt), "--data", str(DEBUG / "mae_fashion_mnist.yaml"),
         "--data.init_args.num_train=1000", "--data.init_args.num_val", "500", "--probes", "linear,lbfgs,knn,attentive",
         "--epochs", "20", "--no-progress", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "probe     |  top-1 |  top-5 |  time" in run.stdout
    result = json.loads(out.read_text())
    assert not list(out.parent.glob(".*tmp*"))  # written atomically: no temporary file left
    assert result["checkpoint"] == str(ckpt) and result["encoder"] == "student"
    assert result["datamodule"] == "FashionMNISTDataModule" and result["modality"] == "image"
    assert (result["num_train"], result["num_val"], result["num_classes"], result["pool"]) == (1000, 500, 10, "avg")
    assert [r["probe"] for r in result["results"]] == ["linear", "lbfgs", "knn", "attentive"]
    for row in result["results"]:
        assert 0.2 < row["top1"] <= row["top5"] <= 1.0 and row["seconds"] >= 0, row
        assert row["probe"] in run.stdout


# ---------------------------------------------------------------------------------------------- online callback
@needs_data
def test_online_knn_logs_during_a_fit(tmp_path: Path):
    """Two steps of the debug recipe: k-NN at the end of the epoch on the trainer's val split (logged and in the CSV),
    and after every step on a separate datamodule with the L-BFGS probe."""
    from lightning.pytorch.loggers import CSVLogger

    from mim.data import FashionMNISTDataModule
    from mim.lightning_cli import build

    cli = build(["--config", str(DEBUG / "mae_fashion_mnist.yaml"), f"--trainer.default_root_dir={tmp_path}"],
                save_config_callback=None)  # fmt: skip
    by_epoch = OnlineKNN()
    by_step = OnlineKNN(every_n_epochs=None, every_n_steps=1, lbfgs=True, max_reference=200,
                        datamodule=FashionMNISTDataModule(num_train=256, num_val=128, augment=False))  # fmt: skip
    trainer = cpu_trainer(max_steps=2, limit_val_batches=1, callbacks=[by_epoch, by_step],
                          logger=CSVLogger(tmp_path, name="csv"))  # fmt: skip
    cli.model.train()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    assert 0.0 <= trainer.callback_metrics["online/knn_top1"].item() <= 1.0
    assert [h["step"] for h in by_epoch.history] == [2] and [h["step"] for h in by_step.history] == [1, 2]
    assert {"online/knn_top5", "online/linear_top1", "online/seconds"} <= set(by_step.history[0])
    header = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"online/knn_top1", "online/linear_top1"} <= set(header)
    assert cli.model.encoder.training  # train mode restored
    with pytest.raises(ValueError, match="OnlineKNN needs every_n_epochs or every_n_steps"):
        OnlineKNN(every_n_epochs=None)
    with pytest.raises(ValueError, match="OnlineKNN.k must be an integer >= 1, got 0"):
        OnlineKNN(k=0)


def test_evaluate_clips_cached_and_streamed(real_clips: Path, tmp_path: Path):
    """Real H.264 clips in two classes: the attentive probe reads the (T x H x W) tokens, cached or with the encoder
    run again every epoch; the repeated training clips (num_repeats) and augmentation are off for evaluation."""
    import shutil

    from mim.evaluation import datamodule_from_recipe
    from tests.factories import tiny_video_encoder

    for i, clip in enumerate(sorted(real_clips.glob("*.mp4"))):
        (tmp_path / f"class{i % 2}").mkdir(exist_ok=True)
        shutil.copy(clip, tmp_path / f"class{i % 2}" / clip.name)
    root = f"--data.init_args.root={tmp_path}"
    data = datamodule_from_recipe(DEBUG / "finetune_video.yaml", [root, f"--data.init_args.val_root={tmp_path}"])
    encoder = tiny_video_encoder(img_size=32)
    cached = evaluate(encoder, data, probes=["knn", "attentive"], epochs=2, progress=False, log=lambda _: None)
    streamed = evaluate(encoder, data, probes=["attentive"], epochs=2, token_cache_gb=0, progress=False,
                        log=lambda _: None)  # fmt: skip
    assert cached["modality"] == "video" and cached["num_train"] == len(list(tmp_path.rglob("*.mp4")))
    assert "tokens cached" in cached["results"][1]["note"]
    assert "encoder run every epoch" in streamed["results"][0]["note"]
    assert 0.0 <= streamed["results"][0]["top1"] <= 1.0
