"""FaceT5WanPipeline: a photo of a person + a prompt -> a Wan video of that person.

FaceT5 (prompt + face, on an umT5 backbone as Wan's own text encoder is) gives the
prompt_embeds Wan's transformer cross-attends to; everything after the condition (the
flow-matching UniPC loop, classifier-free guidance, the causal video VAE's decoding) is
diffusers' own WanPipeline called with embeddings. So this pipeline's output equals a
WanPipeline run on the same transformer, VAE, scheduler and seed given our embeddings
(tested).

    pipe = FaceT5WanPipeline.from_pretrained("checkpoints/my-wan")
    frames = pipe("a person turning their head to the left", face_image="me.jpg").frames[0]

Defaults (pipelines/defaults.py): Wan 2.1's 480p setting (50 steps, CFG 5.0 against a zero
face and an empty prompt, 81 frames of 480 x 832), or the size and length the exporting
recipe trained and validated at (`default_height`, `default_width`, `default_num_frames`).
"""

from __future__ import annotations

from diffusers import AutoencoderKLWan, DiffusionPipeline, WanPipeline, WanTransformer3DModel
from diffusers.loaders import WanLoraLoaderMixin

from faceclip_zoo.models.wan_condition import WanCondition
from faceclip_zoo.pipelines.components import FaceT5EncoderModel, face_t5_from_state
from faceclip_zoo.pipelines.defaults import WAN_DEFAULTS
from faceclip_zoo.pipelines.faces import AlignMode
from faceclip_zoo.pipelines.family import ZooPipeline


class FaceT5WanPipeline(ZooPipeline, WanLoraLoaderMixin, DiffusionPipeline):
    model_cpu_offload_seq = "face_encoder->transformer->vae"
    default_negative_prompt = ""
    # the family's declaration (pipelines/family.py)
    ZOO_KIND = "wan_pipeline"
    FAMILY = "Wan"
    DENOISER = "transformer"
    QUANTIZABLE = ("transformer", "face_encoder")
    TRAINING_PARTS = {"face_encoder": "encoder", "tokenizer": "t5_tokenizer", "transformer": "transformer",
                      "vae": "vae", "scheduler": "scheduler"}
    DEFAULT_SCHEDULER = "wan-scheduler"
    DEFAULT_VAE = "wan-vae-tiny"
    RELEASE_DEFAULTS = WAN_DEFAULTS
    GUIDANCE_ARGUMENT = "guidance_scale"
    OUTPUT = "frames"
    CARD_SUMMARY = ("a FaceT5-Wan text-to-video pipeline (FaceT5WanPipeline): the FaceT5 encoder on umT5, a Wan "
                    "transformer, its video VAE and sampler")
    PIPELINE_TAG = "text-to-video"
    CARD_TAGS = ("wan", "text-to-video")
    # diffusers' Wan LoRA loader also looks for a text_encoder: FaceT5 is the face_encoder
    # component, so an adapter file's transformer part is all it loads.
    text_encoder = None

    def __init__(
        self,
        vae: AutoencoderKLWan,
        face_encoder: FaceT5EncoderModel,
        tokenizer,  # the T5 tokenizer of face_encoder
        transformer: WanTransformer3DModel,
        scheduler,  # UniPCMultistepScheduler (Wan's) or FlowMatchEulerDiscreteScheduler
        default_guidance_scale: float | None = None,
        default_height: int | None = None,
        default_width: int | None = None,
        default_num_frames: int | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, face_encoder=face_encoder, tokenizer=tokenizer, transformer=transformer,
                              scheduler=scheduler)
        # what its recipe validated with; None: Wan's own (pipelines/defaults.py)
        self.register_to_config(default_guidance_scale=default_guidance_scale, default_height=default_height,
                                default_width=default_width, default_num_frames=default_num_frames)
        face_encoder.encoder.set_tokenizer(tokenizer)
        face_encoder.encoder.tie_embeddings()
        self.aligner = None
        self.align: AlignMode = "auto"

    # ------------------------------------------------------------------ building (pipelines/family.py)
    @classmethod
    def encoder_components(cls, condition: WanCondition) -> dict:
        return {"face_encoder": FaceT5EncoderModel.from_encoder(condition.face_t5),
                "tokenizer": condition.face_t5.tokenizer}

    @classmethod
    def condition_from_state(cls, state: dict, spec: dict, source: str) -> WanCondition:
        return WanCondition(face_t5_from_state(state, spec, source))

    @property
    def condition(self) -> WanCondition:
        return WanCondition(self.face_encoder.encoder)

    def diffusers_pipeline(self) -> WanPipeline:
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=self.vae, scheduler=self.scheduler,
                           transformer=self.transformer)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def family_arguments(self, embeds: dict, kwargs: dict) -> dict:
        """Wan takes no pooled embedding; guidance <= 1 runs no negative branch; size and
        length default to the pipeline's; several videos per prompt repeat the embeddings
        (WanPipeline repeats only the prompts it encodes itself)."""
        embeds = {k: v for k, v in embeds.items() if "pooled" not in k}
        if kwargs["guidance_scale"] <= 1.0:
            embeds = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
        per_prompt = kwargs.pop("num_images_per_prompt", 1)
        embeds = {k: v.repeat_interleave(per_prompt, dim=0) for k, v in embeds.items()}
        for name in ("height", "width", "num_frames"):
            kwargs[name] = kwargs.get(name) or self.default_video()[name]
        return {**embeds, "max_sequence_length": embeds["prompt_embeds"].shape[1], **kwargs}

    def default_video(self) -> dict[str, int]:
        """height, width and num_frames of a call that names none."""
        return {name: int(self.config.get(f"default_{name}") or self.RELEASE_DEFAULTS[name])
                for name in ("height", "width", "num_frames")}

    def default_size(self) -> int:
        """The default frame height (the synthetic worlds' frames are square)."""
        return self.default_video()["height"]

    def size_multiple(self) -> int:
        """Frame sides must be multiples of this: one latent pixel times the 2 x 2 patches."""
        return int(self.vae.config.scale_factor_spatial) * int(self.transformer.config.patch_size[1])

    def vae_factor(self) -> int:
        return int(self.vae.config.scale_factor_spatial)
