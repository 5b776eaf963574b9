"""FaceT5 encoder: shapes, release_compat, conversion of the release file, directories."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from faceclip_zoo.bench.release_reference import release_facet5_forward
from faceclip_zoo.config import CLIP_TEXT_CONFIGS, FaceT5Config
from faceclip_zoo.models.convert_facet5 import (
    convert_official_facet5, facet5_official_to_ours, facet5_ours_to_official, t5_official_to_hf,
)
from faceclip_zoo.models.facet5 import TIED_KEY, FaceT5Encoder, sinusoidal_positions
from faceclip_zoo.models.io import load_model_dir, save_model_dir
from faceclip_zoo.utils import UserError

PROMPTS = ["a photo of a smiling person wearing a red shirt", "a person in front of a blue background"]


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (fresh layer-scale gammas are 1e-4, BatchNorm stats 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("positional_embedding") and "fuser" not in name and "face" not in name:
                continue  # fixed sinusoid
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 if "gamma" in name else 1 / math.sqrt(t.shape[-1])))


def _encoder(release_compat: bool, seed: int = 0) -> FaceT5Encoder:
    torch.manual_seed(seed)
    enc = FaceT5Encoder(FaceT5Config.from_name("facet5-tiny", release_compat=release_compat))
    _randomise(enc, seed)
    return enc.eval()


def test_output_shapes_and_transformers_t5_names():
    enc = _encoder(False)
    out = enc.encode(PROMPTS, torch.rand(2, 3, 64, 64))
    cfg = enc.config
    assert out.embeds.shape == (2, cfg.text_length, cfg.t5.d_model)
    assert out.identity.shape == (2, cfg.face.id_dim)
    keys = set(enc.state_dict())
    assert "t5_encoder.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    assert "t5_encoder.encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in keys
    assert TIED_KEY not in keys and "t5_encoder.shared.weight" in keys
    assert torch.equal(enc.positional_embedding, sinusoidal_positions(cfg.text_length, cfg.t5.d_model))


def test_no_face_rows_see_a_black_image():
    enc = _encoder(False)
    ids = enc.tokenize(PROMPTS)
    faces = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        masked = enc(faces, ids, torch.tensor([True, False])).embeds
        black = enc(torch.zeros_like(faces), ids, torch.tensor([False, False])).embeds
    assert torch.allclose(masked[1], black[1], atol=1e-6)
    assert not torch.allclose(masked[0], black[0], atol=1e-3)


def test_release_compat_matches_release_and_default_is_per_sample():
    faces = torch.rand(2, 3, 112, 112)
    compat, fixed = _encoder(True), _encoder(False)
    fixed.load_state_dict(compat.state_dict())
    ids = compat.tokenize(PROMPTS)
    official = {facet5_ours_to_official(k): v for k, v in compat.state_dict().items()}
    with torch.no_grad():
        ref = release_facet5_forward(official, compat.config, faces, ids)
        ours = compat(faces, ids, torch.ones(2, dtype=torch.bool)).embeds
        assert (ours - ref).abs().max() < 1e-4  # the release at batch 2, quirks included
        # default: a sample's output does not depend on the rest of the batch
        both = fixed(faces, ids, torch.ones(2, dtype=torch.bool)).embeds
        alone = fixed(faces[1:], ids[1:], torch.ones(1, dtype=torch.bool)).embeds
        assert (both[1] - alone[0]).abs().max() < 1e-5
        # the release does depend on the batch: that is the quirk being reproduced
        compat_alone = compat(faces[1:], ids[1:], torch.ones(1, dtype=torch.bool)).embeds
        assert (ours[1] - compat_alone[0]).abs().max() > 1e-4


def test_release_face_layer_at_batch_one_is_value_then_output_projection():
    """docs/design.md, "FaceT5 for FLUX": at batch 1 the release's face attention reduces
    to out_proj(v_proj(x))."""
    from faceclip_zoo.config import FusionConfig
    from faceclip_zoo.models.fusion import FaceTextFuser

    fuser = FaceTextFuser(32, 4, FusionConfig.from_name("fusion-t5-tiny"), release_compat=True).eval()
    layer = fuser.layers[0]
    x, pos = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    attn = layer.self_attn
    v = torch.nn.functional.linear(x, attn.in_proj_weight[64:], attn.in_proj_bias[64:])
    attended = attn.out_proj(v)
    h = layer.norm1(x + attended)
    expected = layer.norm2(h + layer.linear2(torch.relu(layer.linear1(h))))
    with torch.no_grad():
        assert (layer(x, pos) - expected).abs().max() < 1e-5


def test_t5_key_mapping_round_trips_and_rejects_unknown_names():
    enc = _encoder(False)
    for key in enc.state_dict():
        assert facet5_official_to_ours(facet5_ours_to_official(key)) == key
    assert t5_official_to_hf("block.3.ff_layer.act.wi_0.weight") == "encoder.block.3.layer.1.DenseReluDense.wi_0.weight"
    with pytest.raises(UserError, match="unknown T5 key"):
        t5_official_to_hf("block.0.mystery.weight")


def _official_file(tmp_path, enc: FaceT5Encoder):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(3)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT_CONFIGS["clip-text-tiny"])).eval()
    state = {"encoder_2." + facet5_ours_to_official(k): v.to(torch.bfloat16) for k, v in enc.state_dict().items()}
    w = enc.config.width
    state["encoder_2.fuser.enc_output.weight"] = torch.randn(w, w).to(torch.bfloat16)
    state["encoder_2.fuser.enc_output.bias"] = torch.zeros(w, dtype=torch.bfloat16)
    state["encoder_2.fuser.enc_output_norm.weight"] = torch.ones(w, dtype=torch.bfloat16)
    state["encoder_2.fuser.enc_output_norm.bias"] = torch.zeros(w, dtype=torch.bfloat16)
    state.update({"encoder_1." + k: v.to(torch.bfloat16) for k, v in clip.state_dict().items()})
    path = tmp_path / "model" / "face_t5_encoder.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path, state, clip


def test_convert_release_file_strictly_with_parity(tmp_path):
    from transformers import CLIPTextModel

    enc = _encoder(True, seed=1)
    path, state, clip = _official_file(tmp_path, enc)
    cfg = enc.config
    info = convert_official_facet5(path, tmp_path / "out", config=cfg,
                                   clip_config=CLIP_TEXT_CONFIGS["clip-text-tiny"])
    assert info["facet5_keys"] == len(enc.state_dict())
    assert info["facet5_keys"] + info["clip_text_keys"] + len(info["dropped_unused"]) == len(state)
    assert sorted(info["dropped_unused"]) == sorted(k for k in state if "enc_output" in k)

    ours = load_model_dir(tmp_path / "out" / cfg.name, expect="facet5").float()
    assert ours.config.release_compat
    with safe_open(str(tmp_path / "out" / cfg.name / "model.safetensors"), "pt") as f:
        assert TIED_KEY not in f.keys()  # the tied embedding table is stored once
        assert f.get_tensor("t5_encoder.shared.weight").dtype == torch.bfloat16  # never upcast
    official = {k[len("encoder_2."):]: v.float() for k, v in state.items() if k.startswith("encoder_2.")}
    face = torch.rand(1, 3, 112, 112)
    ids = ours.tokenize(PROMPTS[:1])
    with torch.no_grad():
        ref = release_facet5_forward(official, cfg, face, ids)
        got = ours(face, ids, torch.ones(1, dtype=torch.bool)).embeds
    assert (got - ref).abs().max() < 1e-4

    # the converted directories plug into the FLUX stage as they are
    from faceclip_zoo.tasks.flux import FluxJointModule

    flux = FluxJointModule(encoder=str(tmp_path / "out" / cfg.name), clip_text=str(tmp_path / "out" / "clip-l-text"))
    flux.setup("fit")
    assert torch.equal(flux.condition.face_t5.fuser.text_layers[0].linear1.weight,
                       ours.fuser.text_layers[0].linear1.weight.to(torch.bfloat16).float())

    text = CLIPTextModel.from_pretrained(str(tmp_path / "out" / "clip-l-text"), local_files_only=True).float()
    ids = torch.randint(0, 49407, (2, 77))
    with torch.no_grad():
        expected = clip.to(torch.bfloat16).float()(ids).pooler_output
        assert torch.allclose(text(ids).pooler_output, expected, atol=1e-5)


def test_convert_reports_mismatches_and_foreign_files(tmp_path):
    enc = _encoder(True)
    path, state, _ = _official_file(tmp_path, enc)
    del state["encoder_2.face_patch_proj.bias"]
    torch.save(state, path)
    with pytest.raises(UserError, match=r"encoder_2.*1 missing keys \[face_patch_proj.bias\]"):
        convert_official_facet5(path, tmp_path / "out", config=enc.config,
                                clip_config=CLIP_TEXT_CONFIGS["clip-text-tiny"])
    torch.save({"unet.conv_in.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="neither encoder_1"):
        convert_official_facet5(path, tmp_path / "out", config=enc.config)


def test_model_directory_round_trip(tmp_path):
    enc = _encoder(False, seed=2)
    save_model_dir(enc, tmp_path / "enc")
    back = load_model_dir(tmp_path / "enc", expect="facet5")
    faces = torch.rand(2, 3, 112, 112)
    assert torch.equal(enc.encode(PROMPTS, faces).embeds, back.encode(PROMPTS, faces).embeds)


def test_full_size_t5_needs_its_tokenizer_files():
    cfg = FaceT5Config.from_name("facet5-xxl")
    with torch.device("meta"):
        enc = FaceT5Encoder(cfg)
    assert enc.config.t5.d_model == 4096 and enc.config.text_length == 512
    with pytest.raises(UserError, match="tokenizer_2"):
        enc.tokenize(["a photo"])


def test_facet5_encoder_module_trains_fuser_only_and_loads_t5_weights(tmp_path):
    """FaceT5EncoderModule: FaceCLIPEncoderModule's losses over the T5 encoder; T5 weights
    come from a transformers T5EncoderModel folder; the export is a facet5 directory."""
    from transformers import T5Config as HFT5Config, T5EncoderModel

    from faceclip_zoo.tasks import FaceT5EncoderModule

    torch.manual_seed(0)
    t5 = T5EncoderModel(HFT5Config(**FaceT5Config.from_name("facet5-tiny").t5.transformers_kwargs()))
    t5.save_pretrained(tmp_path / "t5")
    m = FaceT5EncoderModule(t5_weights=str(tmp_path / "t5"))
    m.setup("fit")
    assert torch.equal(m.encoder.t5_encoder.shared.weight, t5.shared.weight)
    assert torch.equal(m.encoder.t5_encoder.encoder.block[1].layer[1].DenseReluDense.wo.weight,
                       t5.encoder.block[1].layer[1].DenseReluDense.wo.weight)
    b = {"image": torch.rand(4, 3, 64, 64), "face": torch.rand(4, 3, 112, 112),
         "has_face": torch.tensor([True, True, False, True]), "caption": PROMPTS * 2,
         "identity": ["a", "b", "", "a"]}
    losses, _ = m.compute_losses(b)
    assert sorted(losses) == ["identity", "image", "text"]
    # the face ViT's outputs cached in the shards (zeros on rows without a face, as the
    # loader collates them) give the same losses
    with torch.no_grad():
        feats = m.frozen_features(b, ["face_identity", "face_patches"])
        rows = b["has_face"]
        cached = {**b, "face_identity": feats["face_identity"] * rows[:, None],
                  "face_patches": feats["face_patches"] * rows[:, None, None]}
        for name, value in m.compute_losses(cached)[0].items():
            torch.testing.assert_close(value, losses[name], atol=1e-5, rtol=1e-5)
    sum(losses.values()).backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None}
    assert any(n.startswith("encoder.fuser.") for n in trained)
    assert not any(n.startswith(("encoder.t5_encoder.", "encoder.face_encoder.", "clip.")) for n in trained)
    checkpoint = {"state_dict": m.state_dict()}
    m.on_save_checkpoint(checkpoint)
    spec = checkpoint["faceclip_zoo"]["exports"]["encoder"]
    assert spec["model_type"] == "facet5"
    torch.save(checkpoint, tmp_path / "last.ckpt")
    from faceclip_zoo.export import export_checkpoint

    out = export_checkpoint(str(tmp_path / "last.ckpt"), str(tmp_path / "exported"))
    back = load_model_dir(out, expect="facet5")
    faces = torch.rand(2, 3, 112, 112)
    m.encoder.eval()
    assert torch.equal(back.encode(PROMPTS, faces).embeds, m.encoder.encode(PROMPTS, faces).embeds)
    # a T5 of another size is a clear error
    bad = T5EncoderModel(HFT5Config(**FaceT5Config.from_name("facet5-tiny", t5_d_ff=48).t5.transformers_kwargs()))
    bad.save_pretrained(tmp_path / "t5-bad")
    with pytest.raises(UserError, match="do not match the encoder's T5"):
        FaceT5EncoderModule(t5_weights=str(tmp_path / "t5-bad")).setup("fit")


def test_the_backbone_swaps_to_umt5_by_name(tmp_path):
    """`encoder: facet5-umt5-tiny` puts transformers' UMT5EncoderModel (Wan 2.1's text
    encoder family) under FaceT5: a position bias in every block; its weights load from a
    UMT5EncoderModel folder; a T5 v1.1 folder is refused; the directory round trip keeps it."""
    from transformers import T5Config as HFT5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    from faceclip_zoo.tasks import FaceT5EncoderModule

    cfg = FaceT5Config.from_name("facet5-umt5-tiny")
    assert cfg.t5.architecture == "umt5" and FaceT5Config.from_name("facet5-tiny").t5.architecture == "t5"
    assert FaceT5Config.from_name("facet5-umt5-xxl").t5.vocab_size == 256384
    torch.manual_seed(0)
    umt5 = UMT5EncoderModel(UMT5Config(**cfg.t5.transformers_kwargs()))
    umt5.save_pretrained(tmp_path / "umt5")
    m = FaceT5EncoderModule(encoder="facet5-umt5-tiny", t5_weights=str(tmp_path / "umt5"))
    m.setup("fit")
    backbone = m.encoder.t5_encoder
    assert isinstance(backbone, UMT5EncoderModel)
    bias = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    assert torch.equal(backbone.state_dict()[bias], umt5.state_dict()[bias])  # in every block, unlike T5
    b = {"image": torch.rand(4, 3, 64, 64), "face": torch.rand(4, 3, 112, 112),
         "has_face": torch.tensor([True, True, False, True]), "caption": PROMPTS * 2,
         "identity": ["a", "b", "", "a"]}
    losses, _ = m.compute_losses(b)
    assert sorted(losses) == ["identity", "image", "text"] and all(torch.isfinite(v) for v in losses.values())
    save_model_dir(m.encoder.eval(), tmp_path / "enc")
    back = load_model_dir(tmp_path / "enc", expect="facet5")
    assert isinstance(back.t5_encoder, UMT5EncoderModel)
    faces = torch.rand(2, 3, 112, 112)
    assert torch.equal(back.encode(PROMPTS, faces).embeds, m.encoder.encode(PROMPTS, faces).embeds)
    t5 = T5EncoderModel(HFT5Config(**FaceT5Config.from_name("facet5-tiny").t5.transformers_kwargs()))
    t5.save_pretrained(tmp_path / "t5")
    with pytest.raises(UserError, match="relative_attention_bias"):
        FaceT5EncoderModule(encoder="facet5-umt5-tiny", t5_weights=str(tmp_path / "t5")).setup("fit")
