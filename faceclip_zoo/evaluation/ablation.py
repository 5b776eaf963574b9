"""The paper's loss ablation (Table 3) and Fig. 2, in miniature, on the synthetic identities.

    python -m faceclip_zoo ablation --config recipes/quickstart/ablation.yaml

For each loss set (L1 = [image], L2 = + identity, L3 = + text) it pre-trains the quickstart
encoder, fine-tunes the quickstart's tiny SDXL stage on it, and scores each pipeline under
the identity protocol (`evaluate --benchmark synthetic`: three test worlds no recipe
touches, the independent judge beside the conditioning network, the face-zeroed control,
caption following read by the caption reader, uncertainty over people); and the joint
embedding itself: nearest-neighbour identity of the first test world's faces under one
prompt, and the pre-training's text retrieval (val/text_top1).
A diffusion-only encoder (the same starting point, trained only through the SDXL loss,
`train_encoders: true`) gives Fig. 2's contrast: t-SNE of its joint embeddings next to the
pre-trained L3 encoder's. With `identity_loss` set, every SDXL stage is trained a second
time with the diffusion stage's identity loss (tasks/identity_loss.py): rows "<variant> +
identity loss". Each SDXL stage runs on its own copy of the synthetic world
(`<out>/<variant>/world`) whose frozen features `cache` stores first (`cache_features`).
Every stage is skipped when its output exists, so an interrupted ablation continues where
it stopped. Results: <out>/results.{json,md}.
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

import yaml
from PIL import Image

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
    "identity_loss": None,
    "cache_features": True,
    # people: per test world (the protocol's 20 by default); judge / reader: their training
    # settings (JudgeConfig / ReaderConfig fields), for tests
    "eval": {"steps": 20, "guidance": None, "people": None, "judge": None, "reader": None},
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
    from faceclip_zoo.evaluation.synthetic_benchmark import synthetic_world

    synthetic_world(cfg["diffusion_recipe"])  # its pipelines are scored on test worlds drawn like its world
    unknown = sorted(set(cfg["eval"]) - set(DEFAULTS["eval"]))
    if unknown:
        raise UserError(f"{p}: unknown eval key(s) {unknown}; known: {sorted(DEFAULTS['eval'])}")
    try:
        require_at_least({f"{p}: {key}": (cfg[key], 1) for key in ("encoder_steps", "diffusion_steps")}
                         | {f"{p}: eval.steps": (cfg["eval"]["steps"], 1), f"{p}: eval.people": (cfg["eval"]["people"], 2),
                            f"{p}: eval.guidance": (cfg["eval"]["guidance"], 0)})
    except TypeError:
        raise UserError(f"{p}: the step budgets and eval settings are numbers") from None
    variants = cfg["variants"]
    if not isinstance(variants, dict) or not variants or not all(
            isinstance(v, list) and v and set(v) <= {"image", "identity", "text"} for v in variants.values()):
        raise UserError(f"{p}: variants maps names to non-empty lists of losses among image, identity, text")
    if cfg["identity_loss"] is not None:
        from faceclip_zoo.tasks.identity_loss import IdentityLossSettings

        if not isinstance(cfg["identity_loss"], dict):
            raise UserError(f"{p}: identity_loss is a mapping of the identity loss's settings (or null)")
        try:
            IdentityLossSettings(**cfg["identity_loss"])
        except TypeError as exc:
            raise UserError(f"{p}: identity_loss: {exc}") from None
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


def _train_stages(cfg: dict[str, Any], out: Path, timings: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Every encoder and SDXL stage (skipped when its output exists) -> runs by name."""
    runs: dict[str, dict[str, Any]] = {}
    loss_settings = [("", {})] + ([(" + identity loss", {"identity_loss": dict(cfg["identity_loss"])})]
                                  if cfg["identity_loss"] is not None else [])

    def sdxl_stage(name: str, d: Path, encoder: str, extra: dict, cache: str) -> Path:
        for suffix, args in loss_settings:
            folder = d / ("pipeline" + suffix.replace(" + ", "-").replace(" ", "-"))
            if not (folder / "model_index.json").exists():
                tag = suffix.replace(" + ", "-").replace(" ", "-")
                recipe = _recipe(cfg["diffusion_recipe"], cfg["diffusion_steps"], d / f"diffusion-run{tag}", folder,
                                 {"encoder_l": encoder, "encoder_g": encoder, "num_samples": 4, **extra, **args})
                if cfg["cache_features"]:
                    recipe = _own_world(recipe, d / "world")
                timings[f"{name}{suffix} diffusion"] = _fit(recipe, d / f"diffusion{tag}.yaml",
                                                            cache if cfg["cache_features"] else None)
            yield suffix, folder

    for name, losses in cfg["variants"].items():
        d = out / name
        if not (d / "encoder" / "model.safetensors").exists():
            timings[f"{name} encoder"] = _fit(_recipe(cfg["encoder_recipe"], cfg["encoder_steps"], d / "encoder-run",
                                                      d / "encoder", {"losses": list(losses)}), d / "encoder.yaml")
        for suffix, folder in sdxl_stage(name, d, str(d / "encoder"), {}, ""):
            runs[name + suffix] = {"losses": list(losses), "pipeline": folder, "encoder_dir": d / "encoder",
                                   "text_top1": _last_metric(d / "encoder-run", "val/text_top1"), "tsne": not suffix}
    if cfg["diffusion_only"]:
        d = out / "diffusion-only"
        init = str(initial_encoder(cfg["encoder_recipe"], d / "encoder-init"))
        # the encoders train: only the VAE latents can be cached
        for suffix, folder in sdxl_stage("diffusion-only", d, init, {"train_encoders": True}, "vae_latents"):
            runs["diffusion-only" + suffix] = {"losses": ["diffusion only"], "pipeline": folder, "encoder_dir": None,
                                               "text_top1": None, "tsne": not suffix}
    return runs


