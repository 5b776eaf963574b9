"""FaceT5FluxPipeline: a photo of a person + a prompt -> FLUX images of that person.

FaceT5 (prompt + face) gives prompt_embeds and the CLIP-L text model gives
pooled_prompt_embeds; everything after the condition (flow-matching Euler loop, true
classifier-free guidance, distilled guidance input, latent packing, VAE decoding) is
diffusers' own FluxPipeline called with embeddings. So this pipeline's output equals a
FluxPipeline run on the same transformer, VAE, scheduler and seed given our embeddings
(tested, true CFG included).

    pipe = FaceT5FluxPipeline.from_pretrained("checkpoints/my-flux")
    image = pipe("a woman in a denim shirt on a desert plateau", face_image="me.jpg").images[0]

Release settings (docs/design.md, "FaceT5 for FLUX"): FlowMatchEuler, 50 steps, true CFG
3.5 against a zero face with the release's negative prompt, distilled guidance 1.0, 1152 x 864.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers import FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin

from faceclip_zoo.models.flux_condition import FluxCondition
from faceclip_zoo.pipelines.components import FaceT5EncoderModel, face_t5_from_state
from faceclip_zoo.pipelines.defaults import FLUX_DEFAULTS, FLUX_NEGATIVE_PROMPT
from faceclip_zoo.pipelines.faces import AlignMode
from faceclip_zoo.pipelines.family import ZooPipeline
from faceclip_zoo.utils import load_strict, state_under



class FaceT5FluxPipeline(ZooPipeline, FluxLoraLoaderMixin, DiffusionPipeline):
    model_cpu_offload_seq = "face_encoder->text_encoder->transformer->vae"
    default_negative_prompt = FLUX_NEGATIVE_PROMPT
    # the family's declaration (pipelines/family.py)
    ZOO_KIND = "flux_pipeline"
    FAMILY = "FLUX"
    DENOISER = "transformer"
    QUANTIZABLE = ("transformer", "face_encoder")
    TRAINING_PARTS = {"face_encoder": "encoder", "tokenizer_2": "t5_tokenizer", "text_encoder": "clip_text",
                      "tokenizer": "clip_tokenizer", "transformer": "transformer", "vae": "vae",
                      "scheduler": "scheduler"}
    DEFAULT_SCHEDULER = "flux-scheduler"
    DEFAULT_VAE = "vae-tiny"
    RELEASE_DEFAULTS = FLUX_DEFAULTS
    GUIDANCE_ARGUMENT = "true_cfg_scale"
    DISTILLED_GUIDANCE_ARGUMENT = "guidance_scale"  # FLUX.1-dev's guidance input (release: 1.0)
    CARD_SUMMARY = ("a FaceT5-FLUX text-to-image pipeline (FaceT5FluxPipeline): the FaceT5 encoder, a CLIP-L "
                    "text model, a FLUX transformer, its VAE and sampler")
    PIPELINE_TAG = "text-to-image"
    CARD_TAGS = ("flux", "text-to-image")
    # diffusers' FLUX LoRA loader also looks for T5 as text_encoder_2: here FaceT5 is the
    # face_encoder component, so an adapter file's transformer part is all it loads.
    text_encoder_2 = None

    def __init__(
        self,
        vae: AutoencoderKL,
        face_encoder: FaceT5EncoderModel,
        tokenizer_2,  # the T5 tokenizer of face_encoder
        text_encoder,  # transformers CLIPTextModel (pooled output)
        tokenizer,  # its CLIPTokenizer
        transformer: FluxTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        default_guidance_scale: float | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, face_encoder=face_encoder, tokenizer_2=tokenizer_2,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              scheduler=scheduler)
        # the true CFG scale its recipe validated with (sample_guidance); None: the release's 3.5
        self.register_to_config(default_guidance_scale=default_guidance_scale)
        face_encoder.encoder.set_tokenizer(tokenizer_2)
        face_encoder.encoder.tie_embeddings()
        self.aligner = None
        self.align: AlignMode = "auto"

    # ------------------------------------------------------------------ building (pipelines/family.py)
    @classmethod
    def encoder_components(cls, condition: FluxCondition) -> dict:
        return {"face_encoder": FaceT5EncoderModel.from_encoder(condition.face_t5),
                "tokenizer_2": condition.face_t5.tokenizer, "text_encoder": condition.clip_text,
                "tokenizer": condition.clip_tokenizer}

    @classmethod
    def condition_from_state(cls, state: dict, spec: dict, source: str) -> FluxCondition:
        from faceclip_zoo.models.text_encoders import build_clip_text_model, build_clip_tokenizer

        encoder = face_t5_from_state(state, spec, source)
        clip_text = build_clip_text_model(spec["clip_text"])
        load_strict(clip_text, state_under(state, spec["prefixes"]["clip_text"]), f"{source} [clip_text]")
        return FluxCondition(encoder, clip_text, build_clip_tokenizer(spec.get("clip_tokenizer")))

    @property
    def condition(self) -> FluxCondition:
        return FluxCondition(self.face_encoder.encoder, self.text_encoder, self.tokenizer)

    def diffusers_pipeline(self) -> FluxPipeline:
        pipe = FluxPipeline(scheduler=self.scheduler, vae=self.vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=self.transformer)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def family_arguments(self, embeds: dict, kwargs: dict) -> dict:
        """Sizes default to the VAE's sample size; the distilled guidance input to the
        release's 1.0; true_cfg_scale <= 1 runs no negative branch (one pass per step)."""
        kwargs.setdefault("guidance_scale", self.RELEASE_DEFAULTS[self.DISTILLED_GUIDANCE_ARGUMENT])
        if kwargs["true_cfg_scale"] <= 1.0:
            embeds = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
        size = self.default_size()
        kwargs["height"], kwargs["width"] = kwargs.get("height") or size, kwargs.get("width") or size
        return {**embeds, "max_sequence_length": embeds["prompt_embeds"].shape[1], **kwargs}

    def default_size(self) -> int:
        """The VAE's native sample size (1024 for FLUX.1-dev's; the release used 1152 x 864)."""
        return int(self.vae.config.sample_size)

    def size_multiple(self) -> int:
        """Image sides must be multiples of this: one latent pixel times FLUX's 2 x 2 packing."""
        return 2 ** len(self.vae.config.block_out_channels)
