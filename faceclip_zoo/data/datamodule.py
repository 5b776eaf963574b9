"""ShardDataModule: streams SPSV tuples from WebDataset shards.

Training reads epochs planned over the shards (faceclip_zoo/data/stream.py): every rank
and worker gets an equal share of each epoch whatever the shard sizes, so multi-node runs
never wait on an uneven split, and the position within the epoch is saved in checkpoints
(`state_dict`) so `fit --ckpt_path` resumes without repeating or skipping a sample.
Guided image-text pairs are mixed in at the share `guided_prob`, their face input zeroed
(paper Sec. 3.5). Validation reads each shard once per rank (split across workers), so
every rank computes the same metrics without collectives.

Corrupt samples are logged with their key and shard, and counted: the count travels
inside the batch (`batch["skipped"]`) so the training process knows the exact total even
when decoding happens in worker processes.
"""

from __future__ import annotations

import glob
import logging
import os
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Sequence

import lightning as L
import torch
import webdataset as wds
from braceexpand import braceexpand
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from faceclip_zoo.data.schema import CACHED_FEATURES, FACE_FEATURES, CorruptSample, decode_sample
from faceclip_zoo.data.stream import StreamSpec, count_samples, planned_loader
from faceclip_zoo.utils import UserError

log = logging.getLogger(__name__)

# Tar-level read errors seen by this process since the decode stage last looked.
_tar_errors = 0


def _count_tar_error(exc: Exception) -> bool:
    global _tar_errors
    _tar_errors += 1
    log.warning("skipped unreadable tar member: %s", exc)
    return True  # keep going


def resolve_shards(spec: str | Sequence[str] | None, what: str) -> list[str]:
    """A directory (its *.tar), a glob, a brace pattern ("shard-{000..009}.tar"), a file,
    or a list of those -> sorted list of existing shard paths."""
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
        elif any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
        else:
            found = [p for p in braceexpand(item) if os.path.exists(p)] if "{" in item else (
                [item] if os.path.exists(item) else [])
        if not found:
            raise UserError(f"no {what} shards found at {item!r} (expected .tar files)")
        urls.extend(found)
    return urls


def _decoded(src: Iterable[dict], image_size: int, face_size: int,
             buckets: list[tuple[int, int]] | None = None) -> Iterator[dict]:
    global _tar_errors
    skipped = 0
    for raw in src:
        skipped += _tar_errors
        _tar_errors = 0
        try:
            sample = decode_sample(raw, image_size, face_size, buckets)
        except CorruptSample as exc:
            skipped += 1
            log.warning("skipped corrupt sample: %s", exc)
            continue
        sample["skipped"] = skipped
        skipped = 0
        yield sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "face": torch.stack([s["face"] for s in samples]),
        "has_face": torch.tensor([bool(s["has_face"]) for s in samples]),
        "caption": [s["caption"] for s in samples],
        "identity": [s["identity"] for s in samples],
        "key": [s["key"] for s in samples],
        "skipped": sum(int(s.get("skipped", 0)) for s in samples),
    }
    clips = {s["video"].shape[1] for s in samples if "video" in s}
    if len(clips) > 1:
        raise UserError(f"clips of {sorted(clips)} frames in one batch: prepare or render them at one length")
    if clips:  # a video family's batch; an image among the clips trains as a still clip
        frames = clips.pop()
        batch["video"] = torch.stack([s["video"] if "video" in s else s["image"][:, None].expand(-1, frames, -1, -1)
                                      for s in samples])
    if all("original_size" in s for s in samples):
        batch["original_size"] = torch.tensor([list(s["original_size"]) for s in samples])
        batch["crop_top_left"] = torch.tensor([list(s["crop_top_left"]) for s in samples])
    if any("face_landmarks" in s for s in samples):  # rows without them: NaN (the identity loss skips them)
        nan = torch.full((5, 2), float("nan"))
        batch["face_landmarks"] = torch.stack([s.get("face_landmarks", nan) for s in samples])
    for name in CACHED_FEATURES:
        # Face features are only needed (and only present) on rows with a face; the other
        # rows get zeros, which the model never reads (it goes by has_face).
        needed = [s for s in samples if s["has_face"]] if name in FACE_FEATURES else samples
        if needed and all(name in s for s in needed):
            ref = needed[0][name]
            batch[name] = torch.stack([s.get(name, torch.zeros_like(ref)) for s in samples])
    return batch


def _collate_then(samples: list[dict[str, Any]], transform: Callable[[dict], dict]) -> dict[str, Any]:
    return transform(collate(samples))


class ShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        guided: str | list[str] | None = None,
        guided_prob: float = 0.0,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int = 224,
        face_size: int = 112,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        buckets: list[tuple[int, int]] | None = None,
    ):
        """buckets: (height, width) training resolutions for aspect-ratio bucketing; each
        image goes to the bucket nearest its aspect ratio and batches hold one bucket.
        Validation stays at image_size squares."""
        super().__init__()
        for key, value, least in (("batch_size", batch_size, 1), ("val_batch_size", val_batch_size, 1),
                                  ("num_workers", num_workers, 0), ("image_size", image_size, 1),
                                  ("face_size", face_size, 1)):
            if value is not None and value < least:
                raise UserError(f"data.{key} must be at least {least}, got {value}")
        if not 0.0 <= guided_prob <= 1.0:
            raise UserError(f"guided_prob must be in [0, 1], got {guided_prob}")
        if guided_prob > 0 and guided is None:
            raise UserError("guided_prob > 0 needs guided shards (data.guided)")
        self.train_spec, self.val_spec, self.guided_spec = train, val, guided
        self.guided_prob = guided_prob
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size, self.face_size = image_size, face_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.buckets = [tuple(int(v) for v in b) for b in buckets] if buckets else None
        if self.buckets and any(len(b) != 2 or min(b) <= 0 for b in self.buckets):
            raise UserError(f"buckets must be [height, width] pairs of positive sizes, got {buckets}")
        # Set by the model (its setup hook): applied to each collated batch in the loader's
        # workers, e.g. tokenising the captions there instead of in the training step.
        self.batch_transform: Callable[[dict], dict] | None = None
        self._spec: StreamSpec | None = None
        self._resume: dict | None = None
        self._epochs_iterated = 0

    # ------------------------------------------------------------------ training stream
    def _sizes(self, spec, what: str) -> list[tuple[str, int]]:
        return [(url, count_samples(url)) for url in resolve_shards(spec, what)]

    def stream_spec(self) -> StreamSpec:
        """The training stream's plan inputs for this process's rank."""
        trainer = self._trainer_or_none()
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        guided = self._sizes(self.guided_spec, "guided") if self.guided_prob > 0 else None
        return StreamSpec(
            sizes=self._sizes(self.train_spec, "training"), guided_sizes=guided,
            guided_prob=self.guided_prob, batch_size=self.batch_size, image_size=self.image_size,
            face_size=self.face_size, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
            rank=rank, world_size=world, num_workers=self.num_workers, buckets=self.buckets)

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it already consumed) for the loader's next iter()."""
        trainer = self._trainer_or_none()
        if trainer is None:  # iterated by hand: every iter() is the next epoch
            self._epochs_iterated += 1
            return self._epochs_iterated - 1, 0
        epoch, consumed = trainer.current_epoch, 0
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == epoch:
            consumed = resume["batches"]
            now = self._plan_signature()
            if resume.get("plan") != now:
                # Another world size / workers / batch: the old position maps to the same
                # fraction of the new epoch, not to the same samples.
                old_len = max(1, resume.get("plan", {}).get("batches_per_rank", 1))
                consumed = round(consumed / old_len * now["batches_per_rank"])
                rank_zero_warn(f"resuming with another data plan ({resume.get('plan')} -> {now}): the "
                               "epoch continues at the same fraction, not at the exact sample")
            if consumed >= now["batches_per_rank"]:
                # Saved at the epoch's end: Lightning goes on with the next epoch, and so
                # does the stream (Lightning calls iter() before advancing its epoch count).
                return epoch + 1, 0
            log.info("resuming epoch %d of the training stream after %d batches", epoch, consumed)
        return epoch, consumed

    def _plan_signature(self) -> dict:
        spec = self._spec
        return {"world_size": spec.world_size, "num_workers": spec.num_workers, "batch_size": spec.batch_size,
                "seed": spec.seed, "samples": sum(n for _, n in spec.sizes),
                "batches_per_rank": spec.batches_per_rank()}

    def state_dict(self) -> dict:
        """The training stream's position, saved in every checkpoint Lightning writes."""
        trainer = self._trainer_or_none()
        if trainer is None or self._spec is None or trainer.state.fn != "fit":
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches": progress.processed, "plan": self._plan_signature()}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state or None

    def val_dataset(self):
        # Every rank validates on the whole (small) held-out set: identical metrics on all
        # ranks and no collective that uneven shard splits could deadlock.
        urls = resolve_shards(self.val_spec, "validation")
        return wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=_count_tar_error),
            partial(_decoded, image_size=self.image_size, face_size=self.face_size),
        )

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        if self.train_spec is None:
            raise UserError("no training shards configured (data.train)")
        self._spec = self.stream_spec()
        return planned_loader(self._spec, self._collate(), self._position)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_spec is None:
            return []
        workers = min(self.num_workers, len(resolve_shards(self.val_spec, "validation")))
        return DataLoader(self.val_dataset(), batch_size=self.val_batch_size, collate_fn=self._collate(),
                          num_workers=workers)

    def _collate(self) -> Callable[[list], dict]:
        return collate if self.batch_transform is None else partial(_collate_then, transform=self.batch_transform)
