"""FeatureSubsetMasking (T-JEPA): contract, count distribution, per-feature uniformity, distinct targets, the
prefix (REG / cls) token never masked, and the debug recipe training on a real table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mim.masking import FeatureSubsetMasking
from mim.masking.feature_subset import feasible_count_pairs
from mim.models import MaskedTableEncoder
from mim.types import Masks, TokenGrid
from tests.contracts import MaskingStrategyContract
from tests.factories import LossRecorder

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "debug" / "feature_subsets_table.yaml"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _chi2_ok(stat: float, dof: int, sigmas: float = 5.0) -> bool:
    """Normal approximation of the chi-square tail: stat within dof +- sigmas * sqrt(2 dof)."""
    return abs(stat - dof) < sigmas * math.sqrt(2 * dof)


class TestFeatureSubsetMaskingContract(MaskingStrategyContract):
    strategy_cls = FeatureSubsetMasking
    grids = [TokenGrid(1, 1, 54), TokenGrid(1, 1, 8), TokenGrid(1, 1, 3)]
    targets_cover_hidden = False  # features in neither the context nor a target are hidden and never predicted

    def make_strategy(self) -> FeatureSubsetMasking:
        return FeatureSubsetMasking()


class TestFeatureSubsetMaskingContractAnyGrid(MaskingStrategyContract):
    strategy_cls = FeatureSubsetMasking
    grids = [TokenGrid(1, 14, 14), TokenGrid(2, 4, 5), TokenGrid(1, 1, 13)]
    targets_cover_hidden = False

    def make_strategy(self) -> FeatureSubsetMasking:
        return FeatureSubsetMasking(context_share=(0.3, 0.5), target_share=(0.1, 0.2), num_targets=2)


# ---------------------------------------------------------------------- configuration and counts
def test_defaults_are_tjepa_launch_values() -> None:
    s = FeatureSubsetMasking()
    assert s.context_share == (0.1363, 0.3682) and s.target_share == (0.1556, 0.6222) and s.num_targets == 4
    # Jannis (54 features): round(7.36)=7, round(19.88)=20, round(8.40)=8, round(33.60)=34
    assert s.count_ranges(54) == ((7, 20), (8, 34))
    assert feasible_count_pairs(54, (7, 20), (8, 34)) == 14 * 27  # 20 + 34 = 54: the constraint never binds
    assert s.count_ranges(3) == ((1, 1), (1, 2))  # at least one feature each


def test_count_pair_enumeration_matches_brute_force() -> None:
    for n, c, t in [(10, (3, 7), (3, 7)), (54, (7, 20), (8, 34)), (5, (1, 4), (2, 4)), (9, (2, 2), (7, 9))]:
        brute = sum(1 for a in range(c[0], c[1] + 1) for b in range(t[0], t[1] + 1) if a + b <= n)
        assert feasible_count_pairs(n, c, t) == brute


def test_counts_uniform_over_their_ranges() -> None:
    """Defaults on F = 54: n_ctx uniform on 7..20, n_tgt uniform on 8..34, independent (chi-square, 8000 draws)."""
    s, draws = FeatureSubsetMasking(), 8000
    pairs = np.array([s.sample_counts(54, _gen(i)) for i in range(draws)])  # (draws, 2)
    (c_lo, c_hi), (t_lo, t_hi) = s.count_ranges(54)
    assert pairs[:, 0].min() == c_lo and pairs[:, 0].max() == c_hi
    assert pairs[:, 1].min() == t_lo and pairs[:, 1].max() == t_hi
    for col, lo, hi in ((0, c_lo, c_hi), (1, t_lo, t_hi)):
        k = hi - lo + 1
        observed = np.bincount(pairs[:, col] - lo, minlength=k)
        stat = float(((observed - draws / k) ** 2 / (draws / k)).sum())
        assert _chi2_ok(stat, k - 1), f"column {col}: chi-square {stat:.1f} for {k - 1} dof"
    kc, kt = c_hi - c_lo + 1, t_hi - t_lo + 1
    joint = np.bincount((pairs[:, 0] - c_lo) * kt + pairs[:, 1] - t_lo, minlength=kc * kt)
    stat = float(((joint - draws / (kc * kt)) ** 2 / (draws / (kc * kt))).sum())
    assert _chi2_ok(stat, kc * kt - 1), f"joint chi-square {stat:.1f}"


def test_binding_constraint_gives_uniform_feasible_pairs() -> None:
    """F = 10, both shares (0.3, 0.7): mim's draw is uniform over the 15 pairs with c + t <= 10 (the release's rounded
    counts are not: test_official_counts_follow_the_released_redraw_loop)."""
    s, draws, n = FeatureSubsetMasking(context_share=(0.3, 0.7), target_share=(0.3, 0.7)), 4500, 10
    pairs = [s.sample_counts(n, _gen(i)) for i in range(draws)]
    feasible = [(c, t) for c in range(3, 8) for t in range(3, 8) if c + t <= n]
    assert len(feasible) == 15
    assert set(pairs) == set(feasible)  # every feasible pair occurs, nothing else does
    observed = np.array([pairs.count(p) for p in feasible])
    stat = float(((observed - draws / 15) ** 2 / (draws / 15)).sum())
    assert _chi2_ok(stat, 14), f"chi-square {stat:.1f} for 14 dof"


def test_masks_shapes_follow_the_drawn_counts_and_not_the_batch_size() -> None:
    s, grid = FeatureSubsetMasking(), TokenGrid(1, 1, 54)
    for seed in range(20):
        c, t = s.sample_counts(54, _gen(seed))
        for b in (1, 7, 64):
            masks = s(b, grid, generator=_gen(seed), device=CPU)
            assert masks.visible.shape == (b, c) and masks.targets.shape == (b, 4, t) and masks.num_tokens == 54


def test_no_host_sync_per_batch() -> None:
    """The count pair is drawn on the host; the per-sample subsets need no sync and no per-sample loop."""
    syncs = pytest.importorskip("tests.syncs")
    s = FeatureSubsetMasking()
    with syncs.count_host_syncs() as counter:
        s(256, TokenGrid(1, 1, 54), generator=_gen(0), device=CPU)
    assert counter.calls == []


# ---------------------------------------------------------------------- per-sample subsets
@pytest.fixture(scope="module")
def draws() -> list[Masks]:
    """120 batches of 100 samples on F = 54 with the defaults."""
    s, grid = FeatureSubsetMasking(), TokenGrid(1, 1, 54)
    return [s(100, grid, generator=_gen(5000 + i), device=CPU) for i in range(120)]


def _membership(index: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K) indices -> (B, N) bool."""
    return torch.zeros(index.shape[0], n, dtype=torch.bool).scatter_(1, index, True)  # (B, N)


