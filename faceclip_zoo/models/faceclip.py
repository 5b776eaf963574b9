"""One FaceCLIP branch: the joint ID-text encoder e = H(c_t, c_r).

See docs/design.md, "The released FaceCLIP encoder for SDXL".

Top-level module and parameter names match the official `TextImageBranch` (the text
tower's parts sit directly on the branch, `face_encoder`, `proj1`, `face_patch_proj`,
`face_pos_proj`, `text_embed_proj`, `text_pos_proj`, `fuser`), so a converter from the
release is a rename of the fuser prefix at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from faceclip_zoo.config import FaceCLIPConfig
from faceclip_zoo.models.face_vit import FaceViT
from faceclip_zoo.models.fusion import FaceTextFuser
from faceclip_zoo.models.clip import build_text_tower, build_tokenizer
from faceclip_zoo.models.weights import empty_weights


@dataclass
class JointOutput:
    embeds: torch.Tensor  # fused text stream, the diffusion condition [B, L, W]
    pooled: torch.Tensor  # EOT token after ln_final, before text_projection [B, W]
    identity: torch.Tensor  # L2-normalised identity vector of the reference [B, id_dim]


class PrefixedTokenizer:
    """The branch's tokenisation: open_clip's tokenizer, with the id prompt prefixed on the
    rows that have a face."""

    def __init__(self, tokenizer, id_prompt: str):
        self.tokenizer, self.id_prompt = tokenizer, id_prompt

    def __call__(self, prompts: Sequence[str], has_face: Sequence[bool] | torch.Tensor) -> torch.Tensor:
        flags = [bool(f) for f in has_face]
        if len(flags) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(flags)} has_face flags")
        return self.tokenizer([f"{self.id_prompt} {p}" if f else p for p, f in zip(prompts, flags)])


class FaceCLIPEncoder(nn.Module):
    def __init__(self, config: FaceCLIPConfig, empty_parts: Collection[str] = ()):
        """`empty_parts`: ("face_encoder",) builds the frozen face ViT without memory
        (models/weights.py), for a caller that loads its weights next."""
        super().__init__()
        self.config = config
        w = config.text.width
        tower = build_text_tower(config.text)
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        # Leftovers of the release's CLIP-style training; kept so its weights load strictly.
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.init_logit_bias)))
            if config.init_logit_bias is not None else None
        )

        with empty_weights("face_encoder" in empty_parts):
            self.face_encoder = FaceViT(config.face)
        self.proj1 = nn.Linear(config.face.id_dim, w)
        self.face_patch_proj = nn.Linear(config.face.width, w)
        self.face_pos_proj = nn.Linear(config.face.width, w)
        self.text_embed_proj = nn.Linear(w, w)
        self.text_pos_proj = nn.Linear(w, w)
        self.fuser = FaceTextFuser(w, config.face.grid, config.fusion)
        self.face_encoder.eval()  # see train()

        self.tokenizer = build_tokenizer(config.text)
        id_tokens = self.tokenizer.encode(config.id_word)
        if len(id_tokens) != 1:
            raise ValueError(f"id word {config.id_word!r} must be a single token, got {id_tokens}")
        self.id_token_id = id_tokens[0]
        # Positions that may hold the id token: SOT + the prefix's tokens + EOT, minus one
        # (the release's count; 7 for "Photo of a id person.").
        self.id_prefix_len = len(self.tokenizer.encode(config.id_prompt)) + 1

    # -------------------------------------------------------------------- text side
    def tokenize(self, prompts: Sequence[str], has_face: Sequence[bool] | torch.Tensor) -> torch.Tensor:
        """Rows with a face get the "Photo of a id person. " prefix (release behaviour)."""
        return self.prompt_tokenizer()(prompts, has_face)

    def prompt_tokenizer(self) -> "PrefixedTokenizer":
        """`tokenize` as a small picklable object (no model inside), for DataLoader workers."""
        return PrefixedTokenizer(self.tokenizer, self.config.id_prompt)

    def encode_tokens(
        self, input_ids: torch.Tensor, id_embeds: torch.Tensor | None = None,
        has_face: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tower with optional id-token injection -> (last-layer states after
        ln_final [B, L, W], pooled EOT state before projection [B, W])."""
        x = self.token_embedding(input_ids)
        if id_embeds is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            inject = (input_ids == self.id_token_id) & (positions < self.id_prefix_len)
            if has_face is not None:
                inject &= has_face[:, None]
            x = torch.where(inject[..., None], id_embeds[:, None, :].to(x.dtype), x)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        return x, pooled

    # -------------------------------------------------------------------- face side
    def encode_face(self, face_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised identity [B, id_dim], patch tokens [B, N, face_width])."""
        identity, patches = self.face_encoder(face_images)
        return F.normalize(identity.float(), dim=-1).to(patches.dtype), patches

    def face_path(
        self, face_images: torch.Tensor | None, has_face: torch.Tensor,
        face_features: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(identity, patches, has_face as bool on their device) from the crops, or from
        precomputed features when given."""
        if face_features is not None:
            identity, patches = face_features
            return identity, patches, has_face.to(device=identity.device, dtype=torch.bool)
        has_face = has_face.to(device=face_images.device, dtype=torch.bool)
        # Rows without a face see a black image, as the release's unconditional branch.
        face_images = face_images * has_face[:, None, None, None].to(face_images.dtype)
        identity, patches = self.encode_face(face_images)
        return identity, patches, has_face

    def train(self, mode: bool = True):
        super().train(mode)
        # The face ViT is a frozen recogniser: its BatchNorm head must stay in eval mode.
        self.face_encoder.eval()
        return self

    # -------------------------------------------------------------------- joint
    def forward(
        self, face_images: torch.Tensor | None, input_ids: torch.Tensor, has_face: torch.Tensor,
        face_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> JointOutput:
        """face_images: aligned crops, RGB in [0, 1], [B, 3, H, W] (zeros where no face);
        input_ids: from `tokenize` (prefix on rows with a face); has_face: bool [B];
        face_features: precomputed (normalised identity, patches) instead of face_images,
        e.g. averaged over several references of one person."""
        identity, patches, has_face = self.face_path(face_images, has_face, face_features)
        tokens, pooled = self.encode_tokens(input_ids, self.proj1(identity), has_face)
        text = self.text_embed_proj(tokens)
        text_pos = self.text_pos_proj(self.positional_embedding.to(text.dtype))[None]
        face = self.face_patch_proj(patches)
        face_pos = self.face_pos_proj(self.face_encoder.pos_embed.to(face.dtype))
        embeds = self.fuser(text, text_pos.expand(text.shape[0], -1, -1), face,
                            face_pos.expand(face.shape[0], -1, -1))
        return JointOutput(embeds=embeds, pooled=pooled, identity=identity)

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], face_images: torch.Tensor | None = None
    ) -> JointOutput:
        """Convenience: prompts plus aligned faces (None = no face for every row)."""
        device = self.positional_embedding.device
        b = len(prompts)
        size = self.config.face.image_size
        if face_images is None:
            face_images = torch.zeros(b, 3, size, size, device=device)
            has_face = torch.zeros(b, dtype=torch.bool, device=device)
        else:
            has_face = torch.ones(b, dtype=torch.bool, device=device)
        ids = self.tokenize(prompts, has_face.tolist()).to(device)
        return self(face_images.to(device), ids, has_face)

    # -------------------------------------------------------------------- training helpers
    def trainable_parameter_names(self, unfreeze_text_layers: int = 0) -> list[str]:
        """Fusion and projections; optionally the last N text-tower blocks (+ ln_final).
        Frozen: face encoder, token/positional embeddings, the rest of the text tower,
        text_projection, the release's unused logit leftovers, and the fuser's dead
        last-layer face path."""
        dead = {f"fuser.{n}" for n in self.fuser.dead_parameter_names()}
        trainable_prefixes = ["proj1.", "face_patch_proj.", "face_pos_proj.", "text_embed_proj.",
                              "text_pos_proj.", "fuser."]
        n_blocks = len(self.transformer.resblocks)
        if unfreeze_text_layers > 0:
            first = max(0, n_blocks - unfreeze_text_layers)
            trainable_prefixes += [f"transformer.resblocks.{i}." for i in range(first, n_blocks)]
            trainable_prefixes.append("ln_final.")
        return [
            n for n, _ in self.named_parameters()
            if n.startswith(tuple(trainable_prefixes)) and n not in dead
        ]

