"""What `bench --size` builds: tiny (CPU, seconds), base (GPU, real widths and fewer
layers), real (GPU, the released architectures where one GPU can train them).

Shrunk encoders are registered as named configs (`bench-...`), so the task modules build
them exactly as they build the released ones, from a name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from faceclip_zoo.config import FaceCLIPConfig, FaceT5Config


@dataclass(frozen=True)
class Size:
    name: str
    # encoder pre-training
    encoder: str
    clip: str
    encoder_batch: int
    # SDXL stage (encoder_l / encoder_g: FaceCLIP branches; image: training resolution)
    encoder_l: str
    encoder_g: str
    unet: str
    sdxl_vae: str
    sdxl_image: int
    sdxl_batch: int
    # FLUX stage
    facet5: str
    clip_text: str
    flux_transformer: str
    flux_vae: str
    flux_image: int
    flux_batch: int
    # inference
    pipeline_image: int
    pipeline_steps: int
    # data
    data_image: int
    data_samples: int
    loader_workers: int
    prepare_photos: int
    prepare_side: int
    repeats: int
    warmup: int = 2
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    clip_overrides: dict[str, Any] = field(default_factory=dict)
    unet_overrides: dict[str, Any] = field(default_factory=dict)
    flux_overrides: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _register_shrunk() -> None:
    """Real widths, fewer layers: what `base` trains in seconds on one GPU."""
    reg = FaceCLIPConfig.registry
    shrink = dict(text_layers=4, face_depth=4, fusion_layers=2)
    if "bench-faceclip-l14-base" not in reg:
        reg["bench-faceclip-l14-base"] = FaceCLIPConfig.from_name("faceclip-l14", name="bench-faceclip-l14-base",
                                                                   **shrink)
        reg["bench-faceclip-bigg14-base"] = FaceCLIPConfig.from_name(
            "faceclip-bigg14", name="bench-faceclip-bigg14-base", **shrink)
    # FaceT5's frozen T5-XXL (4.7 B parameters) only feeds cached embeddings in these
    # steps: two of its 24 layers keep the real width without holding 19 GB for nothing.
    if "bench-facet5-xxl-2layer" not in FaceT5Config.registry:
        FaceT5Config.registry["bench-facet5-xxl-2layer"] = FaceT5Config.from_name(
            "facet5-xxl", name="bench-facet5-xxl-2layer", t5_num_layers=2, t5_tokenizer="builtin-words",
            t5_vocab_size=320)


_register_shrunk()

SIZES: dict[str, Size] = {
    "tiny": Size(
        name="tiny", encoder="faceclip-tiny", clip="clip-tiny", encoder_batch=16,
        encoder_l="faceclip-tiny", encoder_g="faceclip-tiny", unet="sdxl-unet-tiny", sdxl_vae="vae-tiny",
        sdxl_image=64, sdxl_batch=4,
        facet5="facet5-tiny", clip_text="clip-text-tiny", flux_transformer="flux-transformer-tiny",
        flux_vae="vae-tiny", flux_image=64, flux_batch=4,
        pipeline_image=64, pipeline_steps=4,
        data_image=64, data_samples=64, loader_workers=1, prepare_photos=4, prepare_side=512, repeats=5,
        note="the quickstarts' tiny configs, CPU",
    ),
    "base": Size(
        name="base", encoder="bench-faceclip-l14-base", clip="clip-l14", encoder_batch=64,
        clip_overrides=dict(vision_layers=4, text_layers=4),
        encoder_l="bench-faceclip-l14-base", encoder_g="bench-faceclip-bigg14-base", unet="sdxl-unet",
        unet_overrides=dict(transformer_layers_per_block=[1, 1, 2]), sdxl_vae="sdxl-vae",
        sdxl_image=512, sdxl_batch=4,
        facet5="bench-facet5-xxl-2layer", clip_text="clip-l-text", flux_transformer="flux-dev-transformer",
        flux_overrides=dict(num_layers=2, num_single_layers=4), flux_vae="flux-vae", flux_image=512,
        flux_batch=2, pipeline_image=512, pipeline_steps=20,
        data_image=512, data_samples=256, loader_workers=4, prepare_photos=8, prepare_side=1024, repeats=10,
        note="real widths, 4 text/face layers, SDXL transformer depth [1,1,2], FLUX 2+4 blocks",
    ),
    "real": Size(
        name="real", encoder="faceclip-l14", clip="clip-l14", encoder_batch=64,
        encoder_l="faceclip-l14", encoder_g="faceclip-bigg14", unet="sdxl-unet", sdxl_vae="sdxl-vae",
        sdxl_image=1024, sdxl_batch=1,
        facet5="bench-facet5-xxl-2layer", clip_text="clip-l-text", flux_transformer="flux-dev-transformer",
        flux_overrides=dict(num_layers=4, num_single_layers=8), flux_vae="flux-vae", flux_image=1024,
        flux_batch=1, pipeline_image=1024, pipeline_steps=30,
        data_image=1024, data_samples=128, loader_workers=8, prepare_photos=16, prepare_side=1024, repeats=10,
        note="the released FaceCLIP-L/14, CLIP-L/14 and SDXL UNet; FLUX.1-dev widths with 4+8 of its "
             "19+38 blocks (the 12 B model's AdamW state alone exceeds one 80 GB GPU)",
    ),
}
