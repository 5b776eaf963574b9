"""Which frozen weights made the features `cache` stored, so training never reads stale ones.

`cache` writes, per feature, a digest of the weights of the frozen parts that computed it
(the VAE for `vae_latents`, the encoders for `prompt_embeds`, ...) into cache.json beside
the shards. A fit over those shards compares them with its own frozen parts at setup: after
retraining the encoder or the VAE, the old embeddings or latents are refused with the
command that refreshes them, instead of being trained on silently; `cache` itself
recomputes a shard whose features were made by other weights.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from faceclip_zoo.utils import UserError


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    try:
        return t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError, NotImplementedError):  # e.g. a quantized tensor subclass
        inner = t.dequantize() if hasattr(t, "dequantize") else t
        return inner.float().cpu().contiguous().numpy().tobytes()


def weights_digest(modules) -> str:
    """A digest of the modules' state (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for module in modules:
        for name, t in sorted(module.state_dict().items()):
            if not isinstance(t, torch.Tensor):
                continue
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


def feature_fingerprints(module, names) -> dict[str, str]:
    """{feature: digest of the frozen weights that compute it} for the module's
    `cache_sources()` (features it does not map are left out)."""
    sources = module.cache_sources() if hasattr(module, "cache_sources") else {}
    digests: dict[tuple, str] = {}
    out = {}
    for name in names:
        if name not in sources:
            continue
        mods, extra = sources[name]
        key = tuple(id(m) for m in mods) + (extra,)
        if key not in digests:
            digests[key] = weights_digest(mods) + (f"|{extra}" if extra else "")
        out[name] = digests[key]
    return out


def recorded_fingerprints(folder: str) -> dict[str, str]:
    """The fingerprints in <folder>/cache.json ({} when absent or written before them)."""
    try:
        with open(os.path.join(folder, "cache.json"), encoding="utf-8") as f:
            return dict(json.load(f).get("fingerprints") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def stale_features(module, folder: str) -> list[str]:
    """The features cached in `folder` whose recorded weights differ from the module's."""
    recorded = recorded_fingerprints(folder)
    if not recorded:
        return []
    current = feature_fingerprints(module, list(recorded))
    return sorted(n for n, digest in current.items() if recorded[n] != digest)


def check_cached_features(module, datamodule) -> None:
    """Refuse (UserError) a fit whose train/val shards hold features cached by other frozen
    weights than the module's; called from the modules' setup."""
    from faceclip_zoo.data.datamodule import resolve_shards

    folders = []
    for attr in ("train_spec", "val_spec", "guided_spec"):
        spec = getattr(datamodule, attr, None)
        try:
            paths = resolve_shards(spec, attr) if spec else []
        except UserError:
            continue  # the DataModule reports missing shards itself
        folders += [f for f in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths) if f not in folders]
    for folder in folders:
        stale = stale_features(module, folder)
        if stale:
            raise UserError(f"{folder}: the cached {', '.join(stale)} were computed by other frozen weights than "
                            "this run's (the encoder or VAE changed since `cache`); refresh them with "
                            "`python -m faceclip_zoo cache --recipe <this recipe> --overwrite true`")
