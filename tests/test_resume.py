"""Fault tolerance: kill -9 and resume equals an uninterrupted run, the epoch is seen exactly
once, an unreadable last checkpoint falls back, a non-finite loss stops the run cleanly;
gradient caching gives the gradient of one large batch."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_fit, tiny_recipe

TESTS = Path(__file__).resolve().parent


def _recipe(tmp_path, shards, name, callbacks=(), workers=2, devices=1, **model_args) -> Path:
    (tmp_path / name).mkdir()
    path = tiny_recipe(tmp_path / name, shards, **model_args)
    recipe = yaml.safe_load(path.read_text())
    t = recipe["trainer"]
    t.update(max_steps=-1, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, devices=devices,
             strategy="ddp" if devices > 1 else "auto", val_check_interval=None)
    t["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"save_last": True, "every_n_train_steps": 1, "save_top_k": -1,
                                     # fixed (not per logger version): where a restart looks
                                     "dirpath": str(tmp_path / name / "run" / "checkpoints")}},
                      *callbacks]
    t["plugins"] = [{"class_path": "faceclip_zoo.tasks.LastGoodCheckpointIO"}]
    d = recipe["data"]["init_args"]
    d.update(train=str(shards / "train"), val=None, batch_size=4, num_workers=workers, guided_prob=0.2)
    path.write_text(yaml.safe_dump(recipe))
    return path


def _weights(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    return ckpt


def _record(name):
    return {"class_path": "resume_helpers.RecordBatches", "init_args": {"path": name}}


@pytest.mark.parametrize("devices,kill_at", [(1, 4), (2, 3)])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, tiny_shards, devices, kill_at):
    """An epoch of 8 steps (4 per rank under 2-process DDP), SIGKILL of every process after
    step `kill_at`: the resume starts from the last checkpoint, mid-epoch (single process:
    mid worker round robin), and must end where the uninterrupted run ends, bitwise, having
    trained on every sample of the epoch exactly once."""
    full_log, cut_log = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    full = _recipe(tmp_path, tiny_shards, "full", [_record(str(full_log))], devices=devices)
    run_fit(full)
    kill = {"class_path": "resume_helpers.KillAtStep", "init_args": {"step": kill_at}}
    cut = _recipe(tmp_path, tiny_shards, "cut", [_record(str(cut_log)), kill], devices=devices)
    run_fit(cut, expect_kill=True)
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "run" / "checkpoints").iterdir())
    last_good = kill_at - 1  # checkpoints every step; the kill comes before step kill_at's
    assert f"epoch=0-step={last_good}.ckpt" in ckpts and "last.ckpt" in ckpts
    assert max(int(n.split("step=")[1].split(".")[0]) for n in ckpts if "step=" in n) == last_good
    resumed = yaml.safe_load(cut.read_text())
    resumed["trainer"]["callbacks"] = resumed["trainer"]["callbacks"][:2]  # no kill this time
    cut.write_text(yaml.safe_dump(resumed))
    run_fit(cut, "--ckpt_path", "last")

    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a["global_step"] == b["global_step"] == 8 // devices
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

    def trained_keys(log):  # the last record of each (rank, step): what the final weights saw
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        return {(row["rank"], row["step"]): row["keys"] for row in rows}

    full_steps, cut_steps = trained_keys(full_log), trained_keys(cut_log)
    # steps after the last checkpoint ran twice (killed run, resumed run): the resumed
    # run's batches are what counts, and they equal the uninterrupted run's
    assert cut_steps == full_steps
    assert sorted({s for _, s in cut_steps}) == list(range(1, 8 // devices + 1))
    seen = Counter(k for keys in cut_steps.values() for k in keys)
    main = [k for k in seen if not k.startswith("g")]
    assert len(main) == 24 and all(seen[k] == 1 for k in main)  # the whole epoch, each sample once


def test_unreadable_last_checkpoint_falls_back_with_a_warning(tmp_path, tiny_shards):
    recipe = _recipe(tmp_path, tiny_shards, "r", workers=0)
    run_fit(recipe)
    ckpts = tmp_path / "r" / "run" / "checkpoints"
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # cut short, as by a full disk
    cfg = yaml.safe_load(recipe.read_text())
    cfg["trainer"]["max_epochs"] = 2
    del cfg["trainer"]["plugins"]  # every trainer command reads checkpoints through it, named or not
    recipe.write_text(yaml.safe_dump(cfg))
    # named by its path, LightningCLI reads it first (for its hyperparameters): the fallback still happens
    res = run_fit(recipe, "--ckpt_path", str(last))
    assert "last checkpoint" in res.stderr and "unreadable" in res.stderr and "epoch=0-step=8.ckpt" in res.stderr
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 16  # continued from step 8, not from scratch


def test_non_finite_loss_stops_with_step_and_keys_and_keeps_last_good_checkpoint(tmp_path, tiny_shards):
    poison = {"class_path": "resume_helpers.PoisonAtStep", "init_args": {"step": 4}}
    recipe = _recipe(tmp_path, tiny_shards, "nan", [poison], workers=0)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "fit", "--config", str(recipe)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    error = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "non-finite training loss in training step 5" in error[0]
    assert "batch keys: " in error[0] and "batch keys: unknown" not in error[0]
    ckpts = sorted(p.name for p in (tmp_path / "nan" / "run" / "checkpoints").iterdir())
    assert ckpts == [f"epoch=0-step={i}.ckpt" for i in (1, 2, 3, 4)] + ["last.ckpt"]
    last = torch.load(tmp_path / "nan" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_cached_negatives_give_the_gradient_of_one_large_batch(tiny_shards):
    from faceclip_zoo.data.datamodule import ShardDataModule
    from faceclip_zoo.tasks import FaceCLIPEncoderModule

    dm = ShardDataModule(val=str(tiny_shards / "train"), batch_size=16, num_workers=0, image_size=64, face_size=112)
    batch = next(iter(dm.val_dataloader()))
    batch["has_face"][3] = False  # a guided row: masked out of the identity term
    grads, values = [], []
    for micro in (None, 4):
        torch.manual_seed(0)
        module = FaceCLIPEncoderModule(micro_batch_size=micro, loss_kind="clip")
        module.setup("fit")
        module.train()
        loss, losses = module.training_loss(batch)
        loss.backward()
        values.append((loss.detach(), {k: v.detach() for k, v in losses.items()}))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    torch.testing.assert_close(values[0][0], values[1][0], atol=1e-6, rtol=1e-6)
    assert set(grads[0]) == set(grads[1]) and any("logit_scale" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)
