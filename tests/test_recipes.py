"""Every shipped recipe parses and instantiates; production recipes state their expected result; the partial
``recipes/_base/`` pieces (strategy, precision) compose with any method recipe through stacked ``-c`` files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mim.finetune import FinetuneModule
from mim.lightning_cli import MimCLI, build
from mim.module import PretrainModule

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
# recipes/_base/ holds partial pieces (a strategy, a precision) meant to be stacked after a method recipe: they are
# tested in composition below, not alone.
RECIPES = sorted(p for p in RECIPE_DIR.rglob("*.yaml") if p.relative_to(RECIPE_DIR).parts[0] != "_base")
BASE = sorted((RECIPE_DIR / "_base").glob("*.yaml"))


def _image_folder(root: Path, size: int = 40) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (size, size), (40 * i, 90, 200)).save(root / cls / f"{i}.png")
    return root


def _instantiate(recipe: Path, tmp_path: Path, clips: Path | None = None) -> MimCLI:
    args = ["--config", str(recipe), f"--trainer.default_root_dir={tmp_path}"]
    text = recipe.read_text()
    if "ImageFolderDataModule" in text:
        args.append(f"--data.init_args.root={_image_folder(tmp_path / 'images')}")
        if "val_root:" in text:
            args.append(f"--data.init_args.val_root={_image_folder(tmp_path / 'val_images')}")
        if "FinetuneModule" in text:
            args.append("--data.init_args.batch_size=2")  # the 4 test images
    if "mim.data.ShardDataModule" in text:  # image shards (not VideoShardDataModule)
        from mim.data.pack import pack

        pack(_image_folder(tmp_path / "shard_images"), tmp_path / "shards", shard_samples=2, progress=False)
        args.append(f"--data.init_args.urls={tmp_path / 'shards'}")
    if "VideoDataModule" in text:
        assert clips is not None
        if "list_file:" in text:  # a production recipe's Kinetics lists: the real clips' folder instead
            args += ["--data.init_args.list_file=null", "--data.init_args.val_list_file=null"]
            args.append("--data.init_args.batch_size=2")  # the 4 real clips
        if "FinetuneModule" in text:  # a classifier needs classes: two subfolders of the real clips
            import shutil

            for i, clip in enumerate(sorted(clips.glob("*.mp4"))):
                (tmp_path / "clips" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
                shutil.copy(clip, tmp_path / "clips" / f"c{i % 2}" / clip.name)
            clips = tmp_path / "clips"
        args.append(f"--data.init_args.root={clips}")
        if "val_list_file:" in text:
            args.append(f"--data.init_args.val_root={clips}")
    if "TableDataModule" in text:
        from mim.data.tables import sklearn_table

        args.append(f"--data.init_args.train_path={sklearn_table('wine', tmp_path / 'table')}")
    if "CSVLogger" in text:
        args.append(f"--trainer.logger.init_args.save_dir={tmp_path}")
    if "FinetuneModule" in text and "\n    encoder:" not in text:  # production fine-tuning: a pretrained encoder
        video = "VideoDataModule" in text  # stands in for the checkpoint: the recipe's geometry, one narrow block
        encoder = {"arch": "vit_base_patch16_224", "img_size": 224, "patch_size": 16,
                   "model_kwargs": {"embed_dim": 64, "depth": 1, "num_heads": 2},
                   **({"num_frames": 16, "tubelet_size": 2} if video else {})}  # fmt: skip
        args.append(
            f"--model.init_args.encoder={json.dumps({'class_path': 'mim.models.MaskedEncoder', 'init_args': encoder})}"
        )
    if "TeacherTarget" in text:
        from tests.test_teacher_target import teacher_overrides

        args += teacher_overrides(recipe, tmp_path)  # a random-init teacher file for the small debug teachers
    if "SelfDistillTarget" in text and recipe.parent.name == "debug":
        from tests.test_self_distill import sd_recipe_overrides

        args += sd_recipe_overrides(recipe, tmp_path)  # theta_0 from a 1-step MAE fit, its export as the teacher
    return build(args, save_config_callback=None)


def test_recipes_found():
    names = {p.relative_to(p.parents[1]).as_posix() for p in RECIPES}
    assert {"mae/vit_b16_in1k.yaml", "debug/mae_fashion_mnist.yaml", "debug/mae_image_folder.yaml"} <= names
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_recipe_instantiates(recipe: Path, tmp_path: Path, real_clips: Path):
    cli = _instantiate(recipe, tmp_path, real_clips)
    if isinstance(cli.model, FinetuneModule):
        _check_finetune(cli)
        return
    assert isinstance(cli.model, PretrainModule)
    assert len(cli.model.targets) >= 1
    # every trainable parameter receives a gradient from one training loss (no dead heads)
    module, data = cli.model, cli.datamodule
    if sum(p.numel() for p in module.parameters()) < 5_000_000:
        module.configure_data(data)
        data.setup("fit")
        batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)  # a real, normalised batch
        inputs = module.inputs(batch)
        masks = module.draw_masks(batch, torch.Generator().manual_seed(0), inputs)
        module.compute_losses(batch, masks, inputs)["loss"].backward()
        dead = [n for n, p in module.named_parameters() if p.requires_grad and p.numel() and p.grad is None]
        assert not dead


def _check_finetune(cli: MimCLI) -> None:
    """A fine-tuning recipe builds its head from the data and one loss reaches every trainable parameter."""
    module, data = cli.model, cli.datamodule
    module.configure_data(data)
    assert module.num_classes == data.num_classes
    data.setup("fit")
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    inputs, labels = module.encoder.inputs(batch), batch["label"]
    torch.nn.functional.cross_entropy(module(inputs), labels).backward()
    dead = [n for n, p in module.named_parameters() if p.requires_grad and p.numel() and p.grad is None]
    assert not dead


def test_vit_b16_recipe_matches_the_paper(tmp_path: Path):
    recipe = next(p for p in RECIPES if p.parent.name == "mae" and p.name == "vit_b16_in1k.yaml")
    header = recipe.read_text().split("seed_everything")[0]
    assert "83.6" in header and "Expected" in header  # the paper's fine-tune result stated in the header
    cli = _instantiate(recipe, tmp_path)
    m = cli.model
    assert m.encoder.embed_dim == 768 and len(m.encoder.vit.blocks) == 12 and m.encoder.patch_size == (16, 16)
    assert m.masking.mask_ratio == 0.75
    t = m.targets[0]
    assert (t.decoder_dim, t.decoder_depth, t.decoder_num_heads, t.norm_pix) == (512, 8, 16, True)
    hp = m.hparams
    assert (hp.blr, hp.weight_decay, tuple(hp.betas), hp.warmup_epochs) == (1.5e-4, 0.05, (0.9, 0.95), 40)
    assert cli.trainer.max_epochs == 1600
    assert cli.datamodule.batch_size == 64


# ------------------------------------------------------------------------------------------ recipes/_base pieces
def _parse(args: list[str]) -> dict:
    """The merged configuration of stacked ``-c`` files and flags, parsed but not instantiated (no DeepSpeed)."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from mim.lightning_cli import MimCLI

    class ParseOnly(MimCLI):
        def instantiate_classes(self) -> None:
            pass

    cli = ParseOnly(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
        save_config_callback=None,
    )
    return cli.config.as_dict()


