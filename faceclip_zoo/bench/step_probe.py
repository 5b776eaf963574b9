"""StepProbe: the Lightning callback `bench --only real-size` adds to a recipe's fit, to
record what a first day at real size is about: parameters (total / trained), resident
memory after loading and at its peak, CUDA peak, seconds per step, the losses, whether the
trained weights changed and the frozen ones stayed bitwise the same, and (on CUDA) the
model FLOPs of one step for MFU. It writes one JSON file when the fit ends."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import lightning as L
import torch


def rss_bytes(kind: str = "VmRSS") -> int:
    """This process's resident memory now (Linux /proc/self/status): VmRSS in all, RssAnon
    (its own allocations), RssFile (mapped file pages: weights read in place from their
    safetensors files, clean pages the kernel can drop and read again under pressure)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnonPeak:
    """The peak of RssAnon, sampled every `interval` seconds by a thread. The kernel keeps
    the peak of the whole resident set (VmHWM), which counts the weight files' pages read
    in place; those are clean and dropped under pressure, so what a host must have is the
    process's own memory, whose peak the kernel does not keep."""

    def __init__(self, interval: float = 0.2):
        import threading

        self.interval, self.peak = interval, rss_bytes("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes("RssAnon"))

    def start(self) -> "AnonPeak":
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes("RssAnon"))
        return self.peak


_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(t: torch.Tensor) -> tuple[int, int]:
    """Two integer sums over a tensor's bits (plain, and weighted by position), so any
    changed, swapped or moved value shows. Quantised tensors (torchao) are fingerprinted
    through their int data, read back with `dequantize`."""
    t = t.detach()  # a plain Tensor, or the quantised tensor subclass a Parameter holds
    if type(t) is not torch.Tensor:
        t = t.dequantize()
    flat = t.contiguous().reshape(-1)
    flat = flat.view(_INT_OF_WIDTH[flat.element_size()])
    plain = weighted = 0
    chunk = 1 << 22  # a few MB of int64 at a time: a 10 GB model is fingerprinted in place
    for start in range(0, flat.numel(), chunk):
        bits = flat[start:start + chunk].to(torch.int64)
        weights = torch.arange(start, start + bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
        plain += int(bits.sum())
        weighted += int((bits * weights).sum())
    return plain, weighted


class StepProbe(L.Callback):
    """Args:
        out: the JSON file to write.
        count_flops_at: the step (0-based) whose model FLOPs (forward and backward) torch's
            FlopCounterMode counts (that step is left out of the timings); None: no count.
    """

    def __init__(self, out: str, count_flops_at: int | None = None):
        self.out = Path(out)
        self.count_flops_at = count_flops_at
        self.times: list[float] = []
        self.losses: list[float] = []
        self.flops: int | None = None
        self._t0 = 0.0
        self._counter = None
        self._counted = False
        self._before: dict[str, tuple[int, int]] = {}
        self._trained: set[str] = set()
        self.report: dict = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._anon = AnonPeak().start()  # before the module's setup loads the weights

    def on_train_start(self, trainer, pl_module) -> None:
        self.report.update(rss_after_load=rss_bytes(), rss_anon_after_load=rss_bytes("RssAnon"),
                           rss_file_after_load=rss_bytes("RssFile"), peak_rss_after_load=peak_rss_bytes(),
                           peak_anon_after_load=self._anon.peak)
        params = dict(pl_module.named_parameters())
        self._trained = {n for n, p in params.items() if p.requires_grad}
        self._before = {n: fingerprint(p) for n, p in params.items()}
        self.report.update(
            params_total=sum(p.numel() for p in params.values()),
            params_trained=sum(p.numel() for n, p in params.items() if n in self._trained),
            dtypes=sorted({str(p.dtype).replace("torch.", "") for p in params.values()}),
        )
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            self.report["cuda_resident_after_load"] = torch.cuda.memory_allocated(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        if self.count_flops_at is not None and trainer.global_step == self.count_flops_at:  # forward + backward
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._t0 = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # the model FLOPs are the forward and backward; the optimizer's step is left out (it
        # is not model work, and torchao's 8-bit AdamW compiles it, which a dispatch mode
        # such as the FLOP counter cannot enter)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = int(self._counter.get_total_flops())
            self._counter = None
            self._counted = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._t0
        if self._counted:
            self._counted = False
        else:
            self.times.append(elapsed)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach().float()) if loss is not None else math.nan)

    def on_train_end(self, trainer, pl_module) -> None:
        params = dict(pl_module.named_parameters())
        after = {n: fingerprint(p) for n, p in params.items()}
        frozen = [n for n in params if n not in self._trained]
        changed_frozen = [n for n in frozen if after[n] != self._before.get(n)]
        changed_trained = [n for n in self._trained if after[n] != self._before.get(n)]
        r = self.report
        r.update(
            steps=len(self.losses), losses=self.losses, loss_finite=all(math.isfinite(x) for x in self.losses),
            step_seconds=self.times, peak_rss=peak_rss_bytes(), peak_anon=self._anon.stop(),
            rss_anon_end=rss_bytes("RssAnon"),
            rss_file_end=rss_bytes("RssFile"),
            trained_tensors=len(self._trained), trained_tensors_changed=len(changed_trained),
            frozen_tensors=len(frozen), frozen_tensors_changed=len(changed_frozen),
            frozen_changed_examples=changed_frozen[:5],
            trained_unchanged_examples=sorted(self._trained - set(changed_trained))[:5],
            flops_per_step=self.flops,
        )
        if pl_module.device.type == "cuda":
            r["cuda_peak"] = torch.cuda.max_memory_allocated(pl_module.device)
            r["cuda_reserved_peak"] = torch.cuda.max_memory_reserved(pl_module.device)
            r["device_name"] = torch.cuda.get_device_name(pl_module.device)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(r, indent=2) + "\n")
