"""Procedural faces: the pixels of the built-in synthetic-identities dataset.

An identity is a set of fixed facial traits (face shape, skin tone, eye colour, size and
spacing, brows, nose, mouth, ears, hair colour and style, beard, mole). A sample of an
identity varies only what its caption describes (background, clothing colour, hat,
glasses, expression, light direction) plus small uncaptioned pose and exposure jitter.
The identity is never written anywhere but in the face pixels.

Faces are drawn in the 112x112 ArcFace template frame (eyes near (38.3, 51.7) and
(73.5, 51.5)), then mapped to the canvas by a similarity transform: the identity
transform gives an aligned reference crop, a smaller rotated one a full scene.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

BACKGROUNDS = {
    "red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 60), "yellow": (230, 210, 50),
    "purple": (130, 50, 170), "orange": (240, 140, 30), "gray": (128, 128, 128),
    "white": (240, 240, 240), "black": (20, 20, 20), "pink": (240, 150, 190),
}
CLOTHES = {
    "red": (180, 20, 30), "blue": (30, 50, 170), "green": (30, 130, 50), "yellow": (220, 200, 30),
    "black": (15, 15, 15), "white": (235, 235, 235), "orange": (230, 120, 20),
    "purple": (110, 30, 150),
}
HATS = {"no": None, "red": (190, 30, 30), "blue": (30, 60, 190), "black": (20, 20, 20)}
EXPRESSIONS = ("neutral", "smiling", "surprised")
LIGHTS = ("front", "left", "right", "above")
SHAPES = ("circle", "square", "triangle", "star")

EYE_COLORS = [(90, 55, 25), (60, 110, 190), (60, 140, 80), (120, 120, 130), (170, 120, 40),
              (25, 20, 20)]
HAIR_COLORS = [(20, 15, 10), (90, 55, 25), (220, 190, 110), (170, 70, 30), (150, 150, 150),
               (235, 235, 225)]
HAIR_STYLES = ("bald", "short", "long", "fringe", "side")


@dataclass
class Identity:
    face_w: float
    face_h: float
    skin: tuple
    eye_color: tuple
    eye_spacing: float
    eye_size: float
    brow: float
    nose_len: float
    nose_w: float
    mouth_w: float
    lips: tuple
    ear: float
    hair_color: tuple
    hair_style: str
    beard: bool
    mole: tuple | None


@dataclass
class Variation:
    background: str
    clothing: str
    hat: str
    glasses: bool
    expression: str
    light: str
    angle: float  # degrees, uncaptioned
    shift: tuple  # pixels in the canvas, uncaptioned
    scale: float  # uncaptioned
    exposure: float  # uncaptioned
    # a clip's frame (clip_frames): head turned by yaw in [-1, 1] (negative: to the left as
    # seen in the frame), the light `light_mix` of the way from `light` to `light_to`
    yaw: float = 0.0
    light_to: str | None = None
    light_mix: float = 0.0


def _jitter(rng: np.random.Generator, color, amount: float) -> tuple:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in color)


def sample_identity(rng: np.random.Generator) -> Identity:
    t = rng.uniform()
    skin = tuple(int(a + (b - a) * t) for a, b in zip((245, 215, 185), (85, 55, 35)))
    hair_color = HAIR_COLORS[rng.integers(len(HAIR_COLORS))]
    return Identity(
        face_w=rng.uniform(0.82, 1.15), face_h=rng.uniform(0.88, 1.12),
        skin=_jitter(rng, skin, 8),
        eye_color=_jitter(rng, EYE_COLORS[rng.integers(len(EYE_COLORS))], 12),
        eye_spacing=rng.uniform(-4, 4), eye_size=rng.uniform(3.0, 6.0),
        brow=rng.uniform(1.0, 4.5), nose_len=rng.uniform(8, 20), nose_w=rng.uniform(4, 12),
        mouth_w=rng.uniform(12, 30), lips=_jitter(rng, (170, 60, 60), 25), ear=rng.uniform(4, 10),
        hair_color=_jitter(rng, hair_color, 10),
        hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        beard=bool(rng.uniform() < 0.3),
        mole=(float(rng.uniform(30, 82)), float(rng.uniform(60, 95))) if rng.uniform() < 0.4 else None,
    )


def sample_variation(rng: np.random.Generator, max_angle: float) -> Variation:
    return Variation(
        background=str(rng.choice(list(BACKGROUNDS))), clothing=str(rng.choice(list(CLOTHES))),
        hat=str(rng.choice(list(HATS), p=[0.55, 0.15, 0.15, 0.15])),
        glasses=bool(rng.uniform() < 0.35), expression=str(rng.choice(EXPRESSIONS)),
        light=str(rng.choice(LIGHTS)), angle=float(rng.uniform(-max_angle, max_angle)),
        shift=(float(rng.normal(0, 1.5)), float(rng.normal(0, 1.5))),
        scale=float(rng.uniform(0.95, 1.05)), exposure=float(rng.uniform(0.9, 1.1)),
    )


def caption(v: Variation) -> str:
    who = {"neutral": "a person", "smiling": "a smiling person",
           "surprised": "a surprised person"}[v.expression]
    extras = []
    if v.hat != "no":
        extras.append(f"a {v.hat} hat")
    if v.glasses:
        extras.append("glasses")
    wearing = f"a {v.clothing} shirt" + "".join(f" and {e}" for e in extras)
    return (f"a photo of {who} wearing {wearing}, in front of a {v.background} background, "
            f"lit from the {v.light}")


TURNS = ("left", "right")


def clip_caption(v: Variation, turn: str, light_to: str) -> str:
    """A clip's caption: the scene as `caption` says it, then the motion (the head's turn,
    as seen in the frame, and the light's move)."""
    scene = caption(v).removeprefix("a photo of ").rsplit(", lit from the ", 1)[0]
    return f"a video of {scene}, turning their head to the {turn}, the light moving from the {v.light} to the {light_to}"


