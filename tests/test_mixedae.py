"""MixedAE (Chen et al., CVPR 2023; /work/shared/methods/MORE.md section 2): ``GroupPartitionMasking`` +
``MixedPixelTarget`` (mixing and masking in the same module).

Checked here: the group visible sets partition the grid; mixing is a permutation (each position holds exactly one
source's token, the sources are recorded, unmixing restores the tokens); homologous attention lets a token see only
its own image (a perturbation test, and the mixed encoder then equals per-sample MAE encoding: the spec's bookkeeping
check); the explicit-logit block equals timm's ``Block`` with the same mask; top-k keeps L/g keys; the homologous
contrastive loss equals SupCon written out as loops; the debug recipe trains.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from mim.masking.base import MaskingStrategy
from mim.models import MaskedEncoder
from mim.targets.mixed import (
    GroupPartitionMasking,
    MixedPixelTarget,
    homologous_contrastive_loss,
    homologous_mask,
    masked_attention_block,
    mix_tokens,
    mixing_sources,
    topk_mask,
    unmix_tokens,
)
from mim.types import Masks, TokenGrid
from tests.contracts import MaskingStrategyContract, TargetContract
from tests.factories import TrainMetricsRecorder, fashion_mnist_probe, fashion_mnist_vit, fit_debug_recipe, tiny_encoder

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _masks(batch: int, grid: TokenGrid, g: int = 4, seed: int = 2) -> Masks:
    return GroupPartitionMasking(group_size=g)(batch, grid, generator=_gen(seed), device=CPU)


def _parts(*, attention: str = "homologous", depth: int = 2, batch: int = 8, **kw):
    encoder = tiny_encoder(model_kwargs={"depth": depth, "embed_dim": 32, "num_heads": 4}).eval()
    target = MixedPixelTarget(attention=attention, decoder_dim=16, decoder_depth=1, decoder_num_heads=2, **kw)  # type: ignore[arg-type]
    target.bind(encoder)
    target.eval()
    images = torch.randn(batch, 3, 16, 16, generator=_gen(1))
    return encoder, target, images, _masks(batch, encoder.grid)


# ---------------------------------------------------------------------------------------------------- contracts
class TestGroupPartitionMaskingContract(MaskingStrategyContract):
    strategy_cls = GroupPartitionMasking
    grids = [TokenGrid(1, 8, 8), TokenGrid(1, 4, 4), TokenGrid(1, 2, 6)]
    batch_size = 8
    targets_cover_hidden = True

    def make_strategy(self) -> MaskingStrategy:
        return GroupPartitionMasking(group_size=4)

    def expected_num_visible(self, strategy, grid):
        return grid.num_tokens // 4


class TestMixedPixelTargetContract(TargetContract):
    target_cls = MixedPixelTarget
    batch_size = 4

    def make_target(self, **overrides):
        return MixedPixelTarget(**{"decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, **overrides})

    def make_masks(self, encoder: MaskedEncoder) -> Masks:
        return _masks(self.batch_size, encoder.grid)


class TestMixedPixelTargetHomologousContract(TestMixedPixelTargetContract):
    def make_target(self, **overrides):
        return super().make_target(**{"attention": "homologous", "segment_embed": True, **overrides})


# ---------------------------------------------------------------------------------------------------- masking
def test_group_visible_sets_partition_the_grid():
    grid = TokenGrid(1, 4, 6)
    masks = _masks(12, grid, g=3, seed=5)
    assert masks.visible.shape == (12, 8) and masks.targets.shape == (12, 1, 16)
    for start in range(0, 12, 3):
        owned = masks.visible[start : start + 3].flatten().tolist()
        assert sorted(owned) == list(range(24)), "a group's visible sets do not partition the grid"
    # each position is equally likely in each slot (uniform partition): 2000 groups, 1/3 each
    counts = torch.zeros(3, 24)
    for seed in range(200):
        m = _masks(30, grid, g=3, seed=seed)
        for s in range(3):
            counts[s].scatter_add_(0, m.visible[s::3].flatten(), torch.ones(m.visible[s::3].numel()))
    share = counts / counts.sum(dim=0, keepdim=True)
    torch.testing.assert_close(share, torch.full_like(share, 1 / 3), atol=0.05, rtol=0)


def test_incomplete_trailing_group_and_bad_group_size():
    masks = _masks(6, TokenGrid(1, 4, 4))  # 1 group of 4 + 2 samples
    assert len(set(masks.visible[4:].flatten().tolist())) == 8  # disjoint
    with pytest.raises(ValueError, match="group_size"):
        GroupPartitionMasking(group_size=4)(4, TokenGrid(1, 7, 7), generator=_gen(0), device=CPU)
    with pytest.raises(ValueError, match="group_size"):
        GroupPartitionMasking(group_size=1)


# ---------------------------------------------------------------------------------------------------- mixing
def test_mixing_is_a_permutation_with_recorded_sources():
    grid = TokenGrid(1, 4, 4)
    masks = _masks(8, grid)
    b, k = masks.visible.shape
    # token value encodes (sample, position): 100 * b + position
    tokens = (100 * torch.arange(b)[:, None] + masks.visible).float().unsqueeze(-1)  # (B, K, 1)
    mixed = mix_tokens(tokens, masks.visible, 4)  # (G, N, 1)
    sources = mixing_sources(masks.visible, 4)  # (G, N)
    assert mixed.shape == (2, 16, 1) and sources.shape == (2, 16)
    for group in range(2):
        for n in range(16):
            value = int(mixed[group, n, 0])
            sample, position = divmod(value, 100)
            assert position == n, "a token left its own position"
            assert sample // 4 == group and sample % 4 == int(sources[group, n]), "wrong source recorded"
            assert n in masks.visible[sample].tolist()
    restored = unmix_tokens(mixed, masks.visible, 4)
    assert torch.equal(restored, tokens)
    with pytest.raises(ValueError, match="multiple of group_size"):
        mix_tokens(tokens[:6], masks.visible[:6], 4)


def test_homologous_mask_and_topk():
    sources = torch.tensor([[0, 1, 0, 2, 1, 2]])
    mask = homologous_mask(sources)[0]
    for i in range(6):
        for j in range(6):
            assert bool(mask[i, j]) == (int(sources[0, i]) == int(sources[0, j]))
    logits = torch.randn(2, 3, 7, 9, generator=_gen(0))
    kept = topk_mask(logits, 3)
    assert kept.sum(dim=-1).eq(3).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, logits.topk(3, dim=-1).indices, True))


# ---------------------------------------------------------------------------------------------------- attention
def test_masked_block_equals_timm_block_with_the_mask():
    encoder = tiny_encoder(model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 4}).eval()
    block = encoder.vit.blocks[0]
    x = torch.randn(2, 10, 32, generator=_gen(0))
    allowed = homologous_mask(torch.randint(0, 3, (2, 10), generator=_gen(1)))
    ours, _ = masked_attention_block(block, x, allowed=allowed)
    torch.testing.assert_close(ours, block(x, attn_mask=allowed.unsqueeze(1)), atol=1e-5, rtol=1e-5)
    plain, _ = masked_attention_block(block, x)
    torch.testing.assert_close(plain, block(x), atol=1e-5, rtol=1e-5)


def test_homologous_attention_ignores_other_images():
    """Perturbing one image changes no output token of the other images of its group (and does under "full")."""
    for attention, isolated in (("homologous", True), ("full", False)):
        encoder, target, images, masks = _parts(attention=attention)
        own, mixed, _ = target.mixed_encode(encoder, images, masks)
        changed = images.clone()
        changed[1] += torch.randn(3, 16, 16, generator=_gen(9))  # sample 1: slot 1 of group 0
        own2, _, _ = target.mixed_encode(encoder, changed, masks)
        others = [0, 2, 3]
        same = torch.allclose(own[others], own2[others], atol=1e-6)
        assert same is isolated, attention
        assert not torch.allclose(own[1], own2[1])
        assert torch.equal(own[4:], own2[4:])  # another group is never touched


def test_homologous_mixed_encoder_equals_per_sample_encoding():
    """The spec's bookkeeping check (a): source-block-diagonal attention, no segment embedding == MAE per sample."""
    encoder, target, images, masks = _parts(attention="homologous", depth=3)
    own, _, precision = target.mixed_encode(encoder, images, masks)
    torch.testing.assert_close(own, encoder(images, masks.visible), atol=1e-5, rtol=1e-5)
    assert float(precision) == 1.0


