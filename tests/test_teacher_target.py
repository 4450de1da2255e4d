"""TeacherTarget (MaskAlign / MR-MAE mimicking): contracts, the loss against an independent computation, the frozen
teacher's bookkeeping (not trained, not saved, hash-checked, eval mode, one pass per step) and MR-MAE composition."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from mim.masking import RandomMasking
from mim.masking.attention import AttentionMasking
from mim.models import MaskedEncoder
from mim.models.align import DynamicAlignment
from mim.models.teacher import FrozenTeacher, read_weights, weights_sha256
from mim.module import PretrainModule
from mim.targets import PixelTarget
from mim.targets.teacher import TeacherTarget, feature_distance, layer_loss_weights, normalize_features
from tests.contracts import TargetContract
from tests.syncs import count_host_syncs

CPU = torch.device("cpu")
ARCH = "vit_tiny_patch16_224"
TEACHER_KW = {"img_size": 16, "patch_size": 4, "in_chans": 3, "depth": 2, "embed_dim": 32, "num_heads": 2}
FILES: dict[str, Path] = {}


def write_teacher(path: Path, seed: int = 0, **overrides) -> Path:
    """A random-init timm ViT state dict saved to ``path`` (.safetensors or a torch file)."""
    kw = {**TEACHER_KW, **overrides}
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **kw)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _teacher_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    FILES["safetensors"] = write_teacher(root / "teacher.safetensors")
    FILES["pt"] = write_teacher(root / "teacher.pt")  # same weights (same seed), another container
    yield
    FILES.clear()


def teacher_target(fmt: str = "safetensors", **overrides) -> TeacherTarget:
    kwargs = dict(teacher_arch=ARCH, teacher_checkpoint=str(FILES[fmt]), teacher_kwargs=dict(TEACHER_KW), layers=2)
    kwargs.update(overrides)
    return TeacherTarget(**kwargs)


def encoder(depth: int = 2) -> MaskedEncoder:
    torch.manual_seed(0)
    return MaskedEncoder(
        arch=ARCH, img_size=16, patch_size=4, in_chans=3, model_kwargs={"depth": depth, "embed_dim": 64, "num_heads": 4}
    )


def images(b: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def random_masks(enc: MaskedEncoder, b: int = 4, ratio: float = 0.75, seed: int = 2):
    return RandomMasking(mask_ratio=ratio)(b, enc.grid, generator=torch.Generator().manual_seed(seed), device=CPU)


def teacher_overrides(recipe: Path, tmp_path: Path, max_params: int = 5_000_000) -> list[str]:
    """CLI overrides that point a recipe's small TeacherTarget at a random-init teacher file written to ``tmp_path``.

    For tests that instantiate and run recipes (tests/test_recipes.py): returns
    ``["--model.init_args.targets.init_args.teacher_checkpoint=<file>"]`` for a TeacherTarget of at most
    ``max_params`` teacher parameters (jsonargparse applies ``targets.init_args.*`` to the **last** target, so such
    recipes list the TeacherTarget last), else ``[]``: larger teachers are only instantiated, and a teacher file
    is read on first use, so a missing one does not stop instantiation.
    """
    config = yaml.safe_load(recipe.read_text())
    targets = ((config.get("model") or {}).get("init_args") or {}).get("targets") or []
    out = []
    for i, spec in enumerate(targets):
        if not str(spec.get("class_path", "")).endswith("TeacherTarget"):
            continue
        args = spec.get("init_args") or {}
        arch, kwargs = args["teacher_arch"], dict(args.get("teacher_kwargs") or {})
        with torch.device("meta"):
            size = sum(p.numel() for p in timm.create_model(arch, num_classes=0, **kwargs).parameters())
        if size > max_params:
            continue
        if i != len(targets) - 1:
            raise ValueError(f"{recipe}: a debug TeacherTarget must be the last target so that an override reaches it")
        path = tmp_path / "teacher.safetensors"
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        out.append(f"--model.init_args.targets.init_args.teacher_checkpoint={path}")
    return out


# ---------------------------------------------------------------------- contracts
class TestTeacherTargetMaskAlignContract(TargetContract):
    """MaskAlign: all student blocks through linear fusion, CLS included, smooth-L1, attention scores."""

    target_cls = TeacherTarget

    def make_encoder(self) -> MaskedEncoder:
        return encoder(depth=2)

    def make_target(self, **overrides) -> TeacherTarget:
        return teacher_target(attention_scores=True, **overrides)


class TestTeacherTargetSimpleFusionContract(TestTeacherTargetMaskAlignContract):
    def make_target(self, **overrides) -> TeacherTarget:
        return teacher_target(fusion="simple", target_norm="l2", loss="l1", **overrides)


class TestTeacherTargetLinearDecayMLPContract(TestTeacherTargetMaskAlignContract):
    """MaskAlign's ``linear_decay`` layer weighting with ``mlp`` adapters."""

    def make_target(self, **overrides) -> TeacherTarget:
        return teacher_target(loss_weights="linear_decay", layers=None, head="mlp", **overrides)


class TestTeacherTargetNormLinearContract(TestTeacherTargetMaskAlignContract):
    """``norm_linear`` adapters with sum fusion."""

    def make_target(self, **overrides) -> TeacherTarget:
        return teacher_target(head="norm_linear", fusion="sum", **overrides)


