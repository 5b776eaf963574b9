"""Every recipe parses; production recipes build their full-size models on the meta device."""

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from faceclip_zoo.train import CLI_KWARGS

REPO = Path(__file__).resolve().parents[1]
ALL_RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
PREPARE = [r for r in ALL_RECIPES if "prepare" in r.parts]  # options of `prepare`, not fit recipes
CACHE = [r for r in ALL_RECIPES if "cache" in r.parts]  # options of `cache`
ABLATION = [r for r in ALL_RECIPES if "ablation" in r.stem]  # drives `fit` on other recipes
RECIPES = [r for r in ALL_RECIPES if r not in PREPARE + CACHE and r not in ABLATION]
PRODUCTION = [r for r in RECIPES if "quickstart" not in r.parts]
ENCODER_PRODUCTION = [r for r in PRODUCTION if r.parent.name.startswith("faceclip-") and "sdxl" not in r.parent.name]


class ParseOnly(LightningCLI):
    """Validates a recipe (types, unknown keys, class paths) without building anything."""

    def instantiate_classes(self) -> None:
        pass


def parse(recipe: Path, *extra: str):
    return ParseOnly(args=["--config", str(recipe), *extra], run=False, **CLI_KWARGS)


def test_there_are_recipes():
    names = {str(r.relative_to(REPO / "recipes")) for r in RECIPES}
    assert {"quickstart/faceclip.yaml", "faceclip-l14/pretrain.yaml", "faceclip-bigg14/pretrain.yaml",
            "quickstart/sdxl.yaml", "faceclip-sdxl/finetune.yaml", "quickstart/flux.yaml",
            "quickstart/facet5.yaml", "facet5-flux/finetune.yaml", "facet5-xxl/pretrain.yaml", "quickstart/wan.yaml",
            "quickstart/wan-base.yaml", "facet5-umt5-xxl/pretrain.yaml", "facet5-wan/lora-24gb.yaml",
            "facet5-wan/finetune-14b.yaml"} <= names


