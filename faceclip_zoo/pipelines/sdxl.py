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

from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers

from faceclip_zoo.models.sdxl_condition import SDXLCondition
from faceclip_zoo.pipelines.components import FaceCLIPEncoderModel
from faceclip_zoo.pipelines.defaults import SDXL_DEFAULTS, SDXL_NEGATIVE_PROMPT
from faceclip_zoo.pipelines.faces import (  # noqa: F401 (re-exported)
    AlignMode, FaceInput, FaceInputMixin, auto_align, load_face, to_pil,
)
from faceclip_zoo.utils import UserError, load_strict, state_under

RELEASE_DEFAULTS = SDXL_DEFAULTS


class FaceCLIPSDXLPipeline(FaceInputMixin, StableDiffusionXLLoraLoaderMixin, DiffusionPipeline):
    model_cpu_offload_seq = "face_encoder->face_encoder_2->unet->vae"
    default_negative_prompt = SDXL_NEGATIVE_PROMPT
    ZOO_KIND = "sdxl_pipeline"  # the kind SDXLJointModule's checkpoints and our folders name
    DENOISER = "unet"
    QUANTIZABLE = ("unet",)  # what `generate --quantize` quantises
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

    # ------------------------------------------------------------------ building
    @classmethod
    def from_module(cls, module, use_ema: bool = True) -> "FaceCLIPSDXLPipeline":
        """A pipeline sharing a live SDXLJointModule's encoders, VAE and UNet (an EMA copy of
        the UNet when the module keeps an EMA and use_ema is set)."""
        from faceclip_zoo.pipelines.components import build_scheduler, ema_copy

        return cls(vae=module.vae,
                   face_encoder=FaceCLIPEncoderModel.from_encoder(module.condition.branch_l),
                   face_encoder_2=FaceCLIPEncoderModel.from_encoder(module.condition.branch_g),
                   unet=ema_copy(module, module.unet, use_ema), scheduler=build_scheduler(module.scheduler_config),
                   default_guidance_scale=module.hparams.sample_guidance)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, spec: dict, source: str, use_ema: bool = True
                        ) -> "FaceCLIPSDXLPipeline":
        """The pipeline of an SDXLJointModule fit checkpoint, from its export entry `spec`
        (configs and state-dict prefixes of each part)."""
        if "lora" in spec:  # a LoRA run: its base pipeline with the adapters folded in
            from faceclip_zoo.pipelines.adapters import merged_pipeline

            return merged_pipeline(cls, checkpoint, spec, source, use_ema)
        from faceclip_zoo.config import FaceCLIPConfig
        from faceclip_zoo.models.diffusers_models import build_diffusers
        from faceclip_zoo.models.faceclip import FaceCLIPEncoder
        from faceclip_zoo.pipelines.components import build_scheduler, ema_state

        state, prefixes = checkpoint["state_dict"], spec["prefixes"]
        encoders = []
        for name in ("encoder_l", "encoder_g"):
            encoder = FaceCLIPEncoder(FaceCLIPConfig.from_dict(spec[name]))
            load_strict(encoder, state_under(state, prefixes[name]), f"{source} [{name}]")
            encoders.append(FaceCLIPEncoderModel.from_encoder(encoder.eval()))
        unet, vae = build_diffusers(spec["unet"]), build_diffusers(spec["vae"])
        load_strict(unet, {**state_under(state, prefixes["unet"]), **ema_state(checkpoint, use_ema)},
                    f"{source} [unet]")
        load_strict(vae, state_under(state, prefixes["vae"]), f"{source} [vae]")
        return cls(vae=vae.eval(), face_encoder=encoders[0], face_encoder_2=encoders[1], unet=unet.eval(),
                   scheduler=build_scheduler(spec["scheduler"]), default_guidance_scale=spec.get("guidance_scale"))

    # ------------------------------------------------------------------ pieces
    @property
    def condition(self) -> SDXLCondition:
        return SDXLCondition(self.face_encoder.encoder, self.face_encoder_2.encoder)

    def sdxl_pipeline(self) -> StableDiffusionXLPipeline:
        """diffusers' SDXL pipeline over the same UNet, VAE and scheduler (no text encoders)."""
        pipe = StableDiffusionXLPipeline(vae=self.vae, text_encoder=None, text_encoder_2=None,
                                         tokenizer=None, tokenizer_2=None, unet=self.unet,
                                         scheduler=self.scheduler, add_watermarker=False)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    @torch.no_grad()
    def per_row(self, faces: torch.Tensor | None, prompts: Sequence[str], negative_prompt: str = "",
                **sdxl_kwargs: Any) -> torch.Tensor:
        """A batch of different people: row i = (aligned crop faces[i], prompts[i]); faces
        None = no face anywhere. Returns images [B, 3, H, W] in [0, 1] (validation grids,
        evaluation)."""
        embeds = self.encode_rows(faces, prompts, negative_prompt, self._execution_device)
        sdxl_kwargs.setdefault("guidance_scale", self.default_guidance)
        return self.sdxl_pipeline()(**embeds, output_type="pt", **sdxl_kwargs).images

    @property
    def default_guidance(self) -> float:
        """The guidance scale used when a call names none: the one stored with this pipeline
        (`default_guidance_scale`), else the release's 5.0."""
        stored = self.config.get("default_guidance_scale")
        return RELEASE_DEFAULTS["guidance_scale"] if stored is None else float(stored)

    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_size(self) -> int:
        """The UNet's native image side (sample_size x VAE factor: 1024 for SDXL's)."""
        return int(self.unet.config.sample_size) * self.vae_factor()

    def size_multiple(self) -> int:
        """Image sides must be multiples of this (one latent pixel)."""
        return self.vae_factor()

    @staticmethod
    def guidance_arguments(guidance: float | None, distilled: float | None = None) -> dict[str, float]:
        """The one guidance knob of `generate`/`evaluate`/`demo` -> this pipeline's argument."""
        if distilled is not None:
            raise UserError("distilled guidance applies to FLUX pipelines only")
        return {} if guidance is None else {"guidance_scale": guidance}

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        face_image: FaceInput | Sequence[FaceInput] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = RELEASE_DEFAULTS["num_inference_steps"],
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        align: AlignMode | None = None,
        **sdxl_kwargs: Any,
    ):
        """face_image: a photo or aligned crop (path, PIL, HxWx3 uint8 array or [3,H,W]
        float tensor in [0, 1]), or a list of them of the same person (identity vectors and
        patch features averaged), or None for a face-free image. align: auto (default:
        photos are aligned, aligned crops kept), always, or never (see auto_align).
        negative_prompt: default the release's negative text (`""` for none); with a zero
        face it is the classifier-free guidance branch. guidance_scale: default the pipeline's
        (`default_guidance`: its recipe's, else the release's 5.0). height/width default to
        the UNet's sample size times the VAE factor (the release used 1152 x 864). Other keyword
        arguments go to StableDiffusionXLPipeline (latents, callback_on_step_end, ...)."""
        embeds = self.embed_request(prompt, face_image, negative_prompt, align)
        return self.sdxl_pipeline()(
            **embeds, num_inference_steps=num_inference_steps,
            guidance_scale=self.default_guidance if guidance_scale is None else guidance_scale,
            height=height, width=width, num_images_per_prompt=num_images_per_prompt,
            generator=generator, output_type=output_type, **sdxl_kwargs,
        )
