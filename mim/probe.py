"""Frozen-feature evaluation: feature extraction, a weighted k-NN classifier and an L-BFGS linear probe.

* :func:`loader_features` runs a frozen encoder once over a loader (pooled features, or the patch tokens an
  attentive probe reads); :func:`encoder_features` does the same for an in-memory image tensor.
* :func:`knn_classify`: DINO's weighted k-NN (Caron et al., "Emerging Properties in Self-Supervised Vision
  Transformers", ICCV 2021; facebookresearch/dino eval_knn.py): cosine similarity of L2-normalised features, the k
  nearest training samples vote for their class with weight ``exp(sim / T)`` (k = 20, T = 0.07).
* :func:`linear_probe`: a deterministic multinomial logistic regression on standardised frozen features (the role of
  MAE's BatchNorm(affine=False) + Linear head, He et al., CVPR 2022, Appendix A.1; facebookresearch/mae
  main_linprobe.py), fitted full-batch with L-BFGS so that the same features always give the same accuracy.

Pure torch: the online callback (:mod:`mim.callbacks.online_eval`) and ``mim eval`` (:mod:`mim.evaluation`) share it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from mim.checks import check_int, check_range
from mim.models.base import Encoder
from mim.models.encoder import MaskedEncoder

__all__ = [
    "Accuracy",
    "FeaturePool",
    "ProbeResult",
    "encoder_features",
    "in_order",
    "knn_classify",
    "linear_probe",
    "loader_features",
    "pool_latent",
    "topk_accuracy",
]

FeaturePool = Literal["avg", "cls", "cls+avg", "tokens"]


@torch.no_grad()
def encoder_features(
    encoder: MaskedEncoder,
    images: Tensor,
    *,
    normalize: Callable[[Tensor], Tensor],
    pool: Literal["cls", "avg", "cls+avg"] = "avg",
    batch_size: int = 512,
) -> Tensor:
    """Features of the full (unmasked) input.

    Args:
        encoder: the encoder, run in eval mode on all tokens.
        images: (B, C, H, W) uint8.
        normalize: maps a uint8 batch to the float input the encoder expects.
        pool: ``cls`` token, ``avg`` of patch tokens, or both concatenated.
        batch_size: images per forward pass.

    Returns:
        (B, D) float32, or (B, 2D) for ``cls+avg``.
    """
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        latent = encoder(normalize(images[start : start + batch_size].to(device)))  # (b, prefix+N, D)
        out.append(pool_latent(encoder, latent, pool).float().cpu())  # (b, D) or (b, 2D)
    encoder.train(was_training)
    return torch.cat(out)


def pool_latent(encoder: Encoder, latent: Tensor, pool: FeaturePool) -> Tensor:
    """Features of an encoder output.

    Args:
        encoder: the encoder that produced ``latent`` (its ``pool`` and ``num_prefix_tokens``).
        latent: (B, prefix + N, D).
        pool: ``avg`` of the patch tokens, the ``cls`` token, both concatenated (``cls+avg``), or the patch
            ``tokens`` themselves (what an attentive probe reads).

    Returns:
        (B, D), (B, 2D) for ``cls+avg``, or (B, N, D) for ``tokens``.
    """
    if pool == "tokens":
        return latent[:, encoder.num_prefix_tokens :]  # (B, N, D)
    if pool == "cls+avg":
        return torch.cat([encoder.pool(latent, "cls"), encoder.pool(latent, "avg")], dim=1)  # (B, 2D)
    return encoder.pool(latent, pool)  # (B, D)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def in_order(loader: Any) -> Any:
    """A map-style ``DataLoader`` rebuilt in order, keeping the last partial batch (a training loader shuffles and
    drops it); any other loader as it is."""
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
        )
    return loader


@torch.no_grad()
def loader_features(
    encoder: Encoder,
    loader: Iterable[Mapping[str, Any]],
    *,
    transfer: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    pool: FeaturePool = "avg",
    max_samples: int | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    store_dtype: torch.dtype = torch.float32,
    progress: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Features and labels of every sample of a loader, the encoder frozen (eval mode, no grad, all tokens).

    The encoder's train/eval mode is restored afterwards. Batches go to the encoder's device, then through
    ``transfer`` (a datamodule's ``on_after_batch_transfer``: normalisation on the device), then
    ``encoder.inputs(batch)``.

    Args:
        encoder: the encoder.
        loader: yields batch dicts with a ``label`` entry.
        transfer: maps a batch on the device to what the encoder reads; None: as is.
        pool: see :func:`pool_latent`.
        max_samples: stop after this many samples (the last batch is cut); None: the whole loader.
        forward_context: a context manager factory around each forward (e.g. a precision plugin's autocast).
        store_dtype: dtype of the returned features (float16 halves a token cache).
        progress: a tqdm progress bar with this description; None: no bar.

    Returns:
        (features on the CPU: (S, D), (S, 2D) or (S, N, D); labels (S,) int64).

    Raises:
        ValueError: a batch without ``label`` (evaluation needs a labelled dataset), or an empty loader.
    """
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    count = 0
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(total=total, desc=progress, unit="batch", leave=False)
    try:
        for raw in loader:
            if "label" not in raw:
                raise ValueError(
                    f"the batches have no 'label' (keys {sorted(raw)}): evaluation needs a labelled dataset "
                    "(for a table, set label_column)"
                )
            batch = _to_device(raw, device)
            if transfer is not None:
                batch = transfer(batch)
            with forward_context():
                latent = encoder(encoder.inputs(batch))  # type: ignore[arg-type]  # (b, prefix + N, D)
            out = pool_latent(encoder, latent, pool)  # (b, D) | (b, N, D)
            take = out.shape[0] if max_samples is None else min(out.shape[0], max_samples - count)
            feats.append(out[:take].to("cpu", store_dtype))
            labels.append(batch["label"][:take].to("cpu", torch.int64))
            count += take
            if bar is not None:
                bar.update()
            if max_samples is not None and count >= max_samples:
                break
    finally:
        encoder.train(was_training)
        if bar is not None:
            bar.close()
    if not feats:
        raise ValueError("the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Share of samples whose label is among the k highest scores, for each k (capped at the class count).

    Args:
        scores: (B, C) logits or votes.
        labels: (B,) int64.

    Returns:
        k -> accuracy in [0, 1].
    """
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (B, kmax)
    hit = top == labels.unsqueeze(1)  # (B, kmax)
    return {k: hit[:, : min(k, scores.shape[1])].any(dim=1).double().mean().item() for k in ks}


@dataclass
class Accuracy:
    """Top-1 and top-5 accuracy in [0, 1]."""

    top1: float
    top5: float


@torch.no_grad()
def knn_classify(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Accuracy:
    """DINO's weighted k-NN classifier on frozen features (facebookresearch/dino eval_knn.py).

    Features are L2-normalised; each test sample takes its k most similar training samples (cosine similarity
    ``s``), and each neighbour adds ``exp(s / temperature)`` to its class's vote. Top-1 is the class with the most
    votes; top-5 counts the label among the 5 classes with the most votes, as DINO (a class without votes never
    counts, so fewer than 5 voted classes give fewer candidates).

    Args:
        train_x: (B, D) features of the labelled reference set.
        train_y: (B,) int64 labels.
        test_x: (B', D) features to classify.
        test_y: (B',) int64 labels.
        k: neighbours (DINO: 20; capped at B).
        temperature: T of the vote weights (DINO: 0.07).
        num_classes: classes (default: max label + 1).
        chunk_size: test samples per similarity matrix (memory: chunk_size x B).

    Returns:
        Top-1 and top-5 accuracy in [0, 1].
    """
    owner = "knn_classify"
    check_int(owner, "k", k)
    check_range(owner, "temperature", temperature, 0, float("inf"), low_open=True)
    check_int(owner, "chunk_size", chunk_size)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"{owner}: features must be (B, D) and (B', D), got {tuple(train_x.shape)}, {tuple(test_x.shape)}"
        )
    if train_y.shape != (train_x.shape[0],) or test_y.shape != (test_x.shape[0],):
        raise ValueError(f"{owner}: labels must be (B,) and (B',), got {tuple(train_y.shape)}, {tuple(test_y.shape)}")
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    k = min(k, train_x.shape[0])
    train = F.normalize(train_x.float(), dim=1)  # (B, D)
    train_y = train_y.to(train.device)
    hits1 = hits5 = 0.0
    for start in range(0, test_x.shape[0], chunk_size):
        query = F.normalize(test_x[start : start + chunk_size].float().to(train.device), dim=1)  # (b, D)
        labels = test_y[start : start + chunk_size].to(train.device)  # (b,)
        sim, idx = (query @ train.T).topk(k, dim=1)  # (b, k) each
        votes = torch.zeros(query.shape[0], num_classes, device=train.device)  # (b, C)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())  # (b, C)
        top = votes.topk(min(5, num_classes), dim=1)  # (b, 5)
        hit = (top.indices == labels.unsqueeze(1)) & (top.values > 0)  # (b, 5)
        hits1 += hit[:, 0].sum().item()
        hits5 += hit.any(dim=1).sum().item()
    n = test_x.shape[0]
    return Accuracy(top1=hits1 / n, top5=hits5 / n)


@dataclass
class ProbeResult:
    """Accuracy of a linear probe (test top-5: the label among the 5 highest logits)."""

    train_accuracy: float
    test_accuracy: float
    test_top5: float | None = None


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iter: int = 300,
) -> ProbeResult:
    """Fit a multinomial logistic regression on standardised features and report accuracies.

    Args:
        train_x: (B, D) features.
        train_y: (B,) int64 labels.
        test_x: (B', D) features.
        test_y: (B',) int64 labels.
        num_classes: number of classes (default: max label + 1).
        weight_decay: L2 penalty on the weights.
        max_iter: L-BFGS iterations.

    Returns:
        Train and test accuracy (and test top-5) in [0, 1].
    """
    if train_x.ndim != 2 or train_x.shape[0] != train_y.shape[0]:
        raise ValueError(
            f"train_x must be (B, D) matching train_y (B,), got {tuple(train_x.shape)}, {tuple(train_y.shape)}"
        )
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    threads = torch.get_num_threads()
    # A small full-batch problem: one thread is as fast, and immune to OpenMP spin-waiting when the
    # cores are shared (measured: 1.6 s with one thread vs minutes with two on a loaded 2-core machine).
    torch.set_num_threads(1)
    try:
        return _fit_probe(train_x, train_y, test_x, test_y, num_classes, weight_decay, max_iter)
    finally:
        torch.set_num_threads(threads)


def _fit_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
) -> ProbeResult:
    train_x, test_x = train_x.double(), test_x.double()
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std  # BatchNorm(affine=False) equivalent
    head = nn.Linear(train_x.shape[1], num_classes).double()
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(train_x), train_y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        train_acc = (head(train_x).argmax(1) == train_y).double().mean().item()
        logits = head(test_x)  # (B', C)
        test_acc = (logits.argmax(1) == test_y).double().mean().item()
        top5 = topk_accuracy(logits, test_y, ks=(5,))[5]
    return ProbeResult(train_accuracy=train_acc, test_accuracy=test_acc, test_top5=top5)