def _parse_options(function, recipe: Path, *args: str):
    """A command's options file (`--config`) parsed against the command's signature."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(function)
    return parser.parse_args(["--config", str(recipe), *args])


@pytest.mark.parametrize("recipe", PREPARE, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_prepare_recipe_parses(recipe):
    from faceclip_zoo.prepare import prepare

    cfg = _parse_options(prepare, recipe, "--input", "photos", "--out", "shards")
    assert cfg.filters.multiple_faces in ("largest", "reject") and cfg.face_size == 448


@pytest.mark.parametrize("recipe", CACHE, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_cache_options_parse(recipe):
    from faceclip_zoo.cache import cache

    cfg = _parse_options(cache, recipe, "--recipe", "fit.yaml", "--devices", "2")
    assert cfg.recipe == "fit.yaml" and cfg.devices == 2 and cfg.shards is None


@pytest.mark.parametrize("recipe", ABLATION, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_ablation_config_and_the_recipes_it_writes_parse(recipe, tmp_path, monkeypatch):
    from faceclip_zoo.evaluation.ablation import _recipe, load_config

    monkeypatch.chdir(REPO)
    cfg = load_config(recipe)
    assert set(cfg["variants"]) == {"L1", "L2", "L3"}
    for losses in cfg["variants"].values():
        r = _recipe(cfg["encoder_recipe"], cfg["encoder_steps"], tmp_path / "run", tmp_path / "enc", {"losses": losses})
        (tmp_path / "enc.yaml").write_text(yaml.safe_dump(r))
        parsed = parse(tmp_path / "enc.yaml").config
        assert parsed.model.init_args.losses == losses and parsed.trainer.max_steps == cfg["encoder_steps"]
    r = _recipe(cfg["diffusion_recipe"], cfg["diffusion_steps"], tmp_path / "run", tmp_path / "pipe",
                {"encoder_l": "x", "encoder_g": "x", "train_encoders": True})
    (tmp_path / "diff.yaml").write_text(yaml.safe_dump(r))
    parsed = parse(tmp_path / "diff.yaml").config
    assert parsed.model.init_args.train_encoders
    assert [lg.init_args.save_dir for lg in parsed.trainer.logger] == [str(tmp_path / "run")] * 2


def test_the_synthetic_world_is_read_from_the_recipe(tmp_path):
    from faceclip_zoo.evaluation.synthetic_benchmark import synthetic_world
    from faceclip_zoo.utils import UserError

    recipe = yaml.safe_load((REPO / "recipes" / "quickstart" / "sdxl.yaml").read_text())
    recipe["data"]["init_args"].update(root="elsewhere/world", priors_dir="elsewhere/priors")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert synthetic_world(str(tmp_path / "r.yaml")) == (Path("elsewhere/world"), Path("elsewhere/priors"))
    del recipe["data"]["init_args"]["priors_dir"]  # the DataModule's default
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert synthetic_world(str(tmp_path / "r.yaml"))[1] == Path("checkpoints/synthetic")
    recipe["data"] = {"class_path": "faceclip_zoo.data.ShardDataModule", "init_args": {"train": "x"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match="must train on faceclip_zoo.synthetic.SyntheticIdentities"):
        synthetic_world(str(tmp_path / "r.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_parses(recipe):
    cfg = parse(recipe).config
    assert cfg.model.class_path.startswith("faceclip_zoo.")
    assert cfg.data.class_path.startswith("faceclip_zoo.")
    # metrics land as CSV inside the run directory, and in TensorBoard beside it
    assert [lg.class_path.rsplit(".", 1)[1] for lg in cfg.trainer.logger] == ["CSVLogger", "TensorBoardLogger"]
    assert {lg.init_args.save_dir for lg in cfg.trainer.logger} == {cfg.trainer.default_root_dir}
    assert cfg.trainer.logger[1].init_args.name == "tensorboard"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_model_and_data_parse_as_cache_reads_them(recipe):
    """`cache --recipe` and the ablation read `model:` / `data:` with a plain parser, which
    (unlike LightningCLI's) requires every mandatory argument of every class to be typed."""
    from faceclip_zoo.cache import parse_recipe

    _, parsed, _ = parse_recipe(str(recipe))
    assert parsed.model.class_path.startswith("faceclip_zoo.")


def test_cache_names_why_a_recipe_does_not_parse(tmp_path):
    from faceclip_zoo.cache import parse_recipe
    from faceclip_zoo.utils import UserError

    recipe = yaml.safe_load((REPO / "recipes" / "quickstart" / "sdxl.yaml").read_text())
    recipe["model"]["init_args"]["optimizer"]["init_args"]["momentum_typo"] = 0.9
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match=r"r\.yaml: Parser key \"model\".*momentum_typo"):
        parse_recipe(str(tmp_path / "r.yaml"))