def test_topk_keeps_one_image_worth_of_keys():
    encoder, target, images, masks = _parts(attention="topk", depth=1)
    length = 4 * encoder.num_prefix_tokens + 16
    x = torch.randn(2, length, 32, generator=_gen(3))
    _, kept = masked_attention_block(encoder.vit.blocks[0], x, topk=length // 4)
    assert kept.shape == (2, 4, length, length) and kept.sum(dim=-1).eq(length // 4).all()  # per head, no ties
    out = target(
        {"image": images}, masks, encoder(images, masks.visible), encoder
    )  # chance precision ~ (L/g - 1)/(L - 1)
    assert 0.0 < float(out["homologous_precision"]) < 1.0


# ---------------------------------------------------------------------------------------------------- contrastive
def reference_supcon(features: Tensor, sources: Tensor, temperature: float) -> Tensor:
    """SupCon L_out, written out token by token."""
    total, anchors = 0.0, 0
    for g in range(features.shape[0]):
        z = torch.nn.functional.normalize(features[g].double(), dim=-1)
        n = z.shape[0]
        for i in range(n):
            positives = [j for j in range(n) if j != i and sources[g, j] == sources[g, i]]
            if not positives:
                continue
            denom = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in range(n) if a != i)
            total += -sum(math.log(math.exp(float(z[i] @ z[p]) / temperature) / denom) for p in positives) / len(
                positives
            )
            anchors += 1
    return torch.tensor(total / anchors)


def test_contrastive_loss_equals_supcon_written_out():
    features = torch.randn(2, 12, 8, generator=_gen(0))
    sources = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 3]] * 2)  # source 3 has no positive
    for t in (0.2, 1.0):
        ours = homologous_contrastive_loss(features, sources, t)
        torch.testing.assert_close(ours.double(), reference_supcon(features, sources, t).double(), rtol=1e-5, atol=1e-5)


