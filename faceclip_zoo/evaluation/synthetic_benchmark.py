"""Does a trained diffusion stage follow the reference identity and the caption? Measured
on the held-out synthetic identities, where both can be read from pixels:

- identity: the synthetic face-ID ViT (the quickstart's ArcFace) on the face region of
  each generated scene, compared with the mean identity vector of every held-out
  identity's references. margin = cos(own identity) - mean cos(other identities);
  top1 = share of images whose nearest identity is their own (chance 1 / #identities).
- background: the colour of the generated scene's top corners, nearest of the palette,
  against the caption's background word (chance 1 / 10).

The same numbers for the real validation scenes (and for them after the pipeline's VAE)
give the ceilings, and for images generated without a face (same prompts) the
no-identity floor.

    python -m faceclip_zoo evaluate --pipeline checkpoints/quickstart-sdxl --benchmark synthetic --out runs/eval/q
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from faceclip_zoo.synthetic.faces import BACKGROUNDS
from faceclip_zoo.synthetic.scenes import (  # noqa: F401 (read from here by probes, evaluation and tests)
    background_of, caption_background, contact_sheet, generate_images, scene_face_crop, vae_round_trip,
)


def _summary(values: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-image values."""
    v = values.double()
    se = (v.std(unbiased=True) / math.sqrt(len(v))).item() if len(v) > 1 else float("nan")
    return v.mean().item(), se


@torch.no_grad()
def identity_similarities(face_id, images: torch.Tensor, identities: list[str], references: dict[str, torch.Tensor],
                          scene_scale: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine of every image's face with every identity's reference [N, I], each image's
    own identity index [N]); identities in sorted order."""
    names = sorted(references)
    refs = torch.stack([references[n] for n in names])
    emb = F.normalize(face_id(scene_face_crop(images, scene_scale=scene_scale)).float(), dim=-1)
    return emb @ refs.T, torch.tensor([names.index(i) for i in identities])


@torch.no_grad()
def identity_scores(face_id, images: torch.Tensor, identities: list[str],
                    references: dict[str, torch.Tensor], scene_scale: float = 0.8) -> dict[str, float]:
    """images: scenes [N, 3, S, S] in [0, 1]; references: identity -> its mean normalised
    identity vector. Each score with its standard error over the images (`<name>_se`)."""
    sims, own = identity_similarities(face_id, images, identities, references, scene_scale)
    own_sim = sims[torch.arange(len(own)), own]
    other = (sims.sum(1) - own_sim) / (len(references) - 1)
    out = {"images": len(own), "chance_top1": 1 / len(references)}
    for name, values in (("face_sim", own_sim), ("other_similarity", other), ("identity_margin", own_sim - other),
                         ("identity_top1", (sims.argmax(1) == own).float())):
        out[name], out[f"{name}_se"] = _summary(values)
    return out


def background_scores(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    hits = torch.tensor([float(p == caption_background(c)) for p, c in zip(background_of(images), captions)])
    mean, se = _summary(hits)
    return {"background_accuracy": mean, "background_accuracy_se": se, "chance_background": 1 / len(BACKGROUNDS)}


@torch.no_grad()
@torch.no_grad()
def reference_vectors(face_id, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Each identity's mean normalised identity vector over its samples' reference crops."""
    refs: dict[str, list[torch.Tensor]] = defaultdict(list)
    emb = F.normalize(face_id(torch.stack([s["face"] for s in samples])).float(), dim=-1)
    for s, e in zip(samples, emb):
        refs[s["identity"]].append(e)
    return {n: F.normalize(torch.stack(v).mean(0), dim=-1) for n, v in refs.items()}


def image_scores(face_id, images: torch.Tensor, samples: list[dict], references: dict[str, torch.Tensor],
                 scene_scale: float = 0.8) -> dict[str, float]:
    """Identity and background scores of one image per sample (in sample order)."""
    return {**identity_scores(face_id, images, [s["identity"] for s in samples], references, scene_scale),
            **background_scores(images, [s["caption"] for s in samples])}


