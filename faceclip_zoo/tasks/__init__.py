"""Lightning tasks (LightningModules); each holds plain-torch models from faceclip_zoo.models."""

from faceclip_zoo.tasks.callbacks import ExportOnFitEnd, IdentityTSNE
from faceclip_zoo.tasks.faceclip_encoder import FaceCLIPEncoderModule
from faceclip_zoo.tasks.facet5_encoder import FaceT5EncoderModule
from faceclip_zoo.tasks.resilience import LastGoodCheckpointIO, NonFiniteLoss

__all__ = ["ExportOnFitEnd", "FaceCLIPEncoderModule", "FaceT5EncoderModule", "FluxJointModule", "IdentityTSNE",
           "LastGoodCheckpointIO", "NonFiniteLoss", "SDXLJointModule", "WanJointModule"]


def __getattr__(name: str):
    # The diffusion stages import diffusers; only when a recipe names them.
    if name == "SDXLJointModule":
        from faceclip_zoo.tasks.sdxl import SDXLJointModule

        return SDXLJointModule
    if name == "FluxJointModule":
        from faceclip_zoo.tasks.flux import FluxJointModule

        return FluxJointModule
    if name == "WanJointModule":
        from faceclip_zoo.tasks.wan import WanJointModule

        return WanJointModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
