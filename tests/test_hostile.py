"""Hostile and careless input, as a table: every row runs one command in a subprocess, as a
user would, and must end with exit code 2 and exactly one stderr line starting with
`error:` that names the file or key at fault; no input file changes, and no pickled code
runs, even with torch's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set (people set it to load old
checkpoints; it only changes loads that leave weights_only unset).

Every command must have rows, or be listed in COMMANDS_WITHOUT_ROWS: a new command fails
`test_every_command_has_hostile_rows` until it is in the table."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faceclip_zoo.cli import ZOO_COMMANDS
from faceclip_zoo.train import TRAINER_COMMANDS

from hostile_rows import COMMANDS_WITHOUT_ROWS, ROWS, World, malicious_checkpoint


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_payload_runs_when_loaded_without_weights_only(tmp_path):
    """The table's pickles are live: loaded the unsafe way, they create the marker."""
    w = World(tmp_path, tmp_path)
    torch.load(malicious_checkpoint(tmp_path / "x.ckpt", w.marker), weights_only=False)
    assert w.marker.exists()


def test_every_command_has_hostile_rows():
    commands = set(ZOO_COMMANDS) | set(TRAINER_COMMANDS)
    covered = {row.command for row in ROWS}
    assert covered | COMMANDS_WITHOUT_ROWS == commands, f"commands without hostile rows: {commands - covered}"
    assert not covered & COMMANDS_WITHOUT_ROWS, f"remove from COMMANDS_WITHOUT_ROWS: {covered & COMMANDS_WITHOUT_ROWS}"


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_hostile_input_gets_one_error_line_and_changes_nothing(row, tmp_path, tiny_shards):
    w = World(tmp_path, tiny_shards)
    argv, inputs = row.make(w)
    before = {p: _digest(p) for p in inputs}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", row.command, *argv], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, (res.returncode, res.stderr[-3000:])
    assert row.names(w) in errors[0], errors[0]
    assert not w.marker.exists(), "pickled code ran"
    assert {p: _digest(p) for p in inputs} == before, "an input changed"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_model_files_get_the_users_umask(tmp_path, umask):
    """Exports are written through temporary files (0600 when made); the files left get the
    mode every new file of the user gets."""
    from faceclip_zoo.config import FaceViTConfig
    from faceclip_zoo.models.io import write_model_dir

    old = os.umask(umask)
    try:
        out = write_model_dir(tmp_path / "m", "face_vit", FaceViTConfig.from_name("face-vit-tiny"),
                              {"w": torch.zeros(2)}, recipe="seed_everything: 0\n")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json", "recipe.yaml"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_photo_reaches_the_model_the_same_in_every_format(tmp_path, photos):
    """generate and the demo (open_photo, to_pil) and evaluate (its benchmark's reference
    faces; --faces and --zero_shot use open_photo) decode a photo as `prepare` does
    (load_image): 8-bit, 16-bit, palette and CMYK versions of one picture give the same
    pixels within rounding (JPEG's loss for CMYK); 16-bit is scaled, never clipped."""
    import numpy as np
    from PIL import Image

    from faceclip_zoo.data.images import load_image, open_photo
    from faceclip_zoo.evaluation.benchmark import _open as open_benchmark_image
    from faceclip_zoo.pipelines.faces import to_pil

    rgb = Image.open(photos / "astronaut.jpg").convert("RGB").resize((128, 128))
    rgb.save(tmp_path / "8bit.png")
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(gray16).save(tmp_path / "16bit.png")
    rgb.convert("L").save(tmp_path / "8bit-gray.png")
    rgb.quantize(256).save(tmp_path / "palette.png")
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    reference = np.asarray(rgb, dtype=np.int16)
    gray = np.asarray(Image.open(tmp_path / "8bit-gray.png").convert("RGB"), dtype=np.int16)
    for name, expected, tolerance in (("8bit.png", reference, 0), ("16bit.png", gray, 1),
                                      ("palette.png", reference, 8), ("cmyk.jpg", reference, 12)):
        prepared = load_image(str(tmp_path / name)).rgb
        for opened in (open_photo(tmp_path / name), to_pil(tmp_path / name), to_pil(Image.open(tmp_path / name)),
                       open_benchmark_image(tmp_path / name)):
            assert np.array_equal(np.asarray(opened), prepared), name
        assert np.abs(prepared.astype(np.int16) - expected).mean() <= tolerance, name


def _peak_rss(argv: list[str], env: dict, cwd: Path) -> tuple[int, str, int]:
    """(exit code, stderr, peak resident bytes) of a command run in a process of its own."""
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stderr.write(r.stderr)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(r.returncode)\n")
    res = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                         timeout=300)
    return res.returncode, res.stderr, int(res.stdout.strip().splitlines()[-1]) * 1024


