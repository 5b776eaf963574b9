"""`python -m faceclip_zoo bench`: print the comparison table.

    python -m faceclip_zoo bench                       # tiny, CPU, about five minutes
    python -m faceclip_zoo bench --size real --out runs/bench   # the released sizes, one GPU
    python -m faceclip_zoo bench --only encoder,data --repeats 10
    python -m faceclip_zoo bench --size real --only encoder --device cpu --encoder-batch 8

Every row: median seconds per unit of ours and of the peer, their ratio, and each side's
peak extra memory (see faceclip_zoo.bench.harness). A row whose work fails (e.g. out of
memory) is reported as failed and the run goes on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from faceclip_zoo.bench.context import Context
from faceclip_zoo.bench.harness import Row, fmt_mem, machine, markdown, release_memory
from faceclip_zoo.bench.sizes import SIZES

SECTIONS = ("encoder", "diffusion", "inference", "data")
EXTRAS = ("align", "resume")


def _plan():
    """(section, runner) in the order that lets the SDXL stage be built once and freed
    before FLUX's is built."""
    from faceclip_zoo.bench import data, diffusion, encoder, inference

    return [("encoder", encoder.run), ("diffusion", diffusion.run_sdxl), ("inference", inference.run),
            ("diffusion", diffusion.run_flux), ("data", data.run)]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m faceclip_zoo bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections: {', '.join(SECTIONS)}; extras: {', '.join(EXTRAS)}")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 (mixed) on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per block (default: the size's)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=2, help="alternating blocks of ours and the peer")
    p.add_argument("--encoder-batch", type=int, default=None,
                   help="batch of the encoder steps (default: the size's; e.g. the real size on a CPU)")
    p.add_argument("--build-on-cpu", action="store_true",
                   help="initialise models on the CPU, then move them (default: directly on the device)")
    p.add_argument("--no-cudnn-attention", action="store_true",
                   help="turn off PyTorch's cuDNN attention backend (for both sides; see README, Performance)")
    p.add_argument("--out", default=None, help="also write results.json and results.md here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    import lightning  # noqa: F401 (it sets its loggers' levels on import; ours come after)

    for name in ("lightning.pytorch", "lightning.fabric"):  # trainers are built per block
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS) - set(EXTRAS)
    if unknown:
        print(f"bench: unknown section(s) {sorted(unknown)}; choose from {SECTIONS + EXTRAS}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    size = SIZES[args.size]
    if args.encoder_batch:
        size = dataclasses.replace(size, encoder_batch=args.encoder_batch)
    ctx = Context(size=size, device=device, precision=precision, repeats=args.repeats or size.repeats,
                  warmup=args.warmup if args.warmup is not None else size.warmup, rounds=args.rounds,
                  build_on_device=not args.build_on_cpu)
    command = "python -m faceclip_zoo bench " + shlex.join(argv)
    header = (f"machine: {machine()}\ndevice {device}, {precision}; size {size.name}: {size.note}\n"
              f"median of {ctx.rounds} x {ctx.repeats} timed repeats after {ctx.warmup} warm-up; "
              f"command: `{command.strip()}`")
    print(header, flush=True)
    rows: list[Row] = []
    started = time.time()
    for name, runner in _plan():
        if name not in wanted:
            continue
        if runner.__module__.endswith("diffusion") and runner.__name__ == "run_flux":
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
            from faceclip_zoo.bench import align_accuracy, stream_resume

            {"align": align_accuracy, "resume": stream_resume}[extra].main([])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(header + "\n\n" + table + "\n")
        (out / "results.json").write_text(json.dumps({"machine": machine(), "device": str(device),
                                                      "precision": precision, "size": size.name,
                                                      "command": command.strip(),
                                                      "rows": [r.as_dict() for r in rows]}, indent=2) + "\n")
    return 1 if any(r.note.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
