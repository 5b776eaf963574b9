"""Face detection + 5-point alignment on real photos (skimage's astronaut; the release's
aligned crops in ../shared/data/faces/) and image reading of hostile files."""

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_FACES
from faceclip_zoo.data.align import align_face, arcface_template, pose_of, sharpness, template_deviation
from faceclip_zoo.data.detect import build_detector
from faceclip_zoo.data.images import ImageRejected, as_rgb_array, load_image
from faceclip_zoo.utils import UserError


@pytest.fixture(scope="module")
def detector():
    return build_detector("mtcnn")


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return data.astronaut()


def shared_faces():
    if not SHARED_FACES.is_dir():
        pytest.skip(f"{SHARED_FACES} is absent (real aligned test faces live outside the repository)")
    paths = sorted(SHARED_FACES.glob("*.png"))
    assert len(paths) == 4
    return {p.name: np.asarray(Image.open(p).convert("RGB")) for p in paths}


def test_astronaut_aligned_crop_puts_landmarks_on_the_template(detector, astronaut):
    aligned = align_face(astronaut, detector)
    assert aligned.crop.shape == (448, 448, 3) and aligned.crop.dtype == np.uint8
    assert aligned.num_faces == 1 and aligned.score > 0.99
    # Detected again on our crop, the landmarks call for (almost) no further alignment.
    again = align_face(aligned.crop, detector)
    assert template_deviation(again.source_landmarks).max() < 4.0
    # The landmarks carried into the crop are where the similarity fit puts them: within
    # the template's reach of the astronaut's face shape (she smiles, looking up a little).
    assert np.linalg.norm(aligned.landmarks - arcface_template(448), axis=1).mean() < 25
    # and the face is upright: eyes above the nose above the mouth
    lm = aligned.landmarks
    assert lm[0, 1] < lm[2, 1] < lm[3, 1] and lm[0, 0] < lm[1, 0]


def test_release_crops_are_realigned_like_the_release(detector):
    for name, rgb in shared_faces().items():
        face = detector.detect(rgb)[0]
        # How far our alignment would move the template points of an already aligned
        # crop: our detector (MTCNN) against the release's (insightface), 448 px crop.
        assert template_deviation(face.landmarks).mean() < 9.0, name
        again = align_face(align_face(rgb, detector).crop, detector)
        assert template_deviation(again.source_landmarks).max() < 4.0, name


def test_112_crop_is_the_448_crop_resized(detector, astronaut):
    big = align_face(astronaut, detector, size=448).crop
    small = align_face(astronaut, detector, size=112).crop
    down = np.asarray(Image.fromarray(big).resize((112, 112), Image.BILINEAR), dtype=np.float32)
    assert np.abs(down - small.astype(np.float32)).mean() < 8.0


def test_no_face_is_a_clear_rejection(detector):
    blank = np.full((256, 256, 3), 127, np.uint8)
    with pytest.raises(ImageRejected, match="no face detected") as info:
        align_face(blank, detector)
    assert info.value.reason == "no_face"


def test_pose_and_sharpness_measures(detector, astronaut):
    assert pose_of(arcface_template(448)) == pytest.approx({"yaw": 0.0, "pitch": 0.0}, abs=0.02)
    turned = arcface_template(448).copy()
    turned[2, 0] += 70  # nose in line with an eye: a head in profile
    assert pose_of(turned)["yaw"] > 0.8
    crop = align_face(astronaut, detector).crop
    import cv2

    blurred = cv2.GaussianBlur(crop, (0, 0), 10)  # 2.5 px at the 112 px measuring scale
    assert sharpness(crop) > 100 > 15 > sharpness(blurred)


def test_unknown_detector_and_missing_pack_are_clear():
    with pytest.raises(UserError, match="unknown face detector"):
        build_detector("yolo")
    with pytest.raises(UserError, match="model pack folder not found"):
        build_detector("insightface", model_dir="/nonexistent/buffalo_l")


