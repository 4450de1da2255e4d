"""Contract tests every MaskingStrategy, Target and Encoder implementation opts into.

Subclass a contract in a ``Test*`` class, declare the class under test and how to build it::

    class TestRandomMaskingContract(MaskingStrategyContract):
        strategy_cls = RandomMasking

        def make_strategy(self):
            return RandomMasking(mask_ratio=0.75)

``tests/test_contracts_meta.py`` fails when a concrete strategy, target or encoder in ``mim`` has no such class.
"""

from __future__ import annotations

import math
import pickle
from typing import ClassVar

import pytest
import torch
from torch import Tensor

from mim.masking.base import MaskingStrategy, ScoreMasking
from mim.models.base import Encoder
from mim.models.encoder import MaskedEncoder
from mim.targets.base import Target
from mim.types import Masks, TokenGrid
from tests.factories import tiny_encoder

__all__ = ["EncoderContract", "MaskingStrategyContract", "TargetContract"]

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=CPU).manual_seed(seed)


class MaskingStrategyContract:
    """Invariants of every :class:`~mim.masking.base.MaskingStrategy` (see mim/types.py for the convention).

    Class attributes a subclass sets:
        strategy_cls: the class under test (the meta-test matches on it).
        grids: token grids to check; the largest is used for the statistical checks.
        batch_size: B of the drawn masks.
        targets_cover_hidden: the target groups hold exactly the hidden tokens (default: ScoreMasking).
    """

    strategy_cls: ClassVar[type[MaskingStrategy]]
    grids: ClassVar[list[TokenGrid]] = [TokenGrid(1, 14, 14), TokenGrid(1, 7, 5), TokenGrid(1, 2, 3)]
    batch_size: ClassVar[int] = 6
    targets_cover_hidden: ClassVar[bool | None] = None

    # ------------------------------------------------------------------ hooks
    def make_strategy(self) -> MaskingStrategy:
        raise NotImplementedError

    def make_scores(self, batch_size: int, grid: TokenGrid, generator: torch.Generator) -> Tensor:
        """(B, N) scores for strategies with ``needs_scores``."""
        return torch.rand(batch_size, grid.num_tokens, generator=generator)

    def expected_num_visible(self, strategy: MaskingStrategy, grid: TokenGrid) -> int | None:
        """K for ``grid``; None when the strategy has no mask ratio (then only K constant per batch is checked)."""
        ratio = getattr(strategy, "mask_ratio", None)
        return None if ratio is None else int(grid.num_tokens * (1 - ratio))

    # ------------------------------------------------------------------ helpers
    def draw(
        self,
        strategy: MaskingStrategy,
        grid: TokenGrid,
        seed: int = 0,
        batch_size: int | None = None,
        progress: float = 0.0,
    ) -> Masks:
        b = self.batch_size if batch_size is None else batch_size
        scores = self.make_scores(b, grid, _gen(10_000 + seed)) if strategy.needs_scores else None
        return strategy(b, grid, generator=_gen(seed), device=CPU, scores=scores, progress=progress)

    def covers(self, strategy: MaskingStrategy) -> bool:
        if self.targets_cover_hidden is not None:
            return self.targets_cover_hidden
        return isinstance(strategy, ScoreMasking)

    @property
    def largest_grid(self) -> TokenGrid:
        return max(self.grids, key=lambda g: g.num_tokens)

    # ------------------------------------------------------------------ tests
    def test_strategy_cls_matches(self) -> None:
        strategy = self.make_strategy()
        assert type(strategy) is self.strategy_cls
        assert isinstance(strategy, MaskingStrategy)
        assert isinstance(repr(strategy), str)

    def test_index_dtype_shape_and_range(self) -> None:
        strategy = self.make_strategy()
        for grid in self.grids:
            n = grid.num_tokens
            masks = self.draw(strategy, grid)
            assert isinstance(masks, Masks)
            assert masks.num_tokens == n
            indices = [("visible", masks.visible), ("targets", masks.targets)]
            if masks.decoder is not None:
                indices.append(("decoder", masks.decoder))
            assert masks.visible.ndim == 2 and masks.targets.ndim == 3
            for name, idx in indices:
                assert idx.dtype == torch.int64, f"{name} dtype {idx.dtype}"
                assert idx.device.type == "cpu"
                assert idx.shape[0] == self.batch_size, f"{name} batch {idx.shape}"
                assert idx.numel() > 0
                assert int(idx.min()) >= 0 and int(idx.max()) < n, f"{name} out of [0, {n}) for {grid}"

    def test_visible_sorted_unique(self) -> None:
        strategy = self.make_strategy()
        for grid in self.grids:
            masks = self.draw(strategy, grid)
            v = masks.visible
            assert bool((v[:, 1:] > v[:, :-1]).all()), f"visible not strictly ascending for {grid}"
            t = masks.targets
            for b in range(t.shape[0]):
                for m in range(t.shape[1]):
                    group = t[b, m].tolist()
                    assert len(set(group)) == len(group), "duplicate tokens in a target group"

    def test_exact_visible_count(self) -> None:
        strategy = self.make_strategy()
        for grid in self.grids:
            masks = self.draw(strategy, grid)
            expected = self.expected_num_visible(strategy, grid)
            if expected is not None:
                assert masks.visible.shape[1] == expected, f"K for N={grid.num_tokens}"
            k = masks.visible.shape[1]
            hidden = masks.hidden
            assert hidden.shape == (self.batch_size, grid.num_tokens)
            assert hidden.dtype == torch.bool
            # every sample hides exactly N - K tokens
            assert hidden.sum(dim=1).tolist() == [grid.num_tokens - k] * self.batch_size

    def test_visible_and_targets(self) -> None:
        strategy = self.make_strategy()
        for grid in self.grids:
            masks = self.draw(strategy, grid)
            n = grid.num_tokens
            for b in range(self.batch_size):
                vis = set(masks.visible[b].tolist())
                tgt = set(masks.targets[b].flatten().tolist())
                assert not vis & tgt, f"visible and target tokens overlap in sample {b} for {grid}"
                if self.covers(strategy):
                    assert vis | tgt == set(range(n)), f"visible + targets do not cover all {n} tokens"
                    assert len(masks.targets[b].flatten()) == n - len(vis)

    def test_deterministic_under_generator(self) -> None:
        strategy = self.make_strategy()
        grid = self.largest_grid
        a, b = self.draw(strategy, grid, seed=123), self.draw(strategy, grid, seed=123)
        assert torch.equal(a.visible, b.visible) and torch.equal(a.targets, b.targets)
        c = self.draw(strategy, grid, seed=124)
        assert not torch.equal(a.visible, c.visible), "different seeds gave identical masks"

    def test_randomness_only_from_generator(self) -> None:
        strategy = self.make_strategy()
        grid = self.largest_grid
        torch.manual_seed(1)
        state = torch.get_rng_state()
        a = self.draw(strategy, grid, seed=5)
        assert torch.equal(torch.get_rng_state(), state), "the strategy consumed the global torch RNG"
        torch.manual_seed(2)
        b = self.draw(strategy, grid, seed=5)
        assert torch.equal(a.visible, b.visible) and torch.equal(a.targets, b.targets)

    def test_samples_differ_within_batch(self) -> None:
        strategy = self.make_strategy()
        masks = self.draw(strategy, self.largest_grid, seed=7, batch_size=8)
        rows = {tuple(r) for r in masks.hidden.tolist()}
        assert len(rows) == 8, f"only {len(rows)} distinct masks among 8 samples"

    def test_picklable(self) -> None:
        strategy = self.make_strategy()
        clone = pickle.loads(pickle.dumps(strategy))
        assert type(clone) is type(strategy)
        for grid in self.grids:
            a, b = self.draw(strategy, grid, seed=3), self.draw(clone, grid, seed=3)
            assert torch.equal(a.visible, b.visible) and torch.equal(a.targets, b.targets)

    def test_needs_scores_honoured(self) -> None:
        strategy = self.make_strategy()
        grid = self.grids[0]
        if strategy.needs_scores:
            with pytest.raises(ValueError, match="scores"):
                strategy(2, grid, generator=_gen(0), device=CPU, scores=None)
        else:
            masks = strategy(2, grid, generator=_gen(0), device=CPU)  # scores and progress left at defaults
            assert masks.visible.shape[0] == 2

    def test_progress_endpoints(self) -> None:
        strategy = self.make_strategy()
        grid = self.largest_grid
        for progress in (0.0, 0.5, 1.0):
            masks = self.draw(strategy, grid, progress=progress)
            expected = self.expected_num_visible(strategy, grid)
            if expected is not None:
                assert masks.visible.shape[1] == expected
            assert bool((masks.visible[:, 1:] > masks.visible[:, :-1]).all())


