"""The diffusion stages' identity loss: its settings, the face region (a differentiable
norm_crop from prepare's landmarks, carried through decoding), the clean latent each family
implies, and that the loss reaches the trained weights (full and LoRA) and lowers itself."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from PIL import Image

from faceclip_zoo.data.align import arcface_template
from faceclip_zoo.data.datamodule import collate
from faceclip_zoo.data.schema import decode_sample, make_sample
from faceclip_zoo.models.adapters import LoraSettings
from faceclip_zoo.tasks.flux import clean_latents
from faceclip_zoo.config import FaceViTConfig
from faceclip_zoo.models.face_vit import FaceViT
from faceclip_zoo.tasks.identity_loss import (
    IdentityLossSettings, face_region, identity_loss, identity_rows, jitter_matrices,
)
from faceclip_zoo.tasks.sdxl import SDXLJointModule
from faceclip_zoo.utils import UserError

PROMPT = "a photo of a person wearing a red shirt, in front of a blue background, lit from the front"


def batch(b=4, has_face=(True, True, False, True)):
    g = torch.Generator().manual_seed(3)
    return {"image": torch.rand(b, 3, 64, 64, generator=g), "face": torch.rand(b, 3, 112, 112, generator=g),
            "has_face": torch.tensor(has_face), "caption": [PROMPT] * b}


def test_settings_are_checked():
    for bad in (dict(fraction=0), dict(max_noise=1.5), dict(weight=-1), dict(region="face"),
                dict(region=[0.5, 0, 0.4, 1]), dict(region=[0, 0, 1])):
        with pytest.raises(UserError, match="identity_loss"):
            IdentityLossSettings(**bad)
    assert IdentityLossSettings(region=[0, 0.1, 1, 0.9]).region == [0.0, 0.1, 1.0, 0.9]
    with pytest.raises(UserError, match="face ViT model directory"):
        SDXLJointModule(identity_loss=IdentityLossSettings(network="/nowhere")).identity_network


def test_landmark_region_is_norm_crop():
    """The differentiable crop from landmarks equals insightface's norm_crop (cv2) of the
    same photo: a smooth image, a face turned by 20 degrees and shifted."""
    from insightface.utils.face_align import norm_crop

    h, w = 96, 128
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([np.sin(xx / 7.0), np.cos(yy / 5.0), np.sin((xx + yy) / 9.0)], -1) * 0.5 + 0.5
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    marks = (arcface_template(112) - 56) * 0.6 @ rot.T + [70, 45]
    with warnings.catch_warnings():  # scikit-image 0.26 deprecates the call insightface makes
        warnings.simplefilter("ignore", FutureWarning)
        expected = norm_crop((img * 255).astype(np.uint8), marks.astype(np.float32), image_size=112) / 255.0
    got = face_region(torch.from_numpy(img).permute(2, 0, 1)[None].float(), "landmarks", 112,
                      torch.from_numpy(marks)[None].float())[0].permute(1, 2, 0).numpy()
    inside = (slice(8, -8), slice(8, -8))  # borders: cv2 pads with 0, grid_sample with 0 at half-pixel offsets
    assert np.abs(got[inside] - expected[inside]).mean() < 0.01
    unturned = face_region(torch.from_numpy(img).permute(2, 0, 1)[None].float(), "landmarks", 112,
                           torch.from_numpy((arcface_template(112) - 56) * 0.6 + [70, 45])[None].float())
    assert np.abs(unturned[0].permute(1, 2, 0).numpy()[inside] - expected[inside]).mean() > 0.05


def test_landmarks_follow_the_image_through_decoding():
    """A dot drawn at a landmark of the original photo lands at the decoded landmark after
    the stored copy's resize and the training crop."""
    original = (300, 200)  # (h, w) of the photo prepare read
    stored = Image.new("RGB", (100, 150), "black")  # prepare's max_image_side copy: half size
    marks = [[60.0, 100.0], [140.0, 100.0], [100.0, 150.0], [70.0, 200.0], [130.0, 200.0]]
    x, y = marks[3]
    stored.paste((255, 255, 255), (int(x / 2) - 1, int(y / 2) - 1, int(x / 2) + 2, int(y / 2) + 2))
    raw = make_sample("k", stored, PROMPT, reference=Image.new("RGB", (112, 112)), identity="p",
                      meta={"original_size": list(original), "landmarks": marks})
    raw = {("json" if k == "json" else k): v for k, v in raw.items()}
    sample = decode_sample(raw, image_size=64, face_size=112)
    found = sample["face_landmarks"][3]
    bright = sample["image"][0]
    py, px = divmod(int(bright.argmax()), bright.shape[1])
    assert abs(found[0] - (px + 0.5)) < 1.5 and abs(found[1] - (py + 0.5)) < 1.5
    # rows without landmarks (guided pairs, the synthetic world) collate as NaN
    plain = decode_sample(make_sample("j", stored, PROMPT), image_size=64, face_size=112)
    rows = collate([sample, plain])["face_landmarks"]
    assert torch.isfinite(rows[0]).all() and torch.isnan(rows[1]).all()
    assert "face_landmarks" not in collate([plain, plain])


