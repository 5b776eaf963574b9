"""Real size without the real weights: stand-in folders in the released layouts, weights
read tensor by tensor into models built without memory (sharded folders included), and
the dry run of `bench --only real-size` that steps each production recipe through `fit`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from faceclip_zoo.bench.standins import SDXL_BASE, StandinTensors, standin_tensor, standins, write_weights
from faceclip_zoo.config import diffusers_config
from faceclip_zoo.models.diffusers_models import build_diffusers, build_diffusers_on_meta, load_diffusers_weights
from faceclip_zoo.models.weights import empty_weights, has_meta_tensors
from faceclip_zoo.utils import UserError


@pytest.fixture(scope="module")
def tiny_standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    standins(out=str(root), only="sdxl-base,faceclip-release,flux-dev", size="tiny")
    return root


def test_standins_have_the_real_architectures_keys_and_are_reproducible():
    unet = build_diffusers_on_meta(diffusers_config("sdxl-unet"))
    tensors = StandinTensors.of(unet, seed=0, dtype=torch.bfloat16)
    assert {k: s for k, (s, _) in tensors.specs.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base 1.0's UNet
    assert tensors.nbytes() == 2 * 2_567_463_684
    a = standin_tensor("down_blocks.1.attentions.0.proj_in.weight", (64, 32), torch.float32, seed=3)
    assert torch.equal(a, standin_tensor("down_blocks.1.attentions.0.proj_in.weight", (64, 32), torch.float32, 3))
    assert not torch.equal(a, standin_tensor("down_blocks.1.attentions.0.proj_in.weight", (64, 32), torch.float32, 4))
    assert abs(a.std().item() - 32 ** -0.5) < 0.03  # 1 / sqrt(fan_in)
    assert torch.equal(standin_tensor("norm.running_var", (4,), torch.float32, 0), torch.ones(4))
    assert torch.equal(standin_tensor("x.position_ids", (1, 5), torch.int64, 0), torch.arange(5)[None])


def test_a_sharded_folder_loads_tensor_by_tensor_into_a_model_built_without_memory(tmp_path):
    config = diffusers_config("sdxl-unet-tiny")
    made = build_diffusers(config)
    tensors = StandinTensors.of(made, seed=1)
    shards = write_weights(tmp_path, "diffusion_pytorch_model", tensors, max_shard_bytes=2**20)
    assert len(shards) > 1 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    with empty_weights():
        unet = build_diffusers(config)
    assert has_meta_tensors(unet)
    load_diffusers_weights(unet, tmp_path, "unet weights", dtype=torch.bfloat16)
    assert not has_meta_tensors(unet)
    for name, value in unet.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, tensors[name].to(torch.bfloat16)), name
    x = torch.randn(1, 4, 16, 16, dtype=torch.bfloat16)
    out = unet(x, 10, torch.randn(1, 8, 128, dtype=torch.bfloat16), added_cond_kwargs={
        "text_embeds": torch.randn(1, 64, dtype=torch.bfloat16), "time_ids": torch.ones(1, 6)}).sample
    assert torch.isfinite(out.float()).all()
    shards[-1].unlink()
    with pytest.raises(UserError, match=f"lacks the shard\\(s\\) {shards[-1].name}"):
        load_diffusers_weights(build_diffusers(config), tmp_path, "unet weights")


def test_the_flux_standin_is_sharded_as_released_and_its_tokenizers_load(tiny_standins):
    from faceclip_zoo.bench.standins import FLUX_DEV
    from faceclip_zoo.config import FaceT5Config
    from faceclip_zoo.models.text_encoders import build_clip_tokenizer, build_t5_tokenizer

    flux = tiny_standins / FLUX_DEV
    assert json.loads((flux / "transformer" / "config.json").read_text())["_class_name"] == "FluxTransformer2DModel"
    assert len(build_clip_tokenizer(str(flux / "tokenizer"))) == 49408
    t5 = build_t5_tokenizer(FaceT5Config.from_name("facet5-xxl").t5, str(flux / "tokenizer_2"))
    assert max(t5("a photo of a person").input_ids) < 32128
    meta = build_diffusers_on_meta(diffusers_config("flux-dev-transformer"))
    assert StandinTensors.of(meta, 0, torch.bfloat16).nbytes() == 2 * 11_901_408_320  # FLUX.1-dev, bf16


def test_the_flux_block_check_runs_the_recipes_adapters_on_a_quantised_block(tiny_standins):
    """What a CPU runs of the FLUX LoRA recipe at real size: one block pair read from the
    sharded folder, int8 base, adapters, forward and backward (here on the tiny stand-in)."""
    from faceclip_zoo.bench.real_size import flux_block_check

    report = flux_block_check(tiny_standins, side=64, lora={"rank": 4}, quantize="int8")
    assert report["loss_finite"] and report["adapter_grads_finite_nonzero"], report
    assert report["tokens"] == 16 + 512


def test_a_base_is_quantised_piece_by_piece_as_it_moves_to_the_runs_device():
    """A LoRA run quantises its base on the run's device as the pieces arrive (a 23.8 GB
    bf16 FLUX transformer never sits whole on a 24 GB card); pieces or whole, the same."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from faceclip_zoo.models.adapters import _pieces, quantize_frozen

    torch.manual_seed(0)
    whole = build_diffusers(diffusers_config("flux-transformer-tiny"))
    pieces = build_diffusers(diffusers_config("flux-transformer-tiny"))
    pieces.load_state_dict(whole.state_dict())
    assert len(list(_pieces(pieces, 4096))) > 10
    quantize_(whole, Int8WeightOnlyConfig())
    quantize_frozen(pieces, "int8", device="cpu", piece_bytes=4096)
    linears = [(n, m) for n, m in pieces.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m.weight.data) is not torch.Tensor for _, m in linears), "a Linear left as it was"
    g = torch.Generator().manual_seed(1)
    args = dict(hidden_states=torch.randn(1, 16, 16, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 32, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), txt_ids=torch.zeros(8, 3),
                img_ids=torch.zeros(16, 3))
    with torch.no_grad():
        assert torch.equal(pieces(**args).sample, whole(**args).sample)