class TestTeacherTargetMimicContract(TargetContract):
    """MR-MAE mimicking: the final latent at visible patch tokens, MSE, a torch (.pt) teacher file."""

    target_cls = TeacherTarget

    def make_target(self, **overrides) -> TeacherTarget:
        return teacher_target("pt", student_layers="output", layers=None, loss="l2", **overrides)


class TestTeacherTargetMimicMLP2Contract(TestTeacherTargetMimicContract):
    """``mlp2`` adapters on the final latent, ``linear_decay`` over both teacher blocks (block 0 weighs 0)."""

    def make_target(self, **overrides) -> TeacherTarget:
        return teacher_target(
            "pt", student_layers="output", layers=2, loss="l2", head="mlp2", loss_weights="linear_decay", **overrides
        )


# ---------------------------------------------------------------------- the maths
def _teacher_hidden_states(model, x: torch.Tensor) -> list[torch.Tensor]:
    """hidden_states[1:]: every block output before the final norm, by a plain loop over timm's parts."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    out = []
    for block in model.blocks:
        x = block(x)
        out.append(x)
    return out


def _student_hidden_states(enc: MaskedEncoder, x: torch.Tensor, visible: torch.Tensor) -> list[torch.Tensor]:
    tokens = enc.tokenize(x)
    tokens = torch.stack([tokens[b, visible[b]] for b in range(x.shape[0])])  # per-sample indexing
    h = enc.vit.norm_pre(torch.cat([enc.prefix_tokens(x.shape[0]), tokens], dim=1))
    out = []
    for block in enc.vit.blocks:
        h = block(h)
        out.append(h)
    return out


def _smooth_l1_x2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs()
    return 2 * torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()


@pytest.mark.parametrize("layers", [2, [1]])
def test_maskalign_loss_equals_independent_computation(layers):
    """MaskAlign's loss (OpenDriveLab/maskalign models_pretrain.py) written out with loops: fusion sum_j W_ij h_j,
    adapters, whitened teacher block outputs at [CLS; visible patches], 2 * SmoothL1, mean over the aligned blocks."""
    enc = encoder(depth=2)
    target = teacher_target(layers=layers)
    target.bind(enc)
    with torch.no_grad():  # move W away from its init so the fusion is really exercised
        target.alignment.layer_weights.copy_(torch.randn(2, 2, generator=torch.Generator().manual_seed(5)))
    x, masks = images(), random_masks(enc)
    out = target({"image": x}, masks, enc(x, masks.visible), enc)

    teacher = timm.create_model(ARCH, pretrained=False, num_classes=0, **TEACHER_KW).eval()
    teacher.load_state_dict(read_weights(FILES["safetensors"])[0])
    with torch.no_grad():
        hs_t = _teacher_hidden_states(teacher, x)
    hs_s = _student_hidden_states(enc, x, masks.visible)
    aligned = [0, 1] if layers == 2 else [1]
    assert target.layers == aligned
    w = target.alignment.layer_weights
    losses = []
    for a, i in enumerate(aligned):
        fused = sum(w[i, j] * hs_s[j] for j in range(2))
        s = target.alignment.heads[a](fused)
        y = F.layer_norm(hs_t[i], (32,), eps=1e-5)
        y = torch.cat([y[:, :1], torch.stack([y[b, 1:][masks.visible[b]] for b in range(4)])], dim=1)
        losses.append(_smooth_l1_x2(s, y))
    expected = sum(losses) / len(losses)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)


def test_mimic_loss_equals_independent_computation():
    """MR-MAE: MSE(head(final latent at visible patches), LN(teacher last block at those patches))."""
    enc = encoder(depth=1)
    target = teacher_target("pt", student_layers="output", layers=None, loss="l2")
    target.bind(enc)
    x, masks = images(), random_masks(enc)
    latent = enc(x, masks.visible)
    out = target({"image": x}, masks, latent, enc)
    teacher = timm.create_model(ARCH, pretrained=False, num_classes=0, **TEACHER_KW).eval()
    teacher.load_state_dict(read_weights(FILES["pt"])[0])
    with torch.no_grad():
        y = F.layer_norm(_teacher_hidden_states(teacher, x)[-1], (32,), eps=1e-5)[:, 1:]
    y = torch.stack([y[b][masks.visible[b]] for b in range(4)])
    pred = target.heads[0](latent[:, 1:])
    torch.testing.assert_close(out["loss"], (pred - y).pow(2).mean(), rtol=1e-5, atol=1e-6)
    assert target.layers == [1] and not target.align_cls


def test_maskalign_unit_pieces():
    """MaskAlign's recommended settings (OpenDriveLab/maskalign models_pretrain.py): top5 = [0]*7 + [1/5]*5,
    W = I + 0.01, whiten = LayerNorm without affine, smooth-L1 scaled by 2, the mixing matrix listed for no weight
    decay."""
    enc = encoder(depth=12)
    target = teacher_target(teacher_kwargs={**TEACHER_KW, "depth": 12}, layers=None)  # the default: top5
    target.bind(enc)
    assert target.layers == [7, 8, 9, 10, 11]
    weights = torch.zeros(12).index_fill_(0, torch.tensor(target.layers), 1 / len(target.layers))
    torch.testing.assert_close(weights, torch.tensor([0.0] * 7 + [0.2] * 5))
    torch.testing.assert_close(target.alignment.layer_weights.detach(), torch.eye(12) + 0.01)
    assert len(target.alignment.heads) == 5  # one adapter per aligned layer only
    sum_fusion = DynamicAlignment(student_depth=3, teacher_depth=12, layers=[11], in_dim=8, out_dim=4, fusion="sum")
    torch.testing.assert_close(sum_fusion.layer_weights.detach(), torch.full((12, 3), 1 / 3))
    y = torch.randn(2, 5, 7)
    ln = torch.nn.LayerNorm(7, elementwise_affine=False, eps=1e-5)
    torch.testing.assert_close(normalize_features(y, "whiten"), ln(y))
    torch.testing.assert_close(normalize_features(y, "l2").norm(dim=-1), torch.ones(2, 5))
    p, t = torch.randn(3, 4) * 3, torch.randn(3, 4)
    torch.testing.assert_close(feature_distance(p, t, "smooth_l1"), _smooth_l1_x2(p, t))
    torch.testing.assert_close(feature_distance(p, t, "l2"), (p - t).pow(2).mean())
    torch.testing.assert_close(feature_distance(p, t, "l1"), (p - t).abs().mean())
    assert target.never_decay() == {"alignment.layer_weights"} and target.no_weight_decay() == set()
    assert not enc.vit.norm.weight.requires_grad  # the final norm MaskAlign never reaches is frozen


# MaskAlign's adapter heads and linear_decay, written out from OpenDriveLab/maskalign models_pretrain.py
# (``distill_heads`` for each ``head_type``; ``forward_loss``'s weight_list) independently of mim/models/align.py.
def _layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mu) / torch.sqrt(var + eps) * g + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / 2**0.5))  # nn.GELU() default: the exact erf form


def _reference_adapter(kind: str, head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The official adapter of ``kind`` applied with ``head``'s parameters (in their Sequential order)."""
    p = [t for _, t in head.named_parameters()]
    if kind == "linear":
        return x @ p[0].T + p[1]
    if kind == "norm_linear":  # norm_layer(D) -> Linear(D, D_t)
        return _layer_norm(x, p[0], p[1], 1e-6) @ p[2].T + p[3]
    if kind == "mlp":  # Linear(D, D) -> GELU -> Linear(D, D_t)
        return _gelu(x @ p[0].T + p[1]) @ p[2].T + p[3]
    # mlp2: Linear(D, D) -> norm_layer(D) -> Linear(D, D_t)
    return _layer_norm(x @ p[0].T + p[1], p[2], p[3], 1e-6) @ p[4].T + p[5]


