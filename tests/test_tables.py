"""mim.data.tables and mim.models.tabular: preprocessing fitted on the train split, batches, checkpoints, tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_wine

from mim.data.table_preprocess import TablePreprocessor, infer_column_kinds
from mim.data.tables import TableDataModule, sklearn_table
from mim.models.tabular import FeatureTokenizer
from tests.factories import cpu_trainer

# ----------------------------------------------------------------------------------------------- helpers


def _wine_mixed(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame, pd.DataFrame]:
    """Wine with a categorical column (alcohol binned into 'low' / 'mid' / 'high'), a bool column and planted
    missing values; rows 0..139 train (CSV), 140..177 validation (Parquet) with an unseen category."""
    bunch = load_wine()
    frame = pd.DataFrame(bunch.data, columns=bunch.feature_names)
    frame["alcohol_level"] = pd.cut(frame["alcohol"], bins=[0, 12.5, 13.5, 99], labels=["low", "mid", "high"])
    frame["alcohol_level"] = frame["alcohol_level"].astype(object)
    frame["magnesium_high"] = frame["magnesium"] > 100  # bool -> categorical
    frame["target"] = bunch.target
    frame = frame.drop(columns=["alcohol"])
    frame.loc[[3, 10, 50], "malic_acid"] = np.nan
    frame.loc[[7, 141], "hue"] = np.nan
    frame.loc[[5, 20], "alcohol_level"] = None
    train, val = frame.iloc[:140].reset_index(drop=True), frame.iloc[140:].reset_index(drop=True)
    val = val.copy()
    val.loc[0, "alcohol_level"] = "extreme"  # unseen in train
    train_path, val_path = tmp_path / "wine_train.csv", tmp_path / "wine_val.parquet"
    train.to_csv(train_path, index=False)
    val.to_parquet(val_path, index=False)
    return train_path, val_path, train, val


def _expected_numeric(train: pd.DataFrame, split: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Independent numpy standardisation with the TRAIN statistics (population std)."""
    raw_train = train[columns].to_numpy(dtype=np.float64)
    mean = np.nanmean(raw_train, axis=0)
    std = np.nanstd(raw_train, axis=0)
    std[std == 0] = 1.0
    raw = split[columns].to_numpy(dtype=np.float64)
    missing = np.isnan(raw)
    return np.where(missing, 0.0, (raw - mean) / std), missing


# ------------------------------------------------------------------------------------------- datamodule


