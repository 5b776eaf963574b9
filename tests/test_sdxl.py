"""The SDXL stage: conditioning, training options, the pipeline against diffusers' own
SDXL pipeline, save/load, and fit -> export -> generate through the command line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from huggingface_hub import ModelCard

from conftest import sdxl_branches, sdxl_recipe

from faceclip_zoo.config import diffusers_config
from faceclip_zoo.models.diffusers_models import build_diffusers
from faceclip_zoo.models.io import save_model_dir
from faceclip_zoo.models.sdxl_condition import SDXLCondition
from faceclip_zoo.pipelines.components import FaceCLIPEncoderModel
from faceclip_zoo.pipelines.components import build_scheduler
from faceclip_zoo.pipelines.export import load_pipeline, save_pipeline
from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline
from faceclip_zoo.tasks.sdxl import SDXLJointModule
from faceclip_zoo.utils import UserError

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a person wearing a red shirt, in front of a blue background, lit from the front"


@pytest.fixture(scope="module")
def pipe():
    l, g = sdxl_branches()
    torch.manual_seed(1)
    p = FaceCLIPSDXLPipeline(
        vae=build_diffusers(diffusers_config("vae-tiny")).eval(),
        face_encoder=FaceCLIPEncoderModel.from_encoder(l), face_encoder_2=FaceCLIPEncoderModel.from_encoder(g),
        unet=build_diffusers(diffusers_config("sdxl-unet-tiny")).eval(),
        scheduler=build_scheduler(diffusers_config("sdxl-scheduler")))
    p.set_progress_bar_config(disable=True)
    return p


def batch(b=4, has_face=(True, True, False, True)):
    g = torch.Generator().manual_seed(3)
    return {"image": torch.rand(b, 3, 64, 64, generator=g), "face": torch.rand(b, 3, 112, 112, generator=g),
            "has_face": torch.tensor(has_face), "caption": [PROMPT] * b}


def test_condition_is_concat_of_branches_and_g_pooled():
    l, g = sdxl_branches()
    cond = SDXLCondition(l, g)
    faces = torch.rand(2, 3, 112, 112)
    has = torch.tensor([True, False])
    with torch.no_grad():
        embeds, pooled = cond([PROMPT] * 2, faces, has)
        out_l = l(faces, l.tokenize([PROMPT] * 2, has.tolist()), has)
        out_g = g(faces, g.tokenize([PROMPT] * 2, has.tolist()), has)
        uncond = cond.unconditional([PROMPT], "cpu")
    assert embeds.shape == (2, 77, 128) and pooled.shape == (2, 64)
    torch.testing.assert_close(embeds, torch.cat([out_l.embeds, out_g.embeds], -1))
    torch.testing.assert_close(pooled, out_g.pooled)
    # a row without a face is the unconditional branch (zero face, no prefix)
    torch.testing.assert_close(embeds[1:], uncond[0], atol=1e-6, rtol=0)


def test_pipeline_equals_diffusers_sdxl_given_our_embeddings(pipe):
    # 8-bit values: the pipeline takes images (a tensor is read as an 8-bit picture)
    face = (torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(5)) * 255).round() / 255
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="pt")
    ours = pipe(PROMPT, face_image=face, negative_prompt="blurry",
                generator=torch.Generator().manual_seed(7), **kw).images
    # The embeddings as docs/design.md, "The released FaceCLIP encoder for SDXL" defines them,
    # computed without the pipeline.
    cond = SDXLCondition(pipe.face_encoder.encoder, pipe.face_encoder_2.encoder)
    with torch.no_grad():
        pos = cond([PROMPT], face[None], torch.tensor([True]))
        neg = cond(["blurry"], torch.zeros(1, 3, 112, 112), torch.tensor([False]))
    sdxl = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=pipe.unet,
                                     scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config),
                                     add_watermarker=False)
    sdxl.set_progress_bar_config(disable=True)
    theirs = sdxl(prompt_embeds=pos[0], pooled_prompt_embeds=pos[1], negative_prompt_embeds=neg[0],
                  negative_pooled_prompt_embeds=neg[1], generator=torch.Generator().manual_seed(7), **kw).images
    assert (ours - theirs).abs().max().item() < 1e-5
    # and the face matters: another face gives another image
    other = pipe(PROMPT, face_image=torch.zeros(3, 112, 112) + 0.5,
                 generator=torch.Generator().manual_seed(7), **kw).images
    assert (ours - other).abs().max().item() > 1e-3


def test_pipeline_inputs_and_multi_reference(pipe, tmp_path):
    from PIL import Image

    kw = dict(num_inference_steps=2, height=64, width=64, output_type="pt", align="never")
    arr = (torch.rand(112, 112, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(arr).save(tmp_path / "face.png")
    by_path = pipe(PROMPT, face_image=tmp_path / "face.png", generator=torch.Generator().manual_seed(0), **kw).images
    by_array = pipe(PROMPT, face_image=arr, generator=torch.Generator().manual_seed(0), **kw).images
    twice = pipe(PROMPT, face_image=[arr, Image.fromarray(arr)], generator=torch.Generator().manual_seed(0),
                 **kw).images
    assert (by_path - by_array).abs().max() < 1e-6
    assert (by_path - twice).abs().max() < 1e-5  # averaging identical references changes nothing
    with pytest.raises(UserError, match="does not exist"):
        pipe(PROMPT, face_image=tmp_path / "missing.png", **kw)


def test_photos_are_aligned_automatically_and_faceless_photos_refused(pipe, tmp_path):
    from PIL import Image
    from skimage import data

    from faceclip_zoo.data.align import align_face

    photo = data.astronaut()
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    crop = align_face(str(tmp_path / "photo.jpg")).crop
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="pt")
    run = lambda face, align=None: pipe(PROMPT, face_image=face, generator=torch.Generator().manual_seed(0),  # noqa
                                        align=align, **kw).images
    by_crop = run(crop, "never")
    assert (run(tmp_path / "photo.jpg") - by_crop).abs().max() < 1e-6  # the photo was aligned
    assert (run(crop) - by_crop).abs().max() < 1e-6  # an aligned crop is kept as it is
    assert (run(photo, "never") - by_crop).abs().max() > 1e-3  # unaligned, it is another condition
    with pytest.raises(UserError, match="no face found in .*wall.png.*align='never'"):
        Image.new("RGB", (300, 200), (90, 90, 90)).save(tmp_path / "wall.png")
        run(tmp_path / "wall.png")


def test_pipeline_save_load_round_trip(pipe, tmp_path):
    save_pipeline(pipe, tmp_path / "pipe", recipe="# recipe\n")
    assert (tmp_path / "pipe" / "face_encoder" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "pipe").rglob("*.bin"))  # no pickles
    loaded = load_pipeline(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    kw = dict(face_image=torch.full((3, 112, 112), 0.3), num_inference_steps=3, height=64, width=64,
              output_type="pt")
    a = pipe(PROMPT, generator=torch.Generator().manual_seed(2), **kw).images
    b = loaded(PROMPT, generator=torch.Generator().manual_seed(2), **kw).images
    assert (a - b).abs().max().item() < 1e-5
    with pytest.raises(UserError, match="model_index.json"):
        load_pipeline(tmp_path)


def test_the_stored_guidance_is_the_default(pipe, tmp_path):
    assert pipe.default_guidance == 5.0  # nothing stored (a converted release): the release's
    parts = {k: getattr(pipe, k) for k in ("vae", "face_encoder", "face_encoder_2", "unet", "scheduler")}
    save_pipeline(FaceCLIPSDXLPipeline(**parts, default_guidance_scale=2.0), tmp_path / "pipe")
    loaded = load_pipeline(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.default_guidance == 2.0

    def images(**guidance):
        return loaded(PROMPT, face_image=torch.full((3, 112, 112), 0.3), num_inference_steps=2, height=64,
                      width=64, output_type="pt", generator=torch.Generator().manual_seed(2), **guidance).images

    torch.testing.assert_close(images(), images(guidance_scale=2.0))
    assert (images() - images(guidance_scale=5.0)).abs().max().item() > 1e-4
    rows = dict(faces=torch.full((1, 3, 112, 112), 0.3), prompts=[PROMPT], num_inference_steps=2, height=64, width=64)
    torch.testing.assert_close(loaded.per_row(**rows, generator=torch.Generator().manual_seed(2)),
                               loaded.per_row(**rows, guidance_scale=2.0, generator=torch.Generator().manual_seed(2)))


def test_targets_dropout_snr_and_cached_inputs(monkeypatch):
    m = SDXLJointModule(prediction_type="v_prediction", snr_gamma=5.0, condition_dropout=0.5)
    m.setup("fit")
    assert m.noise_scheduler.config.prediction_type == "v_prediction"
    b = batch()
    # dropped rows get exactly the unconditional embedding
    drop = torch.tensor([True, False, False, True])
    with torch.no_grad():
        embeds, pooled = m.embed(b, drop)
        null_e, null_p = m.null_condition(1)
        full, _ = m.embed(b, torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(embeds[0], null_e[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(embeds[1], full[1])
    # face dropout zeroes the face and keeps the caption: row 1 becomes its face-free self
    no_face = torch.tensor([False, True, False, False])
    with torch.no_grad():
        faceless, _ = m.embed(b, torch.zeros(4, dtype=torch.bool), no_face)
        zeroed, _ = m.embed(dict(b, has_face=torch.zeros(4, dtype=torch.bool)), torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(faceless[1], zeroed[1])
    torch.testing.assert_close(faceless[0], full[0])
    assert not torch.allclose(faceless[1], full[1])
    # cached latents / encoder outputs are used as they are: no VAE, no encoder call
    cached = dict(b, vae_latents=torch.randn(4, 4, 16, 16), prompt_embeds=torch.randn(4, 77, 128),
                  pooled_prompt_embeds=torch.randn(4, 64))
    monkeypatch.setattr(m.vae, "encode", lambda *a, **k: pytest.fail("VAE called despite cached latents"))
    monkeypatch.setattr(m.condition, "forward", lambda *a, **k: pytest.fail("encoder called despite cache"))
    m.train()
    loss = m.diffusion_loss(cached)
    m.hparams.face_dropout = 1.0  # cached embeddings cannot lose their face: said, not ignored
    with pytest.raises(UserError, match="face_dropout"):
        m.diffusion_loss(cached)
    m.hparams.face_dropout = 0.0
    loss.backward()
    assert torch.isfinite(loss) and m.unet.conv_in.weight.grad is not None
    assert all(p.grad is None for p in m.condition.parameters())
    # micro-conditioning from the batch
    ids = m.time_ids(dict(cached, original_size=torch.tensor([[300, 200]] * 4),
                          crop_top_left=torch.tensor([[5, 0]] * 4)), cached["vae_latents"])
    assert ids[0].tolist() == [300, 200, 5, 0, 64, 64]


def test_min_snr_weights_match_formula():
    from diffusers.training_utils import compute_snr

    m = SDXLJointModule(snr_gamma=5.0, condition_dropout=0.0)
    t = torch.tensor([10, 500, 990])
    snr = compute_snr(m.noise_scheduler, t)
    assert snr[0] > 5 > snr[2]  # low t: high SNR gets clipped; high t: weight 1
    torch.testing.assert_close(torch.minimum(snr, torch.tensor(5.0)) / snr,
                               torch.stack([5 / snr[0], 5 / snr[1] if snr[1] > 5 else torch.tensor(1.0),
                                            torch.tensor(1.0)]))


def test_timestep_sampling_densities():
    n = 20000
    uniform = SDXLJointModule().sample_timesteps(n, torch.Generator().manual_seed(0))
    assert uniform.dtype == torch.long and 0 <= uniform.min() and uniform.max() <= 999
    torch.testing.assert_close(uniform, torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0)))
    mid = SDXLJointModule(timestep_sampling="logit_normal").sample_timesteps(n, torch.Generator().manual_seed(0))
    late = SDXLJointModule(timestep_sampling="logit_normal", logit_mean=1.0).sample_timesteps(
        n, torch.Generator().manual_seed(0))
    assert 0 <= mid.min() and late.max() <= 999
    # logit-normal(0, 1): 68 % of the steps within t 270..730 (uniform: 46 %); mean 1.0 moves them to higher noise
    inner = ((mid > 269) & (mid < 731)).float().mean()
    assert 0.58 < inner < 0.70 and abs(mid.float().mean() - 500) < 10, inner
    assert late.float().median() > 700 > mid.float().median()


def test_zero_terminal_snr_schedule_reaches_the_sampler():
    overrides = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    m = SDXLJointModule(prediction_type="v_prediction", scheduler_overrides=overrides)
    assert m.noise_scheduler.alphas_cumprod[-1] == 0
    sampler = build_scheduler(m.scheduler_config)
    assert sampler.config.rescale_betas_zero_snr and sampler.config.prediction_type == "v_prediction"
    torch.manual_seed(0)
    assert torch.isfinite(m.diffusion_loss(batch()))  # min-SNR weight at SNR 0 stays finite
    with pytest.raises(UserError, match="needs prediction_type: v_prediction"):
        SDXLJointModule(scheduler_overrides=overrides)


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="cross_attention_dim"):
        SDXLJointModule(unet_overrides={"cross_attention_dim": 96})
    with pytest.raises(UserError, match="neither a faceclip model directory"):
        SDXLJointModule(encoder_l=str(tmp_path / "nope"))
    # UNet weights made for other GroupNorm groups have the same shapes: the folder's config
    # says so, and the run refuses them instead of loading them into another architecture
    build_diffusers(diffusers_config("sdxl-unet-tiny")).save_pretrained(tmp_path / "base")
    SDXLJointModule(unet_weights=str(tmp_path / "base")).load_pretrained_weights()
    with pytest.raises(UserError, match="another architecture .norm_num_groups: 32 there, 8 here"):
        SDXLJointModule(unet_weights=str(tmp_path / "base"), unet_overrides={"norm_num_groups": 8}
                        ).load_pretrained_weights()


def test_fit_export_generate_resume(tmp_path, tiny_shards, tiny_data):
    from faceclip_zoo.cli import main

    encoder_dir = save_model_dir(sdxl_branches()[0], tmp_path / "encoder")
    recipe = sdxl_recipe(tmp_path, tiny_shards, encoder_dir)
    assert main(["fit", "--config", str(recipe)]) == 0
    run = tmp_path / "run"
    assert list(run.rglob("samples/step-*.png")), "no validation grid written"
    assert (tmp_path / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "pipeline" / "recipe.yaml").is_file()
    # TensorBoard beside the CSV: the sample grids as images, the losses as scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert {"samples"} <= set(events.Tags()["images"])
    assert len(events.Images("samples")) == 2  # validation at steps 2 and 4
    assert {"val/loss", "train/loss"} <= set(events.Tags()["scalars"])
    assert (run / "version_0" / "metrics.csv").is_file()
    # the export describes itself: a Hugging Face model card with the run's metrics and samples
    card = ModelCard.load(tmp_path / "pipeline" / "README.md")
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-to-image"
    assert card.data.library_name == "diffusers" and "faceclip" in card.data.tags
    assert "val/loss" in card.text and "load_pipeline" in card.text and "Base model: none" in card.text
    for line in card.text.splitlines():
        if line.startswith("![step-"):
            assert (tmp_path / "pipeline" / line.split("(")[1].rstrip(")")).is_file()
    assert "![step-" in card.text
    # export from the checkpoint (EMA weights) and generate through the command line
    ckpt = next(run.rglob("last.ckpt"))
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    # the recipe's validation guidance is the exported pipeline's default
    guidance = yaml.safe_load(recipe.read_text())["model"]["init_args"]["sample_guidance"]
    for folder in ("pipeline", "exported"):
        assert load_pipeline(tmp_path / folder).default_guidance == guidance
    tiny_data["val"][0].crop.save(tmp_path / "face.png")
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "generate", "--pipeline", str(tmp_path / "exported"),
                          "--face", str(tmp_path / "face.png"), "--face+", str(tmp_path / "face.png"),
                          "--align", "never", "--prompt", PROMPT, "--steps", "3",
                          "--num_images", "2", "--out", str(tmp_path / "out.png")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out-0.png").is_file() and (tmp_path / "out-1.png").is_file()
    # resume: the EMA state comes back with the checkpoint
    ckpt_state = torch.load(ckpt, weights_only=True, map_location="cpu")
    ema = ckpt_state["faceclip_zoo"]["ema"]
    assert ema["optimization_step"] == 4
    shipped = yaml.safe_load(recipe.read_text())["model"]["init_args"]  # the same UNet as the run's
    m = SDXLJointModule(encoder_l=str(encoder_dir), encoder_g=str(encoder_dir), ema_decay=0.99,
                        unet_overrides=shipped.get("unet_overrides"))
    m.on_load_checkpoint(ckpt_state)
    name, shadow = next(iter(ema["weights"].items()))
    assert m.ema.optimization_step == 4
    torch.testing.assert_close(m.ema.shadow_params[0], shadow)
    # no face in the generate command: clear error for a missing face file
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "generate", "--pipeline", str(tmp_path / "exported"),
                          "--face", str(tmp_path / "nobody.png"), "--prompt", "x", "--steps", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "nobody.png does not exist" in res.stderr
    # a synthetic face is no face to the detector: alignment says so, and how to skip it
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "generate", "--pipeline", str(tmp_path / "exported"),
                          "--face", str(tmp_path / "face.png"), "--prompt", "x", "--steps", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "no face found" in res.stderr and "--align never" in res.stderr
