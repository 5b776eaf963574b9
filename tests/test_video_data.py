"""Clips: the synthetic world's clips (a head that turns, a light that moves, captions that
say both), their shard format (a frame strip), batches of clips, and the clip world's
priors (its still twin's face-ID ViT, its own causal video VAE)."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from faceclip_zoo.data.datamodule import collate
from faceclip_zoo.data.schema import CorruptSample, decode_sample, make_sample
from faceclip_zoo.synthetic.faces import (
    clip_caption, clip_frames, render, sample_identity, sample_variation,
)
from faceclip_zoo.synthetic.world import SyntheticSpec, generate
from faceclip_zoo.utils import UserError


def pupils_x(img) -> float:
    """Mean column of the near-black pixels (the pupils, on a face drawn without other black)."""
    a = np.asarray(img).astype(int).sum(-1)
    return float(np.nonzero(a < 60)[1].mean())


def test_a_clip_turns_the_head_as_its_caption_says_and_moves_the_light():
    rng = np.random.default_rng(0)
    ident = dataclasses.replace(sample_identity(rng), hair_color=(200, 200, 200), beard=False, mole=None,
                                eye_color=(60, 110, 190), lips=(200, 80, 80), skin=(230, 190, 160))
    v = dataclasses.replace(sample_variation(rng, 0.0), background="white", hat="no", glasses=False,
                            expression="smiling", light="front", angle=0.0, shift=(0.0, 0.0), exposure=1.0)
    for turn, sign in (("left", -1), ("right", 1)):
        frames = [render(ident, f, 224, 2.0) for f in clip_frames(v, turn, "front", 9)]
        xs = [pupils_x(f) for f in frames]
        assert sign * (xs[-1] - xs[0]) > 20, (turn, xs)  # the features slide to the named side
        assert all(sign * (b - a) >= 0 for a, b in zip(xs, xs[1:])), xs  # steadily
    # the first frame is the frontal scene as a still world draws it; the light ends on the right
    assert np.array_equal(np.asarray(frames[0]), np.asarray(render(ident, v, 224, 2.0)))
    v = dataclasses.replace(v, light="left")
    frames = [render(ident, f, 112, 1.0) for f in clip_frames(v, "left", "right", 9)]
    left_half, right_half = (np.asarray(frames[-1])[:, s].astype(float).mean() for s in (slice(0, 40), slice(72, 112)))
    assert right_half > left_half
    text = clip_caption(v, "left", "right")
    assert text.startswith("a video of a smiling person wearing") and "white background" in text
    assert text.endswith("turning their head to the left, the light moving from the left to the right")


def test_the_clip_world_and_its_still_twin():
    spec = SyntheticSpec(train_identities=3, val_identities=2, samples_per_identity=2, guided_pairs=2,
                         clip_frames=5)
    data = generate(spec)
    for rec in data["train"] + data["val"]:
        assert len(rec.frames) == 5 and rec.frames[0] is rec.scene
        assert "turning their head to the" in rec.caption
        start, end = rec.caption.rsplit("the light moving from the ", 1)[1].split(" to the ")
        assert start != end
    assert all(rec.frames is None for rec in data["guided"])  # image-text pairs stay still
    # the still world is the one it always was: caches made before clips existed stay valid
    assert SyntheticSpec().digest() == "d23cb65dcc14"
    assert spec.digest() != dataclasses.replace(spec, clip_frames=0).digest()


def test_a_clip_is_a_frame_strip_in_the_shard_and_a_video_in_the_batch():
    from PIL import Image

    frames = [Image.new("RGB", (48, 32), (i * 40, 0, 0)) for i in range(5)]
    raw = make_sample("k", frames[0], "a video", frames=frames)
    assert json.loads(raw["json"])["frames"] == 5 and "video.png" in raw
    sample = decode_sample(raw, 32, 112)
    assert sample["video"].shape == (3, 5, 32, 32)
    torch.testing.assert_close(sample["video"][:, 0], sample["image"])
    assert [round(float(sample["video"][0, i].mean()) * 255) for i in range(5)] == [0, 40, 80, 120, 160]
    bad = dict(raw, json=json.dumps({"identity": None, "frames": 3}).encode())
    with pytest.raises(CorruptSample, match="'k'.*cannot hold the 3 frames"):
        decode_sample(bad, 32, 112)
    still = decode_sample(make_sample("s", frames[2], "a photo"), 32, 112)
    batch = collate([sample, still])
    assert batch["video"].shape == (2, 3, 5, 32, 32)
    assert all(torch.equal(batch["video"][1, :, i], still["image"]) for i in range(5))  # a still clip
    short = dict(sample, video=sample["video"][:, :3])
    with pytest.raises(UserError, match=r"clips of \[3, 5\] frames"):
        collate([sample, short])


def test_the_clip_world_shares_its_twins_priors_and_trains_its_video_vae(tmp_path):
    from faceclip_zoo.synthetic import SyntheticIdentities

    kw = dict(priors_dir=str(tmp_path / "priors"), train_identities=4, val_identities=2, samples_per_identity=2,
              guided_pairs=4, prior_steps=2, batch_size=4, num_workers=0, guided_prob=0.0)
    clips = SyntheticIdentities(root=str(tmp_path / "clips"), clip_frames=5, vae_steps=2, **kw)
    clips.prepare_data()
    twin = SyntheticIdentities(root=str(tmp_path / "still"), **kw)
    face_vit = tmp_path / "priors" / "face-vit" / "config.json"
    assert json.loads(face_vit.read_text())["synthetic"]["digest"] == twin.spec.digest()
    video_vae = json.loads((tmp_path / "priors" / "video-vae" / "config.json").read_text())
    assert video_vae["_class_name"] == "AutoencoderKLWan" and len(video_vae["latents_std"]) == 4
    assert json.loads((tmp_path / "priors" / "video-vae" / "faceclip_zoo.json").read_text())["digest"] == \
        clips.spec.digest()
    stamp = face_vit.stat().st_mtime_ns
    twin.prepare_data()  # its priors are there already: only its shards are written
    assert face_vit.stat().st_mtime_ns == stamp
    clips.setup("fit")
    batch = next(iter(clips.train_dataloader()))
    assert batch["video"].shape == (4, 3, 5, 64, 64)


def test_prepare_takes_short_videos_and_accounts_for_every_one(tmp_path):
    """Videos made here from a real photo (skimage's astronaut) with PyAV: one usable, one too
    short, one without a face, one unreadable; accepted + rejected = inputs, and the
    accepted clip decodes as a video of the recipe's length whose reference face is aligned."""
    import tarfile

    from PIL import Image
    from skimage import data

    from faceclip_zoo.data.prepare_items import Filters
    from faceclip_zoo.data.video import write_mp4
    from faceclip_zoo.prepare import prepare

    astronaut = data.astronaut()
    root = tmp_path / "videos"
    root.mkdir()

    def video(name, frames):
        write_mp4([Image.fromarray(np.ascontiguousarray(f)) for f in frames], root / name, fps=8)
        (root / name).with_suffix(".txt").write_text("a video of a person looking at the camera")

    video("pan.mp4", [astronaut[4 * i:320 + 4 * i, 60 + 3 * i:380 + 3 * i] for i in range(12)])  # a slow pan
    video("short.mp4", [astronaut[:320, 60:380]] * 3)
    video("sky.mp4", [np.full((320, 320, 3), (120, 160, 220), np.uint8)] * 12)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 40)
    (root / "broken.txt").write_text("a video")
    manifest = prepare(str(root), str(tmp_path / "out"), detector="mtcnn", filters=Filters(clip_frames=9),
                       face_size=112, progress=False)
    counts = manifest["counts"]
    assert counts["inputs"] == 4 and counts["accepted"] + counts["rejected"] == 4
    assert counts["accepted"] == 1
    assert counts["rejected_by_reason"] == {"no_face": 1, "too_short": 1, "unreadable_video": 1}
    shard = next((tmp_path / "out").glob("shard-*.tar"))
    with tarfile.open(shard) as tar:
        raw = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
        raw["__key__"] = "pan"
    meta = json.loads(raw["json"])
    assert meta["frames"] == 9 and meta["source_frames"] == 12 and meta["frame_indices"][-1] == 11
    sample = decode_sample(raw, 64, 112)
    assert sample["video"].shape == (3, 9, 64, 64) and sample["has_face"]
    # the frames are the pan's: each differs from the first, the last the most
    diffs = [(sample["video"][:, i] - sample["video"][:, 0]).abs().mean().item() for i in range(9)]
    assert diffs[0] == 0 and diffs[-1] > diffs[1] > 0