def test_context_and_targets_disjoint_sorted_unique(draws: list[Masks]) -> None:
    for masks in draws:
        v, t = masks.visible, masks.targets
        assert bool((v[:, 1:] > v[:, :-1]).all()) and bool((t[..., 1:] > t[..., :-1]).all())  # sorted, no repeats
        in_context = _membership(v, 54)  # (B, N)
        assert not bool(torch.gather(in_context, 1, t.flatten(1)).any()), "a target feature is in the context"


def _uniformity(hits: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """Max |z| and corrected chi-square of per-feature counts of fixed-size uniform subsets.

    hits: (S, N) bool membership; p: (S,) the subset fraction of each row. With a fixed subset size per row,
    sum(z^2) * (N - 1) / N ~ chi2(N - 1) (the tube test's correction).
    """
    n = hits.shape[1]
    counts = hits.sum(dim=0).double()  # (N,)
    mean, var = float(p.sum()), float((p * (1 - p)).sum())
    z = (counts - mean) / math.sqrt(var)
    return float(z.abs().max()), float((z**2).sum()) * (n - 1) / n


def test_per_feature_frequency_uniform_for_context_and_each_target(draws: list[Masks]) -> None:
    n = 54
    ctx = torch.cat([_membership(m.visible, n) for m in draws])  # (S, N)
    p_ctx = torch.cat([torch.full((m.batch_size,), m.visible.shape[1] / n, dtype=torch.float64) for m in draws])
    zmax, stat = _uniformity(ctx, p_ctx)
    assert zmax < 5 and _chi2_ok(stat, n - 1), f"context: max |z| {zmax:.1f}, chi-square {stat:.1f}"
    p_tgt = torch.cat([torch.full((m.batch_size,), m.targets.shape[2] / n, dtype=torch.float64) for m in draws])
    for g in range(4):  # each target group is, marginally, a uniform n_tgt-subset of all N features
        tgt = torch.cat([_membership(m.targets[:, g], n) for m in draws])  # (S, N)
        zmax, stat = _uniformity(tgt, p_tgt)
        assert zmax < 5 and _chi2_ok(stat, n - 1), f"target {g}: max |z| {zmax:.1f}, chi-square {stat:.1f}"


def test_every_feature_including_the_last_is_context_and_target(draws: list[Masks]) -> None:
    """The released T-JEPA indices address [REG, f_0 .. f_{F-1}] with 0..F-1: f_{F-1} is never sampled. Here it is."""
    ctx = torch.bincount(torch.cat([m.visible.flatten() for m in draws]), minlength=54)
    tgt = torch.bincount(torch.cat([m.targets.flatten() for m in draws]), minlength=54)
    assert ctx.numel() == tgt.numel() == 54  # nothing outside [0, F)
    assert bool((ctx > 0).all()) and bool((tgt > 0).all())
    assert int(ctx[53]) > 0.5 * float(ctx.double().mean()) and int(tgt[53]) > 0.5 * float(tgt.double().mean())


def test_targets_are_distinct_draws(draws: list[Masks]) -> None:
    """Pairwise overlap of two targets: n_tgt^2 / (N - n_ctx) features on average (hypergeometric), not 100 %;
    identical targets occur with probability 1 / C(N - n_ctx, n_tgt) only."""
    n = 54
    observed = expected = variance = 0.0
    identical = expected_identical = variance_identical = 0.0
    for masks in draws:
        c, t = masks.visible.shape[1], masks.targets.shape[2]
        pool = n - c
        member = torch.stack([_membership(masks.targets[:, g], n) for g in range(4)], 1)  # (B, M, N)
        for i in range(4):
            for j in range(i + 1, 4):
                overlap = (member[:, i] & member[:, j]).sum(dim=1).double()  # (B,)
                observed += float(overlap.sum())
                identical += float((overlap == t).sum())
                expected += masks.batch_size * t * t / pool
                variance += masks.batch_size * t * (t / pool) * ((pool - t) / pool) * ((pool - t) / max(pool - 1, 1))
                p_same = 1 / math.comb(pool, t)  # 1 when n_tgt = N - n_ctx: every target is the whole pool
                expected_identical += masks.batch_size * p_same
                variance_identical += masks.batch_size * p_same * (1 - p_same)
    total_pairs = sum(m.batch_size for m in draws) * 6
    # pairs within one sample are dependent through the shared pool; allow 10 sigma of the independent-pair variance
    assert abs(observed - expected) < 10 * math.sqrt(variance), (observed, expected)
    mean_fraction = observed / sum(m.batch_size * 6 * m.targets.shape[2] for m in draws)
    assert mean_fraction < 0.7, f"mean pairwise overlap {mean_fraction:.2f} of a target (the released code: 1.0)"
    assert identical / total_pairs < 0.02
    assert abs(identical - expected_identical) < 6 * math.sqrt(variance_identical) + 5  # + 5: rare, clustered events
    # and not all-identical per sample even where overlap is possible: most samples have 4 distinct targets
    distinct = sum(
        int((m.targets[:, None] != m.targets[:, :, None]).any(-1).sum(dim=(1, 2)).eq(12).sum()) for m in draws
    )
    assert distinct > 0.9 * sum(m.batch_size for m in draws)


def test_targets_independent_given_context_exact_rate() -> None:
    """Fixed counts via a tiny grid: N = 6, n_ctx = 1, n_tgt = 2 -> two targets are identical w.p. 1 / C(5, 2)."""
    s = FeatureSubsetMasking(context_share=(1 / 6, 1 / 6), target_share=(2 / 6, 2 / 6), num_targets=2)
    masks = s(20_000, TokenGrid(1, 1, 6), generator=_gen(3), device=CPU)
    assert masks.visible.shape[1] == 1 and masks.targets.shape[2] == 2
    same = (masks.targets[:, 0] == masks.targets[:, 1]).all(dim=1).double()
    p = 1 / math.comb(5, 2)
    assert abs(float(same.mean()) - p) < 5 * math.sqrt(p * (1 - p) / same.numel())


# ---------------------------------------------------------------------- the encoder's prefix token is never masked
def test_prefix_tokens_never_masked_and_last_feature_reaches_the_encoder() -> None:
    """Indices address features only: a reg + cls encoder outputs prefix + n_ctx tokens; the last feature feeds
    the context encoder when it is in the context, and a feature outside the context never does."""
    f = 8
    torch.manual_seed(0)
    enc = MaskedTableEncoder(
        arch="vit_tiny_patch16_224",
        num_numeric=f,
        category_cardinalities=[],
        model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "reg_tokens": 1, "class_token": True},
    ).eval()
    assert enc.num_prefix_tokens == 2 and enc.grid == TokenGrid(1, 1, f)
    batch = {
        "numeric": torch.randn(64, f, generator=_gen(1)),
        "numeric_missing": torch.zeros(64, f, dtype=torch.bool),
        "categorical": torch.zeros(64, 0, dtype=torch.long),
    }
    masks = FeatureSubsetMasking()(64, enc.grid, generator=_gen(2), device=CPU)
    n_ctx = masks.visible.shape[1]
    with torch.no_grad():
        latent = enc(enc.inputs(batch), masks.visible)
        assert latent.shape == (64, enc.num_prefix_tokens + n_ctx, 32)
        moved = {**batch, "numeric": batch["numeric"].clone()}
        moved["numeric"][:, f - 1] += 3.0  # perturb the last feature
        changed = (enc(enc.inputs(moved), masks.visible) - latent).abs().amax(dim=(1, 2)) > 1e-5  # (B,)
    has_last = (masks.visible == f - 1).any(dim=1)  # (B,)
    assert bool(has_last.any()) and bool((~has_last).any())
    assert torch.equal(changed, has_last)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"context_share": (0.0, 0.3)}, "context_share"),
        ({"context_share": (0.4, 0.3)}, "context_share"),
        ({"context_share": (0.1, 1.2)}, "context_share"),
        ({"context_share": (0.1,)}, "context_share"),
        ({"target_share": (float("nan"), 0.5)}, "target_share"),
        ({"target_share": (-0.1, 0.5)}, "target_share"),
        ({"context_share": (0.6, 0.7), "target_share": (0.5, 0.6)}, "target_share"),
        ({"num_targets": 0}, "num_targets"),
        ({"num_targets": 2.0}, "num_targets"),
        ({"num_targets": True}, "num_targets"),
    ],
)
def test_bad_config_raises(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FeatureSubsetMasking(**kwargs)


def test_grid_too_small_raises() -> None:
    s = FeatureSubsetMasking(context_share=(0.5, 0.5), target_share=(0.5, 0.5))
    s(2, TokenGrid(1, 1, 4), generator=_gen(0), device=CPU)  # 2 + 2 <= 4 fits
    with pytest.raises(ValueError, match="too small"):
        s(2, TokenGrid(1, 1, 1), generator=_gen(0), device=CPU)  # at least one context and one target feature


# ---------------------------------------------------------------------- the debug recipe on a real table
def test_debug_recipe_trains_on_a_real_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mim.data.tables import sklearn_table
    from mim.lightning_cli import build

    drawn: list[Masks] = []
    call = FeatureSubsetMasking.__call__

    def spy(self, *args, **kwargs) -> Masks:
        masks = call(self, *args, **kwargs)
        drawn.append(masks)
        return masks

    monkeypatch.setattr(FeatureSubsetMasking, "__call__", spy)
    cli = build(
        [
            "--config",
            str(RECIPE),
            f"--data.init_args.train_path={sklearn_table('breast_cancer', tmp_path / 'table')}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=45",
            "--trainer.max_epochs=-1",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ],
        save_config_callback=None,
    )
    record = LossRecorder()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    losses = record.losses
    assert isinstance(cli.model.masking, FeatureSubsetMasking)
    assert cli.model.encoder.grid == TokenGrid(1, 1, 30)
    assert len(losses) == 45 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-10:])
    assert len(drawn) >= 45
    (c_lo, c_hi), (t_lo, t_hi) = cli.model.masking.count_ranges(30)
    for masks in drawn:
        assert c_lo <= masks.visible.shape[1] <= c_hi and masks.targets.shape[1:] == (4, masks.targets.shape[2])
        assert t_lo <= masks.targets.shape[2] <= t_hi and int(masks.targets.max()) < 30


