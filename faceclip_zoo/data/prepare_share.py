"""The inputs of a distributed `prepare` or `cache`, split over Lightning's ranks."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader


class InputShare(L.LightningDataModule):
    """This rank's share of the inputs (photo records, or whole shards): every world_size-th
    item from its rank, in input order. The split depends only on the input list and the
    world size, never on what is done, so ranks that start at different moments agree on it;
    the predict step skips the items a previous run finished (Lightning refuses an empty
    loader, which a rank whose share is all done would otherwise have)."""

    def __init__(self, items: list[Any], batch_size: int = 8):
        super().__init__()
        self.items, self.batch_size = items, batch_size

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = self.items[rank::world] or [None]  # None: nothing for this rank (fewer inputs than ranks)
        # items go through as they are (the predict step reads the files itself)
        return DataLoader(mine, batch_size=self.batch_size, shuffle=False, collate_fn=list)
