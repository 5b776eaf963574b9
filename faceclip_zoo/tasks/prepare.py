"""`prepare` on many processes and nodes: phase 1 (detect, filter, align; one work item per
input) as Lightning's predict loop, one process per rank, under Lightning's own launchers
(its subprocess launcher for `--devices N` on one machine; SLURMEnvironment and
TorchElasticEnvironment under recipes/launch/slurm.sbatch and torchrun.sh), so the ranks,
their environment and the closing barrier are Lightning's, not ours.

Each rank takes a deterministic share of the inputs (InputShare: every world_size-th input
from its rank, in input order) and skips the items a previous run finished, so a re-run after
any rank died redoes only what no rank finished (with the same number of ranks or another). Work items are written atomically by
`process_record`, the same function the one-process run uses: the assembled shards are
byte-identical whatever the number of processes (tested).
"""

from __future__ import annotations

import lightning as L

from faceclip_zoo.data.prepare_items import Filters, init_detector, mark_ready, pending, process_record


class PrepareTask(L.LightningModule):
    """Phase 1 of `prepare` as a predict step: a batch of input records in, their work
    items written, (accepted, rejected) counts out."""

    def __init__(self, work: str, filters: Filters, face_size: int, max_image_side: int, detector: str,
                 detector_model_dir: str | None, threads: int = 1):
        super().__init__()
        self.work, self.filters, self.face_size, self.max_image_side = work, filters, face_size, max_image_side
        self.detector, self.detector_model_dir, self.threads = detector, detector_model_dir, threads

    def setup(self, stage: str) -> None:
        # one per rank, on the rank's device (Lightning's: cuda:<local rank> under accelerator cuda)
        device = "cpu" if self.device.type == "cpu" else str(self.device)
        init_detector(self.detector, self.detector_model_dir, self.threads, device)

    def on_predict_start(self) -> None:
        self.trainer.strategy.barrier("prepare_ready")  # every rank has its detector: the work starts
        mark_ready()

    def predict_step(self, batch: list, batch_idx: int) -> dict[str, int]:
        todo = pending([r for r in batch if r is not None], self.work)  # what no earlier run finished
        results = [process_record(r, self.work, self.filters, self.face_size, self.max_image_side) for r in todo]
        accepted = sum(r["status"] == "accepted" for r in results)
        return {"accepted": accepted, "rejected": len(results) - accepted}


class PrepareShardsTask(PrepareTask):
    """`prepare` over input shards (img2dataset's layout, faceclip_zoo.data.prepare_shards):
    a batch of input shard paths in, each one's output shard and part written (skipped when
    an earlier run finished it), counts out."""

    def __init__(self, out: str, filters: Filters, face_size: int, max_image_side: int, detector: str,
                 detector_model_dir: str | None, threads: int = 1, detect_batch_size: int = 1,
                 decode_workers: int = 0):
        super().__init__(out, filters, face_size, max_image_side, detector, detector_model_dir, threads)
        self.detect_batch_size, self.decode_workers = detect_batch_size, decode_workers

    def predict_step(self, batch: list, batch_idx: int) -> dict[str, int]:
        from faceclip_zoo.data.prepare_shards import prepare_shard, shard_done

        totals = {"accepted": 0, "rejected": 0}
        for src in batch:
            if src is not None and not shard_done(src, self.work):
                counts = prepare_shard(src, self.work, self.filters, self.face_size, self.max_image_side,
                                       self.detect_batch_size, self.decode_workers)
                totals["accepted"] += counts["accepted"]
                totals["rejected"] += counts["rejected"]
        return totals
