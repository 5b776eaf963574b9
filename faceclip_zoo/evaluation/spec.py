"""Benchmark specs: which identities and prompts to generate, and how to score them.

A spec is a YAML file; relative paths are relative to the file. Two shapes, combinable:

    # the paper's Internal-v1 shape: every identity x every prompt
    identities:                      # name -> one reference image or several of one person
      alice: [alice/1.jpg, alice/2.jpg]
    identities_dir: people/          # or: one sub-folder per identity, all its images are references
    prompts: ["a photo of a person reading a book in a cafe", ...]
    prompts_file: prompts.txt        # or: one prompt per line

    # the paper's Unsplash-50 shape: a portrait and its caption
    pairs:                           # explicit pairs (identity defaults to the image's name)
      - {reference: portraits/p01.jpg, prompt: "a man in a grey coat ...", identity: p01}
    portraits_dir: portraits/        # or: <name>.jpg + <name>.txt caption, each its own reference

    images_per_prompt: 1             # seeds per (identity, prompt)
    seed: 0
    batch_size: 4
    generation: {steps: 50, guidance: null, distilled_guidance: null, height: null, width: null,
                 negative_prompt: null, align: auto,   # null: the release's negative text
                 face: reference}                      # zeroed: the no-identity control
    face_sim: {model: "onnx:/models/w600k_r50.onnx", locator: detect, detector: auto,
               detector_model_dir: null, reference_locator: null}
    clip_t: {model: "open_clip:ViT-L-14:/models/open_clip_model.safetensors"}
    fid: {reference_dir: real_photos/, features: "inception:/models/pt_inception-2015-12-05.pth"}
    sheets: {rows: 4, columns: 8}

A metric section left out is not computed. Model strings are described in
faceclip_zoo/evaluation/models.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from faceclip_zoo.utils import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Generation:
    steps: int = 50
    guidance: float | None = None  # SDXL guidance_scale / FLUX true CFG; None = the pipeline's default
    distilled_guidance: float | None = None  # FLUX.1-dev's guidance input
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    align: str = "auto"  # how the pipeline aligns the references: auto | always | never
    # reference: condition on the identity's references; zeroed: the face input zeroed, the
    # same prompts and seeds (the control a Face Sim is read against)
    face: str = "reference"


@dataclass
class FaceSim:
    model: str = ""  # "onnx:<file>" | "face-vit:<dir>" | "encoder:<dir>"
    locator: str = "detect"  # where the face of a generated image is: detect | synthetic-scene | aligned
    detector: str = "auto"  # mtcnn | insightface | auto (insightface when detector_model_dir has a pack)
    detector_model_dir: str | None = None
    reference_locator: str | None = None  # default: aligned when generation.align is never, else detect


@dataclass
class ClipT:
    model: str = ""  # "open_clip:<arch>:<weights>" | "transformers:<dir>" | "zoo:<dir>"


@dataclass
class Fid:
    reference_dir: str = ""
    features: str = "inception"  # "inception:<weights file>" | "clip" (the clip_t model's image tower)


@dataclass
class Sheets:
    rows: int = 4
    columns: int = 8  # generations per row, after the reference


@dataclass(frozen=True)
class Job:
    """One image to generate and score."""

    identity: str
    references: tuple[str, ...]
    prompt: str
    prompt_index: int
    sample: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.identity}/{self.prompt_index:04d}-{self.sample}"


@dataclass
class BenchmarkSpec:
    path: str = ""
    identities: dict[str, list[str]] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    pairs: list[dict[str, str]] = field(default_factory=list)
    images_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 4
    generation: Generation = field(default_factory=Generation)
    face_sim: FaceSim | None = None
    clip_t: ClipT | None = None
    fid: Fid | None = None
    sheets: Sheets = field(default_factory=Sheets)

    def jobs(self) -> list[Job]:
        jobs = []
        for identity, refs in self.identities.items():
            for pi, prompt in enumerate(self.prompts):
                jobs += self._samples(identity, tuple(refs), prompt, pi)
        for i, pair in enumerate(self.pairs):  # numbered after the shared prompts: names stay unique
            jobs += self._samples(pair["identity"], (pair["reference"],), pair["prompt"], len(self.prompts) + i)
        return jobs

    def _samples(self, identity: str, refs: tuple[str, ...], prompt: str, pi: int) -> list[Job]:
        # The seed depends on what is generated, not on its position, so batching,
        # resuming and adding prompts never change an image.
        return [Job(identity, refs, prompt, pi, k,
                    self.seed + zlib.crc32(f"{identity}|{prompt}|{k}".encode()) % 2**31)
                for k in range(self.images_per_prompt)]

    def generation_settings(self) -> dict[str, Any]:
        """What the images depend on (checked when a run is resumed)."""
        generation = dataclasses.asdict(self.generation)
        if generation["face"] == "reference":
            del generation["face"]  # folders generated before the option existed stay valid
        return {"generation": generation, "seed": self.seed}


SECTIONS = {"generation": Generation, "face_sim": FaceSim, "clip_t": ClipT, "fid": Fid, "sheets": Sheets}
TOP_KEYS = {"identities", "identities_dir", "prompts", "prompts_file", "pairs", "portraits_dir",
            "images_per_prompt", "seed", "batch_size", *SECTIONS}


def _section(cls, value: Any, where: str):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**value)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def safe_name(name: str) -> str:
    """An identity name usable as a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "identity"


