"""SyntheticIdentities: the synthetic world as a DataModule, the zoo's built-in default.

Its `prepare_data` renders the identities and writes their shards (world.py), and trains
the small frozen models that play ArcFace, CLIP and the VAE in this world (priors.py).
Everything is cached and keyed by the spec, so a second run reuses it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from faceclip_zoo.data.datamodule import ShardDataModule
from faceclip_zoo.synthetic.world import SyntheticSpec, check_world_seed, generate, manifest_digest, write_dataset

log = logging.getLogger(__name__)


class SyntheticIdentities(ShardDataModule):
    """The synthetic-identities dataset as a DataModule (the built-in default).

    Args:
        root: where the shards go (train/, val/, guided/).
        priors_dir: where the synthetic face-ID ViT and tiny CLIP are cached
            (`<priors_dir>/face-vit`, `<priors_dir>/clip`); the model's recipe points its
            frozen-model weights there.
        train_identities, val_identities, samples_per_identity, guided_pairs, seed: the
            dataset's size and randomness (train and val identities are disjoint).
        prior_steps: optimisation steps for each of the two small frozen models.
        vae_steps: when > 0, also train the tiny VAE of the diffusion stage
            (`<priors_dir>/vae`, a diffusers folder) for this many steps.
        buckets: aspect-ratio buckets, as ShardDataModule (the synthetic scenes are square).
        scene_scale, max_angle: the scenes' framing and head tilt (SyntheticSpec).
        clip_frames: > 1 renders every sample as a clip of this many frames (the head turns,
            the light moves, the caption says both) for the video families; vae_steps then
            trains the tiny causal video VAE (`<priors_dir>/video-vae`). A clip world's
            face-ID ViT and CLIP are those of its still twin (the same spec with still
            scenes): they recognise people they never saw, so the twins share them.
    """

    def __init__(
        self,
        root: str = "runs/synthetic",
        priors_dir: str = "checkpoints/synthetic",
        train_identities: int = 160,
        val_identities: int = 20,
        samples_per_identity: int = 8,
        guided_pairs: int = 400,
        prior_steps: int = 400,
        vae_steps: int = 0,
        guided_prob: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 1,
        image_size: int = 64,
        face_size: int = 112,
        seed: int = 0,
        shuffle_buffer: int = 500,
        buckets: list[tuple[int, int]] | None = None,
        scene_scale: float = 0.8,
        max_angle: float = 10.0,
        clip_frames: int = 0,
    ):
        check_world_seed(seed, "data.seed")
        root_path = Path(root)
        super().__init__(
            train=str(root_path / "train"), val=str(root_path / "val"),
            guided=str(root_path / "guided") if guided_pairs > 0 else None,
            guided_prob=guided_prob if guided_pairs > 0 else 0.0,
            batch_size=batch_size, num_workers=num_workers, image_size=image_size,
            face_size=face_size, shuffle_buffer=shuffle_buffer, seed=seed, buckets=buckets,
        )
        self.vae_steps = vae_steps
        self.root = root_path
        self.priors_dir = Path(priors_dir)
        self.prior_steps = prior_steps
        self.spec = SyntheticSpec(
            train_identities=train_identities, val_identities=val_identities,
            samples_per_identity=samples_per_identity, guided_pairs=guided_pairs,
            image_size=image_size, face_size=face_size, seed=seed, scene_scale=scene_scale, max_angle=max_angle,
            clip_frames=clip_frames,
        )

    def prepare_data(self) -> None:
        from faceclip_zoo.synthetic.priors import ensure_priors, ensure_vae, priors_ready, vae_ready

        twin = dataclasses.replace(self.spec, clip_frames=0)  # whose priors these are
        have_data = manifest_digest(self.root) == self.spec.digest()
        have_priors = priors_ready(self.priors_dir, twin.digest(), self.prior_steps)
        have_vae = self.vae_steps <= 0 or vae_ready(self.priors_dir, self.spec, self.vae_steps)
        if have_data and have_priors and have_vae:
            return
        t0 = time.time()
        data = generate(self.spec)
        log.info("rendered synthetic identities in %.1fs", time.time() - t0)
        if not have_data:
            write_dataset(self.spec, data, self.root)
            log.info("wrote synthetic shards to %s", self.root)
        if not have_priors:
            ensure_priors(self.priors_dir, twin, data if twin == self.spec else generate(twin), self.prior_steps)
        if not have_vae:
            ensure_vae(self.priors_dir, self.spec, data, self.vae_steps)
