"""The whole face input path conditions as the release does: a release-aligned 448 crop,
given to the pipeline in any form, reaches the encoders as the release's own float 448
tensor would (resized inside by its bilinear interpolation); training shards decode the
same input; the SDXL pipeline's default negative text is the release's."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_FACES
from faceclip_zoo.bench.release_reference import (
    official_state_from_ours, randomised_branch_state, release_branch_forward,
)
from faceclip_zoo.config import FaceCLIPConfig, diffusers_config
from faceclip_zoo.models.clip import build_text_tower, build_tokenizer
from faceclip_zoo.models.diffusers_models import build_diffusers
from faceclip_zoo.models.faceclip import FaceCLIPEncoder
from faceclip_zoo.models.sdxl_condition import SDXLCondition
from faceclip_zoo.pipelines.components import FaceCLIPEncoderModel
from faceclip_zoo.pipelines.defaults import SDXL_NEGATIVE_PROMPT
from faceclip_zoo.pipelines.components import build_scheduler
from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

PROMPT = "A woman wearing a blue denim shirt and khaki pants, on a rocky desert plateau."
CONFIGS = (FaceCLIPConfig.from_name("faceclip-tiny"),
           FaceCLIPConfig.from_name("faceclip-tiny", name="faceclip-tiny-g", text_width=96, text_heads=4,
                                    text_embed_dim=96, text_layers=3, fusion_layers=3))


@pytest.fixture(scope="module")
def crop_448(tmp_path_factory):
    """A release-aligned 448 crop as a PNG file: one of the release's own assets when the
    shared test faces are beside the repository, else skimage's astronaut aligned by
    `align_face` (the same template)."""
    path = tmp_path_factory.mktemp("face") / "aligned.png"
    assets = sorted(SHARED_FACES.glob("*.png")) if SHARED_FACES.is_dir() else []
    if assets:
        Image.open(assets[0]).convert("RGB").save(path)
    else:
        from skimage import data

        from faceclip_zoo.data.align import align_face

        Image.fromarray(align_face(data.astronaut()).crop).save(path)
    assert Image.open(path).size == (448, 448)
    return path


@pytest.fixture(scope="module")
def release_pipe():
    """A tiny FaceCLIPSDXLPipeline whose branches hold release-layout weights with every
    path active, plus those weights in the release's own key names."""
    branches, official = [], []
    for i, cfg in enumerate(CONFIGS):
        state = randomised_branch_state(cfg, seed=i)
        enc = FaceCLIPEncoder(cfg).eval()
        enc.load_state_dict(state)
        branches.append(enc)
        official.append(official_state_from_ours(state, cfg.width))
    torch.manual_seed(0)
    pipe = FaceCLIPSDXLPipeline(
        vae=build_diffusers(diffusers_config("vae-tiny")).eval(),
        face_encoder=FaceCLIPEncoderModel.from_encoder(branches[0]),
        face_encoder_2=FaceCLIPEncoderModel.from_encoder(branches[1]),
        unet=build_diffusers(diffusers_config("sdxl-unet-tiny")).eval(),
        scheduler=build_scheduler(diffusers_config("sdxl-scheduler")))
    pipe.set_progress_bar_config(disable=True)
    return pipe, official


