import math

import pytest
import torch
import torch.nn.functional as F

from faceclip_zoo.config import FaceCLIPConfig, FaceViTConfig, FusionConfig
from faceclip_zoo.models import FaceCLIPEncoder, FaceViT, load_model_dir, save_model_dir
from faceclip_zoo.models.fusion import BiAttention, DeformableAttention, FaceTextFuser


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny")).eval()


def test_release_parameter_count_and_names():
    """Both branches on the meta device: 1573M parameters in the release, of which the
    never-used fuser.enc_output / enc_output_norm are not built here."""
    total, unused = 0, 0
    for name in ("faceclip-l14", "faceclip-bigg14"):
        with torch.device("meta"):
            enc = FaceCLIPEncoder(FaceCLIPConfig.from_name(name))
        w = enc.config.width
        total += sum(p.numel() for p in enc.parameters())
        unused += w * w + w + 2 * w  # enc_output Linear + enc_output_norm
        shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
        assert shapes["face_encoder.feature.0.weight"] == (768, 110592)
        assert shapes["face_encoder.pos_embed"] == (1, 144, 768)
        assert shapes["face_encoder.blocks.23.attn.qkv.weight"] == (2304, 768)
        assert "face_encoder.blocks.0.attn.qkv.bias" not in shapes
        assert shapes["token_embedding.weight"] == (49408, w)
        assert shapes["positional_embedding"] == (77, w)
        assert shapes["text_projection"] == (w, w)
        assert shapes["proj1.weight"] == (w, 512)
        assert shapes["face_patch_proj.weight"] == shapes["face_pos_proj.weight"] == (w, 768)
        assert shapes["fuser.fusion_layers.5.attn.v_proj.weight"] == (1024, w)
        assert shapes["fuser.fusion_layers.5.gamma_l"] == (w,)
        assert shapes["fuser.text_layers.5.self_attn.in_proj_weight"] == (3 * w, w)
        assert shapes["fuser.text_layers.5.linear1.weight"] == (1024, w)
        assert shapes["fuser.layers.5.self_attn.sampling_offsets.weight"] == (8 * 1 * 4 * 2, w)
        assert shapes["fuser.layers.5.linear1.weight"] == (2048, w)
        assert "logit_scale" in shapes and "logit_bias" in shapes
    assert round((total + unused) / 1e6) == 1573


def test_face_vit_input_quirk():
    """[0, 1] RGB resized bilinearly to 112, no mean/std normalisation."""
    torch.manual_seed(0)
    vit = FaceViT(FaceViTConfig.from_name("face-vit-tiny")).eval()
    x = torch.rand(2, 3, 448, 448)
    ident, patches = vit(x)
    manual = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False)
    ident2, patches2 = vit(manual)
    assert ident.shape == (2, 64) and patches.shape == (2, 144, 64)
    torch.testing.assert_close(patches, patches2)
    torch.testing.assert_close(ident, ident2)


def test_id_token_injection(tiny_encoder):
    enc = tiny_encoder
    assert enc.id_token_id == 1014 and enc.id_prefix_len == 7
    ids = enc.tokenize(["a man in a red shirt", "a dog"], [True, False])
    assert ids[0, 4].item() == 1014 and ids[1, 4].item() != 1014
    id_embeds = torch.randn(2, enc.config.width) * 10
    plain, _ = enc.encode_tokens(ids)
    injected, _ = enc.encode_tokens(ids, id_embeds, torch.tensor([True, False]))
    # causal text tower: positions before the id token are unchanged, from it on they differ
    torch.testing.assert_close(injected[0, :4], plain[0, :4])
    assert (injected[0, 4:] - plain[0, 4:]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(injected[1], plain[1])  # no face: nothing injected


def test_joint_output_and_no_face_rows(tiny_encoder):
    enc = tiny_encoder
    faces = torch.rand(3, 3, 112, 112)
    out = enc.encode(["a", "b", "c"], faces)
    assert out.embeds.shape == (3, 77, 64) and out.pooled.shape == (3, 64)
    torch.testing.assert_close(out.identity.norm(dim=-1), torch.ones(3))
    ids = enc.tokenize(["x", "y"], [False, False])
    none = torch.zeros(2, dtype=torch.bool)
    a = enc(torch.rand(2, 3, 112, 112), ids, none).embeds
    b = enc(torch.zeros(2, 3, 112, 112), ids, none).embeds
    torch.testing.assert_close(a, b)  # rows without a face see a black image, whatever is passed
    # different faces change the embedding of rows with a face
    c = enc(faces[:2], enc.tokenize(["x", "y"], [True, True]), ~none).embeds
    d = enc(faces[1:], enc.tokenize(["x", "y"], [True, True]), ~none).embeds
    assert (c[0] - d[0]).abs().max() > 1e-4


def test_export_round_trip(tiny_encoder, tmp_path):
    faces = torch.rand(2, 3, 112, 112)
    ref = tiny_encoder.encode(["a photo", "a person"], faces)
    save_model_dir(tiny_encoder, tmp_path / "enc", recipe="model: {}\n")
    assert {p.name for p in (tmp_path / "enc").iterdir()} == {"model.safetensors", "config.json", "recipe.yaml"}
    loaded = load_model_dir(tmp_path / "enc", expect="faceclip")
    out = loaded.encode(["a photo", "a person"], faces)
    assert (out.embeds - ref.embeds).abs().max() < 1e-5
    assert (out.pooled - ref.pooled).abs().max() < 1e-5


def _bi_attention_reference(attn: BiAttention, v, l):
    """The release's formula, written out head by head (global-max shift and fp16 clamps
    included)."""
    b, nv, _ = v.shape
    h, d = attn.heads, attn.head_dim
    q = attn.v_proj(v).view(b, nv, h, d) * attn.scale
    k = attn.l_proj(l).view(b, -1, h, d)
    vv = attn.values_v_proj(v).view(b, nv, h, d)
    vl = attn.values_l_proj(l).view(b, -1, h, d)
    out_v, out_l = torch.zeros(b, nv, h, d), torch.zeros(b, l.shape[1], h, d)
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi] @ k[bi, :, hi].T
            logits = (logits - logits.max()).clamp(-50000, 50000)
            lt = logits.T
            lt = (lt - lt.max(-1, keepdim=True)[0]).clamp(-50000, 50000)
            out_v[bi, :, hi] = logits.softmax(-1) @ vl[bi, :, hi]
            out_l[bi, :, hi] = lt.softmax(-1) @ vv[bi, :, hi]
    return attn.out_v_proj(out_v.flatten(2)), attn.out_l_proj(out_l.flatten(2))


