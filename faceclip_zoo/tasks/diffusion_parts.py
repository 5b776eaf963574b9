"""Where a diffusion task's components come from: named configs, our model directories,
diffusers folders, or the component folders of a pipeline folder (an `export` or `convert`
output) that a run starts from. Shared by every family's task (tasks/diffusion.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from faceclip_zoo.config import DIFFUSERS_CONFIGS, diffusers_config
from faceclip_zoo.models.io import read_config
from faceclip_zoo.utils import UserError, recipe_that_exports


def pipeline_parts(folder: str, pipeline_cls) -> dict[str, str]:
    """The task arguments a pipeline folder supplies (pipeline_cls.TRAINING_PARTS: component
    folder -> argument) -> argument: path."""
    path = Path(folder)
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"pipeline {folder} is not a pipeline folder (no model_index.json); give an `export` or "
                        "`convert` output")
    found = json.loads(index.read_text()).get("_class_name")
    if found != pipeline_cls.__name__:  # diffusers' own record of the folder's class
        raise UserError(f"pipeline {folder} holds a {found!r}; this task starts from a {pipeline_cls.__name__}")
    missing = [name for name in pipeline_cls.TRAINING_PARTS if not (path / name).is_dir()]
    if missing:
        raise UserError(f"pipeline {folder} lacks its {', '.join(missing)} folder(s)")
    return {argument: str(path / name) for name, argument in pipeline_cls.TRAINING_PARTS.items()}


def refuse_with_pipeline(pipeline: str | None, given: dict, defaults: dict) -> None:
    """A run that starts from a pipeline folder takes every component from it."""
    clash = sorted(k for k, v in given.items() if v != defaults[k])
    if pipeline and clash:
        raise UserError(f"pipeline {pipeline} supplies every component; leave {', '.join(clash)} unset "
                        "(or drop pipeline and name the components one by one)")


def load_model_weights(folder: Path, what: str):
    """The weights of a model directory (model.safetensors) or of our encoder component in
    a pipeline folder (diffusion_pytorch_model.safetensors, under `encoder.`), read lazily
    (models/weights.py) so a real-size encoder is loaded tensor by tensor."""
    from faceclip_zoo.models.weights import open_weights

    component = folder / "diffusion_pytorch_model.safetensors"
    if component.is_file() and not (folder / "model.safetensors").is_file():
        return open_weights(component, "diffusion_pytorch_model", what).under("encoder.")
    return open_weights(folder / "model.safetensors", "model", what)


def resolve_model_spec(spec: str, config_cls, model_type: str):
    """A named config (random init: tests, from-scratch runs), a faceclip_zoo model
    directory (an `export` or `convert` output) or the encoder component of a pipeline
    folder -> (config, weights dir or None)."""
    from faceclip_zoo.pipelines.components import encoder_component_classes

    path = Path(spec)
    if (path / "config.json").exists():
        meta = json.loads((path / "config.json").read_text())
        component = encoder_component_classes().get(meta.get("_class_name"))
        if component is not None:
            if component.MODEL_TYPE != model_type:
                raise UserError(f"{path} holds a {component.MODEL_TYPE!r} encoder; a {model_type!r} one is needed")
            return config_cls.from_dict(meta[component.CONFIG_KEY]), path
        found, cfg = read_config(path)
        if found != model_type:
            raise UserError(f"{path} holds a {found!r} model; a {model_type!r} directory is needed")
        return cfg, path
    try:
        return config_cls.from_name(spec), None
    except (KeyError, ValueError):
        recipe = recipe_that_exports(spec)
        if recipe:
            raise UserError(f"{spec} holds no {model_type} model yet; make it first with `python -m faceclip_zoo fit "
                            f"--config {recipe}`") from None
        raise UserError(f"{spec!r} is neither a {model_type} model directory (with config.json; run its "
                        "quickstart / export, or `convert` the release) nor a named config") from None


def resolve_scheduler_config(spec: str) -> dict[str, Any]:
    """A named scheduler config or a scheduler folder -> its config."""
    if spec in DIFFUSERS_CONFIGS:
        return diffusers_config(spec)
    path = Path(spec)
    for name in ("scheduler_config.json", "config.json"):
        if (path / name).exists():
            return json.loads((path / name).read_text())
    raise UserError(f"scheduler {spec!r} is neither a named config nor a folder with scheduler_config.json")


def build_face_t5(spec: str, t5_tokenizer: str | None):
    """The FaceT5 encoder of a family's task (FLUX, Wan): a named config (random init) or
    our model directory / encoder component, built without memory when its weights are
    named (filled in setup, load_face_t5), with its tokenizer: the given folder, else the
    encoder directory's `tokenizer/`. -> (encoder, its weights folder or None, the tokenizer
    folder used or None)."""
    from faceclip_zoo.config import FaceT5Config
    from faceclip_zoo.models.facet5 import FaceT5Encoder
    from faceclip_zoo.models.weights import empty_weights

    config, folder = resolve_model_spec(spec, FaceT5Config, "facet5")
    with empty_weights(folder is not None):
        face_t5 = FaceT5Encoder(config)
    if not t5_tokenizer and folder is not None and (folder / "tokenizer").is_dir():
        t5_tokenizer = str(folder / "tokenizer")
    if t5_tokenizer:
        face_t5.set_tokenizer(t5_tokenizer)
    return face_t5, folder, t5_tokenizer


def load_face_t5(module, face_t5, folder: Path | None) -> None:
    """The named FaceT5 weights into a task's encoder: frozen ones in the run's frozen dtype."""
    from faceclip_zoo.utils import load_strict

    if folder is not None:
        load_strict(face_t5, load_model_weights(folder, "encoder"), f"encoder {folder}",
                    dtype=None if module.hparams.train_encoders else module.frozen_dtype())