@pytest.mark.parametrize("recipe", ENCODER_PRODUCTION, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_production_recipe_builds_full_size_on_meta(recipe):
    cli = parse(recipe)
    cfg = cli.config
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy == "ddp"
    opt = cfg.model.init_args.optimizer.init_args
    assert (opt.lr, tuple(opt.betas), opt.weight_decay) == (2e-5, (0.9, 0.999), 0.01)
    assert cfg.data.init_args.guided_prob > 0
    with torch.device("meta"):
        init = cli.parser.instantiate_classes(cfg)
    model = init.model
    params = sum(p.numel() for p in model.encoder.parameters())
    expected = {"faceclip-l14": 460_544_322, "faceclip-bigg14": 1_110_568_258}[model.encoder_config.name]
    assert params == expected
    assert all(p.is_meta for p in model.parameters())
    global_batch = cfg.data.init_args.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
    assert global_batch == {"faceclip-l14": 24_000, "faceclip-bigg14": 16_000}[model.encoder_config.name]


def test_sdxl_finetune_recipe_builds_full_size_on_meta(tmp_path):
    """The paper-scale SDXL stage: two full branches (config-only encoder directories stand
    in for converted weights), the full SDXL UNet and VAE, all on the meta device."""
    from faceclip_zoo.config import FaceCLIPConfig
    from faceclip_zoo.models.io import write_model_dir

    dirs = {}
    for name in ("faceclip-l14", "faceclip-bigg14"):
        dirs[name] = write_model_dir(tmp_path / name, "faceclip", FaceCLIPConfig.from_name(name), {})
    recipe = REPO / "recipes" / "faceclip-sdxl" / "finetune.yaml"
    cli = parse(recipe, "--model.init_args.encoder_l", str(dirs["faceclip-l14"]),
                "--model.init_args.encoder_g", str(dirs["faceclip-bigg14"]))
    cfg = cli.config
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.num_nodes * cfg.trainer.devices == 128
    assert cfg.model.init_args.optimizer.init_args.lr == 2e-5
    assert cfg.model.init_args.condition_dropout == 0.1 and cfg.model.init_args.gradient_checkpointing
    with torch.device("meta"):
        model = cli.parser.instantiate_classes(cfg).model
    assert sum(p.numel() for p in model.unet.parameters()) == 2_567_463_684
    assert model.condition.embed_dim == 2048 and model.condition.pooled_dim == 1280
    assert all(p.is_meta for p in model.parameters())
    assert model.unet.is_gradient_checkpointing


def test_flux_finetune_recipe_builds_on_meta_and_fsdp_wraps_every_block(tmp_path):
    """The production FLUX stage: full FaceT5 (config-only directory in place of converted
    weights), full CLIP-L text, full FLUX.1-dev transformer on the meta device; its FSDP
    policy must make every FLUX and T5 block its own shard unit, and checkpoint every FLUX
    block's activations."""
    import json

    from faceclip_zoo.config import CLIP_TEXT_CONFIGS, FaceT5Config
    from faceclip_zoo.models.io import write_model_dir
    from faceclip_zoo.tasks.strategies import ZooFSDPStrategy, encoder_block_classes, flux_block_classes

    enc = write_model_dir(tmp_path / "facet5", "facet5", FaceT5Config.from_name("facet5-xxl"), {})
    clip = tmp_path / "clip-l-text"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps(CLIP_TEXT_CONFIGS["clip-l-text"]))
    recipe = REPO / "recipes" / "facet5-flux" / "finetune.yaml"
    cli = parse(recipe, "--model.init_args.encoder", str(enc), "--model.init_args.clip_text", str(clip),
                "--model.init_args.t5_tokenizer", "null", "--model.init_args.clip_tokenizer", "null")
    cfg = cli.config
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.strategy.class_path.endswith("ZooFSDPStrategy")
    assert cfg.trainer.strategy.init_args.sharding_strategy == "FULL_SHARD"
    assert cfg.model.init_args.optimizer.init_args.lr == 2e-5 and cfg.model.init_args.condition_dropout == 0.1
    with torch.device("meta"):
        init = cli.parser.instantiate_classes(cfg)
    model = init.model
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.transformer.parameters()) == 11_901_408_320
    assert model.condition.embed_dim == 4096 and model.condition.pooled_dim == 768
    strategy = ZooFSDPStrategy(**cfg.trainer.strategy.init_args)
    policy = strategy.kwargs["auto_wrap_policy"]
    wrapped = policy._run_policy(model, ignored_modules=set(), root_kwargs={})
    blocks = [m for m in model.modules() if isinstance(m, tuple(flux_block_classes()))]
    t5_blocks = [m for m in model.condition.face_t5.t5_encoder.modules() if isinstance(m, tuple(encoder_block_classes()))]
    assert len(blocks) == 19 + 38 and len(t5_blocks) == 24
    assert all(b in wrapped for b in blocks + t5_blocks)
    # the wrapped FLUX blocks hold nearly all of the transformer: sharding covers it
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    assert in_blocks / sum(p.numel() for p in model.transformer.parameters()) > 0.97
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._run_policy(
        model, ignored_modules=set(), root_kwargs={})
    assert all(b in checkpointed for b in blocks)
    assert not any(b in checkpointed for b in t5_blocks)  # frozen, no_grad: nothing to recompute