def test_a_lora_run_loads_its_named_base_once_in_its_frozen_dtype(tiny_standins):
    """A real SDXL UNet built the ordinary way costs 10.3 GB of random float32 before its
    weights file is read beside it; a run that names its weights builds nothing."""
    from faceclip_zoo.tasks.sdxl import SDXLJointModule

    base = tiny_standins / SDXL_BASE
    release = tiny_standins / "checkpoints/faceclip-release"
    module = SDXLJointModule(encoder_l=str(release / "faceclip-l14"), encoder_g=str(release / "faceclip-bigg14"),
                             unet="sdxl-unet-tiny", unet_weights=str(base / "unet"), vae="vae-tiny",
                             vae_weights=str(base / "vae"), lora={"rank": 4}, base_dtype="bfloat16")
    assert all(p.is_meta for p in module.unet.parameters())
    assert all(p.is_meta for p in module.condition.parameters())
    module.setup("fit")
    assert not has_meta_tensors(module)
    stored = load_file(str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    frozen = {n: p for n, p in module.unet.named_parameters() if not p.requires_grad}
    trained = {n: p for n, p in module.unet.named_parameters() if p.requires_grad}
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16} and {p.dtype for p in trained.values()} == {
        torch.float32}
    assert torch.equal(module.unet.conv_in.weight, stored["conv_in.weight"].to(torch.bfloat16))
    assert {p.dtype for p in module.condition.parameters()} == {torch.bfloat16}

    # a checkpoint loaded before setup (load_from_checkpoint) fills the memoryless parts
    again = SDXLJointModule(encoder_l=str(release / "faceclip-l14"), encoder_g=str(release / "faceclip-bigg14"),
                            unet="sdxl-unet-tiny", unet_weights=str(base / "unet"), vae="vae-tiny",
                            vae_weights=str(base / "vae"))
    full = {k: v.float() for k, v in SDXLJointModule(unet="sdxl-unet-tiny", vae="vae-tiny").state_dict().items()}
    again.load_state_dict(full)
    assert not has_meta_tensors(again)
    assert torch.equal(again.unet.conv_in.weight, full["unet.conv_in.weight"])


