"""Plain-torch models (no Lightning imports)."""

from faceclip_zoo.models.face_vit import FaceIDModel, FaceViT, FaceViTIdentity, OnnxArcFace
from faceclip_zoo.models.faceclip import FaceCLIPEncoder, JointOutput
from faceclip_zoo.models.io import load_model_dir, save_model_dir

__all__ = ["FaceCLIPEncoder", "FaceIDModel", "FaceViT", "FaceViTIdentity", "JointOutput",
           "OnnxArcFace", "load_model_dir", "save_model_dir"]
