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

from typing import Any, Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers import FluxTransformer2DModel
from diffusers.loaders import FluxLoraLoaderMixin

from faceclip_zoo.models.flux_condition import FluxCondition
from faceclip_zoo.pipelines.components import FaceT5EncoderModel
from faceclip_zoo.pipelines.defaults import FLUX_DEFAULTS, FLUX_NEGATIVE_PROMPT
from faceclip_zoo.pipelines.faces import AlignMode, FaceInput, FaceInputMixin
from faceclip_zoo.utils import load_strict, state_under

RELEASE_DEFAULTS = FLUX_DEFAULTS


class FaceT5FluxPipeline(FaceInputMixin, FluxLoraLoaderMixin, DiffusionPipeline):
    model_cpu_offload_seq = "face_encoder->text_encoder->transformer->vae"
    default_negative_prompt = FLUX_NEGATIVE_PROMPT
    ZOO_KIND = "flux_pipeline"  # the kind FluxJointModule's checkpoints and our folders name
    DENOISER = "transformer"
    QUANTIZABLE = ("transformer", "face_encoder")  # what `generate --quantize` quantises
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
    ):
        super().__init__()
        self.register_modules(vae=vae, face_encoder=face_encoder, tokenizer_2=tokenizer_2,
                              text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              scheduler=scheduler)
        face_encoder.encoder.set_tokenizer(tokenizer_2)
        face_encoder.encoder.tie_embeddings()
        self.aligner = None
        self.align: AlignMode = "auto"

    # ------------------------------------------------------------------ building
    @classmethod
    def from_module(cls, module, use_ema: bool = True) -> "FaceT5FluxPipeline":
        """A pipeline sharing a live FluxJointModule's encoders, VAE and transformer (an EMA
        copy of the transformer when kept)."""
        from faceclip_zoo.pipelines.components import build_scheduler, ema_copy

        cond = module.condition
        return cls(vae=module.vae, face_encoder=FaceT5EncoderModel.from_encoder(cond.face_t5),
                   tokenizer_2=cond.face_t5.tokenizer, text_encoder=cond.clip_text, tokenizer=cond.clip_tokenizer,
                   transformer=ema_copy(module, module.transformer, use_ema),
                   scheduler=build_scheduler(module.scheduler_config))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, spec: dict, source: str, use_ema: bool = True
                        ) -> "FaceT5FluxPipeline":
        """The pipeline of a FluxJointModule fit checkpoint, from its export entry `spec`."""
        if "lora" in spec:  # a LoRA run: its base pipeline with the adapters folded in
            from faceclip_zoo.pipelines.adapters import merged_pipeline

            return merged_pipeline(cls, checkpoint, spec, source, use_ema)
        from faceclip_zoo.config import FaceT5Config
        from faceclip_zoo.models.diffusers_models import build_diffusers
        from faceclip_zoo.models.facet5 import FaceT5Encoder
        from faceclip_zoo.models.text_encoders import build_clip_text_model, build_clip_tokenizer
        from faceclip_zoo.pipelines.components import build_scheduler, ema_state

        state, prefixes = checkpoint["state_dict"], spec["prefixes"]
        encoder = FaceT5Encoder(FaceT5Config.from_dict(spec["encoder"]))
        if spec.get("t5_tokenizer"):
            encoder.set_tokenizer(spec["t5_tokenizer"])
        load_strict(encoder, state_under(state, prefixes["encoder"]), f"{source} [encoder]")
        clip_text = build_clip_text_model(spec["clip_text"])
        load_strict(clip_text, state_under(state, prefixes["clip_text"]), f"{source} [clip_text]")
        transformer, vae = build_diffusers(spec["transformer"]), build_diffusers(spec["vae"])
        load_strict(transformer, {**state_under(state, prefixes["transformer"]), **ema_state(checkpoint, use_ema)},
                    f"{source} [transformer]")
        load_strict(vae, state_under(state, prefixes["vae"]), f"{source} [vae]")
        return cls(vae=vae.eval(), face_encoder=FaceT5EncoderModel.from_encoder(encoder.eval()),
                   tokenizer_2=encoder.tokenizer, text_encoder=clip_text.eval(),
                   tokenizer=build_clip_tokenizer(spec.get("clip_tokenizer")), transformer=transformer.eval(),
                   scheduler=build_scheduler(spec["scheduler"]))

    # ------------------------------------------------------------------ pieces
    @property
    def condition(self) -> FluxCondition:
        return FluxCondition(self.face_encoder.encoder, self.text_encoder, self.tokenizer)

    def flux_pipeline(self) -> FluxPipeline:
        """diffusers' FLUX pipeline over the same transformer, VAE and scheduler (no text encoders)."""
        pipe = FluxPipeline(scheduler=self.scheduler, vae=self.vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=self.transformer)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def default_size(self) -> int:
        """The VAE's native sample size (1024 for FLUX.1-dev's; the release used 1152 x 864)."""
        return int(self.vae.config.sample_size)

    def size_multiple(self) -> int:
        """Image sides must be multiples of this: one latent pixel times FLUX's 2 x 2 packing."""
        return 2 ** len(self.vae.config.block_out_channels)

    @staticmethod
    def guidance_arguments(guidance: float | None, distilled: float | None = None) -> dict[str, float]:
        """The guidance knob of `generate`/`evaluate`/`demo` is true CFG; `distilled` is
        FLUX.1-dev's guidance input."""
        kwargs = {}
        if guidance is not None:
            kwargs["true_cfg_scale"] = guidance
        if distilled is not None:
            kwargs["guidance_scale"] = distilled
        return kwargs

    @torch.no_grad()
    def per_row(self, faces: torch.Tensor | None, prompts: Sequence[str], negative_prompt: str = "",
                guidance_scale: float = RELEASE_DEFAULTS["true_cfg_scale"], **flux_kwargs: Any) -> torch.Tensor:
        """A batch of different people (row i = faces[i], prompts[i]) -> images [B, 3, H, W]
        in [0, 1]. guidance_scale is the true CFG scale (validation grids, evaluation)."""
        embeds = self.encode_rows(faces, prompts, negative_prompt, self._execution_device)
        flux_kwargs.setdefault("guidance_scale", RELEASE_DEFAULTS["guidance_scale"])
        return self.flux_pipeline()(**embeds, true_cfg_scale=guidance_scale, output_type="pt",
                                    **flux_kwargs).images

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        face_image: FaceInput | Sequence[FaceInput] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = RELEASE_DEFAULTS["num_inference_steps"],
        true_cfg_scale: float = RELEASE_DEFAULTS["true_cfg_scale"],
        guidance_scale: float = RELEASE_DEFAULTS["guidance_scale"],
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        align: AlignMode | None = None,
        **flux_kwargs: Any,
    ):
        """face_image: a photo or aligned crop (path, PIL, array, [3,H,W] tensor), a list of
        references of one person (averaged), or None. negative_prompt: default the
        release's; with a zero face it is the true-CFG branch (true_cfg_scale, 1 = off).
        guidance_scale: FLUX.1-dev's distilled guidance input. Sizes default to the VAE's
        sample size. Other keyword arguments go to FluxPipeline (latents, sigmas, ...)."""
        embeds = self.embed_request(prompt, face_image, negative_prompt, align)
        if true_cfg_scale <= 1.0:  # no negative branch: FluxPipeline then runs one pass per step
            embeds = {k: v for k, v in embeds.items() if not k.startswith("negative_")}
        size = self.default_size()
        return self.flux_pipeline()(
            **embeds, num_inference_steps=num_inference_steps, true_cfg_scale=true_cfg_scale,
            guidance_scale=guidance_scale, height=height or size, width=width or size,
            num_images_per_prompt=num_images_per_prompt, generator=generator, output_type=output_type,
            max_sequence_length=embeds["prompt_embeds"].shape[1], **flux_kwargs,
        )
