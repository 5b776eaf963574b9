import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
# Lightning binds its console log handler to the sys.stderr of the moment it is first
# imported; imported here, under pytest's session-wide capture, that stream outlives every
# test (imported inside a test, it would be that test's capsys stream, closed afterwards).
import lightning  # noqa: E402,F401

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "data" / "faces"


def pytest_collection_modifyitems(config, items):
    """The identity run first and the quickstart fit last. The suite runs on both cores with
    pytest-xdist's work stealing (pyproject's addopts): each worker starts on one
    half of this list, and the one whose half ends with the quickstart takes over the
    other's short tests while that one is still on the identity run, so the two longest
    tests never queue behind each other."""
    def rank(item) -> int:
        return {"tests/test_identity.py": 0, "tests/test_quickstart.py": 2}.get(item.nodeid.split("::")[0], 1)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def tiny_spec():
    from faceclip_zoo.synthetic.world import SyntheticSpec

    return SyntheticSpec(train_identities=6, val_identities=3, samples_per_identity=4,
                         guided_pairs=8, image_size=64, face_size=112, seed=1)


@pytest.fixture(scope="session")
def tiny_data(tiny_spec):
    from faceclip_zoo.synthetic.world import generate

    return generate(tiny_spec)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_spec, tiny_data):
    from faceclip_zoo.synthetic.world import write_dataset

    root = tmp_path_factory.mktemp("synthetic") / "data"
    write_dataset(tiny_spec, tiny_data, root, shard_size=10)
    return root