def test_rows_are_drawn_among_the_faces_that_reach_the_model():
    s = IdentityLossSettings(fraction=0.5)
    eligible = torch.tensor([True, True, False, True, True, False, True, True])
    for seed in range(5):
        rows = identity_rows({}, eligible, s, torch.Generator().manual_seed(seed))
        assert rows.sum() == 3 and not (rows & ~eligible).any()
    marks = torch.full((8, 5, 2), float("nan"))
    marks[1] = 10.0
    rows = identity_rows({"face_landmarks": marks}, eligible, IdentityLossSettings(fraction=1.0, region="landmarks"),
                         None)
    assert rows.tolist() == [False, True] + [False] * 6


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_sdxl_clean_latent_from_a_perfect_prediction(kind):
    m = SDXLJointModule(prediction_type=kind)
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 200, 600])
    noisy = m.noise_scheduler.add_noise(z0, eps, t)
    target = eps if kind == "epsilon" else m.noise_scheduler.get_velocity(z0, eps, t)
    torch.testing.assert_close(m.predicted_clean(noisy, target, t), z0, atol=2e-4, rtol=1e-4)


def test_flux_clean_latent_from_a_perfect_prediction():
    z0, eps = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    sigmas = torch.tensor([0.1, 0.7])
    s = sigmas[:, None, None, None]
    packed = FluxPipeline._pack_latents(eps - z0, 2, 4, 16, 16)
    torch.testing.assert_close(clean_latents((1 - s) * z0 + s * eps, packed, sigmas, 4), z0, atol=1e-5, rtol=1e-5)


def _sdxl(**kw):
    torch.manual_seed(0)
    m = SDXLJointModule(prediction_type="v_prediction", condition_dropout=0.0, **kw)
    m.setup("fit")
    m.log = lambda *a, **k: None
    return m.train()


def test_the_loss_reaches_the_unet_and_lowers_itself():
    """With the diffusion loss weighted to nothing, a few steps on the identity loss alone
    pull the decoded faces towards their references (the face network and VAE frozen)."""
    m = _sdxl(identity_loss=IdentityLossSettings(weight=1.0, fraction=1.0, max_noise=0.2))
    terms = []
    real = type(m).add_identity_loss

    def spy(self, loss, b, rows, clean, generator=None):
        total = real(self, loss * 0, b, rows, clean, generator)
        terms.append(float(total.detach()))
        return total

    m.add_identity_loss = spy.__get__(m)
    opt = torch.optim.Adam([p for p in m.unet.parameters() if p.requires_grad], lr=3e-3)
    b = batch(has_face=(True, True, True, True))
    for step in range(12):
        opt.zero_grad()
        loss = m.diffusion_loss(b, torch.Generator().manual_seed(step % 2))
        loss.backward()
        if step == 0:
            assert m.unet.conv_out.weight.grad.abs().sum() > 0
            assert all(p.grad is None for p in m.vae.parameters()) and all(
                p.grad is None for p in m.condition.parameters())
        opt.step()
    assert len(terms) == 12 and 0 < terms[0] <= 2
    assert terms[-1] < terms[0] - 0.05 and terms[-2] < terms[1] - 0.05, terms