def _piece(name: str) -> Path:
    return RECIPE_DIR / "_base" / f"{name}.yaml"


def _contains(merged: object, piece: object) -> bool:
    """Every value the piece sets is in the merged config (dicts compared key by key, the rest exactly)."""
    if isinstance(piece, dict):
        return isinstance(merged, dict) and all(k in merged and _contains(merged[k], v) for k, v in piece.items())
    return merged == piece


def test_base_pieces_found():
    names = {p.stem for p in BASE}
    strategies = {"ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp"}
    assert (
        strategies | {"deepspeed_stage_2_offload", "deepspeed_stage_3_offload", "fsdp_shard_grad_op", "bf16"} <= names
    )
    assert not any(p.relative_to(RECIPE_DIR).parts[0] == "_base" for p in RECIPES)


@pytest.mark.parametrize("method", ["debug/mae_fashion_mnist.yaml", "mae/vit_b16_in1k.yaml"])
@pytest.mark.parametrize("piece", BASE, ids=lambda p: p.stem)
def test_base_piece_composes_with_a_method_recipe(piece: Path, method: str):
    """``-c METHOD -c PIECE -c bf16``: the piece's trainer settings win, the method's model and data stay."""
    import yaml

    alone = _parse(["--config", str(RECIPE_DIR / method)])
    merged = _parse(["--config", str(RECIPE_DIR / method), "--config", str(piece), "--config", str(_piece("bf16"))])
    spec = yaml.safe_load(piece.read_text())
    assert set(spec) == {"trainer"}, "a _base piece sets trainer options only"
    assert _contains(merged["trainer"], spec["trainer"])
    assert merged["trainer"]["precision"] == "bf16-mixed"
    assert merged["model"] == alone["model"] and merged["data"] == alone["data"]
    if "strategy" in spec["trainer"]:
        # a later flag still overrides the piece (jsonargparse: the last one wins), and the rest of the piece stays
        flag = "--trainer.strategy.init_args.process_group_backend=gloo"
        override = _parse(["--config", str(RECIPE_DIR / method), "--config", str(piece), flag])
        assert override["trainer"]["strategy"]["init_args"]["process_group_backend"] == "gloo"
        assert _contains(override["trainer"], spec["trainer"])


