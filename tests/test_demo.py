"""`demo`: the request logic on SDXL and FLUX pipelines, and the page in a real browser
(headless Debian Chromium driven by Playwright) against a quickstart-architecture pipeline."""

import os
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from faceclip_zoo.demo import DemoSession, Request, build_page, serve
from faceclip_zoo.utils import UserError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
PROMPT = "a photo of a person wearing a red shirt, in front of a blue background, lit from the front"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's notes say: without the background-networking flags Chromium keeps
# trying hosts this closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def session(quickstart_sdxl_dir):
    return DemoSession(str(quickstart_sdxl_dir), device="cpu")


def test_session_shows_the_aligned_crop_and_generates_like_the_pipeline(session, photos):
    from faceclip_zoo.data.align import align_face

    steps = []
    request = Request(prompt=PROMPT, steps=3, seed=5, num_images=2)
    crops, images = session.generate([photos / "astronaut.jpg"], request, lambda i, n: steps.append((i, n)))
    assert session.kind == "SDXL" and session.native_size == 64 and session.multiple == 4
    assert steps == [(1, 3), (2, 3), (3, 3)]
    expected = align_face(str(photos / "astronaut.jpg")).crop
    assert len(crops) == 1 and np.array_equal(np.asarray(crops[0]), expected)  # what the model sees
    assert len(images) == 2 and images[0].size == (64, 64)
    # the same as the pipeline called directly on the photo (aligned by it)
    direct = session.pipe(PROMPT, face_image=str(photos / "astronaut.jpg"), num_inference_steps=3,
                          num_images_per_prompt=2, generator=torch.Generator().manual_seed(5)).images
    assert np.array_equal(np.asarray(direct[1]), np.asarray(images[1]))
    _, text_only = session.generate([], Request(prompt=PROMPT, steps=2))
    assert len(text_only) == 1


@pytest.mark.parametrize("change, message", [
    (dict(steps=0), "steps must be between 1 and 150, got 0"),
    (dict(steps=151), "steps must be between 1 and 150"),
    (dict(guidance=-1.0), "guidance must be between 0 and 30"),
    (dict(num_images=9), "number of images must be between 1 and 4"),
    (dict(seed=-3), "seed must be between 0 and"),
    (dict(height=66), "height must be a multiple of 4 between 4 and 2048 for this SDXL pipeline, got 66"),
    (dict(width=4096), "width must be a multiple of 4"),
    (dict(prompt="  "), "write a prompt"),
])
def test_out_of_range_settings_are_messages(session, photos, change, message):
    request = Request(**{"prompt": PROMPT, **change})
    with pytest.raises(UserError, match=message):
        session.generate([photos / "astronaut.jpg"], request)


def test_bad_uploads_are_messages(session, photos, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match="notes.png is not an image this demo can read"):
        session.generate([tmp_path / "notes.png"], Request(prompt=PROMPT, steps=1))
    with pytest.raises(UserError, match="no face found in wall.png.*aligned face crops"):
        session.generate([photos / "wall.png"], Request(prompt=PROMPT, steps=1))
    # an aligned crop the detector cannot read passes when the visitor says it is one
    crop = tmp_path / "crop.png"
    Image.fromarray(np.full((112, 112, 3), 128, np.uint8)).save(crop)
    crops, images = session.generate([crop], Request(prompt=PROMPT, steps=1, aligned=True))
    assert crops[0].size == (112, 112) and len(images) == 1


