"""The command line as a user meets it: help, one-line errors, fit -> export -> reload."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe

from faceclip_zoo.cli import main
from faceclip_zoo.export import export_checkpoint
from faceclip_zoo.config import FaceCLIPConfig
from faceclip_zoo.models import FaceCLIPEncoder, load_model_dir
from faceclip_zoo.utils import UserError

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart" / "faceclip.yaml"


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "faceclip_zoo", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_help_lists_commands_and_each_has_its_own_help(capsys):
    from faceclip_zoo.cli import ZOO_COMMANDS

    res = run_cli("--help")
    assert res.returncode == 0
    commands = ("fit", "validate", "test", "predict", *ZOO_COMMANDS)
    for cmd in commands:
        assert f"  {cmd} " in res.stdout
    for cmd in ("fit", *ZOO_COMMANDS):  # every zoo command is a typed function: its options come from it
        with pytest.raises(SystemExit) as done:
            main([cmd, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: python -m faceclip_zoo {cmd}" in out or cmd == "fit", cmd
        assert "--help" in out


def test_options_given_twice_are_refused_and_lists_append(capsys):
    assert main(["generate", "--pipeline", "p", "--prompt", "x", "--face", "a.png", "--face", "b.png"]) == 2
    err = capsys.readouterr().err
    assert "--face is given twice" in err and "--face <first> --face+ <second>" in err
    from faceclip_zoo.cli import refuse_repeated_options
    from faceclip_zoo.utils import UserError

    refuse_repeated_options(["--face", "a.png", "--face+", "b.png", "--prompt=x"])
    with pytest.raises(UserError, match=r"--prompt is given twice.*--prompt <first> --prompt\+ <second>"):
        refuse_repeated_options(["--prompt=x", "--prompt", "y"])


def test_unknown_recipe_key_is_one_clear_line(tmp_path):
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["model"]["init_args"]["lossses"] = ["image"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    res = run_cli("fit", "--config", str(bad))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "lossses" in lines[0]


@pytest.mark.parametrize("recipe, needs, maker", [
    ("sdxl.yaml", "quickstart-encoder holds no faceclip", "faceclip.yaml"),
    ("oracle-sdxl.yaml", "quickstart-encoder holds no faceclip", "faceclip.yaml"),
    ("flux.yaml", "quickstart-facet5 holds no facet5", "facet5.yaml"),
    ("wan-base.yaml", "quickstart-facet5-umt5 holds no facet5", "facet5-umt5.yaml"),
])
def test_quickstart_needing_an_encoder_names_the_command_to_run_first(tmp_path, monkeypatch, capsys, recipe,
                                                                      needs, maker):
    """On a fresh clone (no checkpoints/quickstart-*) the diffusion quickstarts stop with one
    line naming the recipe that makes their encoder, not a jsonargparse Namespace dump."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(REPO / "recipes" / "quickstart" / recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Lightning's own "Seed set to 0" line comes first, then ours (where Lightning's handler
    # writes depends on when lightning was first imported in this process)
    err = [line for line in err if not line.endswith("Seed set to 0")]
    assert err == [f"error: checkpoints/{needs} model yet; make it first with "
                   f"`python -m faceclip_zoo fit --config recipes/quickstart/{maker}`"]


@pytest.mark.parametrize("recipe, base", [("sdxl.yaml", "quickstart-sdxl-base/unet"),
                                          ("wan.yaml", "quickstart-wan-base/transformer")])
