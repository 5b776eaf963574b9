"""ShardDataModule: streams SPSV tuples from WebDataset shards.

Training streams resample shards with replacement per rank and worker (WebDataset's
ResampledShards), so every rank always has data and multi-node runs never wait on an
uneven split; run length is set by the trainer's max_steps. Validation reads each shard
once per rank (split across workers), so every rank computes the same metrics without
collectives. Guided image-text pairs are mixed in with
probability `guided_prob`, their face input zeroed (paper Sec. 3.5).

Corrupt samples are skipped, logged with their key and shard, and counted: the count
travels inside the batch (`batch["skipped"]`) so the training process knows the exact
total even when decoding happens in worker processes.
"""

from __future__ import annotations

import glob
import logging
import os
import random
from functools import partial
from typing import Any, Iterable, Iterator, Sequence

import lightning as L
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import DataLoader

from faceclip_zoo.data.schema import CACHED_FEATURES, CorruptSample, decode_sample, strip_face
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


def _worker_seed(seed: int) -> int:
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return seed * 1_000_003 + rank * 1009 + worker


def _shuffled(src: Iterable, bufsize: int, seed: int) -> Iterator:
    """Buffer shuffle with a per-rank, per-worker seed (reproducible, unlike a time seed)."""
    rng = random.Random(_worker_seed(seed))
    buf: list = []
    for item in src:
        buf.append(item)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


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


def _guided(src: Iterable[dict]) -> Iterator[dict]:
    for sample in src:
        yield strip_face(sample)


def _bucket_batches(src: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Aspect-ratio buckets: samples wait in their bucket until it holds a full batch, so
    every batch has one image shape."""
    waiting: dict[tuple, list[dict]] = {}
    for sample in src:
        group = waiting.setdefault(tuple(sample["image"].shape), [])
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            group.clear()


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
    if all("original_size" in s for s in samples):
        batch["original_size"] = torch.tensor([list(s["original_size"]) for s in samples])
        batch["crop_top_left"] = torch.tensor([list(s["crop_top_left"]) for s in samples])
    for name in CACHED_FEATURES:
        # The identity feature is only needed (and only present) on rows with a face.
        needed = [s for s in samples if s["has_face"]] if name == "arcface" else samples
        if needed and all(name in s for s in needed):
            ref = needed[0][name]
            batch[name] = torch.stack([s.get(name, torch.zeros_like(ref)) for s in samples])
    return batch


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

    # ------------------------------------------------------------------ pipelines
    def _train_stream(self, spec, what: str, seed: int) -> wds.DataPipeline:
        urls = resolve_shards(spec, what)
        return wds.DataPipeline(
            wds.ResampledShards(urls, seed=seed, deterministic=True),
            wds.tarfile_to_samples(handler=_count_tar_error),
            partial(_shuffled, bufsize=self.shuffle_buffer, seed=seed),
            partial(_decoded, image_size=self.image_size, face_size=self.face_size,
                    buckets=self.buckets),
        )

    def train_dataset(self):
        main = self._train_stream(self.train_spec, "training", self.seed)
        if self.guided_prob <= 0:
            return main
        guided = wds.DataPipeline(self._train_stream(self.guided_spec, "guided", self.seed + 1), _guided)
        return wds.RandomMix([main, guided], probs=[1 - self.guided_prob, self.guided_prob])

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
        if self.buckets:
            batches = wds.DataPipeline(self.train_dataset(),
                                       partial(_bucket_batches, batch_size=self.batch_size))
            return DataLoader(batches, batch_size=None, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0,
                              pin_memory=torch.cuda.is_available())
        return DataLoader(
            self.train_dataset(), batch_size=self.batch_size, collate_fn=collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_spec is None:
            return []
        workers = min(self.num_workers, len(resolve_shards(self.val_spec, "validation")))
        return DataLoader(self.val_dataset(), batch_size=self.val_batch_size, collate_fn=collate,
                          num_workers=workers)