def test_target_loss_is_reconstruction_plus_weighted_contrastive():
    encoder, target, images, masks = _parts(attention="topk", contrastive_weight=0.5)
    out = target({"image": images}, masks, encoder(images, masks.visible), encoder)
    torch.testing.assert_close(out["loss"], out["reconstruction"] + 0.5 * out["homologous_contrastive"])
    own, mixed, _ = target.mixed_encode(encoder, images, masks)
    p = 4 * encoder.num_prefix_tokens
    expected = homologous_contrastive_loss(mixed[:, p:], mixing_sources(masks.visible, 4), 0.2)
    torch.testing.assert_close(out["homologous_contrastive"], expected)


def test_bad_arguments_and_batches():
    with pytest.raises(ValueError, match="attention"):
        MixedPixelTarget(attention="soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        MixedPixelTarget(temperature=0.0)
    with pytest.raises(ValueError, match="group_size"):
        MixedPixelTarget(group_size=3).bind(tiny_encoder())  # 16 tokens
    encoder, target, images, _ = _parts()
    masks = _masks(6, encoder.grid)
    with pytest.raises(ValueError, match="multiple of 4"):
        target.mixed_encode(encoder, images[:6], masks)
    wrong = tiny_encoder()
    from mim.masking import RandomMasking

    random_masks = RandomMasking(mask_ratio=0.5)(4, wrong.grid, generator=_gen(0), device=CPU)
    with pytest.raises(ValueError, match="GroupPartitionMasking"):
        target.mixed_encode(encoder, images[:4], random_masks)


def test_trailing_incomplete_group_uses_the_unmixed_latent():
    """A batch of 6 with g = 4 (the last validation batch): group 0 mixed, samples 4-5 from the module's latent."""
    encoder, target, images, _ = _parts(attention="topk")
    masks = _masks(6, encoder.grid)
    latent = encoder(images[:6], masks.visible)
    own, mixed, _ = target.mixed_latent({"image": images[:6]}, masks, latent, encoder)
    assert mixed is not None and mixed.shape[0] == 1
    assert torch.equal(own[4:], latent[4:])
    head = Masks(visible=masks.visible[:4], targets=masks.targets[:4], num_tokens=16)
    torch.testing.assert_close(own[:4], target.mixed_encode(encoder, images[:4], head)[0])
    out = target({"image": images[:6]}, masks, latent, encoder)
    assert torch.isfinite(out["loss"])
    two = _masks(2, encoder.grid)
    out = target({"image": images[:2]}, two, encoder(images[:2], two.visible), encoder)
    assert float(out["homologous_contrastive"]) == 0.0 and torch.isfinite(out["loss"])


# ---------------------------------------------------------------------------------------------------- module
def test_module_composes_mixedae():
    from mim.module import PretrainModule

    encoder = tiny_encoder(model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 4})
    target = MixedPixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    module = PretrainModule(encoder=encoder, masking=GroupPartitionMasking(group_size=4), targets=[target])
    batch = {"image": torch.randn(8, 3, 16, 16, generator=_gen(0))}
    masks = module.draw_masks(batch, _gen(1), batch["image"])
    out = module.compute_losses(batch, masks)
    assert {"loss", "mixed_pixel/reconstruction", "mixed_pixel/homologous_contrastive"} <= set(out)
    out["loss"].backward()
    dead = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead


