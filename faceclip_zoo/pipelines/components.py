"""Pipeline components: diffusers-savable wrappers of our plain-torch encoders, the
scheduler of a config, and the denoiser's EMA weights of a task or checkpoint.

diffusers pipelines save and load only components derived from its ModelMixin; these
wrappers make a FaceCLIP branch / FaceT5 encoder such a component (config.json holds the FaceCLIPConfig,
weights live under `encoder.`), without making faceclip_zoo.models depend on diffusers.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from faceclip_zoo.config import FaceCLIPConfig, FaceT5Config
from faceclip_zoo.models.faceclip import FaceCLIPEncoder, JointOutput
from faceclip_zoo.models.facet5 import FaceT5Encoder
from faceclip_zoo.utils import UserError


class JointEncoderModel(ModelMixin, ConfigMixin):
    """One of our joint encoders as a diffusers component. Subclasses name the model type
    (as our model directories do), the config.json key of its config, and build `encoder`."""

    config_name = "config.json"
    MODEL_TYPE: str
    CONFIG_KEY: str

    @classmethod
    def from_encoder(cls, encoder) -> "JointEncoderModel":
        with torch.device("meta"):
            model = cls(**{cls.CONFIG_KEY: encoder.config.to_dict()})
        model.encoder = encoder
        return model

    @classmethod
    def from_export(cls, path: str | os.PathLike) -> "JointEncoderModel":
        """From one of our model directories (export or convert output)."""
        from faceclip_zoo.models.io import load_model_dir

        return cls.from_encoder(load_model_dir(path, expect=cls.MODEL_TYPE))

    def forward(self, face_images, input_ids, has_face, face_features=None) -> JointOutput:
        return self.encoder(face_images, input_ids, has_face, face_features=face_features)


class FaceCLIPEncoderModel(JointEncoderModel):
    """A FaceCLIP branch (config.json holds the FaceCLIPConfig)."""

    MODEL_TYPE, CONFIG_KEY = "faceclip", "faceclip_config"

    @register_to_config
    def __init__(self, faceclip_config: dict[str, Any] | None = None):
        super().__init__()
        self.encoder = FaceCLIPEncoder(FaceCLIPConfig.from_dict(faceclip_config) if faceclip_config
                                       else FaceCLIPConfig())


class FaceT5EncoderModel(JointEncoderModel):
    """The FaceT5 encoder (config.json holds the FaceT5Config; its T5 tokenizer is the
    pipeline's `tokenizer_2` component)."""

    MODEL_TYPE, CONFIG_KEY = "facet5", "facet5_config"

    @register_to_config
    def __init__(self, facet5_config: dict[str, Any] | None = None):
        super().__init__()
        self.encoder = FaceT5Encoder(FaceT5Config.from_dict(facet5_config) if facet5_config else FaceT5Config())


def face_t5_from_state(state: dict[str, torch.Tensor], spec: dict, source: str) -> FaceT5Encoder:
    """The FaceT5 encoder of a family's export entry (FLUX, Wan), loaded from a fit
    checkpoint's state."""
    from faceclip_zoo.utils import load_strict, state_under

    encoder = FaceT5Encoder(FaceT5Config.from_dict(spec["encoder"]))
    if spec.get("t5_tokenizer"):
        encoder.set_tokenizer(spec["t5_tokenizer"])
    load_strict(encoder, state_under(state, spec["prefixes"]["encoder"]), f"{source} [encoder]")
    return encoder


def encoder_component_classes() -> dict[str, type[JointEncoderModel]]:
    """Our encoder component classes by the `_class_name` their folders' config.json carries."""
    return {cls.__name__: cls for cls in JointEncoderModel.__subclasses__()}


class _NoTextEncoderNotes(logging.Filter):
    """diffusers' LoRA loaders note, for every adapter file, that it has no weights for the
    text encoders (SDXL's CLIPs, FLUX's CLIP and T5). Our adapters never touch them (and our
    SDXL pipeline has none), so those notes, and only those, are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


logging.getLogger("diffusers.loaders.lora_base").addFilter(_NoTextEncoderNotes())


def build_scheduler(config: dict[str, Any]):
    """The sampler named by a scheduler config's `_class_name` (the release: Euler)."""
    import diffusers

    name = config.get("_class_name", "EulerDiscreteScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(f"unknown diffusers scheduler class {name!r}")
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def ema_state(checkpoint: dict, use_ema: bool) -> dict[str, torch.Tensor]:
    """The EMA weights a fit checkpoint keeps for the denoiser (empty when none or unwanted)."""
    ema = checkpoint.get("faceclip_zoo", {}).get("ema")
    return dict(ema["weights"]) if use_ema and ema is not None else {}


def ema_copy(module, denoiser: torch.nn.Module, use_ema: bool) -> torch.nn.Module:
    """The denoiser of a live task, or a copy holding its EMA weights when kept."""
    if not use_ema or module.ema is None:
        return denoiser
    denoiser = copy.deepcopy(denoiser)
    module.ema.copy_to([p for p in denoiser.parameters() if p.requires_grad])  # all, or the adapters
    return denoiser


def quantize_components(pipe, mode: str, device=None) -> None:
    """Weight-only quantisation (torchao) of a pipeline's large components, the ones its
    class lists in QUANTIZABLE (the UNet; the FLUX transformer and FaceT5 with its T5),
    each moved to `device` piece by piece as it is quantised (default: where it is)."""
    from faceclip_zoo.models.adapters import quantize_frozen

    for name in pipe.QUANTIZABLE:
        quantize_frozen(getattr(pipe, name), mode, device)
