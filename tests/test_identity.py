"""Identity you can see: a short CPU run of the SDXL quickstart recipe (its VAE, scheduler,
loss and sampler as shipped; the tiny UNet config and world framing it was calibrated on; fewer steps) on a small synthetic world
must draw faces closer to the reference identity than the same pipeline, same prompts and
seeds, with the face input zeroed, by a margin well beyond its standard error.

The world has 4 identities (many samples each) so that a few hundred steps suffice; its
face-ID ViT (trained here) is both the encoder's face tower and the judge. The encoder's
fuser and text tower are untrained: identity reaches the UNet through the id token and the
fused face patches, as in the release. This is what the diffusion stage must do with any
joint embedding; the held-out numbers of the full quickstart are in docs/evaluation.md.
"""

from pathlib import Path

import pytest
import yaml

from faceclip_zoo.cli import main
from faceclip_zoo.config import FaceCLIPConfig
from faceclip_zoo.evaluation.synthetic_benchmark import evaluate_synthetic, load_validation_samples
from faceclip_zoo.models import FaceCLIPEncoder, load_model_dir
from faceclip_zoo.models.face_vit import FaceViTIdentity
from faceclip_zoo.models.io import save_model_dir
from faceclip_zoo.pipelines.export import load_pipeline
from faceclip_zoo.utils import redirect_loggers

REPO = Path(__file__).resolve().parents[1]
STEPS = 800


@pytest.mark.slow
# The suite's longest run (693 s in CI beside the other worker's tests): its own limit, so
# that a slow, shared machine does not fail it under the suite-wide 900 s meant for hangs.
@pytest.mark.timeout(1500)
def test_generated_faces_carry_the_reference_identity(tmp_path):
    world = dict(root=str(tmp_path / "world"), priors_dir=str(tmp_path / "priors"), train_identities=4,
                 val_identities=2, samples_per_identity=32, guided_pairs=0, prior_steps=200, vae_steps=500,
                 num_workers=0)
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart" / "sdxl.yaml").read_text())
    recipe["data"]["init_args"].update(world)
    from faceclip_zoo.synthetic import SyntheticIdentities

    SyntheticIdentities(**world).prepare_data()  # shards, face-ID ViT, tiny CLIP, VAE
    face_vit = load_model_dir(tmp_path / "priors" / "face-vit", expect="face_vit")
    encoder = FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny"))
    encoder.face_encoder.load_state_dict(face_vit.state_dict())
    save_model_dir(encoder, tmp_path / "encoder")

    t = recipe["trainer"]
    t.update(max_steps=STEPS, val_check_interval=STEPS, limit_val_batches=1, num_sanity_val_steps=0,
             default_root_dir=str(tmp_path / "run"), enable_progress_bar=False)
    redirect_loggers(t, str(tmp_path / "run"))
    t["callbacks"][1]["init_args"]["dirpath"] = str(tmp_path / "pipeline")
    # from scratch: the few identities are learned within the test's steps without the base
    recipe["model"]["init_args"].pop("unet_weights")
    # Calibrated on the landscape world and the tiny UNet config at lr 1e-3 (the quickstart's
    # before the portrait world): in a 4-identity portrait world the 500-step VAE keeps only
    # 0.84 of the identity, under the test's 0.9 ceiling check.
    recipe["model"]["init_args"].pop("unet_overrides")
    recipe["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 1.0e-3
    recipe["data"]["init_args"].update(scene_scale=0.8, max_angle=10.0)
    recipe["model"]["init_args"].update(encoder_l=str(tmp_path / "encoder"), encoder_g=str(tmp_path / "encoder"),
                                        vae_weights=str(tmp_path / "priors" / "vae"), num_samples=2, sample_steps=2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    # frozen features cached first, as the 10-minute quickstart fit does: a third fewer
    # seconds per step, the same training path
    assert main(["cache", "--recipe", str(tmp_path / "recipe.yaml"), "--progress", "false"]) == 0
    assert main(["fit", "--config", str(tmp_path / "recipe.yaml")]) == 0

    # 8 samples of each identity: its reference crop and caption, as in the benchmark
    by_identity: dict[str, list] = {}
    for s in load_validation_samples(str(tmp_path / "world" / "train")):
        by_identity.setdefault(s["identity"], []).append(s)
    samples = [s for group in by_identity.values() for s in group[:8]]
    results, _ = evaluate_synthetic(load_pipeline(tmp_path / "pipeline"), samples, FaceViTIdentity(face_vit).eval(),
                                    steps=20)
    gen, zeroed = results["generated"], results["generated_no_face"]
    print({k: round(v, 3) for k, v in gen.items()}, {k: round(v, 3) for k, v in zeroed.items()})
    assert results["vae_round_trip"]["identity_top1"] >= 0.9  # the ceiling is not the limit
    assert gen["face_sim_gain"] > 3 * gen["face_sim_gain_se"]
    assert gen["identity_top1"] >= 0.6 > zeroed["identity_top1"]
