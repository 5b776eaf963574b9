"""Named model configurations.

This module imports nothing heavy (no torch, no open_clip) so a config can be read,
printed and overridden on its own. Every size the zoo knows is a named entry here;
tests and quickstart recipes shrink the real entries with overrides instead of keeping
toy classes:

    FaceCLIPConfig.from_name("faceclip-l14", text_layers=2, fusion_layers=1)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional


class ConfigError(ValueError):
    """A config name or override that does not exist."""


def _apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Apply `overrides` to a (nested) dataclass.

    A key is either a field of `cfg` (a dict value is merged into a nested dataclass, a
    string replaces it by that named config: `text="ViT-B-16"`), or
    `<nested field>_<its field>` as a flat shortcut: `text_layers=2` sets `cfg.text.layers`.
    """
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if key in names:
            current = getattr(cfg, key)
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                _apply_overrides(current, value)
            elif dataclasses.is_dataclass(current) and isinstance(value, str):
                setattr(cfg, key, type(current).from_name(value))  # swap a whole backbone
            else:
                setattr(cfg, key, value)
            continue
        prefix, _, rest = key.partition("_")
        nested = getattr(cfg, prefix, None) if prefix in names else None
        if rest and dataclasses.is_dataclass(nested):
            _apply_overrides(nested, {rest: value})
            continue
        raise ConfigError(
            f"{type(cfg).__name__} has no field {key!r}; known fields: {sorted(names)}"
        )
    return cfg


