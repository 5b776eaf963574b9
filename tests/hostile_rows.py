"""The table of hostile and careless inputs that tests/test_hostile.py runs: each row
makes its inputs in a fresh folder and names the command, its arguments, the files that
must come out unchanged and what the single `error:` line must name."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from conftest import tiny_recipe

# Commands whose rows are still to be written; a command named here has no rows yet.
COMMANDS_WITHOUT_ROWS: set[str] = set()


class _Payload:
    """Unpickled without weights_only, this creates the file `marker` (os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a Lightning checkpoint whose unpickling runs code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 1, "epoch": 0, "pytorch-lightning_version": "2.6.6",
                "hyper_parameters": {"payload": _Payload(marker)}}, path)
    return path


@dataclass
class World:
    """What a row's inputs are made in: its folder, the marker no payload may create, and
    the shared tiny shards."""

    root: Path
    shards: Path

    @property
    def marker(self) -> Path:
        return self.root / "PWNED"


@dataclass(frozen=True)
class Row:
    name: str
    command: str
    make: Callable[[World], tuple[list[str], list[Path]]]  # -> (argv after the command, inputs to keep intact)
    names: Callable[[World], str]  # what the error line must name


def _recipe(w: World) -> Path:
    """The tiny encoder recipe of the other tests, on the shared shards."""
    path = tiny_recipe(w.root, w.shards)
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["init_args"]["train"] = str(w.shards / "train")
    path.write_text(yaml.safe_dump(recipe))
    return path


def _trainer_command_with_malicious_checkpoint(w: World):
    recipe = _recipe(w)
    ckpt = malicious_checkpoint(w.root / "elsewhere" / "model.ckpt", w.marker)
    return ["--config", str(recipe), "--ckpt_path", str(ckpt)], [ckpt, recipe]


def _fit_resuming_a_malicious_last(w: World):
    recipe = _recipe(w)
    last = malicious_checkpoint(w.root / "run" / "checkpoints" / "last.ckpt", w.marker)
    return ["--config", str(recipe), "--ckpt_path", str(last)], [last, recipe]


def _run_folder(w: World, class_path: str) -> Path:
    run = w.root / "run"
    ckpt = malicious_checkpoint(run / "checkpoints" / "last.ckpt", w.marker)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": class_path}}))
    return ckpt


def _evaluate_malicious_fit_checkpoint(w: World):
    ckpt = _run_folder(w, "faceclip_zoo.tasks.SDXLJointModule")
    return ["--benchmark", "synthetic", "--pipeline", str(ckpt), "--synthetic_val", str(w.shards / "val"),
            "--out", str(w.root / "eval")], [ckpt, ckpt.parent.parent / "config.yaml"]


def _evaluate_foreign_class_beside_checkpoint(w: World):
    # a module that would create the marker when imported, on the import path
    (w.root / "evil_module.py").write_text(f"import pathlib\npathlib.Path({str(w.marker)!r}).touch()\nclass Task: pass\n")
    ckpt = _run_folder(w, "evil_module.Task")
    return ["--benchmark", "synthetic", "--pipeline", str(ckpt), "--synthetic_val", str(w.shards / "val"),
            "--out", str(w.root / "eval")], [ckpt, ckpt.parent.parent / "config.yaml"]


def _export_malicious_checkpoint(w: World):
    ckpt = malicious_checkpoint(w.root / "run" / "checkpoints" / "last.ckpt", w.marker)
    return ["--ckpt", str(ckpt), "--out", str(w.root / "exported")], [ckpt]


def _photo(w: World, name: str = "face.png", size: tuple[int, int] = (96, 96), mode: str = "RGB") -> Path:
    from PIL import Image

    path = w.root / name
    Image.new(mode, size, 128).save(path)
    return path


def _generate(w: World, *extra: str, face: Path | None = None) -> list[str]:
    # the pipeline is never opened: each of these is refused before the model loads
    return ["--pipeline", str(w.root / "pipeline"), "--prompt", "a photo of a person",
            *(["--face", str(face)] if face else []), *extra]


def _generate_tiny_photo(w: World):
    face = _photo(w, "tiny.png", (1, 1))
    return _generate(w, "--out", str(w.root / "out.png"), face=face), [face]