@pytest.mark.parametrize("batch_size", [8, 6, 3], ids=["full", "tail", "no-group"])
def test_a_module_step_has_one_encoder_pass(batch_size: int):
    """MixedPixelTarget.encode runs the step's encoder pass (the mixed one): the unmixed per-sample pass runs only for a
    trailing incomplete group, and the losses equal the target's own computation."""
    from mim.module import PretrainModule

    encoder = tiny_encoder(model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 4})
    target = MixedPixelTarget(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
    module = PretrainModule(encoder=encoder, masking=GroupPartitionMasking(group_size=4), targets=[target])
    batch = {"image": torch.randn(batch_size, 3, 16, 16, generator=_gen(0))}
    masks = module.draw_masks(batch, _gen(1), batch["image"])
    unmixed: list[int] = []
    hook = encoder.register_forward_hook(lambda _m, args, _o: unmixed.append(args[0].shape[0]))
    out = module.compute_losses(batch, masks)
    hook.remove()
    assert unmixed == ([] if batch_size % 4 == 0 else [batch_size % 4])  # only the tail, never the whole batch
    assert target._pass is None  # released by forward
    alone = target(batch, masks, encoder(batch["image"], masks.visible), encoder)  # its own mixed pass
    for key in ("reconstruction", "homologous_contrastive", "homologous_precision"):
        torch.testing.assert_close(out[f"mixed_pixel/{key}"], alone[key])


@pytest.mark.usefixtures("fashion_mnist")
def test_mixedae_debug_recipe_trains(tmp_path: Path):
    """recipes/debug/mixedae_fashion_mnist.yaml through the CLI's builder: the loss goes down over 30 steps."""
    cli, seen = fit_debug_recipe("mixedae_fashion_mnist.yaml", tmp_path, 30, "--trainer.max_epochs=-1")
    losses = [s["train/loss"] for s in seen]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_paper_recipe_states_result_and_cost(tmp_path: Path):
    from PIL import Image

    from mim.lightning_cli import build

    recipe = RECIPES / "mixedae" / "vit_b16_in1k.yaml"
    header = "".join(line for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "Expected" in header and "Cost" in header and "+0.3" in header
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), (90, 90, 200)).save(tmp_path / "images" / cls / "0.png")
    args = [
        "--config",
        str(recipe),
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.init_args.root={tmp_path}/images",
    ]
    cli = build(args, save_config_callback=None)
    m = cli.model
    assert m.encoder.embed_dim == 768 and m.encoder.grid.num_tokens == 196
    assert isinstance(m.masking, GroupPartitionMasking) and m.masking.group_size == 4
    target = m.target_list[0]
    assert isinstance(target, MixedPixelTarget) and target.attention == "topk" and target.group_size == 4