@pytest.fixture(scope="session")
def quickstart_sdxl_dir(tmp_path_factory):
    """A pipeline folder of the SDXL quickstart's architecture (tiny FaceCLIP branches,
    tiny SDXL UNet and VAE; untrained), saved as `export` saves it."""
    from faceclip_zoo.config import FaceCLIPConfig, diffusers_config
    from faceclip_zoo.models.diffusers_models import build_diffusers
    from faceclip_zoo.models.faceclip import FaceCLIPEncoder
    from faceclip_zoo.pipelines.components import FaceCLIPEncoderModel
    from faceclip_zoo.pipelines.components import build_scheduler
    from faceclip_zoo.pipelines.export import save_pipeline
    from faceclip_zoo.pipelines.sdxl import FaceCLIPSDXLPipeline

    torch.manual_seed(0)
    enc = FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny")).eval()
    pipe = FaceCLIPSDXLPipeline(
        vae=build_diffusers(diffusers_config("vae-tiny")).eval(),
        face_encoder=FaceCLIPEncoderModel.from_encoder(enc), face_encoder_2=FaceCLIPEncoderModel.from_encoder(enc),
        unet=build_diffusers(diffusers_config("sdxl-unet-tiny")).eval(),
        scheduler=build_scheduler(diffusers_config("sdxl-scheduler")))
    return save_pipeline(pipe, tmp_path_factory.mktemp("pipe") / "sdxl")


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """A real face photo (skimage's astronaut, JPEG) and a photo without a face."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(root / "astronaut.jpg", quality=95)
    Image.new("RGB", (300, 200), (90, 90, 90)).save(root / "wall.png")
    return root


# ------------------------------------------------------------------ helpers shared by test modules
# (imported as `from conftest import ...`; heavy imports stay inside the functions)

QUICKSTART = REPO / "recipes" / "quickstart" / "faceclip.yaml"


def tiny_recipe(tmp_path: Path, shards: Path, **model_args) -> Path:
    import yaml

    from faceclip_zoo.utils import redirect_loggers

    recipe = yaml.safe_load(QUICKSTART.read_text())
    root = str(tmp_path / "run")
    recipe["trainer"].update(max_steps=6, val_check_interval=3, log_every_n_steps=1, default_root_dir=root)
    redirect_loggers(recipe["trainer"], root)
    recipe["trainer"]["callbacks"] = [recipe["trainer"]["callbacks"][0]]  # no t-SNE: too few points
    args = recipe["model"]["init_args"]
    args.update({"face_encoder_weights": None, "clip_weights": None, "warmup_steps": 2, **model_args})
    recipe["data"] = {"class_path": "faceclip_zoo.data.ShardDataModule", "init_args": {
        "train": [str(shards / "train"), str(tmp_path / "corrupt.tar")], "val": str(shards / "val"),
        "guided": str(shards / "guided"), "guided_prob": 0.2, "batch_size": 8, "num_workers": 0,
        "image_size": 64, "face_size": 112}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture()
def corrupt_shard(tmp_path):
    """A shard in which most samples are fine and some cannot be decoded."""
    import webdataset as wds
    from PIL import Image

    from faceclip_zoo.data.schema import make_sample

    img = Image.new("RGB", (64, 64), (10, 20, 30))
    samples = [make_sample(f"good{i}", img, "a photo", img, identity="q") for i in range(3)]
    for i in range(3):
        bad = make_sample(f"bad{i}", img, "a photo", img, identity="q")
        bad["png"] = b"not an image"
        samples.append(bad)
    with wds.TarWriter(str(tmp_path / "corrupt.tar")) as sink:
        for s in samples:
            sink.write(s)


def sdxl_branches(seed=0):
    from faceclip_zoo.config import FaceCLIPConfig
    from faceclip_zoo.models.faceclip import FaceCLIPEncoder

    torch.manual_seed(seed)
    return FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny")).eval(), \
        FaceCLIPEncoder(FaceCLIPConfig.from_name("faceclip-tiny")).eval()


def quickstart_diffusion_recipe(tmp_path: Path, shards: Path, name: str, model_args: dict, steps: int = 4) -> Path:
    """A diffusion quickstart recipe (`sdxl` or `flux`) as shipped, shrunk to a few steps on
    the tiny shards, its run, logs and exported pipeline under tmp_path."""
    import yaml

    from faceclip_zoo.utils import redirect_loggers

    recipe = yaml.safe_load((REPO / "recipes" / "quickstart" / f"{name}.yaml").read_text())
    root = str(tmp_path / "run")
    recipe["trainer"].update(max_steps=steps, val_check_interval=2, log_every_n_steps=1, default_root_dir=root,
                             limit_val_batches=1)
    redirect_loggers(recipe["trainer"], root)
    recipe["trainer"]["callbacks"][1]["init_args"]["dirpath"] = str(tmp_path / "pipeline")
    recipe["model"]["init_args"].pop("unet_weights", None)  # the SDXL quickstart's base: from scratch here
    recipe["model"]["init_args"].update(vae_weights=None, num_samples=2, sample_steps=2, warmup_steps=1, **model_args)
    recipe["data"] = {"class_path": "faceclip_zoo.data.ShardDataModule", "init_args": {
        "train": str(shards / "train"), "val": str(shards / "val"), "guided": str(shards / "guided"),
        "guided_prob": 0.2, "batch_size": 4, "num_workers": 0, "image_size": 64, "face_size": 112}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def sdxl_recipe(tmp_path: Path, shards: Path, encoder_dir: Path, steps: int = 4) -> Path:
    return quickstart_diffusion_recipe(tmp_path, shards, "sdxl", {"encoder_l": str(encoder_dir),
                                                                   "encoder_g": str(encoder_dir)}, steps)


def linear_arcface(path, dim=8, seed=0):
    """A stand-in recognition net with ArcFace's interface: [N,3,112,112] -> [N,dim]."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(3 * 112 * 112, dim)).astype(np.float32) / 100
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["data"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "W"], ["fc1"])],
        "arcface_stub",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def run_fit(recipe: Path, *extra: str, expect_kill: bool = False):
    """`fit` in a subprocess of its own process group (what kill -9 tests need), with tests/
    importable for the helper callbacks."""
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "fit", "--config", str(recipe), *extra],
                         capture_output=True, text=True, timeout=600, env=env, start_new_session=True)
    if expect_kill:
        assert res.returncode == -9, res.stderr[-3000:]
    else:
        assert res.returncode == 0, res.stderr[-3000:]
    return res