def clip_frames(v: Variation, turn: str, light_to: str, frames: int) -> list[Variation]:
    """The frames of a clip: the head turns from frontal to fully turned, the light moves
    from v.light to light_to (the camera, clothes and background stay)."""
    sign = -1.0 if turn == "left" else 1.0
    steps = [k / (frames - 1) for k in range(frames)] if frames > 1 else [0.0]
    return [dataclasses.replace(v, yaw=sign * t, light_to=light_to, light_mix=t) for t in steps]


class _Canvas:
    """Draws template-frame shapes through a similarity transform, 2x supersampled."""

    SS = 2

    def __init__(self, size: int, background, scale: float, angle: float, center):
        self.size = size
        self.img = Image.new("RGB", (size * self.SS, size * self.SS), background)
        self.draw = ImageDraw.Draw(self.img)
        a = math.radians(angle)
        s = scale * self.SS
        self.m = np.array([[s * math.cos(a), -s * math.sin(a)], [s * math.sin(a), s * math.cos(a)]])
        # template point (56, 64) lands on `center` (canvas pixels)
        self.t = np.array(center) * self.SS - self.m @ np.array([56.0, 64.0])
        self.scale = s

    def pts(self, xy) -> list[tuple]:
        p = np.asarray(xy, dtype=np.float64) @ self.m.T + self.t
        return [tuple(q) for q in p]

    def ellipse(self, cx, cy, rx, ry, fill, start=0.0, end=360.0, n=28):
        th = np.radians(np.linspace(start, end, n))
        pts = np.stack([cx + rx * np.cos(th), cy + ry * np.sin(th)], 1)
        if end - start < 360:
            pts = np.vstack([pts, [[cx, cy]]])
        self.draw.polygon(self.pts(pts), fill=fill)

    def polygon(self, xy, fill):
        self.draw.polygon(self.pts(xy), fill=fill)

    def line(self, xy, fill, width):
        self.draw.line(self.pts(xy), fill=fill, width=max(1, int(round(width * self.scale))))

    def result(self) -> Image.Image:
        return self.img.resize((self.size, self.size), Image.BILINEAR)


def _shade(color, k):
    return tuple(int(np.clip(c * k, 0, 255)) for c in color)


