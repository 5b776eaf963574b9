"""Weights at their real size: read lazily from safetensors (one file or a sharded folder),
loaded into models built without memory, cast to the dtype they will train or sit in.

A real-size model built the ordinary way is first filled with random numbers in float32
(SDXL's UNet: 10.3 GB, FLUX.1-dev's transformer: 47.6 GB) and then overwritten by its
weights file, so the host needs the model twice over, in float32, before a LoRA run casts
it to bf16. Here the model is built on the meta device (accelerate's `init_empty_weights`:
parameters only, buffers stay real) and each tensor is read from the memory-mapped file,
cast, and assigned (torch's `load_state_dict(assign=True)`): the host holds the weights
once, in their final dtype, plus one tensor in flight.

    with empty_weights(weights_given):
        unet = build_diffusers(config)
    load_strict(unet, open_weights(folder, "diffusion_pytorch_model", "unet weights"), "unet", dtype=torch.bfloat16)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator

import torch

from faceclip_zoo.utils import UserError, require_file, safe_open_safetensors


def empty_weights(enabled: bool = True):
    """Build modules with their parameters on the meta device (no memory, no random init);
    buffers (attention masks, position ids) are created for real, since weight files do not
    hold the non-persistent ones. A no-op context when `enabled` is false."""
    if not enabled:
        return contextlib.nullcontext()
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def has_meta_tensors(module: torch.nn.Module) -> bool:
    return any(t.is_meta for t in module.state_dict(keep_vars=True).values())


class SafetensorsWeights(Mapping):
    """A read-only {key: tensor} view over one or more safetensors files: a tensor is read
    (from the memory-mapped file) only when asked for, so a 24 GB state dict costs nothing
    until its tensors are loaded one by one. Keys can be renamed (`renamed`, `under`)."""

    def __init__(self, entries: dict[str, tuple[str, str]], handles: dict | None = None):
        self._entries = entries  # our key -> (file, key in that file)
        self._handles = handles if handles is not None else {}

    @classmethod
    def open(cls, files: list[str | os.PathLike], what: str) -> "SafetensorsWeights":
        entries, handles = {}, {}
        for file in map(str, files):
            handle = handles[file] = safe_open_safetensors(file, what)
            for key in handle.keys():
                entries[key] = (file, key)
        return cls(entries, handles)

    def __getitem__(self, key: str) -> torch.Tensor:
        file, stored = self._entries[key]
        return self._handles[file].get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self) -> dict[str, tuple]:
        """Every tensor's shape, read from the file headers (no data)."""
        return {k: tuple(self._handles[f].get_slice(s).get_shape()) for k, (f, s) in self._entries.items()}

    def renamed(self, rename: Callable[[str], str | None]) -> "SafetensorsWeights":
        """The same tensors under new keys; `rename` returning None drops a key."""
        out = {}
        for key, entry in self._entries.items():
            new = rename(key)
            if new is not None:
                out[new] = entry
        return SafetensorsWeights(out, self._handles)

    def under(self, prefix: str) -> "SafetensorsWeights":
        """The entries under `prefix`, with the prefix removed (one part of a larger file)."""
        return self.renamed(lambda k: k[len(prefix):] if k.startswith(prefix) else None)


def weight_files(folder: str | os.PathLike, stem: str, what: str) -> list[Path]:
    """The safetensors files of a model folder as diffusers and transformers lay them out:
    `<stem>.safetensors`, or shards listed by `<stem>.safetensors.index.json` (FLUX.1-dev's
    transformer and T5-XXL come in shards), or the fp16 variant `<stem>.fp16.safetensors`
    (what `variant="fp16"` downloads of SDXL)."""
    folder = Path(folder)
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise UserError(f"{what}: {index} is not a safetensors shard index ({exc})") from None
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise UserError(f"{what}: {folder} lacks the shard(s) {', '.join(missing)} that {index.name} lists; "
                            "download them too")
        return shards
    for variant in ("fp16", "bf16"):
        file = folder / f"{stem}.{variant}.safetensors"
        if file.is_file():
            return [file]
    raise UserError(f"{what} not found in {folder}: expected {stem}.safetensors, or shards with "
                    f"{stem}.safetensors.index.json")


def open_weights(path: str | os.PathLike, stem: str, what: str) -> SafetensorsWeights:
    """A folder (its `<stem>` files, single or sharded) or one .safetensors file, lazily."""
    p = require_file(path, what)
    files = weight_files(p, stem, what) if p.is_dir() else [p]
    return SafetensorsWeights.open(files, what)
