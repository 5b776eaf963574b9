"""`evaluate`: metrics checked against known values, the benchmark run end to end on a
quickstart-shaped pipeline (resume, seeding, report), and the encoder evaluation."""

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from faceclip_zoo.config import CLIPConfig, FaceCLIPConfig, FaceViTConfig
from faceclip_zoo.evaluation.benchmark import image_path, score
from faceclip_zoo.evaluation.models import ClipModel, build_fid
from faceclip_zoo.evaluation.spec import load_spec
from faceclip_zoo.models.clip import build_clip
from faceclip_zoo.models.face_vit import FaceViT
from faceclip_zoo.models.faceclip import FaceCLIPEncoder
from faceclip_zoo.models.io import save_model_dir
from faceclip_zoo.utils import UserError, redirect_loggers
from conftest import linear_arcface

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
PROMPT = "a photo of a person wearing a red shirt, in front of a blue background, lit from the front"


@pytest.fixture(scope="module")
def face_photos(tmp_path_factory) -> list[Path]:
    """Two real face photos: the aligned faces beside the repository (shared/data/faces)
    when that folder is there, else skimage's astronaut and her mirror image (scikit-image
    ships the photo), so the test runs wherever the repository is cloned."""
    shared = sorted(FACES.glob("*.png"))
    if len(shared) >= 2:
        return shared[:2]
    from skimage import data

    folder = tmp_path_factory.mktemp("faces")
    photo = Image.fromarray(data.astronaut())
    paths = [folder / "astronaut.png", folder / "astronaut_mirrored.png"]
    photo.save(paths[0])
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths[1])
    return paths


