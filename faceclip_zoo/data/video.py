"""Video files through PyAV (FFmpeg's libraries, shipped in its wheel): MP4 written by
`generate` for the video families, with an animated GIF preview beside it, and frames
read back (tests, `prepare` of short videos)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from faceclip_zoo.utils import UserError


def _even(side: int) -> int:
    return side + side % 2  # H.264 in yuv420p needs even sides


def write_mp4(frames: Sequence[Image.Image], path: str | os.PathLike, fps: int = 16) -> Path:
    """Frames (PIL, one size) -> an H.264 MP4 (yuv420p, plays everywhere); odd sides are
    padded by one pixel (edge colour)."""
    import av

    if not frames:
        raise UserError(f"no frames to write to {path}")
    path = Path(path)
    w, h = frames[0].size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = _even(w), _even(h), "yuv420p"
        for frame in frames:
            rgb = np.asarray(frame.convert("RGB"))
            rgb = np.pad(rgb, ((0, _even(h) - h), (0, _even(w) - w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)
    return path


def write_preview(frames: Sequence[Image.Image], path: str | os.PathLike, fps: int = 16) -> Path:
    """An animated GIF of the frames, looping (a README, a model card, a browser)."""
    path = Path(path)
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(path, save_all=True, append_images=rest, duration=max(1, round(1000 / fps)), loop=0)
    return path


def read_frames(path: str | os.PathLike) -> tuple[list[Image.Image], float]:
    """Every frame of a video file as RGB PIL images, and its frame rate. A file PyAV
    cannot open or decode is a UserError naming it."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.base_rate or 0) or 0.0
            frames = [f.to_image() for f in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise UserError(f"{path} is not a readable video ({err})") from None
    return frames, rate