@torch.no_grad()
def evaluate_synthetic(pipe, samples: list[dict], face_id, steps: int = 25, guidance: float | None = None,
                       seed: int = 0, batch_size: int = 16, images_per_sample: int = 1, controls: bool = True,
                       scene_scale: float = 0.8) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """samples: validation samples (decoded shard dicts with face, image, caption, identity).
    Returns (scores per image set, the image sets): real scenes and their VAE round trip
    (ceilings), generated with the sample's reference face, and generated with the face
    input zeroed (same prompts and seeds: the no-identity control). Generation draws
    `images_per_sample` seeds per sample; negative branch: zero face + "" (the synthetic
    world's unconditional condition); guidance None = the pipeline's default (SDXL: the
    folder's stored guidance, else CFG 5.0; FLUX true CFG 3.5). controls=False scores the
    generated set alone (sweeps)."""
    references = reference_vectors(face_id, samples)
    identities = [s["identity"] for s in samples]
    captions = [s["caption"] for s in samples]
    real = torch.stack([s["image"] for s in samples])

    def generate(with_face: bool) -> torch.Tensor:
        return generate_images(pipe, samples, with_face, steps, guidance, seed, batch_size, images_per_sample)

    sets = {"generated": generate(True)}
    if controls:
        sets = {"real": real, "vae_round_trip": vae_round_trip(pipe.vae, real), **sets,
                "generated_no_face": generate(False)}
    results = {}
    for name, images in sets.items():
        n = len(images) // len(samples)
        results[name] = {**identity_scores(face_id, images, identities * n, references, scene_scale),
                         **background_scores(images, captions * n)}
    if controls:
        # Paired: the same prompt and seed with and without the face, so the noise that the
        # two sets share cancels. The face's effect on identity, with its standard error.
        own = {}
        for name in ("generated", "generated_no_face"):
            sims, idx = identity_similarities(face_id, sets[name], identities * images_per_sample, references,
                                              scene_scale)
            own[name] = sims[torch.arange(len(idx)), idx]
        gain, gain_se = _summary(own["generated"] - own["generated_no_face"])
        results["generated"].update(face_sim_gain=gain, face_sim_gain_se=gain_se)
    return results, sets


def scene_scale_of(shards: str) -> float:
    """The framing the held-out scenes were rendered with (their dataset's manifest)."""
    import json

    manifest = Path(shards).parent / "manifest.json"
    try:
        return float(json.loads(manifest.read_text())["spec"].get("scene_scale", 0.8))
    except (OSError, ValueError, KeyError):
        return 0.8


def load_validation_samples(shards: str, image_size: int = 64, face_size: int = 112) -> list[dict]:
    from faceclip_zoo.data.datamodule import ShardDataModule

    dm = ShardDataModule(val=shards, image_size=image_size, face_size=face_size, num_workers=0, batch_size=64)
    return [s for s in dm.val_dataset() if s["has_face"]]


COLUMNS = ("identity_top1", "face_sim", "identity_margin", "background_accuracy")


def markdown(results: dict[str, dict[str, float]]) -> str:
    first = next(iter(results.values()))
    lines = [f"chance: identity_top1 {first['chance_top1']:.3f}, background_accuracy {first['chance_background']:.2f}; "
             "each value +- its standard error over the images", "",
             "| images | n | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['images']} | " + " | ".join(f"{r[c]:.3f} +- {r[c + '_se']:.3f}" for c in COLUMNS) + " |")
    gen = results.get("generated", {})
    if "face_sim_gain" in gen:
        lines += ["", f"face input vs zeroed, same prompts and seeds: Face Sim gain {gen['face_sim_gain']:.3f} "
                  f"+- {gen['face_sim_gain_se']:.3f} (paired)"]
    return "\n".join(lines) + "\n"


def pipeline_of_fit_checkpoint(ckpt: str):
    """A diffusion fit checkpoint -> its module's pipeline (EMA weights when kept), without
    exporting: the module class comes from the run's config.yaml. Scores diagnostics that
    have no export (the oracle) and runs in progress."""
    import importlib
    import pickle

    import yaml

    from faceclip_zoo.export import find_run_config
    from faceclip_zoo.utils import UserError, require_file, unpickling_refusal

    path = require_file(ckpt, "fit checkpoint")
    config = find_run_config(path)
    if config is None:
        raise UserError(f"no config.yaml of the run beside {path} (the run folder of `fit` has one)")
    class_path = str((yaml.safe_load(config.read_text()) or {}).get("model", {}).get("class_path", ""))
    module_name, _, name = class_path.rpartition(".")
    # a config found beside a checkpoint is not a recipe the user wrote: nothing is
    # imported from it unless it names one of our tasks
    if module_name.split(".")[0] != "faceclip_zoo":
        raise UserError(f"{config}: model.class_path {class_path!r} is not a faceclip_zoo module; refusing to "
                        "import it (a run folder of `fit` names e.g. faceclip_zoo.tasks.SDXLJointModule)")
    cls = getattr(importlib.import_module(module_name), name, None)
    if cls is None or not hasattr(cls, "pipeline"):
        raise UserError(f"{class_path} (from {config}) is not a diffusion task: it has no pipeline")
    from faceclip_zoo.tasks.resilience import allow_checkpoint_globals

    allow_checkpoint_globals()
    try:
        module = cls.load_from_checkpoint(str(path), map_location="cpu", weights_only=True).eval()
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing to load {path}: {unpickling_refusal(exc)}") from None
    module._weights_loaded = True
    return module.pipeline(use_ema=True)


def synthetic_world(recipe_path: str) -> tuple[Path, Path]:
    """(shard root, priors folder) of the synthetic world a recipe trains on (its
    SyntheticIdentities data section; the DataModule's defaults where it names none)."""
    import inspect

    import yaml

    from faceclip_zoo.synthetic.datamodule import SyntheticIdentities
    from faceclip_zoo.utils import UserError

    data = yaml.safe_load(Path(recipe_path).read_text()).get("data") or {}
    if not str(data.get("class_path", "")).endswith("SyntheticIdentities"):
        raise UserError(f"{recipe_path}: held-out synthetic identities are scored against the world a recipe "
                        f"trains on, so it must train on faceclip_zoo.synthetic.SyntheticIdentities (this one has "
                        f"{data.get('class_path')})")
    defaults = inspect.signature(SyntheticIdentities).parameters
    args = data.get("init_args") or {}
    return (Path(args.get("root", defaults["root"].default)),
            Path(args.get("priors_dir", defaults["priors_dir"].default)))


