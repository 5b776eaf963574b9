import numpy as np

from faceclip_zoo.data.datamodule import ShardDataModule
from faceclip_zoo.synthetic.world import manifest_digest
from faceclip_zoo.synthetic.faces import BACKGROUNDS, caption, render, sample_identity, sample_variation


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


def test_scene_face_crop_finds_the_face_at_every_framing():
    """The evaluation reads the face out of a scene by the renderer's geometry: for each
    scene_scale the crop it takes equals the aligned crop the renderer draws directly (the
    same variation), far better than a crop taken with the wrong framing."""
    import dataclasses

    import torch

    from faceclip_zoo.evaluation.synthetic_benchmark import scene_face_crop

    rng = np.random.default_rng(5)
    ident = sample_identity(rng)
    v = dataclasses.replace(sample_variation(rng, 0), angle=0.0, shift=(0.0, 0.0), scale=1.0)
    crop = torch.from_numpy(np.asarray(render(ident, v, 112, 1.0, center=(56, 64)), dtype=np.float32) / 255)
    for scene_scale in (0.8, 1.0):
        size = 96
        scene = render(ident, v, size, size / 112 * scene_scale)
        scene = torch.from_numpy(np.asarray(scene, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        found = scene_face_crop(scene, 112, scene_scale)[0].permute(1, 2, 0)
        wrong = scene_face_crop(scene, 112, 0.6 if scene_scale == 1.0 else 1.0)[0].permute(1, 2, 0)
        err, wrong_err = (found - crop).abs().mean().item(), (wrong - crop).abs().mean().item()
        assert err < 0.05 and wrong_err > 2 * err, (scene_scale, err, wrong_err)


def test_world_digest_keys_the_cache_and_keeps_the_first_world_valid():
    from faceclip_zoo.synthetic.world import SyntheticSpec

    # The digest of the default world from before the framing fields existed: caches made
    # then (shards, priors, VAE) stay valid.
    assert SyntheticSpec().digest() == "d23cb65dcc14"
    assert SyntheticSpec(scene_scale=1.0).digest() != SyntheticSpec().digest()
    assert SyntheticSpec(max_angle=3.0).digest() != SyntheticSpec().digest()
