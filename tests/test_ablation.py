"""`ablation` end to end on a tiny world: every stage runs through the production commands
(fit, cache, evaluate under the identity protocol), each SDXL stage on its own cached copy
of the world, with and without the identity loss, and the results carry both judges,
uncertainty over people and the face-zeroed control."""

import json
from pathlib import Path

import yaml

from faceclip_zoo.utils import redirect_loggers

REPO = Path(__file__).resolve().parents[1]


def _shrunk(name: str, tmp_path: Path, world: dict, model_args: dict) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart" / name).read_text())
    recipe["data"]["init_args"].update(world)
    recipe["model"]["init_args"].update(model_args)
    recipe["trainer"]["enable_progress_bar"] = False
    redirect_loggers(recipe["trainer"], str(tmp_path / "unused"))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_ablation_runs_caches_and_reports_both_judges_and_the_identity_loss(tmp_path):
    from faceclip_zoo.evaluation.ablation import ablation

    priors = tmp_path / "priors"
    world = dict(root=str(tmp_path / "world"), priors_dir=str(priors), train_identities=4, val_identities=2,
                 samples_per_identity=4, guided_pairs=8, prior_steps=5, num_workers=0, batch_size=4)
    encoder_recipe = _shrunk("faceclip.yaml", tmp_path, world, dict(
        face_encoder_weights=str(priors / "face-vit"), clip_weights=str(priors / "clip"), warmup_steps=1))
    diffusion_recipe = _shrunk("sdxl.yaml", tmp_path, {**world, "vae_steps": 5}, dict(
        vae_weights=str(priors / "vae"), unet_weights=None, warmup_steps=1, sample_steps=2))
    config = tmp_path / "ablation.yaml"
    config.write_text(yaml.safe_dump({"ablation": {
        "out": str(tmp_path / "out"), "encoder_recipe": str(encoder_recipe), "diffusion_recipe": str(diffusion_recipe),
        "encoder_steps": 2, "diffusion_steps": 2, "variants": {"L1": ["image"], "L3": ["image", "identity", "text"]},
        "identity_loss": {"weight": 0.5, "fraction": 1.0},
        "eval": {"steps": 2, "people": 3, "judge": {"people": 16, "held_out": 6, "steps": 30, "batch_size": 32},
                 "reader": {"steps": 10, "batch_size": 32, "width": 8}}}}))
    results = ablation(str(config))

    rows = results["rows"]
    assert list(rows) == ["L1", "L1 + identity loss", "L3", "L3 + identity loss", "diffusion-only",
                          "diffusion-only + identity loss"]
    for name, row in rows.items():
        for metric in ("identity_top1", "identity_top1_conditioning", "identity_top1_face_zeroed", "face_sim",
                       "background"):
            assert row[f"{metric}_se"] is not None and row[f"{metric}_se"] >= 0, (name, metric)
        assert row["joint_identity_top1"] is not None
    out = tmp_path / "out"
    report = json.loads((out / "eval" / "L3" / "results.json").read_text())
    assert report["protocol"] == "test worlds" and report["people_per_world"] == 3
    # the identity loss is the only difference between a variant's two SDXL stages
    plain = yaml.safe_load((out / "L3" / "diffusion.yaml").read_text())
    with_loss = yaml.safe_load((out / "L3" / "diffusion-identity-loss.yaml").read_text())
    assert with_loss["model"]["init_args"].pop("identity_loss") == {"weight": 0.5, "fraction": 1.0}
    for recipe in (plain, with_loss):
        recipe["trainer"] = recipe["trainer"]["max_steps"]
    assert "identity_loss" not in plain["model"]["init_args"]
    assert plain["model"] == with_loss["model"] and plain["data"] == with_loss["data"]
    # each SDXL stage read its own world, its encoder's embeddings cached in it (the
    # diffusion-only encoder trains, so only its VAE latents)
    for variant, features in (("L1", 3), ("L3", 3), ("diffusion-only", 1)):
        info = json.loads((out / variant / "world" / "train" / "cache.json").read_text())
        assert len(info["fingerprints"]) == features, variant
        recipe = yaml.safe_load((out / variant / "diffusion.yaml").read_text())
        assert recipe["data"]["init_args"]["root"] == str(out / variant / "world")
    l1 = json.loads((out / "L1" / "world" / "train" / "cache.json").read_text())["fingerprints"]
    l3 = json.loads((out / "L3" / "world" / "train" / "cache.json").read_text())["fingerprints"]
    assert l1["vae_latents"] == l3["vae_latents"] and l1["prompt_embeds"] != l3["prompt_embeds"]
    text = (out / "results.md").read_text()
    assert "+-" in text and "independent judge" in text and "L3 + identity loss" in text
    assert (out / "fig2_tsne.png").is_file()
