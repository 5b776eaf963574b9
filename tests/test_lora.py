"""LoRA runs: only the adapters train and are checkpointed, the base stays bitwise as
loaded, the adapter export loads into the base pipeline with diffusers' own
`load_lora_weights` and gives the merged export's images, a quantised or bf16 base gives
the float32 base's loss, kill -9 and resume equals the uninterrupted run, and bad
settings are one-line errors."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from conftest import quickstart_diffusion_recipe, run_fit
from faceclip_zoo.data import ShardDataModule
from faceclip_zoo.models.adapters import LoraSettings
from faceclip_zoo.pipelines.export import load_pipeline
from faceclip_zoo.tasks import FluxJointModule, SDXLJointModule
from faceclip_zoo.utils import UserError

PROMPT = "a photo of a person wearing a red shirt, in front of a blue background, lit from the front"


def data(shards: Path, batch_size: int = 4) -> ShardDataModule:
    return ShardDataModule(train=str(shards / "train"), val=None, batch_size=batch_size, num_workers=0,
                           image_size=64, face_size=112)


def quick_fit(module, shards: Path, steps: int = 3, **trainer_args) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, **trainer_args)
    trainer.fit(module, data(shards))
    return trainer


def images(pipe, seed: int = 0, face=None) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    face = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(5)) if face is None else face
    kw = {"height": 64, "width": 64} if pipe.DENOISER == "transformer" else {}
    return pipe(PROMPT, face_image=face, num_inference_steps=3, output_type="pt", align="never",
                generator=torch.Generator().manual_seed(seed), **kw).images


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    """A pipeline folder of the FLUX quickstart's architecture (untrained)."""
    from faceclip_zoo.pipelines.export import save_pipeline

    torch.manual_seed(0)
    module = FluxJointModule()
    module.setup("fit")
    return save_pipeline(module.pipeline(use_ema=False), tmp_path_factory.mktemp("flux") / "base")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_shards, quickstart_sdxl_dir):
    """The shipped LoRA quickstart recipe on the tiny shards, over the SDXL quickstart's
    architecture, 4 steps (its int8 base included)."""
    from faceclip_zoo.cli import main

    tmp = tmp_path_factory.mktemp("lora")
    recipe = quickstart_diffusion_recipe(tmp, tiny_shards, "sdxl-lora", {"pipeline": str(quickstart_sdxl_dir)})
    assert main(["fit", "--config", str(recipe)]) == 0
    return tmp


