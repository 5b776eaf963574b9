"""`python -m faceclip_zoo cache`: store frozen-model outputs in the shards, so training
skips the frozen forwards.

    python -m faceclip_zoo cache --recipe recipes/quickstart/faceclip.yaml
    python -m faceclip_zoo cache --recipe recipes/faceclip-sdxl/finetune.yaml --shards data/shards \
        --features vae_latents,prompt_embeds,pooled_prompt_embeds --out data/shards-cached

The recipe names the model whose frozen parts compute the features (its `CACHEABLE`:
arcface / clip_image / clip_text / face_identity / face_patches for the encoder modules,
vae_latents / prompt_embeds / pooled_prompt_embeds for SDXLJointModule) and the data settings (image_size, face_size,
buckets) that decide the crops: the cache holds exactly what training would compute. The
shards default to the recipe's data (train, val, guided).

Each shard is rewritten whole (every original member kept, `<key>.<feature>.npy` added)
through a temporary file and a rename, in place or into --out; samples that cannot be
decoded are kept as they are and counted. A shard that already holds the features is
skipped, so an interrupted run is re-run. The DataModules read the features when present
and the modules compute them otherwise. VAE latents are one sample of the latent
distribution, fixed for the whole run (the usual trade of latent caching), and random
crops, if any, are fixed too. The face ViT's patch tokens are the largest feature
(144 x 768 values, 221 kB in float16 per sample with a face, for FaceCLIP's ViT-L); they
spare the encoder step the face ViT's forward. cache.json beside the shards records what
made them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from typing import Optional, Union

import numpy as np
import torch
import yaml

from faceclip_zoo.cache_fingerprint import feature_fingerprints, recorded_fingerprints
from faceclip_zoo.data.schema import CACHED_FEATURES, FACE_FEATURES
from faceclip_zoo.utils import UserError, atomic_write_bytes

log = logging.getLogger(__name__)


def parse_recipe(recipe: str):
    """(parser, parsed config, seed) of a fit recipe's `model:` and `data:` sections, checked
    against the classes' signatures as `fit` checks them, nothing built yet."""
    import lightning as L
    from jsonargparse import ArgumentParser

    try:
        with open(recipe, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as exc:
        raise UserError(f"recipe not found: {recipe} ({exc.strerror})") from None
    if "model" not in cfg:
        raise UserError(f"{recipe} has no `model:` section (a fit recipe is needed)")
    parser = ArgumentParser(exit_on_error=False)
    # untyped arguments accepted as LightningCLI accepts them (torchao's AdamW8bit leaves
    # `params` untyped; the LoRA recipes name it)
    parser.add_subclass_arguments(L.LightningModule, "model", required=True, fail_untyped=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=False, fail_untyped=False)
    try:
        parsed = parser.parse_object({"model": cfg["model"], "data": cfg.get("data")})
    except Exception as exc:  # jsonargparse's message names the bad key, then (nested) why
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        skip = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")
        why = " ".join(line for line in lines if not line.startswith(skip))
        raise UserError(f"{recipe}: {why.split(' Got value:')[0][:800]}") from None
    return parser, parsed, cfg.get("seed_everything")


def build_from_recipe(recipe: str):
    """(LightningModule, LightningDataModule | None) as `fit --config recipe` builds them."""
    import lightning as L

    parser, parsed, seed = parse_recipe(recipe)
    if seed is not None and seed is not False:
        L.seed_everything(int(seed), verbose=False)  # as fit does: the same initial weights
    init = parser.instantiate_classes(parsed)
    return init.model, init.get("data")


def _npy(value: torch.Tensor, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value.detach().float().cpu().numpy().astype(dtype), allow_pickle=False)
    return buf.getvalue()


def _members(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}


def shard_generator(path: str, device) -> torch.Generator:
    """The random stream of one shard's features (VAE posterior samples), seeded by the
    shard's file name: the same whichever rank computes it."""
    seed = int.from_bytes(hashlib.sha256(os.path.basename(path).encode("utf-8")).digest()[:8], "little")
    return torch.Generator(device=device).manual_seed(seed & (2 ** 63 - 1))


def cache_shard(src: str, dest: str, module, names: list[str], image_size: int, face_size: int,
                buckets, batch_size: int, dtype: str, overwrite: bool, bar=None) -> dict:
    """Add `names` to every decodable sample of one shard; -> counts."""
    import webdataset as wds

    from faceclip_zoo.data.datamodule import collate
    from faceclip_zoo.data.schema import CorruptSample, decode_sample

    try:
        raws = [_members(r) for r in wds.DataPipeline(wds.SimpleShardList([src]), wds.tarfile_to_samples())]
    except Exception as exc:
        raise UserError(f"{src}: not a readable tar shard ({type(exc).__name__}: {exc})") from None

    def needs(raw: dict, name: str) -> bool:
        return name not in FACE_FEATURES or any(k.startswith("ref.") for k in raw)  # no face: no face features

    todo = [i for i, r in enumerate(raws) if overwrite or any(needs(r, n) and f"{n}.npy" not in r for n in names)]
    counts = {"samples": len(raws), "cached": 0, "already": len(raws) - len(todo), "undecodable": 0}
    generator = shard_generator(src, module.device)
    by_shape: dict[tuple, list[tuple[int, dict]]] = defaultdict(list)
    for i in todo:
        try:
            sample = decode_sample(raws[i], image_size, face_size, buckets)
        except CorruptSample:
            counts["undecodable"] += 1  # kept as it is; the loader skips and counts it
            if bar is not None:
                bar.update()
            continue
        by_shape[tuple(sample["image"].shape)].append((i, sample))
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            batch = collate([s for _, s in chunk])
            for name in CACHED_FEATURES:
                batch.pop(name, None)  # never feed old cached values into the computation
            feats = module.frozen_features(batch, names, generator=generator)
            for row, (i, sample) in enumerate(chunk):
                for name, value in feats.items():
                    if needs(raws[i], name) and (name not in FACE_FEATURES or sample["has_face"]):
                        raws[i][f"{name}.npy"] = _npy(value[row], dtype)
                counts["cached"] += 1
            if bar is not None:
                bar.update(len(chunk))
    if not todo:
        if os.path.abspath(src) != os.path.abspath(dest):
            shutil.copyfile(src, dest + ".tmp")
            os.replace(dest + ".tmp", dest)
        return counts
    tmp = dest + ".tmp"
    with wds.TarWriter(tmp, mtime=0) as sink:
        for raw in raws:
            sink.write(raw)
    os.replace(tmp, dest)
    return counts


def tar_damage(path: str) -> str | None:
    """Why a tar shard is damaged (truncated, unreadable), or None. A tar cut at a member
    boundary still reads as a shorter valid archive, so the end-of-archive marker (two zero
    blocks, which tar writers always add) is required too. Hand-written: webdataset reads
    what it can and stops silently, tarfile tolerates a missing marker."""
    import tarfile

    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return f"truncated ({size} bytes: not whole 512-byte tar blocks with an end marker)"
    with open(path, "rb") as f:
        f.seek(size - 1024)
        if f.read(1024).count(0) != 1024:
            return "truncated (no end-of-archive marker)"
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                if member.isfile():
                    tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"unreadable ({exc})"
    return None


def _default_shards(data) -> list[str]:
    if data is None:
        raise UserError("the recipe has no `data:` section; name the shards with --shards")
    if hasattr(data, "prepare_data"):
        data.prepare_data()  # e.g. the synthetic identities render their shards here
    specs = [getattr(data, a, None) for a in ("train_spec", "val_spec", "guided_spec")]
    return [s for s in specs if s]


def cache(
    recipe: str,
    shards: Optional[Union[str, list[str]]] = None,
    features: Optional[str] = None,
    out: Optional[str] = None,
    batch_size: int = 32,
    dtype: str = "float16",
    overwrite: bool = False,
    device: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    progress: bool = True,
) -> dict:
    """Precompute frozen-model outputs into shards (see the module docstring).

    Args:
        recipe: the fit recipe whose model and data settings define the features.
        shards: shard folders / files / globs (default: the recipe's train, val and guided shards).
        features: comma-separated names (default: everything the recipe's model can cache).
        out: write the cached shards here (default: rewrite the shards in place).
        batch_size: samples per frozen forward.
        dtype: storage dtype of the .npy members (float16 or float32).
        overwrite: recompute features a shard already holds.
        device: auto (CUDA when available), cpu, cuda, cuda:1, ...
        devices, num_nodes: run as Lightning's predict loop on devices x num_nodes processes
            (DDP; launched like `fit`: directly, or under recipes/launch with COMMAND=cache),
            each rank rewriting every world_size-th shard; rank 0 writes cache.json. The
            features equal a one-process run's (per-shard random streams).
    """
    from tqdm import tqdm

    from faceclip_zoo.data.datamodule import resolve_shards

    if dtype not in ("float16", "float32"):
        raise UserError(f"dtype must be float16 or float32, got {dtype!r}")
    module, data = build_from_recipe(recipe)
    cacheable = tuple(getattr(module, "CACHEABLE", ()))
    if not cacheable:
        raise UserError(f"{type(module).__name__} has no frozen outputs to cache")
    names = [n.strip() for n in features.split(",") if n.strip()] if features else list(cacheable)
    unknown = [n for n in names if n not in cacheable]
    if unknown:
        raise UserError(f"{type(module).__name__} cannot cache {unknown}; it can cache {list(cacheable)}")
    image_size = getattr(data, "image_size", 224)
    face_size = getattr(data, "face_size", 112)
    buckets = getattr(data, "buckets", None)
    specs = [shards] if isinstance(shards, str) else (shards or _default_shards(data))
    paths = [p for spec in specs for p in resolve_shards(spec, "input")]
    # an input is rewritten in place (or copied): a damaged one would come back shorter and
    # valid-looking, its lost samples gone for good; so every input is checked before anything is written
    damaged = [f"{p}: {why}" for p in paths if (why := tar_damage(p))]
    if damaged:
        raise UserError(f"{len(damaged)} input shard(s) damaged, nothing written: {'; '.join(damaged[:3])}"
                        f"{' ...' if len(damaged) > 3 else ''}; make them again (prepare) or leave them out (--shards)")

    jobs = []
    for i, path in enumerate(paths):
        folder = os.path.dirname(os.path.abspath(path))
        dest_dir = folder if out is None else os.path.join(out, os.path.basename(folder))
        os.makedirs(dest_dir, exist_ok=True)
        jobs.append((i, path, os.path.join(dest_dir, os.path.basename(path))))
    module.setup("fit")  # the weights, loaded once: their fingerprints go into cache.json
    fingerprints = feature_fingerprints(module, names)
    stale = {d: s for d in dict.fromkeys(os.path.dirname(dest) for _, _, dest in jobs)
             if (s := [n for n in names if recorded_fingerprints(d).get(n, fingerprints.get(n)) != fingerprints.get(n)])}
    for folder, what in stale.items():
        log.warning("%s: %s were cached by other frozen weights; recomputing them", folder, ", ".join(what))
    options = dict(image_size=image_size, face_size=face_size, buckets=buckets, batch_size=batch_size, dtype=dtype,
                   overwrite=overwrite or bool(stale))
    t0 = time.time()
    if devices * num_nodes > 1:
        results = _cache_distributed(module, names, jobs, options, device, devices, num_nodes, progress)
        if results is None:
            return {}  # not rank 0: rank 0 writes cache.json
    else:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        module.to(dev).eval()
        with tqdm(unit="sample", desc="cache " + ",".join(names), disable=not progress) as bar:
            results = [cache_shard(src, dest, module, names, bar=bar, **options) for _, src, dest in jobs]
    total = {"samples": 0, "cached": 0, "already": 0, "undecodable": 0}
    per_folder: dict[str, dict] = defaultdict(dict)
    for (_, _, dest), counts in zip(jobs, results):
        per_folder[os.path.dirname(dest)][os.path.basename(dest)] = counts
        for k in total:
            total[k] += counts[k]
    for dest_dir, shard_counts in per_folder.items():
        record = {"features": names, "dtype": dtype, "recipe": os.path.abspath(recipe),
                  "model": type(module).__name__, "hparams": _jsonable(dict(module.hparams)),
                  "fingerprints": {**recorded_fingerprints(dest_dir), **fingerprints},
                  "image_size": image_size, "face_size": face_size, "buckets": buckets,
                  "shards": shard_counts, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_bytes(os.path.join(dest_dir, "cache.json"), json.dumps(record, indent=1).encode("utf-8"))
    total["seconds"] = round(time.time() - t0, 1)
    total["features"] = names
    return total


def _cache_distributed(module, names: list[str], jobs: list[tuple], options: dict, device: str, devices: int,
                       num_nodes: int, progress: bool) -> list[dict] | None:
    """The jobs over devices x num_nodes ranks (faceclip_zoo.tasks.cache); every shard's
    counts on rank 0 (in job order), None on the other ranks."""
    import lightning as L
    import torch.distributed as dist

    from faceclip_zoo.data.prepare_share import InputShare
    from faceclip_zoo.tasks.cache import CacheTask

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"with devices / num_nodes, device is auto, cpu or cuda (each rank takes its own), "
                        f"not {device!r}")
    accelerator = "cpu" if device == "cpu" or not torch.cuda.is_available() else "cuda"
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp",
                        logger=False, enable_checkpointing=False, enable_progress_bar=progress,
                        enable_model_summary=False, use_distributed_sampler=False)
    batches = trainer.predict(CacheTask(module, names, options, cache_shard), datamodule=InputShare(jobs, batch_size=1),
                              return_predictions=True)
    mine = [done for batch in batches for done in batch]
    gathered: list = [None] * trainer.world_size
    dist.all_gather_object(gathered, mine)
    if trainer.global_rank != 0:
        return None
    by_index = dict(done for part in gathered for done in part)
    return [by_index[i] for i, _, _ in jobs]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
