"""Callbacks shared by the tasks."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def tsne_plot(embeddings: torch.Tensor, labels: list[str], path: Path, title: str,
              max_identities: int = 20, seed: int = 0) -> Path:
    """t-SNE of embeddings coloured by identity (paper Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.manifold import TSNE

    keep_ids = sorted(set(labels))[:max_identities]
    rows = [i for i, name in enumerate(labels) if name in keep_ids]
    x = torch.nn.functional.normalize(embeddings[rows].float(), dim=-1).numpy()
    perplexity = float(max(2, min(30, (len(rows) - 1) // 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    codes = np.array([keep_ids.index(labels[i]) for i in rows])
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.scatter(points[:, 0], points[:, 1], c=codes, cmap="tab20", s=18)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


class IdentityTSNE(Callback):
    """At the end of fit, plots the last validation joint embeddings by identity."""

    def __init__(self, filename: str = "tsne_identity.png"):
        self.filename = filename

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stored = getattr(pl_module, "last_val_embeddings", None)
        if not trainer.is_global_zero or stored is None:
            return
        emb, labels = stored
        from PIL import Image

        from faceclip_zoo.tasks.sample_grid import log_image, run_dir

        out = run_dir(trainer) / self.filename  # rank 0 alone: no collective (run_dir)
        tsne_plot(emb, labels, out, "joint embeddings of held-out identities (same prompt)")

        with Image.open(out) as image:
            log_image(trainer, "tsne_identity", image.copy(), trainer.global_step)
        log.info("wrote %s", out)


class ExportOnFitEnd(Callback):
    """At the end of fit, exports the trained model to `dirpath` (what `python -m
    faceclip_zoo export` would write from the final checkpoint), so a recipe can hand its
    result to the next stage by path. A run replaces the folder its recipe names (rerunning
    a recipe remakes its output; the old folder stays whole until the new one is written),
    and the folder is checked when the fit starts, not after it has trained."""

    def __init__(self, dirpath: str, part: str | None = None, merge: bool = False):
        """merge: LoRA runs: the base pipeline with the adapters folded in (default: the
        adapter file alone, `export`'s default)."""
        self.dirpath = dirpath
        self.part = part
        self.merge = merge

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from faceclip_zoo.utils import check_output_folder

        if stage == "fit" and trainer.is_global_zero:
            check_output_folder(self.dirpath, "ExportOnFitEnd dirpath", overwrite=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import tempfile

        from faceclip_zoo.export import export_checkpoint, find_run_config

        folder = Path(trainer.log_dir or trainer.default_root_dir)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "final.ckpt"
            trainer.save_checkpoint(ckpt)  # collective under sharded strategies: all ranks
            if trainer.is_global_zero:
                for logger in trainer.loggers:  # the last metrics reach the model card
                    logger.save()
                recipe = find_run_config(folder / "checkpoints" / "x")
                lora = getattr(pl_module, "lora_settings", None) is not None
                out = export_checkpoint(str(ckpt), self.dirpath, part=self.part, recipe=str(recipe) if recipe else None,
                                        merge=self.merge and lora, overwrite=True)
                log.info("exported to %s", out)
        trainer.strategy.barrier("export_on_fit_end")
