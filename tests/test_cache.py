"""`cache`: frozen-model outputs stored in the shards equal what training computes, are
read back by the DataModule, keep every original member, and a re-run does no work."""

import json
import tarfile

import pytest
import torch

from faceclip_zoo.cache import build_from_recipe, cache
from faceclip_zoo.data.datamodule import ShardDataModule
from faceclip_zoo.models.io import save_model_dir
from faceclip_zoo.utils import UserError
from conftest import sdxl_branches, sdxl_recipe, tiny_recipe


def members(path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    with tarfile.open(path) as tar:
        for name in tar.getnames():
            key, ext = name.split(".", 1)
            out.setdefault(key, set()).add(ext)
    return out


def first_val_batch(folder, **kw):
    dm = ShardDataModule(val=folder if isinstance(folder, list) else str(folder), num_workers=0, batch_size=64, image_size=64, face_size=112, **kw)
    return next(iter(dm.val_dataloader()))


def test_encoder_features_equal_the_computed_targets(tmp_path, tiny_shards, corrupt_shard):  # noqa: F811
    recipe = tiny_recipe(tmp_path, tiny_shards)
    out = tmp_path / "cached"
    total = cache(str(recipe), out=str(out), batch_size=7, progress=False)
    face_feats = {"arcface.npy", "face_identity.npy", "face_patches.npy"}
    assert total["features"] == ["arcface", "clip_image", "clip_text", "face_identity", "face_patches"]
    assert total["undecodable"] == 3 and total["samples"] == total["cached"] + 3
    # every original member is kept; features added; the corrupt samples stay as they were
    for shard in (tiny_shards / "train").glob("*.tar"):
        before, after = members(shard), members(out / "train" / shard.name)
        assert set(before) == set(after)
        for key, exts in before.items():
            added = {"clip_image.npy", "clip_text.npy"} | (face_feats if "ref.png" in exts else set())
            assert after[key] == exts | added
    corrupt = members(out / tmp_path.name / "corrupt.tar")
    assert corrupt == {k: v | ({"clip_image.npy", "clip_text.npy"} | face_feats if k.startswith("good") else set())
                       for k, v in members(tmp_path / "corrupt.tar").items()}
    prints = json.loads((out / "train" / "cache.json").read_text())["fingerprints"]
    assert set(prints) == set(total["features"])  # which frozen weights made each feature
    assert prints["face_identity"] == prints["face_patches"] == prints["arcface"] != prints["clip_image"]

    module, _ = build_from_recipe(str(recipe))  # the same seed: the same frozen weights
    module.setup("fit")
    module.eval()
    cached = first_val_batch([str(out / "val"), str(out / "guided")])  # faces and guided pairs
    assert set(module.CACHEABLE) <= set(cached)
    fresh = {k: v for k, v in cached.items() if k not in module.CACHEABLE}
    computed = module.frozen_features(fresh, module.CACHEABLE)
    for name in ("clip_image", "clip_text"):
        torch.testing.assert_close(cached[name], computed[name], atol=2e-3, rtol=2e-3)
    rows = cached["has_face"]
    assert 0 < rows.sum() < len(rows)  # faces and guided pairs: both kinds of row are checked
    for name in ("arcface", "face_identity", "face_patches"):
        torch.testing.assert_close(cached[name][rows], computed[name][rows], atol=2e-3, rtol=2e-3)
        assert not cached[name][~rows].any()  # rows without a face carry nothing
    # the joint embedding from cached face features equals the computed one on every row
    # (rows without a face: the face ViT's answer to a black image)
    from_images = module.joint(fresh)
    vit, calls = module.encoder.face_encoder, []
    vit.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    from_cache = module.joint(cached)
    assert calls == [1]  # only the black image's constant, once
    module.joint(cached)
    assert calls == [1]
    torch.testing.assert_close(from_cache.embeds, from_images.embeds, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(from_cache.identity, from_images.identity, atol=2e-3, rtol=2e-3)
    # the module's targets use the cache: with the frozen models broken, the targets stay right
    module.clip.encode_image = module.clip.encode_text = lambda *_: pytest.fail("computed a cached target")
    targets = module.targets(cached)
    torch.testing.assert_close(targets["image"], cached["clip_image"])
    # a whole training step runs on the cache alone
    module.train()
    loss, _ = module.training_loss(cached)
    assert torch.isfinite(loss)
    # features cached for another face ViT: a clear error
    wrong = dict(cached, face_patches=cached["face_patches"][:, 1:])
    with pytest.raises(UserError, match="cached face_patches have shape .* re-run `cache`"):
        module.joint(wrong)

    again = cache(str(recipe), shards=[str(out / "train")], progress=False)
    assert again["cached"] == 0 and again["already"] == again["samples"]


def test_sdxl_latents_and_embeddings_equal_the_computed_ones(tmp_path, tiny_shards):
    encoder_dir = save_model_dir(sdxl_branches()[0], tmp_path / "encoder")
    recipe = sdxl_recipe(tmp_path, tiny_shards, encoder_dir)
    out = tmp_path / "cached"
    total = cache(str(recipe), shards=[str(tiny_shards / "val")], out=str(out), dtype="float32", progress=False)
    assert total["cached"] == total["samples"] > 0
    module, _ = build_from_recipe(str(recipe))
    module.setup("fit")
    module.eval()
    cached = first_val_batch(out / "val")
    assert cached["vae_latents"].shape[-2:] == (16, 16)
    fresh = {k: v for k, v in cached.items() if k not in module.CACHEABLE}
    e, p = module.condition(fresh["caption"], fresh["face"], fresh["has_face"])
    torch.testing.assert_close(cached["prompt_embeds"], e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached["pooled_prompt_embeds"], p, atol=1e-5, rtol=1e-5)
    # latents are one sample of the VAE posterior, at the configured scale
    scale, shift = module.latent_scale
    posterior = module.vae.encode(fresh["image"] * 2 - 1).latent_dist
    z = ((cached["vae_latents"] / scale + shift) - posterior.mean) / posterior.std
    assert z.mean().abs() < 0.1 and 0.9 < z.std() < 1.1
    # a training step reads them: no VAE, no encoder forward (beyond the unconditional
    # embedding for dropped rows, computed once per run: computed here first, so the step
    # passes whether or not its random condition dropout drops a row)
    module.null_condition(1)
    module.vae.encode = lambda *_: pytest.fail("VAE ran on a cached batch")
    module.condition.forward = lambda *_: pytest.fail("encoders ran on a cached batch")
    module.train()
    assert torch.isfinite(module.diffusion_loss(cached))
    # cached at another resolution: a clear error, not a silent shape mix-up
    wrong = first_val_batch(out / "val")
    wrong["image"] = torch.nn.functional.interpolate(wrong["image"], size=32)
    with pytest.raises(UserError, match="cached at another resolution"):
        module.encode_latents(wrong)


def test_features_of_other_frozen_weights_are_refused_then_recomputed(tmp_path, tiny_shards, capsys):
    """Retraining the encoder after `cache` leaves stale embeddings in the shards: fit refuses
    them (naming the features and the command), `cache` recomputes them, then fit runs."""
    import shutil

    import yaml

    from faceclip_zoo.cli import main

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    encoder_dir = tmp_path / "encoder"
    save_model_dir(sdxl_branches(seed=0)[0], encoder_dir)
    recipe = sdxl_recipe(tmp_path, shards, encoder_dir, steps=2)
    first = cache(str(recipe), dtype="float32", progress=False)
    assert first["cached"] == first["samples"] > 0
    recorded = json.loads((shards / "train" / "cache.json").read_text())["fingerprints"]
    assert set(recorded) == {"vae_latents", "prompt_embeds", "pooled_prompt_embeds"}

    save_model_dir(sdxl_branches(seed=1)[0], encoder_dir)  # "retrained" encoder, same folder
    assert main(["fit", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "the cached pooled_prompt_embeds, prompt_embeds were computed by other frozen weights" in err
    assert "vae_latents" not in err.split("error:")[-1] and "--overwrite true" in err

    again = cache(str(recipe), dtype="float32", progress=False)  # no --overwrite needed
    assert again["cached"] == again["samples"] == first["samples"]
    updated = json.loads((shards / "train" / "cache.json").read_text())["fingerprints"]
    assert updated["vae_latents"] == recorded["vae_latents"] and updated["prompt_embeds"] != recorded["prompt_embeds"]
    module, _ = build_from_recipe(str(recipe))
    module.setup("fit")
    batch = first_val_batch(shards / "val")
    e, _ = module.condition(batch["caption"], batch["face"], batch["has_face"])
    torch.testing.assert_close(batch["prompt_embeds"], e, atol=1e-5, rtol=1e-5)  # the new encoder's
    assert main(["fit", "--config", str(recipe)]) == 0
    # a fit that trains the encoders ignores cached embeddings, so they are not checked
    cfg = yaml.safe_load(recipe.read_text())
    save_model_dir(sdxl_branches(seed=2)[0], encoder_dir)
    cfg["model"]["init_args"]["train_encoders"] = True
    recipe.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(recipe)]) == 0


def test_bad_requests_are_clear(tmp_path, tiny_shards, corrupt_shard):  # noqa: F811
    recipe = tiny_recipe(tmp_path, tiny_shards)
    with pytest.raises(UserError, match="cannot cache \\['vae_latents'\\]"):
        cache(str(recipe), features="vae_latents", progress=False)
    with pytest.raises(UserError, match="recipe not found"):
        cache(str(tmp_path / "nope.yaml"), progress=False)
    with pytest.raises(UserError, match="no train shards|no input shards"):
        cache(str(recipe), shards=[str(tmp_path / "empty")], progress=False)


def _npy_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".npy")}