def world_of_pipeline(pipeline: str) -> tuple[str, str]:
    """(held-out shards, face-ID ViT folder) of the synthetic world the pipeline was trained
    on, from the recipe its folder records (the quickstarts each train on their own copy of
    the world); the default world's when it records none."""
    from faceclip_zoo.utils import UserError

    recipe = Path(pipeline) / "recipe.yaml"
    try:
        root, priors = synthetic_world(str(recipe))
    except (OSError, UserError, ValueError, AttributeError):
        return "runs/synthetic/val", "checkpoints/synthetic/face-vit"
    return str(root / "val"), str(priors / "face-vit")


def run_synthetic_benchmark(pipeline: str, out, val: str | None = None,
                            face_id: str | None = None, steps: int = 25,
                            guidance: float | None = None, seed: int = 0, images_per_sample: int = 1,
                            device: str = "cpu", probes: bool = False, judge_config=None,
                            people: int | None = None, reader_config=None) -> dict:
    """`evaluate --benchmark synthetic`: scores a pipeline (an exported folder, or a diffusion
    fit checkpoint `.ckpt`) and writes results.json, results.md and contact_sheet.png into
    `out`. By default on the test worlds under the protocol (protocol.py: both judges, people
    bootstrap); with `val` (or `probes`), on that validation split, as a diagnostic: the
    validation world is what configurations are chosen on. `face_id` defaults to the world
    of the pipeline's recipe (world_of_pipeline)."""
    import json

    from faceclip_zoo.models.face_vit import FaceViTIdentity
    from faceclip_zoo.models.io import load_model_dir
    from faceclip_zoo.pipelines.export import load_pipeline
    from faceclip_zoo.utils import require_file

    world_val, world_face_id = world_of_pipeline(pipeline)
    on_test_worlds = val is None and not probes
    val, face_id = val or world_val, face_id or world_face_id
    if not on_test_worlds:
        require_file(val, "held-out synthetic shards (the quickstart fits write them to <data root>/val)")
    if str(pipeline).endswith(".ckpt"):
        pipe = pipeline_of_fit_checkpoint(pipeline).to(device)
    else:
        pipe = load_pipeline(pipeline).to(device)
    pipe.set_progress_bar_config(disable=True)
    model = FaceViTIdentity(load_model_dir(face_id, expect="face_vit")).eval()
    size = int(pipe.default_size())
    clips = pipe.OUTPUT != "images"
    if probes and clips:
        from faceclip_zoo.utils import UserError

        raise UserError("--probes read still images; a video pipeline is scored on the test worlds (the default) "
                        "or, with --val, on the validation world under the same protocol")
    if on_test_worlds or clips:  # clips: the protocol's per-frame scoring on the validation split too
        from faceclip_zoo.evaluation.protocol import on_test_worlds as score_under_protocol

        validation = None if on_test_worlds else load_validation_samples(val, image_size=size)
        return score_under_protocol(pipeline, pipe, model, Path(out), size, steps, guidance, seed, images_per_sample,
                                    judge_config, people, reader_config, validation=validation)
    samples = load_validation_samples(val, image_size=size)
    results, sets = evaluate_synthetic(pipe, samples, model, steps=steps, guidance=guidance, seed=seed,
                                       images_per_sample=images_per_sample, scene_scale=scene_scale_of(val))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "synthetic", "pipeline": str(pipeline), "val": str(val), "face_id": str(face_id),
              "held_out_samples": len(samples), "identities": len({s["identity"] for s in samples}),
              "generation": {"steps": steps, "seed": seed,
                             "guidance": guidance if guidance is not None else getattr(pipe, "default_guidance", None),
                             "images_per_sample": images_per_sample, "negative_prompt": ""},
              "results": results}
    text = markdown(results)
    if probes:
        from faceclip_zoo.evaluation import probes as probe

        module = probe.module_of_pipeline(pipeline).to(device)
        train = load_validation_samples(str(Path(val).parent / "train"), image_size=size)
        report["probes"] = {"identity_in_embeddings": probe.identity_in_embeddings(module, model, train, samples),
                            "linear_generator": {
                                name: image_scores(model, images, samples, reference_vectors(model, samples),
                                                   scene_scale_of(val))
                                for name, images in probe.linear_generator(module, train, samples, seed=seed).items()},
                            "loss_by_timestep": probe.loss_by_timestep(module, samples, seed=seed,
                                                                       scene_scale=scene_scale_of(val))}
        text += probe.markdown(report["probes"])
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(text)
    contact_sheet(samples, sets, out / "contact_sheet.png")
    return report