def _release_embeds(official, faces, texts):
    """The release's computation for both branches -> (prompt_embeds, pooled)."""
    outs = []
    for cfg, sd in zip(CONFIGS, official):
        tower = build_text_tower(cfg.text).transformer
        tower.load_state_dict({k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")})
        outs.append(release_branch_forward(sd, cfg, tower.eval(), build_tokenizer(cfg.text), faces,
                                           [True] * len(texts), texts))
    return torch.cat([outs[0][0], outs[1][0]], -1), outs[1][1]


def test_every_face_input_form_conditions_as_the_release(release_pipe, crop_448):
    pipe, official = release_pipe
    pil = Image.open(crop_448).convert("RGB")
    uint8 = np.asarray(pil)
    as_tensor = torch.from_numpy(uint8.copy()).permute(2, 0, 1).float() / 255  # the release's ToTensor()
    cond = SDXLCondition(pipe.face_encoder.encoder, pipe.face_encoder_2.encoder)
    with torch.no_grad():
        direct = cond([PROMPT], as_tensor[None], torch.tensor([True]))  # the encoder resizes the 448 crop
        release = _release_embeds(official, as_tensor[None], [PROMPT])
    assert (direct[0] - release[0]).abs().max().item() < 1e-4
    assert (direct[1] - release[1]).abs().max().item() < 1e-4
    for form in (crop_448, str(crop_448), pil, uint8, as_tensor):
        embeds = pipe.embed_request(PROMPT, form, None, align="auto")
        assert (embeds["prompt_embeds"] - direct[0]).abs().max().item() < 1e-5, type(form)
        assert (embeds["pooled_prompt_embeds"] - direct[1]).abs().max().item() < 1e-5, type(form)


def test_the_old_antialiased_resize_would_not_match(release_pipe, crop_448):
    """The check above can fail: the 112 px input PIL's antialiased bicubic makes (what the
    pipeline fed before) conditions measurably differently from the release."""
    pipe, _ = release_pipe
    pil = Image.open(crop_448).convert("RGB")
    as_tensor = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255
    bicubic = torch.from_numpy(np.asarray(pil.resize((112, 112), Image.BICUBIC)).copy()).permute(2, 0, 1) / 255.0
    cond = SDXLCondition(pipe.face_encoder.encoder, pipe.face_encoder_2.encoder)
    with torch.no_grad():
        good = cond([PROMPT], as_tensor[None], torch.tensor([True]))[0]
        old = cond([PROMPT], bicubic.float()[None], torch.tensor([True]))[0]
    assert (good - old).abs().max().item() > 1e-4


def test_shards_decode_the_reference_as_the_release_resizes_it(crop_448):
    """Training and `cache` read references through decode_sample: the face they give the
    encoder equals the release's interpolation of the stored 448 crop, and the pipeline's."""
    from faceclip_zoo.data.schema import decode_sample, make_sample
    from faceclip_zoo.models.face_vit import to_face_input
    from faceclip_zoo.pipelines.faces import load_face

    pil = Image.open(crop_448).convert("RGB")
    raw = make_sample("k", Image.new("RGB", (64, 64)), "a caption", reference=crop_448.read_bytes())
    face = decode_sample(raw, image_size=64, face_size=112)["face"]
    release = to_face_input((torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255)[None], 112)[0]
    assert torch.equal(face, release)
    assert torch.equal(load_face(crop_448, 112), release)
    # a face_size of the crop's own size hands the encoder the full crop (resized inside)
    full = decode_sample(raw, image_size=64, face_size=448)["face"]
    assert full.shape == (3, 448, 448) and torch.equal(to_face_input(full[None], 112)[0], release)


def test_sdxl_default_negative_prompt_is_the_release_one(release_pipe, monkeypatch):
    pipe, _ = release_pipe
    assert pipe.default_negative_prompt == SDXL_NEGATIVE_PROMPT
    # the literal text of the release's SDXL inference script
    assert SDXL_NEGATIVE_PROMPT == (
        "nude, worst quality, low quality, normal quality, nsfw, abstract, glitch, deformed, "
        "mutated, ugly, disfigured, text, watermark, bad hands, error, jpeg artifacts, blurry, "
        "missing fingers, poorly drawn face, ugly eyes, imperfect eyes, deformed pupils, deformed iris, bad anatomy")
    face = torch.rand(3, 448, 448, generator=torch.Generator().manual_seed(0))
    seen = {}

    class Capture:
        def __call__(self, **kwargs):
            seen.update(kwargs)
            raise StopIteration

    monkeypatch.setattr(pipe, "diffusers_pipeline", lambda: Capture())
    cond = SDXLCondition(pipe.face_encoder.encoder, pipe.face_encoder_2.encoder)
    for negative in (None, ""):
        with pytest.raises(StopIteration):
            pipe(PROMPT, face_image=face, negative_prompt=negative)
        want = cond.unconditional([SDXL_NEGATIVE_PROMPT if negative is None else negative], "cpu")
        assert torch.equal(seen["negative_prompt_embeds"], want[0])
        assert torch.equal(seen["negative_pooled_prompt_embeds"], want[1])
    assert not torch.equal(cond.unconditional([""], "cpu")[0], cond.unconditional([SDXL_NEGATIVE_PROMPT], "cpu")[0])
    # and the generate command leaves the default to the pipeline
    import inspect

    from faceclip_zoo.generate import generate

    assert inspect.signature(generate).parameters["negative_prompt"].default is None
