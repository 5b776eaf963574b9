"""Caption following over every attribute the synthetic captions name: shirt colour, hat,
glasses, expression, background and light. A small CNN with one head per attribute reads
them from a scene's pixels; it is trained on the judge world's real scenes (people in no
train, validation or test world) with the judge's augmentations, and its accuracy on each
test world's real scenes is the ceiling a generated image is read against. Chance per
attribute is the share of the most common value in the scored captions (the accuracy of
always answering that value), not 1 / #values: hats are mostly "no".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faceclip_zoo.synthetic.faces import BACKGROUNDS, CLOTHES, EXPRESSIONS, HATS, LIGHTS

log = logging.getLogger(__name__)

READER = "caption-reader"
ATTRIBUTES = {
    "shirt": tuple(CLOTHES), "hat": tuple(HATS), "glasses": ("no", "yes"), "expression": EXPRESSIONS,
    "background": tuple(BACKGROUNDS), "light": LIGHTS,
}
_PERSON = (r"a (?:(?P<expr>smiling|surprised) )?person wearing a (?P<shirt>\w+) shirt"
           r"(?: and a (?P<hat>\w+) hat)?(?P<glasses> and glasses)?, in front of an? (?P<bg>\w+) background")
_CAPTION = re.compile(r"a photo of " + _PERSON + r", lit from the (?P<light>\w+)")
# a clip's (synthetic/faces.py clip_caption): the scene, the head's turn, the light's move
_CLIP_CAPTION = re.compile(r"a video of " + _PERSON + r", turning their head to the (?P<turn>\w+), the light "
                           r"moving from the (?P<light>\w+) to the (?P<light_to>\w+)")
# what a clip's frames are read for: the scene's attributes on every frame, the light where
# it starts (first frame) and where it ends (last frame)
CLIP_ATTRIBUTES = ("shirt", "hat", "glasses", "expression", "background", "light at the start", "light at the end")


def caption_attributes(caption: str) -> dict[str, str] | None:
    """The attribute values a synthetic caption (a scene's or a clip's) names (None: not a
    person caption)."""
    text = caption.strip()
    m = _CAPTION.fullmatch(text) or _CLIP_CAPTION.fullmatch(text)
    if m is None:
        return None
    out = {"shirt": m["shirt"], "hat": m["hat"] or "no", "glasses": "yes" if m["glasses"] else "no",
           "expression": {"smiling": "smiling", "surprised": "surprised"}.get(m["expr"], "neutral"),
           "background": m["bg"], "light": m["light"]}
    if "light_to" in m.re.groupindex:
        out.update({"light at the start": m["light"], "light at the end": m["light_to"], "turn": m["turn"]})
    return out


@dataclasses.dataclass
class ReaderConfig:
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    width: int = 16


class CaptionReader(nn.Module):
    """Scenes [B, 3, S, S] in [0, 1] -> {attribute: logits [B, #values]}."""

    def __init__(self, config: ReaderConfig | None = None):
        super().__init__()
        self.config = config or ReaderConfig()
        w = self.config.width
        layers, c = [], 3
        for out in (w, 2 * w, 4 * w, 4 * w):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(c * 4, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, scenes: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.interpolate(scenes.float(), size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        h = self.features((x - 0.5) / 0.25)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, scenes: torch.Tensor, batch: int = 256) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {name: [] for name in ATTRIBUTES}
        for i in range(0, len(scenes), batch):
            for name, logits in self(scenes[i:i + batch]).items():
                out[name] += [ATTRIBUTES[name][k] for k in logits.argmax(1).tolist()]
        return out


def _targets(captions: list[str]) -> dict[str, torch.Tensor]:
    values = [caption_attributes(c) for c in captions]
    return {name: torch.tensor([ATTRIBUTES[name].index(v[name]) for v in values]) for name in ATTRIBUTES}


def train_reader(records, config: ReaderConfig, seed: int) -> tuple[CaptionReader, dict]:
    from faceclip_zoo.evaluation.judge import _augment
    from faceclip_zoo.synthetic.priors import _optimise, _stack

    torch.manual_seed(seed)
    cut = len(records) * 5 // 6  # the last people are held out: the reader's own accuracy
    scenes, targets = _stack([r.scene for r in records[:cut]]), _targets([r.caption for r in records[:cut]])
    reader = CaptionReader(config)
    gen = torch.Generator().manual_seed(seed)

    def batch_loss():
        idx = torch.randint(len(scenes), (config.batch_size,), generator=gen)
        logits = reader(_augment(scenes[idx], gen, shift=3))
        return sum(F.cross_entropy(logits[n], targets[n][idx]) for n in ATTRIBUTES)

    reader.train()
    loss = _optimise(reader.parameters(), batch_loss, config.steps, lr=config.lr, weight_decay=0.05)
    reader.eval()
    held = records[cut:]
    read = reader.read(_stack([r.scene for r in held]))
    truth = [caption_attributes(r.caption) for r in held]
    accuracy = {n: sum(p == t[n] for p, t in zip(read[n], truth)) / len(held) for n in ATTRIBUTES}
    return reader, {"train_loss": float(loss), "held_out_scenes": len(held), "held_out_accuracy": accuracy}


def attribute_hits(reader: CaptionReader, images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
    """Per attribute, 1.0 where the image shows what its caption names (images: a multiple
    of the captions, seed-major), averaged over the seeds: [len(captions)] each. Clips
    ([M, F, 3, H, W]): the scene's attributes averaged over the frames, the light read on
    the first and the last frame (CLIP_ATTRIBUTES)."""
    n = len(captions)
    truth = [caption_attributes(c) for c in captions]

    def hits(read: list[str], name: str, truth_name: str) -> torch.Tensor:
        return torch.tensor([float(v == truth[i % n][truth_name]) for i, v in enumerate(read)]).view(-1, n).mean(0)

    if images.dim() == 4:
        read = reader.read(images)
        return {name: hits(read[name], name, name) for name in ATTRIBUTES}
    frames = [reader.read(images[:, f]) for f in range(images.shape[1])]
    out = {name: torch.stack([hits(r[name], name, name) for r in frames]).mean(0)
           for name in CLIP_ATTRIBUTES if name in ATTRIBUTES}
    out["light at the start"] = hits(frames[0]["light"], "light", "light at the start")
    out["light at the end"] = hits(frames[-1]["light"], "light", "light at the end")
    return out


def majority_chance(captions: list[str]) -> dict[str, float]:
    """Per attribute the captions name (a clip's: CLIP_ATTRIBUTES), the share of its most
    common value."""
    truth = [caption_attributes(c) for c in captions]
    names = CLIP_ATTRIBUTES if "light at the start" in truth[0] else tuple(ATTRIBUTES)
    return {name: max(sum(t[name] == v for t in truth) for v in {t[name] for t in truth}) / len(truth)
            for name in names}


def ensure_reader(priors_dir: str | Path, like, config: ReaderConfig | None = None, judge_config=None):
    """The caption reader for worlds rendered like `like`, trained once on the judge world
    and kept in <priors_dir>/caption-reader."""
    from faceclip_zoo.models.io import atomic_write, write_safetensors
    from faceclip_zoo.evaluation.judge import JudgeConfig, judge_world_spec
    from faceclip_zoo.synthetic.world import generate
    from faceclip_zoo.utils import load_strict

    config = config or ReaderConfig()
    world = judge_world_spec(like, judge_config or JudgeConfig())
    folder = Path(priors_dir) / READER
    key = world.digest() + "-" + json.dumps(dataclasses.asdict(config), sort_keys=True)
    try:
        meta = json.loads((folder / "config.json").read_text())
        if meta.get("key") == key:
            from safetensors.torch import load_file

            reader = CaptionReader(ReaderConfig(**meta["config"]))
            load_strict(reader, load_file(str(folder / "model.safetensors")), str(folder))
            return reader.eval(), meta["scores"]
    except (OSError, ValueError, KeyError):
        pass
    t0 = time.time()
    reader, scores = train_reader(generate(world)["train"], config, world.seed)
    scores["seconds"] = round(time.time() - t0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder, "model.safetensors", lambda p: write_safetensors(p, reader.state_dict()))
    meta = {"model_type": "synthetic_caption_reader", "config": dataclasses.asdict(config), "key": key,
            "scores": scores, "attributes": {n: list(v) for n, v in ATTRIBUTES.items()},
            "trained_on": "the judge world's real scenes: people in no train, validation or test world"}
    atomic_write(folder, "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    log.info("synthetic caption reader: %s", scores)
    return reader, scores