# ---------------------------------------------------------------------- sampler="official" (the released collator)
class TestFeatureSubsetMaskingOfficialContract(MaskingStrategyContract):
    strategy_cls = FeatureSubsetMasking
    grids = [TokenGrid(1, 1, 54), TokenGrid(1, 1, 8), TokenGrid(1, 1, 3)]
    targets_cover_hidden = False

    def make_strategy(self) -> FeatureSubsetMasking:
        return FeatureSubsetMasking(sampler="official")


def _official_count_probabilities(lo: int, hi: int) -> dict[int, float]:
    """P(lo + round((hi - lo) u) = c), u ~ U(0, 1) (jose-melo/t-jepa src/mask.py ``_sample_num_mask``): the length
    of the u-interval that rounds to c - lo, so each end of the range gets half the weight of an inner count."""
    r = hi - lo
    if r == 0:
        return {lo: 1.0}
    return {lo + j: min(1.0, (j + 0.5) / r) - max(0.0, (j - 0.5) / r) for j in range(r + 1)}


def _official_pair_probabilities(n: int, context: tuple[int, int], target: tuple[int, int]) -> dict:
    """The redraw loop's distribution: independent rounded counts, conditioned on n_ctx + n_tgt <= N."""
    pc, pt = _official_count_probabilities(*context), _official_count_probabilities(*target)
    joint = {(c, t): pc[c] * pt[t] for c in pc for t in pt if c + t <= n}
    total = sum(joint.values())
    return {k: v / total for k, v in joint.items()}


