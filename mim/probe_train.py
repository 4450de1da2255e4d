"""Probes trained by minibatch SGD on frozen features: MAE's linear probe, V-JEPA's attentive probe, a table MLP.

* :class:`LinearHead`: MAE's linear probe (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
  Appendix A.1; facebookresearch/mae main_linprobe.py): ``BatchNorm1d(D, affine=False, eps=1e-6)`` then a ``Linear``
  head with a truncated-normal init of std 0.01, trained with LARS (:class:`mim.optim.LARS`), lr = blr x batch / 256,
  warmup then cosine to 0 (MAE: blr 0.1, weight decay 0, 90 epochs, 10 warmup).
* :class:`AttentiveClassifier`: V-JEPA's attentive probe (Bardes et al., "Revisiting Feature Prediction for Learning
  Visual Representations from Video", 2024; facebookresearch/jepa src/models/attentive_pooler.py): one learnable
  query cross-attends over the frozen patch tokens in one cross-attention block with an MLP, then a linear
  classifier; AdamW (the official image configs: lr 1e-3 constant then cosine to 0, weight decay 1e-3, 20 epochs).
* :class:`MLPHead`: a small MLP on table-encoder features, the kind of downstream model T-JEPA trains on frozen
  embeddings (Thimonier et al., "T-JEPA: Augmentation-Free Self-Supervised Learning for Tabular Data", ICLR 2025).

The features are computed once and cached (:func:`mim.probe.loader_features`), so an epoch costs only the head.
Every random draw (init, shuffles) comes from ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from mim.checks import check_choice, check_int, check_range
from mim.optim import LARS, param_groups, scaled_lr, warmup_cosine
from mim.probe import Accuracy, topk_accuracy

__all__ = [
    "AttentiveClassifier",
    "LinearHead",
    "MLPHead",
    "ProbeOptimizer",
    "attentive_probe",
    "fit_classifier",
    "minibatches",
    "mlp_probe",
    "sgd_linear_probe",
]

ProbeOptimizer = Literal["lars", "sgd", "adamw"]
IMAGENET_TRAIN = 1_281_167  # ImageNet-1k training images: the set MAE's linear-probe blr is tuned on
Batches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]
"""epoch -> the training minibatches ``(x, y)`` of that epoch."""


def _default_linear_init(linear: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's own ``nn.Linear`` init, drawn from ``generator``."""
    nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
    if linear.bias is not None:
        bound = 1 / math.sqrt(linear.in_features)
        nn.init.uniform_(linear.bias, -bound, bound, generator=generator)