def render(ident: Identity, var: Variation, size: int, face_scale: float, center=None) -> Image.Image:
    """Draw one sample. face_scale = canvas pixels per template unit (1.0 with size 112 is
    an aligned reference crop)."""
    center = center or (size / 2, size / 2 + 8 * face_scale)
    c = _Canvas(size, BACKGROUNDS[var.background], face_scale * var.scale, var.angle,
                (center[0] + var.shift[0] * face_scale, center[1] + var.shift[1] * face_scale))
    fw, fh = 34 * ident.face_w, 44 * ident.face_h
    # a turned head: the features slide towards the turn, the face and ears less, and the ear
    # on that side hides (all exactly as before at yaw 0)
    dx, yaw = 14 * var.yaw, var.yaw
    # shoulders and shirt
    c.ellipse(56, 150, 62, 42, CLOTHES[var.clothing])
    c.polygon([(44, 100), (68, 100), (66, 116), (46, 116)], _shade(ident.skin, 0.9))  # neck
    hair = ident.hair_color
    if ident.hair_style == "long":
        c.polygon([(56 - fw - 6, 40), (56 + fw + 6, 40), (56 + fw + 10, 118), (56 - fw - 10, 118)], hair)
    # ears
    for side in (-1, 1):
        ear = ident.ear * (1 - 0.8 * max(0.0, side * yaw))
        c.ellipse(56 + side * fw + 0.3 * dx, 66, ear, ear * 1.6, _shade(ident.skin, 0.92))
    c.ellipse(56 + 0.3 * dx, 64, fw, fh, ident.skin)  # face
    if ident.hair_style != "bald":
        c.ellipse(56, 64 - fh * 0.55, fw * 1.05, fh * 0.55, hair, 180, 360)
        if ident.hair_style == "fringe":
            c.polygon([(56 - fw * 0.8, 28), (56 + fw * 0.8, 28), (56 + fw * 0.7, 40), (56 - fw * 0.7, 40)], hair)
        elif ident.hair_style == "side":
            c.polygon([(56 - fw, 30), (56, 24), (56 - fw * 0.2, 38), (56 - fw, 50)], hair)
    if ident.beard:
        c.ellipse(56, 90, fw * 0.8, 20 * ident.face_h, _shade(hair, 1.0), 0, 180)
    # eyes (the template puts them at x 38.3 and 73.5, y 51.6)
    for side, ex in ((-1, 38.3), (1, 73.5)):
        x = ex + side * ident.eye_spacing + dx
        c.ellipse(x, 51.6, ident.eye_size * 1.8, ident.eye_size, (250, 250, 250))
        c.ellipse(x, 51.6, ident.eye_size * 0.9, ident.eye_size * 0.9, ident.eye_color)
        c.ellipse(x, 51.6, ident.eye_size * 0.35, ident.eye_size * 0.35, (10, 10, 10))
        lift = -4 if var.expression == "surprised" else 0
        c.line([(x - 9, 42 + lift), (x + 9, 42 + lift)], _shade(hair, 0.8), ident.brow)
    if var.glasses:
        for ex in (38.3 + dx, 73.5 + dx):
            c.line([(ex - 10, 45), (ex + 10, 45), (ex + 10, 58), (ex - 10, 58), (ex - 10, 45)],
                   (30, 30, 30), 1.6)
        c.line([(48.3 + dx, 50), (63.5 + dx, 50)], (30, 30, 30), 1.6)
    # nose (tip near template 71.7)
    nx = 56 + dx
    c.polygon([(nx, 71.7 - ident.nose_len), (nx + ident.nose_w / 2, 71.7), (nx - ident.nose_w / 2, 71.7)],
              _shade(ident.skin, 0.8))
    if ident.mole:
        c.ellipse(ident.mole[0] + dx, ident.mole[1], 1.6, 1.6, (60, 35, 20))
    # mouth (corners near y 92.3)
    mw = ident.mouth_w / 2
    if var.expression == "smiling":
        c.ellipse(nx, 90, mw, 6, ident.lips, 0, 180)
    elif var.expression == "surprised":
        c.ellipse(nx, 92, mw * 0.45, 6, (60, 20, 20))
    else:
        c.line([(nx - mw, 92.3), (nx + mw, 92.3)], ident.lips, 2.5)
    if var.hat != "no":
        hat = HATS[var.hat]
        c.ellipse(56, 64 - fh * 0.6, fw * 1.15, fh * 0.5, hat, 180, 360)
        c.polygon([(56 - fw * 1.3, 64 - fh * 0.62), (56 + fw * 1.3, 64 - fh * 0.62),
                   (56 + fw * 1.3, 64 - fh * 0.52), (56 - fw * 1.3, 64 - fh * 0.52)], hat)
    return _light(c.result(), var.light, var.exposure, var.light_to, var.light_mix)


def _light(img: Image.Image, light: str, exposure: float, light_to: str | None = None, mix: float = 0.0
           ) -> Image.Image:
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape[:2]
    ramps = {"left": np.linspace(1.2, 0.75, w)[None, :], "right": np.linspace(0.75, 1.2, w)[None, :],
             "above": np.linspace(1.2, 0.75, h)[:, None], "front": np.ones((1, 1))}
    ramp = ramps[light] if light_to is None else (1 - mix) * ramps[light] + mix * ramps[light_to]
    a = a * ramp[..., None] * exposure
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def render_object(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """A guided (face-free) image-text pair: one coloured shape on a background."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    color = str(rng.choice([c for c in BACKGROUNDS if c != bg]))
    shape = str(rng.choice(SHAPES))
    img = Image.new("RGB", (size, size), BACKGROUNDS[bg])
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.36)
    cx, cy = size / 2 + rng.normal(0, size * 0.06, 2)
    fill = BACKGROUNDS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        pts = [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(math.pi * i / 5 - math.pi / 2),
                cy + (r if i % 2 == 0 else r * 0.45) * math.sin(math.pi * i / 5 - math.pi / 2))
               for i in range(10)]
        d.polygon(pts, fill=fill)
    return img, f"a {color} {shape} on a {bg} background"
