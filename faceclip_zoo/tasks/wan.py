"""WanJointModule: the video diffusion stage, Wan 2.1 on the FaceT5 joint embedding.

FaceT5 (on umT5, Wan's own text encoder family) replaces Wan's text encoder; the Wan
transformer is fine-tuned (whole, or LoRA) with flow matching as Wan trains:

    z_0 = (VAE(x_0) - mean) / std  per channel,  sigma ~ p(sigma) shifted,
    z_s = (1 - sigma) z_0 + sigma eps,   L = || Wan(z_s, 1000 sigma, e) - (eps - z_0) ||^2

x_0 is a clip [B, 3, T, H, W] (`batch["video"]`, T = 1 + k x the VAE's temporal factor)
or an image, which Wan's causal VAE takes as a one-frame video (Wan trains on images and
videos alike). sigma is drawn uniformly (or logit-normal / mode) and shifted as the
sampler shifts it (the scheduler's flow_shift, Wan's 3.0 at 480p) unless `timestep_shift`
says otherwise. The identity loss reads the first frame (the causal VAE decodes it from
the first latent frame alone). Condition dropout, EMA, LoRA, cached latents/embeddings
come from JointDiffusionModule.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

from faceclip_zoo.models.wan_condition import WanCondition
from faceclip_zoo.pipelines.wan import FaceT5WanPipeline
from faceclip_zoo.tasks.diffusion import JointDiffusionModule
from faceclip_zoo.tasks.diffusion_parts import build_face_t5, load_face_t5
from faceclip_zoo.utils import UserError


class WanJointModule(JointDiffusionModule):
    """Fine-tunes a Wan transformer on the FaceT5 joint embedding. The arguments every
    family shares are JointDiffusionModule's; Wan's own:

    Args:
        encoder: FaceT5 encoder: a faceclip_zoo directory (export output) or a named config
            (`facet5-umt5-xxl`, `facet5-umt5-tiny`; random init).
        t5_tokenizer: folder of the umT5 tokenizer when the encoder directory has none
            (e.g. Wan2.1-T2V-1.3B-Diffusers/tokenizer).
        transformer: named diffusers config (`wan-1.3b-transformer`, `wan-14b-transformer`,
            `wan-transformer-tiny`) or a WanTransformer3DModel folder; transformer_weights:
            its weights (folder or .safetensors); transformer_overrides change the config.
        timestep_shift: None = the scheduler's shift (flow_shift: Wan's 3.0 at 480p); a
            number = that shift.
        loss_weighting: "none", "sigma_sqrt" or "cosmap" (SD3's schemes).
        sample_frames, sample_height, sample_width: the video the validation samples and the
            exported pipeline make by default (None: Wan's 81 frames of 480 x 832; the
            validation samples take their height and width from the validation clips).
    quantize_base also quantises FaceT5's umT5 encoder (frozen unless train_encoders);
    sample_guidance is the classifier-free guidance scale (Wan's 5.0).
    """

    PIPELINE = FaceT5WanPipeline
    TIMESTEP_SAMPLING = "uniform"

    def __init__(
        self,
        encoder: str = "facet5-umt5-tiny",
        t5_tokenizer: Optional[str] = None,
        transformer: str = "wan-transformer-tiny",
        transformer_overrides: Optional[dict[str, Any]] = None,
        transformer_weights: Optional[str] = None,
        timestep_shift: Optional[float] = None,
        loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none",
        sample_frames: Optional[int] = None,
        sample_height: Optional[int] = None,
        sample_width: Optional[int] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        parts = self.family_parts(encoder=encoder, t5_tokenizer=t5_tokenizer, transformer=transformer,
                                  transformer_weights=transformer_weights)
        face_t5, self._encoder_dir, self.t5_tokenizer_dir = build_face_t5(parts["encoder"], parts["t5_tokenizer"])
        self.condition = WanCondition(face_t5)
        self.build_denoiser_and_vae(parts, transformer_overrides)
        self._check_dims()
        self.freeze_frozen_parts()

    def _check_dims(self) -> None:
        cfg = self.transformer_config
        if self.vae_config.get("_class_name") != "AutoencoderKLWan":
            raise UserError(f"Wan needs its causal video VAE (AutoencoderKLWan: `wan-vae`, `wan-vae-tiny` or a Wan "
                            f"vae folder), got a {self.vae_config.get('_class_name')}")
        if cfg.get("text_dim") != self.condition.embed_dim:
            raise UserError(f"transformer text_dim {cfg.get('text_dim')} != the FaceT5 width "
                            f"{self.condition.embed_dim}")
        if cfg.get("in_channels") != self.vae_config.get("z_dim"):
            raise UserError(f"transformer in_channels {cfg.get('in_channels')} != vae z_dim "
                            f"{self.vae_config.get('z_dim')}")

    def load_encoder_weights(self) -> None:
        load_face_t5(self, self.condition.face_t5, self._encoder_dir)

    def quantizable_frozen_parts(self) -> list[torch.nn.Module]:
        # FaceT5's umT5-XXL (5.7 B parameters with its 256k vocabulary) is the other large frozen part
        return [] if self.hparams.train_encoders else [self.condition.face_t5.t5_encoder]

    def pipeline_defaults(self) -> dict[str, Any]:
        hp = self.hparams
        return {"default_num_frames": hp.sample_frames, "default_height": hp.sample_height,
                "default_width": hp.sample_width}

    # ------------------------------------------------------------------ video latents
    @property
    def vae_downsample(self) -> int:
        return int(self.vae_config.get("scale_factor_spatial", 8))

    @property
    def vae_temporal(self) -> int:
        return int(self.vae_config.get("scale_factor_temporal", 4))

    def latent_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Wan's per-channel latent mean and std, shaped [1, C, 1, 1, 1]."""
        mean = torch.tensor(self.vae_config["latents_mean"], device=self.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.vae_config["latents_std"], device=self.device).view(1, -1, 1, 1, 1)
        return mean, std

    def batch_video(self, batch: dict) -> torch.Tensor:
        """The batch's clips [B, 3, T, H, W] in [0, 1]; images are one-frame clips."""
        video = batch.get("video")
        video = batch["image"][:, :, None] if video is None else video
        if (video.shape[2] - 1) % 4 or (video.shape[2] - 1) % self.vae_temporal:
            # diffusers' AutoencoderKLWan encodes the first frame, then causal chunks of 4
            # (whatever its temporal factor): other lengths would lose their last frames
            raise UserError(f"clips of {video.shape[2]} frames: Wan's VAE takes 1 + 4k frames (the first, then "
                            "chunks of 4); prepare or render the clips at such a length (5, 9, ..., 81)")
        return video

    @torch.no_grad()
    def encode_latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents [B, C, 1 + (T - 1) / temporal, H / s, W / s] of the batch's
        clips (a posterior sample drawn from `generator`), or the cached ones."""
        video = self.batch_video(batch)
        t, (h, w) = video.shape[2], video.shape[-2:]
        cached = batch.get("vae_latents")
        if cached is not None:
            expected = (1 + (t - 1) // self.vae_temporal, h // self.vae_downsample, w // self.vae_downsample)
            if tuple(cached.shape[-3:]) != expected:
                raise UserError(f"cached vae_latents are {tuple(cached.shape[-3:])} but clips of {t} x {h} x {w} "
                                f"need {expected}: run `python -m faceclip_zoo cache --overwrite true` again")
            return cached.to(self.device)
        mean, std = self.latent_statistics()
        x = video.to(device=self.device, dtype=self.vae.dtype) * 2 - 1
        return (self.vae.encode(x).latent_dist.sample(generator=generator) - mean) / std

    def decode_for_identity(self, latents: torch.Tensor) -> torch.Tensor:
        """First latent frames [B, C, h, w] -> first frames [B, 3, H, W] in [-1, 1]."""
        mean, std = self.latent_statistics()
        z = latents[:, :, None] * std + mean
        return self.vae.decode(z.to(self.vae.dtype)).sample[:, :, 0]

    def cache_sources(self) -> dict[str, tuple[list[torch.nn.Module], str]]:
        out = super().cache_sources()
        out["vae_latents"] = ([self.vae], f"mean={self.vae_config['latents_mean']},std={self.vae_config['latents_std']}")
        return out

    # ------------------------------------------------------------------ flow matching
    def sample_sigmas(self, b: int, generator: torch.Generator | None) -> torch.Tensor:
        """sigma in (0, 1) per sample: the density, then the sampler's shift."""
        u = self.noise_density(b, generator)
        shift = self.hparams.timestep_shift
        if shift is None:
            shift = self.scheduler_config.get("flow_shift", self.scheduler_config.get("shift", 1.0))
        # the shift the flow schedulers apply: s' = k s / (1 + (k - 1) s)
        return shift * u / (1 + (shift - 1) * u)

    def diffusion_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        latents = self.encode_latents(batch, generator)
        b = latents.shape[0]
        noise = torch.randn(latents.shape, dtype=latents.dtype, device=self.device, generator=generator)
        sigmas = self.sample_sigmas(b, generator)
        drop, no_face, id_rows, id_level = self.condition_masks(batch, b, generator)
        if id_rows is not None:  # the identity loss's rows at low noise, where x0 holds a face
            sigmas = torch.where(id_rows, id_level.to(sigmas.dtype), sigmas)
        s = sigmas.to(latents.dtype)[:, None, None, None, None]
        noisy = (1 - s) * latents + s * noise
        embeds, _ = self.embed(batch, drop, no_face)
        dtype = self.transformer.dtype
        timesteps = sigmas * self.scheduler_config.get("num_train_timesteps", 1000)
        pred = self.transformer(hidden_states=noisy.to(dtype), timestep=timesteps.to(dtype),
                                encoder_hidden_states=embeds.to(dtype)).sample
        weight = compute_loss_weighting_for_sd3(self.hparams.loss_weighting, sigmas).float()
        per_sample = ((pred.float() - (noise - latents).float()) ** 2).mean(dim=(1, 2, 3, 4))
        loss = (weight * per_sample).mean()
        if id_rows is None:
            return loss
        # z_0 implied by the velocity at z_s (z_s = (1 - s) z_0 + s eps, v = eps - z_0): first frame
        clean = noisy[:, :, 0].float() - sigmas.float()[:, None, None, None] * pred[:, :, 0].float()
        return self.add_identity_loss(loss, batch, id_rows, clean, generator)

    def condition_spec(self) -> tuple[dict, dict[str, str]]:
        return ({"encoder": self.condition.face_t5.config.to_dict(), "t5_tokenizer": self.t5_tokenizer_dir},
                {"encoder": "condition.face_t5."})
