"""The synthetic world's records: procedural identities (faces.py) sampled by a
SyntheticSpec, rendered into scenes with captions, and written as ordinary SPSV shards
(train and val identities disjoint, plus guided face-free image-text pairs), keyed by a
digest of the spec so that a second run reuses them (datamodule.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from faceclip_zoo.data.schema import make_sample
from faceclip_zoo.synthetic.faces import (
    LIGHTS, TURNS, caption, clip_caption, clip_frames, render, render_object, sample_identity, sample_variation,
)

log = logging.getLogger(__name__)

# Worlds no model may train or validate on: the benchmark's test worlds (protocol.py) and
# the world its independent judge learns people from (judge.py).
TEST_WORLD_SEEDS = (1_000_003, 1_000_033, 1_000_037)
JUDGE_WORLD_SEED = 2_000_003
RESERVED_SEEDS = frozenset(TEST_WORLD_SEEDS) | {JUDGE_WORLD_SEED}


def check_world_seed(seed: int, where: str) -> None:
    """A world that trains or validates a model must not be a test or judge world."""
    from faceclip_zoo.utils import UserError

    if seed in RESERVED_SEEDS:
        raise UserError(f"{where}: seed {seed} is reserved for the benchmark's test and judge worlds "
                        f"({sorted(RESERVED_SEEDS)}); a model trained or validated on it would be scored on its "
                        "own data. Choose another seed")


@dataclass
class SyntheticSpec:
    train_identities: int = 160
    val_identities: int = 20
    samples_per_identity: int = 8
    guided_pairs: int = 400
    image_size: int = 64
    face_size: int = 112
    seed: int = 0
    # Scene framing: pixels per template unit as a fraction of image_size / 112 (1.0 frames
    # the scene like the aligned crop: a portrait; 0.8 shows more shoulders and room), and
    # the largest head tilt in degrees.
    scene_scale: float = 0.8
    max_angle: float = 10.0
    renderer_version: int = 1  # bump when faces.py changes what it draws
    # > 1: every sample is a clip of this many frames (the head turns, the light moves; the
    # caption names both), for the video families; 0: still scenes
    clip_frames: int = 0

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        # Fields added after the first world leave the digest of that world unchanged at
        # their original values, so data and priors cached before them stay valid.
        for name, original in (("scene_scale", 0.8), ("max_angle", 10.0), ("clip_frames", 0)):
            if fields[name] == original:
                del fields[name]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Record:
    key: str
    split: str
    scene: Image.Image
    crop: Image.Image  # this sample's own aligned face crop
    caption: str
    identity: str | None
    frames: list[Image.Image] | None = None  # a clip's frames (scene is the first)


def generate(spec: SyntheticSpec) -> dict[str, list[Record]]:
    """Render every split in memory (deterministic in spec.seed)."""
    rng = np.random.default_rng(spec.seed)
    out: dict[str, list[Record]] = {"train": [], "val": [], "guided": []}
    n_ids = {"train": spec.train_identities, "val": spec.val_identities}
    scene_scale = spec.image_size / 112 * spec.scene_scale
    for split, count in n_ids.items():
        for i in range(count):
            ident = sample_identity(rng)
            name = f"{split}-id{i:05d}"
            for j in range(spec.samples_per_identity):
                scene_var = sample_variation(rng, max_angle=spec.max_angle)
                crop_var = dataclasses.replace(
                    scene_var, angle=float(rng.uniform(-3, 3)), scale=float(rng.uniform(0.97, 1.03)))
                crop = render(ident, crop_var, spec.face_size, spec.face_size / 112,
                              center=(spec.face_size / 2, spec.face_size * 64 / 112))
                key = f"{name}-s{j:03d}"
                if spec.clip_frames > 1:
                    turn = TURNS[int(rng.integers(len(TURNS)))]
                    light_to = str(rng.choice([light for light in LIGHTS if light != scene_var.light]))
                    frames = [render(ident, v, spec.image_size, scene_scale)
                              for v in clip_frames(scene_var, turn, light_to, spec.clip_frames)]
                    out[split].append(Record(key, split, frames[0], crop, clip_caption(scene_var, turn, light_to),
                                             name, frames))
                    continue
                out[split].append(Record(key, split, render(ident, scene_var, spec.image_size, scene_scale), crop,
                                         caption(scene_var), name))
    for i in range(spec.guided_pairs):
        img, text = render_object(rng, spec.image_size)
        out["guided"].append(Record(f"guided-{i:06d}", "guided", img, img, text, None))
    return out


def reference_of(records: list[Record], index: int, per_identity: int) -> Image.Image:
    """SPSV: the reference is the aligned crop of *another* sample of the same identity."""
    base = index - index % per_identity
    return records[base + (index % per_identity + 1) % per_identity].crop


def write_dataset(spec: SyntheticSpec, data: dict[str, list[Record]], root: Path,
                  shard_size: int = 400) -> None:
    """Write shards + manifest into a temporary folder, then rename: a crash never leaves
    a half-written dataset that looks complete."""
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {}
    for split, records in data.items():
        (tmp / split).mkdir(parents=True)
        with wds.ShardWriter(str(tmp / split / "shard-%05d.tar"), maxcount=shard_size, verbose=0) as sink:
            for i, rec in enumerate(records):
                ref = None if split == "guided" else reference_of(records, i, spec.samples_per_identity)
                sink.write(make_sample(rec.key, rec.scene, rec.caption, ref, rec.identity,
                                       meta={"source": "synthetic"}, frames=rec.frames))
        counts[split] = len(records)
    manifest = {"spec": dataclasses.asdict(spec), "digest": spec.digest(), "counts": counts,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)


def manifest_digest(folder: Path) -> str | None:
    try:
        return json.loads((folder / "manifest.json").read_text())["digest"]
    except (OSError, ValueError, KeyError):
        return None
