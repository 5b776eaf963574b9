"""diffusers pipelines and components of faceclip_zoo (import diffusers lazily)."""


def __getattr__(name: str):
    if name == "FaceCLIPEncoderModel":
        from faceclip_zoo.pipelines.components import FaceCLIPEncoderModel

        return FaceCLIPEncoderModel
    if name == "FaceCLIPSDXLPipeline":
        from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

        return FaceCLIPSDXLPipeline
    if name == "FaceT5FluxPipeline":
        from faceclip_zoo.pipelines.flux import FaceT5FluxPipeline

        return FaceT5FluxPipeline
    raise AttributeError(name)
