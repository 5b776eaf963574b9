"""Training entry points shared by the command line and by code that trains recipes (the
ablation): LightningCLI over a recipe, exactly as `python -m faceclip_zoo fit` runs it."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")

# Any LightningModule / LightningDataModule named by class_path in a recipe; our tasks
# configure their own optimizers (from the `optimizer` argument they receive).
CLI_KWARGS = dict(subclass_mode_model=True, subclass_mode_data=True, auto_configure_optimizers=False)


def run_lightning_cli(argv: list[str]):
    """LightningCLI on `argv` (a trainer command and its options). Parse errors come back as
    exceptions (not a 60-line usage dump) so the caller can report them in one line."""
    from lightning.pytorch.cli import LightningCLI

    from faceclip_zoo.tasks.resilience import LastGoodCheckpointIO

    class CLI(LightningCLI):
        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads a --ckpt_path file itself (its hyperparameters) before the
            # trainer exists: a refused pickle is one line naming it; an unreadable file is
            # left to the checkpoint IO, which falls back from a damaged last.ckpt
            import pickle

            from faceclip_zoo.tasks.resilience import allow_checkpoint_globals
            from faceclip_zoo.utils import UserError, unpickling_refusal

            allow_checkpoint_globals()
            try:
                super()._parse_ckpt_path()
            except pickle.UnpicklingError as exc:
                path = self.config[self.config.subcommand].get("ckpt_path")
                raise UserError(f"refusing to load {path}: {unpickling_refusal(exc)}") from None
            except (RuntimeError, EOFError, OSError, ValueError):
                return

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            # Every checkpoint a trainer command reads (`--ckpt_path`, resume) goes through
            # our IO: weights-only always, the last good checkpoint as fallback. A recipe
            # naming its own CheckpointIO subclass of ours keeps it.
            if not isinstance(trainer.strategy.checkpoint_io, LastGoodCheckpointIO):
                trainer.strategy.checkpoint_io = LastGoodCheckpointIO()
            return trainer

    no_exit = {"exit_on_error": False}
    with warnings.catch_warnings():  # given args while the process has its own (another command)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return CLI(args=None if argv == sys.argv[1:] else argv,
                            save_config_kwargs={"overwrite": True},
                            parser_kwargs={**no_exit, **{cmd: no_exit for cmd in TRAINER_COMMANDS}},
                            **CLI_KWARGS)


def fit(recipe: str | Path, *overrides: str) -> Path:
    """Train a recipe file (plus command-line style overrides, e.g. "--trainer.max_steps=10");
    returns the run's log folder (metrics, config.yaml, samples)."""
    cli = run_lightning_cli(["fit", "--config", str(recipe), *overrides])
    return Path(cli.trainer.log_dir or cli.trainer.default_root_dir)
