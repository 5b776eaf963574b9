"""`prepare` fed by img2dataset: shards written by img2dataset itself (downloading from a
local HTTP server on 127.0.0.1) prepared end to end, streaming, one output shard per input
shard; two ranks give the one-process result; a broken tar is reported, not lost."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from test_prepare import _cli, _photo, astronaut, read_rejects, read_shards  # noqa: F401 (fixture)

from faceclip_zoo.prepare import prepare

IMG2DATASET = "img2dataset==1.47.0"


@pytest.fixture(scope="module")
def img2dataset_exe() -> Path:
    """img2dataset in a virtual environment of its own, beside the project's (.venv/tools):
    its pins (opencv-python-headless, pandas < 3, webdataset < 0.3) conflict with ours. A
    test-only tool, installed on first use from the package registry."""
    venv = REPO / ".venv" / "tools" / "img2dataset"
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        res = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", IMG2DATASET], capture_output=True,
                             text=True, timeout=900)
        assert res.returncode == 0, f"installing {IMG2DATASET} for this test failed:\n{res.stderr[-2000:]}"
    return exe


# url path, caption, identity; in this order (img2dataset shards rows 4 by 4, failures included)
ROWS = [
    ("p0.jpg", "an astronaut", "astro"),
    ("p0_copy.jpg", "the same bytes again", None),  # -> duplicate (same shard as p0)
    ("p1.jpg", "an astronaut, flipped", "astro"),
    ("wall.png", "a grey wall", None),  # -> no_face
    ("missing.jpg", "never served", None),  # 404: img2dataset reports it in its parquet
    ("p2.jpg", "", None),  # -> empty_caption
    ("text.jpg", "not a picture", None),  # img2dataset cannot decode it: not in the tar
    ("p3.jpg", "an astronaut again", "astro"),
    ("p4.jpg", "someone", None),
]


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, astronaut, img2dataset_exe):  # noqa: F811
    """img2dataset's own output (webdataset format) from a local HTTP server."""
    root = tmp_path_factory.mktemp("img2dataset")
    www = root / "www"
    www.mkdir()
    for i in range(5):
        _photo(astronaut, 40 + i).save(www / f"p{i}.jpg", quality=92)
    shutil.copyfile(www / "p0.jpg", www / "p0_copy.jpg")
    Image.new("RGB", (320, 240), (128, 128, 128)).save(www / "wall.png")
    (www / "text.jpg").write_bytes(b"hello, I am text\n" * 20)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = f"http://127.0.0.1:{server.server_address[1]}"
    pq.write_table(pa.table({"url": [f"{base}/{p}" for p, _, _ in ROWS], "caption": [c for _, c, _ in ROWS],
                             "identity": [i for _, _, i in ROWS]}), root / "urls.parquet")
    out = root / "shards"
    res = subprocess.run([str(img2dataset_exe), "--url_list", str(root / "urls.parquet"), "--input_format", "parquet",
                          "--url_col", "url", "--caption_col", "caption", "--save_additional_columns",
                          '["identity"]', "--output_format", "webdataset", "--output_folder", str(out),
                          "--number_sample_per_shard", "4", "--processes_count", "1", "--thread_count", "1",
                          "--resize_mode", "no", "--retries", "0", "--timeout", "10", "--enable_wandb", "False"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    server.shutdown()
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    return out


def _tar_keys(folder: Path) -> list[str]:
    keys = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


@pytest.fixture(scope="module")
def prepared(downloaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared-from-img2dataset")
    return out, prepare(str(downloaded), str(out), detector="mtcnn", progress=False)


def test_img2dataset_shards_prepare_end_to_end(downloaded, prepared):
    out, manifest = prepared
    inputs = _tar_keys(downloaded)  # what img2dataset stored: 7 of the 9 rows
    assert len(inputs) == 7
    c = manifest["counts"]
    assert c["inputs"] == len(inputs) == c["accepted"] + c["rejected"]
    assert manifest["not_downloaded"]["total"] == 2  # the 404 and the text file, from the parquet indexes
    rejects = read_rejects(out)
    by_caption = {caption: key for key, (_, caption, _) in zip(inputs, [r for r in ROWS if r[0] not in
                                                                        ("missing.jpg", "text.jpg")])}
    assert sorted(rejects.values()) == ["duplicate", "empty_caption", "no_face"]
    # img2dataset stores downloads in the order they complete: of the two copies, the one
    # first in the tar stays
    copies = {f"00000.tar:{by_caption[c]}" for c in ("an astronaut", "the same bytes again")}
    assert [rejects.get(c) for c in sorted(copies)].count("duplicate") == 1
    assert c["rejected_by_reason"] == {"duplicate": 1, "empty_caption": 1, "no_face": 1}
    # one output shard per input shard, named after it; every accepted key once
    assert manifest["shards"] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    samples = read_shards(out)
    assert sorted(s["key"] for s in samples) == sorted(manifest["sources"]) and len(samples) == c["accepted"] == 4
    meta = {s["key"]: json.loads(s["json"]) for s in samples}
    assert manifest["identities"] in ({"astro": 3}, {"astro": 2})  # 2 when p0 lost to its copy
    for s in samples:
        m = meta[s["key"]]
        assert m["url"].endswith(".jpg") and m["source"].startswith("0000")
        assert Image.open(__import__("io").BytesIO(s["ref.png"])).size == (448, 448)
    # SPSV within a shard: p0 and p1 (shard 00000) are each other's reference; p3 (alone
    # in its shard) keeps its own face
    astro = {m["source"]: m["reference_source"] for m in meta.values() if m.get("identity") == "astro"}
    k1, k3 = by_caption["an astronaut, flipped"], by_caption["an astronaut again"]
    kept = next(c for c in sorted(copies) if c not in rejects)  # p0 or its copy (the copy names no identity)
    if kept.endswith(by_caption["an astronaut"]):
        assert astro == {kept: f"00000.tar:{k1}", f"00000.tar:{k1}": kept, f"00001.tar:{k3}": "self"}
    else:  # p0 itself was the duplicate: p1 is alone with its identity in shard 00000
        assert astro == {f"00000.tar:{k1}": "self", f"00001.tar:{k3}": "self"}


def test_rerun_skips_finished_shards_and_redoes_a_missing_one(downloaded, prepared, tmp_path, monkeypatch):
    out, manifest = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    calls = []
    import faceclip_zoo.data.prepare_shards as ps

    original = ps.prepare_shard
    monkeypatch.setattr(ps, "prepare_shard", lambda src, *a: calls.append(Path(src).name) or original(src, *a))
    (copy / "parts" / "00001.json").unlink()  # as if the run died while on shard 00001
    again = prepare(str(downloaded), str(copy), detector="mtcnn", progress=False)
    assert calls == ["00001.tar"]
    for key in ("counts", "identities", "shards", "sources", "not_downloaded"):
        assert again[key] == manifest[key]
    for name in manifest["shards"]:
        assert (copy / name).read_bytes() == (out / name).read_bytes()


def test_a_broken_tar_is_reported_and_what_precedes_the_break_kept(downloaded, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    data = (downloaded / "00000.tar").read_bytes()
    (src / "00000.tar").write_bytes(data[: len(data) * 2 // 3])  # cut inside a later member
    manifest = prepare(str(src), str(tmp_path / "out"), detector="mtcnn", progress=False)
    reasons = manifest["counts"]["rejected_by_reason"]
    assert reasons.get("unreadable_shard") == 1
    lines = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert any(r["reason"] == "unreadable_shard" and "00000.tar" in r["detail"] for r in lines)
    assert manifest["counts"]["accepted"] >= 1  # the samples before the break


def test_two_ranks_write_their_own_shards_equal_to_one_process(downloaded, prepared, tmp_path):
    """Two ranks (Lightning's launcher, DDP over gloo): each takes every other input shard,
    writes its outputs and parts, rank 0 merges; the result equals one process's."""
    one, manifest = prepared
    two = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(_cli("--input", str(downloaded), "--out", str(two), "--detector", "mtcnn", "--devices", "2",
                              "--progress", "false"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "7 inputs: 4 accepted in 3 shard(s), 3 rejected" in res.stdout
    assert "2 rows img2dataset could not download" in res.stdout
    m2 = json.loads((two / "manifest.json").read_text())
    for key in ("counts", "identities", "shards", "sources", "not_downloaded"):
        assert m2[key] == manifest[key], key
    assert (two / "rejects.jsonl").read_bytes() == (one / "rejects.jsonl").read_bytes()
    for name in manifest["shards"]:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert not list(two.rglob("*.tmp*"))


def test_decoding_workers_and_batched_detection_give_the_same_shards(downloaded, prepared, tmp_path):
    """Photos decoded in 2 DataLoader workers beside the detector, and detected 4 at a time
    (detect_batch), give the same accepted samples and rejects; the photos byte for byte,
    the landmarks within float rounding of the batched detector."""
    one, manifest = prepared
    out = tmp_path / "batched"
    again = prepare(str(downloaded), str(out), detector="mtcnn", progress=False, decode_workers=2,
                    detect_batch_size=4)
    for key in ("counts", "identities", "shards", "sources"):
        assert again[key] == manifest[key], key
    assert (out / "rejects.jsonl").read_bytes() == (one / "rejects.jsonl").read_bytes()
    ours, theirs = {s["key"]: s for s in read_shards(out)}, {s["key"]: s for s in read_shards(one)}
    assert ours.keys() == theirs.keys()
    for key, s in ours.items():
        assert s["jpg"] == theirs[key]["jpg"] and s["txt"] == theirs[key]["txt"]
        a, b = json.loads(s["json"]), json.loads(theirs[key]["json"])
        assert abs(np.asarray(a["landmarks"]) - np.asarray(b["landmarks"])).max() <= 0.02
