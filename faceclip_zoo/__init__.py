"""faceclip_zoo: training, conversion and inference for identity-preserving text-to-image
models (FaceCLIP joint ID-text encoders; SDXL and FLUX stages)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # diffusers loads a saved pipeline's components by (library, class) from
    # model_index.json, i.e. `faceclip_zoo.FaceCLIPEncoderModel`; imported lazily so that
    # `import faceclip_zoo` stays light.
    if name in ("FaceCLIPEncoderModel", "FaceCLIPSDXLPipeline"):
        from faceclip_zoo import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'faceclip_zoo' has no attribute {name!r}")
