"""Callbacks the fault-tolerance tests put into recipes (importable with tests/ on PYTHONPATH)."""

import json
import os
import signal

from lightning.pytorch.callbacks import Callback


class RecordBatches(Callback):
    """Appends {"rank", "step", "keys"} of every trained batch to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps({"rank": trainer.global_rank, "step": trainer.global_step,
                                "keys": list(batch["key"])}) + "\n")


class KillAtStep(Callback):
    """SIGKILLs the whole process group once `step` optimizer steps are done: no handler,
    no teardown, as when a node dies."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)


class PoisonAtStep(Callback):
    """Makes the loss of step `step` NaN by poisoning a trainable weight before it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            import torch

            with torch.no_grad():
                pl_module.text_head.weight.fill_(float("nan"))
