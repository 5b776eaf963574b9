"""Model cards: every folder we write (`export`, ExportOnFitEnd, `convert`) carries a
README.md in the Hugging Face format (YAML metadata + markdown) saying what it is, how to
load it, what made it, the run's final metrics and a few of its sample images.

The card is rendered with huggingface_hub's ModelCard / ModelCardData, so it parses as the
Hub parses it. Only the text is ours.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from faceclip_zoo.utils import UserError

PROJECT_LICENSE = "apache-2.0"
# The release's weights are CC-BY-NC-4.0; anything derived from them keeps that licence.
RELEASE_LICENSE = "cc-by-nc-4.0"
RELEASE_REPO = "ByteDance/FaceCLIP"

# The kinds of folder that are not a pipeline family's (those describe themselves:
# pipelines/family.py CARD_SUMMARY, CARD_TAGS, PIPELINE_TAG)
KINDS = {
    # kind: (what it is, library_name, pipeline_tag, tags)
    "model_dir": ("a faceclip_zoo model directory (model.safetensors + config.json)",
                  "faceclip_zoo", "feature-extraction", ["encoder"]),
    "diffusers_model": ("a diffusers model folder converted from the official release", "diffusers",
                        "text-to-image", ["text-to-image"]),
    "lora": ("LoRA adapters for a faceclip_zoo pipeline in diffusers' format (pytorch_lora_weights.safetensors)",
             "diffusers", "text-to-image", ["lora", "text-to-image"]),
}

PIPELINE_LOAD = ("from faceclip_zoo.pipelines.export import load_pipeline\n"
                 "pipe = load_pipeline(\"{path}\")\n"
                 "{output} = pipe(\"a photo of a person in a red hat\", face_image=\"me.jpg\").{field}[0]")
LOAD = {
    "model_dir": ("from faceclip_zoo.models import load_model_dir\n"
                  "model = load_model_dir(\"{path}\")\n"
                  "# a FaceCLIP / FaceT5 encoder: model.encode([\"a photo of a person\"], aligned_faces)"),
    "diffusers_model": ("# a component of a pipeline: name it in an SDXL / FLUX recipe\n"
                        "# (model.init_args.unet or transformer: \"{path}\")"),
    "lora": ("from faceclip_zoo.pipelines.export import load_pipeline\n"
             "pipe = load_pipeline(\"{base}\")  # the pipeline the adapters were trained on\n"
             "pipe.load_lora_weights(\"{path}\")\n"
             "image = pipe(\"a photo of a person in a red hat\", face_image=\"me.jpg\").images[0]"),
}


@dataclass
class CardFacts:
    kind: str
    made_by: str  # one line: the command / checkpoint that wrote the folder
    what: str | None = None  # what the folder holds, when more precise than the kind's text
    from_release: bool = False  # weights derived from the official release
    base_model: str | None = None
    recipe: bool = False  # recipe.yaml beside the weights
    starts_from: list[Path] = field(default_factory=list)  # folders the run loaded weights from
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[Path] = field(default_factory=list)
    adapts: str | None = None  # LoRA folders: the pipeline folder the adapters belong to


def final_metrics(run_dir: Path | None) -> dict[str, float]:
    """The last logged value of every validation metric in a run's metrics.csv."""
    if run_dir is None or not (run_dir / "metrics.csv").is_file():
        return {}
    last: dict[str, float] = {}
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key and key.startswith("val") and value not in ("", None):
                    last[key] = float(value)
    return last


def run_samples(run_dir: Path | None, keep: int = 2) -> list[Path]:
    """The newest validation sample grids of a run (written by the diffusion tasks)."""
    if run_dir is None:
        return []
    return sorted((run_dir / "samples").glob("step-*.png"))[-keep:]


def lineage(folder: Path) -> tuple[bool, str | None]:
    """(derived from the release?, base_model) read from a folder's own card, so that a model
    trained from a converted release keeps the release's licence and names it as its base."""
    from huggingface_hub import ModelCard

    card = folder / "README.md"
    if not card.is_file():
        return False, None
    try:
        data = ModelCard.load(card).data
    except Exception:  # noqa: BLE001 - a README that is not a card says nothing about lineage
        return False, None
    from_release = data.license == RELEASE_LICENSE
    return from_release, data.base_model or (RELEASE_REPO if from_release else None)


def starting_points(recipe_text: str | None) -> list[Path]:
    """Folders a recipe loads weights from (encoders, UNet/transformer, VAE)."""
    if not recipe_text:
        return []
    import yaml

    try:
        args = (yaml.safe_load(recipe_text) or {}).get("model", {}).get("init_args", {}) or {}
    except yaml.YAMLError:
        return []
    keys = ("pipeline", "encoder", "encoder_l", "encoder_g", "unet", "unet_weights", "transformer",
            "transformer_weights", "vae_weights")
    found = [Path(str(args[k])) for k in keys if isinstance(args.get(k), str) and Path(str(args[k])).is_dir()]
    return list(dict.fromkeys(found))


