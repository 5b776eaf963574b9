"""Real-size stand-ins: seeded random weights in exactly the folder layouts the production
recipes read, so every recipe runs unchanged but for its weight paths where no real
weights can be downloaded (`python -m faceclip_zoo standins --out standins`).

    standins/weights/stable-diffusion-xl-base-1.0/{unet,vae}/      diffusers folders (fp32, as released)
    standins/checkpoints/faceclip-release/faceclip-l14/            converted release encoders
    standins/checkpoints/faceclip-release/faceclip-bigg14/         (model.safetensors + config.json)
    standins/weights/face_vit_l.pt                                 arcface_torch ViT-L state dict (pickle)
    standins/weights/ViT-L-14-quickgelu-metaclip_fullcc.bin        open_clip state dict (pickle)
    standins/weights/ViT-bigG-14-metaclip_fullcc.bin
    standins/weights/FLUX.1-dev/{transformer,vae,tokenizer,tokenizer_2}/   (transformer: bf16 shards)
    standins/weights/FLUX.1-dev/text_encoder_2/                    T5-XXL encoder (bf16 shards)
    standins/checkpoints/faceclip-release/{facet5-xxl-release,clip-l-text}/
    standins/weights/Wan2.1-T2V-1.3B-Diffusers/{transformer,vae,tokenizer}/     (fp32, as released)
    standins/weights/Wan2.1-T2V-1.3B-Diffusers/text_encoder/       umT5-XXL encoder (bf16 shards)
    standins/checkpoints/facet5-umt5-xxl/                          FaceT5 on umT5-XXL (bf16), what
                                                                   `export` of its pre-training writes

A recipe's `weights/...` and `checkpoints/...` paths then point under `standins/`. Every
tensor is drawn from its own seed (the run's seed and the tensor's name), so a file is the
same however it is written; weights are normal(0, 1/sqrt(fan_in)), norm scales one, biases
and running means zero, running variances one: finite activations through every layer,
which is all a stand-in is for (memory, speed, shapes, dtypes; never quality). The model is
built on the meta device and each tensor generated while it is written, so a stand-in
larger than this machine's memory (FLUX.1-dev's transformer) is written in pieces of one
tensor. `size: tiny` writes the same layouts with the quickstart's tiny configs (tests and
the dry run of `bench --only real-size`).
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from faceclip_zoo.utils import UserError, check_output_folder

log = logging.getLogger(__name__)

SDXL_BASE = "weights/stable-diffusion-xl-base-1.0"
FLUX_DEV = "weights/FLUX.1-dev"
WAN_13B = "weights/Wan2.1-T2V-1.3B-Diffusers"
RELEASE = "checkpoints/faceclip-release"


def standin_tensor(name: str, shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The stand-in value of one weight, from its name, shape and the run's seed alone."""
    leaf = name.rsplit(".", 1)[-1]
    if not dtype.is_floating_point:
        if leaf == "position_ids":
            return torch.arange(shape[-1], dtype=dtype).expand(shape).clone()
        return torch.zeros(shape, dtype=dtype)
    if leaf == "running_var":
        return torch.ones(shape, dtype=dtype)
    if leaf in ("bias", "running_mean") or len(shape) == 0:
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:
        # a norm's scale (LayerNorm, GroupNorm, RMSNorm, BatchNorm weight) is one; other
        # vectors (layer scales, class embeddings) small
        if leaf == "weight" or "norm" in name:
            return torch.ones(shape, dtype=dtype)
        std = 0.02
    else:
        std = 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return (torch.randn(shape, generator=g) * std).to(dtype)


