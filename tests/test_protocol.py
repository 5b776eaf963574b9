"""The identity protocol of `evaluate --benchmark synthetic`: test worlds no recipe trains
or validates on, an independent judge, the gallery without the image's own conditioning
crop, uncertainty over people."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from faceclip_zoo.evaluation.attributes import ATTRIBUTES, ReaderConfig, caption_attributes, majority_chance
from faceclip_zoo.evaluation.judge import JudgeConfig, train_judge, judge_world_spec
from faceclip_zoo.evaluation.protocol import (
    gallery_similarities, person_bootstrap, render_test_world, world_spec_of_recipe,
)
from faceclip_zoo.synthetic.world import RESERVED_SEEDS, TEST_WORLD_SEEDS, SyntheticSpec, generate
from faceclip_zoo.utils import UserError

from conftest import REPO

TINY_JUDGE = JudgeConfig(people=16, held_out=6, steps=60, batch_size=32)
TINY_READER = ReaderConfig(steps=20, batch_size=32, width=8)


def test_no_recipe_trains_or_validates_on_a_test_or_judge_world():
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    synthetic = [r for r in recipes if "SyntheticIdentities" in r.read_text()]
    assert len(synthetic) >= 5, synthetic
    for recipe in synthetic:
        seed = world_spec_of_recipe(yaml.safe_load(recipe.read_text())).seed
        assert seed not in RESERVED_SEEDS, recipe
    from faceclip_zoo.synthetic.datamodule import SyntheticIdentities

    with pytest.raises(UserError, match="reserved for the benchmark"):
        SyntheticIdentities(root="unused", seed=TEST_WORLD_SEEDS[0])


def test_test_worlds_hold_new_people_decoded_as_training_shards_are():
    like = SyntheticSpec(samples_per_identity=4)
    worlds = [render_test_world(like, seed, people=3) for seed in TEST_WORLD_SEEDS[:2]]
    val = generate(SyntheticSpec(train_identities=0, val_identities=3, samples_per_identity=4))["val"]
    for samples in worlds:
        assert len(samples) == 12 and samples[0]["image"].shape == (3, 64, 64) and samples[0]["face"].shape[-1] == 112
        assert samples[0]["has_face"] and samples[0]["caption"].startswith("a photo of")
    crops = [torch.stack([s["face"] for s in w]) for w in worlds]
    val_crops = torch.stack([torch.from_numpy(__import__("numpy").asarray(r.crop)).permute(2, 0, 1) / 255 for r in val])
    assert (crops[0][:, None] - crops[1][None]).abs().flatten(2).mean(-1).min() > 0.01  # other people
    assert (crops[0][:, None] - val_crops[None]).abs().flatten(2).mean(-1).min() > 0.01


def test_the_gallery_leaves_out_each_images_own_conditioning_crop():
    torch.manual_seed(0)
    refs = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    identities = ["a", "a", "b", "b", "c", "c"]
    # each generated face copies its own conditioning crop exactly
    sims, own = gallery_similarities(lambda x: x, refs.clone(), refs, identities)
    assert own.tolist() == [0, 0, 1, 1, 2, 2]
    # its own gallery is its person's other crop alone: the copy earns no credit
    for i, j in ((0, 1), (1, 0), (2, 3), (3, 2)):
        assert sims[i, own[i]] == pytest.approx((refs[i] @ refs[j]).item(), abs=1e-5)
    # other people's galleries hold all their crops
    mean_b = torch.nn.functional.normalize(refs[2] + refs[3], dim=-1)
    assert sims[0, 1] == pytest.approx((refs[0] @ mean_b).item(), abs=1e-5)


def test_the_uncertainty_counts_people_not_images():
    """8 images of a person are not 8 independent measurements: with values that only vary
    between people, the bootstrap over people gives the standard error of the person means."""
    torch.manual_seed(0)
    person_means = torch.rand(20)
    values = person_means.repeat_interleave(8)
    identities = [f"p{i}" for i in range(20) for _ in range(8)]
    se = person_bootstrap(values, identities, resamples=4000)
    expected = person_means.double().std() / 20 ** 0.5
    assert se == pytest.approx(expected.item(), rel=0.1)
    naive = values.double().std() / len(values) ** 0.5
    assert se > 2.5 * naive.item()


def test_the_independent_judge_verifies_people_it_never_trained_on():
    like = SyntheticSpec()
    records = generate(judge_world_spec(like, TINY_JUDGE))["train"]
    judge, scores = train_judge(records, like.scene_scale, TINY_JUDGE)
    assert scores["held_out_people"] == 6 and scores["pairs"] > 50
    assert scores["verification_accuracy"] > 0.65, scores  # balanced pairs: chance 0.5
    assert type(judge.net).__name__ == "ResNet"  # another architecture than the face-ID ViT


def test_the_synthetic_benchmark_reports_on_test_worlds_and_never_reads_the_validation_world(
        tmp_path, quickstart_sdxl_dir, monkeypatch):
    from faceclip_zoo.cli import main
    from faceclip_zoo.config import FaceViTConfig
    from faceclip_zoo.models.face_vit import FaceViT
    from faceclip_zoo.models.io import save_model_dir
    from faceclip_zoo.evaluation import judge as judge_module, synthetic_benchmark as benchmark

    def no_validation_world(*args, **kwargs):
        raise AssertionError("the protocol read a validation split")

    monkeypatch.setattr(benchmark, "load_validation_samples", no_validation_world)
    from faceclip_zoo.evaluation import attributes

    monkeypatch.setattr(judge_module, "JudgeConfig", lambda: TINY_JUDGE)
    monkeypatch.setattr(attributes, "ReaderConfig", lambda: TINY_READER)
    monkeypatch.setattr("faceclip_zoo.evaluation.protocol.TEST_PEOPLE", 3)
    torch.manual_seed(0)
    face_vit = save_model_dir(FaceViT(FaceViTConfig.from_name("face-vit-tiny")).eval(), tmp_path / "vit")
    monkeypatch.chdir(tmp_path)  # the judge is trained into the default priors folder, under here
    out = tmp_path / "eval"
    assert main(["evaluate", "--pipeline", str(quickstart_sdxl_dir), "--benchmark", "synthetic", "--out", str(out),
                 "--face_id", str(face_vit), "--steps", "2", "--images_per_sample", "2"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["protocol"] == "test worlds" and [int(w) for w in report["worlds"]] == list(TEST_WORLD_SEEDS)
    assert set(report["judges"]) == {"independent judge", "face-ID ViT"}
    assert "conditioning network" in report["judges"]["face-ID ViT"]
    judged = tmp_path / "checkpoints" / "synthetic" / "judge-resnet"
    assert (judged / "model.safetensors").is_file() and judged.resolve() != face_vit.resolve()
    for world in report["worlds"].values():
        gen = world["generated"]["judges"]["independent judge"]
        assert gen["images"] == 3 * 8 * 2 and gen["seeds"] == 2 and gen["chance_top1"] == pytest.approx(1 / 3)
        assert 0 <= gen["identity_top1"] <= 1 and gen["identity_top1_se_people"] >= 0
        assert "identity_top1_seed_spread" in gen
        assert world["real"]["judges"]["face-ID ViT"]["seeds"] == 1
        # the real scenes through the pipeline's VAE: the ceiling its denoiser works under
        assert world["vae_round_trip"]["judges"]["face-ID ViT"]["images"] == 3 * 8
    mean = report["mean"]["generated"]["judges"]["independent judge"]["identity_top1"]
    per_world = [w["generated"]["judges"]["independent judge"]["identity_top1"] for w in report["worlds"].values()]
    assert mean == pytest.approx(sum(per_world) / 3)
    attrs = report["mean"]["generated"]["attributes"]
    assert set(attrs) == set(ATTRIBUTES) and all(0 < a["chance"] <= 1 and 0 <= a["accuracy"] <= 1 for a in attrs.values())
    assert set(report["caption_reader"]["held_out_accuracy"]) == set(ATTRIBUTES)
    assert (tmp_path / "checkpoints" / "synthetic" / "caption-reader" / "model.safetensors").is_file()
    text = (out / "results.md").read_text()
    assert "independent judge" in text and "bootstrap over people" in text and "verification accuracy" in text
    assert "| through the VAE |" in text
    assert "Caption following" in text and "| expression |" in text
    assert (out / "contact_sheet.png").stat().st_size > 1000


def test_every_synthetic_caption_names_its_attributes_and_chance_is_the_commonest_value():
    records = generate(SyntheticSpec(train_identities=20, val_identities=0, guided_pairs=0, seed=5))["train"]
    parsed = [caption_attributes(r.caption) for r in records]
    assert all(parsed) and {p["hat"] for p in parsed} <= set(ATTRIBUTES["hat"])
    assert caption_attributes("a photo of a smiling person wearing a red shirt and a blue hat and glasses, in front "
                              "of a orange background, lit from the left") == {
        "shirt": "red", "hat": "blue", "glasses": "yes", "expression": "smiling", "background": "orange",
        "light": "left"}
    assert caption_attributes("a red circle on a blue background") is None
    chance = majority_chance([r.caption for r in records])
    hats = [p["hat"] for p in parsed]
    assert chance["hat"] == max(hats.count(v) for v in set(hats)) / len(hats) > 0.4  # mostly no hat
