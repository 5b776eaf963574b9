"""The diffusers model factory: named configs or diffusers folders -> diffusers models
(SDXL UNet, FLUX transformer, AutoencoderKL), and their weights from a folder, a
safetensors file or a release pickle. Used by the tasks, the pipelines and conversion."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from faceclip_zoo.config import DIFFUSERS_CONFIGS, diffusers_config
from faceclip_zoo.utils import UserError, load_strict, load_weights_file, require_file

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def diffusers_class(config: dict[str, Any]):
    import diffusers

    name = config.get("_class_name")
    if name not in ("UNet2DConditionModel", "FluxTransformer2DModel", "AutoencoderKL", "WanTransformer3DModel",
                    "AutoencoderKLWan"):
        raise UserError(f"unsupported diffusers model class {name!r}")
    return getattr(diffusers, name)


def build_diffusers(config: dict[str, Any]) -> torch.nn.Module:
    """A diffusers model of the given config dict (with `_class_name`), random init."""
    return diffusers_class(config).from_config({k: v for k, v in config.items() if k != "_class_name"})


def load_diffusers_weights(model: torch.nn.Module, source: str | os.PathLike, what: str,
                           dtype: torch.dtype | None = None) -> None:
    """Weights from a diffusers folder (one file or shards), a safetensors file or a release
    pickle (weights only), strictly checked; read tensor by tensor into a model built with
    `empty_weights` (models/weights.py), cast to `dtype`."""
    from faceclip_zoo.models.weights import open_weights

    p = require_file(source, what)
    if p.is_dir() or p.suffix == ".safetensors":
        state = open_weights(p, WEIGHTS_NAME.removesuffix(".safetensors"), what)
        state = state.renamed(lambda k: k[len("model."):] if k.startswith("model.") else k)
    else:
        state = load_weights_file(p, what)
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    load_strict(model, state, f"{what} {p}", dtype=dtype)


def check_same_architecture(model: torch.nn.Module, folder: str | os.PathLike, what: str) -> None:
    """A diffusers folder's config.json must describe the model its weights go into: some
    settings (GroupNorm groups, attention heads) change no weight shape, so a strict load
    alone would accept weights made for another architecture."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    ours = json.loads(json.dumps(dict(model.config), default=list))
    differ = sorted(k for k in saved.keys() & ours.keys() if not k.startswith("_") and saved[k] != ours[k])
    if differ:
        detail = ", ".join(f"{k}: {saved[k]} there, {ours[k]} here" for k in differ)
        raise UserError(f"{what} {folder} were made for another architecture ({detail}); remake them with the "
                        "recipe that made them, or set this recipe's config (e.g. unet_overrides) to match")


def build_diffusers_on_meta(config: dict[str, Any]) -> torch.nn.Module:
    with torch.device("meta"):
        return build_diffusers(config)


def resolve_diffusers_config(spec: str, what: str) -> dict[str, Any]:
    """A named config (`sdxl-unet`), or a diffusers folder whose config.json says it."""
    if spec in DIFFUSERS_CONFIGS:
        return diffusers_config(spec)
    path = Path(spec)
    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text())
        return {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
    raise UserError(f"{what} {spec!r} is neither a named config ({sorted(DIFFUSERS_CONFIGS)}) "
                    "nor a diffusers folder with a config.json")
