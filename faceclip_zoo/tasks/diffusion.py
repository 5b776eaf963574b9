"""What the diffusion stages share (SDXLJointModule, FluxJointModule).

A subclass builds `self.condition` (SDXLCondition / FluxCondition: the same interface),
the denoiser (named by DENOISER: "unet" / "transformer"), `self.vae` + `self.vae_config`,
and implements `diffusion_loss(batch, generator)`, `pipeline()` and `export_spec()`.
This base owns the rest: VAE latents (cached or computed), the condition with dropout,
EMA of the denoiser (diffusers' EMAModel) saved by name in checkpoints, the validation
loss and image grid, and the optimiser.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from diffusers.training_utils import EMAModel

from faceclip_zoo.models.diffusers_models import load_diffusers_weights
from faceclip_zoo.models.io import read_config
from faceclip_zoo.tasks.optim import configure as configure_optimization
from faceclip_zoo.tasks.resilience import ResilientTask
from faceclip_zoo.utils import UserError, recipe_that_exports


def resolve_model_spec(spec: str, config_cls, model_type: str):
    """A named config (random init: tests, from-scratch runs) or a faceclip_zoo model
    directory (an `export` or `convert` output) -> (config, weights dir or None)."""
    path = Path(spec)
    if (path / "config.json").exists():
        found, cfg = read_config(path)
        if found != model_type:
            raise UserError(f"{path} holds a {found!r} model; a {model_type!r} directory is needed")
        return cfg, path
    try:
        return config_cls.from_name(spec), None
    except (KeyError, ValueError):
        recipe = recipe_that_exports(spec)
        if recipe:
            raise UserError(f"{spec} holds no {model_type} model yet; make it first with `python -m faceclip_zoo fit "
                            f"--config {recipe}`") from None
        raise UserError(f"{spec!r} is neither a {model_type} model directory (with config.json; run its "
                        "quickstart / export, or `convert` the release) nor a named config") from None


class JointDiffusionModule(ResilientTask, L.LightningModule):
    DENOISER = "unet"
    # Frozen-model outputs that `python -m faceclip_zoo cache` can store in the shards.
    CACHEABLE = ("vae_latents", "prompt_embeds", "pooled_prompt_embeds")

    def _init_common(self, optimizer) -> None:
        if not 0.0 <= self.hparams.condition_dropout < 1.0:
            raise UserError(f"condition_dropout must be in [0, 1), got {self.hparams.condition_dropout}")
        self.optimizer_factory = optimizer
        self.ema: EMAModel | None = None
        self._weights_loaded = False
        self._null_condition: tuple[torch.Tensor, torch.Tensor] | None = None
        self._samples: list[dict] = []
        self.skipped_samples = 0

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.DENOISER)

    # ------------------------------------------------------------------ weights
    def setup(self, stage: str) -> None:
        if not self._weights_loaded:
            self.load_pretrained_weights()
            self._weights_loaded = True
        if self.hparams.ema_decay and self.ema is None:
            self.ema = EMAModel(self.denoiser.parameters(), decay=self.hparams.ema_decay)

    def load_pretrained_weights(self) -> None:
        raise NotImplementedError

    def _load_vae(self) -> None:
        hp = self.hparams
        src = hp.vae_weights or (hp.vae if Path(hp.vae).is_dir() else None)
        if src:
            load_diffusers_weights(self.vae, src, "vae weights")
            self._adopt_latent_scale(Path(src))

    def _adopt_latent_scale(self, folder: Path) -> None:
        """A VAE folder's own scaling/shift factors belong to its weights (the synthetic
        VAE's are measured after training, so a named architecture config cannot know them)."""
        if not (folder / "config.json").is_file():
            return
        cfg = json.loads((folder / "config.json").read_text())
        for key in ("scaling_factor", "shift_factor"):
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

    @torch.no_grad()
    def frozen_features(self, batch: dict, names) -> dict[str, torch.Tensor]:
        """The frozen VAE's latents and the frozen encoders' embeddings (no dropout)."""
        if self.hparams.train_encoders and {"prompt_embeds", "pooled_prompt_embeds"} & set(names):
            raise UserError("train_encoders is on: the encoders change during training, so their outputs "
                            "cannot be cached; cache only vae_latents")
        out = {}
        if "vae_latents" in names:
            out["vae_latents"] = self.encode_latents({k: v for k, v in batch.items() if k != "vae_latents"})
        if {"prompt_embeds", "pooled_prompt_embeds"} & set(names):
            embeds, pooled = self.condition(batch["caption"], batch["face"].to(self.device),
                                            batch["has_face"].to(self.device))
            out.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        return {k: v for k, v in out.items() if k in names}

    @torch.no_grad()
    def encode_latents(self, batch: dict) -> torch.Tensor:
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
        return (self.vae.encode(image).latent_dist.sample() - shift) * scale

    def null_condition(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional embedding (zero face, empty prompt), computed once."""
        if self._null_condition is None or self._null_condition[0].device != self.device:
            self._null_condition = self.condition.unconditional([""], self.device)
        e, p = self._null_condition
        return e.expand(batch_size, -1, -1), p.expand(batch_size, -1)

    def embed(self, batch: dict, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt_embeds, pooled for the batch; rows in `drop` get the unconditional ones."""
        b = len(batch["caption"])
        if "prompt_embeds" in batch and "pooled_prompt_embeds" in batch and not self.hparams.train_encoders:
            embeds, pooled = batch["prompt_embeds"].to(self.device), batch["pooled_prompt_embeds"].to(self.device)
        else:
            has_face = batch["has_face"].to(self.device) & ~drop
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

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.step(self.denoiser.parameters())

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
                                      self.hparams.lr_schedule)

    # ------------------------------------------------------------------ checkpoints
    def export_spec(self) -> dict:
        """What `export` needs to rebuild the pipeline from the checkpoint alone."""
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["faceclip_zoo"] = {"exports": {"pipeline": self.export_spec()}}
        if self.ema is not None:
            # Named, so export can swap them in without knowing parameter order.
            names = [n for n, _ in self.denoiser.named_parameters()]
            checkpoint["faceclip_zoo"]["ema"] = {
                "weights": {n: p.detach().cpu() for n, p in zip(names, self.ema.shadow_params)},
                "optimization_step": self.ema.optimization_step, "decay": self.ema.decay,
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        ema = checkpoint.get("faceclip_zoo", {}).get("ema")
        if ema is None:
            return
        if self.ema is None:
            self.ema = EMAModel(self.denoiser.parameters(), decay=ema["decay"])
        names = [n for n, _ in self.denoiser.named_parameters()]
        missing = [n for n in names if n not in ema["weights"]]
        if missing:
            raise UserError(f"checkpoint EMA lacks {len(missing)} {self.DENOISER} weights (e.g. {missing[0]})")
        for shadow, n in zip(self.ema.shadow_params, names):
            shadow.data.copy_(ema["weights"][n])
        self.ema.optimization_step = ema["optimization_step"]
