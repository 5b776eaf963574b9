"""FluxJointModule: the diffusion stage of FaceT5-FLUX, rectified-flow matching.

The FaceT5 embedding (prompt_embeds) and CLIP-L pooled text replace FLUX's text
encoders; the whole FLUX transformer is fine-tuned:

    z_0 = (VAE(x_0) - shift) * scale,  sigma ~ p(sigma),  z_s = (1 - sigma) z_0 + sigma eps
    L = w(sigma) * || FLUX(pack(z_s), sigma, guidance, e, pooled) - pack(eps - z_0) ||^2

sigma is drawn logit-normal / "mode" / uniform (diffusers' SD3 helpers) and shifted as the
sampler will shift it: by default with FLUX's resolution-dependent mu (the scheduler's
dynamic shifting, mu from the packed sequence length), else by a fixed `timestep_shift`.
The guidance-distilled FLUX.1-dev takes a guidance value as input: training feeds
`train_guidance` (the release samples with 1.0). Condition dropout, EMA and cached
latents/embeddings come from JointDiffusionModule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift
from diffusers.training_utils import compute_loss_weighting_for_sd3

from faceclip_zoo.models.flux_condition import FluxCondition
from faceclip_zoo.models.weights import empty_weights, open_weights
from faceclip_zoo.models.text_encoders import build_clip_text_model, build_clip_tokenizer, clip_text_config
from faceclip_zoo.pipelines.flux import FaceT5FluxPipeline
from faceclip_zoo.tasks.diffusion import JointDiffusionModule
from faceclip_zoo.tasks.diffusion_parts import build_face_t5, load_face_t5
from faceclip_zoo.utils import UserError, load_strict


def resolve_clip_text(spec: str) -> tuple[dict[str, Any], Path | None]:
    """A named CLIP text config, or a transformers CLIPTextModel folder (FLUX.1-dev/text_encoder,
    or the `convert` output clip-l-text) -> (CLIPTextConfig kwargs, weights folder)."""
    path = Path(spec)
    if (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures",
                                                                                     "transformers_version")}, path
    return clip_text_config(spec), None


def clean_latents(noisy: torch.Tensor, packed_velocity: torch.Tensor, sigmas: torch.Tensor, downsample: int
                  ) -> torch.Tensor:
    """z_0 implied by a packed velocity prediction at z_s: z_s = (1 - s) z_0 + s eps and
    the prediction is eps - z_0, so z_0 = z_s - s v."""
    h, w = noisy.shape[-2:]
    velocity = FluxPipeline._unpack_latents(packed_velocity.float(), h * downsample, w * downsample, downsample)
    return noisy.float() - sigmas.float()[:, None, None, None] * velocity


class FluxJointModule(JointDiffusionModule):
    """Fine-tunes a FLUX transformer on the FaceT5 joint embedding. The arguments every
    family shares (VAE, scheduler, dropout, EMA, optimiser, samples, pipeline, LoRA,
    identity loss) are JointDiffusionModule's; FLUX's own:

    Args:
        encoder: FaceT5 encoder: a faceclip_zoo directory (export / convert output) or a
            named config (`facet5-xxl`, `facet5-tiny`; random init).
        t5_tokenizer: folder of the T5 v1.1 tokenizer when the encoder directory has none
            (e.g. FLUX.1-dev/tokenizer_2).
        clip_text: CLIP-L text model for pooled_prompt_embeds: a transformers folder
            (FLUX.1-dev/text_encoder, or convert's clip-l-text) or a named config.
        clip_tokenizer: its tokenizer folder (default: OpenAI's vocabulary, from open_clip).
        transformer: named diffusers config (`flux-dev-transformer`, `flux-transformer-tiny`)
            or a FluxTransformer2DModel folder; transformer_weights: its weights (folder,
            .safetensors, or the release's dit.pt); transformer_overrides change the config.
        timestep_shift: None = FLUX's resolution-dependent shift (mu from the image's
            sequence length, as the sampler does); a number = that fixed shift.
        loss_weighting: "none", "sigma_sqrt" or "cosmap" (SD3's schemes).
        train_guidance: the distilled-guidance input during training.
    quantize_base also quantises FaceT5's T5 encoder (frozen unless train_encoders);
    sample_guidance is the true CFG scale (release 3.5).
    """

    PIPELINE = FaceT5FluxPipeline
    TIMESTEP_SAMPLING = "logit_normal"

    def __init__(
        self,
        encoder: str = "facet5-tiny",
        t5_tokenizer: Optional[str] = None,
        clip_text: str = "clip-text-tiny",
        clip_tokenizer: Optional[str] = None,
        transformer: str = "flux-transformer-tiny",
        transformer_overrides: Optional[dict[str, Any]] = None,
        transformer_weights: Optional[str] = None,
        timestep_shift: Optional[float] = None,
        loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none",
        train_guidance: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        parts = self.family_parts(encoder=encoder, t5_tokenizer=t5_tokenizer, clip_text=clip_text,
                                  clip_tokenizer=clip_tokenizer, transformer=transformer,
                                  transformer_weights=transformer_weights)
        self.clip_tokenizer_dir = parts["clip_tokenizer"]  # recorded for export
        # parts whose weights are named are built without memory and filled in setup
        face_t5, self._encoder_dir, self.t5_tokenizer_dir = build_face_t5(parts["encoder"], parts["t5_tokenizer"])
        self.clip_text_config, self._clip_dir = resolve_clip_text(parts["clip_text"])
        with empty_weights(self._clip_dir is not None):
            clip_text_model = build_clip_text_model(self.clip_text_config)
        self.condition = FluxCondition(face_t5, clip_text_model, build_clip_tokenizer(parts["clip_tokenizer"]))
        self.build_denoiser_and_vae(parts, transformer_overrides)
        if self.vae_config.get("shift_factor") is None:  # FluxPipeline decodes with it: 0 = none
            self.vae_config["shift_factor"] = 0.0
            self.vae.register_to_config(shift_factor=0.0)
        self._check_dims()
        self.freeze_frozen_parts()

    def _check_dims(self) -> None:
        cfg, cond = self.transformer_config, self.condition
        if cfg.get("joint_attention_dim") != cond.embed_dim:
            raise UserError(f"transformer joint_attention_dim {cfg.get('joint_attention_dim')} != the FaceT5 "
                            f"width {cond.embed_dim}")
        if cfg.get("pooled_projection_dim") != cond.pooled_dim:
            raise UserError(f"transformer pooled_projection_dim {cfg.get('pooled_projection_dim')} != the CLIP "
                            f"text width {cond.pooled_dim}")
        if cfg.get("in_channels") != 4 * self.vae_config.get("latent_channels", 0):
            raise UserError(f"transformer in_channels {cfg.get('in_channels')} must be 4 x vae latent_channels "
                            f"({self.vae_config.get('latent_channels')}): FLUX packs 2x2 latent patches")

    # ------------------------------------------------------------------ weights
    def load_encoder_weights(self) -> None:
        load_face_t5(self, self.condition.face_t5, self._encoder_dir)
        if self._clip_dir is not None:
            load_strict(self.condition.clip_text, open_weights(self._clip_dir, "model", "clip_text"),
                        f"clip_text {self._clip_dir}", dtype=self.frozen_dtype())

    def quantizable_frozen_parts(self) -> list[torch.nn.Module]:
        # FaceT5's T5-XXL encoder (4.8 B parameters: 9.5 GB in bf16) beside the transformer
        # is what keeps a FLUX LoRA run off a 24 GB card; frozen unless train_encoders.
        return [] if self.hparams.train_encoders else [self.condition.face_t5.t5_encoder]

    # ------------------------------------------------------------------ flow matching
    def sample_sigmas(self, b: int, seq_len: int, generator: torch.Generator | None) -> torch.Tensor:
        """sigma in (0, 1) per sample: the density, then the sampler's shift."""
        hp = self.hparams
        u = self.noise_density(b, generator)
        if hp.timestep_shift is not None:
            shift = float(hp.timestep_shift)
        elif self.scheduler_config.get("use_dynamic_shifting"):
            c = self.scheduler_config
            shift = math.exp(calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                             c.get("base_shift", 0.5), c.get("max_shift", 1.15)))
        else:
            shift = float(self.scheduler_config.get("shift", 1.0))
        # the shift FlowMatchEulerDiscreteScheduler applies: s' = k s / (1 + (k - 1) s)
        return shift * u / (1 + (shift - 1) * u)

    def diffusion_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        latents = self.encode_latents(batch, generator)
        b, c, h, w = latents.shape
        if h % 2 or w % 2:
            raise UserError(f"latents of {h}x{w} cannot be packed in 2x2 patches: image sides must be multiples "
                            f"of {2 * self.vae_downsample}")
        noise = torch.randn(latents.shape, dtype=latents.dtype, device=self.device, generator=generator)
        sigmas = self.sample_sigmas(b, (h // 2) * (w // 2), generator)
        drop, no_face, id_rows, id_level = self.condition_masks(batch, b, generator)
        if id_rows is not None:  # the identity loss's rows at low noise, where x0 holds a face
            sigmas = torch.where(id_rows, id_level.to(sigmas.dtype), sigmas)
        s = sigmas.to(latents.dtype)[:, None, None, None]
        noisy = (1 - s) * latents + s * noise
        embeds, pooled = self.embed(batch, drop, no_face)
        dtype = self.transformer.dtype
        guidance = (torch.full((b,), self.hparams.train_guidance, device=self.device, dtype=dtype)
                    if self.transformer_config.get("guidance_embeds") else None)
        pred = self.transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w).to(dtype),
            timestep=sigmas.to(dtype), guidance=guidance,
            pooled_projections=pooled.to(dtype), encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device, dtype=dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, dtype),
        ).sample
        target = FluxPipeline._pack_latents(noise - latents, b, c, h, w)
        weight = compute_loss_weighting_for_sd3(self.hparams.loss_weighting, sigmas).float()
        per_sample = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2))
        if id_rows is None:
            return (weight * per_sample).mean()
        return self.add_identity_loss((weight * per_sample).mean(), batch, id_rows,
                                      clean_latents(noisy, pred, sigmas, self.vae_downsample), generator)

    def condition_spec(self) -> tuple[dict, dict[str, str]]:
        return ({"encoder": self.condition.face_t5.config.to_dict(), "clip_text": self.clip_text_config,
                 "t5_tokenizer": self.t5_tokenizer_dir, "clip_tokenizer": self.clip_tokenizer_dir},
                {"encoder": "condition.face_t5.", "clip_text": "condition.clip_text."})
