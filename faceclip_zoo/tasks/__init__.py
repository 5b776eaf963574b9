"""Lightning tasks (LightningModules); each holds plain-torch models from faceclip_zoo.models."""

from faceclip_zoo.tasks.callbacks import IdentityTSNE
from faceclip_zoo.tasks.encoder import FaceCLIPEncoderModule

__all__ = ["FaceCLIPEncoderModule", "IdentityTSNE"]