def test_quickstart_without_its_base_names_the_base_recipe(tmp_path, monkeypatch, capsys, recipe, base):
    """With the encoder made but not the base (text-to-image for SDXL, text-to-video for
    Wan), the next step is named."""
    from faceclip_zoo.config import FaceT5Config
    from faceclip_zoo.models.facet5 import FaceT5Encoder
    from faceclip_zoo.models.faceclip import FaceCLIPEncoder
    from faceclip_zoo.models.io import save_model_dir

    monkeypatch.chdir(tmp_path)
    if recipe == "sdxl.yaml":
        save_model_dir(FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny")), tmp_path / "checkpoints" /
                       "quickstart-encoder")
    else:
        save_model_dir(FaceT5Encoder(FaceT5Config.from_name("facet5-umt5-tiny")), tmp_path / "checkpoints" /
                       "quickstart-facet5-umt5")
    assert main(["fit", "--config", str(REPO / "recipes" / "quickstart" / recipe)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.endswith("Seed set to 0")]
    maker = recipe.replace(".yaml", "-base.yaml")
    assert err == [f"error: checkpoints/{base} does not exist yet; make it first with "
                   f"`python -m faceclip_zoo fit --config recipes/quickstart/{maker}`"]


def test_missing_weights_file_is_one_clear_line(tmp_path, tiny_shards, corrupt_shard):
    recipe = tiny_recipe(tmp_path, tiny_shards, face_encoder_weights=str(tmp_path / "nope.safetensors"))
    res = run_cli("fit", "--config", str(recipe))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: face encoder weights not found: {tmp_path / 'nope.safetensors'} "
                      "(check the path in your recipe or command)"]


def test_fit_skips_corrupt_samples_then_export_reloads_identically(tmp_path, tiny_shards, corrupt_shard):
    recipe = tiny_recipe(tmp_path, tiny_shards)
    assert main(["fit", "--config", str(recipe)]) == 0
    run = tmp_path / "run" / "version_0"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    identity = [float(r["val/identity_top1"]) for r in rows if r.get("val/identity_top1")]
    assert len(identity) == 2 and all(0 <= v <= 1 for v in identity)
    skipped = [float(r["train/skipped_samples"]) for r in rows if r.get("train/skipped_samples")]
    assert skipped[-1] >= 1  # corrupt samples were met, skipped and counted, not fatal
    assert (run / "config.yaml").exists()

    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "export"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "recipe.yaml"} <= {p.name for p in out.iterdir()}
    assert "FaceCLIPEncoderModule" in (out / "recipe.yaml").read_text()
    # a second export into the same folder is refused, then replaces it whole with --overwrite
    (out / "stale.safetensors").write_bytes(b"from an older export")
    weights = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="--overwrite true"):
        export_checkpoint(str(ckpt), str(out))
    assert (out / "model.safetensors").read_bytes() == weights
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--overwrite", "true"]) == 0
    assert not (out / "stale.safetensors").exists() and not list(tmp_path.glob(".export*"))
    assert f"# {out.name}" in (out / "README.md").read_text()  # the card names the folder, not the temporary one
    loaded = load_model_dir(out, expect="faceclip")

    # the encoder as trained, straight from the Lightning checkpoint
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    trained = FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny")).eval()
    trained.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    faces = torch.rand(3, 3, 112, 112)
    prompts = ["a smiling person", "a person in a red shirt", "a photo"]
    a, b = trained.encode(prompts, faces), loaded.encode(prompts, faces)
    assert (a.embeds - b.embeds).abs().max().item() < 1e-5
    assert (a.pooled - b.pooled).abs().max().item() < 1e-5
    # training changed the fuser: the export is not just the initial weights
    fresh = FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny")).eval()
    assert (fresh.state_dict()["text_embed_proj.weight"] - loaded.state_dict()["text_embed_proj.weight"]).abs().max() > 0


def test_export_errors_are_clear(tmp_path):
    res = run_cli("export", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: checkpoint not found: {tmp_path / 'none.ckpt'} (check the path in your recipe or command)")


def test_ablation_reads_the_config_it_is_given(tmp_path, capsys):
    """jsonargparse's CLI() keeps --config for itself; the ablation's own --config must win
    (it was once silently replaced by the default file)."""
    bad = tmp_path / "ablation.yaml"
    bad.write_text("ablation:\n  diffusion_steps: 1\n  nonsense_key: 3\n")
    assert main(["ablation", "--config", str(bad)]) == 2
    assert f"{bad}: unknown ablation key(s) ['nonsense_key']" in capsys.readouterr().err
