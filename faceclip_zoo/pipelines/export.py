"""SDXL fit checkpoints / live modules -> FaceCLIPSDXLPipeline (and its folder).

A pipeline folder is diffusers' own layout (model_index.json, one sub-folder per
component with config + safetensors weights) plus recipe.yaml (the run's resolved recipe)
and faceclip_zoo.json (where it came from).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from faceclip_zoo.config import FaceCLIPConfig
from faceclip_zoo.models.convert_diffusion import build_diffusers
from faceclip_zoo.models.faceclip import FaceCLIPEncoder
from faceclip_zoo.pipelines.components import FaceCLIPEncoderModel
from faceclip_zoo.utils import UserError, load_strict


def build_scheduler(config: dict[str, Any]):
    """The sampler named by a scheduler config's `_class_name` (the release: Euler)."""
    import diffusers

    name = config.get("_class_name", "EulerDiscreteScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(f"unknown diffusers scheduler class {name!r}")
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def pipeline_from_module(module, use_ema: bool = True):
    """A pipeline sharing the module's encoders, VAE and UNet (an EMA copy of the UNet
    when the module keeps an EMA and use_ema is set)."""
    from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

    unet = module.unet
    if use_ema and module.ema is not None:
        unet = copy.deepcopy(module.unet)
        module.ema.copy_to(unet.parameters())
    return FaceCLIPSDXLPipeline(
        vae=module.vae,
        face_encoder=FaceCLIPEncoderModel.from_encoder(module.condition.branch_l),
        face_encoder_2=FaceCLIPEncoderModel.from_encoder(module.condition.branch_g),
        unet=unet, scheduler=build_scheduler(module.scheduler_config),
    )


def pipeline_from_checkpoint(checkpoint: dict, spec: dict, source: str, use_ema: bool = True):
    """Rebuild the pipeline from a fit checkpoint's state dict and its export entry."""
    from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

    state = checkpoint["state_dict"]

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    prefixes = spec["prefixes"]
    encoders = []
    for name in ("encoder_l", "encoder_g"):
        encoder = FaceCLIPEncoder(FaceCLIPConfig.from_dict(spec[name]))
        load_strict(encoder, part(prefixes[name]), f"{source} [{name}]")
        encoders.append(FaceCLIPEncoderModel.from_encoder(encoder.eval()))
    unet, vae = build_diffusers(spec["unet"]), build_diffusers(spec["vae"])
    unet_state = part(prefixes["unet"])
    ema = checkpoint.get("faceclip_zoo", {}).get("ema")
    if use_ema and ema is not None:
        unet_state.update(ema["weights"])
    load_strict(unet, unet_state, f"{source} [unet]")
    load_strict(vae, part(prefixes["vae"]), f"{source} [vae]")
    return FaceCLIPSDXLPipeline(vae=vae.eval(), face_encoder=encoders[0], face_encoder_2=encoders[1],
                                unet=unet.eval(), scheduler=build_scheduler(spec["scheduler"]))


def save_pipeline(pipe, out: str | os.PathLike, recipe: str | None = None,
                  extra: dict | None = None) -> Path:
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    if recipe is not None:
        (out / "recipe.yaml").write_text(recipe)
    (out / "faceclip_zoo.json").write_text(json.dumps({"kind": "sdxl_pipeline", **(extra or {})}, indent=2) + "\n")
    return out


def load_pipeline(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """A saved FaceCLIPSDXLPipeline folder (`export` output), local files only."""
    from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a pipeline folder (no model_index.json); create one with "
                        "`python -m faceclip_zoo export --ckpt <sdxl fit checkpoint> --out <dir>`")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    return FaceCLIPSDXLPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
