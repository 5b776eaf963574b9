"""The face-recognition ViT of the FaceCLIP release and pluggable face-ID models.

FaceViT reproduces the insightface arcface_torch "vit" layout (parameter names included,
so released weights load by name): patch embedding, learned positional embedding, no CLS
token, pre-norm blocks with ReLU6 MLPs and bias-free qkv, a final LayerNorm, and an
identity head over the flattened patch tokens. Written here because no installed library
ships this architecture.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceclip_zoo.config import FaceViTConfig


def to_face_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """Release quirk: RGB in [0, 1], bilinear resize to `size`, no mean/std normalisation."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, width * 3, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FaceViT(nn.Module):
    """Returns (identity [B, id_dim], patch tokens [B, num_patches, width])."""

    def __init__(self, config: FaceViTConfig):
        super().__init__()
        self.config = config
        w, n = config.width, config.num_patches
        self.patch_embed = PatchEmbed(config.patch_size, w)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, w))
        self.blocks = nn.ModuleList(
            Block(w, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(w)
        self.feature = nn.Sequential(
            nn.Linear(w * n, w, bias=False),
            nn.BatchNorm1d(w, eps=2e-5),
            nn.Linear(w, config.id_dim, bias=False),
            nn.BatchNorm1d(config.id_dim, eps=2e-5),
        )
        # Kept so released weights load strictly; only used by masked pre-training.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def id_dim(self) -> int:
        return self.config.id_dim

    def forward_patches(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(to_face_input(images, self.config.image_size)) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.forward_patches(images)
        identity = self.feature(patches.flatten(1))
        return identity, patches


# ------------------------------------------------------------------ pluggable face-ID
class FaceIDModel(Protocol):
    """Anything that maps aligned face crops (RGB in [0, 1], [B, 3, H, W]) to identity
    vectors [B, dim]. Used for the frozen identity target e_{r_cls} and for evaluation."""

    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class FaceViTIdentity(nn.Module):
    """A (frozen) FaceViT used only for its identity vector."""

    def __init__(self, vit: FaceViT):
        super().__init__()
        self.vit = vit
        self.dim = vit.id_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images)[0]


class OnnxArcFace(nn.Module):
    """An insightface ArcFace ONNX model (e.g. w600k_r50.onnx from a local model pack).

    insightface's ArcFaceONNX does its own preprocessing (BGR, mean/std read from the
    graph); we hand it 112x112 uint8 crops. The commonly used packs are non-commercial:
    this adapter exists so any identity model can be swapped in.
    """

    def __init__(self, model_file: str, providers: list[str] | None = None):
        super().__init__()
        import onnxruntime
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        from faceclip_zoo.utils import require_file

        require_file(model_file, "ArcFace ONNX model")
        session = onnxruntime.InferenceSession(
            model_file, providers=providers or ["CPUExecutionProvider"]
        )
        self.model = ArcFaceONNX(model_file=model_file, session=session)
        self.dim = int(session.get_outputs()[0].shape[-1])
        self.input_size = tuple(self.model.input_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.input_size[::-1]
        crops = to_face_input(images.float(), size[0]) if size[0] == size[1] else F.interpolate(
            images.float(), size=size, mode="bilinear", align_corners=False
        )
        rgb = (crops.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        bgr = [np.ascontiguousarray(im[..., ::-1]) for im in rgb]
        feats = self.model.get_feat(bgr)
        return torch.from_numpy(np.asarray(feats, dtype=np.float32)).to(images.device)
