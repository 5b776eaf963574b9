"""SDXLJointModule: the diffusion stage of FaceCLIP-SDXL (paper Eq. 2).

The joint embedding of two FaceCLIP branches (L and G, frozen by default) replaces SDXL's
text encoders; the whole UNet is fine-tuned with the usual noise-prediction loss:

    z_0 = VAE(x_0) * scale;  z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps
    L = w(t) * || UNet(z_t, t, e, pooled, time_ids) - target ||^2,
    target = eps (epsilon) or v = sqrt(a_t) eps - sqrt(1 - a_t) z_0 (v_prediction)

with condition dropout (zero face + empty prompt, for classifier-free guidance), noise
offset, min-SNR weighting w(t) (diffusers' compute_snr), EMA of the UNet (diffusers'
EMAModel), gradient checkpointing, and cached VAE latents / encoder outputs read from the
shards when they hold them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from faceclip_zoo.config import FaceCLIPConfig
from faceclip_zoo.models.faceclip import FaceCLIPEncoder
from faceclip_zoo.models.sdxl_condition import SDXLCondition
from faceclip_zoo.models.weights import empty_weights
from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline
from faceclip_zoo.tasks.diffusion import JointDiffusionModule
from faceclip_zoo.tasks.diffusion_parts import load_model_weights, resolve_model_spec
from faceclip_zoo.utils import UserError, load_strict

log = logging.getLogger(__name__)


def resolve_encoder(spec: str) -> tuple[FaceCLIPConfig, Path | None]:
    """A named FaceCLIPConfig or a faceclip_zoo encoder directory -> (config, weights dir)."""
    return resolve_model_spec(spec, FaceCLIPConfig, "faceclip")


def _config_without_meta(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


class SDXLJointModule(JointDiffusionModule):
    """Fine-tunes an SDXL UNet on the FaceCLIP joint embedding. The arguments every family
    shares (VAE, scheduler, dropout, EMA, optimiser, samples, pipeline, LoRA, identity loss)
    are JointDiffusionModule's; SDXL's own:

    Args:
        encoder_l, encoder_g: the two FaceCLIP branches: encoder directories (exported or
            converted) or named configs. The quickstart uses one tiny branch for both.
        unet: named diffusers config (`sdxl-unet`, `sdxl-unet-tiny`) or a diffusers UNet
            folder (its weights are loaded); unet_overrides change the config.
        unet_weights: UNet weights (folder, .safetensors or the release's unet.pt).
        prediction_type: overrides the scheduler's (epsilon or v_prediction). With the
            scheduler override {rescale_betas_zero_snr: true, timestep_spacing: trailing}
            (zero terminal SNR, Lin et al. 2024: at t=T the model sees pure noise, so it must
            take the image's colours from the condition) it must be v_prediction.
        noise_offset: std of a per-channel constant added to the noise.
        snr_gamma: min-SNR-gamma loss weighting (5.0 is the usual value); None = plain MSE.
    """

    PIPELINE = FaceCLIPSDXLPipeline
    TIMESTEP_SAMPLING = "uniform"  # SDXL's own

    def __init__(
        self,
        encoder_l: str = "faceclip-tiny",
        encoder_g: str = "faceclip-tiny",
        unet: str = "sdxl-unet-tiny",
        unet_overrides: Optional[dict[str, Any]] = None,
        unet_weights: Optional[str] = None,
        prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None,
        noise_offset: float = 0.0,
        snr_gamma: Optional[float] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        parts = self.family_parts(encoder_l=encoder_l, encoder_g=encoder_g, unet=unet, unet_weights=unet_weights)
        (cfg_l, self._dir_l), (cfg_g, self._dir_g) = resolve_encoder(parts["encoder_l"]), resolve_encoder(parts["encoder_g"])
        # parts whose weights are named are built without memory and filled in setup
        with empty_weights(self._dir_l is not None):
            branch_l = FaceCLIPEncoder(cfg_l)
        with empty_weights(self._dir_g is not None):
            branch_g = FaceCLIPEncoder(cfg_g)
        self.condition = SDXLCondition(branch_l, branch_g)
        self.build_denoiser_and_vae(parts, unet_overrides)
        if prediction_type:
            self.scheduler_config["prediction_type"] = prediction_type
        if self.scheduler_config.get("rescale_betas_zero_snr") and \
                self.scheduler_config.get("prediction_type", "epsilon") == "epsilon":
            raise UserError("rescale_betas_zero_snr needs prediction_type: v_prediction (at zero SNR the "
                            "noise alone says nothing about the image, so epsilon cannot be learned there)")
        self.noise_scheduler = DDPMScheduler.from_config(_config_without_meta(self.scheduler_config))
        if snr_gamma and self.scheduler_config.get("rescale_betas_zero_snr"):
            # min-SNR weights the x0 error by min(SNR, gamma): ~0 at high noise and exactly 0 at
            # the zero-SNR step where the sampler starts, so what the condition alone decides
            # (identity, colours) is barely trained. Measured on the synthetic world: identity
            # top-1 0.44 with it, 0.84 without (4 identities, 600 steps).
            log.warning("snr_gamma with zero terminal SNR gives the sampler's first step no training weight "
                        "and the high-noise steps almost none; plain v-prediction loss (snr_gamma: null) "
                        "learns the condition much faster")
        self._check_dims()
        self.freeze_frozen_parts()

    def _check_dims(self) -> None:
        cfg, cond = self.unet_config, self.condition
        if cfg.get("cross_attention_dim") != cond.embed_dim:
            raise UserError(f"unet cross_attention_dim {cfg.get('cross_attention_dim')} != the two "
                            f"branches' widths {cond.branch_l.config.width} + {cond.branch_g.config.width}")
        expected = cfg.get("addition_time_embed_dim", 0) * 6 + cond.pooled_dim
        if cfg.get("projection_class_embeddings_input_dim") != expected:
            raise UserError(f"unet projection_class_embeddings_input_dim must be 6 x "
                            f"addition_time_embed_dim + G width = {expected}")
        if cfg.get("in_channels") != self.vae_config.get("latent_channels"):
            raise UserError(f"unet in_channels {cfg.get('in_channels')} != vae latent_channels "
                            f"{self.vae_config.get('latent_channels')}")

    # ------------------------------------------------------------------ weights
    def load_encoder_weights(self) -> None:
        frozen = self.frozen_dtype()
        for branch, folder, what in ((self.condition.branch_l, self._dir_l, "encoder_l"),
                                     (self.condition.branch_g, self._dir_g, "encoder_g")):
            if folder is not None:
                load_strict(branch, load_model_weights(folder, what), f"{what} {folder}",
                            dtype=None if self.hparams.train_encoders else frozen)

    def time_ids(self, batch: dict, latents: torch.Tensor) -> torch.Tensor:
        """SDXL micro-conditioning: (original h, w, crop top, left, target h, w)."""
        b = latents.shape[0]
        h, w = batch["image"].shape[-2:]
        target = torch.tensor([h, w], device=self.device).expand(b, 2)
        original = batch.get("original_size", target).to(self.device)
        crop = batch.get("crop_top_left", torch.zeros(b, 2, dtype=torch.long)).to(self.device)
        return torch.cat([original, crop, target], dim=1).to(latents.dtype)

    # ------------------------------------------------------------------ loss
    def sample_timesteps(self, b: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps (integers in [0, num_train_timesteps)) from timestep_sampling."""
        n = self.noise_scheduler.config.num_train_timesteps
        if self.hparams.timestep_sampling == "uniform":
            return torch.randint(0, n, (b,), device=self.device, generator=generator)
        u = self.noise_density(b, generator)
        return (u * n).long().clamp_(0, n - 1).to(self.device)

    def diffusion_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        latents = self.encode_latents(batch, generator)
        b = latents.shape[0]
        kw = dict(device=self.device, generator=generator)
        noise = torch.randn(latents.shape, dtype=latents.dtype, **kw)
        if self.hparams.noise_offset:
            noise = noise + self.hparams.noise_offset * torch.randn(b, latents.shape[1], 1, 1, **kw)
        t = self.sample_timesteps(b, generator)
        drop, no_face, id_rows, id_level = self.condition_masks(batch, b, generator)
        if id_rows is not None:  # the identity loss's rows at low noise, where x0 holds a face
            n = self.noise_scheduler.config.num_train_timesteps
            t = torch.where(id_rows, (id_level * n).long().clamp_(0, n - 1), t)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        embeds, pooled = self.embed(batch, drop, no_face)
        pred = self.unet(noisy, t, embeds.to(noisy.dtype),
                         added_cond_kwargs={"text_embeds": pooled.to(noisy.dtype),
                                            "time_ids": self.time_ids(batch, latents)}).sample
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            raise UserError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.hparams.snr_gamma:
            # min-SNR-gamma (Hang et al. 2023): w = min(SNR, gamma) / SNR for epsilon,
            # / (SNR + 1) for v-prediction.
            snr = compute_snr(self.noise_scheduler, t)
            clipped = snr.clamp(max=self.hparams.snr_gamma)
            per_sample = per_sample * (clipped / (snr + 1 if kind == "v_prediction" else snr))
        if id_rows is None:
            return per_sample.mean()
        return self.add_identity_loss(per_sample.mean(), batch, id_rows, self.predicted_clean(noisy, pred, t),
                                      generator)

    def predicted_clean(self, noisy: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_0 implied by the UNet's prediction at z_t (epsilon or v)."""
        alphas = self.noise_scheduler.alphas_cumprod.to(device=noisy.device)[t].float()[:, None, None, None]
        a, s = alphas.sqrt(), (1 - alphas).sqrt()
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return a * noisy.float() - s * pred.float()
        return (noisy.float() - s * pred.float()) / a.clamp(min=1e-4)

    def condition_spec(self) -> tuple[dict, dict[str, str]]:
        cond = self.condition
        return ({"encoder_l": cond.branch_l.config.to_dict(), "encoder_g": cond.branch_g.config.to_dict()},
                {"encoder_l": "condition.branch_l.", "encoder_g": "condition.branch_g."})
