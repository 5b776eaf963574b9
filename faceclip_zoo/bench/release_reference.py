"""A straightforward functional re-statement of the release's FaceCLIP branch forward,
reading an *official-layout* state dict (keys as in face_clip_encoder.pt). Written from the
published description (docs/design.md, "The released FaceCLIP encoder for SDXL") and the
release's computation order: it shares no code with faceclip_zoo.models beyond the
open_clip tokenizer/tower. The parity tests check our models against it; `bench` times our forward against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ID_TEXT = "Photo of a id person."


def _linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _ln(sd, name, x, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def face_vit(sd, images, heads):
    """arcface_torch vit in eval mode -> (class_token [B, id], patch_token [B, N, C])."""
    x = F.interpolate(images, size=(112, 112), mode="bilinear", align_corners=False)
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    b, n, c = x.shape
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}"
        h = _ln(sd, f"{p}.norm1", x)
        qkv = F.linear(h, sd[f"{p}.attn.qkv.weight"]).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
        h = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + _linear(sd, f"{p}.attn.proj", h)
        h = _linear(sd, f"{p}.mlp.fc2", F.relu6(_linear(sd, f"{p}.mlp.fc1", _ln(sd, f"{p}.norm2", x))))
        x = x + h
        i += 1
    x = _ln(sd, "norm", x)
    patches = x
    y = x.reshape(b, n * c)
    for j in (0, 2):
        y = F.linear(y, sd[f"feature.{j}.weight"])
        y = F.batch_norm(y, sd[f"feature.{j + 1}.running_mean"], sd[f"feature.{j + 1}.running_var"],
                         sd[f"feature.{j + 1}.weight"], sd[f"feature.{j + 1}.bias"], False, 0.0, 2e-5)
    return y, patches


def bi_attention(sd, p, v, l, heads):
    v = _ln(sd, f"{p}.layer_norm_v", v)
    l = _ln(sd, f"{p}.layer_norm_l", l)
    b, nv, _ = v.shape
    embed = sd[f"{p}.attn.v_proj.weight"].shape[0]
    d = embed // heads

    def split(x):
        return x.view(b, -1, heads, d).transpose(1, 2).reshape(b * heads, -1, d)

    q = split(_linear(sd, f"{p}.attn.v_proj", v) * d ** -0.5)
    k = split(_linear(sd, f"{p}.attn.l_proj", l))
    vv = split(_linear(sd, f"{p}.attn.values_v_proj", v))
    vl = split(_linear(sd, f"{p}.attn.values_l_proj", l))
    w = torch.bmm(q, k.transpose(1, 2))
    w = (w - w.max()).clamp(-50000, 50000)
    wt = w.transpose(1, 2)
    wt = (wt - wt.max(-1, keepdim=True)[0]).clamp(-50000, 50000)
    out_v = torch.bmm(w.softmax(-1), vl).view(b, heads, nv, d).transpose(1, 2).reshape(b, nv, embed)
    out_l = torch.bmm(wt.softmax(-1), vv).view(b, heads, -1, d).transpose(1, 2).reshape(b, -1, embed)
    dv = _linear(sd, f"{p}.attn.out_v_proj", out_v)
    dl = _linear(sd, f"{p}.attn.out_l_proj", out_l)
    return v + sd[f"{p}.gamma_v"] * dv, l + sd[f"{p}.gamma_l"] * dl


def text_layer(sd, p, x, pos, heads):
    """Post-norm layer with nn.MultiheadAttention in its sequence-first layout."""
    src = x.transpose(0, 1)
    qk = (x + pos).transpose(0, 1)
    dim = x.shape[-1]
    attn, _ = F.multi_head_attention_forward(
        qk, qk, src, dim, heads, sd[f"{p}.self_attn.in_proj_weight"], sd[f"{p}.self_attn.in_proj_bias"],
        None, None, False, 0.0, sd[f"{p}.self_attn.out_proj.weight"], sd[f"{p}.self_attn.out_proj.bias"],
        training=False, need_weights=False)
    src = _ln(sd, f"{p}.norm1", src + attn)
    src = _ln(sd, f"{p}.norm2", src + _linear(sd, f"{p}.linear2", F.relu(_linear(sd, f"{p}.linear1", src))))
    return src.transpose(0, 1)


def deformable_layer(sd, p, x, pos, heads, points, grid):
    """Deformable-DETR encoder layer, one level, valid ratios 1 (the release's fuser)."""
    b, n, c = x.shape
    lin = torch.linspace(0.5, grid - 0.5, grid, device=x.device, dtype=x.dtype)
    ys, xs = torch.meshgrid(lin, lin, indexing="ij")
    ref = torch.stack((xs.reshape(-1) / grid, ys.reshape(-1) / grid), -1)[None, :, None].repeat(b, 1, 1, 1)
    query = x + pos
    value = _linear(sd, f"{p}.self_attn.value_proj", x).view(b, n, heads, -1)
    offsets = _linear(sd, f"{p}.self_attn.sampling_offsets", query).view(b, n, heads, 1, points, 2)
    weights = _linear(sd, f"{p}.self_attn.attention_weights", query).view(b, n, heads, points).softmax(-1)
    weights = weights.view(b, n, heads, 1, points)
    normalizer = torch.tensor([[grid, grid]], dtype=x.dtype, device=x.device)
    loc = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    d = c // heads
    value_l = value.flatten(2).transpose(1, 2).reshape(b * heads, d, grid, grid)
    grid_l = (2 * loc - 1)[:, :, :, 0].transpose(1, 2).flatten(0, 1)
    sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
    w = weights.transpose(1, 2).reshape(b * heads, 1, n, points)
    out = (sampled * w).sum(-1).view(b, heads * d, n).transpose(1, 2)
    x = _ln(sd, f"{p}.norm1", x + _linear(sd, f"{p}.self_attn.output_proj", out))
    return _ln(sd, f"{p}.norm2", x + _linear(sd, f"{p}.linear2", F.relu(_linear(sd, f"{p}.linear1", x))))


def release_branch_forward(sd, cfg, tower, tokenizer, images, face_exist, texts):
    """sd: one branch's official-layout state dict; tower: an open_clip text Transformer
    holding that branch's `transformer.*` weights (the release builds the same module).
    Returns (fused [B, 77, W], pooled [B, W])."""
    texts_ = [f"{ID_TEXT} {t}" if m else t for t, m in zip(texts, face_exist)]
    ids = tokenizer(texts_)
    id_len = int((tokenizer([ID_TEXT])[0] != 0).sum()) - 1
    id_mask = torch.zeros(len(texts_), ids.shape[1], dtype=torch.bool, device=ids.device)
    id_mask[torch.tensor(face_exist, device=ids.device), :id_len] = True
    fe = {k[len("face_encoder."):]: v for k, v in sd.items() if k.startswith("face_encoder.")}
    cls, patch = face_vit(fe, images, cfg.face.heads)
    norm_cls = cls / cls.norm(dim=-1, keepdim=True)
    face_token = _linear(sd, "proj1", norm_cls)
    face_pos = _linear(sd, "face_pos_proj", fe["pos_embed"].repeat(len(texts), 1, 1))
    face = _linear(sd, "face_patch_proj", patch)

    x = F.embedding(ids, sd["token_embedding.weight"])
    insert = (ids == 1014) & id_mask
    x[insert] = face_token[insert.any(dim=-1)]
    x = x + sd["positional_embedding"]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf"), device=ids.device, dtype=x.dtype).triu_(1)
    x = tower(x, attn_mask=causal)
    x = _ln(sd, "ln_final", x)
    pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
    text = _linear(sd, "text_embed_proj", x)
    text_pos = _linear(sd, "text_pos_proj", sd["positional_embedding"].unsqueeze(0).repeat(len(texts), 1, 1))

    f = cfg.fusion
    for i in range(f.layers):
        face, text = bi_attention(sd, f"fuser.encoder.fusion_layers.{i}", face, text, f.bi_attn_heads)
        text = text_layer(sd, f"fuser.encoder.text_layers.{i}", text, text_pos, f.text_heads)
        face = deformable_layer(sd, f"fuser.encoder.layers.{i}", face, face_pos, f.face_heads, f.face_points,
                                cfg.face.grid)
    return text, pooled


def randomised_branch_state(cfg, seed: int) -> dict:
    """Our branch's state with every path mattering: layer-scale gammas and deformable
    offsets away from their near-zero init, BatchNorm statistics not the identity (a fresh
    branch would hide a wrong fusion or face path behind its 1e-4 gammas)."""
    from faceclip_zoo.models.faceclip import FaceCLIPEncoder

    torch.manual_seed(seed)
    state = FaceCLIPEncoder(cfg).state_dict()
    for k, v in state.items():
        if k.endswith(("gamma_v", "gamma_l")):
            v.uniform_(0.3, 0.8)
        elif "sampling_offsets.weight" in k or "attention_weights.weight" in k:
            v.normal_(0, 0.3)
        elif k.endswith("running_mean"):
            v.normal_(0, 0.1)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in state.items()}