def _official_weight_list(mode: str, n: int) -> list[float]:
    """``forward_loss``'s weight_list for ``n`` aligned student features (official code, verbatim maths)."""
    if mode == "mean":
        return [1 / n] * n
    weight_list_ = list(range(n))
    return [i / sum(weight_list_) for i in weight_list_]


def test_official_layer_weights():
    """linear_decay over 12 blocks: [0, 1, ..., 11] / 66 (block 1 weighs 0, block 12 11/66); mean: 1/12."""
    torch.testing.assert_close(
        torch.tensor(layer_loss_weights(list(range(12)), "linear_decay")), torch.arange(12.0) / 66
    )
    assert layer_loss_weights(list(range(12)), "linear_decay") == _official_weight_list("linear_decay", 12)
    assert layer_loss_weights(list(range(12)), "mean") == _official_weight_list("mean", 12)
    assert layer_loss_weights([7, 8, 9, 10, 11], "mean") == [0.2] * 5  # top5
    assert layer_loss_weights([3, 9], "linear_decay") == [0.25, 0.75]  # a subset: i / (3 + 9)
    with pytest.raises(ValueError, match="loss_weights='linear_decay'"):
        layer_loss_weights([0], "linear_decay")


@pytest.mark.parametrize("head", ["linear", "norm_linear", "mlp", "mlp2"])
def test_adapter_structure_and_init(head):
    """Hidden width D, the student's LayerNorm eps (1e-6), Xavier-uniform Linear weights with zero bias, LN 1 / 0."""
    enc = encoder(depth=2)
    target = teacher_target(head=head)
    target.bind(enc)
    adapter = target.alignment.heads[0]
    shapes = [tuple(p.shape) for p in adapter.parameters()]
    expected = {
        "linear": [(32, 64), (32,)],
        "norm_linear": [(64,), (64,), (32, 64), (32,)],
        "mlp": [(64, 64), (64,), (32, 64), (32,)],
        "mlp2": [(64, 64), (64,), (64,), (64,), (32, 64), (32,)],
    }[head]
    assert shapes == expected
    for m in adapter.modules():
        if isinstance(m, torch.nn.Linear):
            bound = (6 / (m.in_features + m.out_features)) ** 0.5  # Xavier-uniform
            assert m.weight.abs().max() <= bound and m.weight.std() > bound / 3 and not m.bias.any()
        if isinstance(m, torch.nn.LayerNorm):
            assert m.eps == 1e-6 and bool((m.weight == 1).all()) and not m.bias.any()
    assert enc.vit.norm.eps == 1e-6


