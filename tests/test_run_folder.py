"""One run folder: `--trainer.default_root_dir` moves metrics, TensorBoard, config.yaml and
checkpoints together (the recipes spell the folder in three places); a fit that fails before
its first step leaves no folder behind."""

from __future__ import annotations

import pytest
import yaml

from faceclip_zoo.run_folder import CreatedFolders, follow_run_folder, recipe_root
from faceclip_zoo.train import fit
from faceclip_zoo.utils import UserError

from conftest import tiny_recipe


def _production_style(tmp_path, shards):
    """The tiny recipe laid out as the production recipes are: checkpoints in
    <root>/checkpoints, named again in ModelCheckpoint's dirpath."""
    path = tiny_recipe(tmp_path, shards)
    recipe = yaml.safe_load(path.read_text())
    root = recipe["trainer"]["default_root_dir"]
    recipe["trainer"]["callbacks"][0]["init_args"]["dirpath"] = f"{root}/checkpoints"
    recipe["trainer"]["max_steps"] = 1
    recipe["trainer"]["limit_val_batches"] = 0
    recipe["data"]["init_args"]["train"] = str(shards / "train")
    path.write_text(yaml.safe_dump(recipe))
    return path, root


def test_default_root_dir_moves_the_whole_run(tmp_path, tiny_shards):
    path, recipe_dir = _production_style(tmp_path, tiny_shards)
    elsewhere = tmp_path / "elsewhere"
    fit(path, f"--trainer.default_root_dir={elsewhere}")
    files = {p.relative_to(elsewhere).as_posix() for p in elsewhere.rglob("*") if p.is_file()}
    assert {"checkpoints/last.ckpt", "version_0/metrics.csv", "version_0/config.yaml"} <= files, files
    assert any(f.startswith("tensorboard/version_0/events.out") for f in files), files
    assert not (tmp_path / "run").exists(), "something was still written to the recipe's folder"


def test_a_logger_named_on_the_command_line_stays_where_it_was_named(tmp_path):
    from jsonargparse import Namespace

    trainer = Namespace(default_root_dir="new", logger=[Namespace(
        class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="runs/x"))],
        callbacks=[Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                             init_args=Namespace(dirpath="runs/x/checkpoints")),
                   Namespace(class_path="faceclip_zoo.tasks.ExportOnFitEnd", init_args=Namespace(dirpath="runs/x/e"))])
    follow_run_folder(trainer, "runs/x", given={"trainer.logger"})
    assert trainer.logger[0].init_args.save_dir == "runs/x"  # the user's own
    assert trainer.callbacks[0].init_args.dirpath == "new/checkpoints"
    assert trainer.callbacks[1].init_args.dirpath == "runs/x/e"  # an export is not the run folder


def test_recipe_root_reads_the_last_recipe_that_sets_it(tmp_path):
    (tmp_path / "a.yaml").write_text("trainer:\n  default_root_dir: runs/a\n")
    (tmp_path / "b.yaml").write_text("model: {}\n")
    assert recipe_root([tmp_path / "a.yaml", tmp_path / "b.yaml"]) == "runs/a"


def test_a_fit_failing_before_its_first_step_leaves_no_run_folder(tmp_path, tiny_shards):
    path, _ = _production_style(tmp_path, tiny_shards)
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["init_args"]["face_encoder_weights"] = str(tmp_path / "missing-face-vit")
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(UserError, match="missing-face-vit"):
        fit(path)
    assert not (tmp_path / "run").exists(), sorted(p.name for p in (tmp_path / "run").rglob("*"))


def test_only_what_the_failed_run_created_is_removed(tmp_path):
    root = tmp_path / "run"
    (root / "version_0" / "checkpoints").mkdir(parents=True)
    (root / "version_0" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (root / "notes").mkdir()
    created = CreatedFolders([root, tmp_path / "fresh"])
    (root / "version_1").mkdir()
    (root / "version_1" / "config.yaml").write_text("x")
    (root / "version_2" / "checkpoints").mkdir(parents=True)
    (root / "version_2" / "checkpoints" / "a.ckpt").write_bytes(b"x")  # a checkpoint: kept
    (tmp_path / "fresh" / "tensorboard").mkdir(parents=True)
    removed = created.remove_created()
    assert sorted(p.name for p in removed) == ["fresh", "version_1"]
    assert sorted(p.name for p in root.iterdir()) == ["notes", "version_0", "version_2"]
