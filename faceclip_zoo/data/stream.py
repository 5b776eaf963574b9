"""The training stream: epochs planned over shards, equal work per rank, exact resume.

WebDataset's shard splitting (by node, by worker) gives a rank as many samples as its shards
hold, so uneven shard sizes, fewer shards than ranks x workers, or an empty shard leave
ranks with different step counts, and DDP hangs in the next collective. Its resampling
avoids the hang but has no epochs and no position to resume from. Nothing in webdataset,
torchdata or Lightning plans an epoch over *sized* shards, so this module does (hand
written), and reuses webdataset for reading tars:

* Epoch e concatenates the shards in an order drawn from (seed, e) and cuts the sample
  sequence into ranks x workers equal contiguous ranges ("slots"); a slot may span several
  shards or a part of one. The N mod slots samples left over at the end are not seen in
  epoch e (they differ from epoch to epoch, since the order does); the count is logged.
* A slot's stream is buffer-shuffled with a seed of (seed, e, slot), guided image-text
  pairs are put at seeded positions (the same count in every slot), then decoded and
  batched. Every slot yields the same number of batches, so every rank takes the same
  number of steps, and the DataLoader's round robin over workers fixes the batch order.
* The position in the epoch is therefore one number, the batches the rank has consumed.
  On resume each worker works out how many batches its slot has already given and skips
  them before decoding (only tar bytes are read), and the DataLoader's workers are
  rotated so the next batch comes from the right slot.
* A corrupt sample is replaced by the slot's previous good sample (logged and counted in
  `batch["skipped"]`): dropping it would make this rank's batches shorter than the others'.
"""

from __future__ import annotations

import logging
import os
import random
import tarfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from faceclip_zoo.data.schema import CorruptSample, decode_sample, strip_face
from faceclip_zoo.utils import UserError

log = logging.getLogger(__name__)

# Lightning warns about any IterableDataset loader with a length, for fear that workers
# duplicate data; PlannedLoader's length is exact by construction (one slot per worker).
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


# ---------------------------------------------------------------------- shard sizes
def _sample_prefix(name: str) -> str | None:
    """The sample key webdataset gives a tar member (directory + name up to the first
    dot), or None for members it ignores."""
    base = os.path.basename(name)
    if "." not in base or base.startswith("__"):
        return None
    return os.path.join(os.path.dirname(name), base.split(".", 1)[0])


@lru_cache(maxsize=None)
def _count_cached(path: str, size: int, mtime: float) -> int:
    count, last = 0, None
    try:
        with tarfile.open(path, "r|*") as tar:  # headers only; members' data is skipped
            for member in tar:
                prefix = _sample_prefix(member.name) if member.isfile() else None
                if prefix is not None and prefix != last:
                    count, last = count + 1, prefix
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"shard {path} is not a readable tar file ({exc}); re-create it "
                        "(python -m faceclip_zoo prepare) or remove it from the recipe's data") from None
    return count


def count_samples(path: str) -> int:
    """Samples in one shard, as webdataset will group them (read from the tar headers)."""
    st = os.stat(path)
    return _count_cached(os.path.abspath(path), st.st_size, st.st_mtime)


# ---------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard, in the order the tar stores them."""
    url: str
    start: int
    stop: int


def plan_epoch(sizes: list[tuple[str, int]], seed: int, epoch: int, slots: int,
               what: str = "training") -> tuple[list[list[Piece]], int]:
    """Pieces of every slot in epoch `epoch`, and the samples per slot."""
    total = sum(n for _, n in sizes)
    per_slot = total // slots
    if per_slot == 0:
        raise UserError(f"{total} {what} samples in {len(sizes)} shard(s) cannot feed {slots} data "
                        f"slots (ranks x dataloader workers): add data or lower data.num_workers")
    order = list(sizes)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    plan: list[list[Piece]] = []
    it = iter(order)
    url, n, pos = None, 0, 0
    for _ in range(slots):
        need, pieces = per_slot, []
        while need:
            if pos >= n:
                url, n = next(it)
                pos = 0
                continue
            take = min(need, n - pos)
            pieces.append(Piece(url, pos, pos + take))
            pos, need = pos + take, need - take
        plan.append(pieces)
    return plan, per_slot