def test_facet5_pretrain_recipe_builds_full_size_on_meta():
    """FaceT5-XXL pre-training: the encoder of the release's size (its face_t5_encoder.pt
    holds 6,274 M values = this encoder's state + CLIP-L text + the unused enc_output)."""
    recipe = REPO / "recipes" / "facet5-xxl" / "pretrain.yaml"
    cli = parse(recipe, "--model.init_args.t5_tokenizer", "null")
    cfg = cli.config
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices * cfg.trainer.num_nodes == 64
    opt = cfg.model.init_args.optimizer.init_args
    assert (opt.lr, tuple(opt.betas), opt.weight_decay) == (2e-5, (0.9, 0.999), 0.01)
    with torch.device("meta"):
        model = cli.parser.instantiate_classes(cfg).model
    state = sum(v.numel() for v in model.encoder.state_dict().values())
    clip_l_text, enc_output = 123_060_480, 4096 * 4096 + 2 * 4096
    assert state + clip_l_text + enc_output == 6_274_218_498
    assert model.text_head.in_features == 4096  # mean pooling
    trainable = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    assert 1.0e9 < trainable < 1.2e9


def _production_model_on_meta(recipe: Path, tmp_path: Path):
    """A production recipe's model at full size on the meta device (config-only model
    directories stand in for converted weights)."""
    import json

    from faceclip_zoo.config import CLIP_TEXT_CONFIGS, FaceCLIPConfig, FaceT5Config
    from faceclip_zoo.models.io import write_model_dir

    extra: list[str] = []
    name = recipe.parent.name
    if name == "faceclip-sdxl":
        for branch, cfg in (("l", "faceclip-l14"), ("g", "faceclip-bigg14")):
            d = write_model_dir(tmp_path / cfg, "faceclip", FaceCLIPConfig.from_name(cfg), {})
            extra += [f"--model.init_args.encoder_{branch}", str(d)]
    elif name == "facet5-flux":
        enc = write_model_dir(tmp_path / "facet5", "facet5", FaceT5Config.from_name("facet5-xxl"), {})
        clip = tmp_path / "clip-l-text"
        clip.mkdir()
        (clip / "config.json").write_text(json.dumps(CLIP_TEXT_CONFIGS["clip-l-text"]))
        extra += ["--model.init_args.encoder", str(enc), "--model.init_args.clip_text", str(clip),
                  "--model.init_args.clip_tokenizer", "null", "--model.init_args.t5_tokenizer", "null"]
    elif name == "facet5-wan":
        enc = write_model_dir(tmp_path / "facet5", "facet5", FaceT5Config.from_name("facet5-umt5-xxl"), {})
        extra += ["--model.init_args.encoder", str(enc), "--model.init_args.t5_tokenizer", "null"]
    elif name in ("facet5-xxl", "facet5-umt5-xxl"):
        extra += ["--model.init_args.t5_tokenizer", "null"]
    cli = parse(recipe, *extra)
    with torch.device("meta"):
        return cli.config, cli.parser.instantiate_classes(cli.config).model


