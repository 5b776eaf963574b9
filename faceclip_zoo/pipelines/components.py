"""diffusers-savable wrappers of our plain-torch encoders.

diffusers pipelines save and load only components derived from its ModelMixin; these
wrappers make a FaceCLIP branch / FaceT5 encoder such a component (config.json holds the FaceCLIPConfig,
weights live under `encoder.`), without making faceclip_zoo.models depend on diffusers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from faceclip_zoo.config import FaceCLIPConfig, FaceT5Config
from faceclip_zoo.models.faceclip import FaceCLIPEncoder, JointOutput
from faceclip_zoo.models.facet5 import FaceT5Encoder


class FaceCLIPEncoderModel(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, faceclip_config: dict[str, Any] | None = None):
        super().__init__()
        cfg = FaceCLIPConfig.from_dict(faceclip_config) if faceclip_config else FaceCLIPConfig()
        self.encoder = FaceCLIPEncoder(cfg)

    @classmethod
    def from_encoder(cls, encoder: FaceCLIPEncoder) -> "FaceCLIPEncoderModel":
        with torch.device("meta"):
            model = cls(faceclip_config=encoder.config.to_dict())
        model.encoder = encoder
        return model

    @classmethod
    def from_export(cls, path: str | os.PathLike) -> "FaceCLIPEncoderModel":
        """From one of our model directories (export or convert output)."""
        from faceclip_zoo.models.io import load_model_dir

        return cls.from_encoder(load_model_dir(path, expect="faceclip"))

    def forward(self, face_images, input_ids, has_face, face_features=None) -> JointOutput:
        return self.encoder(face_images, input_ids, has_face, face_features=face_features)


class FaceT5EncoderModel(ModelMixin, ConfigMixin):
    """The FaceT5 encoder as a diffusers component (config.json holds the FaceT5Config;
    its T5 tokenizer is the pipeline's `tokenizer_2` component)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, facet5_config: dict[str, Any] | None = None):
        super().__init__()
        cfg = FaceT5Config.from_dict(facet5_config) if facet5_config else FaceT5Config()
        self.encoder = FaceT5Encoder(cfg)

    @classmethod
    def from_encoder(cls, encoder: FaceT5Encoder) -> "FaceT5EncoderModel":
        with torch.device("meta"):
            model = cls(facet5_config=encoder.config.to_dict())
        model.encoder = encoder
        return model

    def forward(self, face_images, input_ids, has_face, face_features=None) -> JointOutput:
        return self.encoder(face_images, input_ids, has_face, face_features=face_features)
