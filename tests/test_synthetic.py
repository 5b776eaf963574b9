import numpy as np

from faceclip_zoo.data.datamodule import ShardDataModule
from faceclip_zoo.data.synthetic import manifest_digest
from faceclip_zoo.data.synthetic_faces import BACKGROUNDS, caption, render, sample_identity, sample_variation


def test_identity_traits_are_fixed_and_variations_are_captioned():
    rng = np.random.default_rng(0)
    ident = sample_identity(rng)
    v = sample_variation(rng, 5)
    text = caption(v)
    assert v.background in text and v.clothing in text and v.light in text
    a = np.asarray(render(ident, v, 112, 1.0), dtype=float)
    b = np.asarray(render(ident, v, 112, 1.0), dtype=float)
    assert np.array_equal(a, b)  # deterministic
    other = sample_identity(rng)
    c = np.asarray(render(other, v, 112, 1.0), dtype=float)
    assert np.abs(a - c).mean() > 3  # a different identity looks different


def test_background_pixel_matches_caption():
    rng = np.random.default_rng(3)
    ident, v = sample_identity(rng), sample_variation(rng, 0)
    v.light, v.exposure = "front", 1.0
    img = np.asarray(render(ident, v, 64, 0.45))
    assert tuple(img[1, 1]) == BACKGROUNDS[v.background]


def test_splits_are_disjoint_and_labels_do_not_leak(tiny_data, tiny_spec):
    train_ids = {r.identity for r in tiny_data["train"]}
    val_ids = {r.identity for r in tiny_data["val"]}
    assert len(train_ids) == tiny_spec.train_identities and len(val_ids) == tiny_spec.val_identities
    assert not train_ids & val_ids
    for rec in tiny_data["train"] + tiny_data["val"]:
        assert rec.identity not in rec.caption and "id" not in rec.caption.split()
    assert all(r.identity is None for r in tiny_data["guided"])


def test_shards_hold_references_from_other_samples_of_the_identity(tiny_shards, tiny_data, tiny_spec):
    assert manifest_digest(tiny_shards) == tiny_spec.digest()
    dm = ShardDataModule(val=str(tiny_shards / "val"), image_size=64, face_size=112, num_workers=0,
                         batch_size=100)
    batch = next(iter(dm.val_dataloader()))
    records = {r.key: r for r in tiny_data["val"]}
    crops = {k: np.asarray(r.crop, dtype=np.float32) / 255 for k, r in records.items()}
    for key, ident, face in zip(batch["key"], batch["identity"], batch["face"]):
        face = face.permute(1, 2, 0).numpy()
        match = min(crops, key=lambda k: np.abs(crops[k] - face).mean())
        assert np.abs(crops[match] - face).max() < 1e-6
        assert match != key and records[match].identity == ident
