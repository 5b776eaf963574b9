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

import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr
from lightning.pytorch.cli import OptimizerCallable

from faceclip_zoo.config import DIFFUSERS_CONFIGS, FaceCLIPConfig, diffusers_config
from faceclip_zoo.models.diffusers_models import (
    build_diffusers, check_same_architecture, load_diffusers_weights, resolve_diffusers_config,
)
from faceclip_zoo.models.faceclip import FaceCLIPEncoder
from faceclip_zoo.models.sdxl_condition import SDXLCondition
from faceclip_zoo.models.weights import empty_weights
from faceclip_zoo.models.adapters import LoraSettings, Quantization
from faceclip_zoo.tasks.diffusion import (
    JointDiffusionModule, load_model_weights, pipeline_parts, refuse_with_pipeline, resolve_model_spec,
)
from faceclip_zoo.tasks.identity_loss import IdentityLossSettings
from faceclip_zoo.tasks.optim import default_optimizer
from faceclip_zoo.utils import UserError, load_strict, recipe_that_exports

log = logging.getLogger(__name__)


def resolve_encoder(spec: str) -> tuple[FaceCLIPConfig, Path | None]:
    """A named FaceCLIPConfig or a faceclip_zoo encoder directory -> (config, weights dir)."""
    return resolve_model_spec(spec, FaceCLIPConfig, "faceclip")


def resolve_scheduler_config(spec: str) -> dict[str, Any]:
    if spec in DIFFUSERS_CONFIGS:
        return diffusers_config(spec)
    path = Path(spec)
    for name in ("scheduler_config.json", "config.json"):
        if (path / name).exists():
            return json.loads((path / name).read_text())
    raise UserError(f"scheduler {spec!r} is neither a named config nor a folder with scheduler_config.json")


