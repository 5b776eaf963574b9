"""`python -m faceclip_zoo bench`: print the comparison table.

    python -m faceclip_zoo bench                       # tiny, CPU, about five minutes
    python -m faceclip_zoo bench --size real --out runs/bench   # the released sizes, one GPU
    python -m faceclip_zoo bench --only encoder,data --repeats 10
    python -m faceclip_zoo bench --size real --only encoder --device cpu --encoder_batch 8

Every row: median seconds per unit of ours and of the peer, their ratio, and each side's
peak extra memory (see faceclip_zoo.bench.harness). A row whose work fails (e.g. out of
memory) is reported as failed and the run goes on; the exit status is then 1.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shlex
import time
import warnings
from pathlib import Path
from typing import Literal, Optional

import torch

from faceclip_zoo.bench.context import Context
from faceclip_zoo.bench.harness import Row, fmt_mem, machine, markdown, release_memory
from faceclip_zoo.bench.sizes import SIZES
from faceclip_zoo.utils import UserError, check_output_folder, require_at_least

SECTIONS = ("encoder", "diffusion", "lora", "inference", "data")
EXTRAS = ("align", "resume", "memory", "real-size")
# sections with rows that the default run leaves out
ROW_EXTRAS = ("identity-loss",)


def _plan():
    """(section, runner, whether the shared SDXL stage is freed first) in the order that lets
    the SDXL stage be built once and freed before FLUX's is built."""
    from faceclip_zoo.bench import data, diffusion, encoder, identity_loss, inference, lora

    return [("encoder", encoder.run, False), ("diffusion", diffusion.run_sdxl, False), ("lora", lora.run, False),
            ("inference", inference.run, False), ("identity-loss", identity_loss.run, False),
            ("diffusion", diffusion.run_flux, True), ("data", data.run, False)]


