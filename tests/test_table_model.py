"""Tables through the shared parts: feature tokens, random masking, masked-feature reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mim.data.tables import TableDataModule, sklearn_table
from mim.masking import RandomMasking
from mim.module import PretrainModule
from mim.targets import FeatureTarget
from mim.types import Masks
from tests.contracts import TargetContract
from tests.factories import LossRecorder, cpu_trainer, tiny_table_encoder

SCHEMA = {"num_numeric": 3, "category_cardinalities": [4, 3]}


def _batch(b: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    missing = torch.zeros(b, 3, dtype=torch.bool)
    missing[0, 1] = True
    return {
        "numeric": torch.randn(b, 3, generator=g),
        "numeric_missing": missing,
        "categorical": torch.stack([torch.randint(0, 4, (b,), generator=g), torch.randint(1, 3, (b,), generator=g)], 1),
    }


class TestFeatureTargetContract(TargetContract):
    target_cls = FeatureTarget
    batch_size = 4
    mask_ratio = 0.6

    def make_target(self, **overrides) -> FeatureTarget:
        return FeatureTarget(**{"decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, **overrides})

    def make_encoder(self):
        return tiny_table_encoder(**SCHEMA)

    def make_batch(self, encoder):
        return _batch(self.batch_size)


def test_feature_loss_matches_formula():
    enc = tiny_table_encoder(**SCHEMA)
    target = FeatureTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    target.bind(enc)
    batch = _batch()
    visible = torch.tensor([[0, 4]] * 4)
    hidden = torch.tensor([[1, 2, 3]] * 4)  # numeric 1, numeric 2, categorical 0 (feature 3)
    masks = Masks(visible=visible, targets=hidden.unsqueeze(1), num_tokens=5)
    latent = enc(enc.inputs(batch), visible)
    out = target(batch, masks, latent, enc)
    pred = target.decoder(latent, visible).detach()  # (B, 5, 1 + 4)
    terms = []
    for b in range(4):
        for f in (1, 2):
            if not batch["numeric_missing"][b, f]:
                terms.append(float((pred[b, f, 0] - batch["numeric"][b, f]) ** 2))
        code = int(batch["categorical"][b, 0])
        if code > 0:  # feature 3 = categorical 0 with 4 categories (all 4 logits allowed)
            terms.append(float(F.cross_entropy(pred[b, 3, 1:5].unsqueeze(0), torch.tensor([code]))))
    assert out["loss"].item() == pytest.approx(np.mean(terms), rel=1e-5)


def test_categorical_logits_limited_to_their_vocabulary():
    enc = tiny_table_encoder(**SCHEMA)
    target = FeatureTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    target.bind(enc)
    batch = _batch()
    visible = torch.tensor([[0, 1, 2, 3]] * 4)
    masks = Masks(visible=visible, targets=torch.tensor([[[4]]] * 4), num_tokens=5)  # categorical 1: 3 classes
    latent = enc(enc.inputs(batch), visible)
    loss = target(batch, masks, latent, enc)["loss"]
    pred = target.decoder(latent, visible).detach()[:, 4, 1:4]  # only the first 3 logits are its vocabulary
    expected = F.cross_entropy(pred, batch["categorical"][:, 1])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _table(tmp_path: Path) -> Path:
    csv = sklearn_table("breast_cancer", tmp_path)
    frame = pd.read_csv(csv)
    frame["size"] = pd.cut(frame["mean radius"], [0, 12, 16, 100], labels=["small", "medium", "large"]).astype(str)
    frame.loc[::17, "mean texture"] = np.nan  # planted missing values
    frame.to_csv(tmp_path / "table.csv", index=False)
    return tmp_path / "table.csv"


def test_masked_feature_reconstruction_trains_on_a_real_table(tmp_path: Path):
    data = TableDataModule(train_path=_table(tmp_path), label_column="target", val_fraction=0.2, batch_size=64)
    module = PretrainModule(
        encoder=tiny_table_encoder(),  # schema comes from the datamodule
        masking=RandomMasking(mask_ratio=0.5),
        targets=[FeatureTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=2)],
        blr=2e-2,
        warmup_steps=3,
    )
    record = LossRecorder()
    trainer = cpu_trainer(max_steps=60, enable_checkpointing=True, default_root_dir=tmp_path, callbacks=[record])
    trainer.fit(module, datamodule=data)
    losses = record.losses
    assert module.encoder.grid.num_tokens == 31  # 30 numeric + 1 categorical
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), map_location="cpu", weights_only=True)
    assert ckpt["mim"]["encoder"]["num_numeric"] == 30
    assert ckpt["mim"]["encoder"]["category_cardinalities"] == data.category_cardinalities
