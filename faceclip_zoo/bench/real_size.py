"""`bench --only real-size`: every production recipe through `fit`, unchanged but for its
weight and data paths, on stand-in weights (bench/standins.py) and shards `prepare` made
from real photos; a few optimizer steps each, in a process of its own so its peak memory
is its own.

    python -m faceclip_zoo standins --out standins                      # once: the stand-in weights
    python -m faceclip_zoo bench --only real-size --size real --device cpu --standins standins
    python -m faceclip_zoo bench --only real-size --size real --device cuda --standins standins --steps 20
    python -m faceclip_zoo bench --only real-size --size tiny          # the dry run (stand-ins made on the fly)

What changes besides the paths, per run, is recorded with the result ("overrides"): run
control (steps, one device, no loggers or checkpoints, no validation), the batch and the
resolution where the machine needs them smaller, and on a CPU the precision: bf16 matmuls
on a CPU without bf16 units run at under 1 GFLOP/s (127 in float32 on this repository's
2-core machine), so a CPU run computes in float32 (trainer.precision 32-true, base_dtype
null), which makes its resident memory an upper bound of the bf16 recipe's. Each run's
StepProbe (bench/step_probe.py) writes parameters, memory, step times, losses, and whether
trained weights changed and frozen ones stayed bitwise the same.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from faceclip_zoo.bench.harness import fmt_mem
from faceclip_zoo.utils import RECIPES_DIR, UserError


@dataclass(frozen=True)
class RecipeRun:
    """How one production recipe runs at real size.

    paths: recipe keys whose values are weight paths (`weights/...`, `checkpoints/...`):
        they are moved under the stand-in root, nothing else about them changes.
    sets: the stand-in sets those paths need.
    tiny: what the dry run changes besides (the tiny configs of the same classes).
    batch: the batch of the run (the recipe's per-device batch when it fits).
    cpu_resolution: the image side of a CPU run (None: the recipe's).
    cpu_cannot_step: why a real-size CPU run only loads (the arithmetic), or None.
    cpu_block_check: with cpu_cannot_step, also run one real FLUX block pair forward and
        backward (`flux_block_check`); other families only load.
    cpu_reduced: what a real-size CPU run's fit changes because the whole does not fit
        here (it still loads the whole, as the recipe does, in the load-only process).
    cpu_reduced_why: the arithmetic behind `cpu_reduced`.
    """

    recipe: str
    sets: tuple[str, ...]
    paths: tuple[str, ...]
    tiny: dict[str, Any] = field(default_factory=dict)
    batch: int = 1
    cpu_resolution: int | None = None
    cpu_cannot_step: str | None = None
    cpu_block_check: bool = False
    cpu_reduced: dict[str, Any] = field(default_factory=dict)
    cpu_reduced_why: str | None = None


_M = "model.init_args."


def _facet5_pretrain(recipe: str, t5_set: str, tiny_encoder: str, why: str) -> RecipeRun:
    """A FaceT5 pre-training recipe: on a CPU its fit runs the frozen T5 at 2 of 24 blocks."""
    return RecipeRun(recipe, ("pretrain-inputs", t5_set),
                     (_M + "t5_weights", _M + "t5_tokenizer", _M + "face_encoder_weights", _M + "clip_weights"),
                     tiny={_M + "encoder": tiny_encoder, _M + "clip": "clip-tiny", "data.init_args.image_size": 64},
                     batch=2, cpu_reduced={_M + "encoder_overrides": {"t5_num_layers": 2}, _M + "t5_weights": None},
                     cpu_reduced_why=why)


RUNS: dict[str, RecipeRun] = {
    "faceclip-sdxl/lora-24gb": RecipeRun(
        "faceclip-sdxl/lora-24gb", ("sdxl-base", "faceclip-release"),
        (_M + "encoder_l", _M + "encoder_g", _M + "unet_weights", _M + "vae_weights"),
        tiny={_M + "unet": "sdxl-unet-tiny", _M + "vae": "vae-tiny", "data.init_args.image_size": 64,
              "data.init_args.buckets": [[64, 64]]}),
    "faceclip-l14/pretrain": RecipeRun(
        "faceclip-l14/pretrain", ("pretrain-inputs",),
        (_M + "face_encoder_weights", _M + "clip_weights"),
        tiny={_M + "encoder": "faceclip-tiny", _M + "clip": "clip-tiny", "data.init_args.image_size": 64},
        batch=4),
    "faceclip-bigg14/pretrain": RecipeRun(
        "faceclip-bigg14/pretrain", ("pretrain-inputs",),
        (_M + "face_encoder_weights", _M + "clip_weights"),
        tiny={_M + "encoder": "faceclip-tiny", _M + "clip": "clip-tiny", "data.init_args.image_size": 64},
        batch=4),
    "facet5-flux/lora-24gb": RecipeRun(
        "facet5-flux/lora-24gb", ("flux-dev", "facet5-release"),
        (_M + "encoder", _M + "t5_tokenizer", _M + "clip_text", _M + "clip_tokenizer", _M + "transformer_weights",
         _M + "vae_weights"),
        tiny={_M + "transformer": "flux-transformer-tiny", _M + "vae": "vae-tiny", "data.init_args.image_size": 64,
              "data.init_args.buckets": [[64, 64]]},
        cpu_cannot_step="a CPU step computes in float32: the 11.9 B transformer alone is 47.6 GB in float32 "
                        "(23.8 GB in the recipe's bf16, 11.9 GB in its int8), over this machine's 23 GB; "
                        "the recipe's own loading (bf16 files, int8 quantisation) is measured instead",
        cpu_block_check=True),
    "facet5-xxl/pretrain": _facet5_pretrain(
        "facet5-xxl/pretrain", "flux-dev-t5", "facet5-tiny",
        "a CPU step computes in float32: the frozen T5-XXL encoder is 19.0 GB in float32 (4.76 B x 4 bytes) and "
        "the trained fuser and heads (1.02 B) hold 16.4 GB of float32 weights, gradients and AdamW moments: 35 GB "
        "before activations, over this machine's 23 GB. The fit keeps every trained parameter and the 512-token "
        "sequence at real size with 2 of T5's 24 frozen blocks (initialised randomly: 2 blocks of the 24-block "
        "file do not load strictly); the whole, with its real weights, is loaded as the recipe loads it by the "
        "load-only process"),
    "facet5-wan/lora-24gb": RecipeRun(
        "facet5-wan/lora-24gb", ("wan-1.3b", "facet5-umt5"),
        (_M + "encoder", _M + "t5_tokenizer", _M + "transformer_weights", _M + "vae_weights"),
        tiny={_M + "transformer": "wan-transformer-tiny", _M + "vae": "wan-vae-tiny", "data.init_args.image_size": 64,
              "data.init_args.buckets": [[64, 64]]},
        # the GPU call steps it on `prepare`'s photos, one-frame clips (Wan trains on images
        # too) in the recipe's buckets; an 81-frame clip's activations are the recipe's arithmetic
        cpu_cannot_step="a CPU step computes in float32: FaceT5's face ViT, projections and fuser (1.37 B) and "
                        "umT5's 1.05 B-entry vocabulary table, bf16 in the recipe, take 9.7 GB in float32 beside "
                        "6.1 GB of int8 weights and the quantisation's transients: the fit was killed for memory "
                        "(rc -9) on this 23 GB machine; the recipe's own loading (bf16 files, int8) is measured"),
    "facet5-umt5-xxl/pretrain": _facet5_pretrain(
        "facet5-umt5-xxl/pretrain", "wan-umt5", "facet5-umt5-tiny",
        "as facet5-xxl/pretrain: the frozen umT5-XXL is 22.7 GB in float32 (5.68 B x 4 bytes) besides 16.4 GB of "
        "trained state; umT5 at 2 of its 24 blocks (random), every trained parameter and the 512-token sequence at "
        "real size; the whole loaded by the load-only process"),
}

# bf16 dense peak FLOP/s of the cards a GPU call may get (their data sheets), for MFU
BF16_PEAK = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12}


def bf16_peak(device_name: str | None) -> float | None:
    for key, peak in BF16_PEAK.items():
        if device_name and key in device_name:
            return peak
    return None


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _get(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def run_recipe(run: RecipeRun, *, size: str, device: str, standins: Path, shards: Path, work: Path, steps: int,
               resolution: int | None, timeout: float) -> dict:
    """One recipe's fit in its own process -> the StepProbe's report plus what was overridden."""
    recipe = yaml.safe_load((RECIPES_DIR / f"{run.recipe}.yaml").read_text())
    overrides: dict[str, Any] = {}
    for key in run.paths:
        overrides[key] = str(standins / _get(recipe, key))
    data = recipe["data"]["init_args"]
    overrides.update({"data.init_args.train": str(shards), "data.init_args.val": str(shards),
                      "data.init_args.num_workers": 0, "data.init_args.batch_size": run.batch,
                      "data.init_args.shuffle_buffer": 8})
    if data.get("guided"):
        overrides["data.init_args.guided"] = str(shards)
    side = resolution or (run.cpu_resolution if device == "cpu" else None)
    if side and side != data.get("image_size"):
        overrides["data.init_args.image_size"] = side
        if data.get("buckets"):
            overrides["data.init_args.buckets"] = [[side, side]]
    if size == "tiny":
        overrides.update(run.tiny)
    if device == "cpu":
        # bf16 matmuls have no CPU units here (see the module docstring): compute in float32
        overrides["trainer.precision"] = "32-true"
        for key in ("base_dtype", "frozen_dtype"):
            if recipe["model"]["init_args"].get(key):
                overrides[_M + key] = None
    if size == "real" and device == "cpu" and run.cpu_reduced:
        reduced = run.cpu_reduced  # the fit only: the load-only process loads the whole
    else:
        reduced = {}
    report_file = work / f"{run.recipe.replace('/', '--')}.json"
    control = {"trainer.accelerator": "cpu" if device == "cpu" else "gpu", "trainer.devices": 1,
               "trainer.num_nodes": 1, "trainer.max_steps": steps, "trainer.limit_val_batches": 0,
               "trainer.num_sanity_val_steps": 0, "trainer.logger": False, "trainer.enable_checkpointing": False,
               "trainer.enable_progress_bar": False, "trainer.default_root_dir": str(work / "runs"),
               "trainer.callbacks": [{"class_path": "faceclip_zoo.bench.step_probe.StepProbe",
                                      "init_args": {"out": str(report_file),
                                                    "count_flops_at": 1 if steps > 2 else None}}]}
    resolved = copy.deepcopy(recipe)
    resolved["trainer"].pop("strategy", None)  # one device: Lightning's default
    resolved["trainer"].pop("plugins", None)  # checkpoint IO: nothing is saved here
    for key, value in {**overrides, **reduced, **control}.items():
        _set(resolved, key, value)
    config = work / f"{run.recipe.replace('/', '--')}.yaml"
    config.write_text(yaml.safe_dump(resolved, sort_keys=False))
    report_file.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # the host memory of loading, in the recipe's own dtypes (what a GPU run's host needs)
    as_recipe = copy.deepcopy(recipe)
    for key, value in overrides.items():
        if not (device == "cpu" and key in ("trainer.precision", _M + "base_dtype", _M + "frozen_dtype")):
            _set(as_recipe, key, value)
    load_config = work / f"{run.recipe.replace('/', '--')}.load.yaml"
    load_config.write_text(yaml.safe_dump(as_recipe, sort_keys=False))
    load_file = work / f"{run.recipe.replace('/', '--')}.load.json"
    load_file.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "faceclip_zoo.bench.real_size", str(load_config), str(load_file)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    load = json.loads(load_file.read_text()) if load_file.is_file() else {"error": (proc.stdout + proc.stderr)[-3000:]}
    result = {"recipe": f"recipes/{run.recipe}.yaml", "size": size, "device": device,
              "overrides": {k: v for k, v in overrides.items() if k not in run.paths},
              "paths": {k: overrides[k] for k in run.paths}, "load_as_recipe": load}
    if reduced:
        result.update(reduced=reduced, reduced_why=run.cpu_reduced_why)
    if size == "real" and device == "cpu" and run.cpu_cannot_step and not run.cpu_block_check:
        return {**result, "rc": "not stepped", "not_stepped": run.cpu_cannot_step}
    if size == "real" and device == "cpu" and run.cpu_cannot_step:
        init = recipe["model"]["init_args"]
        side = (recipe["data"]["init_args"].get("image_size") or 768) if resolution is None else resolution
        block = subprocess.run([sys.executable, "-m", "faceclip_zoo.bench.real_size", "--block", str(standins),
                                str(side), json.dumps(init.get("lora") or {}), str(init.get("quantize_base") or "")],
                               env=env, capture_output=True, text=True, timeout=timeout)
        try:
            block_report = json.loads(block.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            block_report = {"error": (block.stdout + block.stderr)[-3000:]}
        return {**result, "rc": "not stepped", "not_stepped": run.cpu_cannot_step, "block": block_report}
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "faceclip_zoo", "fit", "--config", str(config)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc.stderr or "")[-3000:]
    result.update(wall_seconds=round(time.time() - started, 1), rc=rc)
    if report_file.is_file():
        result.update(json.loads(report_file.read_text()))
        peak, times = bf16_peak(result.get("device_name")), sorted(result["step_seconds"])
        if peak and result.get("flops_per_step") and times:
            result["mfu"] = result["flops_per_step"] / times[len(times) // 2] / peak
    else:
        result["error"] = tail
    return result


def prepare_shards(folder: Path, photos: int, side: int) -> Path:
    """Shards `prepare` makes from real photos (skimage's astronaut, varied): what the runs read."""
    from faceclip_zoo.bench.prepare_photos import write_photos
    from faceclip_zoo.prepare import prepare

    out = folder / "shards"
    if (out / "manifest.json").is_file():
        return out
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    write_photos(str(folder / "photos"), photos, side)
    prepare(str(folder / "photos"), str(out), progress=False)
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| recipe | device | resolution, batch | parameters (trained / total) | resident after load / peak | "
             "CUDA peak | s/step | losses | trained changed | frozen unchanged |", "|---" * 10 + "|"]
    for r in results:
        if "not_stepped" in r:
            load = r["load_as_recipe"]
            block = r.get("block", {})
            pair = (f"; one real block pair at {block.get('side')} px: forward {block.get('forward_seconds')} s, "
                    f"backward {block.get('backward_seconds')} s, loss {block.get('loss')}" if block else "")
            lines.append(f"| {r['recipe']} | {r['device']} | not stepped: {r['not_stepped']}; loaded as the recipe "
                         f"loads in {load.get('seconds')} s, own memory peak {fmt_mem(load.get('peak_anon'))}"
                         f"{pair} |||||||")
            continue
        if "steps" not in r:
            lines.append(f"| {r['recipe']} | {r['device']} | failed (rc {r['rc']}): "
                         f"{r.get('error', '').strip().splitlines()[-1:] or ''} |||||||")
            continue
        side = r["overrides"].get("data.init_args.image_size", "recipe's")
        batch = r["overrides"].get("data.init_args.batch_size")
        times = r["step_seconds"]
        lines.append(
            f"| {r['recipe']} | {r['device']} {r['overrides'].get('trainer.precision', '(recipe precision)')} | "
            f"{side}, {batch}{'; fit reduced: ' + json.dumps(r['reduced']) if r.get('reduced') else ''} | "
            f"{r['params_trained'] / 1e6:.1f} M / {r['params_total'] / 1e9:.3f} B | "
            f"{fmt_mem(r['rss_after_load'])} / {fmt_mem(r['peak_rss'])} | {fmt_mem(r.get('cuda_peak'))} | "
            f"{', '.join(f'{t:.1f}' for t in times)} | {', '.join(f'{x:.4f}' for x in r['losses'])} | "
            f"{r['trained_tensors_changed']}/{r['trained_tensors']} | "
            f"{r['frozen_tensors'] - r['frozen_tensors_changed']}/{r['frozen_tensors']} |")
    return "\n".join(lines)


def failures(results: list[dict], data: dict | None = None) -> list[str]:
    """What a run must show: it stepped, every loss finite, the trained weights changed, the
    frozen ones bitwise unchanged; `prepare` accepted every photo and `cache` cached."""
    bad = []
    for p in (data or {}).get("prepare", []):
        if p["accepted"] != p["photos"]:
            bad.append(f"prepare (detect_batch_size {p['batch']}) accepted {p['accepted']} of {p['photos']} photos")
    if data and data.get("cache", {"cached": 1})["cached"] == 0:
        bad.append("cache cached no sample")
    for r in results:
        name = r["recipe"]
        if "error" in r.get("load_as_recipe", {}):
            bad.append(f"{name}: loading as the recipe failed")
        if "not_stepped" in r and "block" not in r:  # loading only (checked above)
            continue
        if "not_stepped" in r:
            block = r.get("block", {})
            if not (block.get("loss_finite") and block.get("adapter_grads_finite_nonzero")):
                bad.append(f"{name}: its real block's forward and backward failed ({str(block)[:300]})")
            continue
        if "steps" not in r:
            bad.append(f"{name} failed (rc {r['rc']})")
        elif not r["loss_finite"]:
            bad.append(f"{name}: non-finite loss {r['losses']}")
        elif r["trained_tensors_changed"] == 0 or r["frozen_tensors_changed"]:
            bad.append(f"{name}: {r['trained_tensors_changed']}/{r['trained_tensors']} trained tensors changed, "
                       f"{r['frozen_tensors_changed']} frozen ones changed (e.g. {r['frozen_changed_examples']})")
    return bad


def run(size: str = "tiny", device: str = "cpu", standins: str | None = None, recipes: str | None = None,
        steps: int | None = None, resolution: int | None = None, work: str | None = None,
        timeout: float = 3600.0, data: bool = True) -> tuple[list[dict], dict | None]:
    """Every (or the named) production recipe at `size` -> (results, data rates) (also
    work/results.json, work/data.json). `data`: also measure `prepare` and `cache` on the
    device (bench/real_size_data.py; `cache` with the SDXL LoRA recipe when it ran)."""
    from faceclip_zoo.bench.standins import standins as write_standins

    if size not in ("tiny", "real"):
        raise UserError(f"real-size runs take --size real (or tiny for the dry run), got {size!r}")
    names = [n.strip() for n in (recipes or ",".join(RUNS)).split(",") if n.strip()]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        raise UserError(f"real-size: unknown recipe(s) {unknown}; known: {sorted(RUNS)}")
    work = Path(work or f"runs/bench-real-size-{size}")
    work.mkdir(parents=True, exist_ok=True)
    root = Path(standins or work / "standins")
    sets = sorted({s for n in names for s in RUNS[n].sets})
    if size == "tiny" or standins is None:
        write_standins(out=str(root), only=",".join(sets), size=size)
    else:
        made = json.loads((root / "standins.json").read_text()) if (root / "standins.json").is_file() else {}
        missing = [s for s in sets if s not in made.get("sets", {})]
        if missing or made.get("size") != size:
            raise UserError(f"{root} lacks the {size} stand-in set(s) {missing or sets}: run `python -m faceclip_zoo "
                            f"standins --out {root} --only {','.join(sets)} --size {size}` first")
    shards = prepare_shards(work, photos=4, side=1024 if size == "real" else 512)
    steps = steps or 2
    results: list[dict] = []
    rates = None
    sdxl = "faceclip-sdxl/lora-24gb"

    def measure_data(cache_config: Path | None) -> dict:
        from faceclip_zoo.bench import real_size_data

        report = real_size_data.data_rates(device, size, work.resolve(), cache_config)
        print("\n" + real_size_data.markdown(report), flush=True)
        return report

    for name in names:
        result = run_recipe(RUNS[name], size=size, device=device, standins=root.resolve(), shards=shards.resolve(),
                            work=work.resolve(), steps=steps, resolution=resolution, timeout=timeout)
        print(json.dumps({k: result.get(k) for k in ("recipe", "rc", "steps", "losses", "step_seconds",
                                                        "peak_rss", "cuda_peak")}), flush=True)
        results.append(result)
        # written after every run: a call stopped by its time limit keeps what it measured
        (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if data and name == sdxl:  # cache reads the SDXL LoRA run's config: measured right after it
            rates = measure_data(work.resolve() / "faceclip-sdxl--lora-24gb.yaml")
    if data and rates is None:
        rates = measure_data(None)
    print("\n" + markdown(results))
    return results, rates


def flux_block_check(standins: Path, side: int, lora: dict, quantize: str | None) -> dict:
    """One real FLUX.1-dev double block and one single block (with the embedders and the
    output head), their stand-in weights read from the sharded folder, the recipe's LoRA
    adapters on the recipe's quantised base, float32 compute: a forward and backward at the
    recipe's resolution, as a CPU can run where the whole 11.9 B model does not fit."""
    import torch
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    from faceclip_zoo.bench.standins import FLUX_DEV
    from faceclip_zoo.models.adapters import LoraSettings, add_lora, quantize_frozen
    from faceclip_zoo.models.diffusers_models import build_diffusers, resolve_diffusers_config
    from faceclip_zoo.models.weights import empty_weights, open_weights
    from faceclip_zoo.utils import load_strict

    folder = standins / FLUX_DEV / "transformer"
    config = {**resolve_diffusers_config(str(folder), "transformer"), "num_layers": 1, "num_single_layers": 1}
    with empty_weights():
        model = build_diffusers(config)
    files = open_weights(folder, "diffusion_pytorch_model", "transformer")
    wanted = set(model.state_dict())
    load_strict(model, files.renamed(lambda k: k if k in wanted else None), "transformer blocks 0", torch.float32)
    model.requires_grad_(False)
    if quantize:
        quantize_frozen(model, quantize)
    add_lora(model, LoraSettings.from_dict(lora), "transformer")
    model.enable_gradient_checkpointing()
    model.train()
    h = w = side // 16  # packed latent grid: VAE x8, then 2x2 patches
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, h * w, config["in_channels"], generator=g)
    started = time.time()
    out = model(hidden_states=latents, timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
                pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g),
                encoder_hidden_states=torch.randn(1, 512, config["joint_attention_dim"], generator=g),
                txt_ids=torch.zeros(512, 3), img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu",
                                                                                              torch.float32)).sample
    loss = (out.float() - latents).pow(2).mean()
    forward = time.time() - started
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return {"blocks": "transformer_blocks.0 + single_transformer_blocks.0 (+ embedders, head)",
            "params": sum(p.numel() for p in model.parameters()), "side": side, "tokens": h * w + 512,
            "forward_seconds": round(forward, 1), "backward_seconds": round(time.time() - started - forward, 1),
            "loss": float(loss), "loss_finite": bool(torch.isfinite(loss)),
            "adapter_grads_finite_nonzero": all(torch.isfinite(gr).all() for gr in grads if gr is not None)
            and any(gr is not None and bool(gr.abs().sum() > 0) for gr in grads)}


