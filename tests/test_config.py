import pytest

from faceclip_zoo.config import CLIPConfig, ConfigError, FaceCLIPConfig, FaceViTConfig


def test_from_name_with_flat_and_nested_overrides():
    cfg = FaceCLIPConfig.from_name("faceclip-l14", text_layers=2, fusion={"layers": 1}, face_depth=3)
    assert (cfg.text.layers, cfg.fusion.layers, cfg.face.depth) == (2, 1, 3)
    # the registry entry itself is untouched
    assert FaceCLIPConfig.from_name("faceclip-l14").text.layers == 12


def test_release_sizes():
    l14, g14 = FaceCLIPConfig.from_name("faceclip-l14"), FaceCLIPConfig.from_name("faceclip-bigg14")
    assert (l14.text.width, l14.text.layers, l14.text.heads, l14.text.quick_gelu) == (768, 12, 12, True)
    assert (g14.text.width, g14.text.layers, g14.text.heads, g14.text.quick_gelu) == (1280, 32, 20, False)
    face = FaceViTConfig.from_name("face-vit-l")
    assert (face.num_patches, face.width, face.depth, face.heads, face.id_dim) == (144, 768, 24, 8, 512)


def test_round_trip_dict():
    cfg = FaceCLIPConfig.from_name("faceclip-tiny", fusion_layers=3)
    assert FaceCLIPConfig.from_dict(cfg.to_dict()) == cfg
    clip = CLIPConfig.from_name("clip-tiny")
    assert CLIPConfig.from_dict(clip.to_dict()) == clip


def test_unknown_names_are_clear():
    with pytest.raises(ConfigError, match="unknown FaceCLIPConfig name 'faceclip-xl'"):
        FaceCLIPConfig.from_name("faceclip-xl")
    with pytest.raises(ConfigError, match="no field"):
        FaceCLIPConfig.from_name("faceclip-tiny", text_depth=2)
    with pytest.raises(ConfigError, match="unknown keys"):
        FaceCLIPConfig.from_dict({"name": "x", "bogus": 1})


def test_any_open_clip_text_tower_by_name():
    cfg = FaceCLIPConfig.from_name("faceclip-l14", text="ViT-B-16")
    assert (cfg.text.open_clip_name, cfg.text.width, cfg.text.layers, cfg.text.embed_dim) == ("ViT-B-16", 512, 12, 512)
    clip = CLIPConfig.from_name("ViT-B-16", vision_layers=2)
    assert clip.vision.patch_size == 16 and clip.vision.layers == 2 and clip.embed_dim == 512
    with pytest.raises(ConfigError, match="neither"):
        FaceCLIPConfig.from_name("faceclip-l14", text="no-such-tower")


def test_swapped_backbone_builds_and_encodes():
    import torch

    from faceclip_zoo.models import FaceCLIPEncoder

    cfg = FaceCLIPConfig.from_name("faceclip-tiny", text="RN50", text_layers=1, text_width=32, text_heads=2,
                                   text_embed_dim=16)
    enc = FaceCLIPEncoder(cfg).eval()
    out = enc.encode(["a photo"], torch.rand(1, 3, 112, 112))
    assert out.embeds.shape == (1, 77, 32)
