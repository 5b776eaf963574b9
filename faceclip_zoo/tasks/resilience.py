"""Recovery pieces every task shares: per-rank training randomness saved in checkpoints,
a stop on non-finite losses, and a fallback when the last checkpoint is unreadable; plus
freeing each step's gradients as soon as the optimizer has used them.

Lightning already restores weights, optimizer, LR scheduler and loop progress from a
checkpoint, and writes checkpoint files atomically (a temporary file moved into place by
fsspec's transaction). It does not save random-generator states, so training-time
randomness (diffusion noise, timesteps, condition dropout) is drawn from a generator of
each rank's own, which is saved here. The data position is the DataModule's state
(faceclip_zoo/data/stream.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from faceclip_zoo.utils import UserError, unpickling_refusal, unreadable_reason

log = logging.getLogger(__name__)

_RNG_KEY = "faceclip_zoo_training_rng"


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class ResilientTask:
    """Mixin for LightningModules (listed before L.LightningModule)."""

    _train_generator: Optional[torch.Generator] = None
    _pending_rng: Optional[torch.Tensor] = None

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning zeroes gradients inside the next step's closure, after its forward: the
        # used gradients (a full fp32 copy of the trainable weights) would sit through that
        # forward's activations. Free them now (`bench`: peak memory of the SDXL step).
        optimizer.zero_grad(set_to_none=True)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # A task whose pretrained parts were built without memory (their weights named:
        # models/weights.py) takes a checkpoint's tensors themselves when the checkpoint
        # comes before setup (load_from_checkpoint); copying into them would do nothing.
        from faceclip_zoo.models.weights import has_meta_tensors

        return super().load_state_dict(state_dict, strict=strict, assign=assign or has_meta_tensors(self))

    def cpu(self):
        # Lightning's teardown moves the module to the CPU, also after a setup that failed
        # before reading the weights (a missing file): parts still without memory stay as
        # they are, so the error the user needs is the one reported, not torch's "cannot
        # copy out of meta tensor".
        from faceclip_zoo.models.weights import has_meta_tensors

        if not has_meta_tensors(self):
            return super().cpu()
        for module in self.modules():
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if not t.is_meta and t.device.type != "cpu":
                    t.data = t.data.cpu()
        return self

    def refuse_foreign_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint of another project's LightningModule, or of another task or size of
        ours, is refused in one line naming the file, before Lightning's load_state_dict
        (a page of missing keys) or a silent partial load (LoRA tasks load non-strictly)."""
        from faceclip_zoo.utils import mismatch_report

        trainer = self._trainer
        source = str(getattr(trainer, "ckpt_path", None) or "the checkpoint") if trainer is not None else "the checkpoint"
        if "faceclip_zoo" not in checkpoint:
            raise UserError(f"{source} is not a checkpoint of a faceclip_zoo fit (it has no faceclip_zoo record): "
                            f"--ckpt_path takes a checkpoint that a {type(self).__name__} recipe wrote")
        if dist.is_available() and dist.is_initialized():
            return  # sharded strategies hold their own layout of the state; Lightning checks it
        own = {k: tuple(v.shape) for k, v in self.state_dict(keep_vars=True).items()}
        got = {k: tuple(v.shape) for k, v in (checkpoint.get("state_dict") or {}).items()}
        if not self.strict_loading:  # only what trains is in it; the rest comes from the base
            own = {k: v for k, v in own.items() if k in got}
        report = mismatch_report(own, got)
        if report:
            raise UserError(f"{source} does not fit this {type(self).__name__} (another task, model size or "
                            f"recipe wrote it): {report}")

    def refuse_unloaded(self) -> None:
        """Parts built without memory (their weights were named) must have been loaded."""
        left = [n for n, t in self.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise UserError(f"{len(left)} weights were never loaded (e.g. {left[0]}): their weights file was named "
                            "but not read; this is a bug, please report it with the recipe")

    def training_generator(self) -> torch.Generator:
        """This rank's generator for training-time randomness: seeded from the run's seed
        (seed_everything) and the rank, so ranks draw different noise, and restored on
        resume so the resumed run draws what the uninterrupted one would have."""
        g = self._train_generator
        if g is None or g.device != self.device:
            g = torch.Generator(device=self.device)
            g.manual_seed(torch.initial_seed() + 104_729 * self.global_rank)
            if self._pending_rng is not None:
                g.set_state(self._pending_rng)
                self._pending_rng = None
            self._train_generator = g
        return g

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = None if self._train_generator is None else self._train_generator.get_state()
        states = [state]
        if dist.is_available() and dist.is_initialized():
            # Every rank runs dump_checkpoint; rank 0 writes the file, holding all ranks' states.
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        checkpoint[_RNG_KEY] = states

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.refuse_foreign_checkpoint(checkpoint)
        super().on_load_checkpoint(checkpoint)
        states = checkpoint.get(_RNG_KEY)
        if not states:
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if len(states) != world:
            rank_zero_warn(f"checkpoint holds training randomness of {len(states)} ranks, this run has {world}: "
                           "fresh generators are used (the run continues, but not as the original would have)")
            return
        self._pending_rng = states[self.global_rank]
        self._train_generator = None

    def check_finite(self, loss: torch.Tensor, batch: dict, batch_idx: int) -> None:
        """Stops the run when any rank's loss is not finite (all ranks agree, so none waits
        in a collective), naming the step and the samples of the batch."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            keys = batch.get("key", [])
            shown = ", ".join(map(str, keys[:8])) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            raise NonFiniteLoss(
                f"non-finite training loss in training step {self.global_step + 1} (epoch {self.current_epoch}, "
                f"batch {batch_idx}) on {'this rank' if not torch.isfinite(loss.detach()).all() else 'another rank'}; "
                f"batch keys: {shown or 'unknown'}. Nothing was written for this step: the last checkpoint is "
                f"the last good one (step {self.global_step} or before). Lower the learning rate or check "
                "these samples, then resume with `fit --ckpt_path last`.")


class LastGoodCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, except that
    - checkpoints are always read with weights_only=True, whatever Lightning or the
      environment asks (torch's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD only changes loads that
      leave weights_only unset): a pickle that would import anything but tensors, plain
      containers and the optimizer states we write is refused, naming the file and what it
      would import;
    - an unreadable `last*.ckpt` (a disk that filled up, a copy cut short) falls back to the
      newest readable checkpoint beside it, with a warning. Any other unreadable checkpoint
      is an error naming the file.
    Every trainer command uses it (faceclip_zoo.train), recipes naming it or not."""

    def load_checkpoint(self, path, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        import pickle

        allow_checkpoint_globals()
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except pickle.UnpicklingError as exc:
            raise UserError(f"refusing to load {path}: {unpickling_refusal(exc)}") from None
        except Exception as exc:  # torch.load raises many types on a truncated/corrupt file
            first_error = exc
        path = Path(path)
        if not path.name.startswith("last"):
            raise UserError(f"checkpoint {path} is unreadable ({unreadable_reason(path, first_error)}); pass another "
                            "with --ckpt_path")
        candidates = sorted((p for p in path.parent.glob("*.ckpt") if p != path),
                            key=lambda p: p.stat().st_mtime, reverse=True)
        for candidate in candidates:
            try:
                checkpoint = super().load_checkpoint(candidate, map_location=map_location, weights_only=True)
            except Exception:  # noqa: BLE001 (same reason; a refused pickle is not a fallback either)
                log.warning("checkpoint %s is unreadable too", candidate)
                continue
            rank_zero_warn(f"last checkpoint {path} is unreadable ({unreadable_reason(path, first_error)}); "
                           f"resuming from the newest readable one instead: {candidate}")
            return checkpoint
        raise UserError(f"last checkpoint {path} is unreadable ({unreadable_reason(path, first_error)}) and no "
                        f"other checkpoint in {path.parent} is readable; start without --ckpt_path")


def allow_checkpoint_globals() -> None:
    """What our fit checkpoints hold besides tensors and plain containers, for torch's
    weights-only unpickler: torchao's 8-bit optimizer states (the LoRA recipes' AdamW8bit)."""
    try:
        from torchao.optim.subclass_8bit import OptimState8bit
    except ImportError:  # torchao absent or reorganised: its states are then refused by name
        return
    torch.serialization.add_safe_globals([OptimState8bit])