def test_bi_attention_matches_release_formula():
    torch.manual_seed(0)
    attn = BiAttention(32, 32, 64, 4).eval()
    v, l = torch.randn(2, 9, 32), torch.randn(2, 7, 32)
    dv, dl = attn(v, l)
    rv, rl = _bi_attention_reference(attn, v, l)
    torch.testing.assert_close(dv, rv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dl, rl, atol=1e-5, rtol=1e-5)


def _bilinear(img, x, y):
    """img [D, H, W]; x, y in pixel units with centres at integers; zero outside."""
    _, hgt, wid = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(img.shape[0])
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= xx < wid and 0 <= yy < hgt:
                out += img[:, yy, xx] * wx * wy
    return out


def test_deformable_attention_matches_explicit_sampling():
    torch.manual_seed(0)
    dim, heads, points, grid = 16, 2, 3, 4
    attn = DeformableAttention(dim, heads, 1, points).eval()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.5)
    x = torch.randn(1, grid * grid, dim)
    from faceclip_zoo.models.fusion import grid_reference_points

    ref = grid_reference_points([(grid, grid)], 1, x.device, x.dtype)
    out = attn(x, x, ref, [(grid, grid)])
    # explicit computation
    value = attn.value_proj(x).view(1, grid * grid, heads, -1)
    offsets = attn.sampling_offsets(x).view(1, -1, heads, 1, points, 2)
    weights = attn.attention_weights(x).view(1, -1, heads, points).softmax(-1)
    d = dim // heads
    expected = torch.zeros(1, grid * grid, heads, d)
    for q in range(grid * grid):
        for h in range(heads):
            img = value[0, :, h].T.reshape(d, grid, grid)
            for p in range(points):
                loc = ref[0, q, 0] + offsets[0, q, h, 0, p] / grid
                px, py = loc[0].item() * grid - 0.5, loc[1].item() * grid - 0.5
                expected[0, q, h] += weights[0, q, h, p] * _bilinear(img, px, py)
    torch.testing.assert_close(out, attn.output_proj(expected.flatten(2)), atol=1e-5, rtol=1e-5)


def test_dead_parameters_are_exactly_the_unused_ones():
    torch.manual_seed(0)
    fuser = FaceTextFuser(32, 3, FusionConfig(layers=2, bi_attn_dim=32, text_ff=32, face_ff=32,
                                              face_heads=2, text_heads=2, bi_attn_heads=2))
    text, face = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    out = fuser(text, torch.randn(2, 5, 32), face, torch.randn(2, 9, 32))
    out.square().sum().backward()
    no_grad = {n for n, p in fuser.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    assert no_grad == set(fuser.dead_parameter_names())


def test_streaming_safetensors_writer_round_trips(tmp_path):
    from safetensors.torch import load_file

    from faceclip_zoo.models.io import write_safetensors

    tensors = {"b.bf16": torch.randn(3, 5).bfloat16(), "a.f32": torch.randn(7), "c.i64": torch.tensor(3),
               "d.empty": torch.zeros(0, 4), "e.view": torch.randn(4, 6)[:, ::2], "f.bool": torch.tensor([True, False])}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
