"""Official FaceCLIP encoder file -> our directories: strict mapping, numerical parity with
the release's computation, safe loading, streaming memory."""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from faceclip_zoo.bench.release_reference import (
    official_state_from_ours, randomised_branch_state, release_branch_forward,
)
from faceclip_zoo.config import FaceCLIPConfig
from faceclip_zoo.models import FaceCLIPEncoder, load_model_dir
from faceclip_zoo.models.clip import build_text_tower, build_tokenizer
from faceclip_zoo.models.convert_faceclip import convert_official_faceclip
from faceclip_zoo.utils import UserError

CONFIGS = {  # release layout and names, small widths
    "face_clip_l": FaceCLIPConfig.from_name("faceclip-tiny"),
    "face_clip_g": FaceCLIPConfig.from_name("faceclip-tiny", name="faceclip-tiny-g", text_width=96, text_heads=4, text_embed_dim=96,
                                            text_layers=3, fusion_layers=3),
}


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    sd = {}
    for i, (branch, cfg) in enumerate(CONFIGS.items()):
        ours = randomised_branch_state(cfg, seed=i)
        for k, v in official_state_from_ours(ours, cfg.width).items():
            sd[f"model.{branch}.{k}"] = v
    path = folder / "face_clip_encoder.pt"
    torch.save(sd, path)
    return path, sd


def test_convert_is_strict_and_complete(official_file, tmp_path):
    path, sd = official_file
    report = convert_official_faceclip(path, tmp_path, configs=CONFIGS)
    assert set(report) == {"faceclip-tiny", "faceclip-tiny-g"}
    total = sum(r["source_keys"] for r in report.values())
    assert total == len(sd)
    for info in report.values():
        assert {k.split(".", 1)[1] for k in info["dropped_unused"]} == {
            "fuser.enc_output.weight", "fuser.enc_output.bias",
            "fuser.enc_output_norm.weight", "fuser.enc_output_norm.bias"}
        assert info["converted_keys"] + 4 == info["source_keys"]


@pytest.mark.parametrize("branch", list(CONFIGS))
def test_parity_with_release_computation(official_file, tmp_path, branch):
    path, sd = official_file
    convert_official_faceclip(path, tmp_path, configs=CONFIGS)
    cfg = CONFIGS[branch]
    ours = FaceCLIPEncoder(cfg).eval()
    branch_sd = {k[len(f"model.{branch}."):]: v for k, v in sd.items() if k.startswith(f"model.{branch}.")}
    from faceclip_zoo.models.convert_faceclip import official_to_ours

    ours.load_state_dict({official_to_ours(k): v for k, v in branch_sd.items() if official_to_ours(k)})

    tower = build_text_tower(cfg.text).transformer
    tower.load_state_dict({k[len("transformer."):]: v for k, v in branch_sd.items() if k.startswith("transformer.")})
    tower.eval()
    tok = build_tokenizer(cfg.text)
    torch.manual_seed(5)
    images = torch.rand(3, 3, 448, 448)  # full-size aligned crops, resized to 112 inside
    face_exist = [True, False, True]
    texts = ["a woman in a red coat, smiling", "a quiet street at night", "a man wearing glasses"]
    with torch.no_grad():
        ref_embeds, ref_pooled = release_branch_forward(branch_sd, cfg, tower, tok, images * torch.tensor(
            face_exist, dtype=torch.float)[:, None, None, None], face_exist, texts)
        has_face = torch.tensor(face_exist)
        out = ours(images, ours.tokenize(texts, face_exist), has_face)
    assert (out.embeds - ref_embeds).abs().max().item() < 1e-4
    assert (out.pooled - ref_pooled).abs().max().item() < 1e-4
    # and the converted directory reproduces it from disk
    loaded = load_model_dir(tmp_path / cfg.name)
    assert loaded.config == cfg
    with torch.no_grad():
        again = loaded(images, loaded.tokenize(texts, face_exist), has_face)
    assert (again.embeds - out.embeds).abs().max().item() < 1e-5