def _config_without_meta(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


class SDXLJointModule(JointDiffusionModule):
    """Fine-tunes an SDXL UNet on the FaceCLIP joint embedding.

    Args:
        encoder_l, encoder_g: the two FaceCLIP branches: encoder directories (exported or
            converted) or named configs. The quickstart uses one tiny branch for both.
        train_encoders: also fine-tune the branches' trainable parts (default frozen).
        unet: named diffusers config (`sdxl-unet`, `sdxl-unet-tiny`) or a diffusers UNet
            folder (its weights are loaded); unet_overrides change the config.
        unet_weights: UNet weights (folder, .safetensors or the release's unet.pt).
        vae, vae_weights: the same for the frozen AutoencoderKL.
        scheduler: training noise schedule: named (`sdxl-scheduler`) or a scheduler folder;
            it is also the pipeline's sampler. prediction_type overrides its own.
        scheduler_overrides: changes to the scheduler config, applied to training and to
            the exported sampler alike, e.g. {rescale_betas_zero_snr: true,
            timestep_spacing: trailing} (zero terminal SNR, Lin et al. 2024: at t=T the
            model sees pure noise, so it must take the image's colours from the condition;
            needs v_prediction).
        timestep_sampling: density of the training timestep: "uniform" (SDXL's own),
            "logit_normal" (logit_mean, logit_std; SD3's, more weight on mid noise) or "mode"
            (mode_scale), as FluxJointModule's sigma.
        condition_dropout: probability of the unconditional condition per sample.
        face_dropout: probability of zeroing only the face (the caption kept) per sample;
            1.0 trains a text-to-image base that never sees a face (the quickstart's base).
        noise_offset: std of a per-channel constant added to the noise.
        snr_gamma: min-SNR-gamma loss weighting (5.0 is the usual value); None = plain MSE.
        ema_decay: keep an EMA of the UNet (exported instead of the raw weights).
        gradient_checkpointing: recompute UNet activations in backward.
        lr_scales: parameter-name substring -> factor on the optimizer's lr for the
            parameters whose name contains it, e.g. {attn2: 2.0} (the UNet's cross-attention)
            or {resnets: 0.5}; a substring that names no trainable parameter is an error.
        sample_prompts / sample_steps / sample_guidance / num_samples: the image grid
            written at every validation (fixed references from the validation set);
            sample_guidance is also the exported pipeline's default guidance.
        pipeline: start from a FaceCLIPSDXLPipeline folder (an `export` or `convert`
            output): its encoders, UNet, VAE and scheduler, instead of naming each.
        lora: train LoRA / DoRA adapters on the frozen UNet instead of the whole UNet
            (rank, alpha, dropout, target_modules, init, use_dora). Checkpoints then hold
            only the adapters; `export` writes them in diffusers' LoRA format, and, for a
            run from a `pipeline` folder, `export --merge true` that pipeline with them
            folded in.
        quantize_base: LoRA runs: the frozen UNet's Linear weights in int8 (any device) or
            float8 (GPUs with float8), weight-only (torchao).
        base_dtype: LoRA runs: keep the frozen UNet, VAE and encoders in bfloat16 / float16
            (with precision bf16-mixed / 16-mixed); the adapters stay float32.
        identity_loss: add the identity loss (weight, fraction, max_noise, region, network:
            tasks/identity_loss.py) at a few low-noise rows per batch; full and LoRA runs.
    """

    def __init__(
        self,
        encoder_l: str = "faceclip-tiny",
        encoder_g: str = "faceclip-tiny",
        train_encoders: bool = False,
        unet: str = "sdxl-unet-tiny",
        unet_overrides: Optional[dict[str, Any]] = None,
        unet_weights: Optional[str] = None,
        vae: str = "vae-tiny",
        vae_weights: Optional[str] = None,
        scheduler: str = "sdxl-scheduler",
        prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None,
        scheduler_overrides: Optional[dict[str, Any]] = None,
        timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        condition_dropout: float = 0.1,
        face_dropout: float = 0.0,
        noise_offset: float = 0.0,
        snr_gamma: Optional[float] = None,
        ema_decay: Optional[float] = None,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        lr_scales: Optional[dict[str, float]] = None,
        num_samples: int = 4,
        sample_steps: int = 20,
        sample_guidance: float = 5.0,
        sample_seed: int = 0,
        pipeline: Optional[str] = None,
        lora: Optional[LoraSettings] = None,
        quantize_base: Optional[Quantization] = None,
        base_dtype: Optional[Literal["bfloat16", "float16"]] = None,
        identity_loss: Optional[IdentityLossSettings] = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self._init_common(optimizer)
        if pipeline:
            refuse_with_pipeline(pipeline, dict(encoder_l=encoder_l, encoder_g=encoder_g, unet=unet, vae=vae,
                                                scheduler=scheduler, unet_weights=unet_weights,
                                                vae_weights=vae_weights), self.argument_defaults())
            parts = pipeline_parts(pipeline, "FaceCLIPSDXLPipeline")
            encoder_l, encoder_g = parts["face_encoder"], parts["face_encoder_2"]
            unet, vae, scheduler = parts["unet"], parts["vae"], parts["scheduler"]
        self._unet_src = unet_weights or (unet if Path(unet).is_dir() else None)
        self._vae_src = vae_weights or (vae if Path(vae).is_dir() else None)

        (cfg_l, self._dir_l), (cfg_g, self._dir_g) = resolve_encoder(encoder_l), resolve_encoder(encoder_g)
        if unet_weights and not Path(unet_weights).exists():
            # e.g. the SDXL quickstart's text-to-image base, made by its own recipe
            maker = recipe_that_exports(Path(unet_weights).parent)
            if maker:
                raise UserError(f"{unet_weights} does not exist yet; make it first with "
                                f"`python -m faceclip_zoo fit --config {maker}`")
        # parts whose weights are named are built without memory and filled in setup
        with empty_weights(self._dir_l is not None):
            branch_l = FaceCLIPEncoder(cfg_l)
        with empty_weights(self._dir_g is not None):
            branch_g = FaceCLIPEncoder(cfg_g)
        self.condition = SDXLCondition(branch_l, branch_g)
        self.unet_config = {**resolve_diffusers_config(unet, "unet"), **(unet_overrides or {})}
        with empty_weights(self._unet_src is not None):
            self.unet = build_diffusers(self.unet_config)
        self.vae_config = resolve_diffusers_config(vae, "vae")
        with empty_weights(self._vae_src is not None):
            self.vae = build_diffusers(self.vae_config)
        self.scheduler_config = resolve_scheduler_config(scheduler)
        self.scheduler_config.update(scheduler_overrides or {})
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

        self.vae.requires_grad_(False)
        for branch in self.condition.branches:
            trainable = set(branch.trainable_parameter_names()) if train_encoders else set()
            for name, p in branch.named_parameters():
                p.requires_grad_(name in trainable)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

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
    def load_pretrained_weights(self) -> None:
        frozen = self.frozen_dtype()
        for branch, folder, what in ((self.condition.branch_l, self._dir_l, "encoder_l"),
                                     (self.condition.branch_g, self._dir_g, "encoder_g")):
            if folder is not None:
                load_strict(branch, load_model_weights(folder, what), f"{what} {folder}",
                            dtype=None if self.hparams.train_encoders else frozen)
        if self._unet_src:
            if Path(self._unet_src).is_dir():
                check_same_architecture(self.unet, self._unet_src, "unet weights")
            load_diffusers_weights(self.unet, self._unet_src, "unet weights", dtype=frozen)
        self._load_vae(self._vae_src)

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
        hp, n = self.hparams, self.noise_scheduler.config.num_train_timesteps
        if hp.timestep_sampling == "uniform":
            return torch.randint(0, n, (b,), device=self.device, generator=generator)
        u = compute_density_for_timestep_sampling(hp.timestep_sampling, b, hp.logit_mean, hp.logit_std,
                                                  hp.mode_scale, device=self.device, generator=generator)
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

    def encoder_face_network(self) -> torch.nn.Module:
        return self.condition.branch_l.face_encoder

    def pipeline(self, use_ema: bool = True):
        """A FaceCLIPSDXLPipeline over this module's (shared) components."""
        from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

        return FaceCLIPSDXLPipeline.from_module(self, use_ema=use_ema)

    # ------------------------------------------------------------------ checkpoints
    def export_spec(self) -> dict:
        return {
            "model_type": "sdxl_pipeline",
            "encoder_l": self.condition.branch_l.config.to_dict(),
            "encoder_g": self.condition.branch_g.config.to_dict(),
            "unet": self.unet_config, "vae": self.vae_config, "scheduler": self.scheduler_config,
            "guidance_scale": self.hparams.sample_guidance,  # the exported pipeline's default
            "prefixes": {"encoder_l": "condition.branch_l.", "encoder_g": "condition.branch_g.",
                         "unet": "unet.", "vae": "vae."},
        }