def test_two_ranks_cache_what_one_process_caches(tmp_path, tiny_shards):
    """`cache --devices 2` (Lightning's launcher, DDP over gloo; every other shard per rank)
    stores the one-process features, VAE posterior samples included, bit for bit."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    encoder_dir = save_model_dir(sdxl_branches()[0], tmp_path / "encoder")
    recipe = sdxl_recipe(tmp_path, tiny_shards, encoder_dir)
    shards = [str(tiny_shards / "train"), str(tiny_shards / "val")]
    one = tmp_path / "one"
    total = cache(str(recipe), shards=shards, out=str(one), dtype="float32", progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "faceclip_zoo", "cache", "--recipe", str(recipe), "--shards",
                          json.dumps(shards), "--out", str(tmp_path / "two"), "--dtype", "float32", "--devices", "2",
                          "--progress", "false"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"for {total['cached']} samples" in res.stdout
    tars = sorted(p.relative_to(one) for p in one.rglob("*.tar"))
    assert len(tars) == 5 and tars == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.tar"))
    for rel in tars:
        a, b = _npy_members(one / rel), _npy_members(tmp_path / "two" / rel)
        assert a.keys() == b.keys() and any(k.endswith("vae_latents.npy") for k in a)
        for name in a:
            assert a[name] == b[name], f"{rel}: {name}"
    for split in ("train", "val"):
        info = [json.loads((root / split / "cache.json").read_text()) for root in (one, tmp_path / "two")]
        assert info[0]["shards"] == info[1]["shards"]