def write_spec(folder: Path, **spec) -> Path:
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def coloured(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    noise = rng.integers(-30, 30, size=(size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def zoo_clip(tmp_path_factory):
    torch.manual_seed(0)
    cfg = CLIPConfig.from_name("clip-tiny")
    model = build_clip(cfg).eval()
    return model, save_model_dir(model, tmp_path_factory.mktemp("clip") / "clip", config=cfg)


def test_face_sim_of_an_image_with_itself_is_one_and_a_missing_face_counts(tmp_path, face_photos):
    photos = face_photos
    torch.manual_seed(0)
    face_vit = save_model_dir(FaceViT(FaceViTConfig.from_name("face-vit-tiny")).eval(), tmp_path / "vit")
    linear_arcface(tmp_path / "arcface.onnx")
    for model in (f"face-vit:{face_vit}", f"onnx:{tmp_path / 'arcface.onnx'}"):
        pairs = [{"reference": str(p), "prompt": PROMPT, "identity": p.stem} for p in photos]
        pairs.append({"reference": str(photos[0]), "prompt": "nobody here", "identity": photos[0].stem})
        spec = load_spec(write_spec(tmp_path, pairs=pairs, face_sim={"model": model, "locator": "detect"}))
        out = tmp_path / "out"
        jobs = spec.jobs()
        for job in jobs[:2]:  # the "generated" image is the reference photo itself
            image_path(out, job).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(job.references[0], image_path(out, job))
        Image.new("RGB", (256, 256), (128, 128, 128)).save(image_path(out, jobs[2]))
        metrics, records = score(spec, out)
        assert [r["face_found"] for r in records] == [True, True, False]
        assert records[0]["face_sim"] == pytest.approx(1.0, abs=1e-5)
        assert records[1]["face_sim"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["faces_missing"] == 1
        assert metrics["face_sim"] == pytest.approx(2 / 3, abs=1e-5)  # the missing face counts as 0
        assert metrics["face_sim_detected"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["identity_top1"] == pytest.approx(2 / 3)
        shutil.rmtree(out)


def test_clip_t_matches_a_direct_open_clip_computation(tmp_path, zoo_clip):
    model, clip_dir = zoo_clip
    # the same weights under an open_clip architecture name, read from a local file
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32,
                                           "patch_size": 8, "mlp_ratio": 2.0},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (tmp_path / "zoo-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "zoo-test-tiny.json")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    prompts = [PROMPT, "a photo of a person in a green hat", "a cat"]
    images = [coloured(i) for i in range(3)]
    preprocess = open_clip.image_transform(64, is_train=False)
    tok = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        txt = F.normalize(model.encode_text(tok(prompts)), dim=-1)
    direct = (img * txt).sum(-1)
    for spec in (f"zoo:{clip_dir}", f"open_clip:zoo-test-tiny:{tmp_path / 'weights.pt'}"):
        clip = ClipModel(spec)
        ours = (clip.image_features(images) * clip.text_features(prompts)).sum(-1)
        torch.testing.assert_close(ours, direct, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="open_clip has no model"):
        ClipModel(f"open_clip:no-such-arch:{tmp_path / 'weights.pt'}")


def _random_inception_weights(path: Path) -> None:
    """torch-fidelity's FID Inception-v3 with random weights, as a local weights file (the
    real one cannot be downloaded here; the loading path is the same)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    load, load_state = torch.load, FeatureExtractorInceptionV3.load_state_dict
    torch.load = lambda *a, **k: {}
    FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    finally:
        torch.load, FeatureExtractorInceptionV3.load_state_dict = load, load_state
    with torch.no_grad():  # He scale: at PyTorch's default init the eval-mode features are constant
        for p in net.parameters():
            if p.ndim == 4:
                p.mul_(6 ** 0.5)
    torch.save(net.state_dict(), path)


def test_fid_of_a_set_with_itself_is_zero(tmp_path, zoo_clip):
    weights = tmp_path / "pt_inception.pth"
    _random_inception_weights(weights)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (1, 3, 64, 64), generator=g, dtype=torch.uint8) for _ in range(12)]
    others = [torch.randint(0, 128, (1, 3, 64, 64), generator=g, dtype=torch.uint8) for _ in range(12)]
    clip = ClipModel(f"zoo:{zoo_clip[1]}")
    for features in (f"inception:{weights}", "clip"):
        metric, name = build_fid(features, clip)
        for im in images:
            metric.update(im, real=True)
            metric.update(im, real=False)
        same = float(metric.compute())
        metric.reset()
        for im in others:
            metric.update(im, real=False)
        different = float(metric.compute())
        assert abs(same) < 1e-2 * max(1.0, different), (name, same, different)
        assert different > 100 * max(abs(same), 1e-6), (name, same, different)
    with pytest.raises(UserError, match="needs its weights file"):
        build_fid("inception")


def test_bad_specs_are_clear_errors(tmp_path, face_photos):
    with pytest.raises(UserError, match=r"unknown key\(s\) \['promts'\]"):
        load_spec(write_spec(tmp_path, promts=["x"]))
    with pytest.raises(UserError, match="reference of identity 'ann' missing.png not found"):
        load_spec(write_spec(tmp_path, identities={"ann": "missing.png"}, prompts=["x"]))
    with pytest.raises(UserError, match=r"face_sim: unknown key\(s\) \['modle'\]"):
        load_spec(write_spec(tmp_path, pairs=[{"reference": str(face_photos[0]), "prompt": "x"}],
                             face_sim={"modle": "x"}))
    with pytest.raises(UserError, match="lists nothing to generate"):
        load_spec(write_spec(tmp_path, seed=1))


def test_evaluate_pipeline_writes_results_and_sheets_and_resumes(tmp_path, quickstart_sdxl_dir, zoo_clip, tiny_data):
    from faceclip_zoo.cli import main

    torch.manual_seed(0)
    face_vit = save_model_dir(FaceViT(FaceViTConfig.from_name("face-vit-tiny")).eval(), tmp_path / "vit")
    (tmp_path / "real").mkdir()
    identities = {}
    for i, sample in enumerate(tiny_data["val"][:6]):
        sample.scene.save(tmp_path / "real" / f"{i}.png")
        sample.crop.save(tmp_path / f"ref{i}.png")
        identities.setdefault(sample.identity, []).append(f"ref{i}.png")
    bench = write_spec(tmp_path, identities=identities, prompts=[PROMPT, "a photo of a person in a hat"],
                       images_per_prompt=2, batch_size=3, generation={"steps": 2, "align": "never"},
                       face_sim={"model": f"face-vit:{face_vit}", "locator": "synthetic-scene"},
                       clip_t={"model": f"zoo:{zoo_clip[1]}"},
                       fid={"reference_dir": "real", "features": "clip"})
    out = tmp_path / "eval"
    assert main(["evaluate", "--pipeline", str(quickstart_sdxl_dir), "--benchmark", str(bench), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    n = len(identities) * 2 * 2
    assert results["generation"]["images"] == n and results["generation"]["generated_now"] == n
    m = results["metrics"]
    assert m["faces_missing"] == 0 and -1 <= m["face_sim"] <= 1 and -1 <= m["clip_t"] <= 1
    assert np.isfinite(m["fid"]) and m["fid_features"].startswith("clip")
    records = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert len(records) == n
    assert m["clip_t"] == pytest.approx(np.mean([r["clip_t"] for r in records]))
    # standard errors over the images, and each image's identity hit behind identity top-1
    assert m["clip_t_se"] == pytest.approx(np.std([r["clip_t"] for r in records], ddof=1) / np.sqrt(n))
    assert m["face_sim_se"] == pytest.approx(np.std([r["face_sim"] for r in records], ddof=1) / np.sqrt(n))
    hits = [float(r["identity_hit"]) for r in records]
    assert m["identity_top1"] == pytest.approx(np.mean(hits))
    assert m["identity_top1_se"] == pytest.approx(np.std(hits, ddof=1) / np.sqrt(n))
    for name in identities:
        sheet = Image.open(out / "sheets" / f"{name}.png")
        assert sheet.width > sheet.height  # reference + 4 generations in one row
    assert f"| Face Sim | {m['face_sim']:.4f} +- {m['face_sim_se']:.4f} |" in (out / "results.md").read_text()

    # resume: a lost image is generated again, identical (seeded by what it shows, batched differently)
    victim = out / records[3]["image"]
    before = np.array(Image.open(victim))
    victim.unlink()
    assert main(["evaluate", "--pipeline", str(quickstart_sdxl_dir), "--benchmark", str(bench), "--out", str(out),
                 "--batch_size", "1"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["generation"]["generated_now"] == 1 and again["generation"]["already_there"] == n - 1
    np.testing.assert_array_equal(np.array(Image.open(victim)), before)
    # other generation settings into the same folder are refused
    spec = yaml.safe_load(bench.read_text())
    spec["generation"]["steps"] = 3
    bench.write_text(yaml.safe_dump(spec))
    assert main(["evaluate", "--pipeline", str(quickstart_sdxl_dir), "--benchmark", str(bench), "--out", str(out)]) == 2

    # the same pipeline folder retrained in place: its old images are not reused
    from safetensors.torch import load_file, save_file

    from faceclip_zoo.evaluation.run import evaluate_pipeline

    retrained = tmp_path / "retrained"
    shutil.copytree(quickstart_sdxl_dir, retrained)
    spec["generation"]["steps"] = 2
    bench.write_text(yaml.safe_dump(spec))
    assert main(["evaluate", "--pipeline", str(retrained), "--benchmark", str(bench), "--out",
                 str(tmp_path / "again")]) == 0
    unet = retrained / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(unet)
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, unet)
    with pytest.raises(UserError, match="weights_sha256"):
        evaluate_pipeline(str(retrained), str(bench), tmp_path / "again")

    # the no-identity control: the same prompts and seeds with the face input zeroed
    spec["generation"].update(steps=2, face="zeroed")
    bench.write_text(yaml.safe_dump(spec))
    assert main(["evaluate", "--pipeline", str(quickstart_sdxl_dir), "--benchmark", str(bench), "--out",
                 str(tmp_path / "zeroed")]) == 0
    zeroed = json.loads((tmp_path / "zeroed" / "generation.json").read_text())
    assert zeroed["generation"]["face"] == "zeroed" and "face" not in json.loads((out / "generation.json").read_text())
    first = np.array(Image.open(tmp_path / "zeroed" / records[0]["image"]), dtype=np.float32)
    assert np.abs(first - np.array(Image.open(out / records[0]["image"]), dtype=np.float32)).mean() > 0.5  # face off


def test_encoder_zero_shot_follows_the_papers_protocol(tmp_path, zoo_clip, tiny_data):
    from faceclip_zoo.evaluation.encoder import evaluate_encoder, load_encoder

    torch.manual_seed(0)
    enc_dir = save_model_dir(FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny")).eval(), tmp_path / "enc")
    classes = ["red_apple", "blue_sky", "green_grass"]
    for c, name in enumerate(classes):
        (tmp_path / "zs" / name).mkdir(parents=True)
        for k in range(3):
            coloured(10 * c + k).save(tmp_path / "zs" / name / f"{k}.png")
    for sample in tiny_data["val"]:
        folder = tmp_path / "faces" / sample.identity
        folder.mkdir(parents=True, exist_ok=True)
        sample.crop.save(folder / f"{len(list(folder.iterdir()))}.png")
    res = evaluate_encoder(str(enc_dir), tmp_path / "out", f"zoo:{zoo_clip[1]}", str(tmp_path / "zs"),
                           str(tmp_path / "faces"), templates=["a photo of a {}.", "a {}."])
    zs = res["zero_shot"]
    assert zs["classes"] == 3 and zs["images"] == 9
    # the same classification by hand: class prompts with a black face -> text_projection
    enc = load_encoder(enc_dir).encoder
    clip = ClipModel(f"zoo:{zoo_clip[1]}")
    with torch.no_grad():
        w = []
        for t in ("a photo of a {}.", "a {}."):
            out = enc.encode([t.format(c.replace("_", " ")) for c in classes])  # no face
            w.append(F.normalize(out.pooled @ enc.text_projection, dim=-1))
        w = F.normalize(torch.stack(w).mean(0), dim=-1)
    images = [Image.open(tmp_path / "zs" / c / f"{k}.png") for c in classes for k in range(3)]
    pred = (clip.image_features(images) @ w.T).argmax(1)
    expected = (pred == torch.arange(3).repeat_interleave(3)).float().mean().item()
    assert zs["faceclip"]["top1"] == pytest.approx(expected)
    ident = res["identity_structure"]
    assert ident["identities"] == len({s.identity for s in tiny_data["val"]})
    assert (tmp_path / "out" / "tsne_identity.png").stat().st_size > 5_000
    assert json.loads((tmp_path / "out" / "encoder_results.json").read_text())["zero_shot"] == zs


def test_clip_t_with_a_transformers_clip_folder(tmp_path):
    """transformers:<dir>: CLIPModel + tokenizer + image processor from local files. The
    tokenizer files are built from the BPE vocabulary open_clip ships (the same 49408 tokens)."""
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    bpe = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (tmp_path / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert len(tokenizer) == 49408
    assert tokenizer(PROMPT).input_ids == [49406, *bpe.encode(PROMPT), 49407]
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = CLIPModel(HFCLIPConfig(text_config={**small, "vocab_size": 49408, "max_position_embeddings": 77},
                                   vision_config={**small, "image_size": 32, "patch_size": 8},
                                   projection_dim=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path / "hf-clip"
    for part in (model, tokenizer, processor):
        part.save_pretrained(folder)
    prompts, images = [PROMPT, "a cat"], [coloured(1), coloured(2, size=48)]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
        txt = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt"))
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    direct = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    clip = ClipModel(f"transformers:{folder}")
    torch.testing.assert_close((clip.image_features(images) * clip.text_features(prompts)).sum(-1), direct)


def test_synthetic_benchmark_scores_ceilings_generations_and_the_no_face_control(tmp_path, quickstart_sdxl_dir, tiny_shards):
    from faceclip_zoo.cli import main
    from faceclip_zoo.evaluation.synthetic_benchmark import identity_scores, load_validation_samples
    from faceclip_zoo.models.face_vit import FaceViTIdentity

    torch.manual_seed(0)
    vit = FaceViT(FaceViTConfig.from_name("face-vit-tiny")).eval()
    face_vit = save_model_dir(vit, tmp_path / "vit")
    out = tmp_path / "eval"
    assert main(["evaluate", "--pipeline", str(quickstart_sdxl_dir), "--benchmark", "synthetic", "--out", str(out),
                 "--synthetic_val", str(tiny_shards / "val"), "--face_id", str(face_vit), "--steps", "2",
                 "--images_per_sample", "2"]) == 0
    report = json.loads((out / "results.json").read_text())
    samples = load_validation_samples(str(tiny_shards / "val"))
    assert report["held_out_samples"] == len(samples) == 12 and report["identities"] == 3
    results = report["results"]
    assert list(results) == ["real", "vae_round_trip", "generated", "generated_no_face"]
    for name, r in results.items():
        assert r["images"] == len(samples) * (2 if name.startswith("generated") else 1)
        for key in ("identity_top1", "face_sim", "identity_margin", "background_accuracy"):
            assert 0 <= r[f"{key}_se"] < 1 and abs(r[key]) <= 1
        assert r["chance_top1"] == pytest.approx(1 / 3) and r["chance_background"] == pytest.approx(0.1)
    gen = results["generated"]
    assert 0 < gen["face_sim_gain_se"] < 1 and abs(gen["face_sim_gain"]) <= 2
    # the paired gain is the difference of the two sets' Face Sim means (same images, same order)
    assert gen["face_sim_gain"] == pytest.approx(gen["face_sim"] - results["generated_no_face"]["face_sim"], abs=1e-6)
    assert "Face Sim gain" in (out / "results.md").read_text()
    # the real scenes' numbers are the direct computation
    direct = identity_scores(FaceViTIdentity(vit), torch.stack([s["image"] for s in samples]),
                             [s["identity"] for s in samples],
                             _mean_references(FaceViTIdentity(vit), samples))
    assert results["real"]["identity_top1"] == pytest.approx(direct["identity_top1"])
    assert results["real"]["face_sim"] == pytest.approx(direct["face_sim"], abs=1e-6)
    # every real scene names its background: the ceiling of the colour check
    assert results["real"]["background_accuracy"] > 0.8
    assert (out / "results.md").read_text().count("| real |") == 1
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 4 * 64 and sheet.height > 3 * 64  # 4 columns, one row per identity


def _mean_references(face_id, samples):
    with torch.no_grad():
        emb = F.normalize(face_id(torch.stack([s["face"] for s in samples])).float(), dim=-1)
    names = sorted({s["identity"] for s in samples})
    return {n: F.normalize(emb[[i for i, s in enumerate(samples) if s["identity"] == n]].mean(0), dim=-1)
            for n in names}


def test_identity_oracle_trains_only_its_token_map_and_is_scored_from_its_checkpoint(tmp_path, tiny_shards):
    """The diagnosis's oracle: fit through the CLI (the SDXL task with the face-ID vector as
    an extra token), the frozen branches and face ViT unchanged, the token map trained, no
    export; `evaluate --benchmark synthetic` scores it straight from its fit checkpoint."""
    from faceclip_zoo.cli import main
    from faceclip_zoo.evaluation.oracle import OracleSDXLModule
    from faceclip_zoo.evaluation.synthetic_benchmark import pipeline_of_fit_checkpoint

    torch.manual_seed(0)
    encoder_dir = save_model_dir(FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny")).eval(), tmp_path / "enc")
    face_vit = save_model_dir(FaceViT(FaceViTConfig.from_name("face-vit-tiny")).eval(), tmp_path / "vit")
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes/quickstart/oracle-sdxl.yaml").read_text())
    root = str(tmp_path / "run")
    recipe["trainer"].update(max_steps=3, val_check_interval=3, log_every_n_steps=1, default_root_dir=root,
                             limit_val_batches=1)
    redirect_loggers(recipe["trainer"], root)
    recipe["model"]["init_args"].update(face_id=str(face_vit), encoder_l=str(encoder_dir), encoder_g=str(encoder_dir),
                                        vae_weights=None, num_samples=2, sample_steps=2, warmup_steps=1)
    recipe["data"] = {"class_path": "faceclip_zoo.data.ShardDataModule", "init_args": {
        "train": str(tiny_shards / "train"), "val": str(tiny_shards / "val"), "batch_size": 4, "num_workers": 0,
        "image_size": 64, "face_size": 112}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--config", str(tmp_path / "recipe.yaml")]) == 0
    ckpt = next(Path(root).rglob("last.ckpt"))
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["faceclip_zoo"]["exports"] == {}  # nothing to export
    fresh = OracleSDXLModule(face_id=str(face_vit), encoder_l=str(encoder_dir), encoder_g=str(encoder_dir))
    fresh.load_pretrained_weights()
    before = fresh.state_dict()
    after = state["state_dict"]
    for name, value in before.items():
        if name.startswith(("condition.base.", "condition.face_id.")):
            assert torch.equal(after[name], value), name  # frozen
    assert not torch.equal(after["condition.proj.weight"], before["condition.proj.weight"])  # trained
    pipe = pipeline_of_fit_checkpoint(str(ckpt))
    faces = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = pipe.encode_rows(faces, [PROMPT] * 2, "", torch.device("cpu"))
        zero = pipe.encode_rows(None, [PROMPT] * 2, "", torch.device("cpu"))
    assert emb["prompt_embeds"].shape[1] == 78  # the caption's 77 tokens + the identity token
    assert torch.equal(emb["prompt_embeds"][:, :77], zero["prompt_embeds"][:, :77])  # no face in the caption part
    assert not torch.allclose(emb["prompt_embeds"][0, 77], emb["prompt_embeds"][1, 77])
    out = tmp_path / "eval"
    assert main(["evaluate", "--pipeline", str(ckpt), "--benchmark", "synthetic", "--out", str(out),
                 "--synthetic_val", str(tiny_shards / "val"), "--face_id", str(face_vit), "--steps", "1"]) == 0
    assert json.loads((out / "results.json").read_text())["results"]["generated"]["images"] == 12


def test_probes_read_identity_from_the_condition_and_the_loss_gap_by_timestep(tmp_path, quickstart_sdxl_dir,
                                                                              tiny_shards):
    from faceclip_zoo.cli import main
    from faceclip_zoo.synthetic.faces import render, sample_identity, sample_variation
    from faceclip_zoo.evaluation.probes import TIMESTEPS, head_mask, identity_in_embeddings

    # the head's box, in latent pixels, is where a rendered scene differs from its background
    rng = np.random.default_rng(0)
    ident, var = sample_identity(rng), sample_variation(rng, max_angle=0)
    var.background, var.light, var.exposure = "green", "front", 1.0
    scene = np.asarray(render(ident, var, 64, 64 / 112 * 0.8), dtype=np.float32)
    is_bg = (np.abs(scene - np.array([40, 160, 60], dtype=np.float32)).sum(-1) < 30).reshape(16, 4, 16, 4)
    bg_share = torch.from_numpy(is_bg.mean((1, 3)))
    mask = head_mask(64, 4, 0.8).bool()
    assert 40 < mask.sum() < 160 and bg_share[mask].mean() < 0.25 and bg_share[:4][~mask[:4]].mean() > 0.9

    # the identity probe: a ridge map fitted on training identities reads held-out ones from
    # what embed() returns; an identity is a vector the face crop carries in its first row
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 3 * 40, generator=gen)

    class Stub:
        def embed(self, batch, drop, no_face):
            ident = batch["face"][:, 0, 0, :8]
            e = (ident @ mix) * (~no_face).float()[:, None] + 0.05 * torch.randn(len(ident), 120, generator=gen)
            return e.view(-1, 3, 40), None

    def world(prefix, count):
        vectors = F.normalize(torch.randn(count, 8, generator=gen), dim=-1)
        out = []
        for i in range(count * 4):
            face = torch.zeros(3, 8, 8)
            face[:, 0, :8] = vectors[i % count] + 0.05 * torch.randn(8, generator=gen)
            out.append({"key": f"{prefix}{i}", "identity": f"{prefix}{i % count}", "caption": "x", "face": face,
                        "image": torch.zeros(3, 8, 8), "has_face": True})
        return out

    got = identity_in_embeddings(Stub(), lambda faces: faces[:, 0, 0, :8], world("train", 40), world("held", 10))
    assert got["chance"] == 0.1 and got["train_samples"] == 160
    assert got["identity_top1_face"] > 0.9 and got["identity_top1_face_zeroed"] < 0.4, got

    out = tmp_path / "eval"
    assert main(["evaluate", "--pipeline", str(quickstart_sdxl_dir), "--benchmark", "synthetic", "--out", str(out),
                 "--synthetic_val", str(tiny_shards / "val"), "--steps", "2", "--probes", "true",
                 "--face_id", str(save_model_dir(FaceViT(FaceViTConfig.from_name("face-vit-tiny")), tmp_path / "v"))]) == 0
    probes = json.loads((out / "results.json").read_text())["probes"]
    rows = probes["loss_by_timestep"]
    assert [r["timestep"] for r in rows] == list(TIMESTEPS)
    for r in rows:
        assert r["head_gap"] == pytest.approx(r["head_zeroed"] - r["head_face"], abs=1e-6) and r["head_gap_se"] > 0
        assert r["head_face"] > 0 and r["image_face"] > 0
    assert 0 <= probes["identity_in_embeddings"]["identity_top1_face"] <= 1
    assert probes["identity_in_embeddings"]["train_samples"] > 0
    assert set(probes["linear_generator"]) == {"face", "face_zeroed"}
    held_out = json.loads((out / "results.json").read_text())["results"]["generated"]["images"]
    assert probes["linear_generator"]["face"]["images"] == held_out and "A linear map" in (out / "results.md").read_text()
    assert "| 999 |" in (out / "results.md").read_text()


def test_linear_generator_draws_what_the_condition_determines():
    """The linear-generator probe: a ridge map from the condition to the latents, decoded and
    scored. In a world where the condition carries the face's colour (with the face) and the
    background word, its held-out images show both; with the face zeroed, the background only."""
    from types import SimpleNamespace

    from faceclip_zoo.evaluation.synthetic_benchmark import image_scores, reference_vectors
    from faceclip_zoo.synthetic.faces import BACKGROUNDS
    from faceclip_zoo.evaluation.probes import linear_generator

    gen = torch.Generator().manual_seed(0)
    names = list(BACKGROUNDS)
    palette = {n: torch.tensor(BACKGROUNDS[n], dtype=torch.float32) / 255 for n in names}

    def world(prefix, count, per=4):
        colours = torch.rand(count, 3, generator=gen)
        out = []
        for i in range(count * per):
            bg = names[int(torch.randint(len(names), (1,), generator=gen))]
            image = palette[bg][:, None, None].expand(3, 16, 16).clone()
            image[:, 5:14, 4:12] = colours[i % count][:, None, None]  # the "face"
            out.append({"key": f"{prefix}{i}", "identity": f"{prefix}{i % count}", "has_face": True,
                        "caption": f"a photo of a person in front of a {bg} background", "image": image,
                        "face": colours[i % count][:, None, None].expand(3, 112, 112).clone()})
        return out

    def embed(batch, drop, no_face):
        bg = torch.stack([palette[c.split(" a ")[-1].split()[0]] for c in batch["caption"]])
        face = batch["face"][:, :, 0, 0] * (~no_face).float()[:, None]
        return torch.stack([face, bg], dim=1), torch.zeros(len(bg), 3)

    vae = SimpleNamespace(dtype=torch.float32, decode=lambda z: SimpleNamespace(sample=z * 2 - 1))
    module = SimpleNamespace(embed=embed, encode_latents=lambda batch, generator: batch["image"], vae=vae,
                             latent_scale=(1.0, 0.0), device=torch.device("cpu"))
    judge = lambda crops: crops[:, :, 40:72, 40:72].mean((2, 3)) - 0.5  # noqa: E731 (the face's colour)
    held = world("held", 10)
    images = linear_generator(module, world("train", 40), held)
    assert images["face"].shape == (40, 3, 16, 16)
    got = {name: image_scores(judge, x, held, reference_vectors(judge, held)) for name, x in images.items()}
    assert got["face"]["identity_top1"] > 0.9 and got["face"]["background_accuracy"] > 0.9, got
    assert got["face_zeroed"]["identity_top1"] < 0.4 and got["face_zeroed"]["background_accuracy"] > 0.9, got
