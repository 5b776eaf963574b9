"""The Wan stage: flow-matching loss on clips and images, the shifted noise levels, the
pipeline against diffusers' own WanPipeline, save/load, LoRA targets, the identity loss on
the first frame, and fit -> export -> generate an MP4 on CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UniPCMultistepScheduler, WanPipeline

from faceclip_zoo.pipelines.export import load_pipeline
from faceclip_zoo.tasks.wan import WanJointModule
from faceclip_zoo.utils import UserError
from conftest import quickstart_diffusion_recipe

PROMPT = "a person wearing a red shirt turns their head to the left, in front of a blue background"


def batch(b=4, frames=5, has_face=(True, True, False, True), size=32):
    g = torch.Generator().manual_seed(3)
    out = {"image": torch.rand(b, 3, size, size, generator=g), "face": torch.rand(b, 3, 112, 112, generator=g),
           "has_face": torch.tensor(has_face[:b]), "caption": [PROMPT] * b, "identity": list("abcd")[:b]}
    if frames:
        out["video"] = torch.rand(b, 3, frames, size, size, generator=g)
    return out


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    m = WanJointModule(condition_dropout=0.5, sample_frames=5, sample_height=32, sample_width=32)
    m.setup("fit")
    return m


@pytest.fixture(scope="module")
def pipe(module):
    p = module.pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_noise_levels_are_shifted_as_wans_sampler_shifts_them(module):
    assert module.hparams.timestep_sampling == "uniform" and module.hparams.vae == "wan-vae-tiny"
    u = torch.rand(4096, generator=torch.Generator().manual_seed(1))
    s = module.sample_sigmas(4096, torch.Generator().manual_seed(1))
    # Wan's flow shift 3.0 (the UniPC scheduler's flow_shift): sigma' = 3 u / (1 + 2 u)
    torch.testing.assert_close(s, 3 * u / (1 + 2 * u))
    assert s.mean() > u.mean() + 0.1  # pushed towards noise
    module.hparams.timestep_shift = 1.0
    torch.testing.assert_close(module.sample_sigmas(8, torch.Generator().manual_seed(1)), u[:8])
    module.hparams.timestep_shift = None
    # the sampler's own sigmas carry the same shift
    sched = UniPCMultistepScheduler.from_config({k: v for k, v in module.scheduler_config.items()
                                                 if not k.startswith("_")})
    sched.set_timesteps(10)
    lin = torch.linspace(1, 0, 11)[:-1]
    torch.testing.assert_close(torch.as_tensor(sched.sigmas[:-1]).float(), 3 * lin / (1 + 2 * lin), atol=2e-3, rtol=0)


def test_loss_on_clips_and_images_trains_the_transformer_only(module, monkeypatch):
    m = module
    m.train()
    loss = m.diffusion_loss(batch())
    loss.backward()
    assert torch.isfinite(loss)
    assert m.transformer.patch_embedding.weight.grad is not None
    assert all(p.grad is None for p in m.condition.parameters())
    assert all(p.grad is None for p in m.vae.parameters())
    m.zero_grad()
    captured = {}
    real = m.transformer.forward

    def spy(hidden_states, **kw):
        captured["shape"], captured["t"] = hidden_states.shape, kw["timestep"]
        return real(hidden_states, **kw)

    monkeypatch.setattr(m.transformer, "forward", spy)
    m.diffusion_loss(batch())
    # 5 frames -> 1 + 4 / 2 latent frames (the tiny VAE's x2 in time), 32 px -> 8 (x4)
    assert captured["shape"] == (4, 4, 3, 8, 8)
    assert ((captured["t"] > 0) & (captured["t"] < 1000)).all()  # Wan's timesteps: 1000 sigma
    m.diffusion_loss(batch(frames=0))  # an image is a one-frame clip
    assert captured["shape"] == (4, 4, 1, 8, 8)
    for frames in (4, 3):  # 3 = 1 + 2 fits the tiny VAE's x2 but not diffusers' chunks of 4
        with pytest.raises(UserError, match="1 \\+ 4k frames"):
            m.diffusion_loss(batch(frames=frames))
    # cached latents skip the VAE; a cache made for other clips is refused
    monkeypatch.setattr(m.vae, "encode", lambda *a, **k: pytest.fail("VAE called despite cached latents"))
    assert torch.isfinite(m.diffusion_loss(dict(batch(), vae_latents=torch.randn(4, 4, 3, 8, 8))))
    with pytest.raises(UserError, match="cached vae_latents"):
        m.diffusion_loss(dict(batch(), vae_latents=torch.randn(4, 4, 1, 8, 8)))
    m.eval()


def test_latents_are_normalised_per_channel_as_wans_pipeline_undoes_it(module, monkeypatch):
    """encode_latents' (z - mean) / std is what WanPipeline decodes with latents_std, latents_mean."""
    m = module
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.0, 3.0]
    monkeypatch.setitem(m.vae_config, "latents_mean", mean)
    monkeypatch.setitem(m.vae_config, "latents_std", std)
    video = batch(b=1)["video"]
    raw = m.vae.encode(video * 2 - 1).latent_dist.mode()
    monkeypatch.setattr(type(m.vae.encode(video).latent_dist), "sample", lambda self, generator=None: self.mode())
    z = m.encode_latents({"video": video})
    torch.testing.assert_close(z * torch.tensor(std).view(1, 4, 1, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1, 1),
                               raw, atol=1e-5, rtol=1e-5)