def test_deepspeed_pieces_set_the_zero_options():
    import yaml

    def zero(name: str) -> tuple[dict, dict]:
        init = yaml.safe_load(_piece(name).read_text())["trainer"]["strategy"]["init_args"]
        return init, init.get("config", {}).get("zero_optimization", {"stage": init.get("stage")})

    for name, stage in [("deepspeed_stage_1", 1), ("deepspeed_stage_2", 2), ("deepspeed_stage_2_offload", 2)]:
        assert zero(name)[1]["stage"] == stage
    for name in ("deepspeed_stage_3", "deepspeed_stage_3_offload"):
        init, z = zero(name)
        # ZeRO-3 keeps parameters under the threshold as full local copies refreshed only at the next step, so an EMA
        # teacher would run one step stale (measured on CPU, 2 ranks); 0 partitions every parameter
        assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 0
        assert init["config"]["zero_allow_untested_optimizer"] is True  # a config dict replaces Lightning's defaults
    for name in ("deepspeed_stage_2_offload", "deepspeed_stage_3_offload"):
        init, z = zero(name)
        assert z["offload_optimizer"]["device"] == "cpu"
        assert init["config"]["zero_force_ds_cpu_optimizer"] is False  # mim's torch AdamW on offloaded state
    assert zero("deepspeed_stage_3_offload")[1]["offload_param"]["device"] == "cpu"
    assert "offload_param" not in zero("deepspeed_stage_3")[1]


def test_ddp_fsdp_and_bf16_pieces_build_the_trainer(tmp_path: Path):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    debug = RECIPE_DIR / "debug" / "mae_fashion_mnist.yaml"
    root = f"--trainer.default_root_dir={tmp_path}"
    cli = build(["--config", str(debug), "--config", str(_piece("ddp")), "--config", str(_piece("bf16")), root])
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    assert cli.trainer.strategy._ddp_kwargs["find_unused_parameters"] is False
    assert cli.trainer.precision == "bf16-mixed" and isinstance(cli.model, PretrainModule)
    for piece, reshard in (("fsdp", True), ("fsdp_shard_grad_op", False)):
        cli = build(["--config", str(debug), "--config", str(_piece(piece)), root])
        strategy = cli.trainer.strategy
        assert isinstance(strategy, ModelParallelStrategy) and strategy.reshard_after_forward is reshard
        assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == ("auto", "auto")  # = world size, 1


def test_deepspeed_pieces_build_the_strategy():
    """The strategy objects themselves (a Trainer would refuse Lightning's DeepSpeedStrategy on a CPU)."""
    pytest.importorskip("deepspeed")
    import json

    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import DeepSpeedStrategy, Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    for name, stage in [("deepspeed_stage_1", 1), ("deepspeed_stage_2", 2), ("deepspeed_stage_3_offload", 3)]:
        spec = yaml.safe_load(_piece(name).read_text())["trainer"]["strategy"]
        strategy = parser.instantiate_classes(parser.parse_args(["--strategy", json.dumps(spec)])).strategy
        assert isinstance(strategy, DeepSpeedStrategy)
        assert strategy.config["zero_optimization"]["stage"] == stage
        assert strategy.zero_stage_3 == (stage == 3)


def test_printed_config_reparses_the_deepspeed_dict(tmp_path: Path, capsys):
    """`mim print_config` dumps a DeepSpeed ``config`` dict as a quoted string; feeding that dump back in (as a
    saved config.yaml is) must give the dict again, not a path."""
    import yaml

    from mim.cli import main

    method = str(RECIPE_DIR / "debug" / "mae_fashion_mnist.yaml")
    with pytest.raises(SystemExit):
        main(["print_config", "-c", method, "-c", str(_piece("deepspeed_stage_3"))])
    dumped = capsys.readouterr().out
    saved = yaml.safe_load(dumped[dumped.index("seed_everything") :])
    for fit_only in ("ckpt_path", "weights_only"):  # `fit` arguments; _parse has no subcommands
        saved.pop(fit_only, None)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    again = _parse(["--config", str(path)])
    config = again["trainer"]["strategy"]["init_args"]["config"]
    assert isinstance(config, dict) and config["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize(
    ("name", "top1", "blr", "layer_decay", "drop_path", "epochs"),
    [
        ("mae_vit_b16_in1k.yaml", "83.6", 5e-4, 0.65, 0.1, 100),
        ("mae_vit_l16_in1k.yaml", "85.9", 1e-3, 0.75, 0.2, 50),
        ("videomae_vit_b16_k400.yaml", "81.5", 5e-4, 0.75, 0.1, 75),
    ],
)
def test_finetune_recipes_state_the_official_settings(name, top1, blr, layer_decay, drop_path, epochs):
    """MAE's FINETUNE.md and VideoMAE's finetune.sh settings, and the expected top-1 in each header."""
    recipe = RECIPE_DIR / "finetune" / name
    header = recipe.read_text().split("seed_everything")[0]
    assert "Expected" in header and top1 in header
    parsed = _parse(["--config", str(recipe)])
    hp = parsed["model"]["init_args"]
    assert (hp["blr"], hp["layer_decay"], hp["drop_path_rate"], hp["global_pool"]) == (
        blr,
        layer_decay,
        drop_path,
        "avg",
    )
    assert (hp["mixup"], hp["cutmix"], hp["label_smoothing"], hp["weight_decay"]) == (0.8, 1.0, 0.1, 0.05)
    assert parsed["trainer"]["max_epochs"] == epochs
