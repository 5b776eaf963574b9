"""The README's main job, end to end on CPU: the quickstart recipe exactly as shipped.

It renders the synthetic identities, trains the synthetic face-ID ViT and tiny CLIP,
pre-trains the tiny FaceCLIP encoder with the full L3 loss, then exports and reloads it.
Runs in a scratch working directory so nothing lands in the checkout.
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faceclip_zoo.models import load_model_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_faceclip_fit_export(tmp_path):
    recipe = REPO / "recipes" / "quickstart" / "faceclip.yaml"
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "fit", "--config", str(recipe)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart" / "faceclip" / "version_0"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    identity_cols = [c for c in rows[0] if "identity" in c and c.startswith("val/")]
    assert "val/identity_top1" in identity_cols
    final = [float(r["val/identity_top1"]) for r in rows if r["val/identity_top1"]][-1]
    print(f"quickstart held-out identity retrieval: {final:.4f}")
    assert final >= 0.9
    assert (run / "tsne_identity.png").stat().st_size > 10_000
    # TensorBoard beside the CSV: the metrics as scalars, the t-SNE as an image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "quickstart" / "faceclip" / "tensorboard" / "version_0"))
    events.Reload()
    assert "tsne_identity" in events.Tags()["images"]
    assert {"val/identity_top1", "train/loss"} <= set(events.Tags()["scalars"])
    assert events.Scalars("val/identity_top1")[-1].value == pytest.approx(final)
    for prior in ("face-vit", "clip"):
        assert (tmp_path / "checkpoints" / "synthetic" / prior / "model.safetensors").exists()

    out = tmp_path / "checkpoints" / "quickstart-encoder"
    # the recipe exports at the end of fit (the SDXL quickstart starts from there)
    assert (out / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "val/identity_top1" in card
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "export", "--ckpt",
                          str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--overwrite", "true"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    encoder = load_model_dir(out)
    emb = encoder.encode(["a photo of a person"], torch.rand(1, 3, 112, 112)).embeds
    assert emb.shape == (1, 77, 64) and torch.isfinite(emb).all()
