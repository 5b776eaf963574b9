"""`ablation` end to end on a tiny world: every stage runs through the production commands
(fit, cache, evaluate), each SDXL stage on its own cached copy of the world, and the
results carry standard errors and the face-zeroed control."""

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


def test_ablation_runs_caches_and_reports_errors_and_the_zeroed_control(tmp_path):
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
        "eval": {"samples_per_identity": 2, "steps": 2, "guidance": 5.0, "batch_size": 4}}}))
    results = ablation(str(config))

    rows = results["rows"]
    assert list(rows) == ["L1", "L3", "diffusion-only", "L3, face zeroed"]
    for name, row in rows.items():
        for metric in ("face_sim", "identity_top1", "clip_t", "background_accuracy"):
            assert row[f"{metric}_se"] is not None and row[f"{metric}_se"] >= 0, (name, metric)
    assert rows["L3, face zeroed"]["joint_identity_top1"] is None
    out = tmp_path / "out"
    zeroed = json.loads((out / "L3-face-zeroed" / "eval" / "generation.json").read_text())
    assert zeroed["generation"]["face"] == "zeroed"
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
    assert "+-" in (out / "results.md").read_text()
