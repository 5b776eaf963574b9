"""Timing and memory measurement shared by the benchmarks.

Each comparison runs ours and the peer in alternating blocks (the machines are noisy:
interleaving spreads drift over both), times every repetition on its own (CUDA
synchronised) and reports the median. Memory is the peak *extra* memory of a block: what
the work allocates beyond what was resident before it (gradients, optimizer state,
activations), so two rows that share one model's weights compare fairly. On CUDA it is
torch's allocator peak; on CPU the peak resident set size, sampled by a thread (torch
keeps no CPU allocator statistics; written here).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Row:
    """One line of the table: ours against the peer, both as seconds per `unit`."""

    comparison: str
    ours: float
    peer: float
    unit: str = "step"
    ours_mem: float | None = None  # bytes
    peer_mem: float | None = None
    goal: str = ""  # e.g. "<= 1.05"
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"comparison": self.comparison, "ours_s": self.ours, "peer_s": self.peer, "unit": self.unit,
                "ratio": self.ratio, "ours_peak_bytes": self.ours_mem, "peer_peak_bytes": self.peer_mem,
                "goal": self.goal, "note": self.note}


@dataclass
class Measurement:
    times: list[float] = field(default_factory=list)
    peak: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def guarded(label: str, fn: Callable[..., "Row | list[Row]"], *args) -> list[Row]:
    """Run one row's measurement; a failure (out of memory, a missing optional package)
    becomes a row saying so, and the benchmark goes on."""
    import traceback

    try:
        out = fn(*args)
        return out if isinstance(out, list) else [out]
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        message = str(exc).splitlines()[0][:160] if str(exc) else ""
        return [Row(label, float("nan"), float("nan"), note=f"failed: {type(exc).__name__}: {message}")]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory(device: torch.device) -> None:
    """Hand freed memory back (CUDA cache, glibc arenas) so the next block starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Context manager: `.peak` = the block's peak extra memory in bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss()
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = float(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss())
            self.peak = float(self._max - self._base)


Step = Callable[[], object]


def time_block(make: Callable[[], Step], device: torch.device, warmup: int, repeats: int,
               into: Measurement) -> None:
    """make() builds the work (e.g. a step with a fresh optimizer) inside one memory
    block; the work runs warmup + repeats times; the timed repeats are recorded."""
    with PeakMemory(device) as mem:
        fn = make()
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            synchronize(device)
            t = time.perf_counter()
            fn()
            synchronize(device)
            into.times.append(time.perf_counter() - t)
        del fn
    into.peak = max(into.peak, mem.peak)


def compare(ours: Callable[[], Step], peer: Callable[[], Step], device: torch.device, warmup: int = 2,
            repeats: int = 5, rounds: int = 2) -> tuple[Measurement, Measurement]:
    """Alternate blocks of ours and the peer (factories of the work, see time_block); each
    block warms up again (caches, optimizer state), then times `repeats` calls."""
    a, b = Measurement(), Measurement()
    for _ in range(rounds):
        time_block(ours, device, warmup, repeats, a)
        time_block(peer, device, warmup, repeats, b)
    return a, b


def autocast(device: torch.device, precision: str):
    """bf16 autocast (what Lightning's bf16-mixed and accelerate's mixed_precision do)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        desc = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), " + desc
    return desc


def fmt_time(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def fmt_mem(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**20:.0f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def markdown(rows: list[Row]) -> str:
    lines = ["| comparison | ours | peer | ratio ours/peer | goal | peak memory ours / peer |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = r.comparison + (f" ({r.note})" if r.note else "")
        lines.append(f"| {name} | {fmt_time(r.ours)}/{r.unit} | {fmt_time(r.peer)}/{r.unit} | {r.ratio:.2f} | "
                     f"{r.goal or '-'} | {fmt_mem(r.ours_mem)} / {fmt_mem(r.peer_mem)} |")
    return "\n".join(lines)


# --------------------------------------------------------------------- Lightning steps
def _trainer(device: torch.device, precision: str, steps: int, clock):
    import lightning as L

    return L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                     precision="bf16-mixed" if precision == "bf16" else "32-true", max_steps=steps,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     callbacks=[clock])


def _repeat(batch: dict, n: int):
    """A loader handing out one prepared batch n times (no collation, no workers)."""
    from torch.utils.data import DataLoader, IterableDataset

    class Same(IterableDataset):
        def __iter__(self):
            return iter([batch] * n)

    return DataLoader(Same(), batch_size=None)


def lightning_block(module, batch: dict, device: torch.device, precision: str, warmup: int, repeats: int,
                    into: Measurement) -> None:
    """`trainer.fit` for warmup + repeats steps on one (device-resident) batch; every step
    timed from on_train_batch_start to on_train_batch_end (forward, backward, optimizer
    step, logging: the whole Lightning step a user's run pays)."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize(device)
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(device)
            self.times.append(time.perf_counter() - self.t)

    clock = StepClock()
    trainer = _trainer(device, precision, warmup + repeats, clock)
    with PeakMemory(device) as mem:
        trainer.fit(module, train_dataloaders=_repeat(batch, warmup + repeats))
        trainer.strategy.optimizers = []  # the optimizer state belongs to this block
        module.zero_grad(set_to_none=True)
    del trainer
    module.to(device)  # Lightning's teardown moves the module to the CPU; the next block needs it here
    into.times.extend(clock.times[warmup:])
    into.peak = max(into.peak, mem.peak)


def compare_lightning(module, batch: dict, peer: Callable[[], Step], device: torch.device, precision: str,
                      warmup: int = 2, repeats: int = 5, rounds: int = 2) -> tuple[Measurement, Measurement]:
    a, b = Measurement(), Measurement()
    for _ in range(rounds):
        lightning_block(module, batch, device, precision, warmup, repeats, a)
        time_block(peer, device, warmup, repeats, b)
    return a, b


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    """What a hand-written training loop does after the forward."""
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
