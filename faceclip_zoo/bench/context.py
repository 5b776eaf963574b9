"""What every benchmark section receives: the size, the device, precision and repeats."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from faceclip_zoo.bench.sizes import Size

CAPTIONS = [
    "a photo of a person wearing a red shirt, in front of a blue background, lit from the front",
    "a photo of a person in a green jacket, smiling, in a park at noon",
    "a close-up portrait of a person with glasses, studio light, grey backdrop",
    "a photo of a person on a beach at sunset, wearing a white hat",
]


@dataclass
class Context:
    size: Size
    device: torch.device
    precision: str  # "fp32" | "bf16"
    repeats: int
    warmup: int
    rounds: int = 2
    build_on_device: bool = True
    shared: dict = field(default_factory=dict)  # models built once per run (the SDXL stage)
    results: dict = field(default_factory=dict)  # numbers one section hands another

    def build(self):
        """Build modules directly on the device (random init of billions of parameters on
        CPU would take minutes); tokenizers and other CPU state are unaffected."""
        on_device = self.build_on_device and self.device.type == "cuda"
        return self.device if on_device else contextlib.nullcontext()

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def captions(self, n: int) -> list[str]:
        return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]

    def compare_kwargs(self) -> dict:
        return dict(warmup=self.warmup, repeats=self.repeats, rounds=self.rounds)
