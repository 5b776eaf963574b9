"""open_clip text towers and CLIP models, built from our named configs, offline.

open_clip owns the architectures and the BPE tokenizer (whose vocabulary ships inside the
package); we only translate a TextTowerConfig / CLIPConfig into open_clip's config dicts.
"""

from __future__ import annotations

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower

from faceclip_zoo.config import CLIPConfig, TextTowerConfig
from faceclip_zoo.utils import UserError


def open_clip_text_cfg(cfg: TextTowerConfig) -> dict:
    base = open_clip.get_model_config(cfg.open_clip_name)
    if base is None:
        raise UserError(
            f"open_clip has no model config named {cfg.open_clip_name!r}; "
            f"see open_clip.list_models() for the names it knows"
        )
    text = dict(base["text_cfg"])
    text.update(width=cfg.width, layers=cfg.layers, heads=cfg.heads,
                context_length=cfg.context_length, vocab_size=cfg.vocab_size)
    return text


def build_text_tower(cfg: TextTowerConfig) -> torch.nn.Module:
    """An open_clip TextTransformer (token_embedding, positional_embedding, transformer,
    ln_final, text_projection)."""
    return _build_text_tower(cfg.embed_dim, CLIPTextCfg(**open_clip_text_cfg(cfg)), cfg.quick_gelu)


def build_tokenizer(cfg: TextTowerConfig):
    """open_clip's tokenizer for the tower. Built from the BPE file open_clip ships, so it
    works offline; the vocabulary size is checked because an empty tokenizer would
    otherwise fail silently."""
    tok = open_clip.get_tokenizer(cfg.open_clip_name, context_length=cfg.context_length)
    size = getattr(tok, "vocab_size", None)
    if size is None and hasattr(tok, "encoder"):
        size = len(tok.encoder)
    if size != cfg.vocab_size:
        raise UserError(
            f"tokenizer for {cfg.open_clip_name!r} has {size} tokens, the text tower expects "
            f"{cfg.vocab_size}; is the open_clip install complete?"
        )
    return tok


def build_clip(cfg: CLIPConfig) -> open_clip.CLIP:
    """An open_clip CLIP model (vision + text towers) of the given config, random init."""
    base = open_clip.get_model_config(cfg.text.open_clip_name) or {}
    vision = dict(base.get("vision_cfg", {}))
    v = cfg.vision
    vision.update(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                  layers=v.layers, head_width=v.head_width, mlp_ratio=v.mlp_ratio)
    return open_clip.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=CLIPVisionCfg(**vision),
        text_cfg=CLIPTextCfg(**open_clip_text_cfg(cfg.text)),
        quick_gelu=cfg.text.quick_gelu,
    )


TEXT_TOWER_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                   "text_projection")


def text_tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pick the text-tower tensors out of an open_clip CLIP state dict (plain CLIP keys,
    or CustomTextCLIP keys under `text.`)."""
    out = {}
    for key, value in state.items():
        bare = key[len("text."):] if key.startswith("text.") else key
        if bare.startswith(TEXT_TOWER_KEYS):
            out[bare] = value
    return out


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> the mean/std normalisation open_clip's image towers expect."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN, device=images.device, dtype=images.dtype)
    std = torch.tensor(OPENAI_DATASET_STD, device=images.device, dtype=images.dtype)
    return (images - mean[:, None, None]) / std[:, None, None]