def test_lora_runs_take_it_and_dropped_rows_never_do():
    m = _sdxl(identity_loss=IdentityLossSettings(weight=1.0, fraction=1.0),
              lora=LoraSettings(rank=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    seen = []
    real = type(m).add_identity_loss
    m.add_identity_loss = (lambda self, loss, b, rows, clean, gen=None: seen.append(rows.clone()) or real(
        self, loss * 0, b, rows, clean, gen)).__get__(m)
    loss = m.diffusion_loss(batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert seen[0].tolist() == [True, True, False, True]  # the faceless row takes no part
    trained = [p for p in m.unet.parameters() if p.requires_grad]
    assert trained and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    # validation takes no identity rows (val/loss stays the diffusion loss, comparable across runs)
    m.eval()
    assert m.condition_masks(batch(), 4, None)[2] is None


@pytest.mark.parametrize("jitter", [0.0, 0.08])
@pytest.mark.parametrize("region", ["landmarks", [0.25, 0.1, 0.75, 0.6]])
def test_only_the_face_window_is_decoded_and_it_gives_the_same_crop(region, jitter):
    """Decoding each row's latent window around its face gives the crop that decoding the
    whole latent gives (a pointwise decoder: nearest upsampling by the VAE's factor)."""

    torch.manual_seed(0)
    network = FaceViT(FaceViTConfig.from_name("face-vit-tiny")).eval()
    down, latents = 4, torch.randn(2, 3, 32, 32).tanh()
    marks = torch.from_numpy(np.stack([(arcface_template(112) - 56) * 0.5 + c for c in ([60, 50], [70, 80])])).float()
    shapes = []

    def decode(z):
        shapes.append(tuple(z.shape[-2:]))
        return F.interpolate(z, scale_factor=down, mode="nearest")

    settings = IdentityLossSettings(region=region, jitter=jitter)
    faces = torch.rand(2, 3, 112, 112)
    windowed = identity_loss(decode, latents, faces, network, settings, down, landmarks=marks,
                             generator=torch.Generator().manual_seed(5))
    assert all(s[0] < 32 and s[1] < 32 for s in shapes), shapes  # windows, not the whole latent
    size = network.config.image_size
    moves = jitter_matrices(2, size, jitter, torch.Generator().manual_seed(5)) if jitter else None
    crops = face_region((decode(latents) + 1) / 2, region, size, marks, jitter=moves)
    with torch.no_grad():
        full = (1 - F.cosine_similarity(network(crops)[0], network(faces)[0], dim=-1)).mean()
    torch.testing.assert_close(windowed, full, atol=1e-5, rtol=1e-5)


def test_flux_takes_it_through_its_own_clean_latent():
    """FLUX: the identity rows' sigma is drawn low, their clean latent is the flow's
    z_s - s v, and the term's gradient reaches the transformer."""
    from faceclip_zoo.tasks.flux import FluxJointModule

    torch.manual_seed(0)
    m = FluxJointModule(condition_dropout=0.0, identity_loss=IdentityLossSettings(weight=1.0, fraction=0.5,
                                                                                  max_noise=0.2,
                                                                                  region=[0.1, 0.1, 0.9, 0.9]))
    m.setup("fit")
    m.log = lambda *a, **k: None
    m.train()
    seen = {}
    real_transformer = m.transformer.forward

    def transformer(**kw):
        seen["timestep"] = kw["timestep"].detach().clone()
        return real_transformer(**kw)

    m.transformer.forward = transformer
    real = type(m).add_identity_loss
    m.add_identity_loss = (lambda self, loss, b, rows, clean, gen=None: seen.update(rows=rows.clone()) or real(
        self, loss * 0, b, rows, clean, gen)).__get__(m)
    loss = m.diffusion_loss(batch(has_face=(True, True, True, True)), torch.Generator().manual_seed(0))
    loss.backward()
    rows = seen["rows"]
    assert int(rows.sum()) == 2 and (seen["timestep"][rows] < 0.2).all()
    assert m.transformer.proj_out.weight.grad.abs().sum() > 0


def test_jitter_moves_each_crop_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 3, 48, 48, generator=g)
    still = face_region(image, "image", 32, jitter=jitter_matrices(3, 32, 0.0, g))
    torch.testing.assert_close(still, face_region(image, [0, 0, 1, 1], 32))  # no jitter: the plain crop
    moved = face_region(image, "image", 32, jitter=jitter_matrices(3, 32, 0.1, torch.Generator().manual_seed(1)))
    again = face_region(image, "image", 32, jitter=jitter_matrices(3, 32, 0.1, torch.Generator().manual_seed(1)))
    torch.testing.assert_close(moved, again)  # drawn from the training generator: reproducible
    assert (moved - still).abs().mean() > 0.05
    with pytest.raises(UserError, match="jitter"):
        IdentityLossSettings(jitter=0.6)


def test_the_judge_can_never_train_the_model(tmp_path):
    """The identity loss reads a face ViT the training may read; evaluation's independent
    judge (a ResNet folder of its own kind) is refused as its network."""
    from faceclip_zoo.evaluation.judge import FaceJudge
    from faceclip_zoo.models.io import write_safetensors

    folder = tmp_path / "judge-resnet"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", FaceJudge().state_dict())
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic_face_judge"}))
    m = SDXLJointModule(identity_loss=IdentityLossSettings(network=str(folder)))
    with pytest.raises(UserError, match="synthetic_face_judge"):
        m.identity_network
