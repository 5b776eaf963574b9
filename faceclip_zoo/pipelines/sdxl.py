"""FaceCLIPSDXLPipeline: a photo of a person + a prompt -> images of that person.

The joint embedding of two FaceCLIP branches replaces SDXL's two CLIP text encoders;
everything after the condition (scheduler loop, classifier-free guidance, micro-
conditioning, VAE decoding) is diffusers' own StableDiffusionXLPipeline, called with
`prompt_embeds`. So this pipeline's output equals a StableDiffusionXLPipeline run on the
same UNet, VAE, scheduler and seed given our embeddings: the encoder is the only
difference (tested).

    pipe = FaceCLIPSDXLPipeline.from_pretrained("checkpoints/my-sdxl")
    image = pipe("a photo of a person in a red hat", face_image="me.jpg").images[0]

Face photos are aligned like the training data (faceclip_zoo.data.align_face: 5-point
detection, ArcFace template) unless they already are; see `align`.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers

from faceclip_zoo.models.sdxl_condition import SDXLCondition
from faceclip_zoo.pipelines.components import FaceCLIPEncoderModel
from faceclip_zoo.pipelines.defaults import SDXL_DEFAULTS, SDXL_NEGATIVE_PROMPT
from faceclip_zoo.pipelines.faces import AlignMode
from faceclip_zoo.pipelines.family import ZooPipeline
from faceclip_zoo.utils import load_strict, state_under



class FaceCLIPSDXLPipeline(ZooPipeline, StableDiffusionXLLoraLoaderMixin, DiffusionPipeline):
    model_cpu_offload_seq = "face_encoder->face_encoder_2->unet->vae"
    default_negative_prompt = SDXL_NEGATIVE_PROMPT
    # the family's declaration (pipelines/family.py)
    ZOO_KIND = "sdxl_pipeline"
    FAMILY = "SDXL"
    DENOISER = "unet"
    QUANTIZABLE = ("unet",)
    TRAINING_PARTS = {"face_encoder": "encoder_l", "face_encoder_2": "encoder_g", "unet": "unet", "vae": "vae",
                      "scheduler": "scheduler"}
    DEFAULT_SCHEDULER = "sdxl-scheduler"
    DEFAULT_VAE = "vae-tiny"
    RELEASE_DEFAULTS = SDXL_DEFAULTS
    GUIDANCE_ARGUMENT = "guidance_scale"
    CARD_SUMMARY = ("a FaceCLIP-SDXL text-to-image pipeline (FaceCLIPSDXLPipeline): two FaceCLIP branches, an "
                    "SDXL UNet, its VAE and sampler")
    PIPELINE_TAG = "text-to-image"
    CARD_TAGS = ("sdxl", "text-to-image")
    # diffusers' SDXL LoRA loader (load_lora_weights, fuse_lora, save_lora_weights) also
    # looks for CLIP text encoders: this pipeline has none (FaceCLIP replaces both), so an
    # adapter file's UNet part is all it loads.
    text_encoder = None
    text_encoder_2 = None

    def __init__(
        self,
        vae: AutoencoderKL,
        face_encoder: FaceCLIPEncoderModel,
        face_encoder_2: FaceCLIPEncoderModel,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        default_guidance_scale: float | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, face_encoder=face_encoder, face_encoder_2=face_encoder_2,
                              unet=unet, scheduler=scheduler)
        # The guidance the training recipe validated this pipeline with (its sample_guidance),
        # kept in model_index.json; None (converted releases, older folders): the release's.
        self.register_to_config(default_guidance_scale=default_guidance_scale)
        self.aligner = None
        self.align: AlignMode = "auto"

    # ------------------------------------------------------------------ building (pipelines/family.py)
    @classmethod
    def encoder_components(cls, condition: SDXLCondition) -> dict:
        return {"face_encoder": FaceCLIPEncoderModel.from_encoder(condition.branch_l),
                "face_encoder_2": FaceCLIPEncoderModel.from_encoder(condition.branch_g)}

    @classmethod
    def condition_from_state(cls, state: dict, spec: dict, source: str) -> SDXLCondition:
        from faceclip_zoo.config import FaceCLIPConfig
        from faceclip_zoo.models.faceclip import FaceCLIPEncoder

        branches = []
        for name in ("encoder_l", "encoder_g"):
            branches.append(FaceCLIPEncoder(FaceCLIPConfig.from_dict(spec[name])))
            load_strict(branches[-1], state_under(state, spec["prefixes"][name]), f"{source} [{name}]")
        return SDXLCondition(*branches)

    @property
    def condition(self) -> SDXLCondition:
        return SDXLCondition(self.face_encoder.encoder, self.face_encoder_2.encoder)

    def diffusers_pipeline(self) -> StableDiffusionXLPipeline:
        pipe = StableDiffusionXLPipeline(vae=self.vae, text_encoder=None, text_encoder_2=None,
                                         tokenizer=None, tokenizer_2=None, unet=self.unet,
                                         scheduler=self.scheduler, add_watermarker=False)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def default_size(self) -> int:
        """The UNet's native image side (sample_size x VAE factor: 1024 for SDXL's)."""
        return int(self.unet.config.sample_size) * self.vae_factor()

    def size_multiple(self) -> int:
        """Image sides must be multiples of this (one latent pixel)."""
        return self.vae_factor()
