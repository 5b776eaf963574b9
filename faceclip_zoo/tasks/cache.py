"""`cache` on many processes and nodes: Lightning's predict loop over input shards, one
process per rank under Lightning's launchers (as `fit` and `prepare --devices`), each rank
rewriting every world_size-th shard (faceclip_zoo.data.prepare_share.InputShare). A shard is
the unit of resuming: `cache_shard` writes it through a temporary file and a rename and
skips one that already holds the features, and its random draws (VAE posterior samples)
come from a generator seeded by the shard's name, so a shard's features are the same
whichever rank, and however many ranks, computed them (tested against one process)."""

from __future__ import annotations

from typing import Callable

import lightning as L


class CacheTask(L.LightningModule):
    """Wraps the recipe's module (its frozen parts compute the features); a batch of
    (index, source shard, destination) in, [(index, counts)] out. `cache_shard` is
    faceclip_zoo.cache's (passed in: that module launches this one)."""

    def __init__(self, model: L.LightningModule, names: list[str], options: dict, cache_shard: Callable):
        super().__init__()
        self.model, self.names, self.options, self.cache_shard = model, names, options, cache_shard

    def setup(self, stage: str) -> None:
        self.model.setup("fit")  # the frozen weights, as `fit` loads them
        self.model.eval()

    def predict_step(self, batch: list, batch_idx: int) -> list[tuple[int, dict]]:
        return [(job[0], self.cache_shard(job[1], job[2], self.model, self.names, **self.options))
                for job in batch if job is not None]