def bench(
    size: str = "tiny",
    only: str = ",".join(SECTIONS),
    device: str = "auto",
    precision: Literal["auto", "fp32", "bf16"] = "auto",
    repeats: Optional[int] = None,
    warmup: Optional[int] = None,
    rounds: int = 2,
    encoder_batch: Optional[int] = None,
    build_on_cpu: bool = False,
    cudnn_attention: bool = True,
    align_faces: Optional[str] = None,
    standins: Optional[str] = None,
    recipes: Optional[str] = None,
    steps: Optional[int] = None,
    resolution: Optional[int] = None,
    out: Optional[str] = None,
) -> list[Row]:
    """Speed and memory against the peers (open_clip, diffusers, the release's computation), one table.

    Args:
        size: tiny (CPU, minutes), small, or real (the released sizes, one GPU).
        only: comma-separated sections: encoder, diffusion, lora, inference, data; extras: align, resume,
            identity-loss (a diffusion step with and without the identity loss; not in the default run),
            memory (the one-GPU LoRA recipes' memory, estimated from parameter counts), real-size (the
            production recipes through `fit` on stand-in weights: faceclip_zoo/bench/real_size.py).
        device: auto (cuda when present), cpu, cuda, cuda:1, ...
        precision: auto: bf16 (mixed) on CUDA, fp32 on CPU.
        repeats: timed repetitions per block (default: the size's).
        warmup: warm-up repetitions (default: the size's).
        rounds: alternating blocks of ours and the peer.
        encoder_batch: batch of the encoder steps (default: the size's; e.g. the real size on a CPU).
        build_on_cpu: initialise models on the CPU, then move them (default: directly on the device).
        cudnn_attention: false turns off PyTorch's cuDNN attention backend for both sides
            (docs/performance.md).
        align_faces: (--only align) a folder of the release's aligned 448 crops to measure
            our alignment against, besides skimage's astronaut.
        standins: (--only real-size) the folder `python -m faceclip_zoo standins` wrote (default: made
            on the fly, which at --size real writes tens of GB).
        recipes: (--only real-size) comma-separated production recipes (default: all it knows).
        steps: (--only real-size) optimizer steps per recipe (default 2).
        resolution: (--only real-size) image side of the runs (default: the recipe's).
        out: also write results.json and results.md here.
    """
    given = dict(locals())  # for the command line the table records
    if size not in SIZES:
        raise UserError(f"--size must be one of {sorted(SIZES)}, got {size!r}")
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS) - set(ROW_EXTRAS) - set(EXTRAS)
    if unknown:
        raise UserError(f"bench: unknown section(s) {sorted(unknown)}; choose from {SECTIONS + ROW_EXTRAS + EXTRAS}")
    require_at_least({"--rounds": (rounds, 1), "--repeats": (repeats, 1), "--warmup": (warmup, 0),
                      "--encoder_batch": (encoder_batch, 1), "--steps": (steps, 1), "--resolution": (resolution, 64)})
    if out:
        check_output_folder(out, "--out", overwrite=True)  # results.json and results.md are rewritten
    import lightning  # noqa: F401 (it sets its loggers' levels on import; ours come after)

    for name in ("lightning.pytorch", "lightning.fabric"):  # trainers are built per block
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    if not cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    precision = precision if precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    size = SIZES[size]
    if encoder_batch:
        size = dataclasses.replace(size, encoder_batch=encoder_batch)
    ctx = Context(size=size, device=device, precision=precision, repeats=repeats or size.repeats,
                  warmup=warmup if warmup is not None else size.warmup, rounds=rounds,
                  build_on_device=not build_on_cpu)
    defaults = {name: p.default for name, p in inspect.signature(bench).parameters.items()}
    command = "python -m faceclip_zoo bench " + " ".join(
        f"--{k} {shlex.quote(str(v))}" for k, v in given.items() if v != defaults[k])
    header = (f"machine: {machine()}\ndevice {device}, {precision}; size {size.name}: {size.note}\n"
              f"median of {ctx.rounds} x {ctx.repeats} timed repeats after {ctx.warmup} warm-up; "
              f"command: `{command.strip()}`")
    if set(wanted) & set(SECTIONS + ROW_EXTRAS):  # the extras say what they measure themselves
        print(header, flush=True)
    rows: list[Row] = []
    started = time.time()
    for name, runner, free_shared in _plan():
        if name not in wanted:
            continue
        if free_shared:
            ctx.shared.clear()  # the SDXL stage is done with: free it before FLUX's
            release_memory(device)
        t = time.time()
        new = runner(ctx)
        release_memory(device)
        for row in new:
            print(f"[{name} {time.time() - t:.0f} s] {row.comparison}: ours {row.ours:.4g} s, peer {row.peer:.4g} s, "
                  f"ratio {row.ratio:.2f}, peak {fmt_mem(row.ours_mem)} / {fmt_mem(row.peer_mem)} {row.note}",
                  flush=True)
        rows.extend(new)
    ctx.shared.clear()
    table = markdown(rows) if rows else ""
    if rows:
        print("\n" + table)
        print(f"\n({time.time() - started:.0f} s in all)")
    for extra in EXTRAS:
        if extra in wanted:
            from faceclip_zoo.bench import align_accuracy, memory, stream_resume

            if extra == "real-size":
                from faceclip_zoo.bench import real_size

                results, rates = real_size.run(size=size.name, device=device.type, standins=standins, recipes=recipes,
                                        steps=steps, resolution=resolution,
                                        work=str(Path(out) / "real-size") if out else None)
                bad = real_size.failures(results, rates)
                if bad:
                    raise UserError(f"bench real-size: {'; '.join(bad)}")
            elif extra == "align":
                align_accuracy.run(faces=align_faces)
            elif extra == "memory":
                memory.run()
            else:
                stream_resume.run()
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(header + "\n\n" + table + "\n")
        (out / "results.json").write_text(json.dumps({"machine": machine(), "device": str(device),
                                                      "precision": precision, "size": size.name,
                                                      "command": command.strip(),
                                                      "rows": [r.as_dict() for r in rows]}, indent=2) + "\n")
    failed = [r.comparison for r in rows if r.note.startswith("failed")]
    if failed:
        raise UserError(f"bench: {len(failed)} row(s) failed ({', '.join(failed)}); the table above says why")
    return rows