def _raw_samples(pieces: list[Piece], on_error: Callable) -> Iterator[dict]:
    """Raw tar samples (bytes, not decoded) of the pieces."""
    for piece in pieces:
        samples = wds.tarfile_samples(iter([{"url": piece.url}]), handler=on_error)
        for i, sample in enumerate(samples):
            if i >= piece.stop:
                break
            if i >= piece.start:
                yield sample


def _shuffled(src: Iterable, bufsize: int, seed: int) -> Iterator:
    """Buffer shuffle with a given seed (reproducible, unlike a time seed)."""
    rng = random.Random(seed)
    buf: list = []
    for item in src:
        buf.append(item)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


@dataclass
class StreamSpec:
    """What a planned stream needs besides its position; pickled into every worker."""
    sizes: list[tuple[str, int]]
    guided_sizes: list[tuple[str, int]] | None
    guided_prob: float
    batch_size: int
    image_size: int
    face_size: int
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int
    num_workers: int
    buckets: list[tuple[int, int]] | None = None

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    def main_per_slot(self) -> int:
        return sum(n for _, n in self.sizes) // self.slots

    def guided_per_slot(self) -> int:
        """Guided pairs per slot and epoch: the share guided_prob of the slot's output."""
        if not self.guided_sizes or self.guided_prob <= 0:
            return 0
        m = self.main_per_slot()
        return int(round(m * self.guided_prob / (1 - self.guided_prob))) if self.guided_prob < 1 else m

    def samples_per_slot(self) -> int:
        return self.main_per_slot() + self.guided_per_slot()

    def batches_per_slot(self) -> int:
        m, b = self.samples_per_slot(), self.batch_size
        if self.buckets:
            # A bucket can end the epoch holding up to b - 1 samples; only batches that
            # every slot is sure to fill are taken, so all ranks step alike.
            return max(0, (m - len(self.buckets) * (b - 1)) // b)
        return -(-m // b)

    def batches_per_rank(self) -> int:
        return self.batches_per_slot() * self.workers


class PlannedStream(IterableDataset):
    """One rank's training batches for one epoch (see the module docstring)."""

    def __init__(self, spec: StreamSpec, collate: Callable, epoch: int = 0, consumed: int = 0):
        self.spec, self.collate = spec, collate
        self.epoch, self.consumed = epoch, consumed
        self._tar_errors = 0

    def _on_tar_error(self, exc: Exception) -> bool:
        self._tar_errors += 1
        log.warning("unreadable tar member: %s", exc)
        return True

    def _slot(self) -> tuple[int, int]:
        """(logical worker, batches its slot has already given this epoch)."""
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.spec.workers:
            raise RuntimeError(f"planned for {self.spec.workers} workers, running in {workers}")
        c = self.consumed
        logical = (w + c) % workers  # rotated: the resumed loader's first batch is batch c
        given = (c - logical - 1) // workers + 1 if c > logical else 0
        return logical, given

    def _guided_raw(self, slot: int, start: int) -> Iterator[dict]:
        """The slot's guided pairs from the `start`-th on, cycling over guided epochs."""
        spec = self.spec
        plan_seed = spec.seed + 7_919
        g_epoch = 0
        while True:
            plan, m = plan_epoch(spec.guided_sizes, plan_seed, g_epoch, spec.slots, "guided")
            if start >= m:
                start -= m
            else:
                raw = _shuffled(_raw_samples(plan[slot], self._on_tar_error), spec.shuffle_buffer,
                                hash((plan_seed, g_epoch, slot)) & 0xFFFFFFFF)
                for i, sample in enumerate(raw):
                    if i >= start:
                        yield {**sample, "__guided__": True}
                start = 0
            g_epoch += 1

    def _raw(self, slot: int, skip: int) -> Iterator[dict]:
        """The slot's raw samples (main and guided, in epoch order) after the first `skip`."""
        spec = self.spec
        plan, m = plan_epoch(spec.sizes, spec.seed, self.epoch, spec.slots)
        g = spec.guided_per_slot()
        is_guided = np.zeros(m + g, dtype=bool)
        if g:
            rng = np.random.default_rng([spec.seed, self.epoch, slot])
            is_guided[rng.choice(m + g, size=g, replace=False)] = True
        skip = min(skip, m + g)
        main_skip = int((~is_guided[:skip]).sum())
        main = _shuffled(_raw_samples(plan[slot], self._on_tar_error), spec.shuffle_buffer,
                         hash((spec.seed, self.epoch, slot)) & 0xFFFFFFFF)
        for _ in range(main_skip):
            next(main, None)  # bytes only: nothing is decoded while skipping
        guided = self._guided_raw(slot, self.epoch * g + skip - main_skip) if g else None
        for flag in is_guided[skip:]:
            yield next(guided) if flag else next(main, None)

    def _decoded(self, raw: Iterator[dict | None]) -> Iterator[dict]:
        """One decoded sample per raw one; a corrupt or missing one becomes a repeat of the
        previous good one (counted in `skipped`) so the slot's length never changes."""
        spec, last, owed, skipped = self.spec, None, 0, 0
        for sample in raw:
            try:
                if sample is None:
                    raise CorruptSample("shard ended before its planned sample count (unreadable member?)")
                out = decode_sample(sample, spec.image_size, spec.face_size, spec.buckets)
                if sample.get("__guided__"):
                    out = strip_face(out)
            except CorruptSample as exc:
                log.warning("replaced corrupt sample by a repeat of the previous one: %s", exc)
                skipped += 1
                if last is None:
                    owed += 1  # repeat the first good sample once it comes
                    continue
                out = last
            skipped += self._tar_errors
            self._tar_errors = 0
            for _ in range(owed + 1):
                yield {**out, "skipped": skipped}
                skipped = 0
            last, owed = out, 0
        if owed:
            raise UserError(f"data slot of rank {spec.rank} has no decodable sample in epoch {self.epoch}")

    def _batches(self, samples: Iterator[dict]) -> Iterator[dict]:
        b = self.spec.batch_size
        if not self.spec.buckets:
            chunk: list[dict] = []
            for s in samples:
                chunk.append(s)
                if len(chunk) == b:
                    yield self.collate(chunk)
                    chunk = []
            if chunk:
                yield self.collate(chunk)
            return
        waiting: dict[tuple, list[dict]] = {}  # aspect-ratio buckets: one image shape per batch
        for s in samples:
            group = waiting.setdefault(tuple(s["image"].shape), [])
            group.append(s)
            if len(group) == b:
                yield self.collate(group)
                group.clear()

    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        slot_in_rank, given = self._slot()
        slot = spec.rank * spec.workers + slot_in_rank
        total = spec.batches_per_slot()
        if spec.buckets:
            # Bucket filling depends on decoded image shapes: replay the given batches.
            raw, drop = self._raw(slot, 0), given
        else:
            raw, drop = self._raw(slot, given * spec.batch_size), 0
        batches = self._batches(self._decoded(raw))
        for i, batch in enumerate(batches):
            if i >= total - given + drop:
                break
            if i >= drop:
                yield batch


class PlannedLoader(DataLoader):
    """DataLoader over a PlannedStream whose epoch and resume position come from
    `position()` at each `iter()`, with a length Lightning can count steps by."""

    def __init__(self, stream: PlannedStream, position: Callable[[], tuple[int, int]], **kwargs):
        # Workers are started per epoch: they must see the epoch and position set here.
        super().__init__(stream, batch_size=None, persistent_workers=False, **kwargs)
        self.position = position

    def __len__(self) -> int:
        return self.dataset.spec.batches_per_rank()

    def __iter__(self):
        self.dataset.epoch, self.dataset.consumed = self.position()
        return super().__iter__()


def planned_loader(spec: StreamSpec, collate: Callable, position: Callable[[], tuple[int, int]]) -> PlannedLoader:
    n_main, m = sum(n for _, n in spec.sizes), spec.main_per_slot()
    dropped = n_main - m * spec.slots
    if dropped:
        log.info("epoch plan: %d samples over %d slots (%d ranks x %d workers): %d per slot, the last "
                 "%d of each epoch's order unseen in that epoch", n_main, spec.slots, spec.world_size,
                 spec.workers, m, dropped)
    if spec.guided_per_slot() and sum(n for _, n in spec.guided_sizes) < spec.slots:
        raise UserError(f"{sum(n for _, n in spec.guided_sizes)} guided samples cannot feed {spec.slots} "
                        "data slots (ranks x dataloader workers): add guided data or lower data.num_workers")
    if spec.batches_per_slot() == 0:
        raise UserError(f"{spec.samples_per_slot()} samples per data slot do not fill one batch of "
                        f"{spec.batch_size}{' per bucket' if spec.buckets else ''}: lower data.batch_size "
                        "or data.num_workers, or add data")
    return PlannedLoader(PlannedStream(spec, collate), position, num_workers=spec.num_workers,
                         pin_memory=torch.cuda.is_available())
