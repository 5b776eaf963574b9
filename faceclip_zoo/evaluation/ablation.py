"""The paper's loss ablation (Table 3) and Fig. 2, in miniature, on the synthetic identities.

    python -m faceclip_zoo ablation --config recipes/quickstart/ablation.yaml

For each loss set (L1 = [image], L2 = + identity, L3 = + text) it pre-trains the quickstart
encoder, fine-tunes the quickstart's tiny SDXL stage on it, and evaluates:
  - generated images (`evaluate` on a benchmark of held-out identities: each held-out
    sample's reference face + caption): Face Sim with the synthetic face-ID ViT,
    identity top-1 among the held-out identities, CLIP-T with the synthetic CLIP, FID on
    the synthetic CLIP's image features against the real held-out scenes, and the
    background colour the caption asks for (a text metric readable from pixels);
  - the joint embedding itself: nearest-neighbour identity accuracy of held-out faces under
    one prompt, and the pre-training's text retrieval (val/text_top1).
A diffusion-only encoder (the same starting point, trained only through the SDXL loss,
`train_encoders: true`) gives Fig. 2's contrast: t-SNE of its joint embeddings next to the
pre-trained L3 encoder's. L3's pipeline is scored once more with its face input zeroed
(the same prompts and seeds): the floor identity is read against. Every generated-image
score comes with its standard error over the images. Each SDXL stage runs on its own copy
of the synthetic world (`<out>/<variant>/world`) whose frozen features `cache` stores first
(`cache_features`). Every stage is skipped when its output exists, so an interrupted
ablation continues where it stopped. Results: <out>/results.{json,md}.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml
from PIL import Image

from faceclip_zoo.synthetic.benchmark import synthetic_world
from faceclip_zoo.utils import UserError, check_output_folder, redirect_loggers, require_at_least

log = logging.getLogger(__name__)

PAPER_TABLE3 = {"L1": {"face_sim": 0.077, "clip_t": None}, "L2": {"face_sim": 0.869, "clip_t": 0.316},
                "L3": {"face_sim": 0.869, "clip_t": 0.332}}
DEFAULTS = {
    "out": "runs/ablation",
    "encoder_recipe": "recipes/quickstart/faceclip.yaml",
    "diffusion_recipe": "recipes/quickstart/sdxl.yaml",
    "encoder_steps": 200,
    "diffusion_steps": 200,
    "variants": {"L1": ["image"], "L2": ["image", "identity"], "L3": ["image", "identity", "text"]},
    "diffusion_only": True,
    "face_zeroed_control": True,
    "cache_features": True,
    "eval": {"samples_per_identity": 2, "steps": 20, "guidance": 5.0, "batch_size": 8},
}


def load_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"ablation config not found: {p}")
    raw = (yaml.safe_load(p.read_text()) or {}).get("ablation")
    if not isinstance(raw, dict):
        raise UserError(f"{p} has no `ablation:` mapping")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise UserError(f"{p}: unknown ablation key(s) {unknown}; known: {sorted(DEFAULTS)}")
    cfg = {**copy.deepcopy(DEFAULTS), **raw}
    cfg["eval"] = {**DEFAULTS["eval"], **(raw.get("eval") or {})}
    for key in ("encoder_recipe", "diffusion_recipe"):
        if not Path(cfg[key]).is_file():
            raise UserError(f"{p}: {key} {cfg[key]} not found")
    try:
        require_at_least({f"{p}: {key}": (cfg[key], 1) for key in ("encoder_steps", "diffusion_steps")}
                         | {f"{p}: eval.{key}": (cfg["eval"][key], 1)
                            for key in ("samples_per_identity", "steps", "batch_size")}
                         | {f"{p}: eval.guidance": (cfg["eval"]["guidance"], 0)})
    except TypeError:
        raise UserError(f"{p}: the step budgets and eval settings are numbers") from None
    variants = cfg["variants"]
    if not isinstance(variants, dict) or not variants or not all(
            isinstance(v, list) and v and set(v) <= {"image", "identity", "text"} for v in variants.values()):
        raise UserError(f"{p}: variants maps names to non-empty lists of losses among image, identity, text")
    return cfg


def _recipe(path: str, steps: int, run_dir: Path, export_dir: Path, model_args: dict) -> dict:
    """A copy of a quickstart recipe with its step budget, its folders and some model args changed."""
    recipe = yaml.safe_load(Path(path).read_text())
    t = recipe["trainer"]
    t.update(max_steps=steps, val_check_interval=steps, default_root_dir=str(run_dir), enable_progress_bar=False,
             num_sanity_val_steps=0)
    redirect_loggers(t, str(run_dir), version=0)
    for cb in t["callbacks"]:
        if cb["class_path"].endswith("ExportOnFitEnd"):
            cb["init_args"]["dirpath"] = str(export_dir)
    recipe["model"]["init_args"].update(model_args)
    return recipe


def _fit(recipe: dict, where: Path, cache_features: str | None = None) -> float:
    """Run `fit` on a recipe (written beside its outputs), after `cache` of `cache_features`
    (comma-separated; "" = all the model can cache) when given; returns seconds."""
    from faceclip_zoo.train import fit

    run_dir = Path(recipe["trainer"]["default_root_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a stage that did not finish starts again
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text(yaml.safe_dump(recipe, sort_keys=False))
    start = time.perf_counter()
    if cache_features is not None:
        from faceclip_zoo.cache import cache

        cache(str(where), features=cache_features or None, progress=False)
    fit(where)
    return time.perf_counter() - start


def _own_world(recipe: dict, folder: Path) -> dict:
    """The recipe on its own copy of the synthetic world (rendered there by the DataModule),
    whose shards `cache` fills with this variant's frozen features."""
    recipe["data"]["init_args"].update(root=str(folder), num_workers=0)
    return recipe


