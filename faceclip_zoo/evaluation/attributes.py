"""Caption following over every attribute the synthetic captions name: shirt colour, hat,
glasses, expression, background and light, and for clips the head's turn. A small CNN with
one head per attribute reads them from a scene's pixels; it is trained on the judge world's
real scenes (people in no train, validation or test world) with the judge's augmentations,
and its accuracy on each test world's real scenes is the ceiling a generated image is read
against. Chance per attribute is the share of the most common value in the scored captions
(the accuracy of always answering that value), not 1 / #values: hats are mostly "no".

A clip world's reader (`caption-reader-clips`) is trained on the judge world rendered as
clips, on each clip's first frame (the light where it starts, the head frontal) and its
last (the light where it ends, the head fully turned: the `turn` head learns only there),
and reads a clip the same way.
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

from faceclip_zoo.synthetic.faces import BACKGROUNDS, CLOTHES, EXPRESSIONS, HATS, LIGHTS, TURNS

log = logging.getLogger(__name__)

READER = "caption-reader"
CLIP_READER = "caption-reader-clips"  # its own folder: a priors folder serves a still world and its clip twin
ATTRIBUTES = {
    "shirt": tuple(CLOTHES), "hat": tuple(HATS), "glasses": ("no", "yes"), "expression": EXPRESSIONS,
    "background": tuple(BACKGROUNDS), "light": LIGHTS,
}
CLIP_READ = {**ATTRIBUTES, "turn": TURNS}  # what a clip reader's heads read
_PERSON = (r"a (?:(?P<expr>smiling|surprised) )?person wearing a (?P<shirt>\w+) shirt"
           r"(?: and a (?P<hat>\w+) hat)?(?P<glasses> and glasses)?, in front of an? (?P<bg>\w+) background")
_CAPTION = re.compile(r"a photo of " + _PERSON + r", lit from the (?P<light>\w+)")
# a clip's (synthetic/faces.py clip_caption): the scene, the head's turn, the light's move
_CLIP_CAPTION = re.compile(r"a video of " + _PERSON + r", turning their head to the (?P<turn>\w+), the light "
                           r"moving from the (?P<light>\w+) to the (?P<light_to>\w+)")
# what a clip's frames are read for: the scene's attributes on every frame, the light where
# it starts (first frame) and where it ends (last frame), the head's turn (last frame)
CLIP_ATTRIBUTES = ("shirt", "hat", "glasses", "expression", "background", "light at the start", "light at the end",
                   "turn")


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
    """Scenes [B, 3, S, S] in [0, 1] -> {attribute: logits [B, #values]}, one head per
    attribute of `attributes` (name -> its values; default ATTRIBUTES)."""

    def __init__(self, config: ReaderConfig | None = None, attributes: dict[str, tuple[str, ...]] | None = None):
        super().__init__()
        self.config = config or ReaderConfig()
        self.attributes = {name: tuple(values) for name, values in (attributes or ATTRIBUTES).items()}
        w = self.config.width

        def trunk() -> nn.Sequential:
            layers, c = [], 3
            for out in (w, 2 * w, 4 * w, 4 * w):
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
                c = out
            return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())

        self.features = trunk()
        # The turn is a few pixels' slide of the eyes and nose within the head: on the trunk
        # the scene's colours train it was not learnt in the reader's steps (held-out turn
        # accuracy 0.54-0.58, chance 0.5); on a trunk of its own it was (0.96)
        self.turn_features = trunk() if "turn" in self.attributes else None
        self.heads = nn.ModuleDict({name: nn.Linear(16 * w, len(values)) for name, values in self.attributes.items()})

    def forward(self, scenes: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.interpolate(scenes.float(), size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        x = (x - 0.5) / 0.25
        h = self.features(x)
        out = {name: head(h) for name, head in self.heads.items() if name != "turn"}
        if self.turn_features is not None:
            out["turn"] = self.heads["turn"](self.turn_features(x))
        return out

    @torch.no_grad()
    def read(self, scenes: torch.Tensor, batch: int = 256) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {name: [] for name in self.attributes}
        for i in range(0, len(scenes), batch):
            for name, logits in self(scenes[i:i + batch]).items():
                out[name] += [self.attributes[name][k] for k in logits.argmax(1).tolist()]
        return out


def _examples(records, attributes: dict) -> tuple[list, dict[str, torch.Tensor]]:
    """Training images and their labels: a still scene with its caption's values; a clip's
    first and last frames, the light where it starts and where it ends, the turn on the last
    frame only (-100: no label, F.cross_entropy's ignore_index)."""
    images, labels = [], []
    for r in records:
        v = caption_attributes(r.caption)
        if r.frames is None:
            images.append(r.scene)
            labels.append(v)
            continue
        images += [r.frames[0], r.frames[-1]]
        labels += [{**v, "light": v["light at the start"], "turn": None},
                   {**v, "light": v["light at the end"]}]
    return images, {name: torch.tensor([values.index(v[name]) if v.get(name) is not None else -100 for v in labels])
                    for name, values in attributes.items()}


def train_reader(records, config: ReaderConfig, seed: int) -> tuple[CaptionReader, dict]:
    from faceclip_zoo.evaluation.judge import _augment
    from faceclip_zoo.synthetic.priors import _optimise, _stack

    torch.manual_seed(seed)
    clips = records[0].frames is not None
    attributes = CLIP_READ if clips else ATTRIBUTES
    cut = len(records) * 5 // 6  # the last people are held out: the reader's own accuracy
    images, targets = _examples(records[:cut], attributes)
    scenes = _stack(images)
    reader = CaptionReader(config, attributes)
    gen = torch.Generator().manual_seed(seed)

    def batch_loss():
        idx = torch.randint(len(scenes), (config.batch_size,), generator=gen)
        logits = reader(_augment(scenes[idx], gen, shift=3))
        return sum(F.cross_entropy(logits[n], targets[n][idx], ignore_index=-100) for n in attributes)

    reader.train()
    loss = _optimise(reader.parameters(), batch_loss, config.steps, lr=config.lr, weight_decay=0.05)
    reader.eval()
    held = records[cut:]
    captions = [r.caption for r in held]
    shown = torch.stack([_stack(r.frames) for r in held]) if clips else _stack([r.scene for r in held])
    accuracy = {n: h.mean().item() for n, h in attribute_hits(reader, shown, captions).items()}
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
    if "turn" in reader.attributes:  # a clip reader's (the still world's reader has no turn head)
        out["turn"] = hits(frames[-1]["turn"], "turn", "turn")
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
    and kept in <priors_dir>/caption-reader (a clip world's: the judge world rendered as
    clips like it, in <priors_dir>/caption-reader-clips)."""
    from faceclip_zoo.models.io import atomic_write, write_safetensors
    from faceclip_zoo.evaluation.judge import JudgeConfig, judge_world_spec
    from faceclip_zoo.synthetic.world import generate
    from faceclip_zoo.utils import load_strict

    config = config or ReaderConfig()
    world = judge_world_spec(like, judge_config or JudgeConfig())
    if like.clip_frames > 1:
        world = dataclasses.replace(world, clip_frames=like.clip_frames)
    folder = Path(priors_dir) / (CLIP_READER if like.clip_frames > 1 else READER)
    key = world.digest() + "-" + json.dumps(dataclasses.asdict(config), sort_keys=True)
    try:
        meta = json.loads((folder / "config.json").read_text())
        if meta.get("key") == key:
            from safetensors.torch import load_file

            reader = CaptionReader(ReaderConfig(**meta["config"]), meta["attributes"])
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
            "scores": scores, "attributes": {n: list(v) for n, v in reader.attributes.items()},
            "trained_on": "the judge world's real " + ("clips (first and last frames)" if like.clip_frames > 1
                                                        else "scenes") + ": people in no train, validation or test world"}
    atomic_write(folder, "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    log.info("synthetic caption reader: %s", scores)
    return reader, scores
