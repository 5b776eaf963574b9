"""The planned training stream: equal work per rank whatever the shards, exact resume."""

import logging

import pytest
import webdataset as wds
from PIL import Image

from faceclip_zoo.data.datamodule import ShardDataModule, collate
from faceclip_zoo.data.schema import make_sample
from faceclip_zoo.data.stream import count_samples, plan_epoch, planned_loader
from faceclip_zoo.utils import UserError


def _shards(folder, sizes, prefix="s", face=True):
    """Shards holding `sizes[i]` samples each; keys name shard and index."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"{prefix}-{i:03d}.tar")) as sink:
            for j in range(n):
                img = Image.new("RGB", (8, 8), (i * 20 % 255, j * 7 % 255, 3))
                sink.write(make_sample(f"{prefix}{i}_{j:03d}", img, f"caption {i} {j}",
                                       img if face else None, identity=f"id{i}"))
    return folder


def _spec(folder, rank=0, world=1, workers=0, batch=4, guided=None, guided_prob=0.0, **kw):
    dm = ShardDataModule(train=str(folder), guided=str(guided) if guided else None, guided_prob=guided_prob,
                         batch_size=batch, num_workers=workers, image_size=8, face_size=8,
                         shuffle_buffer=5, seed=3, **kw)
    spec = dm.stream_spec()
    spec.rank, spec.world_size = rank, world
    return spec


def _keys(spec, epoch=0, consumed=0):
    loader = planned_loader(spec, collate, lambda: (epoch, consumed))
    return [b["key"] for b in loader]


def test_count_samples_reads_tar_headers(tmp_path):
    _shards(tmp_path, [7, 0])
    assert count_samples(str(tmp_path / "s-000.tar")) == 7
    assert count_samples(str(tmp_path / "s-001.tar")) == 0


@pytest.mark.parametrize("sizes,slots", [([10, 3, 0, 7], 4), ([5], 4), ([1, 1, 9, 2, 30], 6)])
def test_plan_gives_every_slot_an_equal_disjoint_share(sizes, slots):
    shards = [(f"s{i}", n) for i, n in enumerate(sizes)]
    for epoch in range(3):
        plan, per_slot = plan_epoch(shards, seed=1, epoch=epoch, slots=slots)
        assert per_slot == sum(sizes) // slots
        taken = [(p.url, i) for pieces in plan for p in pieces for i in range(p.start, p.stop)]
        assert all(sum(p.stop - p.start for p in pieces) == per_slot for pieces in plan)
        assert len(taken) == len(set(taken)) == per_slot * slots


def test_too_little_data_fails_fast(tmp_path):
    _shards(tmp_path, [3])
    with pytest.raises(UserError, match="3 training samples in 1 shard.*cannot feed 4 data slots"):
        plan_epoch([("x", 3)], 0, 0, 4)
    with pytest.raises(UserError, match="do not fill one batch"):
        planned_loader(_spec(tmp_path, batch=4, buckets=[[8, 8], [8, 16]]), collate, lambda: (0, 0))


def test_ranks_take_equal_steps_and_see_the_epoch_once(tmp_path):
    """Uneven shards, an empty one, fewer shards than ranks x workers (2 x 2)."""
    folder = _shards(tmp_path, [13, 0, 2])
    per_rank = [_keys(_spec(folder, rank=r, world=2, workers=2, batch=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # 15 // 4 = 3 per slot -> 2 batches x 2 workers
    assert [len(b) for b in per_rank[0]] == [len(b) for b in per_rank[1]]
    seen = [k for rank in per_rank for b in rank for k in b]
    assert len(seen) == len(set(seen)) == 12  # one sample of 15 left for a later epoch
    other_epoch = [k for r in range(2) for b in _keys(_spec(folder, rank=r, world=2, workers=2, batch=2), epoch=1)
                   for k in b]
    assert set(other_epoch) != set(seen)  # another order, another leftover


@pytest.mark.parametrize("workers,buckets", [(0, None), (2, None), (2, [[8, 8], [16, 8]])])
def test_resume_continues_with_exactly_the_remaining_batches(tmp_path, workers, buckets):
    folder = _shards(tmp_path / "main", [9, 14])
    guided = _shards(tmp_path / "guided", [6], prefix="g", face=False)
    spec = _spec(folder, workers=workers, batch=3, guided=guided, guided_prob=0.2, buckets=buckets)
    full = _keys(spec, epoch=2)
    assert len(full) == spec.batches_per_rank()
    for consumed in (1, 3, len(full) - 1):
        assert _keys(spec, epoch=2, consumed=consumed) == full[consumed:]


def test_guided_share_is_exact_and_faceless(tmp_path):
    folder = _shards(tmp_path / "main", [30])
    guided = _shards(tmp_path / "guided", [4], prefix="g", face=False)
    spec = _spec(folder, batch=8, guided=guided, guided_prob=0.25)
    loader = planned_loader(spec, collate, lambda: (0, 0))
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    is_guided = [k.startswith("g") for k in keys]
    assert sum(is_guided) == 10 and len(keys) == 40  # 30 main + round(30 * .25 / .75)
    assert len({k for k in keys if not k.startswith("g")}) == 30  # every main sample once
    for b in batches:
        for k, has_face, face in zip(b["key"], b["has_face"], b["face"]):
            assert bool(has_face) == (not k.startswith("g"))
            assert k[0] != "g" or face.abs().sum() == 0


def test_corrupt_sample_is_replaced_so_the_batch_count_holds(tmp_path, caplog):
    folder = _shards(tmp_path, [8])
    with wds.TarWriter(str(folder / "s-001.tar")) as sink:
        bad = make_sample("broken", Image.new("RGB", (8, 8)), "c")
        bad["png"] = b"not a png"
        sink.write(bad)
    spec = _spec(folder, batch=3)
    with caplog.at_level(logging.WARNING):
        batches = list(planned_loader(spec, collate, lambda: (0, 0)))
    assert [len(b["key"]) for b in batches] == [3, 3, 3]
    assert sum(b["skipped"] for b in batches) == 1
    assert "broken" not in [k for b in batches for k in b["key"]]
    assert any("broken" in r.message for r in caplog.records)