def load_report(config: str, out: str) -> dict:
    """Build a recipe's model as `fit` does and load its weights (its setup), nothing more:
    the host memory a run holds before its first step, in the recipe's own dtypes."""
    import torch

    from faceclip_zoo.bench.step_probe import AnonPeak, peak_rss_bytes, rss_bytes
    from faceclip_zoo.cache import build_from_recipe

    started = time.time()
    anon = AnonPeak().start()
    module, _ = build_from_recipe(config)
    built = rss_bytes()
    module.setup("fit")
    params = list(module.parameters())
    kinds: dict[str, int] = {}
    for p in params:  # a weight-only quantised tensor (torchao) states its original dtype: name its class
        kind = str(p.dtype).replace("torch.", "") if type(p.data) is torch.Tensor else type(p.data).__name__
        kinds[kind] = kinds.get(kind, 0) + p.numel()
    report = {"seconds": round(time.time() - started, 1), "rss_after_build": built, "rss": rss_bytes(),
              "rss_anon": rss_bytes("RssAnon"), "rss_file": rss_bytes("RssFile"), "peak_rss": peak_rss_bytes(),
              "peak_anon": anon.stop(), "params": sum(p.numel() for p in params), "params_by_kind": kinds}
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":  # the load-only and block-check subprocesses of run_recipe
    import logging

    logging.disable(logging.WARNING)
    if sys.argv[1] == "--block":
        print(json.dumps(flux_block_check(Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]),
                                          sys.argv[5] or None)))
    else:
        load_report(sys.argv[1], sys.argv[2])