def test_flux_pipelines_are_served_too(tmp_path):
    from faceclip_zoo.pipelines.export import save_pipeline
    from faceclip_zoo.tasks.flux import FluxJointModule

    torch.manual_seed(0)
    module = FluxJointModule()
    module.setup("fit")
    folder = save_pipeline(module.pipeline(), tmp_path / "flux")
    flux = DemoSession(str(folder), device="cpu")
    assert flux.kind == "FLUX" and flux.defaults()["guidance"] == 3.5
    assert flux.multiple == 2 * 2 ** (len(flux.pipe.vae.config.block_out_channels) - 1)
    crop = tmp_path / "crop.png"
    Image.fromarray(np.full((112, 112, 3), 128, np.uint8)).save(crop)
    crops, images = flux.generate([crop], Request(prompt=PROMPT, steps=1, aligned=True, guidance=1.0))
    assert len(images) == 1 and images[0].size == (flux.native_size, flux.native_size)
    with pytest.raises(UserError, match=f"height must be a multiple of {flux.multiple}"):
        flux.generate([crop], Request(prompt=PROMPT, height=flux.multiple + 2, aligned=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("needs Debian's chromium (apt-get install chromium); CI installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def demo_url(session):
    page = build_page(session)
    url = serve(page, port=free_port(), block=False)
    yield url
    page.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)  # the suite shares two cores with training runs
    page.goto(url)
    page.wait_for_selector("#generate")
    return page


def upload(page, path):
    """Choose a file in the photos box the way a visitor does (click, file chooser) and wait
    until the page lists it. On a loaded machine the page can show its controls before its
    scripts listen to them: then the click opens no chooser, and only then is it clicked
    again. A file once chosen is never chosen twice (the box appends; a slow upload is
    waited for, not repeated)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(10):
        try:
            with page.expect_file_chooser(timeout=10_000) as chooser:
                page.click("#photos button.upload-container")
        except PlaywrightTimeout:
            continue
        chooser.value.set_files([str(path)])
        # Gradio may split the name over elements: compare the box's text without whitespace
        page.wait_for_function("name => document.querySelector('#photos').innerText"
                               ".replace(/\\s+/g, '').includes(name)", arg=path.name, timeout=240_000)
        return
    raise AssertionError(f"the photos box never opened a file chooser for {path.name}")


def test_browser_uploads_a_face_and_sees_crop_and_image(browser, demo_url, photos):
    page = open_page(browser, demo_url)
    upload(page, photos / "astronaut.jpg")
    page.fill("#prompt textarea", PROMPT)
    page.fill("#steps input", "2")
    page.click("#generate")
    page.wait_for_selector("#images img", timeout=120_000)
    # the aligned crop it used: one crop (Gradio may draw a crop twice, as thumbnail and
    # preview, from the one file: count the files)
    message = page.inner_text("#message")
    assert "Generated 1 image(s) from 1 reference photo(s)" in message, (message, page.inner_text("#photos"))
    crops = {img.get_attribute("src") for img in page.locator("#crops img").all()}
    assert len(crops) == 1, crops
    src = page.locator("#images img").first.get_attribute("src")
    # the image the page shows is the generated PNG, served by the demo
    import io

    body = page.request.get(src).body()
    assert Image.open(io.BytesIO(body)).size == (64, 64)
    page.close()


def test_browser_shows_messages_for_no_face_and_bad_settings(browser, demo_url, photos):
    page = open_page(browser, demo_url)
    upload(page, photos / "wall.png")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#message').innerText.includes('no face found')",
                           timeout=60_000)
    assert "no face found in wall.png" in page.inner_text("#message")
    assert page.locator("#images img").count() == 0
    page.fill("#steps input", "500")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#message').innerText.includes('steps must be')",
                           timeout=60_000)
    assert "Traceback" not in page.content()
    page.close()


@pytest.fixture(scope="module")
def wan_url(tmp_path_factory):
    """The page over a Wan pipeline (tiny, untrained): 5-frame videos of 32 px."""
    from faceclip_zoo.pipelines.export import save_pipeline
    from faceclip_zoo.tasks.wan import WanJointModule

    torch.manual_seed(0)
    module = WanJointModule(sample_frames=5, sample_height=32, sample_width=32)
    module.setup("fit")
    folder = save_pipeline(module.pipeline(), tmp_path_factory.mktemp("wan") / "wan")
    page = build_page(DemoSession(str(folder), device="cpu"))
    url = serve(page, port=free_port(), block=False)
    yield url
    page.close()


def test_browser_plays_a_wan_video_as_its_animated_preview(browser, wan_url, photos):
    """A video pipeline's page: the photo uploaded and aligned as for images, and the video
    shown as an animated GIF the browser plays, every frame of it."""
    import io

    page = open_page(browser, wan_url)
    upload(page, photos / "astronaut.jpg")
    page.fill("#prompt textarea", "a video of a person turning their head to the left")
    page.fill("#steps input", "1")
    page.click("#generate")
    page.wait_for_selector("#images img", timeout=120_000)
    message = page.inner_text("#message")
    assert "Generated 1 video(s), shown as animated previews" in message, message
    assert page.locator("#crops img").count() >= 1
    body = page.request.get(page.locator("#images img").first.get_attribute("src")).body()
    preview = Image.open(io.BytesIO(body))
    assert preview.format == "GIF" and preview.n_frames == 5 and preview.size == (32, 32)
    # the browser decoded it as a 32 x 32 picture (an animated GIF plays in an <img>)
    assert page.evaluate("document.querySelector('#images img').naturalWidth") == 32
    page.close()