def test_breast_cancer_csv_standardised_with_train_stats_only(tmp_path: Path) -> None:
    path = sklearn_table("breast_cancer", tmp_path)
    dm = TableDataModule(train_path=path, val_fraction=0.25, label_column="target", batch_size=32, seed=3)
    train, val = dm.frames()
    assert len(train) + len(val) == 569 and len(val) == round(569 * 0.25)
    columns = list(load_breast_cancer().feature_names)
    assert dm.preprocessor is None and dm.num_numeric == 30 and dm.category_cardinalities == []
    assert dm.num_features == 30 and dm.num_classes == 2
    dm.setup("fit")
    for split, dataset in ((train, dm.train_dataset), (val, dm.val_dataset)):
        assert dataset is not None
        expected, missing = _expected_numeric(train, split, columns)
        torch.testing.assert_close(dataset.tensors["numeric"], torch.tensor(expected, dtype=torch.float32))
        assert not missing.any() and not dataset.tensors["numeric_missing"].any()
        assert torch.equal(dataset.tensors["label"], torch.tensor(split["target"].to_numpy(), dtype=torch.int64))
    # The train split is standardised; the validation split (train stats) is not exactly.
    assert dm.train_dataset is not None and dm.val_dataset is not None
    torch.testing.assert_close(dm.train_dataset.tensors["numeric"].mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    assert dm.val_dataset.tensors["numeric"].mean(0).abs().max() > 1e-3


def test_mixed_table_vocab_missing_and_unseen(tmp_path: Path) -> None:
    train_path, val_path, train, val = _wine_mixed(tmp_path)
    dm = TableDataModule(train_path=train_path, val_path=val_path, label_column="target", batch_size=16)
    dm.setup("fit")
    pre = dm.preprocessor
    assert pre is not None
    numeric = [c for c in train.columns if c not in ("alcohol_level", "magnesium_high", "target")]
    assert pre.numeric_columns == numeric and pre.categorical_columns == ["alcohol_level", "magnesium_high"]
    assert pre.vocabularies == [["high", "low", "mid"], ["False", "True"]]
    assert dm.category_cardinalities == [4, 3] and dm.num_features == 12 + 2
    for split, dataset in ((train, dm.train_dataset), (val, dm.val_dataset)):
        assert dataset is not None
        expected, missing = _expected_numeric(train, split, numeric)
        torch.testing.assert_close(dataset.tensors["numeric"], torch.tensor(expected, dtype=torch.float32))
        assert torch.equal(dataset.tensors["numeric_missing"], torch.tensor(missing))
        codes = {"high": 1, "low": 2, "mid": 3}
        expected_level = [0 if v is None or v != v else codes.get(v, 0) for v in split["alcohol_level"]]
        assert dataset.tensors["categorical"][:, 0].tolist() == expected_level
        assert dataset.tensors["categorical"][:, 1].tolist() == [2 if v else 1 for v in split["magnesium_high"]]
    assert dm.train_dataset is not None and dm.val_dataset is not None
    assert dm.train_dataset.tensors["numeric_missing"].sum() == 4  # 3 malic_acid + 1 hue
    assert dm.val_dataset.tensors["numeric_missing"][1].tolist()[numeric.index("hue")]  # row 141
    assert dm.val_dataset.tensors["categorical"][0, 0] == 0  # unseen "extreme" -> 0
    assert dm.train_dataset.tensors["categorical"][[5, 20], 0].tolist() == [0, 0]  # missing -> 0


def test_batches_dtypes_shapes_and_deterministic_shuffle(tmp_path: Path) -> None:
    train_path, val_path, _, _ = _wine_mixed(tmp_path)
    kwargs = dict(train_path=train_path, val_path=val_path, label_column="target", batch_size=16, seed=5)
    dm = TableDataModule(**kwargs)  # type: ignore[arg-type]
    batches = list(dm.train_dataloader())
    assert len(batches) == 140 // 16
    batch = batches[0]
    assert set(batch) == {"numeric", "numeric_missing", "categorical", "label"}
    assert batch["numeric"].shape == (16, 12) and batch["numeric"].dtype == torch.float32
    assert batch["numeric_missing"].shape == (16, 12) and batch["numeric_missing"].dtype == torch.bool
    assert batch["categorical"].shape == (16, 2) and batch["categorical"].dtype == torch.int64
    assert batch["label"].shape == (16,) and batch["label"].dtype == torch.int64
    again = list(TableDataModule(**kwargs).train_dataloader())  # type: ignore[arg-type]
    assert all(torch.equal(a["numeric"], b["numeric"]) for a, b in zip(batches, again))
    val_batches = list(dm.val_dataloader())
    assert sum(b["label"].shape[0] for b in val_batches) == 38  # no drop_last in validation


def test_regression_label_and_parquet(tmp_path: Path) -> None:
    path = sklearn_table("diabetes", tmp_path, file_format="parquet")
    dm = TableDataModule(train_path=path, label_column="target", batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.float32 and dm.num_classes is None and dm.num_numeric == 10


def test_state_dict_round_trip_through_torch_save(tmp_path: Path) -> None:
    train_path, val_path, train, val = _wine_mixed(tmp_path)
    dm = TableDataModule(train_path=train_path, val_path=val_path, label_column="target", batch_size=16)
    dm.setup("fit")
    torch.save({"TableDataModule": dm.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["TableDataModule"]
    # A fresh datamodule over a DIFFERENT training table (val only) must transform with the restored stats.
    fresh = TableDataModule(train_path=val_path, val_path=val_path, label_column="target", batch_size=16)
    fresh.setup("fit")  # fitted on other rows first, like Lightning's setup before checkpoint restore
    fresh.load_state_dict(state)
    fresh.setup("fit")
    assert fresh.val_dataset is not None and dm.val_dataset is not None
    for key, value in dm.val_dataset.tensors.items():
        assert torch.equal(fresh.val_dataset.tensors[key], value), key
    assert fresh.num_features == dm.num_features and fresh.category_cardinalities == dm.category_cardinalities
    assert TablePreprocessor.from_state_dict(state["preprocessor"]).state_dict() == state["preprocessor"]


def test_column_overrides_and_errors(tmp_path: Path) -> None:
    train_path, _, train, _ = _wine_mixed(tmp_path)
    # An integer column stays numeric unless listed; a listed one becomes categorical.
    frame = train.assign(code=np.arange(len(train)) % 3)
    numeric, categorical = infer_column_kinds(frame, label_column="target", drop_columns=["hue"])
    assert "code" in numeric and "hue" not in numeric and "target" not in numeric
    numeric, categorical = infer_column_kinds(frame, categorical_columns=["code"], numeric_columns=["magnesium_high"])
    assert categorical == ["alcohol_level", "code"] and "magnesium_high" in numeric
    with pytest.raises(ValueError, match=r"'nope'.*available.*'hue'"):
        TableDataModule(train_path=train_path, numeric_columns=["nope"]).setup()
    with pytest.raises(ValueError, match="label_column.*'tgt'"):
        TableDataModule(train_path=train_path, label_column="tgt").setup()
    with pytest.raises(ValueError, match="both"):
        infer_column_kinds(frame, numeric_columns=["hue"], categorical_columns=["hue"])
    with pytest.raises(ValueError, match="'alcohol_level'"):
        TablePreprocessor.fit(frame, numeric_columns=["alcohol_level"], categorical_columns=[])
    with pytest.raises(ValueError, match="non-numeric"):
        TableDataModule(train_path=train_path, numeric_columns=["alcohol_level"]).setup()
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        TableDataModule(train_path=tmp_path / "missing.csv").setup()
    (tmp_path / "empty.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="empty"):
        TableDataModule(train_path=tmp_path / "empty.csv").setup()
    with pytest.raises(ValueError, match="val_fraction"):
        TableDataModule(train_path=train_path, val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        TableDataModule(train_path=train_path, batch_size=0)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        TableDataModule(train_path=train_path, batch_size=1000).train_dataloader()


def test_constant_column_uses_std_one(tmp_path: Path) -> None:
    frame = pd.DataFrame({"c": [2.0] * 6, "x": [1.0, 2.0, 3.0, 4.0, 5.0, np.nan]})
    pre = TablePreprocessor.fit(frame, numeric_columns=["c", "x"], categorical_columns=[])
    assert pre.means == [2.0, 3.0] and pre.stds[0] == 1.0 and pre.stds[1] == pytest.approx(np.std([1, 2, 3, 4, 5]))
    out = pre.transform(frame)
    assert out["numeric"][:, 0].abs().max() == 0 and out["numeric_missing"][5].tolist() == [False, True]


# -------------------------------------------------------------------------------------------- tokenizer


def _token_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    numeric = torch.randn(5, 3, generator=generator)  # (B, Fn)
    missing = torch.zeros(5, 3, dtype=torch.bool)
    missing[1, 2] = missing[4, 0] = True
    categorical = torch.stack([torch.tensor([0, 1, 2, 3, 1]), torch.tensor([1, 0, 1, 1, 0])], dim=1)  # (B, Fc)
    return {"numeric": numeric, "numeric_missing": missing, "categorical": categorical}


def test_feature_tokenizer_matches_per_feature_formula() -> None:
    torch.manual_seed(0)
    tok = FeatureTokenizer(num_numeric=3, category_cardinalities=[4, 2], dim=8)
    batch = _token_batch(torch.Generator().manual_seed(1))
    out = tok(batch)
    assert out.shape == (5, 5, 8) and tok.num_features == 5
    table = tok.category_embeddings.weight
    tables = [table[0:4], table[4:6]]  # feature k's own (cardinality_k, D) table
    for b in range(5):
        for j in range(3):
            value = batch["numeric"][b, j] * tok.numeric_weight[j]
            if batch["numeric_missing"][b, j]:
                value = tok.missing_embedding
            torch.testing.assert_close(out[b, j], value + tok.numeric_bias[j])
        for k in range(2):
            code = int(batch["categorical"][b, k])
            torch.testing.assert_close(out[b, 3 + k], tables[k][code] + tok.category_bias[k])
    bound = 1 / 8**0.5
    assert all(p.abs().max() <= bound for p in tok.parameters())


def test_feature_tokenizer_gradients_and_edge_cases() -> None:
    tok = FeatureTokenizer(num_numeric=3, category_cardinalities=[4, 2], dim=8)
    batch = _token_batch(torch.Generator().manual_seed(2))
    tok(batch).square().sum().backward()
    for name, param in tok.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # A missing value's x does not matter.
    changed = dict(batch, numeric=batch["numeric"].clone())
    changed["numeric"][1, 2] = 1e6
    torch.testing.assert_close(tok(changed), tok(batch))
    only_numeric = FeatureTokenizer(num_numeric=2, category_cardinalities=[], dim=4)
    assert only_numeric({"numeric": torch.ones(3, 2)}).shape == (3, 2, 4)
    only_categorical = FeatureTokenizer(num_numeric=0, category_cardinalities=[3], dim=4)
    assert only_categorical({"categorical": torch.zeros(3, 1, dtype=torch.int64)}).shape == (3, 1, 4)
    with pytest.raises(ValueError, match="category_cardinalities"):
        FeatureTokenizer(num_numeric=1, category_cardinalities=[0], dim=4)
    with pytest.raises(ValueError, match="at least one feature"):
        FeatureTokenizer(num_numeric=0, category_cardinalities=[], dim=4)
    with pytest.raises(ValueError, match=r"numeric must be \(B, 3\)"):
        tok({"numeric": torch.ones(2, 4), "categorical": torch.zeros(2, 2, dtype=torch.int64)})


def test_tokenizer_on_datamodule_batch(tmp_path: Path) -> None:
    train_path, val_path, _, _ = _wine_mixed(tmp_path)
    dm = TableDataModule(train_path=train_path, val_path=val_path, label_column="target", batch_size=16)
    tok = FeatureTokenizer(num_numeric=dm.num_numeric, category_cardinalities=dm.category_cardinalities, dim=8)
    out = tok(next(iter(dm.val_dataloader())))
    assert out.shape == (16, dm.num_features, 8) and torch.isfinite(out).all()


def test_lightning_checkpoint_carries_preprocessing(tmp_path: Path) -> None:
    import lightning as L

    class _Probe(L.LightningModule):
        def __init__(self, dm: TableDataModule) -> None:
            super().__init__()
            self.tokenizer = FeatureTokenizer(
                num_numeric=dm.num_numeric, category_cardinalities=dm.category_cardinalities, dim=4
            )

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.tokenizer(batch).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    train_path, val_path, _, _ = _wine_mixed(tmp_path)
    dm = TableDataModule(train_path=train_path, label_column="target", batch_size=32)
    trainer = cpu_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(_Probe(dm), datamodule=dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["TableDataModule"]
    assert dm.preprocessor is not None and state["preprocessor"] == dm.preprocessor.state_dict()
    resumed = TableDataModule(train_path=val_path, label_column="target", batch_size=8)  # other rows
    trainer = cpu_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(_Probe(dm), datamodule=resumed, ckpt_path=ckpt)
    assert resumed.preprocessor is not None and resumed.preprocessor.state_dict() == dm.preprocessor.state_dict()