def load_spec(path: str | Path) -> BenchmarkSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"benchmark spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"benchmark spec {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"benchmark spec {path} must be a mapping of keys")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise UserError(f"benchmark spec {path}: unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    base = path.parent

    def resolve(p: str, what: str, folder: bool = False) -> str:
        q = Path(p) if Path(p).is_absolute() else base / p
        if not (q.is_dir() if folder else q.is_file()):
            raise UserError(f"benchmark spec {path}: {what} {p} not found (relative paths are relative to the spec)")
        return str(q)

    spec = BenchmarkSpec(path=str(path))
    for name, refs in (raw.get("identities") or {}).items():
        refs = [refs] if isinstance(refs, str) else list(refs)
        spec.identities[safe_name(name)] = [resolve(r, f"reference of identity {name!r}") for r in refs]
    if raw.get("identities_dir"):
        root = Path(resolve(raw["identities_dir"], "identities_dir", folder=True))
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            images = _images_in(sub)
            if images:
                spec.identities[safe_name(sub.name)] = [str(p) for p in images]
    spec.prompts = [str(p) for p in raw.get("prompts") or []]
    if raw.get("prompts_file"):
        lines = Path(resolve(raw["prompts_file"], "prompts_file")).read_text().splitlines()
        spec.prompts += [line.strip() for line in lines if line.strip()]
    for i, pair in enumerate(raw.get("pairs") or []):
        if not isinstance(pair, dict) or not {"reference", "prompt"} <= set(pair):
            raise UserError(f"benchmark spec {path}: pairs[{i}] needs `reference` and `prompt`")
        ref = resolve(pair["reference"], f"pairs[{i}].reference")
        spec.pairs.append({"reference": ref, "prompt": str(pair["prompt"]),
                           "identity": safe_name(pair.get("identity") or Path(ref).stem)})
    if raw.get("portraits_dir"):
        for image in _images_in(Path(resolve(raw["portraits_dir"], "portraits_dir", folder=True))):
            caption = image.with_suffix(".txt")
            if not caption.is_file():
                raise UserError(f"portrait {image} has no caption file {caption.name}")
            spec.pairs.append({"reference": str(image), "prompt": caption.read_text().strip(),
                               "identity": safe_name(image.stem)})
    for key in ("images_per_prompt", "seed", "batch_size"):
        if key in raw:
            setattr(spec, key, int(raw[key]))
    for key, cls in SECTIONS.items():
        value = _section(cls, raw.get(key), f"benchmark spec {path}: {key}")
        if value is not None:
            setattr(spec, key, value)
    if spec.identities and not spec.prompts:
        raise UserError(f"benchmark spec {path}: identities are given but no prompts")
    if not spec.jobs():
        raise UserError(f"benchmark spec {path} lists nothing to generate: give identities + prompts, "
                        "pairs or portraits_dir")
    if spec.images_per_prompt < 1 or spec.batch_size < 1:
        raise UserError(f"benchmark spec {path}: images_per_prompt and batch_size must be at least 1")
    if spec.fid is not None:
        spec.fid.reference_dir = resolve(spec.fid.reference_dir, "fid.reference_dir", folder=True)
    return spec


def describe(spec: BenchmarkSpec) -> dict[str, Any]:
    """The spec as plain data (stored in results.json)."""
    out = dataclasses.asdict(spec)
    out["jobs"] = len(spec.jobs())
    return json.loads(json.dumps(out))