class StandinTensors:
    """{name: tensor} generated on demand from the names, shapes and dtypes of a model built
    on the meta device: a lazy state dict for io.write_safetensors (`specs` gives the header
    without generating anything)."""

    def __init__(self, specs: dict[str, tuple[tuple, torch.dtype]], seed: int, dtype: torch.dtype | None = None):
        self.specs = {k: (shape, dtype if dtype is not None and dt.is_floating_point else dt)
                      for k, (shape, dt) in specs.items()}
        self.seed = seed

    @classmethod
    def of(cls, module: torch.nn.Module, seed: int, dtype: torch.dtype | None = None,
           rename: Callable[[str], str] = lambda k: k) -> "StandinTensors":
        return cls({rename(k): (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}, seed, dtype)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape, dtype = self.specs[name]
        return standin_tensor(name, shape, dtype, self.seed)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def nbytes(self, names=None) -> int:
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                   for k, (s, d) in self.specs.items() if names is None or k in names)


def _meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return build()


def write_weights(folder: Path, stem: str, tensors: StandinTensors, max_shard_bytes: int | None = None) -> list[Path]:
    """`<stem>.safetensors`, or shards `<stem>-0000i-of-0000n.safetensors` with
    `<stem>.safetensors.index.json` as diffusers and transformers write them."""
    from faceclip_zoo.models.io import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        n = tensors.nbytes([name])
        if max_shard_bytes and shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        path = folder / f"{stem}.safetensors"
        write_safetensors(path, tensors)
        return [path]
    paths, weight_map = [], {}
    for i, part in enumerate(shards, 1):
        path = folder / f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path, _Subset(tensors, part))
        weight_map.update({name: path.name for name in part})
        paths.append(path)
    index = {"metadata": {"total_size": tensors.nbytes()}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


class _Subset:
    def __init__(self, tensors: StandinTensors, names: list[str]):
        self.specs = {k: tensors.specs[k] for k in names}
        self._tensors = tensors

    def __getitem__(self, name):
        return self._tensors[name]

    def __iter__(self):
        return iter(self.specs)

    def __len__(self):
        return len(self.specs)


# ----------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Names:
    """The configs a size writes (real: the released architectures)."""

    unet: str
    vae: str
    encoder_l: str
    encoder_g: str
    face_vit: str
    clip_l: str
    clip_g: str
    flux_transformer: str
    flux_vae: str
    facet5: str
    clip_text: str
    t5: str
    wan_transformer: str
    wan_vae: str
    umt5: str
    facet5_umt5: str


SIZES = {
    "real": Names(unet="sdxl-unet", vae="sdxl-vae", encoder_l="faceclip-l14", encoder_g="faceclip-bigg14",
                  face_vit="face-vit-l", clip_l="clip-l14", clip_g="clip-bigg14",
                  flux_transformer="flux-dev-transformer", flux_vae="flux-vae", facet5="facet5-xxl-release",
                  clip_text="clip-l-text", t5="t5-v1_1-xxl", wan_transformer="wan-1.3b-transformer",
                  wan_vae="wan-vae", umt5="umt5-xxl", facet5_umt5="facet5-umt5-xxl"),
    "tiny": Names(unet="sdxl-unet-tiny", vae="vae-tiny", encoder_l="faceclip-tiny", encoder_g="faceclip-tiny",
                  face_vit="face-vit-tiny", clip_l="clip-tiny", clip_g="clip-tiny",
                  flux_transformer="flux-transformer-tiny", flux_vae="vae-tiny", facet5="facet5-tiny",
                  clip_text="clip-text-tiny", t5="t5-tiny", wan_transformer="wan-transformer-tiny",
                  wan_vae="wan-vae-tiny", umt5="umt5-tiny", facet5_umt5="facet5-umt5-tiny"),
}


def _diffusers_folder(folder: Path, config_name: str, seed: int, dtype: torch.dtype | None,
                      max_shard_bytes: int | None = None) -> None:
    from faceclip_zoo.config import diffusers_config
    from faceclip_zoo.models.diffusers_models import build_diffusers

    config = diffusers_config(config_name)
    model = _meta(lambda: build_diffusers(config))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(str(folder))  # config.json as diffusers writes it (_class_name included)
    write_weights(folder, "diffusion_pytorch_model", StandinTensors.of(model, seed, dtype), max_shard_bytes)


def write_sdxl_base(root: Path, names: Names, seed: int) -> list[str]:
    """SDXL base 1.0's unet/ and vae/ (float32, as stabilityai ships them)."""
    base = root / SDXL_BASE
    _diffusers_folder(base / "unet", names.unet, seed, None)
    _diffusers_folder(base / "vae", names.vae, seed + 1, None)
    return [str(base / "unet"), str(base / "vae")]


def write_faceclip_release(root: Path, names: Names, seed: int) -> list[str]:
    """The two converted FaceCLIP branches (what `convert` writes from the release)."""
    from faceclip_zoo.config import FaceCLIPConfig
    from faceclip_zoo.models.faceclip import FaceCLIPEncoder
    from faceclip_zoo.models.io import write_model_dir

    out = []
    for folder, name, s in (("faceclip-l14", names.encoder_l, seed + 2), ("faceclip-bigg14", names.encoder_g, seed + 3)):
        cfg = FaceCLIPConfig.from_name(name)
        model = _meta(lambda: FaceCLIPEncoder(cfg))
        write_model_dir(root / RELEASE / folder, "faceclip", cfg, StandinTensors.of(model, s),
                        extra={"standin": f"seeded random weights (seed {s}), not the release"})
        out.append(str(root / RELEASE / folder))
    return out


def write_pretrain_inputs(root: Path, names: Names, seed: int) -> list[str]:
    """The pre-training recipes' frozen inputs, as their publishers ship them: arcface_torch's
    ViT-L state dict and open_clip's CLIP state dicts, as torch pickles (loaded weights-only)."""
    from faceclip_zoo.config import CLIPConfig, FaceViTConfig
    from faceclip_zoo.models.clip import build_clip
    from faceclip_zoo.models.face_vit import FaceViT

    weights = root / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    out = []
    jobs = (("face_vit_l.pt", lambda: FaceViT(FaceViTConfig.from_name(names.face_vit)), seed + 4),
            ("ViT-L-14-quickgelu-metaclip_fullcc.bin", lambda: build_clip(CLIPConfig.from_name(names.clip_l)), seed + 5),
            ("ViT-bigG-14-metaclip_fullcc.bin", lambda: build_clip(CLIPConfig.from_name(names.clip_g)), seed + 6))
    for file, build, s in jobs:
        tensors = StandinTensors.of(_meta(build), s)
        # a pickle is written whole (torch.save); these are at most 2.5 B parameters (bigG)
        torch.save({k: tensors[k] for k in tensors}, weights / file)
        out.append(str(weights / file))
    return out


def write_flux_dev(root: Path, names: Names, seed: int) -> list[str]:
    """FLUX.1-dev's transformer (bf16, in shards of at most 10 GB with their index, as
    black-forest-labs ships it: 23.8 GB), vae (bf16), and the two tokenizer folders: CLIP's
    real vocabulary (rebuilt from open_clip's copy) and, for T5, a stand-in vocabulary (the
    builtin word list: no package ships T5's SentencePiece model; ids stay within the real
    embedding table)."""
    from faceclip_zoo.models.text_encoders import build_clip_tokenizer

    base = root / FLUX_DEV
    _diffusers_folder(base / "transformer", names.flux_transformer, seed + 7, torch.bfloat16, 10 * 10**9)
    _diffusers_folder(base / "vae", names.flux_vae, seed + 8, torch.bfloat16)
    build_clip_tokenizer(None).save_pretrained(str(base / "tokenizer"))
    _t5_tokenizer_standin(base / "tokenizer_2")
    return [str(base / part) for part in ("transformer", "vae", "tokenizer", "tokenizer_2")]


def _t5_tokenizer_standin(folder: Path) -> None:
    from transformers import T5Tokenizer

    from faceclip_zoo.models.text_encoders import builtin_t5_vocab

    T5Tokenizer(vocab=list(builtin_t5_vocab()), extra_ids=0).save_pretrained(str(folder))


def _t5_encoder_folder(folder: Path, t5_name: str, seed: int) -> None:
    """A transformers T5EncoderModel / UMT5EncoderModel folder: config.json and bf16 shards
    with their model.safetensors.index.json, the tied input embedding stored once (`shared`)."""
    from faceclip_zoo.config import T5Config

    t5 = T5Config.from_name(t5_name)
    if t5.architecture == "umt5":
        from transformers import UMT5Config as HFConfig, UMT5EncoderModel as Model
    else:
        from transformers import T5Config as HFConfig, T5EncoderModel as Model
    config = HFConfig(**t5.transformers_kwargs())
    model = _meta(lambda: Model(config))
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = StandinTensors({k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()
                              if k != "encoder.embed_tokens.weight"}, seed, torch.bfloat16)
    write_weights(folder, "model", tensors, tensors.nbytes() // 2 + 1)  # in shards, as released


def write_flux_dev_t5(root: Path, names: Names, seed: int) -> list[str]:
    """FLUX.1-dev's text_encoder_2 (google/t5-v1_1-xxl's encoder, a transformers
    T5EncoderModel folder in half-precision shards, 9.5 GB) and tokenizer_2 (the stand-in
    vocabulary): what FaceT5 pre-training reads."""
    base = root / FLUX_DEV
    _t5_encoder_folder(base / "text_encoder_2", names.t5, seed + 11)
    _t5_tokenizer_standin(base / "tokenizer_2")
    return [str(base / "text_encoder_2"), str(base / "tokenizer_2")]


def write_wan(root: Path, names: Names, seed: int) -> list[str]:
    """Wan2.1-T2V-1.3B-Diffusers' transformer and vae (float32, as Wan-AI ships them: 5.7 GB
    and 0.5 GB) and tokenizer (the stand-in vocabulary: no package ships umT5's SentencePiece
    model; ids stay within the real 256k embedding table)."""
    base = root / WAN_13B
    _diffusers_folder(base / "transformer", names.wan_transformer, seed + 12, None)
    _diffusers_folder(base / "vae", names.wan_vae, seed + 13, None)
    _t5_tokenizer_standin(base / "tokenizer")
    return [str(base / part) for part in ("transformer", "vae", "tokenizer")]


def write_wan_umt5(root: Path, names: Names, seed: int) -> list[str]:
    """The Wan repositories' text_encoder (google/umt5-xxl's encoder, UMT5EncoderModel, bf16
    shards: 11.4 GB) and tokenizer: what FaceT5-umT5 pre-training reads."""
    base = root / WAN_13B
    _t5_encoder_folder(base / "text_encoder", names.umt5, seed + 14)
    _t5_tokenizer_standin(base / "tokenizer")
    return [str(base / "text_encoder"), str(base / "tokenizer")]


def write_facet5_umt5(root: Path, names: Names, seed: int) -> list[str]:
    """FaceT5 on umT5-XXL as `export` writes it after recipes/facet5-umt5-xxl/pretrain.yaml
    (bf16: 14.1 GB): the encoder the Wan recipes read."""
    from faceclip_zoo.config import FaceT5Config
    from faceclip_zoo.models.facet5 import FaceT5Encoder
    from faceclip_zoo.models.io import write_model_dir

    cfg = FaceT5Config.from_name(names.facet5_umt5)
    encoder = _meta(lambda: FaceT5Encoder(cfg))
    write_model_dir(root / "checkpoints" / "facet5-umt5-xxl", "facet5", cfg,
                    StandinTensors.of(encoder, seed + 15, torch.bfloat16),
                    extra={"standin": f"seeded random weights (seed {seed + 15}), not a trained encoder"})
    return [str(root / "checkpoints" / "facet5-umt5-xxl")]


def write_facet5_release(root: Path, names: Names, seed: int) -> list[str]:
    """The converted FaceT5 release (its T5-XXL inside, bf16: 9.9 GB) and the CLIP-L text
    model whose pooled output FLUX reads (what `convert` writes from face_t5_encoder.pt)."""
    from faceclip_zoo.config import CLIP_TEXT_CONFIGS, FaceT5Config
    from faceclip_zoo.models.convert_facet5 import write_clip_text_dir
    from faceclip_zoo.models.facet5 import FaceT5Encoder
    from faceclip_zoo.models.io import write_model_dir
    from faceclip_zoo.models.text_encoders import build_clip_text_model

    cfg = FaceT5Config.from_name(names.facet5)
    encoder = _meta(lambda: FaceT5Encoder(cfg))
    write_model_dir(root / RELEASE / "facet5-xxl-release", "facet5", cfg,
                    StandinTensors.of(encoder, seed + 9, torch.bfloat16),
                    extra={"standin": f"seeded random weights (seed {seed + 9}), not the release"})
    clip_cfg = dict(CLIP_TEXT_CONFIGS[names.clip_text])
    clip = _meta(lambda: build_clip_text_model(clip_cfg))
    write_clip_text_dir(root / RELEASE / "clip-l-text", clip_cfg, StandinTensors.of(clip, seed + 10),
                        f"# stand-in: seeded random weights (seed {seed + 10}), not the release\n")
    return [str(root / RELEASE / "facet5-xxl-release"), str(root / RELEASE / "clip-l-text")]


SETS: dict[str, Callable[[Path, Names, int], list[str]]] = {
    "sdxl-base": write_sdxl_base,
    "faceclip-release": write_faceclip_release,
    "pretrain-inputs": write_pretrain_inputs,
    "flux-dev": write_flux_dev,
    "flux-dev-t5": write_flux_dev_t5,
    "facet5-release": write_facet5_release,
    "wan-1.3b": write_wan,
    "wan-umt5": write_wan_umt5,
    "facet5-umt5": write_facet5_umt5,
}


def standins(out: str = "standins", only: str = ",".join(SETS), size: str = "real", seed: int = 0,
             overwrite: bool = False) -> list[str]:
    """Write seeded random weights in the layouts the production recipes read.

    Args:
        out: the root: recipes' `weights/...` and `checkpoints/...` paths go under it.
        only: comma-separated sets: sdxl-base (SDXL base 1.0 unet/vae), faceclip-release
            (the converted FaceCLIP-L/14 and bigG/14 branches), pretrain-inputs (the face ViT-L
            and open_clip CLIP-L/14 and bigG/14 weights of the pre-training recipes), flux-dev
            (FLUX.1-dev's transformer, vae and tokenizers), flux-dev-t5 (its T5-XXL
            text_encoder_2 and tokenizer_2, for FaceT5 pre-training), facet5-release (the converted
            FaceT5-XXL and CLIP-L text model), wan-1.3b (Wan2.1-T2V-1.3B's transformer, vae and
            tokenizer), wan-umt5 (its umT5-XXL text_encoder, for FaceT5-umT5 pre-training),
            facet5-umt5 (an exported FaceT5 on umT5-XXL).
        size: real (the released architectures; tens of GB) or tiny (the same layouts with
            the quickstart configs).
        seed: every tensor's values follow from it and the tensor's name.
        overwrite: write a set again although its folder exists.
    """
    if size not in SIZES:
        raise UserError(f"--size must be one of {sorted(SIZES)}, got {size!r}")
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SETS))
    if unknown:
        raise UserError(f"standins: unknown set(s) {unknown}; choose from {sorted(SETS)}")
    root = check_output_folder(out, "--out", overwrite=True)  # sets already there are kept, not cleared
    marker = root / "standins.json"
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    if done and (done.get("size"), done.get("seed")) != (size, seed):
        raise UserError(f"{root} holds stand-ins of size {done.get('size')} seed {done.get('seed')}; write these "
                        "into another --out")
    written = []
    for name in wanted:
        if name in done.get("sets", {}) and not overwrite:
            log.info("%s: already in %s (--overwrite true to write it again)", name, root)
            written += done["sets"][name]
            continue
        paths = SETS[name](root, SIZES[size], seed)
        done = {"size": size, "seed": seed, "sets": {**done.get("sets", {}), name: paths}}
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(done, indent=2) + "\n")
        written += paths
        log.info("%s: wrote %s", name, ", ".join(paths))
    return written
