"""FaceT5: the joint ID-text encoder of FaceCLIP's FLUX model (docs/design.md, "FaceT5 for FLUX").

    text  = T5 v1.1 encoder(prompt padded to text_length)          [B, 512, 4096] (frozen)
    face  = face_patch_proj(face ViT patches), pos = face_pos_proj(ViT pos_embed)
    e     = fuser(text, sinusoidal text positions, face, face positions)  [B, 512, 4096]

e is FLUX's prompt_embeds. Unlike the CLIP branches there is no id-token prefix: the
identity enters only through the fused face patches; rows without a face see a black
image (the release's unconditional branch). Module names follow the release's
`FaceT5Encoder` (`face_encoder`, `t5_encoder`, `face_patch_proj`, `face_pos_proj`,
`positional_embedding`, `fuser`); the T5 sits in transformers' T5EncoderModel layout.
"""

from __future__ import annotations

import math
import os
from typing import Collection, Sequence

import torch
from torch import nn

from faceclip_zoo.config import FaceT5Config
from faceclip_zoo.models.face_vit import FaceViT
from faceclip_zoo.models.faceclip import FaceCLIPEncoder, JointOutput
from faceclip_zoo.models.fusion import FaceTextFuser
from faceclip_zoo.models.text_encoders import build_t5_encoder, build_t5_tokenizer, t5_token_ids
from faceclip_zoo.models.weights import empty_weights

# transformers ties T5's input embedding to `shared`; the state dict lists it twice. Ours
# stores it once (safetensors files would otherwise hold the 0.5 GB table twice).
TIED_KEY = "t5_encoder.encoder.embed_tokens.weight"
SHARED_KEY = "t5_encoder.shared.weight"


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Fixed transformer positions [1, length, dim]: sin on even, cos on odd channels."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe[None]


class T5PromptTokenizer:
    """FaceT5's tokenisation (no prefix), callable as (prompts, has_face) like the CLIP
    branches' PrefixedTokenizer."""

    def __init__(self, tokenizer, length: int):
        self.tokenizer, self.length = tokenizer, length

    def __call__(self, prompts: Sequence[str], has_face=None) -> torch.Tensor:
        return t5_token_ids(self.tokenizer, list(prompts), self.length)