def _protocol_row(report: dict, run: dict) -> dict[str, Any]:
    """One ablation row from a protocol report: both judges, the control, caption following."""
    mean = report["mean"]
    gen, zero = mean["generated"], mean["generated_no_face"]
    judge, teacher = gen["judges"]["independent judge"], gen["judges"]["face-ID ViT"]
    row = {"losses": run["losses"],
           "identity_top1": judge["identity_top1"], "identity_top1_se": judge["identity_top1_se_people"],
           "face_sim": judge["face_sim"], "face_sim_se": judge["face_sim_se_people"],
           "identity_top1_conditioning": teacher["identity_top1"],
           "identity_top1_conditioning_se": teacher["identity_top1_se_people"],
           "identity_top1_face_zeroed": zero["judges"]["independent judge"]["identity_top1"],
           "identity_top1_face_zeroed_se": zero["judges"]["independent judge"]["identity_top1_se_people"],
           "identity_top1_chance": judge["chance_top1"], "encoder_text_top1": run["text_top1"],
           "attribute_chance": {}}
    for attribute, value in gen.get("attributes", {}).items():
        row[attribute] = value["accuracy"]
        row[attribute + "_se"] = value["se_people"]
        row["attribute_chance"][attribute] = value["chance"]
    return row


def run_ablation(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from faceclip_zoo.evaluation.encoder import identity_structure
    from faceclip_zoo.models.io import load_model_dir
    from faceclip_zoo.pipelines.export import load_pipeline
    from faceclip_zoo.evaluation.attributes import ReaderConfig
    from faceclip_zoo.evaluation.synthetic_benchmark import run_synthetic_benchmark
    from faceclip_zoo.evaluation.judge import JudgeConfig
    from faceclip_zoo.evaluation.protocol import TEST_PEOPLE, _recipe_of, render_test_world, world_spec_of_recipe
    from faceclip_zoo.synthetic.world import TEST_WORLD_SEEDS

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    runs = _train_stages(cfg, out, timings)
    ev = cfg["eval"]
    judge_config = JudgeConfig(**ev["judge"]) if ev.get("judge") else None
    reader_config = ReaderConfig(**ev["reader"]) if ev.get("reader") else None
    faces = identities = None
    rows = {}
    for name, run in runs.items():
        eval_dir = out / "eval" / name.replace(" + ", "-").replace(" ", "-")
        if (eval_dir / "results.json").exists():  # a re-run only rescores
            report = json.loads((eval_dir / "results.json").read_text())
        else:
            t0 = time.perf_counter()
            report = run_synthetic_benchmark(str(run["pipeline"]), eval_dir, steps=ev["steps"], guidance=ev["guidance"],
                                             judge_config=judge_config, people=ev["people"], reader_config=reader_config)
            timings[f"{name} evaluate"] = time.perf_counter() - t0
        rows[name] = _protocol_row(report, run)
        if faces is None:  # the joint embeddings are read on the first test world's faces
            like = world_spec_of_recipe(_recipe_of(str(run["pipeline"])))
            samples = render_test_world(like, TEST_WORLD_SEEDS[0], ev["people"] or TEST_PEOPLE)
            faces, identities = torch.stack([s["face"] for s in samples]), [s["identity"] for s in samples]
        if run["tsne"]:
            encoder = (load_model_dir(run["encoder_dir"]) if run["encoder_dir"] else
                       load_pipeline(run["pipeline"]).face_encoder.encoder).eval()
            title = f"{name}: " + ("trained only through the diffusion loss" if run["encoder_dir"] is None
                                   else f"pre-trained with {run['losses']}")
            joint = identity_structure(encoder, faces, identities, out / name / "tsne_identity.png", title)
            rows[name].update(joint_identity_top1=joint["identity_top1"], joint_identity_chance=joint["chance"])
        else:
            rows[name].update(joint_identity_top1=rows[name.split(" + ")[0]].get("joint_identity_top1"),
                              joint_identity_chance=rows[name.split(" + ")[0]].get("joint_identity_chance"))
    if "L3" in rows and "diffusion-only" in rows:  # Fig. 2: pre-trained next to diffusion-only
        panels = [Image.open(out / n / "tsne_identity.png").convert("RGB") for n in ("L3", "diffusion-only")]
        fig = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
        fig.paste(panels[0], (0, 0))
        fig.paste(panels[1], (panels[0].width, 0))
        fig.save(out / "fig2_tsne.png")
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    seconds = {**previous.get("seconds", {}), **{k: round(v, 1) for k, v in timings.items()}}
    results = {"config": cfg, "rows": rows, "paper_table3": PAPER_TABLE3, "seconds": seconds,
               "total_seconds": round(time.perf_counter() - start, 1),
               "protocol": {"worlds": list(TEST_WORLD_SEEDS), "people_per_world": ev["people"] or TEST_PEOPLE,
                            "steps": ev["steps"], "guidance": ev["guidance"]}}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(markdown(results))
    return results


COLUMNS = (("identity_top1", "identity top-1, independent judge"),
           ("identity_top1_face_zeroed", "same, face zeroed"),
           ("identity_top1_conditioning", "identity top-1, conditioning network"),
           ("face_sim", "Face Sim, judge"), ("joint_identity_top1", "identity top-1, joint emb."),
           ("background", "background"), ("light", "light"), ("expression", "expression"), ("hat", "hat"),
           ("encoder_text_top1", "text top-1 (encoder)"))


def markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    any_row = next(iter(rows.values()))
    lines = ["| variant | losses | " + " | ".join(c for _, c in COLUMNS) + " | paper Face Sim | paper CLIP-T |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for name, r in rows.items():
        paper = results["paper_table3"].get(name, {})
        cells = ["-" if r.get(k) is None else f"{r[k]:.3f}" + (f" +- {r[k + '_se']:.3f}" if r.get(k + "_se") else "")
                 for k, _ in COLUMNS]
        lines.append(f"| {name} | {', '.join(r['losses'])} | " + " | ".join(cells) +
                     f" | {paper.get('face_sim') or '-'} | {paper.get('clip_t') or '-'} |")
    lines.append("")
    protocol = results["protocol"]
    chance = ", ".join(f"{k} {v:.3f}" for k, v in any_row["attribute_chance"].items())
    lines.append(f"Test worlds {protocol['worlds']} ({protocol['people_per_world']} people each; +- over people). "
                 f"Chance: identity top-1 {any_row['identity_top1_chance']:.3f}, joint-embedding identity top-1 "
                 f"{(any_row.get('joint_identity_chance') or 0):.3f}; attributes (the commonest value): {chance}. "
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
