"""Pipeline folders: saving and loading any family's pipeline (the registry of families is
pipelines/family.py; each class builds itself from a task with `from_module` and
`from_checkpoint`).

A pipeline folder is diffusers' own layout (model_index.json, one sub-folder per
component with config + safetensors weights) plus recipe.yaml (the run's resolved recipe)
and faceclip_zoo.json (where it came from).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from faceclip_zoo.pipelines.family import pipeline_classes  # noqa: F401 (the registry, read from here too)
from faceclip_zoo.utils import UserError


def save_pipeline(pipe, out: str | os.PathLike, recipe: str | None = None,
                  extra: dict | None = None) -> Path:
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    if recipe is not None:
        (out / "recipe.yaml").write_text(recipe)
    (out / "faceclip_zoo.json").write_text(json.dumps({"kind": pipe.ZOO_KIND, **(extra or {})}, indent=2) + "\n")
    return out


def load_pipeline(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """A saved pipeline folder (`export` output), local files only: the family pipeline its
    model_index.json names (FaceCLIPSDXLPipeline, FaceT5FluxPipeline, FaceT5WanPipeline)."""
    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a pipeline folder (no model_index.json); create one with "
                        "`python -m faceclip_zoo export --ckpt <sdxl or flux fit checkpoint> --out <dir>`")
    cls = pipeline_class_of(path)
    from faceclip_zoo.utils import check_safetensors

    check_safetensors(sorted(path.rglob("*.safetensors")), f"pipeline {path}")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(str(path), local_files_only=True, **kwargs)


def pipeline_class_of(folder: str | os.PathLike) -> type:
    """The family pipeline class a pipeline folder holds (diffusers' _class_name in its
    model_index.json), without loading it."""
    path = Path(folder)
    name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    classes = {cls.__name__: cls for cls in pipeline_classes().values()}  # diffusers' _class_name
    if name not in classes:
        raise UserError(f"{path} holds a {name!r} pipeline; faceclip_zoo loads {sorted(classes)}")
    return classes[name]
