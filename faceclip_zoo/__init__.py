"""faceclip_zoo: training, conversion and inference for identity-preserving text-to-image
models (FaceCLIP joint ID-text encoders; SDXL and FLUX stages)."""

__version__ = "0.1.0"