@pytest.mark.parametrize("head", ["linear", "norm_linear", "mlp", "mlp2"])
@pytest.mark.parametrize("loss_weights", ["mean", "linear_decay"])
def test_heads_and_layer_weights_equal_the_official_loss(head, loss_weights, tmp_path: Path):
    """The official forward_loss with every teacher block aligned (MaskAlign's ``mean`` / ``linear_decay``) and each
    ``head_type``, written out: sum_i w_i * 2 * SmoothL1(head_i(sum_j W_ij h_j), LN(teacher block i)), w_i > 0 only,
    on a 4-block student and teacher."""
    depth = 4
    path = write_teacher(tmp_path / "teacher4.safetensors", depth=depth)
    enc = encoder(depth=depth)
    target = teacher_target(
        teacher_checkpoint=str(path),
        teacher_kwargs={**TEACHER_KW, "depth": depth},
        layers=depth,
        loss_weights=loss_weights,
        head=head,
    )
    target.bind(enc)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move every parameter off its init (LayerNorm gains and biases included)
        target.alignment.layer_weights.copy_(torch.randn(depth, depth, generator=gen))
        for p in target.alignment.heads.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    x, masks = images(), random_masks(enc)
    out = target({"image": x}, masks, enc(x, masks.visible), enc)

    teacher = timm.create_model(ARCH, pretrained=False, num_classes=0, **{**TEACHER_KW, "depth": depth}).eval()
    teacher.load_state_dict(read_weights(path)[0])
    with torch.no_grad():
        hs_t = _teacher_hidden_states(teacher, x)
    hs_s = _student_hidden_states(enc, x, masks.visible)
    weight_list = _official_weight_list(loss_weights, depth)
    aligned = [i for i in range(depth) if weight_list[i] > 0]
    assert target.layers == aligned  # linear_decay: block 0 (weight 0) gets no adapter
    w = target.alignment.layer_weights
    expected = torch.tensor(0.0)
    for i in range(depth):
        if weight_list[i] <= 0:
            continue
        fused = sum(w[i, j] * hs_s[j] for j in range(depth))
        s = _reference_adapter(head, target.alignment.heads[aligned.index(i)], fused)
        y = F.layer_norm(hs_t[i], (32,), eps=1e-5)
        y = torch.cat([y[:, :1], torch.stack([y[b, 1:][masks.visible[b]] for b in range(4)])], dim=1)
        expected = expected + weight_list[i] * _smooth_l1_x2(s, y)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)


def test_linear_decay_defaults_to_every_block_and_keeps_explicit_layers():
    enc = encoder(depth=12)
    target = teacher_target(teacher_kwargs={**TEACHER_KW, "depth": 12}, layers=None, loss_weights="linear_decay")
    target.bind(enc)
    assert target.layers == list(range(1, 12)) and len(target.alignment.heads) == 11
    assert target.block_weights == [i / 66 for i in range(1, 12)]
    subset = teacher_target(teacher_kwargs={**TEACHER_KW, "depth": 12}, layers=5, loss_weights="linear_decay")
    subset.bind(encoder(depth=12))
    assert subset.layers == [7, 8, 9, 10, 11] and subset.block_weights == [i / 45 for i in range(7, 12)]
    with pytest.raises(ValueError, match="linear_decay"):
        teacher_target(layers=[0], loss_weights="linear_decay").bind(encoder(depth=2))


def test_sum_fusion_aligns_deeper_teacher():
    enc = encoder(depth=1)
    target = teacher_target(fusion="sum", layers=[-1])
    target.bind(enc)
    out = target({"image": images()}, random_masks(enc), enc(images(), random_masks(enc).visible), enc)
    assert torch.isfinite(out["loss"]) and target.alignment.layer_weights.shape == (2, 1)
    with pytest.raises(ValueError, match="fusion='sum'"):
        teacher_target(fusion="linear").bind(encoder(depth=1))


def test_attention_scores_are_the_last_blocks_cls_attention():
    """token_scores = mean over heads of softmax(q k^T / sqrt(d))[CLS, patches] of the last block, computed with an
    explicit full attention matrix (timm's fused attention returns no weights)."""
    enc = encoder()
    target = teacher_target(attention_scores=True)
    target.bind(enc)
    x = images()
    scores = target.token_scores({"image": x}, enc)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **TEACHER_KW).eval()
    model.load_state_dict(read_weights(FILES["safetensors"])[0])
    with torch.no_grad():
        h = _teacher_hidden_states(model, x)[-2]  # input of the last block
        block = model.blocks[-1]
        qkv = block.attn.qkv(block.norm1(h)).reshape(4, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)  # (3, B, H, L, hd)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) / 16**0.5).softmax(-1)  # (B, H, L, L)
    expected = attn[:, :, 0, 1:].mean(1)  # (B, N)
    assert scores.shape == (4, 16) and not scores.requires_grad
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert teacher_target(attention_scores=False).token_scores({"image": x}, enc) is None


