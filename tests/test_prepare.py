"""`prepare`: hostile collections end in shards + a rejects file with precise reasons,
accepted + rejected = inputs, tables and references, SPSV, idempotent re-runs, and
kill -9 in the middle of a run."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from faceclip_zoo.prepare import Filters, prepare
from faceclip_zoo.utils import UserError


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return data.astronaut()


def _photo(astronaut, variant: int) -> Image.Image:
    """A distinct photo of the same face (other bytes, same person)."""
    arr = astronaut.astype(np.int16) + (variant * 7) % 40 - 20
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if variant % 2 else img


def _write(path: Path, caption: bytes | str | None, image: Image.Image | bytes, **save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode("utf-8"))


def _numbered_photos(folder: Path, astronaut, n: int, first_variant: int) -> Path:
    """p00.jpg .. p<n-1>.jpg: distinct photos of one face, each with its caption."""
    for i in range(n):
        _write(folder / f"p{i:02d}.jpg", f"photo {i}", _photo(astronaut, i + first_variant), quality=90)
    return folder


def _bomb_png(width: int, height: int) -> bytes:
    from test_align import _bomb_png as bomb

    return bomb(width, height)


def read_shards(out: Path) -> list[dict]:
    samples = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [dict(key=k, **v) for k, v in samples.items()]


def read_rejects(out: Path) -> dict[str, str]:
    lines = (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["source"]: json.loads(line)["reason"] for line in lines}


# ---------------------------------------------------------------- the hostile folder
EXPECTED_REJECTS = {
    "good_copy.jpg": "duplicate",
    "cut.jpg": "corrupt_image",
    "cut.png": "corrupt_image",
    "garbled.jpg": "corrupt_image",
    "text.jpg": "not_an_image",
    "empty.png": "empty_file",
    "bomb.png": "too_many_pixels",
    "latin1 caption.jpg": "caption_not_utf8",
    "blank caption.jpg": "empty_caption",
    "no caption.jpg": "missing_caption",
    "tiny.jpg": "image_too_small",
    "small face.jpg": "face_too_small",
    "grey wall.png": "no_face",
    "notes.md": "unsupported_format",  # every path counted: a file of another format is a reject
}
EXPECTED_ACCEPTED = ["cmyk.jpg", "exif rotated.jpg", "good.jpg", "grey.png", "grey16.png", "rgba.png",
                     "ünïcode 写真/фото 1.png"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, astronaut):
    root = tmp_path_factory.mktemp("hostile") / "photos in here"
    good = Image.fromarray(astronaut)
    _write(root / "good.jpg", "an astronaut in front of a flag", good, quality=95)
    _write(root / "good_copy.jpg", "the same file again", (root / "good.jpg").read_bytes())
    _write(root / "ünïcode 写真" / "фото 1.png", "ユニコード caption ✓", _photo(astronaut, 1))
    _write(root / "cmyk.jpg", "cmyk", _photo(astronaut, 2).convert("CMYK"))
    grey = np.asarray(_photo(astronaut, 3).convert("L"))
    _write(root / "grey.png", "grey", Image.fromarray(grey))
    _write(root / "grey16.png", "16 bit", Image.fromarray(grey.astype(np.uint16) * 257 + 3))
    _write(root / "rgba.png", "alpha", _photo(astronaut, 4).convert("RGBA"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; "rotate 90 CW to display"
    _write(root / "exif rotated.jpg", "exif", _photo(astronaut, 6).transpose(Image.ROTATE_90), exif=exif,
           quality=95)
    data = (root / "good.jpg").read_bytes()
    _write(root / "cut.jpg", "truncated", data[: len(data) // 2])
    png = (root / "grey.png").read_bytes()
    _write(root / "cut.png", "truncated", png[: len(png) // 2])
    garbled = bytearray(data[:6000])
    garbled[200:4000] = bytes(range(256)) * 14 + bytes(200)
    _write(root / "garbled.jpg", "garbled", bytes(garbled))
    _write(root / "text.jpg", "not a picture", b"hello, I am text\n" * 20)
    _write(root / "empty.png", "zero bytes", b"")
    _write(root / "bomb.png", "decompression bomb", _bomb_png(20000, 20000))
    _write(root / "latin1 caption.jpg", "caf\xe9 au lait".encode("latin-1"), _photo(astronaut, 8))
    _write(root / "blank caption.jpg", "  \n\t ", _photo(astronaut, 9))
    _write(root / "no caption.jpg", None, _photo(astronaut, 10))
    _write(root / "tiny.jpg", "tiny", good.resize((96, 96)))
    _write(root / "small face.jpg", "face of 40 px", good.resize((256, 256)))
    _write(root / "grey wall.png", "no face", Image.new("RGB", (320, 240), (128, 128, 128)))
    (root / "notes.md").write_text("not a photo format: a reject with its reason")
    return root


@pytest.fixture(scope="module")
def hostile_run(hostile, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare(str(hostile), str(out), detector="mtcnn", samples_per_shard=4, progress=False)
    return out, manifest


def test_every_input_is_accepted_or_rejected_with_its_reason(hostile_run):
    out, manifest = hostile_run
    c = manifest["counts"]
    assert c["inputs"] == len(EXPECTED_REJECTS) + len(EXPECTED_ACCEPTED) == c["accepted"] + c["rejected"]
    assert read_rejects(out) == EXPECTED_REJECTS
    sources = sorted(s["source"] for s in manifest["sources"].values())
    assert sources == sorted(EXPECTED_ACCEPTED)
    assert c["rejected_by_reason"]["corrupt_image"] == 3
    details = [json.loads(line)["detail"] for line in (out / "rejects.jsonl").read_text("utf-8").splitlines()]
    assert any("400000000 pixels" in d and "not decoded" in d for d in details), details  # from the header


def test_shards_hold_each_accepted_photo_once_with_aligned_faces(hostile_run):
    out, manifest = hostile_run
    samples = read_shards(out)
    assert len(samples) == len(EXPECTED_ACCEPTED) and len({s["key"] for s in samples}) == len(samples)
    assert manifest["shards"] == ["shard-00000.tar", "shard-00001.tar"]
    by_source = {}
    for s in samples:
        meta = json.loads(s["json"])
        by_source[meta["source"]] = s
        assert Image.open(__import__("io").BytesIO(s["ref.png"])).size == (448, 448)
        assert meta["reference_source"] == "self" and meta["num_faces"] == 1
    assert by_source["ünïcode 写真/фото 1.png"]["txt"].decode() == "ユニコード caption ✓"
    # the EXIF-rotated photo is stored and aligned upright: its face matches the plain photo's
    import io

    def face(name):
        return np.asarray(Image.open(io.BytesIO(by_source[name]["ref.png"])).convert("L"), dtype=np.float32)

    exif_meta = json.loads(by_source["exif rotated.jpg"]["json"])
    assert exif_meta["original_size"] == [512, 512]
    lm = np.array(exif_meta["landmarks"])
    assert lm[0, 1] < lm[2, 1] < lm[3, 1]  # eyes above nose above mouth: upright
    assert np.abs(face("exif rotated.jpg") - face("good.jpg")).mean() < 25  # same face, brighter
    assert np.abs(face("exif rotated.jpg") - np.rot90(face("good.jpg"))).mean() > 40


def test_manifest_describes_the_run(hostile_run):
    _, manifest = hostile_run
    assert manifest["detector"]["name"] == "mtcnn" and manifest["versions"]["facenet-pytorch"]
    assert manifest["options"]["filters"]["min_face_size"] == 64
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"].values())


def test_rerun_is_idempotent_and_does_no_work(hostile, hostile_run, monkeypatch):
    out, manifest = hostile_run
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    import faceclip_zoo.prepare as prep

    monkeypatch.setattr(prep, "process_record", lambda *a, **k: pytest.fail("re-processed a finished input"))
    again = prepare(str(hostile), str(out), detector="mtcnn", samples_per_shard=4, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before
    assert again["counts"] == manifest["counts"]


# ---------------------------------------------------------------- filters, one by one
@pytest.fixture(scope="module")
def one_face(tmp_path_factory, astronaut):
    root = tmp_path_factory.mktemp("one")
    _write(root / "a.jpg", "a", Image.fromarray(astronaut), quality=95)
    _write(root / "twins.jpg", "two people", Image.fromarray(np.concatenate([astronaut, astronaut[:, ::-1]], 1)))
    return root


@pytest.mark.parametrize("filters,reasons", [
    (Filters(max_yaw=0.0), {"a.jpg": "extreme_pose", "twins.jpg": "extreme_pose"}),
    (Filters(min_score=1.01), {"a.jpg": "low_score", "twins.jpg": "low_score"}),
    (Filters(min_sharpness=1e6), {"a.jpg": "blurry", "twins.jpg": "blurry"}),
    (Filters(multiple_faces="reject"), {"twins.jpg": "several_faces"}),
])
def test_each_filter_rejects_with_its_reason(one_face, tmp_path, filters, reasons):
    manifest = prepare(str(one_face), str(tmp_path), detector="mtcnn", filters=filters, progress=False)
    assert read_rejects(tmp_path) == reasons
    assert manifest["counts"]["accepted"] == 2 - len(reasons)


# ---------------------------------------------------------------- tables and references
@pytest.fixture(scope="module")
def people(tmp_path_factory, astronaut):
    root = tmp_path_factory.mktemp("people")
    for i in range(3):
        _photo(astronaut, i).save(root / f"anna {i}.jpg", quality=95)
    _photo(astronaut, 5).save(root / "bob.jpg", quality=95)
    rows = [{"image": f"anna {i}.jpg", "caption": f"anna photo {i}", "identity": "anna"} for i in range(3)]
    rows.append({"image": "bob.jpg", "caption": "bob", "identity": "bob"})
    rows.append({"image": "missing.jpg", "caption": "gone", "identity": "bob"})
    rows.append({"image": "bob.jpg", "caption": "", "identity": "bob"})
    return root, rows


def _check_people(out: Path, manifest: dict) -> None:
    assert manifest["counts"]["inputs"] == 6 and manifest["counts"]["accepted"] == 4
    assert sorted(read_rejects(out).values()) == ["empty_caption", "missing_file"]
    assert manifest["identities"] == {"anna": 3, "bob": 1}
    refs = {json.loads(s["json"])["source"]: json.loads(s["json"])["reference_source"] for s in read_shards(out)}
    annas = {k: v for k, v in refs.items() if "anna" in k}
    # SPSV: each of anna's photos takes its face from another of her photos, each used once
    assert all(v != "self" and v != k for k, v in annas.items()) and len(set(annas.values())) == 3
    assert [v for k, v in refs.items() if "bob" in k] == ["self"]  # one photo: its own face


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_tables_with_identities_give_spsv_references(people, tmp_path, fmt):
    root, rows = people
    table = root / f"people.{fmt}"
    if fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "csv":
        import csv

        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption", "identity"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    manifest = prepare(str(table), str(tmp_path), detector="mtcnn", progress=False)
    _check_people(tmp_path, manifest)


def test_bad_table_rows_and_columns(people, tmp_path):
    root, _ = people
    table = root / "bad.jsonl"
    table.write_bytes(b'{"image": "bob.jpg", "caption": "ok"}\nnot json\n[1, 2]\n{"caption": "no image"}\n'
                      b'{"image": "anna 0.jpg", "caption": "\xff\xfe"}\n')
    manifest = prepare(str(table), str(tmp_path), detector="mtcnn", progress=False)
    assert manifest["counts"] == {"inputs": 5, "accepted": 1, "rejected": 4, "rejected_by_reason": {
        "bad_record": 3, "caption_not_utf8": 1}}
    wrong = root / "wrong.csv"
    wrong.write_text("path,text\nbob.jpg,hi\n")
    with pytest.raises(UserError, match="no column 'image', 'caption'.*image_column"):
        prepare(str(wrong), str(tmp_path / "w"), progress=False)
    with pytest.raises(UserError, match="input not found"):
        prepare(str(root / "nope"), str(tmp_path / "w"), progress=False)


def test_explicit_reference_column_and_references_folder(people, tmp_path, astronaut):
    root, _ = people
    table = root / "refs.jsonl"
    table.write_text(json.dumps({"image": "bob.jpg", "caption": "bob", "identity": "bob",
                                 "reference": "anna 1.jpg"}) + "\n" +
                     json.dumps({"image": "anna 0.jpg", "caption": "anna", "identity": "anna"}) + "\n")
    refs = tmp_path / "refs"
    (refs / "anna").mkdir(parents=True)
    (refs / "carl").mkdir()
    _photo(astronaut, 7).save(refs / "anna" / "extra.jpg")
    jpg = (root / "bob.jpg").read_bytes()
    (refs / "carl" / "broken.jpg").write_bytes(jpg[: len(jpg) // 3])
    manifest = prepare(str(table), str(tmp_path / "out"), references=str(refs), detector="mtcnn", progress=False)
    refs_of = {json.loads(s["json"])["source"]: json.loads(s["json"])["reference_source"]
               for s in read_shards(tmp_path / "out")}
    assert refs_of == {"refs.jsonl:line 1 (bob.jpg)": "explicit",
                       "refs.jsonl:line 2 (anna 0.jpg)": "references/anna/extra.jpg"}
    assert manifest["counts"]["inputs"] == 2 and manifest["counts"]["accepted"] == 2
    assert manifest["references"]["inputs"] == 2 and manifest["references"]["rejected"] == 1
    assert read_rejects(tmp_path / "out") == {"references/carl/broken.jpg": "corrupt_image"}


# ---------------------------------------------------------------- the command, and kill -9
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "faceclip_zoo", "prepare", *args]


def test_recipe_parses_and_runs_from_the_command_line(one_face, tmp_path):
    recipe = REPO / "recipes" / "prepare" / "default.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(_cli("--config", str(recipe), "--input", str(one_face), "--out", str(tmp_path),
                              "--detector", "mtcnn", "--filters.multiple_faces", "reject", "--progress", "false"),
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 inputs: 1 accepted in 1 shard(s), 1 rejected {'several_faces': 1}" in res.stdout
    res = subprocess.run(_cli("--input", str(tmp_path / "absent"), "--out", str(tmp_path)), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "input not found" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_keeps_each_sample_exactly_once(tmp_path, astronaut):
    n = 11
    photos = _numbered_photos(tmp_path / "photos", astronaut, n, first_variant=11)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = _cli("--input", str(photos), "--out", str(out), "--detector", "mtcnn", "--workers", "2",
               "--samples_per_shard", "5")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while len(list((out / ".work").glob("*.json")) if (out / ".work").is_dir() else []) < 3:
        assert proc.poll() is None, "prepare finished before it could be killed"
        assert time.time() < deadline, "prepare made no progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and both workers, mid-write
    proc.wait()
    done = len(list((out / ".work").glob("*.json")))
    assert 3 <= done < n and not (out / "manifest.json").exists()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    samples = read_shards(out)
    sources = sorted(json.loads(s["json"])["source"] for s in samples)
    assert sources == [f"p{i:02d}.jpg" for i in range(n)]  # each exactly once, none lost
    assert not list(out.rglob("*.tmp*"))  # no debris of the killed run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["accepted"] == n and len(manifest["shards"]) == 3


# ---------------------------------------------------------------- on several processes
def _manifest_facts(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {k: m[k] for k in ("counts", "references", "identities", "shards", "sources")}


def test_two_processes_give_the_one_process_result(hostile, hostile_run, tmp_path):
    """Two ranks launched as `fit` is launched (recipes/launch/torchrun.sh, COMMAND=prepare;
    Lightning's DDP over gloo): the same accepted keys, byte-identical shards, the same
    rejects with the same reasons as one process."""
    one, _ = hostile_run
    two = tmp_path / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COMMAND": "prepare", "GPUS_PER_NODE": "2",
           "NNODES": "1", "NODE_RANK": "0", "MASTER_PORT": str(30500 + os.getpid() % 1000)}
    res = subprocess.run(["bash", "recipes/launch/torchrun.sh", "recipes/prepare/default.yaml", "--input",
                          str(hostile), "--out", str(two), "--detector", "mtcnn", "--devices", "2",
                          "--samples_per_shard", "4", "--progress", "false"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{len(EXPECTED_REJECTS) + len(EXPECTED_ACCEPTED)} inputs: {len(EXPECTED_ACCEPTED)} accepted" in res.stdout
    assert _manifest_facts(two) == _manifest_facts(one)
    assert (two / "rejects.jsonl").read_bytes() == (one / "rejects.jsonl").read_bytes()
    shards = sorted(p.name for p in one.glob("shard-*.tar"))
    assert shards == sorted(p.name for p in two.glob("shard-*.tar"))
    for name in shards:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert not list(two.rglob("*.tmp*"))


@pytest.mark.slow
def test_kill_9_of_one_rank_then_rerun_keeps_each_photo_exactly_once(tmp_path, astronaut):
    """Two ranks; rank 1 is killed (SIGKILL) mid-run, the job with it (as a scheduler ends
    a job whose task died); the same command again finishes the work: every photo exactly
    once, no temporary debris, the one-process result."""
    n = 10
    photos = _numbered_photos(tmp_path / "photos", astronaut, n, first_variant=31)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = _cli("--input", str(photos), "--out", str(out), "--detector", "mtcnn", "--devices", "2",
               "--samples_per_shard", "5", "--progress", "false")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while len(list((out / ".work").glob("*.json")) if (out / ".work").is_dir() else []) < 3:
        assert proc.poll() is None, "prepare finished before a rank could be killed"
        assert time.time() < deadline, "prepare made no progress"
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "Lightning started no second rank"
    os.kill(int(children[0]), signal.SIGKILL)  # rank 1, mid-write
    try:
        proc.wait(timeout=120)  # rank 0 finds its peer gone at the closing barrier
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # nothing left when rank 0 ended the job itself
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the job
    proc.wait()
    done = len(list((out / ".work").glob("*.json")))
    assert done < n and not (out / "manifest.json").exists()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    sources = sorted(json.loads(s["json"])["source"] for s in read_shards(out))
    assert sources == [f"p{i:02d}.jpg" for i in range(n)]  # each exactly once, none lost
    assert not list(out.rglob("*.tmp*"))
    single = tmp_path / "single"
    prepare(str(photos), str(single), detector="mtcnn", samples_per_shard=5, progress=False)
    assert _manifest_facts(out) == _manifest_facts(single)
    for shard in sorted(single.glob("shard-*.tar")):
        assert (out / shard.name).read_bytes() == shard.read_bytes()
