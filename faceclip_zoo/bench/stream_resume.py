"""What resuming the training stream mid-epoch costs, next to reading the whole epoch.

    python -m faceclip_zoo bench --only resume   (or python -m faceclip_zoo.bench.stream_resume --shards DIR)

The shards default to the quickstart's synthetic ones (run the quickstart once first).
Prints one table: a full pass over an epoch (decode + collate), the time to the first
batch when resuming at the last batch (the skipped part is read as tar bytes, not
decoded), and whether that batch equals the uninterrupted pass's last batch.
"""

from __future__ import annotations

import argparse
import os
import time

from faceclip_zoo.data.datamodule import ShardDataModule, collate
from faceclip_zoo.data.stream import planned_loader


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="runs/synthetic")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    dm = ShardDataModule(train=os.path.join(args.shards, "train"), guided=os.path.join(args.shards, "guided"),
                         guided_prob=0.1, batch_size=args.batch, num_workers=0, image_size=64, face_size=112,
                         shuffle_buffer=500)
    spec = dm.stream_spec()
    n = spec.batches_per_rank()
    t = time.perf_counter()
    batches = list(planned_loader(spec, collate, lambda: (0, 0)))
    full = time.perf_counter() - t
    t = time.perf_counter()
    resumed = next(iter(planned_loader(spec, collate, lambda: (0, n - 1))))
    skip = time.perf_counter() - t
    print(f"| epoch ({n} batches of {args.batch}) | full pass | resume at batch {n - 1}: first batch | same batch |")
    print("|---|---|---|---|")
    print(f"| {sum(len(b['key']) for b in batches)} samples | {full:.2f} s | {skip:.2f} s | "
          f"{resumed['key'] == batches[-1]['key']} |")


if __name__ == "__main__":
    main()