@pytest.mark.parametrize(
    ("n", "shares"),
    [(54, {}), (10, {"context_share": (0.3, 0.7), "target_share": (0.3, 0.7)})],  # the constraint binds at F = 10
)
def test_official_counts_follow_the_released_redraw_loop(n: int, shares: dict) -> None:
    s, draws = FeatureSubsetMasking(sampler="official", **shares), 8000
    context, target = s.count_ranges(n)
    reference = _official_pair_probabilities(n, context, target)
    pairs = [s.sample_counts(n, _gen(i)) for i in range(draws)]
    observed = {k: pairs.count(k) for k in reference}
    assert set(pairs) <= set(reference)
    stat = sum((observed[k] - draws * p) ** 2 / (draws * p) for k, p in reference.items())
    assert _chi2_ok(stat, len(reference) - 1), f"chi-square {stat:.1f} for {len(reference) - 1} dof"
    # the ends of each range are half as likely as an inner count (mim's default mode: equally likely)
    c = np.array([p[0] for p in pairs])
    lo_share, inner_share = float((c == context[0]).mean()), float((c == context[0] + 1).mean())
    print(f"official n_ctx on F={n}: P(lo) {lo_share:.3f}, P(lo + 1) {inner_share:.3f}")
    if n == 54:
        assert lo_share < 0.7 * inner_share