def official_state_from_ours(ours: dict, width: int, seed: int = 0) -> dict:
    """Our branch state -> official key names, plus the release's unused enc_output."""
    from faceclip_zoo.models.convert_faceclip import ours_to_official

    g = torch.Generator().manual_seed(seed)
    sd = {ours_to_official(k): v for k, v in ours.items()}
    sd["fuser.enc_output.weight"] = torch.randn(width, width, generator=g) / math.sqrt(width)
    sd["fuser.enc_output.bias"] = torch.zeros(width)
    sd["fuser.enc_output_norm.weight"] = torch.ones(width)
    sd["fuser.enc_output_norm.bias"] = torch.zeros(width)
    return sd


# ----------------------------------------------------------------------------- FaceT5
def _rms(sd, name, x, eps=1e-6):
    return sd[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _t5_bucket(rel, num_buckets, max_distance):
    """Mesh-TensorFlow relative position buckets, bidirectional (the release's encoder)."""
    num_buckets //= 2
    out = (rel > 0).long() * num_buckets
    rel = rel.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return out + torch.where(rel < max_exact, rel, large)


def flash_t5_encoder(sd, ids, t5cfg):
    """The release's FlashT5Stack (reference attention path) in its own key names."""
    x = F.embedding(ids, sd["embed_tokens.weight"])
    b, n, _ = x.shape
    h, d = t5cfg.num_heads, t5cfg.d_kv
    pos = torch.arange(n, device=ids.device)
    buckets = _t5_bucket(pos[None, :] - pos[:, None], t5cfg.relative_attention_num_buckets,
                         t5cfg.relative_attention_max_distance)
    bias = F.embedding(buckets, sd["block.0.self_attention_layer.self_attention.pe_encoding."
                                    "relative_attention_bias.weight"]).permute(2, 0, 1)[None]
    for i in range(t5cfg.num_layers):
        p = f"block.{i}"
        y = _rms(sd, f"{p}.self_attention_layer.layer_norm.weight", x)
        q, k, v = (F.linear(y, sd[f"{p}.self_attention_layer.self_attention.{w}.weight"]).view(b, n, h, d)
                   .transpose(1, 2) for w in ("Wq", "Wk", "Wv"))
        att = ((q @ k.transpose(-1, -2)) * 1.0 + bias).softmax(-1)  # attention_scale 1.0
        x = x + F.linear((att @ v).transpose(1, 2).reshape(b, n, h * d),
                         sd[f"{p}.self_attention_layer.self_attention.o.weight"])
        y = _rms(sd, f"{p}.ff_layer.layer_norm.weight", x)
        g = F.gelu(F.linear(y, sd[f"{p}.ff_layer.act.wi_0.weight"]), approximate="tanh")
        x = x + F.linear(g * F.linear(y, sd[f"{p}.ff_layer.act.wi_1.weight"]), sd[f"{p}.ff_layer.wo.weight"])
    return _rms(sd, "final_layer_norm.weight", x)


def release_facet5_forward(sd, cfg, images, ids):
    """sd: the release's `encoder_2.*` state (prefix removed). The face layers receive
    [B, N, D] in a sequence-first attention and no positions, exactly as released."""
    fe = {k[len("face_encoder."):]: v for k, v in sd.items() if k.startswith("face_encoder.")}
    _, patch = face_vit(fe, images, cfg.face.heads)
    face = _linear(sd, "face_patch_proj", patch)
    t5 = {k[len("t5_encoder."):]: v for k, v in sd.items() if k.startswith("t5_encoder.")}
    text = flash_t5_encoder(t5, ids, cfg.t5)
    text_pos = sd["positional_embedding"].repeat(len(ids), 1, 1)
    f = cfg.fusion
    for i in range(f.layers):
        face, text = bi_attention(sd, f"fuser.encoder.fusion_layers.{i}", face, text, f.bi_attn_heads)
        text = text_layer(sd, f"fuser.encoder.text_layers.{i}", text, text_pos, f.text_heads)
        # sequence-first attention fed batch-first data: "sequence" = the batch axis
        face = text_layer(sd, f"fuser.encoder.layers.{i}", face.transpose(0, 1),
                          torch.zeros_like(face).transpose(0, 1), f.face_heads).transpose(0, 1)
    return text