class TargetContract:
    """Invariants of every :class:`~mim.targets.base.Target`.

    Class attributes a subclass sets:
        target_cls: the class under test (the meta-test matches on it).
        allow_no_grad: names (relative to the encoder or the target) of trainable parameters that may
            legitimately receive no gradient from this target.
    """

    target_cls: ClassVar[type[Target]]
    allow_no_grad: ClassVar[frozenset[str]] = frozenset()
    batch_size: ClassVar[int] = 3
    mask_ratio: ClassVar[float] = 0.75

    # ------------------------------------------------------------------ hooks
    def make_target(self, **overrides) -> Target:
        raise NotImplementedError

    def make_encoder(self) -> MaskedEncoder:
        return tiny_encoder()

    def make_batch(self, encoder: MaskedEncoder) -> dict[str, Tensor]:
        g = _gen(1)
        return {"image": torch.randn(self.batch_size, encoder.in_chans, *encoder.img_size, generator=g)}

    def make_masks(self, encoder: MaskedEncoder) -> Masks:
        from mim.masking.random import RandomMasking

        return RandomMasking(mask_ratio=self.mask_ratio)(self.batch_size, encoder.grid, generator=_gen(2), device=CPU)

    # ------------------------------------------------------------------ helpers
    def setup_parts(self) -> tuple[Target, MaskedEncoder, dict[str, Tensor], Masks]:
        encoder = self.make_encoder()
        target = self.make_target()
        target.bind(encoder)
        return target, encoder, self.make_batch(encoder), self.make_masks(encoder)

    def run(self, target: Target, encoder: MaskedEncoder, batch, masks: Masks) -> dict[str, Tensor]:
        latent = encoder(encoder.inputs(batch), masks.visible)  # (B, prefix+K, D)
        return target(batch, masks, latent, encoder)

    # ------------------------------------------------------------------ tests
    def test_target_cls_matches(self) -> None:
        target = self.make_target()
        assert type(target) is self.target_cls
        assert isinstance(target, Target)
        assert math.isfinite(target.weight) and target.weight >= 0

    def test_loss_is_finite_scalar(self) -> None:
        target, encoder, batch, masks = self.setup_parts()
        out = self.run(target, encoder, batch, masks)
        assert isinstance(out, dict) and "loss" in out
        loss = out["loss"]
        assert isinstance(loss, Tensor) and loss.ndim == 0
        assert loss.dtype.is_floating_point and bool(torch.isfinite(loss))
        assert loss.requires_grad
        for key, value in out.items():
            assert isinstance(value, Tensor) and value.ndim == 0, f"{key} is not a scalar tensor"

    def test_gradients_reach_encoder_and_head(self) -> None:
        target, encoder, batch, masks = self.setup_parts()
        self.run(target, encoder, batch, masks)["loss"].backward()
        for owner, module in (("encoder", encoder), ("target", target)):
            trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            if owner == "encoder":
                assert trainable, "the encoder has no trainable parameters"
            nonzero = False
            for name, p in trainable:
                if name in self.allow_no_grad:
                    continue
                assert p.grad is not None, f"{owner}.{name} received no gradient"
                assert bool(torch.isfinite(p.grad).all()), f"{owner}.{name} has a non-finite gradient"
                nonzero |= bool(p.grad.abs().sum() > 0)
            if trainable:
                assert nonzero, f"all gradients of the {owner} are zero"
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    assert p.grad is None, f"frozen {owner}.{name} received a gradient"

    def test_frozen_tables_stay_frozen(self) -> None:
        target, encoder, _, _ = self.setup_parts()
        tables = [(n, p) for m in (encoder, target) for n, p in m.named_parameters() if "pos_embed" in n]
        assert tables, "expected fixed sin-cos position tables (pos_embed) in the encoder or the target"
        for name, p in tables:
            assert not p.requires_grad, f"{name} (a fixed sin-cos table) is trainable"

    def test_deterministic(self) -> None:
        target, encoder, batch, masks = self.setup_parts()
        a = self.run(target, encoder, batch, masks)
        b = self.run(target, encoder, batch, masks)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{key} differs between identical calls"

    def test_rejects_negative_weight(self) -> None:
        with pytest.raises(ValueError, match="weight"):
            self.make_target(weight=-1.0)
        with pytest.raises(ValueError, match="weight"):
            self.make_target(weight=float("nan"))

    def test_optional_hooks(self) -> None:
        target, encoder, batch, _ = self.setup_parts()
        scores = target.token_scores(batch, encoder)
        if scores is not None:
            assert scores.shape == (self.batch_size, encoder.grid.num_tokens)
        target.after_step(encoder, 0.5)  # must not raise
        assert isinstance(target.no_weight_decay(), set)