def _last_metric(run_dir: Path, name: str) -> float | None:
    files = sorted(run_dir.rglob("metrics.csv"))
    if not files:
        return None
    values = [r[name] for r in csv.DictReader(open(files[-1])) if r.get(name)]
    return float(values[-1]) if values else None


def initial_encoder(recipe_path: str, out: Path) -> Path:
    """The encoder pre-training starts from (face ViT and CLIP text weights loaded, fusion at
    init): the diffusion-only run's starting point."""
    from faceclip_zoo.models.io import save_model_dir
    from faceclip_zoo.tasks.faceclip_encoder import FaceCLIPEncoderModule

    if (out / "model.safetensors").exists():
        return out
    args = dict(yaml.safe_load(Path(recipe_path).read_text())["model"]["init_args"])
    args.pop("optimizer", None)
    module = FaceCLIPEncoderModule(**args)
    module.load_pretrained_weights()
    return save_model_dir(module.encoder, out, config=module.encoder_config)


def write_benchmark(folder: Path, per_identity: int, eval_cfg: dict, world: tuple[Path, Path]) -> Path:
    """Held-out samples as an Unsplash-shaped benchmark: reference crop + caption per sample."""
    from faceclip_zoo.synthetic.benchmark import load_validation_samples, scene_scale_of

    spec_path = folder / "benchmark.yaml"
    if spec_path.exists():
        return spec_path
    root, priors = world
    samples = load_validation_samples(str(root / "val"))
    (folder / "references").mkdir(parents=True, exist_ok=True)
    (folder / "real").mkdir(exist_ok=True)

    def save(t, path: Path) -> None:
        Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)

    pairs, seen = [], {}
    for s in samples:
        save(s["image"], folder / "real" / f"{s['key']}.png")
        if seen.get(s["identity"], 0) < per_identity:
            seen[s["identity"]] = seen.get(s["identity"], 0) + 1
            save(s["face"], folder / "references" / f"{s['key']}.png")
            pairs.append({"reference": f"references/{s['key']}.png", "prompt": s["caption"], "identity": s["identity"]})
    priors = str(Path(priors).resolve())
    spec = {"pairs": pairs, "batch_size": eval_cfg["batch_size"], "seed": 0,
            # The synthetic world trains its unconditional branch on empty captions: "" is its negative.
            "generation": {"steps": eval_cfg["steps"], "guidance": eval_cfg["guidance"], "align": "never",
                           "negative_prompt": ""},
            "face_sim": {"model": f"face-vit:{priors}/face-vit",
                         "locator": f"synthetic-scene:{scene_scale_of(str(root / 'val'))}"},
            "clip_t": {"model": f"zoo:{priors}/clip"},
            "fid": {"reference_dir": "real", "features": "clip"},
            "sheets": {"rows": 1, "columns": 8}}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return spec_path