def _generate_decompression_bomb(w: World):
    face = _photo(w, "bomb.png", (7900, 7900), "L")  # ~60 KB on disk, 62 M pixels declared
    return _generate(w, "--out", str(w.root / "out.png"), face=face), [face]


def _generate_out_is_a_folder(w: World):
    (w.root / "images").mkdir()
    face = _photo(w)
    return _generate(w, "--out", str(w.root / "images"), face=face), [face]


def _generate_out_exists(w: World):
    out = w.root / "out.png"
    out.write_bytes(b"an earlier image")
    return _generate(w, "--out", str(out)), [out]


def _generate_height_7(w: World):
    return _generate(w, "--out", str(w.root / "out.png"), "--height", "7"), []


def _fit_negative_max_steps(w: World):
    recipe = _recipe(w)
    return ["--config", str(recipe), "--trainer.max_steps=-5"], [recipe]


def _fit_batch_size_zero(w: World):
    recipe = _recipe(w)
    return ["--config", str(recipe), "--data.init_args.batch_size=0"], [recipe]


def _cache_truncated_shard(w: World):
    recipe = _recipe(w)
    src = sorted((w.shards / "train").glob("*.tar"))[0]
    shard = w.root / "in" / "cut.tar"
    shard.parent.mkdir()
    shutil.copyfile(src, shard)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size * 6 // 10)
    return ["--recipe", str(recipe), "--shards", str(shard.parent)], [shard]


