"""The FLUX stage: flow-matching loss and timestep sampling, the pipeline against
diffusers' own FluxPipeline, save/load, and fit -> export -> generate on CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from faceclip_zoo.pipelines.export import load_pipeline
from faceclip_zoo.tasks.flux import FluxJointModule
from faceclip_zoo.utils import UserError
from conftest import quickstart_diffusion_recipe

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a person wearing a red shirt, in front of a blue background, lit from the front"


def batch(b=4, has_face=(True, True, False, True)):
    g = torch.Generator().manual_seed(3)
    return {"image": torch.rand(b, 3, 64, 64, generator=g), "face": torch.rand(b, 3, 112, 112, generator=g),
            "has_face": torch.tensor(has_face), "caption": [PROMPT] * b, "identity": list("abcd")[:b]}


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    m = FluxJointModule(condition_dropout=0.5)
    m.setup("fit")
    return m


@pytest.fixture(scope="module")
def pipe(module):
    p = module.pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_sigma_sampling_and_resolution_dependent_shift(module):
    g = torch.Generator().manual_seed(0)
    for scheme in ("logit_normal", "mode", "uniform"):
        module.hparams.timestep_sampling = scheme
        s = module.sample_sigmas(4096, 64, g)
        assert ((s > 0) & (s < 1)).all(), scheme
    module.hparams.timestep_sampling = "logit_normal"
    # FLUX's sampler shift for the same sequence length: sigma' = time_shift(mu, 1, sigma)
    sched = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in module.scheduler_config.items() if not k.startswith("_")})
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq in (64, 4096):
        u = torch.sigmoid(torch.randn(8, generator=torch.Generator().manual_seed(1)))
        ours = module.sample_sigmas(8, seq, torch.Generator().manual_seed(1))
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        torch.testing.assert_close(ours, sched.time_shift(mu, 1.0, u))
    # larger images are pushed towards noise
    big = module.sample_sigmas(4096, 4096, torch.Generator().manual_seed(2)).mean()
    small = module.sample_sigmas(4096, 64, torch.Generator().manual_seed(2)).mean()
    assert big > small + 0.05
    module.hparams.timestep_shift = 1.0  # a fixed shift of 1 = no shift
    u = torch.sigmoid(torch.randn(8, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(module.sample_sigmas(8, 4096, torch.Generator().manual_seed(1)), u)
    module.hparams.timestep_shift = None


def test_loss_trains_the_transformer_only_and_uses_caches(module, monkeypatch):
    m = module
    m.train()
    loss = m.diffusion_loss(batch())
    loss.backward()
    assert torch.isfinite(loss)
    assert m.transformer.x_embedder.weight.grad is not None
    assert all(p.grad is None for p in m.condition.parameters())
    m.zero_grad()
    # dropped rows get the unconditional embedding (zero face, empty prompt)
    drop = torch.tensor([True, False, False, True])
    with torch.no_grad():
        e, p = m.embed(batch(), drop)
        null_e, null_p = m.null_condition(1)
    torch.testing.assert_close(e[0], null_e[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(p[3], null_p[0], atol=1e-6, rtol=0)
    # the target is the velocity eps - z0: a perfect prediction gives zero loss
    cached = dict(batch(), vae_latents=torch.randn(4, 4, 16, 16), prompt_embeds=torch.randn(4, 32, 32),
                  pooled_prompt_embeds=torch.randn(4, 32))
    monkeypatch.setattr(m.vae, "encode", lambda *a, **k: pytest.fail("VAE called despite cached latents"))
    monkeypatch.setattr(m.condition, "forward", lambda *a, **k: pytest.fail("encoder called despite cache"))
    captured = {}
    real = m.transformer.forward

    def oracle(hidden_states, **kw):
        out = real(hidden_states, **kw)
        captured["shape"] = out.sample.shape
        return out

    monkeypatch.setattr(m.transformer, "forward", oracle)
    assert torch.isfinite(m.diffusion_loss(cached))
    assert captured["shape"] == (4, 64, 16)  # 16x16 latents packed 2x2: 64 tokens of 4 x 4 channels
    m.eval()


def test_pipeline_equals_diffusers_flux_given_our_embeddings(pipe):
    """Same transformer/VAE/scheduler/seed: our pipeline == FluxPipeline fed our
    embeddings, with true CFG against the zero-face negative branch."""
    face = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(5))
    kw = dict(num_inference_steps=3, height=64, width=64, output_type="pt", true_cfg_scale=3.5,
              guidance_scale=1.0)
    ours = pipe(PROMPT, face_image=face, negative_prompt="a blurry photo",
                generator=torch.Generator().manual_seed(0), **kw).images
    embeds = pipe.encode([PROMPT], ["a blurry photo"], face[None], torch.device("cpu"))
    ref_pipe = FluxPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=pipe.transformer)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(**embeds, generator=torch.Generator().manual_seed(0), **kw).images
    assert (ours - ref).abs().max().item() < 1e-5
    # true CFG is really on: without the negative branch the image changes
    plain = pipe(PROMPT, face_image=face, generator=torch.Generator().manual_seed(0),
                 **dict(kw, true_cfg_scale=1.0)).images
    assert (plain - ours).abs().max().item() > 1e-3


def test_pipeline_multi_reference_and_save_load(pipe, tmp_path):
    faces = [torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="pt")
    two = pipe(PROMPT, face_image=faces, generator=torch.Generator().manual_seed(0), **kw).images
    assert two.shape == (1, 3, 64, 64)
    pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    loaded = load_pipeline(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    again = loaded(PROMPT, face_image=faces, generator=torch.Generator().manual_seed(0), **kw).images
    assert (two - again).abs().max().item() < 1e-5
    with pytest.raises(UserError, match="negative prompts"):
        pipe([PROMPT, PROMPT], negative_prompt=["a", "b", "c"], **kw)


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(UserError, match="joint_attention_dim"):
        FluxJointModule(transformer_overrides={"joint_attention_dim": 64})
    with pytest.raises(UserError, match="4 x vae latent_channels"):
        FluxJointModule(transformer_overrides={"in_channels": 8})
    with pytest.raises(UserError, match="neither a facet5 model directory"):
        FluxJointModule(encoder="/no/such/encoder")


def flux_recipe(tmp_path: Path, shards: Path, steps: int = 4) -> Path:
    return quickstart_diffusion_recipe(tmp_path, shards, "flux", {"encoder": "facet5-tiny"}, steps)


def test_fit_export_generate_resume(tmp_path, tiny_shards, tiny_data):
    from faceclip_zoo.cli import main

    assert main(["fit", "--config", str(flux_recipe(tmp_path, tiny_shards))]) == 0
    run = tmp_path / "run"
    assert list(run.rglob("samples/step-*.png")), "no validation grid written"
    assert (tmp_path / "pipeline" / "model_index.json").is_file()
    ckpt = next(run.rglob("last.ckpt"))
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "recipe.yaml").is_file()
    tiny_data["val"][0].crop.save(tmp_path / "face.png")
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "generate", "--pipeline", str(tmp_path / "exported"),
                          "--face", str(tmp_path / "face.png"), "--align", "never", "--prompt", PROMPT,
                          "--steps", "3", "--height", "64", "--width", "64", "--out", str(tmp_path / "out.png")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    from PIL import Image

    assert Image.open(tmp_path / "out.png").size == (64, 64)
    # the exported pipeline's transformer is the EMA one, which resume restores
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    ema = state["faceclip_zoo"]["ema"]
    assert ema["optimization_step"] == 4
    shipped = yaml.safe_load((REPO / "recipes" / "quickstart" / "flux.yaml").read_text())["model"]["init_args"]
    m = FluxJointModule(ema_decay=0.99, transformer_overrides=shipped.get("transformer_overrides"))
    m.on_load_checkpoint(state)
    torch.testing.assert_close(m.ema.shadow_params[0], next(iter(ema["weights"].values())))
    exported = load_pipeline(tmp_path / "exported")
    name = next(iter(ema["weights"]))
    torch.testing.assert_close(dict(exported.transformer.named_parameters())[name], ema["weights"][name])
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "generate", "--pipeline", str(tmp_path / "exported"),
                          "--prompt", "x", "--distilled_guidance", "2", "--steps", "1", "--height", "64",
                          "--width", "64", "--out", str(tmp_path / "noface.png")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
