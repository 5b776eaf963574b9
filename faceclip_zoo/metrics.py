"""Retrieval metrics on embeddings (plain torch; used in validation and evaluation)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def nearest_neighbour_accuracy(embeddings: torch.Tensor, labels: Sequence[str]) -> float:
    """Leave-one-out top-1: for each row, is its nearest other row (cosine) of the same
    label? Rows whose label occurs only once are not scored."""
    x = F.normalize(embeddings.float().flatten(1), dim=-1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    nn_idx = sim.argmax(dim=1)
    codes = {name: i for i, name in enumerate(sorted(set(labels)))}
    lab = torch.tensor([codes[name] for name in labels])
    counts = torch.bincount(lab)
    scored = counts[lab] > 1
    if not scored.any():
        return float("nan")
    return (lab[nn_idx] == lab)[scored].float().mean().item()


def retrieval_accuracy(queries: torch.Tensor, targets: torch.Tensor, groups: Sequence[str]) -> float:
    """Top-1 query->target retrieval where a hit is any target of the query's group
    (captions repeat in synthetic data, so exact-index matching would be ambiguous)."""
    q = F.normalize(queries.float(), dim=-1)
    t = F.normalize(targets.float(), dim=-1)
    best = (q @ t.T).argmax(dim=1).tolist()
    return sum(groups[j] == groups[i] for i, j in enumerate(best)) / max(1, len(best))
