import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from faceclip_zoo.data.datamodule import ShardDataModule, collate, resolve_shards
from faceclip_zoo.data.schema import CorruptSample, decode_sample, make_sample, strip_face
from faceclip_zoo.utils import UserError


def _img(color, size=32):
    return Image.new("RGB", (size, size), color)


def _write(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_sample_round_trip_with_cached_features(tmp_path):
    feats = {"arcface": np.arange(4, dtype=np.float32), "clip_image": np.ones(3, np.float32)}
    _write(tmp_path / "a.tar", [make_sample("k0", _img((255, 0, 0)), "a red thing", _img((0, 255, 0)),
                                            identity="p1", features=feats)])
    dm = ShardDataModule(val=str(tmp_path), image_size=16, face_size=8, num_workers=0, batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    assert batch["caption"] == ["a red thing"] and batch["identity"] == ["p1"]
    assert batch["image"].shape == (1, 3, 16, 16) and batch["face"].shape == (1, 3, 8, 8)
    assert batch["image"][0, 0].mean() == pytest.approx(1.0) and batch["face"][0, 1].mean() == pytest.approx(1.0)
    assert batch["has_face"].tolist() == [True]
    torch.testing.assert_close(batch["arcface"][0], torch.arange(4.0))
    assert "clip_text" not in batch


def test_guided_pairs_have_no_face():
    raw = make_sample("g", _img((0, 0, 255)), "a blue square")
    raw = {k: v for k, v in raw.items()}
    s = decode_sample(raw, 16, 8)
    assert s["has_face"] is False and s["face"].abs().sum() == 0 and s["identity"] == ""


def test_strip_face_keeps_embeddings_cached_without_a_face():
    """A guided shard's pair was cached with the face zeroed: its embeddings stay valid (a
    batch that lost them would re-run the encoders on every row); a tuple's do not."""
    embeds = {"prompt_embeds": np.ones((77, 4), np.float32), "pooled_prompt_embeds": np.ones(4, np.float32)}
    pair = decode_sample(make_sample("g", _img((0, 0, 255)), "a blue square", features=embeds), 16, 8)
    tuple_ = decode_sample(make_sample("t", _img((0, 0, 255)), "a person", _img((9, 9, 9)), identity="p",
                                       features=embeds), 16, 8)
    assert "prompt_embeds" in strip_face(pair) and "pooled_prompt_embeds" in strip_face(pair)
    stripped = strip_face(tuple_)
    assert stripped["has_face"] is False and stripped["face"].abs().sum() == 0
    assert "prompt_embeds" not in stripped and "pooled_prompt_embeds" not in stripped
    assert "prompt_embeds" in collate([strip_face(pair), strip_face(pair)])


@pytest.mark.parametrize("breakage,reason", [
    (lambda s: s.update(png=b"\x89PNG not really"), "cannot decode image"),
    (lambda s: s.pop("txt"), "no caption"),
    (lambda s: s.update(txt=b"\xff\xfe bad"), "not UTF-8"),
    (lambda s: s.update(json=b"{oops"), "not valid JSON"),
])
def test_decode_errors_name_the_sample(breakage, reason):
    s = make_sample("bad-one", _img((1, 2, 3)), "caption", _img((4, 5, 6)))
    breakage(s)
    with pytest.raises(CorruptSample, match=f"'bad-one'.*{reason}"):
        decode_sample(s, 16, 8)


def test_corrupt_sample_is_skipped_and_counted(tmp_path, caplog):
    good = [make_sample(f"ok{i}", _img((i, 0, 0)), f"c{i}", _img((0, i, 0)), identity="x") for i in range(5)]
    bad = make_sample("broken", _img((9, 9, 9)), "c", _img((1, 1, 1)))
    bad["ref.png"] = b"garbage bytes"
    _write(tmp_path / "s.tar", good[:2] + [bad] + good[2:])
    dm = ShardDataModule(val=str(tmp_path / "s.tar"), image_size=16, face_size=8, num_workers=0,
                         batch_size=10)
    with caplog.at_level(logging.WARNING):
        batches = list(dm.val_dataloader())
    assert sum(len(b["key"]) for b in batches) == 5
    assert sum(b["skipped"] for b in batches) == 1
    assert "broken" not in batches[0]["key"]
    assert any("skipped corrupt sample" in r.message and "broken" in r.message for r in caplog.records)


def test_collate_uses_identity_cache_only_when_every_face_row_has_it():
    def s(has_face, feat):
        out = {"image": torch.zeros(3, 2, 2), "face": torch.zeros(3, 2, 2), "has_face": has_face,
               "caption": "c", "identity": "", "key": "k"}
        if feat:
            out["arcface"] = torch.ones(4)
        return out
    assert "arcface" in collate([s(True, True), s(False, False)])
    assert "arcface" not in collate([s(True, True), s(True, False)])


def test_resolve_shards_errors(tmp_path):
    with pytest.raises(UserError, match="no training shards found"):
        resolve_shards(str(tmp_path / "nope"), "training")
    (tmp_path / "shard-000.tar").write_bytes(b"")
    (tmp_path / "shard-001.tar").write_bytes(b"")
    assert len(resolve_shards(str(tmp_path / "shard-{000..001}.tar"), "x")) == 2
    assert len(resolve_shards(str(tmp_path), "x")) == 2