class _Named:
    """Mixin: a registry of named instances plus dict round-trips."""

    registry: ClassVar[dict[str, Any]]

    @classmethod
    def from_name(cls, name: str, /, **overrides: Any):
        if name not in cls.registry:
            raise ConfigError(
                f"unknown {cls.__name__} name {name!r}; known: {sorted(cls.registry)}"
            )
        cfg = copy.deepcopy(cls.registry[name])
        return _apply_overrides(cfg, overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data.pop(f.name)
            sub = _NESTED.get((cls.__name__, f.name))
            kwargs[f.name] = sub.from_dict(value) if sub and isinstance(value, dict) else value
        if data:
            raise ConfigError(f"{cls.__name__} got unknown keys {sorted(data)}")
        return cls(**kwargs)


@dataclass
class FaceViTConfig(_Named):
    """Face-recognition ViT in the insightface arcface_torch `vit` layout (no CLS token).

    Its identity head flattens all patch tokens: Linear(num_patches*width -> width),
    BatchNorm1d, Linear(width -> id_dim), BatchNorm1d.
    """

    name: str = "face-vit-l"
    image_size: int = 112
    patch_size: int = 9
    width: int = 768
    depth: int = 24
    heads: int = 8
    mlp_ratio: float = 4.0
    id_dim: int = 512

    registry: ClassVar[dict[str, "FaceViTConfig"]] = {}

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass
class TextTowerConfig(_Named):
    """An open_clip text tower. `open_clip_name` picks the architecture family and
    tokenizer from open_clip's registry; the explicit numbers below override it, so a
    config.json alone says what was built."""

    open_clip_name: str = "ViT-L-14-quickgelu"
    width: int = 768
    layers: int = 12
    heads: int = 12
    embed_dim: int = 768  # text_projection output
    context_length: int = 77
    vocab_size: int = 49408
    quick_gelu: bool = True

    registry: ClassVar[dict[str, "TextTowerConfig"]] = {}

    @classmethod
    def from_name(cls, name: str, /, **overrides: Any) -> "TextTowerConfig":
        """Our named towers, else any open_clip model config by name (e.g. "ViT-B-16")."""
        if name in cls.registry:
            return super().from_name(name, **overrides)
        return _apply_overrides(cls.from_open_clip(name), overrides)

    @classmethod
    def from_open_clip(cls, name: str) -> "TextTowerConfig":
        full = _open_clip_config(name)
        text = full["text_cfg"]
        if text.get("hf_model_name"):
            raise ConfigError(f"open_clip model {name!r} uses a Hugging Face text tower; only "
                              "open_clip's own text transformers are supported")
        return cls(open_clip_name=name, width=text.get("width", 512), layers=text.get("layers", 12),
                   heads=text.get("heads", 8), embed_dim=full["embed_dim"],
                   context_length=text.get("context_length", 77),
                   vocab_size=text.get("vocab_size", 49408), quick_gelu=full.get("quick_gelu", False))


def _open_clip_config(name: str) -> dict:
    import open_clip  # imported lazily: this module stays light

    full = open_clip.get_model_config(name)
    if full is None:
        raise ConfigError(f"{name!r} is neither a faceclip_zoo config nor an open_clip model name")
    return full


@dataclass
class FusionConfig(_Named):
    """The face/text fuser: per layer a bi-directional attention block, a text
    self-attention layer and a deformable face self-attention layer."""

    layers: int = 6
    bi_attn_dim: int = 1024
    bi_attn_heads: int = 4
    text_heads: int = 4
    text_ff: int = 1024
    face_heads: int = 8
    face_points: int = 4
    face_levels: int = 1
    face_ff: int = 2048
    dropout: float = 0.0
    layer_scale_init: float = 1e-4
    # "deformable": FaceCLIP's deformable attention on the face grid; "plain": FaceT5's
    # ordinary multi-head self-attention over the face tokens.
    face_attention: str = "deformable"

    registry: ClassVar[dict[str, "FusionConfig"]] = {}


@dataclass
class FaceCLIPConfig(_Named):
    """One FaceCLIP branch: text tower + face ViT + fuser (docs/design.md,
    "The released FaceCLIP encoder for SDXL")."""

    name: str = "faceclip-l14"
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    face: FaceViTConfig = field(default_factory=FaceViTConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    id_prompt: str = "Photo of a id person."
    id_word: str = "id"
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: Optional[float] = -10.0

    registry: ClassVar[dict[str, "FaceCLIPConfig"]] = {}

    @property
    def width(self) -> int:
        return self.text.width


@dataclass
class VisionTowerConfig(_Named):
    """An open_clip vision tower (used frozen, for the image target e_I)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    head_width: int = 64
    mlp_ratio: float = 4.0

    registry: ClassVar[dict[str, "VisionTowerConfig"]] = {}


@dataclass
class CLIPConfig(_Named):
    """A full open_clip CLIP model: the frozen image/text targets of pre-training."""

    name: str = "clip-l14"
    embed_dim: int = 768
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)

    registry: ClassVar[dict[str, "CLIPConfig"]] = {}

    @classmethod
    def from_name(cls, name: str, /, **overrides: Any) -> "CLIPConfig":
        """Our named models, else any open_clip ViT model config by name."""
        if name in cls.registry:
            return super().from_name(name, **overrides)
        full = _open_clip_config(name)
        v = full["vision_cfg"]
        if not isinstance(v.get("layers"), int) or v.get("timm_model_name"):
            raise ConfigError(f"open_clip model {name!r} has no plain ViT image tower")
        vision = VisionTowerConfig(
            image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16),
            width=v.get("width", 768), layers=v["layers"], head_width=v.get("head_width", 64),
            mlp_ratio=v.get("mlp_ratio", 4.0))
        cfg = cls(name=name, embed_dim=full["embed_dim"], vision=vision,
                  text=TextTowerConfig.from_open_clip(name))
        return _apply_overrides(cfg, overrides)


@dataclass
class T5Config(_Named):
    """A T5 v1.1 encoder as transformers' T5EncoderModel builds it (gated GELU, RMSNorm,
    relative position bias shared from the first layer), or, with architecture "umt5", an
    umT5 encoder (UMT5EncoderModel: the same blocks, a relative position bias in every
    layer, a 256k multilingual vocabulary; Wan 2.1's text encoder).

    tokenizer: None = the real T5 v1.1 SentencePiece vocabulary, read from a local folder
    at build time (e.g. FLUX.1-dev/tokenizer_2, or <model dir>/tokenizer); "builtin-words"
    = a small word-level Unigram vocabulary built in-process (tests and quickstarts; no
    package ships T5's vocabulary file, and the hub is unreachable offline)."""

    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    vocab_size: int = 32128
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tokenizer: Optional[str] = None
    architecture: str = "t5"  # "t5" (T5EncoderModel) or "umt5" (UMT5EncoderModel)

    registry: ClassVar[dict[str, "T5Config"]] = {}

    def __post_init__(self) -> None:
        if self.architecture not in ("t5", "umt5"):
            raise ConfigError(f"T5Config.architecture must be 't5' or 'umt5', got {self.architecture!r}")

    def transformers_kwargs(self) -> dict[str, Any]:
        return dict(d_model=self.d_model, num_layers=self.num_layers, num_heads=self.num_heads,
                    d_kv=self.d_kv, d_ff=self.d_ff, vocab_size=self.vocab_size,
                    relative_attention_num_buckets=self.relative_attention_num_buckets,
                    relative_attention_max_distance=self.relative_attention_max_distance,
                    layer_norm_epsilon=self.layer_norm_epsilon, feed_forward_proj=self.feed_forward_proj,
                    dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)


@dataclass
class FaceT5Config(_Named):
    """The FaceT5 joint encoder for FLUX (docs/design.md, "FaceT5 for FLUX"): a frozen T5
    encoder, the face ViT, face projections, fixed sinusoidal text positions and a fuser whose face layers
    use plain attention. Output [B, text_length, t5.d_model] = FLUX prompt_embeds.

    release_compat: reproduce the release's forward exactly (face positional embedding
    never applied; the face layer's attention runs across the batch axis, which is right
    only at batch 1). Off (the default) for new training: per-sample attention with
    positions, as the architecture intends."""

    name: str = "facet5-xxl"
    t5: T5Config = field(default_factory=T5Config)
    face: FaceViTConfig = field(default_factory=FaceViTConfig)
    fusion: FusionConfig = field(default_factory=lambda: FusionConfig(face_attention="plain"))
    text_length: int = 512
    release_compat: bool = False

    registry: ClassVar[dict[str, "FaceT5Config"]] = {}

    @property
    def width(self) -> int:
        return self.t5.d_model


_NESTED = {
    ("FaceT5Config", "t5"): T5Config,
    ("FaceT5Config", "face"): FaceViTConfig,
    ("FaceT5Config", "fusion"): FusionConfig,
    ("FaceCLIPConfig", "text"): TextTowerConfig,
    ("FaceCLIPConfig", "face"): FaceViTConfig,
    ("FaceCLIPConfig", "fusion"): FusionConfig,
    ("CLIPConfig", "vision"): VisionTowerConfig,
    ("CLIPConfig", "text"): TextTowerConfig,
}


def _register(cls, name: str, cfg) -> None:
    cls.registry[name] = cfg


# ----------------------------------------------------------------------------- sizes
_register(FaceViTConfig, "face-vit-l", FaceViTConfig())
_register(
    FaceViTConfig,
    "face-vit-tiny",
    FaceViTConfig(name="face-vit-tiny", width=64, depth=2, heads=4, mlp_ratio=2.0, id_dim=64),
)

_register(TextTowerConfig, "ViT-L-14-quickgelu", TextTowerConfig())
_register(
    TextTowerConfig,
    "ViT-bigG-14",
    TextTowerConfig(
        open_clip_name="ViT-bigG-14", width=1280, layers=32, heads=20, embed_dim=1280,
        quick_gelu=False,
    ),
)
_register(
    TextTowerConfig,
    "text-tiny",
    TextTowerConfig(open_clip_name="ViT-B-32", width=64, layers=2, heads=2, embed_dim=64,
                    quick_gelu=False),
)

_register(FusionConfig, "fusion-release", FusionConfig())
_register(
    FusionConfig,
    "fusion-tiny",
    FusionConfig(layers=2, bi_attn_dim=128, bi_attn_heads=4, text_heads=4, text_ff=128,
                 face_heads=4, face_ff=128),
)

_register(
    FaceCLIPConfig,
    "faceclip-l14",
    FaceCLIPConfig(
        name="faceclip-l14",
        text=TextTowerConfig.from_name("ViT-L-14-quickgelu"),
        face=FaceViTConfig.from_name("face-vit-l"),
        fusion=FusionConfig.from_name("fusion-release"),
    ),
)
_register(
    FaceCLIPConfig,
    "faceclip-bigg14",
    FaceCLIPConfig(
        name="faceclip-bigg14",
        text=TextTowerConfig.from_name("ViT-bigG-14"),
        face=FaceViTConfig.from_name("face-vit-l"),
        fusion=FusionConfig.from_name("fusion-release"),
    ),
)
_register(
    FaceCLIPConfig,
    "faceclip-tiny",
    FaceCLIPConfig(
        name="faceclip-tiny",
        text=TextTowerConfig.from_name("text-tiny"),
        face=FaceViTConfig.from_name("face-vit-tiny"),
        fusion=FusionConfig.from_name("fusion-tiny"),
    ),
)

_register(FusionConfig, "fusion-t5-release", FusionConfig(face_attention="plain"))
_register(
    FusionConfig,
    "fusion-t5-tiny",
    FusionConfig(layers=2, bi_attn_dim=64, bi_attn_heads=4, text_heads=4, text_ff=64,
                 face_heads=4, face_ff=64, face_attention="plain"),
)

# google/t5-v1_1-xxl encoder (FLUX.1-dev text_encoder_2; the release's FaceT5 backbone)
_register(T5Config, "t5-v1_1-xxl", T5Config())
_register(
    T5Config,
    "t5-tiny",
    T5Config(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, vocab_size=320,
             relative_attention_num_buckets=8, relative_attention_max_distance=16,
             tokenizer="builtin-words"),
)
_register(
    FaceT5Config,
    "facet5-xxl",
    FaceT5Config(name="facet5-xxl", t5=T5Config.from_name("t5-v1_1-xxl"),
                 face=FaceViTConfig.from_name("face-vit-l"),
                 fusion=FusionConfig.from_name("fusion-t5-release")),
)
# The release's own forward (see FaceT5Config.release_compat): what `convert` writes.
_register(FaceT5Config, "facet5-xxl-release", FaceT5Config.from_name("facet5-xxl", name="facet5-xxl-release",
                                                                     release_compat=True))
# google/umt5-xxl encoder (Wan 2.1's text encoder): T5 v1.1 XXL's shape, a 256k vocabulary
_register(T5Config, "umt5-xxl", T5Config(vocab_size=256384, architecture="umt5"))
_register(T5Config, "umt5-tiny", T5Config.from_name("t5-tiny", architecture="umt5"))
_register(FaceT5Config, "facet5-umt5-xxl", FaceT5Config.from_name("facet5-xxl", name="facet5-umt5-xxl",
                                                                 t5=T5Config.from_name("umt5-xxl")))
_register(
    FaceT5Config,
    "facet5-tiny",
    FaceT5Config(name="facet5-tiny", t5=T5Config.from_name("t5-tiny"),
                 face=FaceViTConfig.from_name("face-vit-tiny"),
                 fusion=FusionConfig.from_name("fusion-t5-tiny"), text_length=32),
)
_register(FaceT5Config, "facet5-umt5-tiny", FaceT5Config.from_name("facet5-tiny", name="facet5-umt5-tiny",
                                                                  t5=T5Config.from_name("umt5-tiny")))

_register(
    CLIPConfig,
    "clip-l14",
    CLIPConfig(name="clip-l14", embed_dim=768, vision=VisionTowerConfig(),
               text=TextTowerConfig.from_name("ViT-L-14-quickgelu")),
)
_register(
    CLIPConfig,
    "clip-bigg14",
    CLIPConfig(
        name="clip-bigg14",
        embed_dim=1280,
        vision=VisionTowerConfig(width=1664, layers=48, head_width=104, mlp_ratio=4.9231),
        text=TextTowerConfig.from_name("ViT-bigG-14"),
    ),
)
_register(
    CLIPConfig,
    "clip-tiny",
    CLIPConfig(
        name="clip-tiny",
        embed_dim=64,
        vision=VisionTowerConfig(image_size=64, patch_size=8, width=64, layers=2, head_width=32,
                                 mlp_ratio=2.0),
        text=TextTowerConfig.from_name("text-tiny"),
    ),
)


# ------------------------------------------------------------------ diffusion backbones
# diffusers model configs (plain dicts, for `from_config`), named like everything else.
DIFFUSERS_CONFIGS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2,567,463,684 parameters)
    "sdxl-unet": dict(
        _class_name="UNet2DConditionModel", act_fn="silu", addition_embed_type="text_time",
        addition_embed_type_num_heads=64, addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
        block_out_channels=[320, 640, 1280], center_input_sample=False, cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
        mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5,
        norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
        sample_size=128, transformer_layers_per_block=[1, 2, 10],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        use_linear_projection=True,
    ),
    # the same family shrunk for CPU tests and quickstarts (diffusers' test sizes), fed by
    # two faceclip-tiny branches: prompt_embeds 64 + 64, pooled 64 (+ 6 x 8 time ids)
    "sdxl-unet-tiny": dict(
        _class_name="UNet2DConditionModel", addition_embed_type="text_time", addition_time_embed_dim=8,
        attention_head_dim=[2, 4], block_out_channels=[32, 64], cross_attention_dim=128,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], in_channels=4, layers_per_block=2,
        norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=112, sample_size=16,
        transformer_layers_per_block=[1, 2], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        use_linear_projection=True,
    ),
    # black-forest-labs/FLUX.1-dev transformer/config.json (11,901,408,320 parameters)
    "flux-dev-transformer": dict(
        _class_name="FluxTransformer2DModel", attention_head_dim=128, axes_dims_rope=[16, 56, 56],
        guidance_embeds=True, in_channels=64, joint_attention_dim=4096, num_attention_heads=24,
        num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768,
    ),
    # stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
    "sdxl-vae": dict(
        _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4, force_upcast=True, in_channels=3, latent_channels=4,
        layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=1024, scaling_factor=0.13025,
        up_block_types=["UpDecoderBlock2D"] * 4,
    ),
    # 4x downsampling, no mid-block attention: a 64 px synthetic scene becomes 4 x 16 x 16
    # latents; trainable on CPU in minutes (synthetic/priors.py train_vae sets scaling_factor
    # to 1 / latent std after training, as SD did).
    "vae-tiny": dict(
        _class_name="AutoencoderKL", block_out_channels=[16, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 3, in_channels=3, latent_channels=4,
        layers_per_block=1, mid_block_add_attention=False, norm_num_groups=8, out_channels=3,
        sample_size=64, scaling_factor=1.0, up_block_types=["UpDecoderBlock2D"] * 3,
    ),
    # stabilityai/stable-diffusion-xl-base-1.0 scheduler (training noise schedule)
    "sdxl-scheduler": dict(
        _class_name="EulerDiscreteScheduler", beta_end=0.012, beta_schedule="scaled_linear",
        beta_start=0.00085, num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
    ),
    # black-forest-labs/FLUX.1-dev vae/config.json (16 latent channels, x8)
    "flux-vae": dict(
        _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4, force_upcast=True, in_channels=3, latent_channels=16,
        layers_per_block=2, mid_block_add_attention=True, norm_num_groups=32, out_channels=3,
        sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, up_block_types=["UpDecoderBlock2D"] * 4,
        use_post_quant_conv=False, use_quant_conv=False,
    ),
    # black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (the release's sampler)
    "flux-scheduler": dict(
        _class_name="FlowMatchEulerDiscreteScheduler", base_image_seq_len=256, base_shift=0.5,
        max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000, shift=3.0,
        use_dynamic_shifting=True,
    ),
    # FLUX's transformer shrunk for CPU: 4-channel latents packed 2x2 -> 16 channels; fed
    # by facet5-tiny (joint 32) and clip-text-tiny (pooled 32)
    "flux-transformer-tiny": dict(
        _class_name="FluxTransformer2DModel", attention_head_dim=16, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True, in_channels=16, joint_attention_dim=32, num_attention_heads=2,
        num_layers=1, num_single_layers=1, patch_size=1, pooled_projection_dim=32,
    ),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (1.42 B parameters)
    "wan-1.3b-transformer": dict(
        _class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128,
        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
        added_kv_proj_dim=None, rope_max_seq_len=1024,
    ),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json (14.3 B parameters)
    "wan-14b-transformer": dict(
        _class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128,
        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
        added_kv_proj_dim=None, rope_max_seq_len=1024,
    ),
    # Wan's transformer shrunk for CPU: 4-channel latents in 1x2x2 patches, fed by
    # facet5-umt5-tiny (width 32)
    "wan-transformer-tiny": dict(
        _class_name="WanTransformer3DModel", patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16,
        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ),
    # Wan 2.1's video VAE (Wan-AI/Wan2.1-T2V-*-Diffusers vae/config.json): causal 3-D
    # convolutions, 16 channels, x8 in space and x4 in time (1 + 4k frames -> 1 + k
    # latent frames); latents normalised per channel by latents_mean / latents_std
    "wan-vae": dict(
        _class_name="AutoencoderKLWan", base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
        attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0,
        latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
        latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160],
        scale_factor_temporal=4, scale_factor_spatial=8,
    ),
    # the same VAE shrunk for CPU: 4 channels, x4 in space, x2 in time (9 frames -> 5);
    # its latent statistics are measured after training, as Wan's were
    "wan-vae-tiny": dict(
        _class_name="AutoencoderKLWan", base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
        attn_scales=[], temperal_downsample=[False, True], dropout=0.0, latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4, scale_factor_temporal=2, scale_factor_spatial=4,
    ),
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json: UniPC on flow
    # sigmas shifted by 3.0 (the 480p setting; Wan uses 5.0 at 720p)
    "wan-scheduler": dict(
        _class_name="UniPCMultistepScheduler", beta_end=0.02, beta_schedule="linear", beta_start=0.0001,
        final_sigmas_type="zero", flow_shift=3.0, lower_order_final=True, num_train_timesteps=1000,
        predict_x0=True, prediction_type="flow_prediction", sample_max_value=1.0, solver_order=2,
        solver_type="bh2", steps_offset=0, thresholding=False, timestep_spacing="linspace",
        use_flow_sigmas=True, use_karras_sigmas=False,
    ),
}


# transformers CLIPTextConfig kwargs of the CLIP text model whose pooled output is FLUX's
# pooled_prompt_embeds (FLUX.1-dev text_encoder = openai/clip-vit-large-patch14's text tower)
CLIP_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "clip-l-text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                        projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2),
    "clip-text-tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=77, vocab_size=49408,
                           projection_dim=32, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2),
}


def diffusers_config(name: str, /, **overrides: Any) -> dict[str, Any]:
    if name not in DIFFUSERS_CONFIGS:
        raise ConfigError(f"unknown diffusers model config {name!r}; known: {sorted(DIFFUSERS_CONFIGS)}")
    cfg = copy.deepcopy(DIFFUSERS_CONFIGS[name])
    cfg.update(overrides)
    return cfg
