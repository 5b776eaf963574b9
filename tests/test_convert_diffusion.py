"""Release diffusion backbones (unet.pt, dit.pt) -> diffusers folders that load offline."""

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

from faceclip_zoo.config import diffusers_config
from faceclip_zoo.models.convert_diffusion import convert_official_diffusers
from faceclip_zoo.models.diffusers_models import build_diffusers_on_meta
from faceclip_zoo.utils import UserError


def test_release_sizes_on_meta():
    unet = build_diffusers_on_meta(diffusers_config("sdxl-unet"))
    flux = build_diffusers_on_meta(diffusers_config("flux-dev-transformer"))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in flux.parameters()) == 11_901_408_320


def _unet_inputs(cfg):
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 7, cfg["cross_attention_dim"], generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(1, 64, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})


def test_unet_round_trip(tmp_path):
    cfg = diffusers_config("sdxl-unet-tiny")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if k != "_class_name"}).eval()
    torch.save({k: v.bfloat16() for k, v in unet.state_dict().items()}, tmp_path / "unet.pt")
    info = convert_official_diffusers(tmp_path / "unet.pt", tmp_path / "out", cfg, "SDXL UNet")
    assert info["source_keys"] == info["converted_keys"] == len(unet.state_dict())
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    ref = unet.to(torch.bfloat16).to(torch.float32)  # what the bf16 release file holds
    with torch.no_grad():
        a = ref(**_unet_inputs(cfg)).sample
        b = loaded(**_unet_inputs(cfg)).sample
    torch.testing.assert_close(a, b)


def test_flux_round_trip(tmp_path):
    cfg = diffusers_config("flux-transformer-tiny")
    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_config({k: v for k, v in cfg.items() if k != "_class_name"}).eval()
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, tmp_path / "dit.pt")
    convert_official_diffusers(tmp_path / "dit.pt", tmp_path / "out", cfg, "FLUX transformer")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, loaded(**inputs).sample)


def test_wrong_backbone_is_reported(tmp_path):
    cfg = diffusers_config("sdxl-unet-tiny")
    unet = UNet2DConditionModel.from_config({k: v for k, v in cfg.items() if k != "_class_name"})
    sd = unet.state_dict()
    sd.pop("conv_in.weight")
    torch.save(sd, tmp_path / "unet.pt")
    with pytest.raises(UserError, match=r"1 missing keys \[conv_in.weight\]"):
        convert_official_diffusers(tmp_path / "unet.pt", tmp_path / "out", cfg, "SDXL UNet")
    with pytest.raises(UserError, match="does not match"):
        convert_official_diffusers(tmp_path / "unet.pt", tmp_path / "out2", "sdxl-unet", "SDXL UNet")
