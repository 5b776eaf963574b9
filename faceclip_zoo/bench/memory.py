"""`bench --only memory`: what the one-GPU LoRA recipes hold in GPU memory, estimated from
parameter counts (no GPU needed).

The models are the released architectures (SDXL's UNet and VAE with the FaceCLIP-L/14 and
bigG/14 branches; FLUX.1-dev's transformer and VAE with FaceT5-XXL and CLIP-L; Wan2.1-T2V-1.3B's
transformer and VAE with FaceT5 on umT5-XXL), built on
the meta device, so every count is exact. Bytes per parameter: a frozen weight 2 (bf16) or,
with int8 weight-only quantisation, 1 for a quantised Linear weight plus its per-row bf16
scale; a trained adapter weight 4 (fp32) + 4 (gradient) + 8 (AdamW's two moments) or + 2
with an 8-bit AdamW. Activations are not parameters: they are listed as what they are, not
estimated here (docs/lora.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

GIB = 1024 ** 3


@dataclass
class Part:
    name: str
    params: int
    bytes: float
    trains: bool = False


def frozen_bytes(module: torch.nn.Module, quantize: bool, quantizable: bool = True) -> float:
    """bf16 weights; with int8, a Linear's weight takes 1 byte per entry + a bf16 scale per row."""
    total = 0.0
    seen = set()
    for m in module.modules():
        if quantize and quantizable and type(m) is torch.nn.Linear:
            total += m.weight.numel() + 2 * m.weight.shape[0]
            seen.add(id(m.weight))
    for p in module.parameters():
        if id(p) not in seen:
            total += 2 * p.numel()
    return total


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_footprint(kind: Literal["sdxl", "flux", "wan"], rank: int, quantize: bool,
                   optimizer_8bit: bool = False) -> list[Part]:
    """The parts of a LoRA run of the released sizes and their resident bytes."""
    from faceclip_zoo.config import FaceCLIPConfig, FaceT5Config, diffusers_config
    from faceclip_zoo.models.adapters import LoraSettings, add_lora
    from faceclip_zoo.models.diffusers_models import build_diffusers

    denoiser_name = "unet" if kind == "sdxl" else "transformer"
    with torch.device("meta"):
        if kind == "sdxl":
            from faceclip_zoo.models.faceclip import FaceCLIPEncoder

            denoiser = build_diffusers(diffusers_config("sdxl-unet"))
            frozen = {"FaceCLIP-L/14 branch": (FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-l14")), False),
                      "FaceCLIP-bigG/14 branch": (FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-bigg14")), False),
                      "SDXL VAE": (build_diffusers(diffusers_config("sdxl-vae")), False)}
        elif kind == "wan":  # Wan2.1-T2V-1.3B with FaceT5 on umT5-XXL (Wan's own text encoder)
            from faceclip_zoo.models.facet5 import FaceT5Encoder

            denoiser = build_diffusers(diffusers_config("wan-1.3b-transformer"))
            face_t5 = FaceT5Encoder(FaceT5Config.from_name("facet5-umt5-xxl"))
            t5_params = _count(face_t5.t5_encoder)
            frozen = {"FaceT5-umT5-XXL: its umT5 encoder (quantised with the base)": (face_t5.t5_encoder, True),
                      "FaceT5-umT5-XXL: face ViT, projections, fuser": (face_t5, False),
                      "Wan VAE": (build_diffusers(diffusers_config("wan-vae")), False)}
        else:
            from faceclip_zoo.config import CLIP_TEXT_CONFIGS
            from faceclip_zoo.models.facet5 import FaceT5Encoder
            from faceclip_zoo.models.text_encoders import build_clip_text_model

            denoiser = build_diffusers(diffusers_config("flux-dev-transformer"))
            face_t5 = FaceT5Encoder(FaceT5Config.from_name("facet5-xxl"))
            t5_params = _count(face_t5.t5_encoder)
            frozen = {"FaceT5-XXL: its T5 encoder (quantised with the base)": (face_t5.t5_encoder, True),
                      "FaceT5-XXL: face ViT, projections, fuser": (face_t5, False),
                      "CLIP-L text (pooled)": (build_clip_text_model(CLIP_TEXT_CONFIGS["clip-l-text"]), False),
                      "FLUX VAE": (build_diffusers(diffusers_config("flux-vae")), False)}
        base_params = _count(denoiser)
        base_bytes = frozen_bytes(denoiser, quantize)
        add_lora(denoiser, LoraSettings(rank=rank), denoiser_name)
    adapters = sum(p.numel() for n, p in denoiser.named_parameters() if "lora_" in n)
    label = "int8 weight-only" if quantize else "bf16"
    parts = [Part(f"{denoiser_name} ({label})", base_params, base_bytes)]
    for name, (module, quantizable) in frozen.items():
        if ": face ViT" in name:  # the encoder minus its T5 (counted above)
            params = _count(module) - t5_params
            parts.append(Part(name, params, 2.0 * params))
        else:
            parts.append(Part(name + ("" if not (quantize and quantizable) else ", int8"), _count(module),
                              frozen_bytes(module, quantize, quantizable)))
    per_param = 4 + 4 + (2 if optimizer_8bit else 8)
    parts.append(Part(f"LoRA rank {rank} adapters: fp32 weights + grads + {'8-bit ' if optimizer_8bit else ''}AdamW",
                      adapters, float(per_param * adapters), trains=True))
    return parts


def markdown_table(parts: list[Part]) -> str:
    lines = ["| part | parameters | GiB |", "|---|---|---|"]
    lines += [f"| {p.name} | {p.params / 1e9:.3f} B | {p.bytes / GIB:.2f} |" for p in parts]
    lines.append(f"| **total before activations** | {sum(p.params for p in parts) / 1e9:.3f} B | "
                 f"**{sum(p.bytes for p in parts) / GIB:.2f}** |")
    return "\n".join(lines)


# The recipes' settings (recipes/<name>.yaml)
RECIPES = {"faceclip-sdxl/lora-24gb": dict(kind="sdxl", rank=32, quantize=False, optimizer_8bit=True),
           "facet5-flux/lora-24gb": dict(kind="flux", rank=16, quantize=True, optimizer_8bit=True),
           "facet5-wan/lora-24gb": dict(kind="wan", rank=32, quantize=True, optimizer_8bit=True)}


def run() -> dict[str, list[Part]]:
    out = {}
    for recipe, settings in RECIPES.items():
        parts = lora_footprint(**settings)
        print(f"\nrecipes/{recipe}.yaml: estimate from parameter counts (not measured), activations not included\n")
        print(markdown_table(parts))
        out[recipe] = parts
    return out
