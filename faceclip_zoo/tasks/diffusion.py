"""What every diffusion family's task shares (SDXLJointModule, FluxJointModule): one
declaration of the shared constructor arguments and of everything built from them.

A family's task subclasses JointDiffusionModule, points `PIPELINE` at its pipeline class
(pipelines/family.py: kind, denoiser, component folders, defaults), declares only its own
arguments (its encoders, denoiser and loss) and passes the rest on (`**kwargs`: LightningCLI
and jsonargparse read the shared ones from here); it builds `self.condition` (a
models/condition.py JointCondition), calls `build_denoiser_and_vae`, and implements
`diffusion_loss(batch, generator)`, `load_encoder_weights()` and `condition_spec()`.
This base owns the rest: VAE latents (cached or computed), the condition with dropout,
EMA of the denoiser (diffusers' EMAModel) saved by name in checkpoints, the validation
loss and image grid, the identity loss, and the optimiser; and the adapter runs: a
pipeline folder as the starting point, its denoiser frozen (optionally in bf16 or
quantised weight-only) under LoRA / DoRA adapters that alone train, and checkpoints that
hold only what trains.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling
from lightning.pytorch.cli import OptimizerCallable

from faceclip_zoo.models.adapters import LoraSettings, Quantization, add_lora, count_parameters, quantize_frozen
from faceclip_zoo.models.diffusers_models import (
    build_diffusers, check_same_architecture, load_diffusers_weights, resolve_diffusers_config,
)
from faceclip_zoo.models.weights import empty_weights
from faceclip_zoo.tasks.diffusion_parts import pipeline_parts, refuse_with_pipeline, resolve_scheduler_config
from faceclip_zoo.tasks.identity_loss import IdentityLossSettings, identity_loss, identity_rows, load_face_network
from faceclip_zoo.tasks.optim import configure as configure_optimization, default_optimizer
from faceclip_zoo.tasks.resilience import ResilientTask
from faceclip_zoo.utils import UserError, recipe_that_exports

log = logging.getLogger(__name__)


class JointDiffusionModule(ResilientTask, L.LightningModule):
    """The shared part of a family's diffusion stage. Args (every family):

    Args:
        train_encoders: also fine-tune the joint encoders' trainable parts (default frozen,
            as in the paper's diffusion stage).
        vae, vae_weights: the frozen VAE: a named diffusers config (random init) or a
            diffusers folder (None: the family's tiny one, `vae-tiny` / `wan-vae-tiny`);
            vae_weights: its weights (folder or .safetensors).
        scheduler: the training noise schedule, also the exported sampler: named, or a
            scheduler folder; None: the family's own (`sdxl-scheduler`, `flux-scheduler`).
        scheduler_overrides: changes to the scheduler config, for training and the exported
            sampler alike.
        timestep_sampling: density of the training noise level: "uniform", "logit_normal"
            (logit_mean, logit_std; SD3's) or "mode" (mode_scale); None: the family's own
            (SDXL uniform, FLUX logit-normal).
        condition_dropout: probability of the unconditional condition (zero face, empty
            prompt) per sample, for classifier-free guidance.
        face_dropout: probability of zeroing only the face (caption kept) per sample; 1.0
            trains a text-to-image base that never sees a face.
        ema_decay: keep an EMA of the denoiser (exported instead of the raw weights).
        gradient_checkpointing: recompute the denoiser's activations in backward.
        optimizer, warmup_steps, lr_schedule: the optimiser (default AdamW) and its schedule.
        lr_scales: parameter-name substring -> factor on the lr of the trainable parameters
            whose name contains it, e.g. {attn2: 2.0}; a substring naming none is an error.
        num_samples, sample_steps, sample_guidance, sample_seed: the image grid written at
            every validation (fixed references of the validation set); sample_guidance is also
            the exported pipeline's default guidance (None: the release's, SDXL 5.0, FLUX 3.5).
        pipeline: start from a pipeline folder of the family (an `export` or `convert`
            output): every component from it instead of naming each.
        lora: train LoRA / DoRA adapters on the frozen denoiser instead of the whole
            denoiser (rank, alpha, dropout, target_modules, init, use_dora). Checkpoints then
            hold only the adapters; `export` writes them in diffusers' LoRA format, and, for a
            run from a `pipeline` folder, `export --merge true` that pipeline with them folded in.
        quantize_base: LoRA runs: the frozen denoiser's Linear weights (and the family's
            other large frozen parts) in int8 (any device) or float8, weight-only (torchao).
        base_dtype: LoRA runs: the frozen denoiser, VAE and encoders in bfloat16 / float16
            (with precision bf16-mixed / 16-mixed); the adapters stay float32.
        identity_loss: add the identity loss (weight, fraction, max_noise, region, network,
            jitter: tasks/identity_loss.py) at a few low-noise rows per batch.
    """

    PIPELINE: type  # the family's pipeline class (pipelines/family.py ZooPipeline)
    TIMESTEP_SAMPLING: str  # the family's default density of training noise levels
    # Frozen-model outputs that `python -m faceclip_zoo cache` can store in the shards.
    CACHEABLE = ("vae_latents", "prompt_embeds", "pooled_prompt_embeds")

    def __init__(
        self,
        train_encoders: bool = False,
        vae: Optional[str] = None,
        vae_weights: Optional[str] = None,
        scheduler: Optional[str] = None,
        scheduler_overrides: Optional[dict[str, Any]] = None,
        timestep_sampling: Optional[Literal["uniform", "logit_normal", "mode"]] = None,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        condition_dropout: float = 0.1,
        face_dropout: float = 0.0,
        ema_decay: Optional[float] = None,
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = default_optimizer,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        lr_scales: Optional[dict[str, float]] = None,
        num_samples: int = 4,
        sample_steps: int = 20,
        sample_guidance: Optional[float] = None,
        sample_seed: int = 0,
        pipeline: Optional[str] = None,
        lora: Optional[LoraSettings] = None,
        quantize_base: Optional[Quantization] = None,
        base_dtype: Optional[Literal["bfloat16", "float16"]] = None,
        identity_loss: Optional[IdentityLossSettings] = None,
    ):
        super().__init__()
        # the family's own arguments too: Lightning collects them from the subclass's frame
        self.save_hyperparameters(ignore=["optimizer"])
        hp, family = self.hparams, self.PIPELINE
        # the family's defaults, resolved once (checkpoints record what the run used)
        if hp.scheduler is None:
            hp.scheduler = family.DEFAULT_SCHEDULER
        if hp.vae is None:
            hp.vae = family.DEFAULT_VAE
        if hp.timestep_sampling is None:
            hp.timestep_sampling = self.TIMESTEP_SAMPLING
        if hp.sample_guidance is None:
            hp.sample_guidance = float(family.RELEASE_DEFAULTS[family.GUIDANCE_ARGUMENT])
        if not 0.0 <= hp.condition_dropout < 1.0:
            raise UserError(f"condition_dropout must be in [0, 1), got {hp.condition_dropout}")
        if not 0.0 <= hp.face_dropout <= 1.0:
            raise UserError(f"face_dropout must be in [0, 1], got {hp.face_dropout}")
        self.optimizer_factory = optimizer
        self.ema: EMAModel | None = None
        self._weights_loaded = False
        self._null_condition: tuple[torch.Tensor, torch.Tensor] | None = None
        self._samples: list[dict] = []
        self.skipped_samples = 0
        self._adapted = False
        # typed settings for the code; plain dicts in hparams, so checkpoints load with weights_only
        self.lora_settings = LoraSettings.from_dict(lora)
        if self.lora_settings is not None:
            hp["lora"] = self.lora_settings.to_dict()
        if (quantize_base or base_dtype) and self.lora_settings is None:
            raise UserError("quantize_base / base_dtype freeze the base: they apply to LoRA runs (set lora)")
        if isinstance(identity_loss, IdentityLossSettings):
            hp["identity_loss"] = identity_loss.to_dict()
        self.identity_settings = IdentityLossSettings.from_dict(identity_loss)
        self._identity_network: list[torch.nn.Module] = []  # a list: not a submodule, never in checkpoints
        if self.lora_settings is not None:
            # its checkpoints hold only what trains; the frozen base comes from the pipeline
            # folder (or the components) it started from, loaded again on resume
            self.strict_loading = False

    # ------------------------------------------------------------------ building (subclasses)
    def family_parts(self, **given: Any) -> dict[str, Any]:
        """The family's component arguments (its own, given here, with the shared vae,
        vae_weights and scheduler) as this run uses them: a run from a pipeline folder takes
        every component from the folder and refuses any named beside it."""
        hp = self.hparams
        parts = {**given, "vae": hp.vae, "vae_weights": hp.vae_weights, "scheduler": hp.scheduler}
        if hp.pipeline:
            defaults = {**self.argument_defaults(), "scheduler": self.PIPELINE.DEFAULT_SCHEDULER,
                        "vae": self.PIPELINE.DEFAULT_VAE}
            refuse_with_pipeline(hp.pipeline, parts, defaults)
            parts.update(pipeline_parts(hp.pipeline, self.PIPELINE))
        return parts

    def build_denoiser_and_vae(self, parts: dict[str, Any], overrides: Optional[dict[str, Any]]) -> None:
        """The denoiser (`<DENOISER>`, `<DENOISER>_config`; its weights from
        `<DENOISER>_weights` or its folder), the frozen VAE and the scheduler config. Parts
        whose weights are named are built without memory and filled in setup. Called after
        the condition is built (random-init parts draw from the global generator in order)."""
        name = self.PIPELINE.DENOISER
        spec, weights = parts[name], parts.get(f"{name}_weights")
        if weights and not Path(weights).exists():
            # e.g. the SDXL quickstart's text-to-image base, made by its own recipe
            maker = recipe_that_exports(Path(weights).parent)
            if maker:
                raise UserError(f"{weights} does not exist yet; make it first with "
                                f"`python -m faceclip_zoo fit --config {maker}`")
        self._denoiser_src = weights or (spec if Path(spec).is_dir() else None)
        self._vae_src = parts["vae_weights"] or (parts["vae"] if Path(parts["vae"]).is_dir() else None)
        config = {**resolve_diffusers_config(spec, name), **(overrides or {})}
        setattr(self, f"{name}_config", config)
        with empty_weights(self._denoiser_src is not None):
            setattr(self, name, build_diffusers(config))
        self.vae_config = resolve_diffusers_config(parts["vae"], "vae")
        with empty_weights(self._vae_src is not None):
            self.vae = build_diffusers(self.vae_config)
        self.scheduler_config = {**resolve_scheduler_config(parts["scheduler"]),
                                 **(self.hparams.scheduler_overrides or {})}

    def freeze_frozen_parts(self) -> None:
        """The VAE always, the encoders unless train_encoders (their trainable parts train
        then); gradient checkpointing on the denoiser when asked."""
        self.vae.requires_grad_(False)
        trainable = self.condition.trainable_parameter_names() if self.hparams.train_encoders else set()
        for name, p in self.condition.named_parameters():
            p.requires_grad_(name in trainable)
        if self.hparams.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.PIPELINE.DENOISER)

    def pipeline(self, use_ema: bool = True):
        """The family's pipeline over this module's (shared) components."""
        return self.PIPELINE.from_module(self, use_ema=use_ema)

    # ------------------------------------------------------------------ weights
    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if self.hparams.ema_decay and self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise UserError("ema_decay with an FSDP strategy is not supported yet (the EMA would copy sharded "
                            "parameters); set ema_decay: null or train with DDP")
        if not self._weights_loaded:
            self.load_pretrained_weights()
            self.refuse_unloaded()
            self._weights_loaded = True
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is not None:
                from faceclip_zoo.cache_fingerprint import check_cached_features

                check_cached_features(self, datamodule)  # before the base is quantized / cast
        if self.lora_settings is not None and not self._adapted:
            self.adapt_denoiser()
        if self.hparams.ema_decay and self.ema is None:
            self.ema = EMAModel([p for _, p in self.trained_denoiser_parameters()], decay=self.hparams.ema_decay)

    def trained_denoiser_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What of the denoiser trains (all of it, or its adapters): the EMA's parameters."""
        return [(n, p) for n, p in self.denoiser.named_parameters() if p.requires_grad]

    def quantizable_frozen_parts(self) -> list[torch.nn.Module]:
        """Besides the denoiser, the frozen parts `quantize_base` also quantises (large
        enough to matter, made of plain Linear layers): none by default."""
        return []

    def adapt_denoiser(self) -> None:
        """A LoRA run, once the base weights are in: freeze the denoiser, optionally cast
        or quantise it (weight-only), then add the adapters (kept in float32)."""
        from diffusers.training_utils import cast_training_params

        hp, name = self.hparams, self.PIPELINE.DENOISER
        if hp.base_dtype and self._trainer is not None and "mixed" not in str(self.trainer.precision):
            raise UserError(f"base_dtype {hp.base_dtype} needs precision bf16-mixed (or 16-mixed): autocast runs "
                            f"the float32 adapters against the {hp.base_dtype} base; got {self.trainer.precision}")
        denoiser = self.denoiser
        denoiser.requires_grad_(False)
        if hp.base_dtype:
            dtype = getattr(torch, hp.base_dtype)
            denoiser.to(dtype)
            self.vae.to(dtype)
            if not hp.train_encoders:
                self.condition.to(dtype)
        if hp.quantize_base:
            # on the run's device (fit sets the model up on the host, then moves it): see quantize_frozen
            device = self.trainer.strategy.root_device if self._trainer is not None else None
            for part in (denoiser, *self.quantizable_frozen_parts()):
                quantize_frozen(part, hp.quantize_base, device)
        add_lora(denoiser, self.lora_settings, name)
        cast_training_params(denoiser, dtype=torch.float32)
        trained, total = count_parameters(denoiser)
        log.info("LoRA on the %s: %s of %s parameters train", name, f"{trained:,}", f"{total:,}")
        self._adapted = True

    def load_pretrained_weights(self) -> None:
        """The named weights: the family's encoders, then the denoiser and the VAE."""
        self.load_encoder_weights()
        if self._denoiser_src:
            what = f"{self.PIPELINE.DENOISER} weights"
            if Path(self._denoiser_src).is_dir():
                check_same_architecture(self.denoiser, self._denoiser_src, what)
            load_diffusers_weights(self.denoiser, self._denoiser_src, what, dtype=self.frozen_dtype())
        self._load_vae(self._vae_src)

    def load_encoder_weights(self) -> None:
        """Load the family's named encoder weights (subclasses)."""
        raise NotImplementedError

    def frozen_dtype(self) -> torch.dtype | None:
        """The dtype frozen weights are loaded in: a LoRA run's base_dtype (the file's
        tensors are cast as they are read, never held in float32), else None (as built)."""
        hp = self.hparams
        return getattr(torch, hp.base_dtype) if self.lora_settings is not None and hp.base_dtype else None

    @classmethod
    def argument_defaults(cls) -> dict:
        """The constructor defaults of the family's task and of this base (a run from a
        pipeline folder leaves its component arguments so)."""
        out = {}
        for klass in reversed(cls.__mro__):
            init = vars(klass).get("__init__")
            if init is not None and issubclass(klass, JointDiffusionModule):
                out.update({k: v.default for k, v in inspect.signature(init).parameters.items()
                            if v.default is not inspect.Parameter.empty})
        return out

    def noise_density(self, b: int, generator: torch.Generator | None) -> torch.Tensor:
        """b draws in (0, 1) from timestep_sampling's density (diffusers' SD3 helper)."""
        hp = self.hparams
        return compute_density_for_timestep_sampling(hp.timestep_sampling, b, hp.logit_mean, hp.logit_std,
                                                     hp.mode_scale, device=self.device, generator=generator)

    def _load_vae(self, src: str | None) -> None:
        if src:
            load_diffusers_weights(self.vae, src, "vae weights", dtype=self.frozen_dtype())
            self._adopt_latent_scale(Path(src))

    def _adopt_latent_scale(self, folder: Path) -> None:
        """A VAE folder's own latent statistics belong to its weights (scaling/shift factors,
        or a video VAE's per-channel latents_mean/latents_std: the synthetic VAEs' are measured
        after training, so a named architecture config cannot know them)."""
        if not (folder / "config.json").is_file():
            return
        cfg = json.loads((folder / "config.json").read_text())
        for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std"):
            if cfg.get(key) is not None:
                self.vae_config[key] = cfg[key]
                self.vae.register_to_config(**{key: cfg[key]})

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        if not self.hparams.train_encoders:
            self.condition.eval()
        return self

    # ------------------------------------------------------------------ latents, condition
    @property
    def vae_downsample(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0])) - 1)

    @property
    def latent_scale(self) -> tuple[float, float]:
        return float(self.vae_config.get("scaling_factor", 1.0)), float(self.vae_config.get("shift_factor") or 0.0)

    def cache_sources(self) -> dict[str, tuple[list[torch.nn.Module], str]]:
        """{cacheable feature: (the frozen modules computing it, other settings it depends
        on)}: what `cache` fingerprints (cache_fingerprint.py)."""
        scale, shift = self.latent_scale
        out = {"vae_latents": ([self.vae], f"scale={scale},shift={shift}")}
        if not self.hparams.train_encoders:  # trained encoders ignore cached embeddings
            out.update(prompt_embeds=([self.condition], ""), pooled_prompt_embeds=([self.condition], ""))
        return out

    @torch.no_grad()
    def frozen_features(self, batch: dict, names, generator: torch.Generator | None = None
                        ) -> dict[str, torch.Tensor]:
        """The frozen VAE's latents (a posterior sample drawn from `generator`: `cache` seeds
        one per shard, so any rank computes the same) and the frozen encoders' embeddings
        (no dropout)."""
        if self.hparams.train_encoders and {"prompt_embeds", "pooled_prompt_embeds"} & set(names):
            raise UserError("train_encoders is on: the encoders change during training, so their outputs "
                            "cannot be cached; cache only vae_latents")
        out = {}
        if "vae_latents" in names:
            out["vae_latents"] = self.encode_latents({k: v for k, v in batch.items() if k != "vae_latents"},
                                                     generator)
        if {"prompt_embeds", "pooled_prompt_embeds"} & set(names):
            embeds, pooled = self.condition(batch["caption"], batch["face"].to(self.device),
                                            batch["has_face"].to(self.device))
            out.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        return {k: v for k, v in out.items() if k in names}

    @torch.no_grad()
    def encode_latents(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents of the batch's images (a sample of the VAE's posterior, drawn
        from `generator`: training passes its resumable one, so a resumed run draws the
        latents the uninterrupted one would have), or the cached ones."""
        cached = batch.get("vae_latents")
        if cached is not None:
            expected = tuple(s // self.vae_downsample for s in batch["image"].shape[-2:])
            if tuple(cached.shape[-2:]) != expected:
                raise UserError(f"cached vae_latents are {tuple(cached.shape[-2:])} but images of "
                                f"{tuple(batch['image'].shape[-2:])} need {expected}: the shards were cached at "
                                "another resolution; run `python -m faceclip_zoo cache --overwrite true` again")
            return cached.to(self.device)
        scale, shift = self.latent_scale
        image = batch["image"].to(device=self.device, dtype=self.vae.dtype) * 2 - 1
        return (self.vae.encode(image).latent_dist.sample(generator=generator) - shift) * scale

    def null_condition(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional embedding (zero face, empty prompt), computed once."""
        if self._null_condition is None or self._null_condition[0].device != self.device:
            self._null_condition = self.condition.unconditional([""], self.device)
        e, p = self._null_condition
        return e.expand(batch_size, -1, -1), p.expand(batch_size, -1)

    def embed(self, batch: dict, drop: torch.Tensor, no_face: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt_embeds, pooled for the batch; rows in `drop` get the unconditional ones,
        rows in `no_face` keep their caption with the face zeroed."""
        b = len(batch["caption"])
        cached = "prompt_embeds" in batch and "pooled_prompt_embeds" in batch and not self.hparams.train_encoders
        if cached and no_face is not None and bool(no_face.any()):
            raise UserError("face_dropout zeroes faces per step, which cached prompt_embeds cannot show: cache "
                            "only vae_latents for this run (`cache --features vae_latents`), or set face_dropout 0")
        if cached:
            embeds, pooled = batch["prompt_embeds"].to(self.device), batch["pooled_prompt_embeds"].to(self.device)
        else:
            has_face = batch["has_face"].to(self.device) & ~drop
            if no_face is not None:
                has_face = has_face & ~no_face
            captions = [("" if d else c) for c, d in zip(batch["caption"], drop.tolist())]
            with torch.set_grad_enabled(self.hparams.train_encoders and self.training):
                return self.condition(captions, batch["face"].to(self.device), has_face)
        if drop.any():
            null_e, null_p = self.null_condition(b)
            embeds = torch.where(drop[:, None, None], null_e.to(embeds.dtype), embeds)
            pooled = torch.where(drop[:, None], null_p.to(pooled.dtype), pooled)
        return embeds, pooled

    def drop_mask(self, b: int, generator: torch.Generator | None) -> torch.Tensor:
        p = self.hparams.condition_dropout if self.training else 0.0
        return torch.rand(b, device=self.device, generator=generator) < p

    def face_drop_mask(self, b: int, generator: torch.Generator | None) -> torch.Tensor | None:
        """Rows whose face is zeroed (caption kept): face_dropout in training; None when off
        (no random draw, so runs without it keep their random streams)."""
        p = self.hparams.get("face_dropout", 0.0) if self.training else 0.0
        if p <= 0.0:
            return None
        return torch.rand(b, device=self.device, generator=generator) < p

    # ------------------------------------------------------------------ identity loss
    def encoder_face_network(self) -> torch.nn.Module:
        """The conditioning encoder's face ViT (identity_loss.network "encoder"): the first
        joint encoder's."""
        return self.condition.branches[0].face_encoder

    def condition_masks(self, batch: dict, b: int, generator: torch.Generator | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(condition dropped, face zeroed, identity-loss rows, their noise level in
        [0, max_noise)): the last two None unless the identity loss is on and training (no
        random draw then, so runs without it keep their random streams)."""
        drop, no_face = self.drop_mask(b, generator), self.face_drop_mask(b, generator)
        settings = self.identity_settings
        if settings is None or not self.training or settings.weight == 0:
            return drop, no_face, None, None
        eligible = batch["has_face"].to(self.device) & ~drop
        if no_face is not None:
            eligible = eligible & ~no_face
        rows = identity_rows(batch, eligible, settings, generator)
        level = torch.rand(b, device=self.device, generator=generator) * settings.max_noise
        return drop, no_face, rows, level

    @property
    def identity_network(self) -> torch.nn.Module:
        if not self._identity_network:
            self._identity_network.append(load_face_network(self.identity_settings.network,
                                                            self.encoder_face_network()))
        return self._identity_network[0].to(self.device)

    def add_identity_loss(self, loss: torch.Tensor, batch: dict, rows: torch.Tensor | None,
                          clean_latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """loss + weight x the identity loss of the rows' predicted clean latents (scaled,
        as the denoiser sees them; tasks/identity_loss.py)."""
        if rows is None or not bool(rows.any()):
            return loss
        marks = batch.get("face_landmarks")
        term = identity_loss(self.decode_for_identity, clean_latents[rows], batch["face"].to(self.device)[rows], self.identity_network,
                             self.identity_settings, self.vae_downsample,
                             landmarks=None if marks is None else marks.to(self.device)[rows], generator=generator)
        self.log("train/identity_loss", term, batch_size=int(rows.sum()))
        self.log("train/diffusion_loss", loss, batch_size=len(batch["caption"]))
        return loss + self.identity_settings.weight * term

    def decode_for_identity(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B, 3, H, W] in [-1, 1] whose face the identity loss reads
        (a video family decodes its first frame)."""
        scale, shift = self.latent_scale
        return self.vae.decode((latents / scale + shift).to(self.vae.dtype)).sample

    # ------------------------------------------------------------------ steps
    def diffusion_loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, generator=self.training_generator())
        self.check_finite(loss, batch, batch_idx)
        bs = len(batch["caption"])
        self.skipped_samples += int(batch.get("skipped", 0))
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/skipped_samples", float(self.skipped_samples), batch_size=bs)
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # The EMA follows each optimizer step, here rather than in on_train_batch_end: that
        # hook runs after the callbacks' (ModelCheckpoint saves there), so a checkpoint
        # would pair step N's weights with step N-1's EMA and a resumed run would lose one
        # EMA update; and with gradient accumulation it would update per micro-batch.
        if self.ema is not None:
            self.ema.step([p for _, p in self.trained_denoiser_parameters()])

    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    def on_validation_epoch_start(self) -> None:
        self._samples = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed noise and timesteps per batch index: comparable across validations.
        gen = torch.Generator(device=self.device).manual_seed(1000 + batch_idx)
        loss = self.diffusion_loss(batch, generator=gen)
        self.log("val/loss", loss, batch_size=len(batch["caption"]))
        # Grid rows: the first samples of distinct identities (fixed across validations).
        seen = {s["identity"] for s in self._samples}
        for i in range(len(batch["caption"])):
            if len(self._samples) >= self.hparams.num_samples:
                break
            if batch["has_face"][i] and batch["identity"][i] not in seen:
                seen.add(batch["identity"][i])
                self._samples.append({"face": batch["face"][i], "caption": batch["caption"][i],
                                      "image": batch["image"][i], "identity": batch["identity"][i]})

    def on_validation_epoch_end(self) -> None:
        if not self._samples or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        from faceclip_zoo.tasks.sample_grid import write_sample_grid

        write_sample_grid(self, self._samples)

    def configure_optimizers(self):
        return configure_optimization(self, self.optimizer_factory, self.hparams.warmup_steps,
                                      self.hparams.lr_schedule, self.hparams.get("lr_scales"))

    # ------------------------------------------------------------------ checkpoints
    def export_spec(self) -> dict:
        """What `export` needs to rebuild the pipeline from the checkpoint alone: each part's
        config and state-dict prefix (the family's encoders: condition_spec)."""
        name = self.PIPELINE.DENOISER
        encoders, prefixes = self.condition_spec()
        return {"model_type": self.PIPELINE.ZOO_KIND, **encoders,
                name: getattr(self, f"{name}_config"), "vae": self.vae_config, "scheduler": self.scheduler_config,
                "guidance_scale": self.hparams.sample_guidance,  # the exported pipeline's default
                "pipeline_defaults": self.pipeline_defaults(),
                "prefixes": {**prefixes, name: f"{name}.", "vae": "vae."}}

    def condition_spec(self) -> tuple[dict, dict[str, str]]:
        """(the encoders' export entries, their state-dict prefixes) (subclasses)."""
        raise NotImplementedError

    def pipeline_defaults(self) -> dict[str, Any]:
        """The family pipeline's own call defaults this run sets (a video family's size and
        length), as its constructor takes them: none by default."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        spec = self.export_spec()
        if self.lora_settings is not None:
            hp = self.hparams
            spec["lora"] = {"settings": self.lora_settings.to_dict(), "denoiser": self.PIPELINE.DENOISER,
                            # export --merge folds the adapters into this folder's pipeline
                            "base": str(Path(hp.pipeline).resolve()) if hp.get("pipeline") else None,
                            "quantize_base": hp.get("quantize_base"), "base_dtype": hp.get("base_dtype")}
            # only what trains: the frozen base is the pipeline folder's (megabytes, not gigabytes)
            trained = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        checkpoint["faceclip_zoo"] = {"exports": {"pipeline": spec}}
        if self.ema is not None:
            # Named, so export can swap them in without knowing parameter order.
            names = [n for n, _ in self.trained_denoiser_parameters()]
            checkpoint["faceclip_zoo"]["ema"] = {
                "weights": {n: p.detach().cpu() for n, p in zip(names, self.ema.shadow_params)},
                "optimization_step": self.ema.optimization_step, "decay": self.ema.decay,
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.lora_settings is not None:
            # loaded non-strictly (the base is not in it): everything that trains must be
            missing = sorted(n for n, p in self.named_parameters() if p.requires_grad and n not in
                             checkpoint["state_dict"])
            if missing:
                raise UserError(f"the checkpoint lacks {len(missing)} trained weights of this LoRA run (e.g. "
                                f"{missing[0]}): was it written with other lora settings?")
        ema = checkpoint.get("faceclip_zoo", {}).get("ema")
        if ema is None:
            return
        if self.ema is None:
            self.ema = EMAModel([p for _, p in self.trained_denoiser_parameters()], decay=ema["decay"])
        names = [n for n, _ in self.trained_denoiser_parameters()]
        missing = [n for n in names if n not in ema["weights"]]
        if missing:
            raise UserError(f"checkpoint EMA lacks {len(missing)} {self.PIPELINE.DENOISER} weights (e.g. {missing[0]})")
        for shadow, n in zip(self.ema.shadow_params, names):
            shadow.data.copy_(ema["weights"][n])
        self.ema.optimization_step = ema["optimization_step"]
