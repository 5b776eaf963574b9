import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "data" / "faces"


@pytest.fixture(scope="session")
def tiny_spec():
    from faceclip_zoo.data.synthetic import SyntheticSpec

    return SyntheticSpec(train_identities=6, val_identities=3, samples_per_identity=4,
                         guided_pairs=8, image_size=64, face_size=112, seed=1)


@pytest.fixture(scope="session")
def tiny_data(tiny_spec):
    from faceclip_zoo.data.synthetic import generate

    return generate(tiny_spec)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_spec, tiny_data):
    from faceclip_zoo.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("synthetic") / "data"
    write_dataset(tiny_spec, tiny_data, root, shard_size=10)
    return root