def test_bf16_release_converts_without_upcasting(tmp_path):
    cfg = CONFIGS["face_clip_l"]
    sd = {}
    for branch in CONFIGS:
        ours = randomised_branch_state(CONFIGS[branch], 0)
        sd.update({f"{branch}.{k}": (v.bfloat16() if v.is_floating_point() else v)
                   for k, v in official_state_from_ours(ours, CONFIGS[branch].width).items()})
    torch.save(sd, tmp_path / "face_clip_encoder.pt")
    convert_official_faceclip(tmp_path / "face_clip_encoder.pt", tmp_path / "out", configs=CONFIGS)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / cfg.name / "model.safetensors"), "pt") as f:
        assert f.get_slice("fuser.fusion_layers.0.gamma_v").get_dtype() == "BF16"
    loaded = load_model_dir(tmp_path / "out" / cfg.name)
    assert loaded.token_embedding.weight.dtype == torch.float32


@pytest.mark.parametrize("breakage,message", [
    (lambda sd: sd.pop("face_clip_l.proj1.weight"), "1 missing keys [proj1.weight]"),
    (lambda sd: sd.update({"face_clip_g.extra.weight": torch.zeros(1)}), "1 unexpected keys [extra.weight]"),
    (lambda sd: sd.update({"face_clip_l.proj1.bias": torch.zeros(3)}), "proj1.bias: got (3,) expected (64,)"),
    (lambda sd: sd.update({"vae.weight": torch.zeros(1)}), "belong to no FaceCLIP branch"),
])
def test_mismatches_are_reported_clearly(tmp_path, official_file, breakage, message):
    _, sd = official_file
    sd = {k[len("model."):]: v for k, v in sd.items()}
    breakage(sd)
    torch.save(sd, tmp_path / "f.pt")
    with pytest.raises(UserError) as err:
        convert_official_faceclip(tmp_path / "f.pt", tmp_path / "out", configs=CONFIGS)
    assert message in str(err.value)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"face_clip_l.proj1.weight": _Exploit(marker)}, f)
    with pytest.raises(UserError, match="refusing to load"):
        convert_official_faceclip(tmp_path / "evil.pt", tmp_path / "out")
    assert not marker.exists()
    # the same through torch.save's zip container
    torch.save({"x": _Exploit(marker)}, tmp_path / "evil2.pt")
    with pytest.raises(UserError, match="refusing to load"):
        convert_official_faceclip(tmp_path / "evil2.pt", tmp_path / "out")
    assert not marker.exists()


MEMORY_PROBE = r"""
import sys, torch
from faceclip_zoo.config import FaceCLIPConfig
from faceclip_zoo.models.convert_faceclip import convert_official_faceclip
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
cfg = {"face_clip_l": FaceCLIPConfig.from_name("faceclip-l14"),
       "face_clip_g": FaceCLIPConfig.from_name("faceclip-tiny")}
before = rss("VmRSS:")
convert_official_faceclip(sys.argv[1], sys.argv[2], configs=cfg)
print(before, rss("VmHWM:"))
"""


@pytest.mark.slow
def test_conversion_streams_a_full_size_branch(tmp_path):
    """A full-size L/14 branch in bf16 (0.9 GB): peak memory of the conversion stays
    below 1.5x the file (safetensors' own writer alone would need ~2x)."""
    from faceclip_zoo.models.io import build_on_meta
    from faceclip_zoo.bench.release_reference import official_state_from_ours

    sd = {}
    for branch, name in (("face_clip_l", "faceclip-l14"), ("face_clip_g", "faceclip-tiny")):
        meta = build_on_meta("faceclip", FaceCLIPConfig.from_name(name)).state_dict()
        shapes = {k: torch.empty(v.shape, dtype=torch.bfloat16 if v.is_floating_point() else v.dtype).zero_()
                  for k, v in meta.items()}
        width = FaceCLIPConfig.from_name(name).width
        extra = official_state_from_ours({}, width)
        sd.update({f"{branch}.{k}": v for k, v in shapes.items()})
        sd.update({f"{branch}.{k}": v.bfloat16() for k, v in extra.items()})
    path = tmp_path / "face_clip_encoder.pt"
    torch.save(sd, path)
    del sd, shapes
    size = path.stat().st_size
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    before, peak = map(int, res.stdout.split())
    print(f"file {size / 2**30:.2f} GiB, conversion peak {(peak - before) / 2**30:.2f} GiB above baseline")
    assert peak - before < 1.5 * size
    assert (tmp_path / "out" / "faceclip-l14" / "model.safetensors").stat().st_size > 0.9 * size


def test_convert_command_errors_are_one_line(tmp_path, official_file):
    path, _ = official_file
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "convert", "--official", str(path),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "does not match faceclip-l14" in lines[0] and "shape mismatches" in lines[0]
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "convert", "--official", str(tmp_path),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "no release files" in res.stderr