def test_facet5_pretraining_reads_its_frozen_backbones_once_in_their_frozen_dtype(tmp_path):
    """T5-XXL built the ordinary way costs 19 GB of random float32, then transformers read
    its shards beside it; a run that names its weights builds the frozen backbones (T5, face
    ViT, CLIP targets) without memory and reads them once, in `frozen_dtype`."""
    import lightning as L

    from faceclip_zoo.bench.standins import FLUX_DEV
    from faceclip_zoo.models.weights import open_weights
    from faceclip_zoo.tasks import FaceT5EncoderModule

    standins(out=str(tmp_path), only="flux-dev-t5,pretrain-inputs", size="tiny")
    t5_dir = tmp_path / FLUX_DEV / "text_encoder_2"
    assert len(list(t5_dir.glob("model-0000?-of-0000?.safetensors"))) >= 2 and (t5_dir / "config.json").is_file()
    args = dict(encoder="facet5-tiny", t5_weights=str(t5_dir), t5_tokenizer=str(tmp_path / FLUX_DEV / "tokenizer_2"),
                face_encoder_weights=str(tmp_path / "weights/face_vit_l.pt"), clip="clip-tiny",
                clip_weights=str(tmp_path / "weights/ViT-L-14-quickgelu-metaclip_fullcc.bin"))
    m = FaceT5EncoderModule(**args, frozen_dtype="bfloat16")
    for part in (m.encoder.t5_encoder, m.encoder.face_encoder, m.clip):
        assert all(p.is_meta for p in part.parameters())
    m.setup("fit")
    assert not has_meta_tensors(m)
    t5 = m.encoder.t5_encoder
    stored = open_weights(t5_dir, "model", "t5")
    assert "encoder.embed_tokens.weight" not in stored  # stored once, as `shared`
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    for name, value in t5.state_dict().items():
        key = "shared.weight" if name == "encoder.embed_tokens.weight" else name
        assert value.dtype == torch.bfloat16 and torch.equal(value, stored[key].to(torch.bfloat16)), name
    assert {p.dtype for p in m.clip.parameters()} == {p.dtype for p in m.encoder.face_encoder.parameters()} == {
        torch.bfloat16}
    assert {p.dtype for p in m.encoder.fuser.parameters()} == {torch.float32}  # trained: float32
    prompts = ["a photo of a person", "a man in a red shirt", "a portrait of a woman"]
    batch = {"image": torch.rand(3, 3, 64, 64), "face": torch.rand(3, 3, 112, 112),
             "has_face": torch.tensor([True, False, True]), "caption": prompts, "identity": ["a", "", "b"]}
    feats = m.frozen_features(batch, ["clip_image", "clip_text", "face_identity"])  # as `cache` runs, no autocast
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in feats.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as fit's bf16-mixed runs
        losses, _ = m.compute_losses(batch)
    assert sorted(losses) == ["identity", "image", "text"] and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in m.encoder.fuser.layers[0].parameters())
    # frozen half-precision weights need autocast: a float32 run is told so
    again = FaceT5EncoderModule(**args, frozen_dtype="bfloat16")
    again.trainer = L.Trainer(accelerator="cpu", precision="32-true", logger=False)
    with pytest.raises(UserError, match="frozen_dtype bfloat16 needs precision bf16-mixed"):
        again.setup("fit")


@pytest.mark.slow
def test_the_real_size_dry_run_steps_every_production_recipe_it_knows(tmp_path):
    """`bench --only real-size --size tiny`: each recipe through `fit` in its own process,
    unchanged but for paths, run control and the tiny configs; what the GPU call runs."""
    from faceclip_zoo.bench.real_size import RUNS
    from faceclip_zoo.cli import main

    assert main(["bench", "--only", "real-size", "--size", "tiny", "--device", "cpu", "--steps", "3",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "real-size" / "results.json").read_text())
    assert [r["recipe"] for r in results] == [f"recipes/{name}.yaml" for name in RUNS]
    for r in results:
        assert r["rc"] == 0 and r["steps"] == 3 and r["loss_finite"], r
        assert len(r["step_seconds"]) == 2 and r["flops_per_step"] > 0  # step 2's FLOPs counted, not timed
        assert r["load_as_recipe"]["params"] == r["params_total"] and r["peak_anon"] > 0
        assert r["trained_tensors_changed"] > 0 and r["frozen_tensors_changed"] == 0, r
        assert r["params_trained"] < r["params_total"] and r["peak_rss"] >= r["rss_after_load"] > 0
        assert all(str(tmp_path) in p for p in r["paths"].values()), r["paths"]
        # nothing else of the model section changed but the tiny configs and the CPU's float32
        changed = {k for k in r["overrides"] if k.startswith("model.")}
        assert changed <= {"model.init_args.unet", "model.init_args.vae", "model.init_args.encoder",
                           "model.init_args.clip", "model.init_args.transformer", "model.init_args.base_dtype",
                           "model.init_args.frozen_dtype"}, changed
    # prepare's batched detector and cache on the run's device (here the CPU)
    rates = json.loads((tmp_path / "real-size" / "data.json").read_text())
    assert [p["batch"] for p in rates["prepare"]] == [1, 4]
    assert all(p["accepted"] == p["photos"] == 4 and p["photos_per_second"] > 0 for p in rates["prepare"])
    assert rates["cache"]["cached"] == 4 and rates["cache"]["samples_per_second"] > 0
