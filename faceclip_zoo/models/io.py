"""Self-describing model directories: model.safetensors + config.json (+ recipe.yaml).

    save_model_dir(encoder, "out/", recipe="...yaml text...")
    encoder = load_model_dir("out/")
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from faceclip_zoo.config import CLIPConfig, FaceCLIPConfig, FaceViTConfig
from faceclip_zoo.utils import UserError, load_strict, require_file

FORMAT_VERSION = 1


def _builders() -> dict[str, tuple[type, Callable[[Any], torch.nn.Module]]]:
    from faceclip_zoo.models.face_vit import FaceViT
    from faceclip_zoo.models.faceclip import FaceCLIPEncoder
    from faceclip_zoo.models.clip import build_clip

    return {
        "faceclip": (FaceCLIPConfig, FaceCLIPEncoder),
        "face_vit": (FaceViTConfig, FaceViT),
        "clip": (CLIPConfig, build_clip),
    }


def model_type_of(module: torch.nn.Module) -> str:
    names = {"FaceCLIPEncoder": "faceclip", "FaceViT": "face_vit", "CLIP": "clip"}
    try:
        return names[type(module).__name__]
    except KeyError:
        raise TypeError(f"no model directory format for {type(module).__name__}") from None


def save_model_dir(
    module: torch.nn.Module, out_dir: str | os.PathLike, config=None,
    recipe: str | None = None, extra: dict | None = None,
) -> Path:
    """Write weights, config and (optionally) the recipe that made them. Files are written
    to temporary names first and renamed, so a crash never leaves a half-written model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else module.config
    meta = {"format_version": FORMAT_VERSION, "model_type": model_type_of(module),
            "config": config.to_dict(), **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    files = {"model.safetensors": lambda p: save_file(state, p, metadata={"format": "pt"}),
             "config.json": lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n")}
    if recipe is not None:
        files["recipe.yaml"] = lambda p: Path(p).write_text(recipe)
    for name, write in files.items():
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        os.close(fd)
        write(tmp)
        os.replace(tmp, out / name)
    return out


def read_config(model_dir: str | os.PathLike) -> tuple[str, Any]:
    path = require_file(Path(model_dir) / "config.json", "model config")
    try:
        meta = json.loads(path.read_text())
        model_type = meta["model_type"]
        cfg_cls, _ = _builders()[model_type]
        return model_type, cfg_cls.from_dict(meta["config"])
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path} is not a faceclip_zoo model config ({exc})") from None


def load_model_dir(model_dir: str | os.PathLike, expect: str | None = None) -> torch.nn.Module:
    """Rebuild a model from its directory alone (strict key and shape check)."""
    model_type, cfg = read_config(model_dir)
    if expect is not None and model_type != expect:
        raise UserError(f"{model_dir} holds a {model_type!r} model, expected {expect!r}")
    _, build = _builders()[model_type]
    module = build(cfg)
    weights = require_file(Path(model_dir) / "model.safetensors", "model weights")
    load_strict(module, load_file(str(weights)), str(weights))
    if not hasattr(module, "config"):
        module.config = cfg
    return module.eval()
