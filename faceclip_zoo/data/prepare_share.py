"""The inputs of a distributed `prepare`, split over Lightning's ranks."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from faceclip_zoo.data.prepare_inputs import Record


class InputShare(L.LightningDataModule):
    """This rank's share of the input records: every world_size-th record from its rank, in
    input order. The split depends only on the input list and the world size, never on what
    is done, so ranks that start at different moments agree on it; the predict step skips
    the records a previous run finished (Lightning refuses an empty loader, which a rank
    whose share is all done would otherwise have)."""

    def __init__(self, records: list[Record], work: str, batch_size: int = 8):
        super().__init__()
        self.records, self.work, self.batch_size = records, work, batch_size

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = self.records[rank::world] or [None]  # None: nothing for this rank (fewer inputs than ranks)
        # records go through as they are (the predict step reads the files itself)
        return DataLoader(mine, batch_size=self.batch_size, shuffle=False, collate_fn=list)