def test_one_teacher_pass_per_step_shared_by_scores_and_loss(monkeypatch):
    module = PretrainModule(
        encoder=encoder(), masking=AttentionMasking(), targets=[teacher_target(attention_scores=True)]
    )
    target = module.target_list[0]
    calls = []
    original = target.teacher.model.forward_intermediates
    monkeypatch.setattr(
        target.teacher.model, "forward_intermediates", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    batch = {"image": images()}
    for step in range(2):
        masks = module.draw_masks(batch, torch.Generator().manual_seed(step))
        module.compute_losses(batch, masks)
        assert len(calls) == step + 1
    batch["image"].mul_(2)  # an in-place change of the input invalidates a cached pass
    target.token_scores(batch, module.encoder)
    target.token_scores(batch, module.encoder)
    assert len(calls) == 3


def test_attention_masking_keeps_salient_tokens_visible():
    module = PretrainModule(
        encoder=encoder(), masking=AttentionMasking(mask_ratio=0.5), targets=[teacher_target(attention_scores=True)]
    )
    teacher = module.target_list[0].teacher
    teacher.load()
    with torch.no_grad():  # a random teacher attends almost uniformly: sharpen its last attention
        teacher.model.blocks[-1].attn.qkv.weight.mul_(40)
    batch = {"image": images(b=16)}
    scores = module.target_list[0].token_scores(batch, module.encoder)
    assert float(scores.max(1).values.mean()) > 3 / 16  # peaked (uniform: 1 / 17)
    seen = hidden = 0.0
    for seed in range(20):
        masks = module.draw_masks(batch, torch.Generator().manual_seed(seed))
        seen += float(scores.gather(1, masks.visible).mean())
        hidden += float(scores.gather(1, masks.targets.flatten(1)).mean())
    assert seen > 1.5 * hidden  # visible tokens carry more teacher attention than hidden ones


# ---------------------------------------------------------------------- the frozen teacher
def test_teacher_is_not_trained_saved_or_registered():
    module = PretrainModule(encoder=encoder(), masking=RandomMasking(), targets=[teacher_target()])
    target = module.target_list[0]
    teacher_params = list(target.teacher.parameters())
    assert teacher_params and all(not p.requires_grad for p in teacher_params)
    ids = {id(p) for p in module.parameters()}
    assert not any(id(p) in ids for p in teacher_params), "the teacher is reachable from module.parameters()"
    assert "teacher" not in dict(module.named_modules()) and not any("teacher" in n for n, _ in module.named_modules())
    batch = {"image": images()}
    out = module.compute_losses(batch, module.draw_masks(batch, torch.Generator().manual_seed(0)))
    out["loss"].backward()
    assert all(p.grad is None for p in teacher_params)
    state = module.state_dict()
    assert not any(k.startswith("targets.0.teacher") or ".model." in k for k in state)
    extra = state["targets.0._extra_state"]
    assert extra == {
        "teacher_arch": ARCH,
        "teacher_checkpoint": str(FILES["safetensors"]),
        "sha256": weights_sha256(read_weights(FILES["safetensors"])[0]),
    }
    module.train()
    assert not any(m.training for m in target.teacher.modules())
    module.requires_grad_(True)
    assert all(not p.requires_grad for p in teacher_params)


def test_teacher_follows_module_dtype_and_device_moves():
    module = PretrainModule(encoder=encoder(), masking=RandomMasking(), targets=[teacher_target()])
    module.double()
    assert {p.dtype for p in module.target_list[0].teacher.parameters()} == {torch.float64}
    batch = {"image": images().double()}
    out = module.compute_losses(batch, module.draw_masks(batch, torch.Generator().manual_seed(0)))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    module.to("meta")
    assert {p.device.type for p in module.target_list[0].teacher.parameters()} == {"meta"}


def test_same_weights_in_another_format_hash_the_same_and_load():
    a, b = teacher_target("safetensors"), teacher_target("pt")
    enc = encoder()
    a.bind(enc)
    b.bind(encoder())
    assert a.get_extra_state()["sha256"] == b.get_extra_state()["sha256"]
    b.load_state_dict(a.state_dict())  # strict; only the file path differs


def test_changed_teacher_file_is_refused_on_load(tmp_path: Path):
    path = write_teacher(tmp_path / "t.safetensors", seed=0)
    target = teacher_target(teacher_checkpoint=str(path))
    target.bind(encoder())
    state = target.state_dict()
    write_teacher(path, seed=1)  # someone replaced the teacher file
    resumed = teacher_target(teacher_checkpoint=str(path))
    resumed.bind(encoder())
    with pytest.raises(ValueError, match="teacher file changed since this checkpoint was written"):
        resumed.load_state_dict(state)
    state["_extra_state"] = {**state["_extra_state"], "teacher_arch": "vit_small_patch16_224"}
    with pytest.raises(ValueError, match="written with teacher_arch 'vit_small_patch16_224'"):
        resumed.load_state_dict(state)


def test_module_state_dict_round_trips_strictly(tmp_path: Path):
    """A saved module state holds the target's own tensors only (no teacher) and loads back strictly."""
    module = PretrainModule(encoder=encoder(), masking=RandomMasking(), targets=[teacher_target()])
    state = module.state_dict()
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": state}, path)
    loaded = torch.load(path, weights_only=True)["state_dict"]
    fresh = PretrainModule(encoder=encoder(), masking=RandomMasking(), targets=[teacher_target()])
    fresh.load_state_dict(loaded, strict=True)
    assert sum(v.numel() for k, v in loaded.items() if isinstance(v, torch.Tensor) and k.startswith("targets")) == sum(
        p.numel() for p in fresh.target_list[0].parameters()
    )


def test_missing_file_fails_on_first_use_naming_it(tmp_path: Path):
    missing = tmp_path / "nowhere" / "clip.safetensors"
    target = teacher_target(teacher_checkpoint=str(missing))
    enc = encoder()
    target.bind(enc)  # construction and bind never read the file (recipes build without it)
    masks = random_masks(enc)
    with pytest.raises(FileNotFoundError, match="nowhere/clip.safetensors"):
        target({"image": images()}, masks, enc(images(), masks.visible), enc)


def test_weights_of_another_architecture_are_a_clear_error(tmp_path: Path):
    path = write_teacher(tmp_path / "deep.pt", depth=3)
    target = teacher_target(teacher_checkpoint=str(path))
    target.bind(encoder())
    with pytest.raises(ValueError, match=r"deep\.pt.*unexpected keys \['blocks\.2\."):
        target.teacher.load()


def test_teacher_input_remap_resize_and_grey_to_rgb(tmp_path: Path):
    """x_t = (x * s_in + m_in - m_t) / s_t; a grey student input is repeated for a 3-channel teacher; a teacher at
    another resolution with the same grid gets a bicubically resized input."""
    path = write_teacher(tmp_path / "big.safetensors", img_size=32, patch_size=8)
    enc = MaskedEncoder(
        arch=ARCH, img_size=16, patch_size=4, in_chans=1, model_kwargs={"depth": 1, "embed_dim": 64, "num_heads": 4}
    )
    target = TeacherTarget(
        teacher_arch=ARCH,
        teacher_checkpoint=str(path),
        teacher_kwargs={**TEACHER_KW, "img_size": 32, "patch_size": 8},
        student_layers="output",
        input_mean=[0.5],
        input_std=[0.25],
        teacher_mean=[0.4, 0.5, 0.6],
        teacher_std=[0.2, 0.3, 0.4],
    )
    target.bind(enc)
    x = torch.randn(2, 1, 16, 16)
    seen = []
    target.teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    target.teacher.model.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    target.teacher_output({"image": x}, enc)
    assert seen[1].shape == (2, 3, 32, 32)  # resized to the teacher's input size
    torch.testing.assert_close(seen[1], F.interpolate(seen[0], size=(32, 32), mode="bicubic", align_corners=False))
    expected = (x * 0.25 + 0.5 - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.3, 0.4]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(seen[0], expected)
    with pytest.raises(ValueError, match="set together"):
        TeacherTarget(teacher_arch=ARCH, teacher_checkpoint="x", teacher_mean=[0.5])
    with pytest.raises(ValueError, match="patch grid"):
        teacher_target(teacher_kwargs={**TEACHER_KW, "patch_size": 8}).bind(encoder())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"teacher_arch": "no_such_vit"}, "teacher_arch"),
        ({"student_layers": "all"}, "student_layers"),
        ({"fusion": "mlp"}, "fusion"),
        ({"head": "mlp3"}, "head"),
        ({"loss_weights": "top5"}, "loss_weights"),
        ({"target_norm": "bn"}, "target_norm"),
        ({"loss": "cosine"}, "loss"),
        ({"layers": 0}, "layers"),
        ({"layers": []}, "layers"),
        ({"input_std": [0.0], "input_mean": [0.0], "teacher_mean": [0.0], "teacher_std": [1.0]}, "input_std"),
    ],
)
def test_invalid_configuration_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        teacher_target(**kwargs)


