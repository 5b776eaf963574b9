"""What the diffusion stages share (SDXLJointModule, FluxJointModule).

A subclass builds `self.condition` (SDXLCondition / FluxCondition: the same interface),
the denoiser (named by DENOISER: "unet" / "transformer"), `self.vae` + `self.vae_config`,
and implements `diffusion_loss(batch, generator)`, `pipeline()` and `export_spec()`.
This base owns the rest: VAE latents (cached or computed), the condition with dropout,
EMA of the denoiser (diffusers' EMAModel) saved by name in checkpoints, the validation
loss and image grid, and the optimiser; and the adapter runs: a pipeline folder as the
starting point, its denoiser frozen (optionally in bf16 or quantised weight-only) under
LoRA / DoRA adapters that alone train, and checkpoints that hold only what trains.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from diffusers.training_utils import EMAModel

from faceclip_zoo.models.adapters import LoraSettings, add_lora, count_parameters, quantize_frozen
from faceclip_zoo.models.diffusers_models import load_diffusers_weights
from faceclip_zoo.models.io import read_config
from faceclip_zoo.tasks.identity_loss import IdentityLossSettings, identity_loss, identity_rows, load_face_network
from faceclip_zoo.tasks.optim import configure as configure_optimization
from faceclip_zoo.tasks.resilience import ResilientTask
from faceclip_zoo.utils import UserError, recipe_that_exports

log = logging.getLogger(__name__)


# Our encoders as components of a pipeline folder (pipelines/components.py wrappers):
# class name -> (model type, the config.json key holding the encoder's config)
PIPELINE_ENCODERS = {"FaceCLIPEncoderModel": ("faceclip", "faceclip_config"),
                     "FaceT5EncoderModel": ("facet5", "facet5_config")}
# A pipeline folder's component sub-folders, by pipeline class
PIPELINE_PARTS = {
    "FaceCLIPSDXLPipeline": ("face_encoder", "face_encoder_2", "unet", "vae", "scheduler"),
    "FaceT5FluxPipeline": ("face_encoder", "tokenizer_2", "text_encoder", "tokenizer", "transformer", "vae",
                           "scheduler"),
}


def pipeline_parts(folder: str, expected: str) -> dict[str, str]:
    """The component folders of a pipeline folder (an `export` or `convert` output) that a
    run starts from: part name -> path."""
    path = Path(folder)
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"pipeline {folder} is not a pipeline folder (no model_index.json); give an `export` or "
                        "`convert` output")
    found = json.loads(index.read_text()).get("_class_name")
    if found != expected:
        raise UserError(f"pipeline {folder} holds a {found!r}; this task starts from a {expected}")
    parts = {name: path / name for name in PIPELINE_PARTS[expected]}
    missing = [name for name, p in parts.items() if not p.is_dir()]
    if missing:
        raise UserError(f"pipeline {folder} lacks its {', '.join(missing)} folder(s)")
    return {name: str(p) for name, p in parts.items()}


def refuse_with_pipeline(pipeline: str | None, given: dict, defaults: dict) -> None:
    """A run that starts from a pipeline folder takes every component from it."""
    clash = sorted(k for k, v in given.items() if v != defaults[k])
    if pipeline and clash:
        raise UserError(f"pipeline {pipeline} supplies every component; leave {', '.join(clash)} unset "
                        "(or drop pipeline and name the components one by one)")


def load_model_weights(folder: Path, what: str):
    """The weights of a model directory (model.safetensors) or of our encoder component in
    a pipeline folder (diffusion_pytorch_model.safetensors, under `encoder.`), read lazily
    (models/weights.py) so a real-size encoder is loaded tensor by tensor."""
    from faceclip_zoo.models.weights import open_weights

    component = folder / "diffusion_pytorch_model.safetensors"
    if component.is_file() and not (folder / "model.safetensors").is_file():
        return open_weights(component, "diffusion_pytorch_model", what).under("encoder.")
    return open_weights(folder / "model.safetensors", "model", what)


def resolve_model_spec(spec: str, config_cls, model_type: str):
    """A named config (random init: tests, from-scratch runs), a faceclip_zoo model
    directory (an `export` or `convert` output) or the encoder component of a pipeline
    folder -> (config, weights dir or None)."""
    path = Path(spec)
    if (path / "config.json").exists():
        meta = json.loads((path / "config.json").read_text())
        if meta.get("_class_name") in PIPELINE_ENCODERS:
            found, key = PIPELINE_ENCODERS[meta["_class_name"]]
            if found != model_type:
                raise UserError(f"{path} holds a {found!r} encoder; a {model_type!r} one is needed")
            return config_cls.from_dict(meta[key]), path
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
        if not 0.0 <= self.hparams.get("face_dropout", 0.0) <= 1.0:
            raise UserError(f"face_dropout must be in [0, 1], got {self.hparams.face_dropout}")
        self.optimizer_factory = optimizer
        self.ema: EMAModel | None = None
        self._weights_loaded = False
        self._null_condition: tuple[torch.Tensor, torch.Tensor] | None = None
        self._samples: list[dict] = []
        self.skipped_samples = 0
        hp = self.hparams
        self._adapted = False
        if isinstance(hp.get("lora"), LoraSettings):  # a plain dict: checkpoints load with weights_only
            hp["lora"] = hp["lora"].to_dict()
        if (hp.get("quantize_base") or hp.get("base_dtype")) and not hp.get("lora"):
            raise UserError("quantize_base / base_dtype freeze the base: they apply to LoRA runs (set lora)")
        if isinstance(hp.get("identity_loss"), IdentityLossSettings):
            hp["identity_loss"] = hp["identity_loss"].to_dict()
        self.identity_settings = IdentityLossSettings.from_dict(hp.get("identity_loss"))
        self._identity_network: list[torch.nn.Module] = []  # a list: not a submodule, never in checkpoints
        if hp.get("lora"):
            # its checkpoints hold only what trains; the frozen base comes from the pipeline
            # folder (or the components) it started from, loaded again on resume
            self.strict_loading = False

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.DENOISER)

    # ------------------------------------------------------------------ weights
    def setup(self, stage: str) -> None:
        if not self._weights_loaded:
            self.load_pretrained_weights()
            self.refuse_unloaded()
            self._weights_loaded = True
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is not None:
                from faceclip_zoo.cache_fingerprint import check_cached_features

                check_cached_features(self, datamodule)  # before the base is quantized / cast
        if self.hparams.get("lora") and not self._adapted:
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

        hp = self.hparams
        if hp.get("base_dtype") and self._trainer is not None and "mixed" not in str(self.trainer.precision):
            raise UserError(f"base_dtype {hp.base_dtype} needs precision bf16-mixed (or 16-mixed): autocast runs "
                            f"the float32 adapters against the {hp.base_dtype} base; got {self.trainer.precision}")
        denoiser = self.denoiser
        denoiser.requires_grad_(False)
        if hp.get("base_dtype"):
            dtype = getattr(torch, hp.base_dtype)
            denoiser.to(dtype)
            self.vae.to(dtype)
            if not hp.train_encoders:
                self.condition.to(dtype)
        if hp.get("quantize_base"):
            # on the run's device (fit sets the model up on the host, then moves it): see quantize_frozen
            device = self.trainer.strategy.root_device if self._trainer is not None else None
            for part in (denoiser, *self.quantizable_frozen_parts()):
                quantize_frozen(part, hp.quantize_base, device)
        add_lora(denoiser, LoraSettings.from_dict(hp.lora), self.DENOISER)
        cast_training_params(denoiser, dtype=torch.float32)
        trained, total = count_parameters(denoiser)
        log.info("LoRA on the %s: %s of %s parameters train", self.DENOISER, f"{trained:,}", f"{total:,}")
        self._adapted = True

    def load_pretrained_weights(self) -> None:
        raise NotImplementedError

    def frozen_dtype(self) -> torch.dtype | None:
        """The dtype frozen weights are loaded in: a LoRA run's base_dtype (the file's
        tensors are cast as they are read, never held in float32), else None (as built)."""
        hp = self.hparams
        return getattr(torch, hp.base_dtype) if hp.get("lora") and hp.get("base_dtype") else None


    @classmethod
    def argument_defaults(cls) -> dict:
        """The constructor's defaults (a run from a pipeline folder leaves its component
        arguments so)."""
        import inspect

        return {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}

    def _load_vae(self, src: str | None) -> None:
        if src:
            load_diffusers_weights(self.vae, src, "vae weights", dtype=self.frozen_dtype())
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
        """The conditioning encoder's face ViT (identity_loss.network "encoder")."""
        raise NotImplementedError

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
        scale, shift = self.latent_scale
        marks = batch.get("face_landmarks")
        term = identity_loss(lambda z: self.vae.decode((z / scale + shift).to(self.vae.dtype)).sample,
                             clean_latents[rows], batch["face"].to(self.device)[rows], self.identity_network,
                             self.identity_settings, self.vae_downsample,
                             landmarks=None if marks is None else marks.to(self.device)[rows], generator=generator)
        self.log("train/identity_loss", term, batch_size=int(rows.sum()))
        self.log("train/diffusion_loss", loss, batch_size=len(batch["caption"]))
        return loss + self.identity_settings.weight * term

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
        """What `export` needs to rebuild the pipeline from the checkpoint alone."""
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        spec = self.export_spec()
        if self.hparams.get("lora"):
            hp = self.hparams
            spec["lora"] = {"settings": dict(hp.lora), "denoiser": self.DENOISER,
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
        if self.hparams.get("lora"):
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
            raise UserError(f"checkpoint EMA lacks {len(missing)} {self.DENOISER} weights (e.g. {missing[0]})")
        for shadow, n in zip(self.ema.shadow_params, names):
            shadow.data.copy_(ema["weights"][n])
        self.ema.optimization_step = ema["optimization_step"]