def test_pipeline_equals_diffusers_wan_given_our_embeddings(pipe):
    """Same transformer/VAE/scheduler/seed: our pipeline == WanPipeline fed our
    embeddings, with CFG against the zero-face negative branch."""
    face = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(5))
    kw = dict(num_inference_steps=3, height=32, width=32, num_frames=5, output_type="pt", guidance_scale=5.0)
    ours = pipe(PROMPT, face_image=face, negative_prompt="a blurry video",
                generator=torch.Generator().manual_seed(0), **kw).frames
    assert ours.shape == (1, 5, 3, 32, 32)
    embeds = pipe.encode([PROMPT], ["a blurry video"], face[None], torch.device("cpu"))
    ref_pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=pipe.vae, scheduler=pipe.scheduler,
                           transformer=pipe.transformer)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(prompt_embeds=embeds["prompt_embeds"], negative_prompt_embeds=embeds["negative_prompt_embeds"],
                   generator=torch.Generator().manual_seed(0), **kw).frames
    assert (ours - ref).abs().max().item() < 1e-5
    plain = pipe(PROMPT, face_image=face, generator=torch.Generator().manual_seed(0),
                 **dict(kw, guidance_scale=1.0)).frames
    assert (plain - ours).abs().max().item() > 1e-3  # guidance is really on


def test_pipeline_defaults_rows_save_load(pipe, tmp_path):
    assert pipe.default_video() == {"height": 32, "width": 32, "num_frames": 5}  # the recipe's sample_*
    faces = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    rows = pipe.per_row(faces, [PROMPT, "a person smiling"], num_inference_steps=2,
                        generator=torch.Generator().manual_seed(0))
    assert rows.shape == (2, 5, 3, 32, 32) and 0 <= rows.min() and rows.max() <= 1
    two = pipe(PROMPT, face_image=list(faces), num_inference_steps=2, num_images_per_prompt=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).frames
    assert two.shape == (2, 5, 3, 32, 32)
    pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    loaded = load_pipeline(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.default_video() == pipe.default_video()
    again = loaded(PROMPT, face_image=list(faces), num_inference_steps=2, num_images_per_prompt=2, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).frames
    assert (two - again).abs().max().item() < 1e-5


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(UserError, match="text_dim"):
        WanJointModule(transformer_overrides={"text_dim": 64})
    with pytest.raises(UserError, match="z_dim"):
        WanJointModule(transformer_overrides={"in_channels": 8, "out_channels": 8})
    with pytest.raises(UserError, match="causal video VAE"):
        WanJointModule(vae="vae-tiny")


def test_lora_adapts_attention_and_feed_forward_of_every_block():
    torch.manual_seed(0)
    m = WanJointModule(lora={"rank": 2})
    m.setup("fit")
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    for block in range(2):
        for layer in ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "ffn.net.0.proj", "ffn.net.2"):
            assert any(f"blocks.{block}.{layer}.lora_A" in n for n in trained), (block, layer)
    assert all("lora_" in n for n in trained)
    m.train()
    loss = m.diffusion_loss(batch())
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad and "lora_B" in n)


