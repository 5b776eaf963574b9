"""Diffusion-stage fit checkpoints / live modules -> pipelines (and their folders):
SDXLJointModule -> FaceCLIPSDXLPipeline, FluxJointModule -> FaceT5FluxPipeline.

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
from faceclip_zoo.models.diffusers_models import build_diffusers
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


def flux_pipeline_from_module(module, use_ema: bool = True):
    """A FaceT5FluxPipeline sharing the module's encoders, VAE and transformer (an EMA copy
    of the transformer when kept)."""
    from faceclip_zoo.pipelines.components import FaceT5EncoderModel
    from faceclip_zoo.pipelines.flux import FaceT5FluxPipeline

    transformer = module.transformer
    if use_ema and module.ema is not None:
        transformer = copy.deepcopy(module.transformer)
        module.ema.copy_to(transformer.parameters())
    cond = module.condition
    return FaceT5FluxPipeline(
        vae=module.vae, face_encoder=FaceT5EncoderModel.from_encoder(cond.face_t5),
        tokenizer_2=cond.face_t5.tokenizer, text_encoder=cond.clip_text, tokenizer=cond.clip_tokenizer,
        transformer=transformer, scheduler=build_scheduler(module.scheduler_config),
    )


def flux_pipeline_from_checkpoint(checkpoint: dict, spec: dict, source: str, use_ema: bool = True):
    from faceclip_zoo.config import FaceT5Config
    from faceclip_zoo.models.facet5 import FaceT5Encoder
    from faceclip_zoo.models.text_encoders import build_clip_text_model, build_clip_tokenizer
    from faceclip_zoo.pipelines.components import FaceT5EncoderModel
    from faceclip_zoo.pipelines.flux import FaceT5FluxPipeline

    state, prefixes = checkpoint["state_dict"], spec["prefixes"]

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    encoder = FaceT5Encoder(FaceT5Config.from_dict(spec["encoder"]))
    if spec.get("t5_tokenizer"):
        encoder.set_tokenizer(spec["t5_tokenizer"])
    load_strict(encoder, part(prefixes["encoder"]), f"{source} [encoder]")
    clip_text = build_clip_text_model(spec["clip_text"])
    load_strict(clip_text, part(prefixes["clip_text"]), f"{source} [clip_text]")
    transformer, vae = build_diffusers(spec["transformer"]), build_diffusers(spec["vae"])
    weights = part(prefixes["transformer"])
    ema = checkpoint.get("faceclip_zoo", {}).get("ema")
    if use_ema and ema is not None:
        weights.update(ema["weights"])
    load_strict(transformer, weights, f"{source} [transformer]")
    load_strict(vae, part(prefixes["vae"]), f"{source} [vae]")
    return FaceT5FluxPipeline(
        vae=vae.eval(), face_encoder=FaceT5EncoderModel.from_encoder(encoder.eval()),
        tokenizer_2=encoder.tokenizer, text_encoder=clip_text.eval(),
        tokenizer=build_clip_tokenizer(spec.get("clip_tokenizer")), transformer=transformer.eval(),
        scheduler=build_scheduler(spec["scheduler"]),
    )


PIPELINE_KINDS = {"FaceCLIPSDXLPipeline": "sdxl_pipeline", "FaceT5FluxPipeline": "flux_pipeline"}


def save_pipeline(pipe, out: str | os.PathLike, recipe: str | None = None,
                  extra: dict | None = None) -> Path:
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    if recipe is not None:
        (out / "recipe.yaml").write_text(recipe)
    kind = PIPELINE_KINDS[type(pipe).__name__]
    (out / "faceclip_zoo.json").write_text(json.dumps({"kind": kind, **(extra or {})}, indent=2) + "\n")
    return out


def load_pipeline(folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """A saved pipeline folder (`export` output), local files only: FaceCLIPSDXLPipeline or
    FaceT5FluxPipeline, as its model_index.json says."""
    from faceclip_zoo.pipelines.flux import FaceT5FluxPipeline
    from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is not a pipeline folder (no model_index.json); create one with "
                        "`python -m faceclip_zoo export --ckpt <sdxl or flux fit checkpoint> --out <dir>`")
    name = json.loads((path / "model_index.json").read_text()).get("_class_name")
    classes = {"FaceCLIPSDXLPipeline": FaceCLIPSDXLPipeline, "FaceT5FluxPipeline": FaceT5FluxPipeline}
    if name not in classes:
        raise UserError(f"{path} holds a {name!r} pipeline; faceclip_zoo loads {sorted(classes)}")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    return classes[name].from_pretrained(str(path), local_files_only=True, **kwargs)
