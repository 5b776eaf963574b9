"""`python -m faceclip_zoo bench`: the harness measures what it claims, and the tiny run
completes with every row measured (a smoke test; no timing is asserted)."""

from __future__ import annotations

import json
import math

import torch

from faceclip_zoo.bench.harness import Measurement, PeakMemory, Row, markdown, time_block
from faceclip_zoo.cli import main


def test_peak_memory_sees_a_block_allocation_on_cpu():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x.add_(1)
        del x
    assert mem.peak >= 48 * 2**20, mem.peak


def test_time_block_records_only_the_timed_repeats_and_builds_inside_the_block():
    calls = []

    def make():
        calls.append("make")
        return lambda: calls.append("step")

    m = Measurement()
    time_block(make, torch.device("cpu"), warmup=2, repeats=3, into=m)
    assert calls == ["make"] + ["step"] * 5
    assert len(m.times) == 3 and all(t >= 0 for t in m.times)


def test_markdown_row_has_ratio_and_memory():
    table = markdown([Row("x vs y", ours=0.2, peer=0.1, ours_mem=3 * 2**20, peer_mem=None, goal="<= 1.05")])
    assert "| x vs y | 200.0 ms/step | 100.0 ms/step | 2.00 | <= 1.05 | 3 MiB / - |" in table


def test_unknown_section_is_a_usage_error(capsys):
    assert main(["bench", "--only", "encoder,nonsense"]) == 2
    assert "unknown section(s) ['nonsense']" in capsys.readouterr().err


def test_tiny_bench_measures_every_row(tmp_path):
    rc = main(["bench", "--size", "tiny", "--repeats", "1", "--warmup", "1", "--rounds", "1", "--encoder_batch", "8",
               "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {r["comparison"].split(",")[0]: r for r in report["rows"]}
    failed = [r for r in report["rows"] if r["note"].startswith(("failed", "skipped"))]
    assert rc == 0 and not failed, failed
    assert len(report["rows"]) == 13, list(rows)
    for r in report["rows"]:
        assert math.isfinite(r["ours_s"]) and r["ours_s"] > 0 and math.isfinite(r["peer_s"]) and r["peer_s"] > 0, r
    assert "batch 8" in rows["encoder step: frozen features cached vs computed each step"]["comparison"]
    # the two sides of equal-work rows compute the same thing
    forward = next(r for r in report["rows"] if r["comparison"].startswith("encoder forward"))
    assert float(forward["note"].split("max |diff| ")[1]) < 1e-4
    lora = rows["SDXL LoRA step: SDXLJointModule(lora) vs peft on a plain diffusers loop"]
    assert "rank 16" in lora["comparison"]
    int8 = next(r for r in report["rows"] if "int8 weight-only" in r["comparison"])
    assert float(int8["note"].split("max |diff| ")[1].split(",")[0]) < 0.1  # int8 moves the images a little
    inference = next(r for r in report["rows"] if "aligned crop" in r["comparison"])
    assert float(inference["note"].split("max |diff| ")[1]) == 0.0
    assert (tmp_path / "results.md").read_text().count("\n| ") == 14  # header + 13 rows


def test_memory_estimate_counts_the_released_architectures():
    """`bench --only memory`: the parts are the released models (exact parameter counts),
    int8 takes about half of bf16, and the adapters' state is what it says."""
    from faceclip_zoo.bench.memory import lora_footprint

    sdxl = lora_footprint("sdxl", rank=32, quantize=False, optimizer_8bit=True)
    assert sdxl[0].params == 2_567_463_684 and sdxl[0].bytes == 2 * sdxl[0].params
    sdxl8 = lora_footprint("sdxl", rank=32, quantize=True)
    assert 0.5 < sdxl8[0].bytes / sdxl[0].bytes < 0.75  # Linear weights halve; convolutions stay bf16
    adapters, adapters_adamw = sdxl[-1], sdxl8[-1]
    assert adapters.trains and adapters.params == adapters_adamw.params
    assert adapters.bytes == 10 * adapters.params and adapters_adamw.bytes == 16 * adapters.params
    flux = lora_footprint("flux", rank=16, quantize=True)
    assert flux[0].params == 11_901_408_320
    wan = lora_footprint("wan", rank=32, quantize=True, optimizer_8bit=True)  # recipes/facet5-wan/lora-24gb.yaml
    assert wan[0].params == 1_418_996_800 and wan[1].params == 5_680_910_336  # Wan2.1-T2V-1.3B, umT5-XXL
    assert wan[-1].params == 43_745_280  # rank 32 on every block's attention and feed-forward
    assert 0.45 < flux[0].bytes / (2 * flux[0].params) < 0.55  # nearly all Linear