def test_insightface_detector_feeds_bgr_and_reads_kps(monkeypatch, tmp_path):
    """The SCRFD pack cannot be downloaded here; check our adapter's contract with
    FaceAnalysis (BGR input, bbox/kps/det_score output) on a stand-in."""
    import insightface.app

    seen = {}

    class FakeFace:
        bbox = np.array([10, 20, 110, 140], np.float32)
        kps = arcface_template(112) + 10
        det_score = 0.97

    class FakeAnalysis:
        def __init__(self, name, allowed_modules=None, **kw):
            seen["name"], seen["modules"] = name, allowed_modules

        def prepare(self, ctx_id, det_thresh, det_size):
            seen["ctx"] = ctx_id

        def get(self, bgr):
            seen["pixel"] = bgr[0, 0].tolist()
            return [FakeFace()]

    monkeypatch.setattr(insightface.app, "FaceAnalysis", FakeAnalysis)
    (tmp_path / "det_10g.onnx").write_bytes(b"stand-in")
    det = build_detector("auto", model_dir=str(tmp_path))
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200  # red
    faces = det.detect(rgb)
    assert det.name == "insightface" and seen["modules"] == ["detection"] and seen["ctx"] == -1
    assert seen["pixel"] == [0, 0, 200]  # BGR
    assert faces[0].score == pytest.approx(0.97) and faces[0].landmarks.shape == (5, 2)


# ---------------------------------------------------------------- image reading
def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_image_modes_become_8bit_rgb(tmp_path, astronaut):
    rgb = Image.fromarray(astronaut)
    grey16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    cases = {
        "cmyk.jpg": _save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg"),
        "grey16.png": _save(Image.fromarray(grey16), tmp_path / "grey16.png"),
        "grey.png": _save(rgb.convert("L"), tmp_path / "grey.png"),
        "alpha.png": _save(rgb.convert("RGBA"), tmp_path / "alpha.png"),
        "palette.png": _save(rgb.convert("P"), tmp_path / "palette.png"),
    }
    for name, path in cases.items():
        loaded = load_image(path)
        assert loaded.rgb.shape == (512, 512, 3) and loaded.rgb.dtype == np.uint8, name
        assert 60 < loaded.rgb.mean() < 200, name  # scaled, not clipped to white or black
    grey = load_image(cases["grey.png"]).rgb[..., 0].astype(int)
    assert np.abs(load_image(cases["grey16.png"]).rgb[..., 0].astype(int) - grey).max() <= 1


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:32, :, 3] = 255  # top half opaque red, bottom half transparent
    arr = load_image(_save(Image.fromarray(rgba), tmp_path / "a.png")).rgb
    assert arr[0, 0].tolist() == [255, 0, 0] and arr[-1, -1].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path, astronaut):
    sideways = Image.fromarray(astronaut).transpose(Image.ROTATE_90)  # stored rotated...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...and tagged "rotate 90 CW to display"
    path = _save(sideways, tmp_path / "exif.jpg", exif=exif, quality=95)
    loaded = load_image(path)
    assert np.abs(loaded.rgb.astype(int) - astronaut.astype(int)).mean() < 6


def _bomb_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("name,content,reason", [
    ("empty.jpg", b"", "empty_file"),
    ("text.jpg", b"this is not a picture\n" * 10, "not_an_image"),
    ("bomb.png", _bomb_png(20000, 20000), "too_many_pixels"),
    ("big.png", _bomb_png(9000, 9000), "too_many_pixels"),  # over our limit, under PIL's error
])
def test_hostile_files_are_rejected_with_reasons(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageRejected) as info:
        load_image(str(path))
    assert info.value.reason == reason and name in info.value.detail


def test_truncated_and_corrupt_files(tmp_path, astronaut):
    good_jpg = _save(Image.fromarray(astronaut), tmp_path / "good.jpg")
    good_png = _save(Image.fromarray(astronaut), tmp_path / "good.png")
    for src, name in ((good_jpg, "cut.jpg"), (good_png, "cut.png")):
        data = open(src, "rb").read()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    data = bytearray(open(good_jpg, "rb").read())
    data[200:4000] = bytes(range(256)) * 14 + bytes(200)  # garbage inside the entropy-coded data
    (tmp_path / "garbled.jpg").write_bytes(bytes(data[:6000]))
    for name in ("cut.jpg", "cut.png", "garbled.jpg"):
        with pytest.raises(ImageRejected) as info:
            load_image(str(tmp_path / name))
        assert info.value.reason == "corrupt_image", name


def test_as_rgb_array_accepts_common_forms(astronaut):
    assert as_rgb_array(Image.fromarray(astronaut)).shape == (512, 512, 3)
    assert as_rgb_array(astronaut.astype(np.float32) / 255).dtype == np.uint8
    assert as_rgb_array(astronaut[..., 0]).shape == (512, 512, 3)
