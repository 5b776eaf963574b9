"""The identity protocol: what `evaluate --benchmark synthetic` reports by default.

- Test worlds. The validation world (a recipe's `val/` split) is what `fit` validates on
  and what configurations were chosen on, so it reports nothing a reviewer can trust. The
  report is on TEST_WORLD_SEEDS: 3 worlds of 20 people each, rendered like the pipeline's
  training world (its recipe's SyntheticIdentities settings: size, framing, tilt, samples
  per person) with seeds reserved here. No recipe may train or validate on a reserved seed
  (`check_world_seed`, run by the benchmark; tests/test_protocol.py checks every recipe).
- Two judges. The world's face-ID ViT is labelled the conditioning network (the encoder
  reads identity from it and regresses to it); the independent judge (judge.py, a ResNet
  trained on people of a judge world) is the one targets are read off.
- The gallery: each generated image is compared with the mean of its person's reference
  crops *other than its own conditioning crop*, and with every other person's mean.
- Uncertainty over people: images of one person are not independent (8 share a person), so
  the +- is a bootstrap over people (resampled with replacement); the spread over sampler
  seeds is reported beside it.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from faceclip_zoo.synthetic.world import TEST_WORLD_SEEDS, check_world_seed

TEST_PEOPLE = 20
BOOTSTRAP = 2000


def render_test_world(like, seed: int, people: int = TEST_PEOPLE) -> list[dict]:
    """One test world's samples, decoded exactly as the training shards are (schema.py):
    image (scene), face (the SPSV reference: another sample's aligned crop), caption,
    identity. `like` is the training world's SyntheticSpec."""
    from faceclip_zoo.data.schema import decode_sample, make_sample
    from faceclip_zoo.synthetic.world import generate, reference_of

    spec = dataclasses.replace(like, seed=seed, train_identities=0, val_identities=people, guided_pairs=0)
    records = generate(spec)["val"]
    samples = []
    for i, rec in enumerate(records):
        raw = make_sample(f"test{seed}-{rec.key}", rec.scene, rec.caption,
                          reference_of(records, i, spec.samples_per_identity), rec.identity, frames=rec.frames)
        samples.append(decode_sample(raw, spec.image_size, spec.face_size))
    return samples


def gallery_similarities(embed: Callable[[torch.Tensor], torch.Tensor], faces_of_images: torch.Tensor,
                         references: torch.Tensor, identities: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of every image's face with every person's gallery [N, P] and each image's own
    person index [N]. Image i's own gallery leaves out its own conditioning crop
    (references[i]); the other galleries hold all of their person's references."""
    names = sorted(set(identities))
    own = torch.tensor([names.index(n) for n in identities])
    ref = embed(references).float()
    sums = torch.zeros(len(names), ref.shape[-1]).index_add_(0, own, ref)
    galleries = F.normalize(sums, dim=-1).expand(len(identities), -1, -1).clone()  # [N, P, D]
    galleries[torch.arange(len(own)), own] = F.normalize(sums[own] - ref, dim=-1)
    emb = F.normalize(embed(faces_of_images).float(), dim=-1)
    return torch.einsum("nd,npd->np", emb, galleries), own


def person_bootstrap(values: torch.Tensor, identities: list[str], resamples: int = BOOTSTRAP,
                     seed: int = 0) -> float:
    """Standard error of the mean of per-image `values`, people resampled with replacement."""
    names = sorted(set(identities))
    idx = torch.tensor([names.index(n) for n in identities])
    sums = torch.zeros(len(names), dtype=torch.float64).index_add_(0, idx, values.double())
    counts = torch.bincount(idx, minlength=len(names)).double()
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randint(len(names), (resamples, len(names)), generator=gen)
    means = sums[draw].sum(1) / counts[draw].sum(1)
    return means.std(unbiased=True).item()


def identity_under(judge: Callable, images: torch.Tensor, samples: list[dict], scene_scale: float) -> dict:
    """One judge on one image set (a multiple of the samples, seed-major): top-1, Face Sim
    and margin per image -> mean, +- over people, and the spread over seeds. Clips
    ([M, F, 3, H, W]): every frame is judged and each number averaged over the frames; their
    identity consistency is the mean cosine of each later frame's face with the first's."""
    from faceclip_zoo.synthetic.scenes import scene_face_crop

    n = len(samples)
    seeds = len(images) // n
    refs = torch.stack([s["face"] for s in samples])
    identities = [s["identity"] for s in samples]
    per_seed = defaultdict(list)
    with torch.no_grad():
        for k in range(seeds):
            chunk = images[k * n:(k + 1) * n]
            frames = chunk.unbind(1) if chunk.dim() == 5 else (chunk,)
            per_frame = defaultdict(list)
            for frame in frames:
                sims, own = gallery_similarities(judge, scene_face_crop(frame, scene_scale=scene_scale), refs,
                                                 identities)
                own_sim = sims[torch.arange(n), own]
                other = (sims.sum(1) - own_sim) / (sims.shape[1] - 1)
                per_frame["identity_top1"].append((sims.argmax(1) == own).float())
                per_frame["face_sim"].append(own_sim)
                per_frame["identity_margin"].append(own_sim - other)
            for name, values in per_frame.items():
                per_seed[name].append(torch.stack(values).mean(0))
            if len(frames) > 1:
                # where identity is lost: at the first frame (drawn alone) or drifting after it
                per_seed["top1_by_frame"].append(torch.stack(per_frame["identity_top1"]).mean(1))  # [F]
                emb = torch.stack([F.normalize(judge(scene_face_crop(f, scene_scale=scene_scale)).float(), dim=-1)
                                   for f in frames])  # [F, n, D]
                per_seed["identity_consistency"].append((emb[1:] * emb[:1]).sum(-1).mean(0))
    out = {"chance_top1": 1 / len(set(identities)), "images": len(images), "seeds": seeds}
    if "top1_by_frame" in per_seed:
        out["identity_top1_by_frame"] = torch.stack(per_seed.pop("top1_by_frame")).mean(0).tolist()
    for name, runs in per_seed.items():
        values = torch.stack(runs).mean(0)  # per image, over seeds
        out[name] = values.mean().item()
        out[f"{name}_se_people"] = person_bootstrap(values, identities)
        if seeds > 1:  # one seed has no spread to report
            out[f"{name}_seed_spread"] = torch.stack([r.mean() for r in runs]).std().item()
    return out


def _background_hits(images: torch.Tensor, samples: list[dict]) -> torch.Tensor:
    from faceclip_zoo.synthetic.scenes import background_of, caption_background

    n = len(samples)
    if images.dim() == 5:  # a clip: every frame
        return torch.stack([_background_hits(images[:, f], samples) for f in range(images.shape[1])]).mean(0)
    hits = [float(p == caption_background(samples[i % n]["caption"])) for i, p in enumerate(background_of(images))]
    return torch.tensor(hits).view(-1, n).mean(0)  # per sample, over seeds


def score_world(judges: dict[str, Callable], sets: dict[str, torch.Tensor], samples: list[dict],
                scene_scale: float, reader=None) -> dict:
    """Every image set (generated, generated with the face zeroed, the real scenes) under
    every judge, the background the captions name (read from the corners), and with a
    caption reader every captioned attribute, each with its chance (attributes.py)."""
    from faceclip_zoo.evaluation.attributes import attribute_hits, majority_chance
    from faceclip_zoo.synthetic.faces import BACKGROUNDS

    identities = [s["identity"] for s in samples]
    captions = [s["caption"] for s in samples]
    out = {}
    for name, images in sets.items():
        hits = _background_hits(images, samples)
        out[name] = {"judges": {j: identity_under(fn, images, samples, scene_scale) for j, fn in judges.items()},
                     "background_accuracy": hits.mean().item(),
                     "background_accuracy_se_people": person_bootstrap(hits, identities),
                     "chance_background": 1 / len(BACKGROUNDS)}
        if reader is not None:
            chance = majority_chance(captions)
            out[name]["attributes"] = {
                attr: {"accuracy": h.mean().item(), "se_people": person_bootstrap(h, identities),
                       "chance": chance[attr]}
                for attr, h in attribute_hits(reader, images, captions).items()}
    return out


def mean_over_worlds(worlds: dict[int, dict]) -> dict:
    """Each number's mean over the test worlds, its +- over people combined over the
    (independent) worlds: sqrt(sum se^2) / W."""
    first = next(iter(worlds.values()))
    w = len(worlds)

    def combine(get) -> tuple[float, float]:
        values = [get(r) for r in worlds.values()]
        return sum(v[0] for v in values) / w, (sum(v[1] ** 2 for v in values) ** 0.5) / w

    out = {}
    for set_name, r in first.items():
        entry = {"judges": {}}
        for judge in r["judges"]:
            entry["judges"][judge] = {}
            for metric in ("identity_top1", "face_sim", "identity_margin", "identity_consistency"):
                if metric not in r["judges"][judge]:  # consistency: clips only
                    continue
                m, se = combine(lambda x: (x[set_name]["judges"][judge][metric],
                                           x[set_name]["judges"][judge][f"{metric}_se_people"]))
                entry["judges"][judge][metric], entry["judges"][judge][f"{metric}_se_people"] = m, se
            entry["judges"][judge]["chance_top1"] = r["judges"][judge]["chance_top1"]
            if "identity_top1_by_frame" in r["judges"][judge]:
                by_frame = [x[set_name]["judges"][judge]["identity_top1_by_frame"] for x in worlds.values()]
                entry["judges"][judge]["identity_top1_by_frame"] = [sum(v) / w for v in zip(*by_frame)]
        m, se = combine(lambda x: (x[set_name]["background_accuracy"], x[set_name]["background_accuracy_se_people"]))
        entry.update(background_accuracy=m, background_accuracy_se_people=se, chance_background=r["chance_background"])
        if "attributes" in r:
            entry["attributes"] = {}
            for attr in r["attributes"]:
                m, se = combine(lambda x: (x[set_name]["attributes"][attr]["accuracy"],
                                           x[set_name]["attributes"][attr]["se_people"]))
                chance = sum(x[set_name]["attributes"][attr]["chance"] for x in worlds.values()) / w
                entry["attributes"][attr] = {"accuracy": m, "se_people": se, "chance": chance}
        out[set_name] = entry
    return out


def markdown(report: dict) -> str:
    """results.md of the protocol: per judge, per world and their mean."""
    where = ("The validation world (the training world's held-out split: what configurations are chosen on; "
             "the protocol's numbers are the test worlds'), " if report.get("protocol") == "validation world"
             else "Test worlds (seeds no recipe trains or validates on), ")
    lines = [where + f"{report['people_per_world']} people each; +- is a bootstrap over people; "
             "the seed spread is the standard deviation of top-1 over sampler seeds.", ""]
    clips = "identity_consistency" in report["mean"]["generated"]["judges"][next(iter(report["judges"]))]
    if clips:
        lines += ["Clips: every number is averaged over the frames; consistency is the mean cosine of each later "
                  "frame's face with the first frame's (generated / real clips).", ""]
    for judge, label in report["judges"].items():
        lines += [f"### {judge}: {label}", "", "| world | generated top-1 | seed spread | face zeroed top-1 | "
                  "real scenes top-1 | through the VAE | Face Sim | background |" + (" consistency |" if clips else ""),
                  "|---|---|---|---|---|---|---|---|" + ("---|" if clips else "")]
        rows = [*((str(seed), r) for seed, r in report["worlds"].items())]
        rows += [("mean", report["mean"])] if len(rows) > 1 else []
        for name, r in rows:
            g, z, real, vae = (r[s]["judges"][judge] for s in ("generated", "generated_no_face", "real",
                                                                 "vae_round_trip"))
            spread = f"{g['identity_top1_seed_spread']:.3f}" if "identity_top1_seed_spread" in g else "-"
            consistency = (f" {g['identity_consistency']:.3f} / {real['identity_consistency']:.3f} |"
                           if clips else "")
            lines.append(f"| {name} | {g['identity_top1']:.3f} +- {g['identity_top1_se_people']:.3f} | {spread} | "
                         f"{z['identity_top1']:.3f} +- {z['identity_top1_se_people']:.3f} | "
                         f"{real['identity_top1']:.3f} | {vae['identity_top1']:.3f} | {g['face_sim']:.3f} +- {g['face_sim_se_people']:.3f} | "
                         f"{r['generated']['background_accuracy']:.3f} +- "
                         f"{r['generated']['background_accuracy_se_people']:.3f} |" + consistency)
        lines += ["", f"chance: top-1 {report['mean']['generated']['judges'][judge]['chance_top1']:.3f}, "
                      f"background {report['mean']['generated']['chance_background']:.2f}", ""]
        if clips:
            by_frame = {s: " ".join(f"{v:.2f}" for v in report["mean"][s]["judges"][judge]["identity_top1_by_frame"])
                        for s in ("generated", "real", "vae_round_trip")}
            lines += [f"top-1 by frame (first to last): generated {by_frame['generated']}; "
                      f"real {by_frame['real']}; through the VAE {by_frame['vae_round_trip']}", ""]
    mean = report["mean"]
    if "attributes" in mean["generated"]:
        over = "the validation world" if report.get("protocol") == "validation world" else "mean over the test worlds"
        lines += [f"### Caption following ({over}; the caption reader's reading)", "",
                  "| attribute | generated | face zeroed | real scenes | chance (most common value) |",
                  "|---|---|---|---|---|"]
        for attr, g in mean["generated"]["attributes"].items():
            z, real = mean["generated_no_face"]["attributes"][attr], mean["real"]["attributes"][attr]
            lines.append(f"| {attr} | {g['accuracy']:.3f} +- {g['se_people']:.3f} | {z['accuracy']:.3f} | "
                         f"{real['accuracy']:.3f} | {g['chance']:.3f} |")
        lines.append("")
    judge = report.get("judge_scores")
    if judge:
        lines.append(f"Independent judge: verification accuracy {judge['verification_accuracy']:.3f} on "
                     f"{judge['pairs']} pairs of {judge['held_out_people']} judge-world people it never trained on.")
    return "\n".join(lines) + "\n"


JUDGE_LABELS = {
    "independent judge": "a ResNet trained on the judge world's people, in no train, validation or test world; "
                         "targets are read off it",
    "face-ID ViT": "the world's face-ID network: the conditioning network (the encoder reads identity from it and "
                   "regresses to it), so not an independent judge",
}


def world_spec_of_recipe(recipe: dict | None):
    """The SyntheticSpec of the world a recipe's SyntheticIdentities data section renders
    (the DataModule's defaults where it names none)."""
    import inspect

    from faceclip_zoo.synthetic.datamodule import SyntheticIdentities
    from faceclip_zoo.synthetic.world import SyntheticSpec

    data = (recipe or {}).get("data") or {}
    ours = str(data.get("class_path", "")).endswith("SyntheticIdentities")
    args = (data.get("init_args") or {}) if ours else {}
    defaults = {n: p.default for n, p in inspect.signature(SyntheticIdentities).parameters.items()}
    fields = {f.name for f in dataclasses.fields(SyntheticSpec)} - {"renderer_version"}
    return SyntheticSpec(**{name: args.get(name, defaults[name]) for name in fields if name in defaults})


def run_protocol(pipe, like, face_id: Callable, judge: Callable, judge_scores: dict | None = None, reader=None,
                 steps: int = 25, guidance: float | None = None, seed: int = 0, images_per_sample: int = 1,
                 worlds: tuple[int, ...] = TEST_WORLD_SEEDS, people: int = TEST_PEOPLE,
                 validation: list[dict] | None = None) -> tuple[dict, list, dict]:
    """The pipeline on every test world: generated with the face, with the face zeroed (same
    prompts and seeds: identity's floor), the real scenes (its ceiling) and the real scenes
    through the pipeline's VAE (the ceiling its denoiser works under), under both judges; per world and the mean. Returns (report, the first world's samples, its image
    sets) for the contact sheet. `validation` (the training world's held-out split) scores
    that split instead, the same way: what configurations are chosen on."""
    from faceclip_zoo.synthetic.scenes import generate_images, vae_round_trip

    check_world_seed(like.seed, "the pipeline's training world")
    judges = {"independent judge": judge, "face-ID ViT": face_id}
    per_world, first = {}, None
    for world in (("validation",) if validation is not None else worlds):
        samples = validation if validation is not None else render_test_world(like, world, people)
        sets = {name: generate_images(pipe, samples, with_face, steps, guidance, seed, images_per_sample=images_per_sample)
                for name, with_face in (("generated", True), ("generated_no_face", False))}
        sets["real"] = torch.stack([s["video"].transpose(0, 1) if "video" in s else s["image"] for s in samples])
        # the ceiling the denoiser works under: what its VAE keeps of the real scenes
        sets["vae_round_trip"] = vae_round_trip(pipe.vae, sets["real"])
        per_world[world] = score_world(judges, sets, samples, like.scene_scale, reader)
        first = first or (samples, sets)
    report = {"protocol": "validation world" if validation is not None else "test worlds", "worlds": per_world,
              "mean": mean_over_worlds(per_world), "judges": {name: JUDGE_LABELS[name] for name in judges},
              "people_per_world": len({s["identity"] for s in validation}) if validation is not None else people,
              "judge_scores": judge_scores, "world_like": dataclasses.asdict(like)}
    return report, *first


def _recipe_of(pipeline: str) -> dict | None:
    """The recipe a pipeline folder (recipe.yaml) or a fit checkpoint (the run's config.yaml)
    was trained with."""
    import yaml

    from faceclip_zoo.export import find_run_config

    path = find_run_config(Path(pipeline)) if str(pipeline).endswith(".ckpt") else Path(pipeline) / "recipe.yaml"
    try:
        return yaml.safe_load(Path(path).read_text()) if path else None
    except (OSError, yaml.YAMLError):
        return None


def on_test_worlds(pipeline: str, pipe, face_id, out: Path, size: int, steps: int, guidance: float | None,
                    seed: int, images_per_sample: int, judge_config=None, people: int | None = None,
                    reader_config=None, validation: list[dict] | None = None) -> dict:
    import json

    from faceclip_zoo.evaluation.attributes import ensure_reader
    from faceclip_zoo.evaluation.judge import ensure_judge
    from faceclip_zoo.synthetic.scenes import contact_sheet

    recipe = _recipe_of(pipeline)
    like = dataclasses.replace(world_spec_of_recipe(recipe), image_size=size)
    priors = ((recipe or {}).get("data") or {}).get("init_args", {}).get("priors_dir", "checkpoints/synthetic")
    judge, judge_scores = ensure_judge(priors, like, judge_config)
    reader, reader_scores = ensure_reader(priors, like, reader_config, judge_config)
    report, samples, sets = run_protocol(pipe, like, face_id, judge, judge_scores, reader, steps=steps,
                                         guidance=guidance,
                                         seed=seed, images_per_sample=images_per_sample, people=people or TEST_PEOPLE,
                                         validation=validation)
    report.update(benchmark="synthetic", pipeline=str(pipeline), caption_reader=reader_scores,
                  generation={"steps": steps, "seed": seed, "images_per_sample": images_per_sample,
                              "guidance": guidance if guidance is not None else getattr(pipe, "default_guidance", None),
                              "negative_prompt": ""})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    contact_sheet(samples, sets, out / "contact_sheet.png")
    return report
