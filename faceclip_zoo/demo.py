"""`python -m faceclip_zoo demo`: a local web page over any exported or converted pipeline.

    pip install -e ".[demo]"
    python -m faceclip_zoo demo --pipeline checkpoints/quickstart-sdxl [--port 7860] [--share false]

Upload one or more photos of one person, write a prompt, press Generate: the page shows the
aligned face crops the model reads (so you see what it sees) and the generated images.
SDXL (FaceCLIPSDXLPipeline) and FLUX (FaceT5FluxPipeline) folders alike; CPU works.

Every problem a visitor can cause (a photo without a face, a file that is not an image, a
setting out of range) is a message in the page, never a traceback. `DemoSession` holds the
logic without Gradio (tests call it directly); `build_page` is the Gradio layout over it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from faceclip_zoo.utils import UserError

log = logging.getLogger(__name__)

# What a visitor may ask for: wide enough for real use, small enough that one request
# cannot hold the machine for hours.
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_IMAGES = 4
MAX_SIDE = 2048
MAX_SEED = 2**32 - 1
DEMO_STEPS = 30  # the release uses 50; a page visitor waits for every one of them

ProgressFn = Callable[[int, int], None]


@dataclass
class Request:
    prompt: str
    negative_prompt: str | None = None  # None: the release's negative text for the model
    steps: int = DEMO_STEPS
    guidance: float | None = None  # None: the pipeline's (SDXL: stored, else 5.0; FLUX true CFG 3.5)
    seed: int = 0
    height: int | None = None  # None: the model's native size
    width: int | None = None
    num_images: int = 1
    aligned: bool = False  # the uploads are aligned crops already (e.g. synthetic faces)


class DemoSession:
    """One pipeline, loaded once, serving requests one at a time."""

    def __init__(self, pipeline: str, device: str = "auto", dtype: str = "auto"):
        from faceclip_zoo.generate import open_pipeline

        self.pipeline_dir = str(pipeline)
        self.pipe = open_pipeline(pipeline, device, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.kind = self.pipe.FAMILY
        self.native_size = self.pipe.default_size()
        self.multiple = self.pipe.size_multiple()
        # a video family's results are shown as animated previews (GIF files, which browsers play)
        self.video = self.pipe.OUTPUT == "frames"
        self._previews = None
        self._lock = threading.Lock()  # one generation at a time on the one pipeline

    def defaults(self) -> dict:
        """The pipeline's own guidance (shown as the slider's start): the folder's stored
        default (its recipe's, else the release's: SDXL 5.0, FLUX's true CFG 3.5)."""
        return {"guidance": self.pipe.default_guidance, "size": self.native_size}

    def check(self, request: Request) -> None:
        """Settings out of range -> UserError naming the setting and its range."""
        if not request.prompt or not request.prompt.strip():
            raise UserError("write a prompt")
        if not 1 <= request.steps <= MAX_STEPS:
            raise UserError(f"steps must be between 1 and {MAX_STEPS}, got {request.steps}")
        if request.guidance is not None and not 0.0 <= request.guidance <= MAX_GUIDANCE:
            raise UserError(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {request.guidance:g}")
        if not 1 <= request.num_images <= MAX_IMAGES:
            raise UserError(f"number of images must be between 1 and {MAX_IMAGES}, got {request.num_images}")
        if not 0 <= request.seed <= MAX_SEED:
            raise UserError(f"seed must be between 0 and {MAX_SEED}, got {request.seed}")
        for name in ("height", "width"):
            side = getattr(request, name)
            if side is None:
                continue
            if not self.multiple <= side <= MAX_SIDE or side % self.multiple:
                raise UserError(f"{name} must be a multiple of {self.multiple} between {self.multiple} and "
                                f"{MAX_SIDE} for this {self.kind} pipeline, got {side}")

    def align(self, photos: Sequence[str | os.PathLike], aligned: bool) -> list[Image.Image]:
        """Uploaded files -> the aligned face crops the encoder reads (as `generate` aligns)."""
        from faceclip_zoo.pipelines.faces import auto_align, to_pil

        crops = []
        for photo in photos:
            name = Path(photo).name
            try:
                image = to_pil(photo)
            except UserError:
                raise UserError(f"{name} is not an image this demo can read: upload a JPEG, PNG or WebP "
                                "photo") from None
            if aligned:
                crops.append(image)
                continue
            image.filename = name
            try:
                crops.append(auto_align(image, "auto"))
            except UserError:
                raise UserError(f"no face found in {name}: upload a photo in which one face is clearly "
                                "visible, or tick \"the photos are aligned face crops\" if they are crops "
                                "already (the synthetic faces are)") from None
        return crops

    def generate(self, photos: Sequence[str | os.PathLike], request: Request,
                 progress: ProgressFn | None = None) -> tuple[list[Image.Image], list]:
        """Photos of one person (none: an image without a face) + request -> (crops, images;
        for a video pipeline the paths of the videos' animated GIF previews)."""
        self.check(request)
        crops = self.align(photos, request.aligned) if photos else []

        def on_step(pipe, step, timestep, kwargs):
            if progress is not None:
                progress(step + 1, request.steps)
            return kwargs

        with self._lock:
            images = self.pipe(
                request.prompt, face_image=crops or None, negative_prompt=request.negative_prompt,
                num_inference_steps=request.steps, height=request.height, width=request.width,
                num_images_per_prompt=request.num_images,
                generator=torch.Generator().manual_seed(request.seed), align="never",
                callback_on_step_end=on_step, **self.pipe.guidance_arguments(request.guidance),
            )
        images = getattr(images, self.pipe.OUTPUT)
        if self.video:
            images = [str(self.preview(frames, request.seed, i)) for i, frames in enumerate(images)]
        return crops, images

    def preview(self, frames: list[Image.Image], seed: int, index: int) -> Path:
        """A generated video as an animated GIF in this session's temporary folder."""
        import tempfile

        from faceclip_zoo.data.video import write_preview
        from faceclip_zoo.pipelines.defaults import WAN_FPS

        if self._previews is None:
            self._previews = Path(tempfile.mkdtemp(prefix="faceclip-zoo-demo-"))
        return write_preview(frames, self._previews / f"seed{seed}-{index}-{len(list(self._previews.iterdir()))}.gif",
                             WAN_FPS)


def as_int(value, name: str) -> int | None:
    """A number field's value -> int (whole numbers only); empty -> None."""
    if value is None or value == "":
        return None
    if float(value) != int(float(value)):
        raise UserError(f"{name} must be a whole number, got {value}")
    return int(float(value))


def build_page(session: DemoSession):
    """The Gradio page over a DemoSession."""
    import gradio as gr

    defaults = session.defaults()
    name = Path(session.pipeline_dir).name

    def run(files, prompt, negative, steps, guidance, seed, height, width, num_images, aligned,
            progress=gr.Progress()):
        try:
            request = Request(
                prompt=prompt, negative_prompt=None if negative is None or not negative.strip() else negative,
                steps=as_int(steps, "steps"), guidance=None if guidance is None else float(guidance),
                seed=as_int(seed, "seed"), height=as_int(height, "height"), width=as_int(width, "width"),
                num_images=as_int(num_images, "number of images"), aligned=bool(aligned))
            paths = [f if isinstance(f, str) else f.name for f in (files or [])]
            crops, images = session.generate(
                paths, request, lambda i, n: progress((i, n), desc="denoising", unit="steps"))
        except UserError as exc:
            return None, None, f"**Cannot generate:** {exc}"
        except Exception as exc:  # a visitor sees one line; the console keeps the traceback
            log.exception("demo request failed")
            return None, None, f"**Generation failed:** {type(exc).__name__}: {exc}"
        who = f"{len(crops)} reference photo(s)" if crops else "no face (text only)"
        what = "video(s), shown as animated previews" if session.video else "image(s)"
        return crops or None, images, f"Generated {len(images)} {what} from {who}, seed {request.seed}."

    with gr.Blocks(title=f"faceclip_zoo demo: {name}") as page:
        gr.Markdown(f"## faceclip_zoo: {name} ({session.kind})\n"
                    "Upload photos of **one** person, write a prompt, press **Generate**.")
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Photos of the person", file_count="multiple", file_types=["image"],
                                elem_id="photos")
                aligned = gr.Checkbox(label="the photos are aligned face crops", value=False, elem_id="aligned")
                prompt = gr.Textbox(label="Prompt", value="a photo of a person", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt (empty: the release's)", lines=2,
                                      elem_id="negative")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=DEMO_STEPS, precision=0, elem_id="steps")
                    guidance = gr.Slider(0.0, MAX_GUIDANCE, value=defaults["guidance"], step=0.5,
                                         label="Guidance", elem_id="guidance")
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                with gr.Row():
                    height = gr.Number(label="Height", value=defaults["size"], precision=0, elem_id="height")
                    width = gr.Number(label="Width", value=defaults["size"], precision=0, elem_id="width")
                    num_images = gr.Number(label="Images", value=1, precision=0, elem_id="num_images")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                message = gr.Markdown(elem_id="message")
                crops = gr.Gallery(label="Aligned face crops (what the model sees)", format="png", columns=4,
                                   fit_columns=False, height=190, object_fit="contain", preview=False,
                                   elem_id="crops")
                images = gr.Gallery(label="Generated", format="png", columns=4, fit_columns=False, height="auto",
                                    object_fit="contain", preview=False, elem_id="images")
        button.click(run, [files, prompt, negative, steps, guidance, seed, height, width, num_images, aligned],
                     [crops, images, message])
    return page


def check_port(host: str, port: int) -> None:
    """The address can be served on: a port in range that nothing else holds."""
    import socket

    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"--port {port} on --host {host} cannot be served on ({exc.strerror}); "
                            "choose another --port") from None


def serve(page, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True):
    """Run a page in Gradio's queue (one generation at a time: one pipeline, one device).
    block=False returns once the server is up (tests); returns the page's address."""
    page.queue(default_concurrency_limit=1)
    _, url, _ = page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                            quiet=not block)
    return url


def demo(pipeline: str, port: int = 7860, host: str = "127.0.0.1", share: bool = False,
         device: str = "auto", dtype: str = "auto") -> None:
    """Serve the demo page for a pipeline folder until interrupted.

    Args:
        pipeline: an exported or converted pipeline folder (SDXL or FLUX).
        port: the port to serve on.
        host: the address to listen on (127.0.0.1: this machine only).
        share: ask Gradio for a public share link (needs internet).
        device: cpu, cuda, cuda:1, ... (auto: cuda when present).
        dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError('the demo needs Gradio: pip install -e ".[demo]"') from None
    check_port(host, port)  # before the pipeline loads (minutes at real size)
    serve(build_page(DemoSession(pipeline, device, dtype)), host, port, share)