# ---------------------------------------------------------------------------------------------------- e2e
PROBE_IMAGES = 4000
MARGIN = 0.015


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("fashion_mnist")
def test_mixedae_beats_random_init_on_the_linear_probe():
    """Pretrain MixedAE on Fashion-MNIST, then a linear probe (avg-pooled frozen features of the plain encoder: the
    "replaceable" homologous attention is dropped, one image per sequence) against the same ViT at its initial weights.

    Settings: a 4-block, 64-wide ViT with 7 x 7 patches (4 x 4 = 16 tokens, a multiple of g = 4; class token), groups
    of 4 (4 visible tokens each), top-k homologous attention, contrastive weight 1, temperature 0.2, decoder 64 x 2,
    768 steps of 128 images (3 passes over 32 768 images), AdamW lr 2.5e-3, weight decay 0.05.
    Measured on a 2-core CPU (seed 0, this test, run once): probe 0.7755 against 0.7065 for the random init
    (4 000 / 4 000 probe images); reconstruction 1.913 -> 0.713, contrastive 2.961 -> 2.237, homologous precision of
    the top-k attention 0.242 -> 0.237 (chance 0.25: it did not learn to recognise its image at this size); train
    54 s, total 57 s.
    """
    import copy
    import time

    import lightning as L

    from mim.data import FashionMNISTDataModule
    from mim.module import PretrainModule
    from tests.factories import cpu_trainer

    start = time.time()
    L.seed_everything(0, verbose=False)
    encoder = fashion_mnist_vit()
    random_init = copy.deepcopy(encoder)
    target = MixedPixelTarget(attention="topk", decoder_dim=64, decoder_depth=2, decoder_num_heads=4)
    module = PretrainModule(
        encoder=encoder,
        masking=GroupPartitionMasking(group_size=4),
        targets=[target],
        blr=5e-3,  # lr 2.5e-3 at batch 128
        weight_decay=0.05,
        warmup_epochs=0.25,
        seed=0,
    )
    data = FashionMNISTDataModule(batch_size=128, num_train=32768, num_val=128)
    record = TrainMetricsRecorder()
    trainer = cpu_trainer(max_epochs=3, limit_val_batches=0, log_every_n_steps=16, callbacks=[record])
    trainer.fit(module, datamodule=data)
    train_s = time.time() - start
    first, last = record.seen[0], record.seen[-1]

    probe = fashion_mnist_probe(data, PROBE_IMAGES)

    pretrained, random = probe(module.encoder), probe(random_init)
    key = "train/mixed_pixel/"
    print(
        f"MixedAE linear probe: pretrained {pretrained:.4f}, random init {random:.4f}; reconstruction "
        f"{first[key + 'reconstruction']:.3f} -> {last[key + 'reconstruction']:.3f}, contrastive "
        f"{first[key + 'homologous_contrastive']:.3f} -> {last[key + 'homologous_contrastive']:.3f}, homologous "
        f"precision {first[key + 'homologous_precision']:.3f} -> {last[key + 'homologous_precision']:.3f}; "
        f"train {train_s:.0f} s, total {time.time() - start:.0f} s"
    )
    assert pretrained > random + MARGIN, f"pretrained {pretrained:.4f} vs random init {random:.4f}"
