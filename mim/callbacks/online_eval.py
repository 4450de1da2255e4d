"""OnlineKNN: k-NN accuracy of the encoder while it pretrains, every N epochs or steps.

DINO's weighted k-NN (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021;
facebookresearch/dino eval_knn.py; :func:`mim.probe.knn_classify`) on the frozen features of the current encoder, and
optionally the L-BFGS linear probe (:func:`mim.probe.linear_probe`): a cheap monitor of what pretraining learns, which
the loss does not show (its value is not comparable across masking and target choices).

Cost per call, measured with one torch thread on a shared 2-core CPU, recipes/debug/mae_fashion_mnist.yaml's encoder
(2 blocks, width 64, 49 tokens), 2000 reference and 1000 query Fashion-MNIST images (``max_reference`` and
``max_queries``' defaults): 0.6 s, nearly all of it the encoder's forward passes (the k-NN itself: about 10 ms); 1.0 s
with ``lbfgs=True``. The cost grows with the samples times the encoder's forward cost.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from mim.checks import check_choice, check_int, check_range
from mim.probe import in_order, knn_classify, linear_probe, loader_features

__all__ = ["OnlineKNN"]


class OnlineKNN(L.Callback):
    """Log the k-NN accuracy (``online/knn_top1``, ``online/knn_top5``) of the encoder on held-out labelled data.

    Where the data come from:

    * ``datamodule`` given: its training split (in order, as its loaders yield it: build it with ``augment: false``)
      is the labelled reference set and its validation split the queries;
    * otherwise the trainer's datamodule's validation split, divided by a seeded permutation into reference
      (``reference_fraction``) and query samples, so nothing augmented or trained on enters the measurement.

    Every rank computes the same full evaluation (each reads the whole held-out loader, no gather): the sharded
    encoders of FSDP2 and DeepSpeed ZeRO-3 need every rank in every forward, and the logged value is then the same on
    every rank. The cost is not divided among the ranks. The encoder's train/eval mode is restored afterwards and no
    gradient is taken.

    Logged at the end of every ``every_n_epochs``-th training epoch through ``pl_module.log`` (monitorable by
    checkpoint callbacks), and after every ``every_n_steps``-th optimizer step straight to the trainer's loggers at
    that step. Every result is also kept in :attr:`history`.

    Args:
        every_n_epochs: evaluate after every this many training epochs; None: not by epoch.
        every_n_steps: evaluate after every this many optimizer steps; None: not by step.
        datamodule: a separate labelled datamodule (see above); None: the trainer's validation split.
        encoder: the submodule of the LightningModule to evaluate (``encoder``, the student; a JEPA target encoder is
            e.g. ``targets.0.target_encoder.module``).
        max_reference: reference samples at most (the first ones); None: all.
        max_queries: query samples at most (the first ones); None: all.
        reference_fraction: without ``datamodule``: the share of the validation samples used as reference.
        k: neighbours (DINO: 20).
        temperature: vote temperature (DINO: 0.07).
        pool: ``avg`` of the patch tokens, the ``cls`` token, or both (``cls+avg``).
        lbfgs: also fit the L-BFGS linear probe on the same features (``online/linear_top1``).
        seed: seeds the reference / query split.

    Attributes:
        history: one dict per evaluation: ``step``, ``epoch`` and the logged values.
    """

    def __init__(
        self,
        *,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        datamodule: L.LightningDataModule | None = None,
        encoder: str = "encoder",
        max_reference: int | None = 2000,
        max_queries: int | None = 1000,
        reference_fraction: float = 0.5,
        k: int = 20,
        temperature: float = 0.07,
        pool: Literal["avg", "cls", "cls+avg"] = "avg",
        lbfgs: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = "OnlineKNN"
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError("OnlineKNN needs every_n_epochs or every_n_steps (both are None)")
        for field, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None:
                check_int(owner, field, value)
        for field, value in (("max_reference", max_reference), ("max_queries", max_queries)):
            if value is not None:
                check_int(owner, field, value)
        check_range(owner, "reference_fraction", reference_fraction, 0, 1, low_open=True, high_open=True)
        check_int(owner, "k", k)
        check_range(owner, "temperature", temperature, 0, float("inf"), low_open=True)
        check_choice(owner, "pool", pool, ("avg", "cls", "cls+avg"))
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.datamodule = datamodule
        self.encoder = encoder
        self.max_reference = max_reference
        self.max_queries = max_queries
        self.reference_fraction = reference_fraction
        self.k = k
        self.temperature = temperature
        self.pool = pool
        self.lbfgs = lbfgs
        self.seed = seed
        self.history: list[dict[str, float]] = []
        self._loaders: tuple[Any, Any] | None = None
        self._last_step = -1

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.datamodule is not None:
            self.datamodule.prepare_data()
            self.datamodule.setup("fit")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if trainer.global_step == self._last_step:  # already evaluated at this step
            return
        metrics = self.evaluate(trainer, pl_module)
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps is None or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        metrics = self.evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ evaluation

    def _module_encoder(self, pl_module: L.LightningModule) -> nn.Module:
        try:
            return pl_module.get_submodule(self.encoder)
        except AttributeError:
            raise ValueError(
                f"OnlineKNN.encoder: {type(pl_module).__name__} has no submodule {self.encoder!r}"
            ) from None

    def _data(self, trainer: L.Trainer) -> Any:
        data = self.datamodule if self.datamodule is not None else getattr(trainer, "datamodule", None)
        if data is None:
            raise ValueError("OnlineKNN needs a datamodule: give one, or fit with datamodule=...")
        return data

    def _features(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(reference features, labels, query features, labels)."""
        data = self._data(trainer)
        precision = trainer.precision_plugin
        encoder = self._module_encoder(pl_module)

        def features(loader: Any, limit: int | None) -> tuple[Tensor, Tensor]:
            return loader_features(
                encoder,  # type: ignore[arg-type]
                loader,
                transfer=lambda b: precision.convert_input(data.on_after_batch_transfer(b, 0)),
                pool=self.pool,
                max_samples=limit,
                forward_context=precision.forward_context,
            )

        if self._loaders is None:  # built once: persistent loader workers stay up between calls
            train = in_order(data.train_dataloader()) if self.datamodule is not None else None
            self._loaders = (train, data.val_dataloader())
        train_loader, val_loader = self._loaders
        if train_loader is not None:
            return (*features(train_loader, self.max_reference), *features(val_loader, self.max_queries))
        limit = (
            None if self.max_reference is None or self.max_queries is None else self.max_reference + self.max_queries
        )
        x, y = features(val_loader, limit)  # (S, D), (S,)
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))  # (S,)
        num_ref = min(max(1, round(x.shape[0] * self.reference_fraction)), x.shape[0] - 1)
        ref, query = order[:num_ref][: self.max_reference], order[num_ref:][: self.max_queries]
        return x[ref], y[ref], x[query], y[query]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Compute the k-NN (and L-BFGS) accuracy now; returns the metrics and appends them to :attr:`history`."""
        tic = time.perf_counter()
        ref_x, ref_y, query_x, query_y = self._features(trainer, pl_module)
        num_classes = getattr(self._data(trainer), "num_classes", None)
        knn = knn_classify(
            ref_x, ref_y, query_x, query_y, k=self.k, temperature=self.temperature, num_classes=num_classes
        )
        metrics = {"online/knn_top1": knn.top1, "online/knn_top5": knn.top5}
        if self.lbfgs:
            metrics["online/linear_top1"] = linear_probe(
                ref_x, ref_y, query_x, query_y, num_classes=num_classes
            ).test_accuracy
        metrics["online/seconds"] = time.perf_counter() - tic
        self._last_step = trainer.global_step
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, **metrics})
        return metrics