def foreign_lightning_checkpoint(path: Path) -> Path:
    """A real checkpoint of another project's LightningModule (Lightning's BoringModel, one
    step): readable with weights_only, but nothing of ours."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(path.parent))
    trainer.fit(BoringModel())
    trainer.save_checkpoint(path)
    return path


def _trainer_command_with_foreign_checkpoint(w: World):
    recipe = _recipe(w)
    ckpt = foreign_lightning_checkpoint(w.root / "other" / "foreign.ckpt")
    return ["--config", str(recipe), "--ckpt_path", str(ckpt)], [ckpt, recipe]


def _trainer_command_with_empty_checkpoint(w: World):
    recipe = _recipe(w)
    ckpt = w.root / "empty.ckpt"
    ckpt.write_bytes(b"")
    return ["--config", str(recipe), "--ckpt_path", str(ckpt)], [ckpt, recipe]


def _cut_short(path: Path, keep: float = 0.5) -> Path:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))
    return path


def _pipeline_with_cut_unet(w: World) -> Path:
    """A pipeline folder as export writes it, its UNet weights cut short (a copy that broke off)."""
    from safetensors.torch import save_file

    folder = w.root / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "FaceCLIPSDXLPipeline"}')
    save_file({"w": torch.zeros(256, 256)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    _cut_short(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return folder


def _generate_cut_pipeline(w: World):
    folder = _pipeline_with_cut_unet(w)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    return ["--pipeline", str(folder), "--prompt", "a photo", "--out", str(w.root / "o.png")], [weights]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_cut_pipeline(w: World):
    folder = _pipeline_with_cut_unet(w)
    return ["--pipeline", str(folder), "--port", str(_free_port())], \
        [folder / "unet" / "diffusion_pytorch_model.safetensors"]


def _demo_port_out_of_range(w: World):
    return ["--pipeline", str(w.root / "pipeline"), "--port", "70000"], []


def _faces(w: World, per_person: int) -> Path:
    from PIL import Image

    root = w.root / "faces"
    for person, shade in (("ann", 60), ("bob", 190)):
        (root / person).mkdir(parents=True)
        for k in range(per_person):
            Image.new("RGB", (112, 112), (shade, shade + k, 90)).save(root / person / f"{k}.png")
    return root


def _encoder_dir(w: World) -> Path:
    from faceclip_zoo.config import FaceCLIPConfig
    from faceclip_zoo.models.io import write_model_dir

    return write_model_dir(w.root / "encoder", "faceclip", FaceCLIPConfig.from_name("faceclip-tiny"),
                           {"w": torch.zeros(2)})


def _evaluate_encoder_with_empty_weights(w: World):
    encoder = _encoder_dir(w)
    (encoder / "model.safetensors").write_bytes(b"")
    return ["--encoder", str(encoder), "--faces", str(_faces(w, 2)), "--out", str(w.root / "eval")], \
        [encoder / "model.safetensors", encoder / "config.json"]


def _evaluate_faces_one_per_person(w: World):
    encoder = _encoder_dir(w)
    return ["--encoder", str(encoder), "--faces", str(_faces(w, 1)), "--out", str(w.root / "eval")], \
        [encoder / "model.safetensors"]


def _export_out_exists(w: World):
    ckpt = malicious_checkpoint(w.root / "run" / "checkpoints" / "last.ckpt", w.marker)
    out = w.root / "exported"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier export")
    return ["--ckpt", str(ckpt), "--out", str(out)], [ckpt, out / "model.safetensors"]


def _a_file(w: World, name: str = "taken") -> Path:
    path = w.root / name
    path.write_text("a file where a folder should be")
    return path


def _export_out_is_a_file(w: World):
    ckpt = malicious_checkpoint(w.root / "run" / "checkpoints" / "last.ckpt", w.marker)
    out = _a_file(w)
    return ["--ckpt", str(ckpt), "--out", str(out)], [ckpt, out]


def _photo_folder(w: World) -> Path:
    from PIL import Image

    folder = w.root / "photos"
    folder.mkdir()
    Image.new("RGB", (96, 96), 128).save(folder / "a.png")
    (folder / "a.txt").write_text("a photo of a person")
    return folder


def _prepare_out_is_a_file(w: World):
    photos, out = _photo_folder(w), _a_file(w)
    return ["--input", str(photos), "--out", str(out), "--detector", "mtcnn"], [photos / "a.png", out]


def _prepare_zero_samples_per_shard(w: World):
    photos = _photo_folder(w)
    return ["--input", str(photos), "--out", str(w.root / "shards"), "--samples_per_shard", "0"], [photos / "a.png"]


def _convert_empty_release_file(w: World):
    release = w.root / "release" / "face_clip_encoder.pt"
    release.parent.mkdir()
    release.write_bytes(b"")
    return ["--official", str(release), "--out", str(w.root / "converted")], [release]


def _convert_malicious_release_file(w: World):
    release = malicious_checkpoint(w.root / "release" / "face_clip_encoder.pt", w.marker)
    return ["--official", str(release), "--out", str(w.root / "converted")], [release]


def _convert_out_exists(w: World):
    release = malicious_checkpoint(w.root / "release" / "face_clip_encoder.pt", w.marker)
    out = w.root / "converted"
    (out / "faceclip-l14").mkdir(parents=True)
    (out / "faceclip-l14" / "model.safetensors").write_bytes(b"an earlier conversion")
    return ["--official", str(release), "--out", str(out)], [release, out / "faceclip-l14" / "model.safetensors"]


def _standins_out_is_a_file(w: World):
    out = _a_file(w)
    return ["--out", str(out), "--size", "tiny", "--only", "sdxl-base"], [out]


def _bench_zero_rounds(w: World):
    return ["--only", "data", "--rounds", "0"], []


def _bench_out_is_a_file(w: World):
    out = _a_file(w)
    return ["--only", "data", "--out", str(out)], [out]


def _ablation_config(w: World, **changes) -> Path:
    from conftest import REPO

    config = yaml.safe_load((REPO / "recipes" / "quickstart" / "ablation.yaml").read_text())
    for key in ("encoder_recipe", "diffusion_recipe"):
        config["ablation"][key] = str(REPO / config["ablation"][key])
    config["ablation"].update(out=str(w.root / "ablation"), **changes)
    path = w.root / "ablation.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ablation_zero_steps(w: World):
    config = _ablation_config(w, encoder_steps=0)
    return ["--config", str(config)], [config]


def _ablation_out_is_a_file(w: World):
    config = _ablation_config(w)
    out = _a_file(w)
    return ["--config", str(config), "--out", str(out)], [config, out]


ROWS = [
    Row("fit: --trainer.max_steps=-5", "fit", _fit_negative_max_steps, lambda w: "max_steps"),
    Row("fit: batch_size 0", "fit", _fit_batch_size_zero, lambda w: "batch_size"),
    Row("generate: a 1x1 face photo", "generate", _generate_tiny_photo, lambda w: "tiny.png"),
    Row("generate: a PNG declaring 7900 x 7900 pixels", "generate", _generate_decompression_bomb,
        lambda w: "bomb.png"),
    Row("generate: --out names a folder", "generate", _generate_out_is_a_folder, lambda w: "--out"),
    Row("generate: --out exists", "generate", _generate_out_exists, lambda w: "--overwrite"),
    Row("generate: --height 7", "generate", _generate_height_7, lambda w: "--height"),
    Row("fit: a checkpoint whose pickle runs code", "fit", _trainer_command_with_malicious_checkpoint,
        lambda w: "model.ckpt"),
    Row("fit: resuming a last.ckpt whose pickle runs code", "fit", _fit_resuming_a_malicious_last,
        lambda w: "last.ckpt"),
    Row("evaluate: a fit checkpoint whose pickle runs code", "evaluate", _evaluate_malicious_fit_checkpoint,
        lambda w: "last.ckpt"),
    Row("evaluate: a run's config.yaml naming a class outside faceclip_zoo", "evaluate",
        _evaluate_foreign_class_beside_checkpoint, lambda w: "config.yaml"),
    Row("cache: a truncated input shard (it would be rewritten shorter)", "cache", _cache_truncated_shard,
        lambda w: "cut.tar"),
    Row("export: a checkpoint whose pickle runs code", "export", _export_malicious_checkpoint, lambda w: "last.ckpt"),
    Row("export: --out holds an earlier export", "export", _export_out_exists, lambda w: "--overwrite"),
    Row("export: --out is a file", "export", _export_out_is_a_file, lambda w: "is a file"),
    Row("fit: another project's Lightning checkpoint", "fit", _trainer_command_with_foreign_checkpoint,
        lambda w: "foreign.ckpt"),
    Row("validate: another project's Lightning checkpoint", "validate", _trainer_command_with_foreign_checkpoint,
        lambda w: "foreign.ckpt"),
    Row("test: a checkpoint whose pickle runs code", "test", _trainer_command_with_malicious_checkpoint,
        lambda w: "model.ckpt"),
    Row("predict: a zero-byte checkpoint", "predict", _trainer_command_with_empty_checkpoint,
        lambda w: "empty.ckpt"),
    Row("generate: a pipeline whose UNet weights are cut short", "generate", _generate_cut_pipeline,
        lambda w: "diffusion_pytorch_model.safetensors"),
    Row("demo: a pipeline whose UNet weights are cut short", "demo", _demo_cut_pipeline,
        lambda w: "diffusion_pytorch_model.safetensors"),
    Row("demo: --port 70000", "demo", _demo_port_out_of_range, lambda w: "--port"),
    Row("evaluate: an encoder folder whose model.safetensors is empty", "evaluate",
        _evaluate_encoder_with_empty_weights, lambda w: "model.safetensors"),
    Row("evaluate: --faces with one image per person", "evaluate", _evaluate_faces_one_per_person,
        lambda w: "single image"),
    Row("prepare: --out is a file", "prepare", _prepare_out_is_a_file, lambda w: "--out"),
    Row("prepare: --samples_per_shard 0", "prepare", _prepare_zero_samples_per_shard, lambda w: "--samples_per_shard"),
    Row("convert: an empty release file", "convert", _convert_empty_release_file, lambda w: "face_clip_encoder.pt"),
    Row("convert: a release file whose pickle runs code", "convert", _convert_malicious_release_file,
        lambda w: "face_clip_encoder.pt"),
    Row("convert: --out holds an earlier conversion", "convert", _convert_out_exists, lambda w: "--overwrite"),
    Row("standins: --out is a file", "standins", _standins_out_is_a_file, lambda w: "--out"),
    Row("bench: --rounds 0", "bench", _bench_zero_rounds, lambda w: "--rounds"),
    Row("bench: --out is a file", "bench", _bench_out_is_a_file, lambda w: "--out"),
    Row("ablation: encoder_steps 0", "ablation", _ablation_zero_steps, lambda w: "encoder_steps"),
    Row("ablation: --out is a file", "ablation", _ablation_out_is_a_file, lambda w: "is a file"),
]