def test_a_decompression_bomb_costs_prepare_and_generate_little_memory(tmp_path):
    """A 7900 x 7900 PNG of ~60 KB (62 M pixels: 8 GB of RAM once decoded and detected) is
    refused from its header: prepare rejects it with a reason, generate stops naming it;
    neither process passes 1.5 GB."""
    import json

    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("L", (7900, 7900), 128).save(photos / "bomb.png")
    (photos / "bomb.txt").write_text("a photo of a person")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    py = [sys.executable, "-m", "faceclip_zoo"]
    rc, err, peak = _peak_rss([*py, "prepare", "--input", str(photos), "--out", str(tmp_path / "shards"),
                               "--detector", "mtcnn", "--progress", "false"], env, tmp_path)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["counts"]["accepted"] == 0 and manifest["counts"]["rejected"] == 1, (rc, err[-2000:], manifest)
    rejects = [json.loads(line) for line in (tmp_path / "shards" / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["too_many_pixels"]
    assert peak < 1.5e9, f"prepare peaked at {peak / 1e9:.2f} GB"
    rc, err, peak = _peak_rss([*py, "generate", "--pipeline", str(tmp_path / "p"), "--prompt", "x",
                               "--face", str(photos / "bomb.png"), "--out", str(tmp_path / "o.png")], env, tmp_path)
    assert rc == 2 and "bomb.png" in err and "--max_pixels" in err, err[-2000:]
    assert peak < 1.5e9, f"generate peaked at {peak / 1e9:.2f} GB"


def test_prepare_counts_every_path_it_is_given(tmp_path, photos, monkeypatch):
    """A folder's every entry ends accepted or rejected with a reason: a folder that cannot
    be read (its photos unread), a file of another format, a folder link looping back up,
    file links in a loop, a 1x1 photo, an empty file, an animated GIF (its first frame is read like any photo).
    accepted + rejected = inputs."""
    import json
    import shutil

    from PIL import Image

    from faceclip_zoo.prepare import prepare

    root = tmp_path / "in"
    (root / "locked").mkdir(parents=True)
    shutil.copyfile(photos / "astronaut.jpg", root / "a.jpg")
    (root / "a.txt").write_text("an astronaut")
    frames = [Image.open(photos / "astronaut.jpg").convert("RGB"), Image.new("RGB", (512, 512), 0)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    (root / "anim.txt").write_text("an astronaut, animated")
    (root / "notes.pdf").write_bytes(b"%PDF-1.4")
    shutil.copyfile(photos / "astronaut.jpg", root / "locked" / "b.jpg")
    (root / "loop").symlink_to(root, target_is_directory=True)  # a folder link back up: not entered again
    (root / "x.jpg").symlink_to(root / "y.jpg")  # file links in a loop: unreadable photos
    (root / "y.jpg").symlink_to(root / "x.jpg")
    (root / "x.txt").write_text("a loop")
    (root / "y.txt").write_text("a loop")
    Image.new("RGB", (1, 1), 128).save(root / "dot.png")  # 1x1
    (root / "dot.txt").write_text("a dot")
    (root / "empty.jpg").write_bytes(b"")
    (root / "empty.txt").write_text("nothing")
    real_scandir = os.scandir

    def scandir(path="."):  # as for a folder without read permission (the tests run as root)
        if os.path.abspath(path) == str(root / "locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    manifest = prepare(str(root), str(tmp_path / "out"), detector="mtcnn", progress=False)
    rejects = {r["source"]: r["reason"] for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text()
                                                     .splitlines())}
    assert rejects == {"locked": "unreadable_folder", "notes.pdf": "unsupported_format", "loop": "symlink_loop",
                       "x.jpg": "unreadable_file", "y.jpg": "unreadable_file", "dot.png": "image_too_small",
                       "empty.jpg": "empty_file"}, rejects
    assert manifest["counts"]["accepted"] == 2  # a.jpg and the GIF's first frame
    assert manifest["counts"]["accepted"] + manifest["counts"]["rejected"] == manifest["counts"]["inputs"] == 9


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    """A read-only folder (simulated: the tests run as root, whom permissions do not stop)
    or a file where a folder should be is refused by the output check every writing command
    runs first."""
    from faceclip_zoo.utils import UserError, check_output_folder

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == read_only else real_access(p, mode))
    with pytest.raises(UserError, match="read-only is not a writable folder"):
        check_output_folder(read_only / "out", "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file is not a writable folder"):
        check_output_folder(tmp_path / "file" / "out", "--out")
    with pytest.raises(UserError, match="is a file"):
        check_output_folder(tmp_path / "file", "--out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserError, match="--overwrite true"):
        check_output_folder(tmp_path / "full", "--out")
    assert check_output_folder(tmp_path / "full", "--out", overwrite=True) == tmp_path / "full"
    assert check_output_folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