class LinearHead(nn.Module):
    """MAE's linear-probe head: ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear`` (weight trunc-normal std
    0.01, bias 0; facebookresearch/mae main_linprobe.py).

    Args:
        dim: D, the feature width.
        num_classes: classes.
        generator: draws the init.
    """

    def __init__(self, *, dim: int, num_classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_int("LinearHead", "dim", dim)
        check_int("LinearHead", "num_classes", num_classes)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, D) -> (B, num_classes) logits."""
        return self.linear(self.norm(x))


class CrossAttentionBlock(nn.Module):
    """V-JEPA's cross-attention block (facebookresearch/jepa src/models/utils/modules.py): the queries attend over the
    normalised tokens, ``q = q + proj(attn(q, norm1(x)))``, then ``q = q + mlp(norm2(q))``.

    Args:
        dim: D.
        num_heads: attention heads (divides D).
        mlp_ratio: MLP hidden width / D.
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        check_int("CrossAttentionBlock", "num_heads", num_heads)
        check_range("CrossAttentionBlock", "mlp_ratio", mlp_ratio, 0, math.inf, low_open=True)
        if dim % num_heads:
            raise ValueError(f"CrossAttentionBlock.num_heads must divide dim={dim}, got {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: Tensor, x: Tensor) -> Tensor:
        """Queries (B, Q, D) over tokens (B, N, D) -> (B, Q, D)."""
        b, nq, d = q.shape
        h = self.num_heads
        kv = self.kv(self.norm1(x)).reshape(b, x.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)  # (2, B, H, N, D/H)
        qh = self.q(q).reshape(b, nq, h, d // h).transpose(1, 2)  # (B, H, Q, D/H)
        out = F.scaled_dot_product_attention(qh, kv[0], kv[1])  # (B, H, Q, D/H)
        q = q + self.proj(out.transpose(1, 2).reshape(b, nq, d))  # (B, Q, D)
        return q + self.mlp(self.norm2(q))


class AttentiveClassifier(nn.Module):
    """V-JEPA's attentive probe: a learnable query pools the tokens by cross-attention, a linear layer classifies.

    Init as the official ``AttentivePooler``: the query and every linear layer of the block truncated normal with std
    ``init_std`` (biases 0, norms 1 / 0), the attention output and MLP output projections divided by sqrt(2); the
    classifier keeps PyTorch's default ``nn.Linear`` init (as the official ``AttentiveClassifier``).

    Args:
        dim: D, the token width.
        num_classes: classes.
        num_heads: attention heads (V-JEPA: the encoder's).
        mlp_ratio: MLP hidden width / D.
        init_std: std of the truncated-normal init (V-JEPA: 0.02).
        generator: draws the init.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_classes: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_int("AttentiveClassifier", "dim", dim)
        check_int("AttentiveClassifier", "num_classes", num_classes)
        check_range("AttentiveClassifier", "init_std", init_std, 0, math.inf, low_open=True)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = CrossAttentionBlock(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.linear = nn.Linear(dim, num_classes)
        generator = generator or torch.Generator().manual_seed(0)
        nn.init.trunc_normal_(self.query, std=init_std, generator=generator)
        for m in self.block.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std, generator=generator)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.block.proj.weight.div_(math.sqrt(2.0))  # the official _rescale_blocks, layer 1
            self.block.mlp.fc2.weight.div_(math.sqrt(2.0))
        _default_linear_init(self.linear, generator)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, D) tokens -> (B, num_classes) logits."""
        q = self.query.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return self.linear(self.block(q, tokens).squeeze(1))  # (B, num_classes)


class MLPHead(nn.Module):
    """``BatchNorm1d(affine=False)`` -> Linear -> GELU -> Linear, for table-encoder features.

    Args:
        dim: D, the feature width.
        num_classes: classes.
        hidden: hidden width.
        generator: draws the init (PyTorch's default ``nn.Linear`` init).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_classes: int,
        hidden: int = 256,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for field, value in (("dim", dim), ("num_classes", num_classes), ("hidden", hidden)):
            check_int("MLPHead", field, value)
        self.net = nn.Sequential(
            nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes)
        )
        generator = generator or torch.Generator().manual_seed(0)
        for m in self.net:
            if isinstance(m, nn.Linear):
                _default_linear_init(m, generator)

    def forward(self, x: Tensor) -> Tensor:
        """(B, D) -> (B, num_classes) logits."""
        return self.net(x)


def minibatches(x: Tensor, y: Tensor, *, batch_size: int, seed: int = 0) -> tuple[Batches, int]:
    """Shuffled minibatches of cached features, a fresh order each epoch (a function of ``(seed, epoch)``).

    The last partial batch is dropped (BatchNorm needs more than one sample), unless the whole set is smaller than
    one batch.

    Args:
        x: (S, ...) features.
        y: (S,) labels.
        batch_size: samples per step.
        seed: seeds the orders.

    Returns:
        (epoch -> minibatches, steps per epoch).
    """
    n = x.shape[0]
    size = min(batch_size, n)
    steps = n // size

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))  # (S,)
        for i in range(steps):
            idx = order[i * size : (i + 1) * size]  # (b,)
            yield x[idx], y[idx]

    return batches, steps


def _optimizer(model: nn.Module, kind: ProbeOptimizer, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """LARS (decay and trust ratio on ndim > 1 inside the optimizer), or SGD / AdamW with no decay on ndim <= 1."""
    if kind == "lars":
        return LARS(model.parameters(), lr=lr, weight_decay=weight_decay)
    groups = [{k: g[k] for k in ("params", "weight_decay")} for g in param_groups(model, weight_decay=weight_decay)]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr)


def fit_classifier(
    model: nn.Module,
    train: Batches,
    test: Iterable[tuple[Tensor, Tensor]],
    *,
    steps_per_epoch: int,
    epochs: int,
    lr: float,
    optimizer: ProbeOptimizer = "lars",
    weight_decay: float = 0.0,
    warmup_epochs: float = 0.0,
    min_lr: float = 0.0,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> Accuracy:
    """Train a classifier with cross-entropy (per-step warmup + cosine lr, :func:`mim.optim.warmup_cosine`), then
    measure its top-1 / top-5 on ``test``.

    Args:
        model: maps a (B, ...) float batch to (B, C) logits.
        train: epoch -> minibatches (e.g. :func:`minibatches`, or an encoder run per epoch).
        test: minibatches to evaluate.
        steps_per_epoch: optimizer steps per epoch (for the schedule).
        epochs: epochs.
        lr: peak learning rate.
        optimizer: ``lars`` (MAE's linear probe), ``sgd`` (momentum 0.9) or ``adamw``.
        weight_decay: decay of the ndim > 1 parameters.
        warmup_epochs: linear warmup from 0.
        min_lr: end of the cosine.
        device: where the head trains.
        progress: a tqdm bar over the epochs with this description; None: no bar.

    Returns:
        Test top-1 and top-5.
    """
    owner = "fit_classifier"
    check_int(owner, "epochs", epochs)
    check_int(owner, "steps_per_epoch", steps_per_epoch)
    check_choice(owner, "optimizer", optimizer, ("lars", "sgd", "adamw"))
    check_range(owner, "lr", lr, 0, math.inf, low_open=True)
    model.to(device).train()
    opt = _optimizer(model, optimizer, lr, weight_decay)
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    epoch_range: Iterable[int] = range(epochs)
    if progress is not None:
        from tqdm.auto import tqdm

        epoch_range = tqdm(epoch_range, desc=progress, unit="epoch", leave=False)
    step = 0
    for epoch in epoch_range:
        for x, y in train(epoch):
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, warmup_steps=warmup, total_steps=total, base_lr=lr, min_lr=min_lr)
            loss = F.cross_entropy(model(x.to(device).float()), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for x, y in test:
            logits.append(model(x.to(device).float()).float().cpu())  # (b, C)
            labels.append(y.cpu())
    acc = topk_accuracy(torch.cat(logits), torch.cat(labels), ks=(1, 5))
    return Accuracy(top1=acc[1], top5=acc[5])


def _test_batches(x: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def _num_classes(num_classes: int | None, *labels: Tensor) -> int:
    return num_classes or int(max(label.max() for label in labels)) + 1


def sgd_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int | None = None,
    optimizer: ProbeOptimizer = "lars",
    epochs: int = 90,
    batch_size: int = 256,
    blr: float | None = None,
    weight_decay: float = 0.0,
    warmup_epochs: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> Accuracy:
    """MAE's linear probe on cached features: :class:`LinearHead` trained with LARS (or SGD / AdamW),
    lr = blr x batch / 256, warmup then cosine to 0.

    Args:
        train_x: (S, D) features.
        train_y: (S,) int64 labels.
        test_x: (S', D) features.
        test_y: (S',) int64 labels.
        num_classes: classes (default: max label + 1).
        optimizer: ``lars`` (MAE), ``sgd`` or ``adamw``.
        epochs: epochs (MAE: 90).
        batch_size: samples per step (MAE: 16384; capped at S).
        blr: base learning rate. None: MAE's 0.1 scaled by ``max(1, 1,281,167 / S)``. LARS moves the weights by about
            ``blr x S / 256 x 0.001`` of their norm per epoch, so MAE's value, tuned on ImageNet-1k's 1,281,167
            images, barely moves a probe on a small set (Fashion-MNIST, 1000 images, random-init encoder: 0.11
            top-1 at blr 0.1, 0.65 with the scaled 128); the scaling keeps MAE's progress per epoch. With SGD the
            default is 0.1, with AdamW 1e-3.
        weight_decay: (MAE: 0).
        warmup_epochs: linear warmup; None: ``epochs / 9`` (MAE: 10 of 90).
        seed: seeds the init and the shuffles.
        device: where the head trains.
        progress: tqdm description; None: no bar.

    Returns:
        Test top-1 and top-5.
    """
    batches, steps = minibatches(train_x, train_y, batch_size=batch_size, seed=seed)
    classes = _num_classes(num_classes, train_y, test_y)
    if blr is None:
        blr = {"lars": 0.1 * max(1.0, IMAGENET_TRAIN / train_x.shape[0]), "sgd": 0.1, "adamw": 1e-3}[optimizer]
    head = LinearHead(dim=train_x.shape[1], num_classes=classes, generator=torch.Generator().manual_seed(seed))
    return fit_classifier(
        head,
        batches,
        _test_batches(test_x, test_y, 4096),
        steps_per_epoch=steps,
        epochs=epochs,
        lr=scaled_lr(blr, min(batch_size, train_x.shape[0])),
        optimizer=optimizer,
        weight_decay=weight_decay,
        warmup_epochs=epochs / 9 if warmup_epochs is None else warmup_epochs,
        device=device,
        progress=progress,
    )


def attentive_probe(
    train: tuple[Tensor, Tensor] | tuple[Batches, int],
    test: tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]],
    *,
    dim: int,
    num_classes: int,
    num_heads: int,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    warmup_epochs: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> Accuracy:
    """V-JEPA's attentive probe (:class:`AttentiveClassifier`) trained with AdamW, cosine to 0.

    Args:
        train: cached ``(tokens (S, N, D), labels (S,))``, or ``(epoch -> minibatches, steps per epoch)`` when the
            tokens do not fit in memory (e.g. the encoder run on every batch of every epoch).
        test: cached ``(tokens, labels)`` or minibatches.
        dim: D.
        num_classes: classes.
        num_heads: attention heads (V-JEPA: the encoder's).
        epochs: epochs (V-JEPA's image probes: 20).
        batch_size: samples per step, for cached tokens.
        lr: peak AdamW learning rate (V-JEPA: 1e-3).
        weight_decay: on the ndim > 1 parameters (V-JEPA's image probes: 1e-3).
        warmup_epochs: linear warmup (V-JEPA: 0).
        seed: seeds the init and the shuffles.
        device: where the probe trains.
        progress: tqdm description; None: no bar.

    Returns:
        Test top-1 and top-5.
    """
    if isinstance(train[0], Tensor):
        batches, steps = minibatches(train[0], train[1], batch_size=batch_size, seed=seed)  # type: ignore[arg-type]
    else:
        batches, steps = train  # type: ignore[assignment]
    if isinstance(test, tuple) and isinstance(test[0], Tensor):
        test = _test_batches(test[0], test[1], batch_size)
    model = AttentiveClassifier(
        dim=dim, num_classes=num_classes, num_heads=num_heads, generator=torch.Generator().manual_seed(seed)
    )
    return fit_classifier(
        model,
        batches,
        test,  # type: ignore[arg-type]
        steps_per_epoch=steps,
        epochs=epochs,
        lr=lr,
        optimizer="adamw",
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        device=device,
        progress=progress,
    )


def mlp_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int | None = None,
    hidden: int = 256,
    epochs: int = 100,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: str | None = None,
) -> Accuracy:
    """A small MLP (:class:`MLPHead`) on cached features, trained with AdamW, cosine to 0.

    Args:
        train_x: (S, D) features.
        train_y: (S,) int64 labels.
        test_x: (S', D) features.
        test_y: (S',) int64 labels.
        num_classes: classes (default: max label + 1).
        hidden: hidden width.
        epochs: epochs.
        batch_size: samples per step.
        lr: peak AdamW learning rate.
        weight_decay: on the ndim > 1 parameters.
        seed: seeds the init and the shuffles.
        device: where the head trains.
        progress: tqdm description; None: no bar.

    Returns:
        Test top-1 and top-5.
    """
    batches, steps = minibatches(train_x, train_y, batch_size=batch_size, seed=seed)
    classes = _num_classes(num_classes, train_y, test_y)
    head = MLPHead(
        dim=train_x.shape[1], num_classes=classes, hidden=hidden, generator=torch.Generator().manual_seed(seed)
    )
    return fit_classifier(
        head,
        batches,
        _test_batches(test_x, test_y, 4096),
        steps_per_epoch=steps,
        epochs=epochs,
        lr=lr,
        optimizer="adamw",
        weight_decay=weight_decay,
        device=device,
        progress=progress,
    )