def test_only_adapters_train_and_the_base_stays_bitwise(tiny_shards, quickstart_sdxl_dir):
    torch.manual_seed(0)
    module = SDXLJointModule(pipeline=str(quickstart_sdxl_dir), lora=LoraSettings(rank=4), ema_decay=0.9)
    quick_fit(module, tiny_shards)
    base = load_pipeline(quickstart_sdxl_dir).unet.state_dict()
    adapters = 0
    for name, p in module.unet.named_parameters():
        if "lora_" in name:
            adapters += 1
            assert p.requires_grad and p.dtype == torch.float32
        else:
            assert not p.requires_grad
            assert torch.equal(p, base[name.replace(".base_layer", "")]), name
    targets = [n for n, m in module.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert targets and adapters == 2 * len(targets)  # A and B on every attention projection
    trained_b = [p for n, p in module.unet.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in trained_b)  # B starts at zero: it trained
    assert len(module.ema.shadow_params) == adapters  # the EMA keeps the adapters only
    for part in (module.vae, module.condition):
        assert not any(p.requires_grad for p in part.parameters())


def test_checkpoint_holds_the_adapters_and_export_loads_into_the_base(lora_run, quickstart_sdxl_dir):
    from faceclip_zoo.cli import main

    ckpt = next((lora_run / "run").rglob("last.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])
    full_unet = (quickstart_sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert ckpt.stat().st_size < full_unet / 2  # adapters + their optimiser state only
    spec = state["faceclip_zoo"]["exports"]["pipeline"]["lora"]
    assert spec["base"] == str(quickstart_sdxl_dir.resolve()) and spec["quantize_base"] == "int8"
    # the fit's own export (ExportOnFitEnd) is the adapter file, described
    adapter = lora_run / "pipeline"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((adapter / "faceclip_zoo.json").read_text())["kind"] == "lora"
    assert "load_lora_weights" in (adapter / "README.md").read_text()
    # diffusers' loader on the base == the merged export
    assert main(["export", "--ckpt", str(ckpt), "--out", str(lora_run / "merged"), "--merge", "true"]) == 0
    loaded = load_pipeline(quickstart_sdxl_dir)
    loaded.load_lora_weights(adapter)
    merged, plain = load_pipeline(lora_run / "merged"), load_pipeline(quickstart_sdxl_dir)
    a, b, c = images(loaded), images(merged), images(plain)
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-3  # the adapters change the images
    # generate takes the adapter folder as a pipeline (its base from faceclip_zoo.json)
    out = lora_run / "gen.png"
    assert main(["generate", "--pipeline", str(adapter), "--prompt", PROMPT, "--steps", "2",
                 "--align", "never", "--out", str(out), "--quantize", "int8"]) == 0
    assert out.is_file()
    # a merge of a run that is not LoRA, and a base that went away: one line each
    with pytest.raises(UserError, match="base pipeline|not there any more"):
        from faceclip_zoo.pipelines.adapters import merged_pipeline
        from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

        moved = {**state["faceclip_zoo"]["exports"]["pipeline"]}
        moved["lora"] = {**moved["lora"], "base": str(lora_run / "gone")}
        merged_pipeline(FaceCLIPSDXLPipeline, state, moved, str(ckpt))


def test_quantised_and_bf16_bases_give_the_float32_loss(tiny_shards, quickstart_sdxl_dir):
    dm = data(tiny_shards, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    losses = {}
    for name, kwargs in (("fp32", {}), ("int8", {"quantize_base": "int8"}), ("bf16", {"base_dtype": "bfloat16"})):
        module = SDXLJointModule(pipeline=str(quickstart_sdxl_dir), lora=LoraSettings(rank=4), **kwargs)
        module.setup("fit")
        module.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            loss = module.diffusion_loss(batch, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads = [p.grad for n, p in module.unet.named_parameters() if "lora_" in n]
        assert all(g is not None for g in grads)
        losses[name] = loss.item()
    assert abs(losses["int8"] - losses["fp32"]) < 0.01 * losses["fp32"], losses
    assert abs(losses["bf16"] - losses["fp32"]) < 0.03 * losses["fp32"], losses


def test_8bit_adamw_trains_the_adapters_and_its_checkpoint_exports(tmp_path, tiny_shards, quickstart_sdxl_dir):
    """The recipes' 8-bit optimizer (torchao.optim.AdamW8bit) on a LoRA run: its state is 8-bit,
    the adapters move, and the checkpoint (which holds that state) still exports."""
    from torchao.optim import AdamW8bit

    from faceclip_zoo.export import export_checkpoint

    # rank 64: torchao keeps tensors under 4096 values in full precision; these reach it
    module = SDXLJointModule(pipeline=str(quickstart_sdxl_dir), lora=LoraSettings(rank=64),
                             optimizer=lambda params: AdamW8bit(params, lr=1e-3))
    trainer = quick_fit(module, tiny_shards, steps=2)
    kinds = {type(state["exp_avg"]).__name__ for state in trainer.optimizers[0].state.values()}
    assert "OptimState8bit" in kinds
    assert all(p.abs().sum() > 0 for n, p in module.unet.named_parameters() if "lora_B" in n)
    trainer.save_checkpoint(tmp_path / "a8.ckpt")
    export_checkpoint(str(tmp_path / "a8.ckpt"), str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_dora_export_equals_merge(tmp_path, tiny_shards, quickstart_sdxl_dir):
    from faceclip_zoo.export import export_checkpoint

    torch.manual_seed(0)
    module = SDXLJointModule(pipeline=str(quickstart_sdxl_dir), ema_decay=0.5,
                             lora=LoraSettings(rank=4, alpha=2, use_dora=True, init="gaussian"))
    trainer = quick_fit(module, tiny_shards, steps=2)
    assert any("lora_magnitude_vector" in n for n, p in module.unet.named_parameters() if p.requires_grad)
    trainer.save_checkpoint(tmp_path / "dora.ckpt")
    export_checkpoint(str(tmp_path / "dora.ckpt"), str(tmp_path / "adapter"))  # the EMA adapters
    export_checkpoint(str(tmp_path / "dora.ckpt"), str(tmp_path / "merged"), merge=True)
    loaded = load_pipeline(quickstart_sdxl_dir)
    loaded.load_lora_weights(tmp_path / "adapter")
    a, b = images(loaded), images(load_pipeline(tmp_path / "merged"))
    assert (a - b).abs().max() < 1e-4
    assert (a - images(load_pipeline(quickstart_sdxl_dir))).abs().max() > 1e-4


def test_flux_lora_export_equals_merge(tmp_path, tiny_shards, flux_base):
    from faceclip_zoo.export import export_checkpoint

    torch.manual_seed(0)
    module = FluxJointModule(pipeline=str(flux_base), lora=LoraSettings(rank=4, alpha=8, init="gaussian"),
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    trainer = quick_fit(module, tiny_shards, steps=2)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    export_checkpoint(str(tmp_path / "lora.ckpt"), str(tmp_path / "adapter"))
    export_checkpoint(str(tmp_path / "lora.ckpt"), str(tmp_path / "merged"), merge=True)
    loaded = load_pipeline(flux_base)
    loaded.load_lora_weights(tmp_path / "adapter")  # alpha != rank: read from the file's metadata
    a, b = images(loaded), images(load_pipeline(tmp_path / "merged"))
    assert (a - b).abs().max() < 1e-4
    assert (a - images(load_pipeline(flux_base))).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["sdxl-lora", "sdxl"])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, tiny_shards, quickstart_sdxl_dir, kind):
    """kill -9 after step 3 of an 8-step epoch of the LoRA quickstart (int8 base) and of the
    full SDXL quickstart, resume from the last checkpoint: the trained weights (adapters /
    UNet, EMA) and the optimiser state end bitwise where the uninterrupted run's end. The
    LoRA run also trains with the identity loss (its rows, noise levels and crop jitter are
    drawn from the resumable training generator)."""
    model_args = ({"pipeline": str(quickstart_sdxl_dir),
                   "identity_loss": {"weight": 0.5, "fraction": 0.5, "jitter": 0.05}} if kind == "sdxl-lora" else
                  {"encoder_l": "faceclip-tiny", "encoder_g": "faceclip-tiny"})

    def recipe(name, kill=None):
        (tmp_path / name).mkdir()
        path = quickstart_diffusion_recipe(tmp_path / name, tiny_shards, kind, model_args)
        r = yaml.safe_load(path.read_text())
        r["trainer"].update(max_steps=-1, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
                            val_check_interval=None)
        r["trainer"]["callbacks"] = [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": -1,
                           "dirpath": str(tmp_path / name / "checkpoints")}},
            *([{"class_path": "resume_helpers.KillAtStep", "init_args": {"step": kill}}] if kill else [])]
        r["trainer"]["plugins"] = [{"class_path": "faceclip_zoo.tasks.LastGoodCheckpointIO"}]
        r["data"]["init_args"].update(val=None, guided_prob=0.2)
        path.write_text(yaml.safe_dump(r))
        return path

    run_fit(recipe("full"))
    cut = recipe("cut", kill=3)
    run_fit(cut, expect_kill=True)
    resumed = yaml.safe_load(cut.read_text())
    resumed["trainer"]["callbacks"] = resumed["trainer"]["callbacks"][:1]
    cut.write_text(yaml.safe_dump(resumed))
    run_fit(cut, "--ckpt_path", "last")

    a, b = (torch.load(tmp_path / n / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for n in ("full", "cut"))
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all("lora_" in k for k in a["state_dict"]) == (kind == "sdxl-lora")
    assert (a["hyper_parameters"].get("identity_loss") is not None) == (kind == "sdxl-lora")
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    ema_a, ema_b = (c["faceclip_zoo"].get("ema", {}).get("weights", {}) for c in (a, b))
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(v, ema_b[k]) for k, v in ema_a.items())
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_settings_are_clear_errors(tmp_path, quickstart_sdxl_dir):
    with pytest.raises(UserError, match="apply to LoRA runs"):
        SDXLJointModule(pipeline=str(quickstart_sdxl_dir), quantize_base="int8")
    with pytest.raises(UserError, match="leave unet unset"):
        SDXLJointModule(pipeline=str(quickstart_sdxl_dir), unet="sdxl-unet")
    with pytest.raises(UserError, match="not a pipeline folder"):
        SDXLJointModule(pipeline=str(tmp_path))
    with pytest.raises(UserError, match="holds a 'FaceCLIPSDXLPipeline'"):
        FluxJointModule(pipeline=str(quickstart_sdxl_dir))
    module = SDXLJointModule(pipeline=str(quickstart_sdxl_dir), lora=LoraSettings(target_modules=["nope"]))
    with pytest.raises(UserError, match="do not fit this unet"):
        module.setup("fit")
    module = SDXLJointModule(pipeline=str(quickstart_sdxl_dir), lora=LoraSettings(), quantize_base="float8")
    with pytest.raises(UserError, match="float8 needs a CUDA GPU"):
        module.setup("fit")
    from faceclip_zoo.generate import open_pipeline

    with pytest.raises(UserError, match="needs a CUDA device"):
        open_pipeline(str(quickstart_sdxl_dir), device="cpu", offload="model")
