"""HPM's loss predictor: a second decoder stack that learns which patches are hard to reconstruct.

Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023 (official Haochen-Wang409/HPM
models_mae_learn_loss.py). The loss predictor shares the reconstructor's input (decoder embedding, mask tokens,
fixed position table) and has its own transformer blocks, norm and a linear layer to P values whose mean is the
predicted loss of each token. It is trained on the hidden tokens against the *detached* per-token reconstruction
loss, either

* ``relative`` (the paper's default): for every image and every ordered pair (a, b) of hidden tokens whose
  losses differ, a binary cross-entropy on ``sigmoid(s_b - s_a)`` that token b is harder than token a (both
  orderings counted, ties excluded), normalised by the number of valid pairs in the batch; or
* ``mse``: the per-image standardised loss (unbiased variance, eps 1e-6) regressed with a squared error.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mim.models.decoder import transformer_blocks

__all__ = ["LossPredictor", "relative_loss", "standardized_mse_loss"]

LOG_EPS = 1e-6  # HPM adds 1e-6 inside the logs (models_mae_learn_loss.py; not logsigmoid)


def relative_loss(predicted: Tensor, loss: Tensor) -> Tensor:
    """HPM's pairwise ranking loss (RankNet-style BCE over ordered pairs of hidden tokens).

    ``L = sum_{n,a,b} [-y+ log(sigmoid(d) + 1e-6) - y- log(1 - sigmoid(d) + 1e-6)] / sum (y+ + y-)`` with
    ``d = s_b - s_a``, ``y+ = [l_b > l_a]``, ``y- = [l_b < l_a]``. When every pair is tied the denominator is 0
    (the official code returns NaN); here the loss is then 0, with a zero gradient.

    Args:
        predicted: (B, M) predicted difficulty s of the hidden tokens.
        loss: (B, M) per-token reconstruction loss l (detached here).

    Returns:
        Scalar loss.
    """
    loss = loss.detach()
    d = predicted.unsqueeze(1) - predicted.unsqueeze(2)  # (B, M, M): d[n, a, b] = s_b - s_a
    harder = loss.unsqueeze(1) > loss.unsqueeze(2)  # (B, M, M): y+[n, a, b] = l_b > l_a
    easier = loss.unsqueeze(1) < loss.unsqueeze(2)  # (B, M, M): y-
    p = torch.sigmoid(d.to(torch.promote_types(d.dtype, torch.float32)))  # at least fp32 under autocast
    terms = -(harder * torch.log(p + LOG_EPS) + easier * torch.log(1 - p + LOG_EPS))  # (B, M, M)
    pairs = (harder | easier).sum()
    return terms.sum() / pairs.clamp(min=1)


def standardized_mse_loss(predicted: Tensor, loss: Tensor, eps: float = 1e-6) -> Tensor:
    """HPM's non-relative variant: MSE between s and the per-image standardised (detached) loss.

    Args:
        predicted: (B, M).
        loss: (B, M) per-token reconstruction loss.
        eps: added to the unbiased variance before the square root.

    Returns:
        Scalar loss.
    """
    loss = loss.detach().to(torch.promote_types(loss.dtype, torch.float32))
    target = (loss - loss.mean(dim=1, keepdim=True)) / (loss.var(dim=1, keepdim=True, unbiased=True) + eps).sqrt()
    return (predicted.to(target.dtype) - target).pow(2).mean()


class LossPredictor(nn.Module):
    """Transformer blocks over the decoder's input sequence -> one predicted loss per token.

    Args:
        dim: decoder width Dd (the reconstructor's).
        depth: blocks (HPM: 8, like the reconstructor).
        num_heads: attention heads.
        mlp_ratio: MLP expansion.
        out_dim: width of the final linear layer whose mean is the prediction (HPM: P).
        num_prefix_tokens: prefix tokens (cls) at the front of the sequence, dropped from the output.
    """

    def __init__(
        self, *, dim: int, depth: int, num_heads: int, mlp_ratio: float, out_dim: int, num_prefix_tokens: int
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.blocks = transformer_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        from mim.models.encoder import init_mae_weights_

        init_mae_weights_(self)

    def forward(self, x: Tensor) -> Tensor:
        """(B, prefix + N, Dd) decoder input -> (B, N) predicted loss per token."""
        x = self.blocks(x)
        x = x[:, self.num_prefix_tokens :]  # (B, N, Dd)
        return self.pred(self.norm(x)).mean(dim=-1)  # (B, N)
