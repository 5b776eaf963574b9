"""The independent judge of the synthetic world: a face recogniser of another architecture
than the one the models are conditioned on, trained on people no model ever sees.

The world's face-ID ViT is what the encoder reads identity from and what it regresses to,
so scoring generated faces with it grades a model with its own teacher (PuLID measures with
CurricularFace for this reason, not with its ID encoder). The judge here is a torchvision
ResNet (BasicBlock, one block per stage: a ResNet-10) trained with a CosFace margin on the
judge world: JUDGE_WORLD_SEED's people, in no train, validation or test world. It reads the
face region of a scene (scene_face_crop) and is trained on that and on aligned crops,
blurred, shifted and re-lit at random, so generated faces are in its domain. Its
verification accuracy on judge-world people it was not trained on is stored beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faceclip_zoo.synthetic.world import JUDGE_WORLD_SEED

log = logging.getLogger(__name__)

JUDGE = "judge-resnet"
JUDGE_INPUT = 64  # a 64 px scene's face is ~50 px wide: 64 px keeps all of it


@dataclasses.dataclass
class JudgeConfig:
    embed_dim: int = 128
    people: int = 120  # judge-world identities; the last `held_out` are kept for verification
    held_out: int = 20
    samples_per_identity: int = 8
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = JUDGE_WORLD_SEED


class FaceJudge(nn.Module):
    """Face crops [B, 3, H, W] in [0, 1] (aligned, or a scene's face region) -> normalised
    identity vectors [B, embed_dim]."""

    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, ResNet

        self.config = config or JudgeConfig()
        self.net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=self.config.embed_dim)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(faces.float(), size=(JUDGE_INPUT, JUDGE_INPUT), mode="bilinear", align_corners=False,
                          antialias=True)
        return F.normalize(self.net((x - 0.5) / 0.25), dim=-1)


def judge_world_spec(like, config: JudgeConfig):
    """The judge world: rendered like the world the models train on (size, framing, tilt),
    its own people, in still scenes (a clip world's judge and caption reader are its still
    twin's: they read each frame)."""
    return dataclasses.replace(like, seed=config.seed, train_identities=config.people, val_identities=0,
                               samples_per_identity=config.samples_per_identity, guided_pairs=0, clip_frames=0)


def _faces_of(records, scene_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scene face regions, aligned crops) of records, [N, 3, 112, 112] each."""
    from faceclip_zoo.synthetic.scenes import scene_face_crop
    from faceclip_zoo.synthetic.priors import _stack

    return scene_face_crop(_stack([r.scene for r in records]), scene_scale=scene_scale), _stack([r.crop for r in records])


def _augment(x: torch.Tensor, gen: torch.Generator, shift: int = 6) -> torch.Tensor:
    """What generated faces differ by: blur, a few pixels of shift, exposure."""
    import torchvision.transforms.functional as TF

    b = x.shape[0]
    gain = torch.empty(b, 1, 1, 1).uniform_(0.8, 1.2, generator=gen)
    x = (x * gain).clamp(0, 1)
    sigma = float(torch.empty(()).uniform_(0.1, 2.0, generator=gen))
    x = TF.gaussian_blur(x, kernel_size=9, sigma=sigma)
    dx, dy = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def verification(emb: torch.Tensor, labels: list[str], seed: int = 0) -> dict[str, float]:
    """Same-person / different-person pairs of held-out people: the threshold chosen on one
    half of the pairs, accuracy on the other (LFW's protocol in miniature); and leave-one-out
    nearest-neighbour top-1."""
    from faceclip_zoo.metrics import nearest_neighbour_accuracy

    sim = emb @ emb.T
    codes = torch.tensor([sorted(set(labels)).index(n) for n in labels])
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    same = codes[i] == codes[j]
    gen = torch.Generator().manual_seed(seed)
    pos, neg = torch.nonzero(same).flatten(), torch.nonzero(~same).flatten()
    neg = neg[torch.randperm(len(neg), generator=gen)[:len(pos)]]  # balanced, as LFW
    pairs = torch.cat([pos, neg])[torch.randperm(len(pos) * 2, generator=gen)]
    s, y = sim[i[pairs], j[pairs]], same[pairs]
    half = len(pairs) // 2
    candidates = s[:half].sort().values
    accuracy = torch.stack([((s[:half] > t) == y[:half]).float().mean() for t in candidates])
    threshold = candidates[accuracy.argmax()]
    return {"verification_accuracy": ((s[half:] > threshold) == y[half:]).float().mean().item(),
            "threshold": threshold.item(), "pairs": len(pairs) - half,
            "nearest_neighbour_top1": nearest_neighbour_accuracy(emb, labels)}


def train_judge(records, scene_scale: float, config: JudgeConfig) -> tuple[FaceJudge, dict]:
    """CosFace on the judge world's trained people; verification on its held-out ones."""
    from faceclip_zoo.synthetic.priors import _labels, _optimise, cosface_loss

    torch.manual_seed(config.seed)
    cut = (config.people - config.held_out) * config.samples_per_identity
    train, held = records[:cut], records[cut:]
    scenes, crops = _faces_of(train, scene_scale)
    faces, labels = torch.cat([scenes, crops]), torch.cat([_labels(train)[0]] * 2)
    judge = FaceJudge(config)
    classes = nn.Parameter(torch.randn(int(labels.max()) + 1, config.embed_dim) * 0.01)
    gen = torch.Generator().manual_seed(config.seed)

    def batch_loss():
        idx = torch.randint(len(faces), (config.batch_size,), generator=gen)
        return cosface_loss(judge(_augment(faces[idx], gen)), classes, labels[idx])

    judge.train()
    loss = _optimise([*judge.parameters(), classes], batch_loss, config.steps, lr=config.lr, weight_decay=0.05)
    judge.eval()
    with torch.no_grad():
        held_scenes, _ = _faces_of(held, scene_scale)
        scores = verification(judge(held_scenes), [r.identity for r in held])
    return judge, {"train_loss": loss, "held_out_people": config.held_out, **scores}


def judge_key(like, config: JudgeConfig) -> str:
    return judge_world_spec(like, config).digest() + "-" + json.dumps(dataclasses.asdict(config), sort_keys=True)


def load_judge(folder: Path) -> FaceJudge:
    from safetensors.torch import load_file

    from faceclip_zoo.utils import load_strict, require_file

    meta = json.loads(require_file(folder / "config.json", "judge config").read_text())
    judge = FaceJudge(JudgeConfig(**meta["config"]))
    load_strict(judge, load_file(str(require_file(folder / "model.safetensors", "judge weights"))), str(folder))
    return judge.eval()


def ensure_judge(priors_dir: str | Path, like, config: JudgeConfig | None = None) -> tuple[FaceJudge, dict]:
    """The judge for worlds rendered like `like` (a SyntheticSpec), trained once and kept
    in <priors_dir>/judge-resnet (model.safetensors + config.json with its scores)."""
    from faceclip_zoo.models.io import atomic_write, write_safetensors
    from faceclip_zoo.synthetic.world import generate

    config = config or JudgeConfig()
    folder = Path(priors_dir) / JUDGE
    key = judge_key(like, config)
    try:
        meta = json.loads((folder / "config.json").read_text())
        if meta.get("key") == key:
            return load_judge(folder), meta["scores"]
    except (OSError, ValueError, KeyError):
        pass
    t0 = time.time()
    records = generate(judge_world_spec(like, config))["train"]
    judge, scores = train_judge(records, like.scene_scale, config)
    scores["seconds"] = round(time.time() - t0, 1)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder, "model.safetensors", lambda p: write_safetensors(p, judge.state_dict()))
    meta = {"model_type": "synthetic_face_judge", "architecture": "torchvision ResNet, BasicBlock [1, 1, 1, 1]",
            "config": dataclasses.asdict(config), "key": key, "scores": scores,
            "trained_on": "the judge world: people in no train, validation or test world"}
    atomic_write(folder, "config.json", lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    log.info("synthetic judge: %s", scores)
    return judge, scores