@pytest.mark.parametrize("recipe", PRODUCTION, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_production_recipe_shards_under_fsdp_on_meta(recipe, tmp_path):
    """Every production recipe, whatever strategy it names, also trains under
    ZooFSDPStrategy: every block of its models is an FSDP unit, trained blocks are
    activation-checkpointed, and the units hold nearly all parameters."""
    from faceclip_zoo.tasks.strategies import ZooFSDPStrategy, all_block_classes, trained_block_classes

    _, model = _production_model_on_meta(recipe, tmp_path)
    strategy = ZooFSDPStrategy(sharding_strategy="HYBRID_SHARD")
    wrapped = strategy.kwargs["auto_wrap_policy"]._run_policy(model, ignored_modules=set(), root_kwargs={})
    blocks = [m for m in model.modules() if isinstance(m, tuple(all_block_classes()))]
    assert len(blocks) > 20 and all(b in wrapped for b in blocks)
    covered = {id(p) for m in wrapped for p in m.parameters()}
    # a T5 / umT5 input embedding has two parents (`shared`, `encoder.embed_tokens`), which
    # FSDP cannot wrap once: it stays replicated (umT5's 256k-entry table: 1.05 B, frozen)
    tied = {id(m.weight) for name, m in model.named_modules() if name.endswith(".shared")}
    total = [p for p in model.parameters() if id(p) not in tied]
    share = sum(p.numel() for p in total if id(p) in covered) / sum(p.numel() for p in total)
    assert share > 0.85, f"only {share:.1%} of parameters in FSDP units"
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._run_policy(
        model, ignored_modules=set(), root_kwargs={})
    trained = [m for m in model.modules() if isinstance(m, tuple(trained_block_classes()))
               and any(p.requires_grad for p in m.parameters())]
    assert trained and all(b in checkpointed for b in trained)


@pytest.mark.parametrize("recipe", PRODUCTION, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_production_recipe_is_resumable(recipe):
    """Checkpoints in a fixed folder (found again by `--ckpt_path last` after a restart),
    two kept, and the last-good fallback."""
    cfg = parse(recipe).config if recipe.parent.name not in ("facet5-xxl",) else parse(
        recipe, "--model.init_args.t5_tokenizer", "null").config
    ckpt = [c for c in cfg.trainer.callbacks if c.class_path.endswith("ModelCheckpoint")]
    assert len(ckpt) == 1
    args = ckpt[0].init_args
    assert args.dirpath == f"{cfg.trainer.default_root_dir}/checkpoints" and args.save_last
    assert args.save_top_k >= 2 and args.monitor == "step" and args.mode == "max" and args.every_n_train_steps
    assert [p.class_path for p in cfg.trainer.plugins] == ["faceclip_zoo.tasks.LastGoodCheckpointIO"]


def test_wan_recipes_build_on_meta_and_fsdp_wraps_every_block(tmp_path):
    """The video stage at real size: FaceT5 on umT5-XXL (a config-only directory in place of
    its export), Wan2.1-T2V-14B's transformer under FSDP (every Wan and umT5 block its own
    unit, the Wan blocks checkpointed) and the 1.3B LoRA recipe's adapters, on the meta device."""
    from faceclip_zoo.config import FaceT5Config
    from faceclip_zoo.models.io import write_model_dir
    from faceclip_zoo.tasks.strategies import ZooFSDPStrategy, encoder_block_classes, wan_block_classes

    enc = write_model_dir(tmp_path / "facet5", "facet5", FaceT5Config.from_name("facet5-umt5-xxl"), {})
    args = ("--model.init_args.encoder", str(enc), "--model.init_args.t5_tokenizer", "null")
    cli = parse(REPO / "recipes" / "facet5-wan" / "finetune-14b.yaml", *args)
    cfg = cli.config
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.num_nodes * cfg.trainer.devices == 32
    assert cfg.trainer.strategy.class_path.endswith("ZooFSDPStrategy")
    with torch.device("meta"):
        model = cli.parser.instantiate_classes(cfg).model
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.transformer.parameters()) == 14_288_491_584
    assert model.condition.embed_dim == 4096 and model.hparams.sample_frames == 81
    strategy = ZooFSDPStrategy(**cfg.trainer.strategy.init_args)
    wrapped = strategy.kwargs["auto_wrap_policy"]._run_policy(model, ignored_modules=set(), root_kwargs={})
    blocks = [m for m in model.modules() if isinstance(m, tuple(wan_block_classes()))]
    t5_blocks = [m for m in model.condition.face_t5.t5_encoder.modules()
                 if isinstance(m, tuple(encoder_block_classes()))]
    assert len(blocks) == 40 and len(t5_blocks) == 24 and all(b in wrapped for b in blocks + t5_blocks)
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._run_policy(
        model, ignored_modules=set(), root_kwargs={})
    assert all(b in checkpointed for b in blocks) and not any(b in checkpointed for b in t5_blocks)

    cli = parse(REPO / "recipes" / "facet5-wan" / "lora-24gb.yaml", *args)
    with torch.device("meta"):
        model = cli.parser.instantiate_classes(cli.config).model
    assert sum(p.numel() for p in model.transformer.parameters()) == 1_418_996_800
    assert model.hparams.quantize_base == "int8" and model.lora_settings.rank == 32
    assert model.hparams.gradient_checkpointing  # adapters and checkpointing are set up by `setup`