def test_official_targets_are_identical_uniform_subsets_of_the_rest() -> None:
    """The release stores views of one shuffled array, so its M targets are one subset; the subset is uniform over the
    features outside the context, and the context and the counts are as in the default mode."""
    s, grid = FeatureSubsetMasking(sampler="official"), TokenGrid(1, 1, 54)
    batches = [s(100, grid, generator=_gen(7000 + i), device=CPU) for i in range(60)]
    for masks in batches:
        assert torch.equal(masks.targets, masks.targets[:, :1].expand_as(masks.targets)), "targets differ"
        in_context = _membership(masks.visible, 54)
        assert not bool(torch.gather(in_context, 1, masks.targets.flatten(1)).any())
        t = masks.targets[:, 0]
        assert bool((t[:, 1:] > t[:, :-1]).all())
    tgt = torch.cat([_membership(m.targets[:, 0], 54) for m in batches])  # (S, N)
    p = torch.cat([torch.full((m.batch_size,), m.targets.shape[2] / 54, dtype=torch.float64) for m in batches])
    zmax, stat = _uniformity(tgt, p)
    assert zmax < 5 and _chi2_ok(stat, 53), f"official target: max |z| {zmax:.1f}, chi-square {stat:.1f}"


def test_official_mode_draws_without_host_syncs() -> None:
    syncs = pytest.importorskip("tests.syncs")
    s = FeatureSubsetMasking(sampler="official")
    with syncs.count_host_syncs() as counter:
        s(256, TokenGrid(1, 1, 54), generator=_gen(0), device=CPU)
    assert counter.calls == []


def test_bad_sampler_raises() -> None:
    with pytest.raises(ValueError, match="sampler"):
        FeatureSubsetMasking(sampler="release")