def test_identity_loss_reads_the_first_frame():
    torch.manual_seed(0)
    m = WanJointModule(condition_dropout=0.0, identity_loss={"weight": 1.0, "fraction": 1.0})
    m.setup("fit")
    m.train()
    decoded = []
    real = m.decode_for_identity
    m.decode_for_identity = lambda z: decoded.append(z.shape) or real(z)
    loss = m.diffusion_loss(batch(size=64))
    loss.backward()
    assert decoded == [(3, 4, 16, 16)]  # the 3 rows with a face, their first latent frame
    assert m.transformer.proj_out.weight.grad is not None


def wan_recipe(tmp_path: Path, shards: Path, steps: int = 4) -> Path:
    """The FLUX quickstart's run shape with the Wan task: images train as one-frame clips."""
    path = quickstart_diffusion_recipe(tmp_path, shards, "flux", {}, steps)
    recipe = yaml.safe_load(path.read_text())
    recipe["model"] = {"class_path": "faceclip_zoo.tasks.WanJointModule", "init_args": {
        "encoder": "facet5-umt5-tiny", "transformer": "wan-transformer-tiny", "ema_decay": 0.99,
        "num_samples": 2, "sample_steps": 2, "sample_frames": 5, "sample_height": 64, "sample_width": 64,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_fit_export_generate_mp4(tmp_path, tiny_shards, tiny_data):
    from faceclip_zoo.cli import main
    from faceclip_zoo.data.video import read_frames

    assert main(["fit", "--config", str(wan_recipe(tmp_path, tiny_shards))]) == 0
    run = tmp_path / "run"
    grids = list(run.rglob("samples/step-*.png"))
    assert grids, "no validation grid written"
    from PIL import Image

    width, height = Image.open(grids[0]).size
    assert width == 112 * (2 + 5) and height % 112 == 0  # rows of [face | target | 5 frames], face-sized tiles
    ckpt = next(run.rglob("last.ckpt"))
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "recipe.yaml").is_file()
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "pipeline_tag: text-to-video" in card and "--out out.mp4" in card and ".frames[0]" in card
    tiny_data["val"][0].crop.save(tmp_path / "face.png")
    out = tmp_path / "clip.mp4"
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "generate", "--pipeline", str(tmp_path / "exported"),
                          "--face", str(tmp_path / "face.png"), "--align", "never", "--prompt", PROMPT,
                          "--steps", "2", "--frames", "9", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    frames, fps = read_frames(out)
    assert len(frames) == 9 and frames[0].size == (64, 64) and fps == 16
    preview = Image.open(out.with_suffix(".gif"))
    assert preview.n_frames == 9
    # an image name for a video pipeline is refused before anything loads
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "generate", "--pipeline", str(tmp_path / "exported"),
                          "--prompt", "x", "--out", str(tmp_path / "x.png")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0 and "name an .mp4 file" in res.stderr


def test_clips_are_scored_per_frame_under_the_protocol(tmp_path, monkeypatch):
    """`evaluate --benchmark synthetic` on a Wan pipeline: the test worlds rendered as clips
    like its training world, identity per frame and its consistency across frames, the
    caption's attributes read on the frames (the light at the start and at the end)."""
    import json

    from faceclip_zoo.cli import main
    from faceclip_zoo.evaluation import attributes, judge as judge_module
    from faceclip_zoo.evaluation.attributes import CLIP_ATTRIBUTES, ReaderConfig
    from faceclip_zoo.evaluation.judge import JudgeConfig
    from faceclip_zoo.config import FaceViTConfig
    from faceclip_zoo.models.face_vit import FaceViT
    from faceclip_zoo.models.io import save_model_dir
    from faceclip_zoo.pipelines.export import save_pipeline

    # small judge and reader; a saved one is read back with its own settings (**saved)
    monkeypatch.setattr(judge_module, "JudgeConfig",
                        lambda **saved: JudgeConfig(**{**dict(people=12, held_out=4, steps=20, batch_size=16), **saved}))
    monkeypatch.setattr(attributes, "ReaderConfig",
                        lambda **saved: ReaderConfig(**{**dict(steps=10, batch_size=16, width=8), **saved}))
    monkeypatch.setattr("faceclip_zoo.evaluation.protocol.TEST_PEOPLE", 2)
    torch.manual_seed(0)
    pipe = WanJointModule(sample_frames=5, sample_height=64, sample_width=64).pipeline()
    recipe = {"data": {"class_path": "faceclip_zoo.synthetic.SyntheticIdentities",
                       "init_args": {"clip_frames": 5, "samples_per_identity": 2}}}
    save_pipeline(pipe, tmp_path / "wan", recipe=yaml.safe_dump(recipe))
    face_vit = save_model_dir(FaceViT(FaceViTConfig.from_name("face-vit-tiny")).eval(), tmp_path / "vit")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval"
    assert main(["evaluate", "--pipeline", str(tmp_path / "wan"), "--benchmark", "synthetic", "--out", str(out),
                 "--face_id", str(face_vit), "--steps", "2"]) == 0
    report = json.loads((out / "results.json").read_text())
    for world in report["worlds"].values():
        for name in ("generated", "generated_no_face", "real", "vae_round_trip"):
            scores = world[name]["judges"]["independent judge"]
            assert scores["images"] == 2 * 2 and 0 <= scores["identity_top1"] <= 1
            assert -1 <= scores["identity_consistency"] <= 1
            # top-1 frame by frame, whose mean is the reported top-1
            by_frame = scores["identity_top1_by_frame"]
            assert len(by_frame) == 5 and abs(sum(by_frame) / 5 - scores["identity_top1"]) < 1e-6
        # a real clip is one person throughout: its frames agree more than with other people
        assert world["real"]["judges"]["face-ID ViT"]["identity_consistency"] > 0.5
    attrs = report["mean"]["generated"]["attributes"]
    assert tuple(attrs) == CLIP_ATTRIBUTES
    text = (out / "results.md").read_text()
    assert "consistency |" in text and "| light at the end |" in text and "top-1 by frame" in text
    assert (out / "contact_sheet.png").stat().st_size > 1000

    # --synthetic_val: the same per-frame scoring on the training world's held-out split
    # (what configurations are chosen on), labelled as such
    from faceclip_zoo.synthetic.world import SyntheticSpec, generate, write_dataset

    spec = SyntheticSpec(train_identities=0, val_identities=3, samples_per_identity=2, guided_pairs=0, clip_frames=5)
    write_dataset(spec, generate(spec), tmp_path / "world", shard_size=10)
    assert main(["evaluate", "--pipeline", str(tmp_path / "wan"), "--benchmark", "synthetic", "--out",
                 str(tmp_path / "val-eval"), "--face_id", str(face_vit), "--steps", "2",
                 "--synthetic_val", str(tmp_path / "world" / "val")]) == 0
    report = json.loads((tmp_path / "val-eval" / "results.json").read_text())
    assert report["protocol"] == "validation world" and list(report["worlds"]) == ["validation"]
    scores = report["worlds"]["validation"]["generated"]["judges"]["independent judge"]
    assert scores["images"] == 3 * 2 and "identity_consistency" in scores
    assert report["people_per_world"] == 3
    assert (tmp_path / "val-eval" / "results.md").read_text().startswith("The validation world")


def test_a_clip_reader_reads_the_turn_on_the_last_frame():
    """The caption reader of a clip world learns the head's turn where the clip shows it (the
    last frame; the frontal first frame has no label) and the light where it starts and ends;
    mirroring the last frames flips what it reads."""
    from faceclip_zoo.evaluation.attributes import (
        CLIP_ATTRIBUTES, CLIP_READ, ReaderConfig, _examples, caption_attributes, train_reader,
    )
    from faceclip_zoo.synthetic.priors import _stack
    from faceclip_zoo.synthetic.world import SyntheticSpec, generate

    spec = SyntheticSpec(train_identities=36, val_identities=0, samples_per_identity=4, guided_pairs=0, seed=7,
                         clip_frames=5)
    records = generate(spec)["train"]
    images, labels = _examples(records[:3], CLIP_READ)
    assert images == [f for r in records[:3] for f in (r.frames[0], r.frames[-1])]
    truth = [caption_attributes(r.caption) for r in records[:3]]
    assert labels["turn"].tolist() == [x for t in truth for x in (-100, CLIP_READ["turn"].index(t["turn"]))]
    assert labels["light"].tolist() == [CLIP_READ["light"].index(t[k]) for t in truth
                                        for k in ("light at the start", "light at the end")]

    reader, scores = train_reader(records, ReaderConfig(steps=300, batch_size=32, width=8), seed=0)
    assert tuple(scores["held_out_accuracy"]) == CLIP_ATTRIBUTES
    held = records[len(records) * 5 // 6:]
    last = _stack([r.frames[-1] for r in held])
    turns = [caption_attributes(r.caption)["turn"] for r in held]
    read, mirrored = reader.read(last)["turn"], reader.read(last.flip(-1))["turn"]
    assert scores["held_out_accuracy"]["turn"] == pytest.approx(sum(a == t for a, t in zip(read, turns)) / len(held))
    assert scores["held_out_accuracy"]["turn"] >= 0.8
    assert sum(a != b for a, b in zip(read, mirrored)) / len(held) >= 0.8


def test_the_demo_shows_videos_as_animated_previews(module, tmp_path):
    import numpy as np
    from PIL import Image

    from faceclip_zoo.demo import DemoSession, Request
    from faceclip_zoo.pipelines.export import save_pipeline

    folder = save_pipeline(module.pipeline(), tmp_path / "wan")
    session = DemoSession(str(folder), device="cpu")
    assert session.kind == "Wan" and session.video and session.defaults()["size"] == 32
    crop = tmp_path / "crop.png"
    Image.fromarray(np.full((112, 112, 3), 128, np.uint8)).save(crop)
    crops, videos = session.generate([crop], Request(prompt=PROMPT, steps=1, aligned=True, num_images=2))
    assert len(crops) == 1 and len(videos) == 2
    preview = Image.open(videos[0])
    assert preview.format == "GIF" and preview.n_frames == 5 and preview.size == (32, 32)


def test_the_vae_folder_brings_its_latent_statistics(tmp_path):
    """A recipe names the VAE's architecture (`wan-vae-tiny`) and reads its weights from a
    trained folder: that folder's latents_mean / latents_std (measured after training) are the
    ones the latents are normalised with, and the ones the exported pipeline undoes."""
    from faceclip_zoo.config import diffusers_config
    from faceclip_zoo.models.diffusers_models import build_diffusers

    vae = build_diffusers(diffusers_config("wan-vae-tiny"))
    vae.register_to_config(latents_mean=[0.5, -0.25, 1.0, 0.0], latents_std=[2.0, 1.5, 0.5, 1.0])
    vae.save_pretrained(tmp_path / "vae")
    m = WanJointModule(vae_weights=str(tmp_path / "vae"))
    m.setup("fit")
    mean, std = m.latent_statistics()
    assert mean.flatten().tolist() == [0.5, -0.25, 1.0, 0.0] and std.flatten().tolist() == [2.0, 1.5, 0.5, 1.0]
    assert list(m.pipeline().vae.config.latents_std) == [2.0, 1.5, 0.5, 1.0]