# ---------------------------------------------------------------------- MR-MAE: two targets, one encoder pass
def _mr_mae_module() -> PretrainModule:
    mimic = teacher_target("pt", student_layers="output", layers=None, loss="l2")
    pixels = PixelTarget(decoder_dim=32, decoder_depth=1, decoder_num_heads=4)
    return PretrainModule(encoder=encoder(depth=1), masking=RandomMasking(mask_ratio=0.75), targets=[mimic, pixels])


def test_mr_mae_is_two_targets_sharing_one_encoder_pass():
    module = _mr_mae_module()
    passes = []
    module.encoder.register_forward_hook(lambda m, args, out: passes.append(out))
    batch = {"image": images()}
    masks = module.draw_masks(batch, torch.Generator().manual_seed(0))
    out = module.compute_losses(batch, masks)
    assert len(passes) == 1
    assert {"teacher/loss", "pixel/loss", "loss"} <= out.keys()
    torch.testing.assert_close(out["loss"].detach(), out["teacher/loss"] + out["pixel/loss"])


def test_mr_mae_token_partition():
    """MR-MAE (Gao et al., "Mimic before Reconstruct", IJCV 2023; no official code): L_mim never reaches the decoder,
    L_rec never reaches the mimic head; teacher features at hidden positions do not change L_mim, those at visible
    positions do."""
    module = _mr_mae_module()
    mimic, pixels = module.target_list
    batch = {"image": images()}
    masks = module.draw_masks(batch, torch.Generator().manual_seed(0))
    latent = module.encoder(batch["image"], masks.visible)
    mimic(batch, masks, latent, module.encoder)["loss"].backward(retain_graph=True)
    assert all(p.grad is None for p in pixels.parameters())
    module.zero_grad(set_to_none=True)
    pixels(batch, masks, latent, module.encoder)["loss"].backward()
    assert all(p.grad is None for p in mimic.parameters())

    base = mimic(batch, masks, latent, module.encoder)["loss"]
    original = mimic.teacher.forward

    def perturbed(positions):
        def forward(x, layers, attention=False):
            out = original(x, layers, attention=attention)
            for i in out.features:
                bump = torch.zeros_like(out.features[i][:, 1:, 0]).scatter_(1, positions, 1.0)  # (B, N)
                out.features[i] = (
                    out.features[i] + 5 * torch.randn_like(out.features[i]) * F.pad(bump, (1, 0))[..., None]
                )
            return out

        return forward

    mimic.teacher.forward = perturbed(masks.targets.flatten(1))
    torch.testing.assert_close(mimic(batch, masks, latent, module.encoder)["loss"], base)
    mimic.teacher.forward = perturbed(masks.visible)
    assert float((mimic(batch, masks, latent, module.encoder)["loss"] - base).detach().abs()) > 1e-3


