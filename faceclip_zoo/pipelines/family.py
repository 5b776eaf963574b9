"""What a pipeline family declares once, and the registry of families.

Each family's pipeline class (FaceCLIPSDXLPipeline, FaceT5FluxPipeline) is the single
source of its kind: the kind name its checkpoints and folders carry, its denoiser, the
component folders a training run can start from and the task arguments they supply, the
sampler a recipe gets by default, its guidance knob and the release's defaults, and what
its model card says. The training task of the family points at it (`PIPELINE`); export,
cards, the benchmarks and the demo read these attributes instead of naming classes.

Adding a family: a pipeline module whose class derives from ZooPipeline and fills in the
attributes below, and its module name in FAMILY_MODULES (docs/design.md, "Adding a
diffusion family").
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from faceclip_zoo.pipelines.faces import AlignMode, FaceInput, FaceInputMixin
from faceclip_zoo.utils import UserError

# The modules that define a pipeline family (imported on demand: each pulls in diffusers).
FAMILY_MODULES = ("faceclip_zoo.pipelines.sdxl", "faceclip_zoo.pipelines.flux", "faceclip_zoo.pipelines.wan")


class ZooPipeline(FaceInputMixin):
    """Mixed into a diffusers DiffusionPipeline subclass. The class attributes declare the family:"""

    ZOO_KIND: str  # the kind name of the family's fit checkpoints (export entry) and folders
    FAMILY: str  # its short display name (SDXL, FLUX)
    DENOISER: str  # the component the family's task trains ("unet", "transformer")
    QUANTIZABLE: tuple[str, ...]  # what `generate --quantize` quantises
    # component folder -> the family task's argument that folder supplies when a run starts
    # from a pipeline folder (`pipeline:` in a recipe)
    TRAINING_PARTS: dict[str, str]
    DEFAULT_SCHEDULER: str  # the named noise schedule a recipe gets when it names none
    DEFAULT_VAE: str  # the named VAE a recipe gets when it names none (the tiny one: tests, quickstarts)
    RELEASE_DEFAULTS: dict[str, float]  # the release's inference defaults (pipelines/defaults.py)
    GUIDANCE_ARGUMENT: str  # the call argument `guidance` sets (classifier-free guidance scale)
    DISTILLED_GUIDANCE_ARGUMENT: str | None = None  # a guidance-distilled denoiser's guidance input
    CARD_SUMMARY: str  # what the folder holds, for its model card
    PIPELINE_TAG: str  # the Hub's task of the card ("text-to-image")
    CARD_TAGS: tuple[str, ...]
    OUTPUT: str = "images"  # the diffusers output field: "images" [B, 3, H, W], "frames" [B, F, 3, H, W]

    @property
    def default_guidance(self) -> float:
        """The guidance a call uses when it names none: the one its recipe validated with
        (`default_guidance_scale` in model_index.json), else the release's."""
        stored = self.config.get("default_guidance_scale")
        return float(self.RELEASE_DEFAULTS[self.GUIDANCE_ARGUMENT]) if stored is None else float(stored)

    @classmethod
    def is_family_folder(cls, folder) -> bool:
        """Whether a folder holds this family's pipeline (diffusers' record of its class)."""
        index = Path(folder) / "model_index.json"
        return index.is_file() and json.loads(index.read_text()).get("_class_name") == cls.__name__

    @classmethod
    def guidance_arguments(cls, guidance: float | None, distilled: float | None = None) -> dict[str, float]:
        """The guidance knobs of `generate` / `evaluate` / `demo` -> this pipeline's call arguments."""
        if distilled is not None and cls.DISTILLED_GUIDANCE_ARGUMENT is None:
            raise UserError(f"distilled guidance applies to guidance-distilled denoisers (FLUX), not {cls.FAMILY}")
        out = {} if guidance is None else {cls.GUIDANCE_ARGUMENT: guidance}
        return out if distilled is None else {**out, cls.DISTILLED_GUIDANCE_ARGUMENT: distilled}

    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, spec: dict, source: str, use_ema: bool = True):
        """The pipeline of the family task's fit checkpoint, from its export entry `spec`
        (configs and state-dict prefixes of each part); a LoRA run's: its base pipeline with
        the adapters folded in."""
        if "lora" in spec:
            from faceclip_zoo.pipelines.adapters import merged_pipeline

            return merged_pipeline(cls, checkpoint, spec, source, use_ema)
        from faceclip_zoo.pipelines.components import ema_state

        return cls.from_state(checkpoint["state_dict"], spec, source, ema_state(checkpoint, use_ema))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], spec: dict, source: str,
                   denoiser_state: dict[str, torch.Tensor]):
        """Every component built from the export entry's configs and loaded from `state`
        (denoiser_state overrides the denoiser's weights: its EMA)."""
        from faceclip_zoo.models.diffusers_models import build_diffusers
        from faceclip_zoo.pipelines.components import build_scheduler
        from faceclip_zoo.utils import load_strict, state_under

        condition = cls.condition_from_state(state, spec, source)
        name, prefixes = cls.DENOISER, spec["prefixes"]
        denoiser, vae = build_diffusers(spec[name]), build_diffusers(spec["vae"])
        load_strict(denoiser, {**state_under(state, prefixes[name]), **denoiser_state}, f"{source} [{name}]")
        load_strict(vae, state_under(state, prefixes["vae"]), f"{source} [vae]")
        return cls(vae=vae.eval(), scheduler=build_scheduler(spec["scheduler"]),
                   default_guidance_scale=spec.get("guidance_scale"), **spec.get("pipeline_defaults", {}),
                   **{name: denoiser.eval()},
                   **cls.encoder_components(condition.eval()))

    @classmethod
    def from_module(cls, module, use_ema: bool = True):
        """A pipeline sharing a live task's components (the denoiser's EMA copy when kept)."""
        from faceclip_zoo.pipelines.components import build_scheduler, ema_copy

        return cls(vae=module.vae, scheduler=build_scheduler(module.scheduler_config),
                   default_guidance_scale=module.hparams.sample_guidance, **module.pipeline_defaults(),
                   **{cls.DENOISER: ema_copy(module, module.denoiser, use_ema)},
                   **cls.encoder_components(module.condition))

    # ------------------------------------------------------------------ generating
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        face_image: FaceInput | Sequence[FaceInput] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        align: AlignMode | None = None,
        **kwargs: Any,
    ):
        """face_image: a photo or aligned crop (path, PIL, HxWx3 uint8 array or [3,H,W] float
        tensor in [0, 1]), a list of them of one person (identity vectors and patch features
        averaged), or None for a face-free image. align: auto (default: photos are aligned,
        aligned crops kept), always, or never (see auto_align). negative_prompt: default the
        release's negative text (`""` for none); with a zero face it is the guidance branch.
        num_inference_steps: default the release's 50. The guidance argument
        (GUIDANCE_ARGUMENT: SDXL guidance_scale, FLUX true_cfg_scale) defaults to the
        pipeline's (`default_guidance`). Other keyword arguments go to the family's diffusers
        pipeline (its guidance inputs, latents, callback_on_step_end, ...)."""
        embeds = self.embed_request(prompt, face_image, negative_prompt, align)
        return self.denoise(embeds, num_inference_steps=num_inference_steps or self.RELEASE_DEFAULTS[
            "num_inference_steps"], height=height, width=width, num_images_per_prompt=num_images_per_prompt,
            generator=generator, output_type=output_type, **kwargs)

    @torch.no_grad()
    def per_row(self, faces: torch.Tensor | None, prompts: Sequence[str], negative_prompt: str = "",
                guidance_scale: float | None = None, **kwargs: Any) -> torch.Tensor:
        """A batch of different people: row i = (aligned crop faces[i], prompts[i]); faces
        None = no face anywhere; guidance_scale: the classifier-free guidance (default the
        pipeline's). Returns images [B, 3, H, W] (a video family's frames [B, F, 3, H, W]) in
        [0, 1] (validation grids, evaluation)."""
        embeds = self.encode_rows(faces, prompts, negative_prompt, self._execution_device)
        out = self.denoise(embeds, output_type="pt", **{self.GUIDANCE_ARGUMENT: guidance_scale}, **kwargs)
        return getattr(out, self.OUTPUT)

    def denoise(self, embeds: dict[str, torch.Tensor], **kwargs: Any):
        """The family's diffusers pipeline over the condition's embeddings (prompt_embeds,
        pooled and their negatives); the guidance argument None = the pipeline's default."""
        if kwargs.get(self.GUIDANCE_ARGUMENT) is None:
            kwargs[self.GUIDANCE_ARGUMENT] = self.default_guidance
        return self.diffusers_pipeline()(**self.family_arguments(embeds, kwargs))

    # ------------------------------------------------------------------ the family's own
    def diffusers_pipeline(self):
        """diffusers' own pipeline of the family over the same denoiser, VAE and scheduler
        (no text encoders: the condition replaces them)."""
        raise NotImplementedError

    def family_arguments(self, embeds: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call arguments of the family's diffusers pipeline (its defaults filled in)."""
        return {**embeds, **kwargs}

    @classmethod
    def encoder_components(cls, condition) -> dict:
        """The pipeline's encoder components (and tokenizers) holding a condition's encoders."""
        raise NotImplementedError

    @classmethod
    def condition_from_state(cls, state: dict[str, torch.Tensor], spec: dict, source: str):
        """The family's condition (models/condition.py) built from an export entry and loaded."""
        raise NotImplementedError

    @property
    def condition(self):
        """The condition over this pipeline's encoder components."""
        raise NotImplementedError


def pipeline_classes() -> dict[str, type]:
    """Every family's pipeline class, by its kind name."""
    for name in FAMILY_MODULES:
        importlib.import_module(name)
    found, todo = {}, list(ZooPipeline.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "ZOO_KIND" in vars(cls):  # a family's own class, not a subclass of one (evaluation's oracle)
            found[cls.ZOO_KIND] = cls
    return found
