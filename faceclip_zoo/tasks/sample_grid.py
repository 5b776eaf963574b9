"""The validation image grid of the diffusion stages: for fixed (reference, prompt) pairs
of the validation set, one row each of [reference | real target | generated (a video's frames)], written as
PNG to <log dir>/samples/step-NNNNNN.png and handed to the logger when it takes images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)


def grid_image(rows: list[list[torch.Tensor]]) -> Image.Image:
    """rows of [3, H, W] tensors in [0, 1] (resized to the first tile's size) -> one image."""
    h, w = rows[0][0].shape[-2:]
    tiles = [torch.cat([F.interpolate(t[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
                        for t in row], dim=-1) for row in rows]
    grid = torch.cat(tiles, dim=-2).clamp(0, 1)
    return Image.fromarray((grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def log_image(trainer, key: str, image: Image.Image, step: int) -> None:
    """Hand an image to every logger of the run that takes images (TensorBoard, W&B);
    CSV loggers take none, the PNG in the run folder is theirs."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key=key, images=[image], step=step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
            logger.experiment.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")


def run_dir(trainer) -> Path:
    """The run's log folder as `Trainer.log_dir` finds it, without the broadcast that
    property ends with: that broadcast is a collective, and the sample grid, the t-SNE plot
    and their callers run on rank 0 alone, so under DDP rank 0 waited in it for ranks that
    never came (the fit hung at its first validation)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    first = trainer.loggers[0]
    found = first.log_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir
    return Path(found or trainer.default_root_dir)


def samples_dir(trainer) -> Path:
    return run_dir(trainer) / "samples"


@torch.no_grad()
def write_sample_grid(module, samples: list[dict]) -> Path:
    """Generate with the module's pipeline (EMA weights when kept) and save the grid."""
    hp = module.hparams
    pipe = module.pipeline(use_ema=True)
    pipe.set_progress_bar_config(disable=True)
    height, width = samples[0]["image"].shape[-2:]
    images = pipe.per_row(
        torch.stack([s["face"] for s in samples]), [s["caption"] for s in samples],
        num_inference_steps=hp.sample_steps, guidance_scale=hp.sample_guidance, height=height,
        width=width, generator=torch.Generator(device="cpu").manual_seed(hp.sample_seed),
    )
    # a video family's samples are frames [F, 3, H, W]: the row shows them all
    rows = [[s["face"], s["image"], *(img.cpu() if img.dim() == 4 else [img.cpu()])] for s, img in zip(samples, images)]
    out = samples_dir(module.trainer) / f"step-{module.global_step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    image = grid_image(rows)
    image.save(out)
    log_image(module.trainer, "samples", image, module.global_step)
    log.info("wrote sample grid %s", out)
    return out