def test_teacher_targets_gather_the_encoders_visible_order(monkeypatch):
    """A synthetic teacher whose features are the token index: the gathered targets are exactly the visible indices
    in the encoder's order, CLS first."""
    from mim.models.teacher import TeacherOutput

    enc = encoder(depth=1)
    target = teacher_target(student_layers="output", layers=None, target_norm="none", loss="l2", align_cls=True)
    target.bind(enc)
    masks = random_masks(enc, ratio=0.5)
    pos = torch.arange(17, dtype=torch.float32).view(1, 17, 1).expand(4, 17, 32)  # (B, 1+N, D_t): token index
    target.teacher.forward = lambda x, layers, attention=False: TeacherOutput(features={i: pos for i in layers})
    seen = {}
    original = feature_distance
    monkeypatch.setattr(
        "mim.targets.teacher.feature_distance", lambda p, t, loss: seen.update(pred=p, target=t) or original(p, t, loss)
    )
    target({"image": images()}, masks, enc(images(), masks.visible), enc)
    expected = torch.cat([torch.zeros(4, 1), masks.visible.float() + 1], dim=1)  # CLS at 0, patch k at 1 + k
    torch.testing.assert_close(seen["target"][..., 0], expected)
    assert seen["pred"].shape == (4, 1 + masks.visible.shape[1], 32)


def test_maskalign_step_has_no_host_syncs():
    module = PretrainModule(
        encoder=encoder(), masking=AttentionMasking(), targets=[teacher_target(attention_scores=True)]
    )
    module.target_list[0].teacher.load()  # the one-off file read and hash happen before the first step
    batch = {"image": images()}
    with count_host_syncs() as syncs:
        masks = module.draw_masks(batch, torch.Generator().manual_seed(0))
        module.compute_losses(batch, masks)["loss"].backward()
    assert syncs.count == 0, syncs.calls


def test_frozen_teacher_reads_mim_lightning_checkpoints(tmp_path: Path):
    """A mim Lightning checkpoint (encoder.vit.* keys) is a valid teacher file: its student encoder."""
    enc = MaskedEncoder(
        arch=ARCH,
        **{k: TEACHER_KW[k] for k in ("img_size", "patch_size", "in_chans")},
        model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2},
    )
    path = tmp_path / "run.ckpt"
    torch.save(
        {"state_dict": {f"encoder.{k}": v for k, v in enc.state_dict().items()}, "mim": {"encoder": enc.config}}, path
    )
    teacher = FrozenTeacher(arch=ARCH, checkpoint=path, model_kwargs=TEACHER_KW)
    teacher.load()
    x = images()
    torch.testing.assert_close(
        teacher(x, [-1]).features[1], enc.vit.blocks(enc.vit.norm_pre(enc.vit._pos_embed(enc.vit.patch_embed(x))))
    )


# ---------------------------------------------------------------------- the encoder's block capture
def test_encoder_block_capture_keeps_the_forward_unchanged():
    """capture_blocks: same latent as the plain pass, block outputs equal a manual loop (with autograd), also with
    gradient checkpointing; outputs of another pass are refused; deep copies drop the kept activations."""
    import copy

    plain, capturing = encoder(depth=3), encoder(depth=3)
    capturing.capture_blocks([0, -1])
    x, masks = images(), random_masks(plain)
    latent = capturing(x, masks.visible)
    torch.testing.assert_close(latent, plain(x, masks.visible), rtol=0, atol=0)
    manual = _student_hidden_states(plain, x, masks.visible)
    kept = capturing.captured_blocks(latent)
    assert sorted(kept) == [0, 2]
    torch.testing.assert_close(kept[0], manual[0])
    torch.testing.assert_close(kept[2], manual[2])
    kept[0].sum().backward()
    assert capturing.vit.blocks[0].attn.qkv.weight.grad is not None
    assert capturing.vit.blocks[2].attn.qkv.weight.grad is None
    clone = copy.deepcopy(capturing)
    assert clone.block_outputs == {} and clone._capture == (0, 2)
    with pytest.raises(RuntimeError, match="another forward pass"):
        capturing.captured_blocks(plain(x, masks.visible))
    with pytest.raises(ValueError, match="out of range"):
        capturing.capture_blocks([3])
    capturing.vit.set_grad_checkpointing(True)
    again = capturing(x, masks.visible)
    torch.testing.assert_close(again, latent)
    torch.testing.assert_close(capturing.captured_blocks(again)[2], manual[2])
    with pytest.raises(RuntimeError, match="no blocks requested"):
        plain.captured_blocks(latent)