def inherited_lineage(recipe_text: str | None) -> tuple[bool, str | None]:
    from_release, base = False, None
    for folder in starting_points(recipe_text):
        rel, b = lineage(folder)
        from_release = from_release or rel
        base = base or b
    return from_release, base


def render_card(folder: Path, facts: CardFacts) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    from faceclip_zoo.pipelines.family import pipeline_classes

    families = pipeline_classes()
    if facts.kind in families:
        family = families[facts.kind]
        (what, library, task, tags), load = (family.CARD_SUMMARY, "diffusers", family.PIPELINE_TAG,
                                             list(family.CARD_TAGS)), PIPELINE_LOAD
    elif facts.kind in KINDS:
        (what, library, task, tags), load = KINDS[facts.kind], LOAD[facts.kind]
    else:
        raise UserError(f"no model card for kind {facts.kind!r}; known: {sorted(KINDS) + sorted(families)}")
    what = facts.what or what
    video = facts.kind in families and families[facts.kind].OUTPUT == "frames"
    data = ModelCardData(
        license=RELEASE_LICENSE if facts.from_release else PROJECT_LICENSE,
        library_name=library, pipeline_tag=task,
        tags=["faceclip", "faceclip_zoo", "identity-preserving", *tags],
        base_model=facts.base_model,
    )
    lines = [f"# {folder.name}", "", f"This folder holds {what}, written by "
             "faceclip_zoo (an open training framework for FaceCLIP).", "",
             "## How to load", "", "```python", load.format(path=folder.as_posix(), base=facts.adapts or "<base pipeline>",
                                            output="frames" if video else "image",
                                            field="frames" if video else "images"), "```", ""]
    if facts.kind in families:
        lines += ["```bash", f"python -m faceclip_zoo generate --pipeline {folder.as_posix()} --face me.jpg "
                  f"--prompt \"a photo of a person in a red hat\" --out {'out.mp4' if video else 'out.png'}", "```", ""]
    lines += ["## Provenance", "", f"- Made by: {facts.made_by}",
              f"- Base model: {facts.base_model or 'none (trained from the recipe, no pre-trained base)'}"]
    if facts.starts_from:
        lines.append("- Starts from: " + ", ".join(f"`{p.as_posix()}`" for p in facts.starts_from))
    if facts.recipe:
        lines.append("- Recipe: `recipe.yaml` in this folder (`python -m faceclip_zoo fit --config recipe.yaml` "
                     "trains it again)")
    lines.append("")
    if facts.metrics:
        lines += ["## Metrics (last validation of the run)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(facts.metrics.items())] + [""]
    if facts.samples:
        shown = "generated frames" if video else "generated"
        lines += ["## Samples", "", f"Each row: reference face | real image | {shown}, fixed held-out pairs.", ""]
        lines += [f"![{p.stem}](samples/{p.name})" for p in facts.samples] + [""]
    licence = ("CC-BY-NC-4.0, the licence of the official FaceCLIP weights these derive from (non-commercial)"
               if facts.from_release else "Apache-2.0 (trained by this project's code; no third-party weights)")
    lines += ["## Licence", "", licence, ""]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)).content


def write_model_card(folder: str | Path, facts: CardFacts, final: str | Path | None = None) -> Path:
    """README.md (+ samples/) into `folder`; `final`: the path the folder will have (it is
    written under a temporary name first), which the card names."""
    folder = Path(folder)
    if facts.samples:
        (folder / "samples").mkdir(exist_ok=True)
        for p in facts.samples:
            shutil.copyfile(p, folder / "samples" / p.name)
    path = folder / "README.md"
    path.write_text(render_card(Path(final) if final is not None else folder, facts))
    return path


def describe_folder(folder: Path) -> tuple[str, str]:
    """(card kind, what it holds) of a folder we wrote, from its own config files."""
    own = json.loads((folder / "faceclip_zoo.json").read_text()) if (folder / "faceclip_zoo.json").is_file() else {}
    if own.get("kind") == "lora":
        return "lora", None
    if (folder / "model_index.json").is_file():
        from faceclip_zoo.pipelines.family import pipeline_classes

        name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        kinds = {cls.__name__: kind for kind, cls in pipeline_classes().items()}
        if name not in kinds:
            raise UserError(f"{folder} holds a {name!r} pipeline; faceclip_zoo writes cards for {sorted(kinds)}")
        return kinds[name], None
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if "model_type" in config and "format_version" in config:
        return "model_dir", f"a faceclip_zoo `{config['model_type']}` model directory (model.safetensors + config.json)"
    cls = config.get("_class_name") or ",".join(config.get("architectures", []))
    return "diffusers_model", f"a `{cls or 'model'}` folder in its library's own format (config.json + safetensors)"