class EncoderContract:
    """Invariants of every :class:`~mim.models.base.Encoder`: what the module, the targets and export rely on.

    Class attributes a subclass sets:
        encoder_cls: the class under test (the meta-test matches on it).
        batch_size: B of the test batch.
        mask_ratio: share of hidden tokens in the visible-token checks.
    """

    encoder_cls: ClassVar[type[Encoder]]
    batch_size: ClassVar[int] = 3
    mask_ratio: ClassVar[float] = 0.5

    # ------------------------------------------------------------------ hooks
    def make_encoder(self) -> Encoder:
        raise NotImplementedError

    def make_batch(self, encoder: Encoder) -> dict[str, Tensor]:
        """A batch holding what the encoder reads."""
        raise NotImplementedError

    def perturb(self, batch: dict[str, Tensor], encoder: Encoder, tokens: Tensor) -> dict[str, Tensor]:
        """A copy of ``batch`` whose input differs from ``batch``'s only inside the tokens ``tokens`` (B, H)."""
        raise NotImplementedError

    def rebuild(self, config: dict) -> Encoder:
        """A new encoder from ``encoder.config`` (the checkpoint's record)."""
        return self.encoder_cls(**config)

    # ------------------------------------------------------------------ helpers
    def visible(self, encoder: Encoder) -> tuple[Tensor, Tensor]:
        """(visible (B, K), hidden (B, N - K)) index tensors of a fixed random mask."""
        from mim.masking.random import RandomMasking

        masks = RandomMasking(mask_ratio=self.mask_ratio)(self.batch_size, encoder.grid, generator=_gen(3), device=CPU)
        return masks.visible, masks.targets[:, 0]

    # ------------------------------------------------------------------ tests
    def test_encoder_cls_matches(self) -> None:
        encoder = self.make_encoder()
        assert type(encoder) is self.encoder_cls
        assert isinstance(encoder, Encoder)

    def test_declared_attributes(self) -> None:
        encoder = self.make_encoder()
        assert encoder.is_configured
        assert isinstance(encoder.grid, TokenGrid) and encoder.grid.num_tokens >= 1
        for name in ("embed_dim", "num_heads", "depth"):
            value = getattr(encoder, name)
            assert isinstance(value, int) and value >= 1, f"{name} = {value!r}"
        assert isinstance(encoder.num_prefix_tokens, int) and encoder.num_prefix_tokens >= 0
        assert isinstance(encoder.has_class_token, bool)
        assert encoder.num_prefix_tokens >= int(encoder.has_class_token)
        assert encoder.embed_dim % encoder.num_heads == 0
        assert encoder.modality in ("image", "video", "table")

    def test_output_shapes(self) -> None:
        encoder = self.make_encoder()
        inputs = encoder.inputs(self.make_batch(encoder))
        prefix, d, n = encoder.num_prefix_tokens, encoder.embed_dim, encoder.grid.num_tokens
        assert encoder(inputs).shape == (self.batch_size, prefix + n, d)
        visible, _ = self.visible(encoder)
        out = encoder(inputs, visible)
        assert out.shape == (self.batch_size, prefix + visible.shape[1], d)
        assert out.dtype.is_floating_point and bool(torch.isfinite(out).all())

    def test_hidden_tokens_do_not_reach_the_output(self) -> None:
        encoder = self.make_encoder().eval()
        batch = self.make_batch(encoder)
        visible, hidden = self.visible(encoder)
        changed = self.perturb(batch, encoder, hidden)
        with torch.no_grad():
            a = encoder(encoder.inputs(batch), visible)
            b = encoder(encoder.inputs(changed), visible)
            torch.testing.assert_close(a, b)
            # ... while a change to a visible token does reach it (so the check above can fail)
            c = encoder(encoder.inputs(self.perturb(batch, encoder, visible[:, :1])), visible)
        assert not torch.allclose(a, c)

    def test_visible_order_is_the_output_order(self) -> None:
        """Encoding a subset gives the rows of those tokens; prefix rows come first (no position mix-up)."""
        encoder = self.make_encoder().eval()
        inputs = encoder.inputs(self.make_batch(encoder))
        visible, _ = self.visible(encoder)
        with torch.no_grad():
            out = encoder(inputs, visible)
            flipped = encoder(inputs, visible.flip(1))
        p = encoder.num_prefix_tokens
        torch.testing.assert_close(flipped[:, p:], out[:, p:].flip(1), atol=1e-5, rtol=1e-5)

    def test_gradients_reach_trainable_parameters(self) -> None:
        encoder = self.make_encoder()
        visible, _ = self.visible(encoder)
        encoder(encoder.inputs(self.make_batch(encoder)), visible).square().mean().backward()
        for name, p in encoder.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and bool(torch.isfinite(p.grad).all()), f"{name} got no finite gradient"
            else:
                assert p.grad is None, f"frozen {name} received a gradient"

    def test_pool(self) -> None:
        encoder = self.make_encoder()
        latent = torch.randn(self.batch_size, encoder.num_prefix_tokens + 5, encoder.embed_dim, generator=_gen(4))
        torch.testing.assert_close(encoder.pool(latent, "avg"), latent[:, encoder.num_prefix_tokens :].mean(1))
        if encoder.has_class_token:
            assert torch.equal(encoder.pool(latent, "cls"), latent[:, 0])
        else:
            with pytest.raises(ValueError, match="class token"):
                encoder.pool(latent, "cls")

    def test_no_weight_decay_names_exist(self) -> None:
        encoder = self.make_encoder()
        names = {n for n, _ in encoder.named_parameters()}
        special = encoder.no_weight_decay()
        assert isinstance(special, set)
        assert special & names, "no_weight_decay names none of the encoder's parameters"

    def test_config_rebuilds_the_encoder(self) -> None:
        """``config`` is plain JSON and rebuilds an encoder whose state dict the original loads into strictly."""
        import json

        encoder = self.make_encoder()
        config = json.loads(json.dumps(encoder.config))
        assert config == encoder.config, "encoder.config is not plain JSON (tuples, tensors or objects inside)"
        twin = self.rebuild(config)
        twin.load_state_dict(encoder.state_dict(), strict=True)
        batch = self.make_batch(encoder)
        with torch.no_grad():
            torch.testing.assert_close(twin.eval()(twin.inputs(batch)), encoder.eval()(encoder.inputs(batch)))

    def test_deepcopy_and_pickle(self) -> None:
        """EMA teachers deep-copy the encoder; spawned workers pickle it."""
        import copy

        encoder = self.make_encoder().eval()
        batch = self.make_batch(encoder)
        with torch.no_grad():
            expected = encoder(encoder.inputs(batch))
            for twin in (copy.deepcopy(encoder), pickle.loads(pickle.dumps(encoder))):
                torch.testing.assert_close(twin(twin.inputs(batch)), expected)
