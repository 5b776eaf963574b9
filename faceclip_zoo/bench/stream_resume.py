"""What resuming the training stream mid-epoch costs, next to reading the whole epoch.

    python -m faceclip_zoo bench --only resume

The shards default to the quickstart's synthetic ones (run the quickstart once first).
Prints one table: a full pass over an epoch (decode + collate), the time to the first
batch when resuming at the last batch (the skipped part is read as tar bytes, not
decoded), and whether that batch equals the uninterrupted pass's last batch.
"""

from __future__ import annotations

import os
import time

from faceclip_zoo.data.datamodule import ShardDataModule, collate
from faceclip_zoo.data.stream import planned_loader


def run(shards: str = "runs/synthetic", batch: int = 32) -> None:
    dm = ShardDataModule(train=os.path.join(shards, "train"), guided=os.path.join(shards, "guided"),
                         guided_prob=0.1, batch_size=batch, num_workers=0, image_size=64, face_size=112,
                         shuffle_buffer=500)
    spec = dm.stream_spec()
    n = spec.batches_per_rank()
    t = time.perf_counter()
    batches = list(planned_loader(spec, collate, lambda: (0, 0)))
    full = time.perf_counter() - t
    t = time.perf_counter()
    resumed = next(iter(planned_loader(spec, collate, lambda: (0, n - 1))))
    skip = time.perf_counter() - t
    print(f"| epoch ({n} batches of {batch}) | full pass | resume at batch {n - 1}: first batch | same batch |")
    print("|---|---|---|---|")
    print(f"| {sum(len(b['key']) for b in batches)} samples | {full:.2f} s | {skip:.2f} s | "
          f"{resumed['key'] == batches[-1]['key']} |")