def test_bf16_autocast_step():
    """Under autocast (bf16-mixed) the teacher computes in bf16 with fp32 weights; the loss stays fp32 and finite."""
    module = PretrainModule(
        encoder=encoder(), masking=AttentionMasking(), targets=[teacher_target(attention_scores=True)]
    )
    target = module.target_list[0]
    batch = {"image": images()}
    dtypes = []
    target.teacher.model.blocks[-1].attn.qkv.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        masks = module.draw_masks(batch, torch.Generator().manual_seed(0))
        out = module.compute_losses(batch, masks)
    assert dtypes == [torch.bfloat16]  # one teacher pass, its matmuls in the compute dtype
    assert {p.dtype for p in target.teacher.parameters()} == {torch.float32}
    assert out["loss"].dtype == torch.float32 and bool(torch.isfinite(out["loss"]))
    out["loss"].backward()
    assert target.alignment.layer_weights.grad is not None


# ---------------------------------------------------------------------- recipes
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_production_recipes_state_the_papers_settings():
    """The headers state the expected results; the values are the papers' (MaskAlign: Xue et al., CVPR 2023, and the
    OpenDriveLab/maskalign README and ModelCard; MR-MAE: Gao et al., IJCV 2023, arXiv 2303.05475)."""
    text = (RECIPES / "maskalign" / "vit_b16_in1k.yaml").read_text()
    header = text.split("seed_everything")[0]
    assert "85.4" in header and "Expected" in header and "clip" in header.lower()
    cfg = yaml.safe_load(text)
    model = cfg["model"]["init_args"]
    teacher = model["targets"][0]["init_args"]
    assert (
        model["masking"]["class_path"].endswith("AttentionMasking")
        and model["masking"]["init_args"]["mask_ratio"] == 0.7
    )
    assert (teacher["fusion"], teacher["layers"], teacher["target_norm"], teacher["loss"]) == (
        "linear",
        5,
        "whiten",
        "smooth_l1",
    )
    assert teacher["attention_scores"] and teacher["student_layers"] == "blocks"
    assert (teacher["loss_weights"], teacher["head"]) == ("mean", "linear")  # top5 with the official linear heads
    assert model["encoder"]["init_args"]["drop_path_rate"] == 0.1
    assert (model["blr"], model["min_lr"], model["warmup_epochs"], cfg["trainer"]["max_epochs"]) == (
        1.5e-4,
        1e-5,
        20,
        200,
    )
    assert cfg["data"]["init_args"]["batch_size"] == 128

    text = (RECIPES / "mr_mae" / "vit_b16_in1k.yaml").read_text()
    header = text.split("seed_everything")[0]
    assert "85.8" in header and "Expected" in header and "recall" in header
    model = yaml.safe_load(text)["model"]["init_args"]
    kinds = [t["class_path"].rsplit(".", 1)[-1] for t in model["targets"]]
    assert kinds == ["PixelTarget", "TeacherTarget", "TeacherTarget"]
    for t in model["targets"][1:]:
        assert (t["init_args"]["student_layers"], t["init_args"]["loss"]) == ("output", "l2")
    assert model["masking"]["init_args"]["mask_ratio"] == 0.75 and model["blr"] == 1.5e-4


@pytest.mark.usefixtures("fashion_mnist")  # the datamodule looks for the data at construction
@pytest.mark.parametrize("name", ["maskalign_fashion_mnist.yaml", "mr_mae_fashion_mnist.yaml"])
def test_teacher_overrides_reach_the_debug_recipes(name, tmp_path: Path):
    from mim.lightning_cli import build

    recipe = RECIPES / "debug" / name
    overrides = teacher_overrides(recipe, tmp_path)
    assert len(overrides) == 1
    cli = build(
        ["--config", str(recipe), f"--trainer.default_root_dir={tmp_path}", *overrides], save_config_callback=None
    )
    target = next(t for t in cli.model.target_list if isinstance(t, TeacherTarget))
    assert target.teacher_checkpoint == str(tmp_path / "teacher.safetensors")
    target.teacher.load()  # the generated file fits the recipe's teacher_arch / teacher_kwargs


@pytest.mark.usefixtures("fashion_mnist")
@pytest.mark.parametrize("name", ["maskalign_fashion_mnist.yaml", "mr_mae_fashion_mnist.yaml"])
def test_teacher_debug_recipes_train_end_to_end(name, tmp_path: Path):
    """The MaskAlign and MR-MAE debug recipes fit a few steps; the checkpoint has the teacher's provenance only."""
    import math

    from mim.lightning_cli import build

    recipe = RECIPES / "debug" / name
    cli = build(
        [
            "--config",
            str(recipe),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            *teacher_overrides(recipe, tmp_path),
        ],
        save_config_callback=None,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert any(k.endswith("_extra_state") for k in keys)
    assert not any(".teacher." in k for k in keys), "teacher weights were saved"
