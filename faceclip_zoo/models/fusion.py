"""The face/text fuser of FaceCLIP (docs/design.md, "The released FaceCLIP encoder for SDXL").

Each fusion layer runs, in order: a bi-directional "dual cross-attention" block between
face patches and text tokens, a post-norm self-attention layer on the text, and a
post-norm deformable self-attention layer on the face grid. Only the text stream is
returned. Parameter names follow the release (GroundingDINO-style) so official weights
map by a prefix rename. No library ships these blocks; the deformable attention is the
pure-PyTorch grid_sample form, so no compiled CUDA op is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from faceclip_zoo.config import FusionConfig


class BiAttention(nn.Module):
    """One logit matrix between face (v) and text (l) tokens, softmaxed both ways."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"bi-attention dim {embed_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = embed_dim // heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for lin in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj,
                    self.out_v_proj, self.out_l_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(
        self, v: torch.Tensor, l: torch.Tensor, need_v: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        q = self._split(self.v_proj(v)) * self.scale
        k = self._split(self.l_proj(l))
        logits = q @ k.transpose(-1, -2)  # [B, H, n_face, n_text]
        # fp32 softmax: the release clamps logits to survive fp16; fp32 needs no clamp.
        probs_l = logits.transpose(-1, -2).float().softmax(-1).to(l.dtype)
        probs_l = F.dropout(probs_l, self.dropout, self.training)
        dl = self.out_l_proj(self._merge(probs_l @ self._split(self.values_v_proj(v))))
        if not need_v:
            return None, dl
        probs_v = F.dropout(logits.float().softmax(-1).to(v.dtype), self.dropout, self.training)
        dv = self.out_v_proj(self._merge(probs_v @ self._split(self.values_l_proj(l))))
        return dv, dl


class BiAttentionBlock(nn.Module):
    """Pre-norm bi-attention with layer-scale; the residual starts from the *normalised*
    input, as in the release."""

    def __init__(self, dim: int, embed_dim: int, heads: int, dropout: float, init_values: float):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(dim)
        self.layer_norm_l = nn.LayerNorm(dim)
        self.attn = BiAttention(dim, dim, embed_dim, heads, dropout)
        self.gamma_v = nn.Parameter(torch.full((dim,), init_values))
        self.gamma_l = nn.Parameter(torch.full((dim,), init_values))

    def forward(
        self, v: torch.Tensor, l: torch.Tensor, need_v: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        v, l = self.layer_norm_v(v), self.layer_norm_l(l)
        dv, dl = self.attn(v, l, need_v)
        return (v + self.gamma_v * dv if need_v else None), l + self.gamma_l * dl


class TextSelfAttentionLayer(nn.Module):
    """Post-norm encoder layer: q = k = x + pos, v = x, no mask, ReLU feed-forward."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.use_pos, self.across_batch = True, False
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, *_unused) -> torch.Tensor:
        qk = x + pos if self.use_pos else x
        if self.across_batch:
            # The FaceT5 release feeds [B, N, D] to a sequence-first attention: each token
            # position attends over the *batch*. Reproduced on request (release_compat).
            attended = self.self_attn(qk.transpose(0, 1), qk.transpose(0, 1), x.transpose(0, 1),
                                      need_weights=False)[0].transpose(0, 1)
        else:
            attended = self.self_attn(qk, qk, x, need_weights=False)[0]
        x = self.norm1(x + self.dropout(attended))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class PlainFaceSelfAttentionLayer(TextSelfAttentionLayer):
    """FaceT5's face layer: the same post-norm layer over the face tokens (plain attention).

    release_compat reproduces the release: the face positional embedding never reaches the
    layer (it was passed in the attention-mask slot) and attention runs across the batch."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float, release_compat: bool = False):
        super().__init__(dim, heads, ff, dropout)
        self.use_pos, self.across_batch = not release_compat, release_compat


def deformable_attention(
    value: torch.Tensor,
    shapes: list[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by bilinear grid_sample.

    value [B, N, H, D]; locations [B, Q, H, L, P, 2] in [0, 1] (x, y);
    weights [B, Q, H, L, P] -> [B, Q, H*D].
    """
    b, _, heads, d = value.shape
    _, q, _, levels, points, _ = locations.shape
    grids = 2 * locations - 1
    sampled = []
    for lvl, (value_l, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], 1), shapes)):
        value_l = value_l.permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # [B*H, Q, P, 2]
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [B*H, D, Q, P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B*H, D, Q, L*P]
    w = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (stacked * w).sum(-1).view(b, heads * d, q)
    return out.transpose(1, 2)


class DeformableAttention(nn.Module):
    def __init__(self, dim: int, heads: int, levels: int, points: int):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable-DETR init: each head starts looking in its own direction, at 1..P cells.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.heads, 1, 1, 2)
        grid = grid.repeat(1, self.levels, self.points, 1)
        grid *= torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def _normalizer(self, shapes, dtype, device) -> torch.Tensor:
        # Built once per (shapes, dtype, device): a fresh tensor each forward would be a
        # host-to-device copy, which makes the CPU wait for the GPU queue to drain.
        key = (tuple(map(tuple, shapes)), dtype, device)
        if getattr(self, "_normalizer_key", None) != key:
            self._normalizer_value = torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=device)
            self._normalizer_key = key
        return self._normalizer_value

    def forward(
        self, query: torch.Tensor, value: torch.Tensor, reference: torch.Tensor,
        shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        b, q, _ = query.shape
        h, lv, p = self.heads, self.levels, self.points
        v = self.value_proj(value).view(b, value.shape[1], h, -1)
        offsets = self.sampling_offsets(query).view(b, q, h, lv, p, 2)
        weights = self.attention_weights(query).view(b, q, h, lv * p).softmax(-1).view(b, q, h, lv, p)
        normalizer = self._normalizer(shapes, query.dtype, query.device)
        locations = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(deformable_attention(v, shapes, locations, weights))


def grid_reference_points(shapes: list[tuple[int, int]], batch: int, device, dtype) -> torch.Tensor:
    """Cell centres of every level in [0, 1], [B, sum(HW), levels, 2] (x, y)."""
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
            (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
            indexing="ij",
        )
        refs.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    ref = torch.cat(refs, 0)[None, :, None, :].expand(batch, -1, len(shapes), -1)
    return ref


class FaceSelfAttentionLayer(nn.Module):
    """Post-norm deformable self-attention over the face patch grid (query = x + pos)."""

    def __init__(self, dim: int, heads: int, levels: int, points: int, ff: int, dropout: float):
        super().__init__()
        self.self_attn = DeformableAttention(dim, heads, levels, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, pos, reference, shapes):
        x = self.norm1(x + self.dropout(self.self_attn(x + pos, x, reference, shapes)))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class FaceTextFuser(nn.Module):
    """N x (bi-attention, text layer, face layer); returns the fused text stream.

    Official checkpoints name these `fuser.encoder.{fusion_layers,text_layers,layers}.N`;
    here they are `fuser.{...}.N` (drop `encoder.`), and the release's never-used
    `fuser.enc_output*` modules are not built.
    """

    def __init__(self, dim: int, grid: int, config: FusionConfig, release_compat: bool = False):
        super().__init__()
        c = config
        if c.face_attention not in ("deformable", "plain"):
            raise ValueError(f"face_attention must be 'deformable' or 'plain', got {c.face_attention!r}")
        self.shapes = [(grid, grid)] * c.face_levels
        self.fusion_layers = nn.ModuleList(
            BiAttentionBlock(dim, c.bi_attn_dim, c.bi_attn_heads, c.dropout, c.layer_scale_init)
            for _ in range(c.layers)
        )
        self.text_layers = nn.ModuleList(
            TextSelfAttentionLayer(dim, c.text_heads, c.text_ff, c.dropout) for _ in range(c.layers)
        )
        if c.face_attention == "plain":
            self.layers = nn.ModuleList(
                PlainFaceSelfAttentionLayer(dim, c.face_heads, c.face_ff, c.dropout, release_compat)
                for _ in range(c.layers))
        else:
            self.layers = nn.ModuleList(
                FaceSelfAttentionLayer(dim, c.face_heads, c.face_levels, c.face_points, c.face_ff, c.dropout)
                for _ in range(c.layers))
        # The release re-initialises every matrix with xavier_uniform, then the deformable
        # attention with its own scheme; do the same so fresh training starts alike.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.layers:
            if isinstance(layer, FaceSelfAttentionLayer):
                layer.self_attn.reset_parameters()

    def forward(
        self, text: torch.Tensor, text_pos: torch.Tensor, face: torch.Tensor, face_pos: torch.Tensor,
    ) -> torch.Tensor:
        if face.shape[1] != sum(h * w for h, w in self.shapes):
            raise ValueError(f"fuser expects {self.shapes} face tokens, got {face.shape[1]}")
        reference = grid_reference_points(self.shapes, face.shape[0], face.device, face.dtype)
        last = len(self.layers) - 1
        for i, (fuse, text_layer, face_layer) in enumerate(
            zip(self.fusion_layers, self.text_layers, self.layers)
        ):
            # The last layer's face update never reaches the text output: skip it.
            face, text = fuse(face, text, need_v=i < last)
            text = text_layer(text, text_pos)
            if i < last:
                face = face_layer(face, face_pos, reference, self.shapes)
        return text

    def dead_parameter_names(self) -> list[str]:
        """Parameters that cannot influence the output (the last layer's face path).
        They exist for checkpoint compatibility; training must freeze them (DDP would
        otherwise wait forever for their gradients)."""
        last = len(self.layers) - 1
        names = [f"layers.{last}.{n}" for n, _ in self.layers[last].named_parameters()]
        block = self.fusion_layers[last]
        names += ["fusion_layers.%d.gamma_v" % last]
        names += [f"fusion_layers.{last}.attn.{m}.{n}" for m in ("values_l_proj", "out_v_proj")
                  for n, _ in getattr(block.attn, m).named_parameters()]
        return names