class FaceT5Encoder(nn.Module):
    def __init__(self, config: FaceT5Config, tokenizer=None, empty_parts: Collection[str] = ()):
        """`empty_parts`: of "face_encoder", "t5_encoder", the frozen backbones to build
        without memory (models/weights.py), for a caller that loads their weights next."""
        super().__init__()
        self.config = config
        w = config.width
        with empty_weights("face_encoder" in empty_parts):
            self.face_encoder = FaceViT(config.face)
        with empty_weights("t5_encoder" in empty_parts):
            self.t5_encoder = build_t5_encoder(config.t5)
        self.face_patch_proj = nn.Linear(config.face.width, w)
        self.face_pos_proj = nn.Linear(config.face.width, w)
        # Persistent: the release stores it, and a strict load checks it.
        self.register_buffer("positional_embedding", sinusoidal_positions(config.text_length, w))
        self.fuser = FaceTextFuser(w, config.face.grid, config.fusion, release_compat=config.release_compat)
        self.face_encoder.eval()
        self.t5_encoder.eval()
        self._tokenizer = tokenizer
        self.register_state_dict_post_hook(_drop_tied)
        self.register_load_state_dict_pre_hook(_restore_tied)

    def tie_embeddings(self) -> None:
        """Share T5's input embedding with `shared` again. Loaders that fill a model built on
        the meta device key by key (diffusers' from_pretrained whenever accelerate is
        installed) fill only the stored `shared` and leave its tied twin empty."""
        t5 = self.t5_encoder
        t5.encoder.embed_tokens.weight = t5.shared.weight

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_t5_tokenizer(self.config.t5)
        return self._tokenizer

    def set_tokenizer(self, tokenizer_or_folder) -> None:
        """A transformers T5 tokenizer, or a folder holding its files."""
        if isinstance(tokenizer_or_folder, (str, os.PathLike)):
            tokenizer_or_folder = build_t5_tokenizer(self.config.t5, tokenizer_or_folder)
        self._tokenizer = tokenizer_or_folder

    def tokenize(self, prompts: Sequence[str], has_face=None) -> torch.Tensor:
        """T5 ids padded to text_length (has_face is accepted for symmetry with the CLIP
        branches; FaceT5 adds no prefix)."""
        return self.prompt_tokenizer()(prompts)

    def prompt_tokenizer(self) -> "T5PromptTokenizer":
        """`tokenize` as a small picklable object (no model inside), for DataLoader workers."""
        return T5PromptTokenizer(self.tokenizer, self.config.text_length)

    # ------------------------------------------------------------------ parts
    # (normalised identity, patch tokens): the same face path as the CLIP branches
    encode_face = FaceCLIPEncoder.encode_face
    face_path = FaceCLIPEncoder.face_path

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """T5 last hidden state [B, L, W] (no attention mask: padding attended, as in
        FLUX and the release)."""
        return self.t5_encoder(input_ids=input_ids).last_hidden_state

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen recogniser (BatchNorm head) and frozen T5 (dropout off) stay in eval mode.
        self.face_encoder.eval()
        self.t5_encoder.eval()
        return self

    # ------------------------------------------------------------------ joint
    def forward(
        self, face_images: torch.Tensor | None, input_ids: torch.Tensor, has_face: torch.Tensor,
        face_features: tuple[torch.Tensor, torch.Tensor] | None = None,
        text_states: torch.Tensor | None = None,
    ) -> JointOutput:
        """face_images: aligned crops in [0, 1] [B, 3, H, W] (zeroed where has_face is
        False); face_features: precomputed (identity, patches) instead; text_states: the
        frozen T5 output when already computed (cached shards)."""
        identity, patches, _ = self.face_path(face_images, has_face, face_features)
        text = self.encode_text(input_ids) if text_states is None else text_states
        b = text.shape[0]
        face = self.face_patch_proj(patches.to(text.dtype))
        face_pos = self.face_pos_proj(self.face_encoder.pos_embed.to(face.dtype))
        text_pos = self.positional_embedding[:, : text.shape[1]].to(text.dtype)
        embeds = self.fuser(text, text_pos.expand(b, -1, -1), face, face_pos.expand(face.shape[0], -1, -1))
        # FaceT5 has no pooled output of its own (FLUX's comes from CLIP-L): the mean over
        # tokens stands in where a pooled vector is asked for.
        return JointOutput(embeds=embeds, pooled=embeds.mean(1), identity=identity)

    def embed_prompts(self, prompts: Sequence[str], face_images: torch.Tensor | None, has_face: torch.Tensor,
                      face_features: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The joint tokens [B, L, W] of prompts with their faces: what the diffusion
        families' conditions (FLUX, Wan) hand their denoiser."""
        ids = self.tokenize(prompts).to(has_face.device)
        return self(face_images, ids, has_face, face_features=face_features).embeds

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], face_images: torch.Tensor | None = None) -> JointOutput:
        device = self.positional_embedding.device
        b, size = len(prompts), self.config.face.image_size
        has_face = torch.full((b,), face_images is not None, dtype=torch.bool, device=device)
        if face_images is None:
            face_images = torch.zeros(b, 3, size, size, device=device)
        return self(face_images.to(device), self.tokenize(prompts).to(device), has_face)

    # ------------------------------------------------------------------ training helpers
    def trainable_parameter_names(self, unfreeze_text_layers: int = 0) -> list[str]:
        """Projections and fuser (minus its dead last-layer face path); the face ViT and T5
        stay frozen (unfreeze_text_layers > 0 also trains the last T5 blocks)."""
        dead = {f"fuser.{n}" for n in self.fuser.dead_parameter_names()}
        prefixes = ["face_patch_proj.", "face_pos_proj.", "fuser."]
        n_blocks = self.config.t5.num_layers
        if unfreeze_text_layers > 0:
            prefixes += [f"t5_encoder.encoder.block.{i}." for i in
                         range(max(0, n_blocks - unfreeze_text_layers), n_blocks)]
            prefixes.append("t5_encoder.encoder.final_layer_norm.")
        return [n for n, _ in self.named_parameters() if n.startswith(tuple(prefixes)) and n not in dead]


def _drop_tied(module, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + TIED_KEY, None)


def _restore_tied(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    if prefix + SHARED_KEY in state_dict and prefix + TIED_KEY not in state_dict:
        state_dict[prefix + TIED_KEY] = state_dict[prefix + SHARED_KEY]