def zeroed_benchmark(spec_path: Path) -> Path:
    """The benchmark with `generation.face: zeroed` (the no-identity control), beside it."""
    spec = yaml.safe_load(spec_path.read_text())
    spec["generation"]["face"] = "zeroed"
    path = spec_path.with_name("benchmark-face-zeroed.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def background_accuracy(eval_dir: Path) -> tuple[float, float]:
    """How often the generated scene's background is the colour its caption names (with its
    standard error over the images)."""
    import torch

    from faceclip_zoo.evaluation.benchmark import standard_error
    from faceclip_zoo.synthetic.benchmark import background_of, caption_background

    rows = [json.loads(line) for line in (eval_dir / "per_image.jsonl").read_text().splitlines()]
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(eval_dir / r["image"]).convert("RGB"),
                                                      dtype=np.float32) / 255).permute(2, 0, 1) for r in rows])
    hits = [float(f == caption_background(r["prompt"])) for f, r in zip(background_of(images), rows)]
    return sum(hits) / len(hits), standard_error(hits)


def run_ablation(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from faceclip_zoo.evaluation.encoder import identity_structure
    from faceclip_zoo.evaluation.run import evaluate_pipeline
    from faceclip_zoo.synthetic.benchmark import load_validation_samples
    from faceclip_zoo.models.io import load_model_dir
    from faceclip_zoo.pipelines.export import load_pipeline

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    for name, losses in cfg["variants"].items():
        d = out / name
        if not (d / "encoder" / "model.safetensors").exists():
            timings[f"{name} encoder"] = _fit(_recipe(cfg["encoder_recipe"], cfg["encoder_steps"], d / "encoder-run",
                                                      d / "encoder", {"losses": list(losses)}), d / "encoder.yaml")
        if not (d / "pipeline" / "model_index.json").exists():
            enc = str(d / "encoder")
            recipe = _recipe(cfg["diffusion_recipe"], cfg["diffusion_steps"], d / "diffusion-run", d / "pipeline",
                             {"encoder_l": enc, "encoder_g": enc, "num_samples": 4})
            if cfg["cache_features"]:
                recipe = _own_world(recipe, d / "world")
            timings[f"{name} diffusion"] = _fit(recipe, d / "diffusion.yaml", "" if cfg["cache_features"] else None)
        runs[name] = {"losses": list(losses), "pipeline": d / "pipeline", "encoder_dir": d / "encoder",
                      "text_top1": _last_metric(d / "encoder-run", "val/text_top1")}
    if cfg["diffusion_only"]:
        d = out / "diffusion-only"
        if not (d / "pipeline" / "model_index.json").exists():
            init = str(initial_encoder(cfg["encoder_recipe"], d / "encoder-init"))
            recipe = _recipe(cfg["diffusion_recipe"], cfg["diffusion_steps"], d / "diffusion-run", d / "pipeline",
                             {"encoder_l": init, "encoder_g": init, "train_encoders": True, "num_samples": 4})
            if cfg["cache_features"]:  # the encoders train: only the VAE latents can be cached
                recipe = _own_world(recipe, d / "world")
            timings["diffusion-only"] = _fit(recipe, d / "diffusion.yaml",
                                             "vae_latents" if cfg["cache_features"] else None)
        runs["diffusion-only"] = {"losses": ["diffusion only"], "pipeline": d / "pipeline", "encoder_dir": None,
                                  "text_top1": None}

    world = synthetic_world(cfg["diffusion_recipe"])
    if cfg["cache_features"] and cfg["variants"]:  # the recipe's own world may never have been rendered
        world = (out / next(iter(cfg["variants"])) / "world", world[1])
    bench = write_benchmark(out / "benchmark", cfg["eval"]["samples_per_identity"], cfg["eval"], world)
    samples = load_validation_samples(str(world[0] / "val"))
    faces = torch.stack([s["face"] for s in samples])
    identities = [s["identity"] for s in samples]
    if cfg["face_zeroed_control"] and "L3" in runs:
        # L3's pipeline with its face input zeroed: the same prompts and seeds, no identity
        runs["L3, face zeroed"] = {**runs["L3"], "losses": ["L3, face input zeroed"], "face": "zeroed", "text_top1": None}
    rows = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        eval_dir = out / name.replace(", ", "-").replace(" ", "-") / "eval"
        spec = bench if run.get("face") != "zeroed" else zeroed_benchmark(bench)
        results = evaluate_pipeline(str(run["pipeline"]), str(spec), eval_dir)
        if results["generation"]["generated_now"]:  # a re-run only rescores: keep the first timing
            timings[f"{name} evaluate"] = time.perf_counter() - t0
        m = results["metrics"]
        if run.get("face") == "zeroed":
            joint = {"identity_top1": None, "chance": rows.get("L3", {}).get("joint_identity_chance")}
        else:
            encoder = (load_model_dir(run["encoder_dir"]) if run["encoder_dir"] else
                       load_pipeline(run["pipeline"]).face_encoder.encoder).eval()
            title = f"{name}: " + ("trained only through the diffusion loss" if run["encoder_dir"] is None
                                   else f"pre-trained with {run['losses']}")
            joint = identity_structure(encoder, faces, identities, out / name / "tsne_identity.png", title)
        background, background_se = background_accuracy(eval_dir)
        rows[name] = {"losses": run["losses"], "face_sim": m["face_sim"], "face_sim_se": m.get("face_sim_se"),
                      "identity_top1": m["identity_top1"], "identity_top1_se": m.get("identity_top1_se"),
                      "identity_top1_chance": m["identity_top1_chance"], "clip_t": m["clip_t"],
                      "clip_t_se": m.get("clip_t_se"), "background_accuracy": background,
                      "background_accuracy_se": background_se, "fid_clip": m["fid"],
                      "joint_identity_top1": joint["identity_top1"], "joint_identity_chance": joint["chance"],
                      "encoder_text_top1": run["text_top1"]}
    if "L3" in rows and "diffusion-only" in rows:  # Fig. 2: pre-trained next to diffusion-only
        panels = [Image.open(out / n / "tsne_identity.png").convert("RGB") for n in ("L3", "diffusion-only")]
        fig = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
        fig.paste(panels[0], (0, 0))
        fig.paste(panels[1], (panels[0].width, 0))
        fig.save(out / "fig2_tsne.png")
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    seconds = {**previous.get("seconds", {}), **{k: round(v, 1) for k, v in timings.items()}}
    results = {"config": cfg, "rows": rows, "paper_table3": PAPER_TABLE3, "seconds": seconds,
               "total_seconds": round(time.perf_counter() - start, 1), "images": len(json.loads(
                   (out / "L3" / "eval" / "results.json").read_text())["spec"]["pairs"]) if "L3" in rows else None}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    return results


COLUMNS = (("face_sim", "Face Sim (gen.)"), ("identity_top1", "identity top-1 (gen.)"),
           ("joint_identity_top1", "identity top-1 (joint emb.)"), ("clip_t", "CLIP-T (gen.)"),
           ("background_accuracy", "background acc. (gen.)"), ("fid_clip", "FID-CLIP (gen.)"),
           ("encoder_text_top1", "text top-1 (encoder)"))


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    any_row = next(iter(rows.values()))
    lines = ["| variant | losses | " + " | ".join(c for _, c in COLUMNS) + " | paper Face Sim | paper CLIP-T |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for name, r in rows.items():
        paper = results["paper_table3"].get(name, {})
        cells = ["-" if r[k] is None else f"{r[k]:.3f}" + (f" +- {r[k + '_se']:.3f}" if r.get(k + "_se") else "")
                 for k, _ in COLUMNS]
        lines.append(f"| {name} | {', '.join(r['losses'])} | " + " | ".join(cells) +
                     f" | {paper.get('face_sim') or '-'} | {paper.get('clip_t') or '-'} |")
    lines.append("")
    lines.append(f"Chance: identity top-1 (gen.) {any_row['identity_top1_chance']:.3f}, joint-embedding "
                 f"identity top-1 {any_row['joint_identity_chance']:.3f}, background 0.100. "
                 f"This run {results['total_seconds']:.0f} s; stages (s): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()) + ".")
    return "\n".join(lines) + "\n"


def ablation(config: str = "recipes/quickstart/ablation.yaml", out: Optional[str] = None) -> dict[str, Any]:
    """The paper's loss ablation (Table 3) and Fig. 2 in miniature, on the synthetic identities.

    Args:
        config: the ablation's YAML (an `ablation:` mapping: recipes, step budgets, variants).
        out: output folder (default: the config's).
    """
    cfg = load_config(config)
    if out:
        cfg["out"] = out
    check_output_folder(cfg["out"], "out", overwrite=True)  # an ablation continues where it stopped
    results = run_ablation(cfg)
    print((Path(cfg["out"]) / "results.md").read_text())
    print(f"wrote {Path(cfg['out']) / 'results.json'}; t-SNE plots in {cfg['out']}/<variant>/tsne_identity.png")
    if not results["rows"]:
        raise UserError(f"the ablation in {cfg['out']} produced no rows")
    return results
