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
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.cli import LightningCLI

    from faceclip_zoo.run_folder import CreatedFolders, follow_run_folder, recipe_root, run_folders
    from faceclip_zoo.tasks.resilience import LastGoodCheckpointIO

    given = {token[2:].split("=", 1)[0] for token in argv if token.startswith("--")}
    run: dict = {"created": None, "trained": False}

    class MarkTrained(Callback):
        def on_train_batch_end(self, *args, **kwargs) -> None:
            run["trained"] = True

    class CLI(LightningCLI):
        def before_instantiate_classes(self) -> None:
            # one run folder: what the recipe put in its default_root_dir moves with it
            # (run_folder.py); and what a failing fit creates is noted, to take it back
            config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
            follow_run_folder(config.trainer, recipe_root(config.get("config")), given)
            if self.config.get("subcommand") == "fit" and config.trainer.get("default_root_dir"):
                run["created"] = CreatedFolders(run_folders(config.trainer))

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads a --ckpt_path file itself (its hyperparameters) before the
            # trainer exists: a refused pickle is one line naming it; an unreadable file is
            # an error naming it, unless it is a last.ckpt: the checkpoint IO falls back from that
            import pickle

            from faceclip_zoo.tasks.resilience import allow_checkpoint_globals
            from faceclip_zoo.utils import UserError, unpickling_refusal, unreadable_reason

            allow_checkpoint_globals()
            try:
                super()._parse_ckpt_path()
            except pickle.UnpicklingError as exc:
                path = self.config[self.config.subcommand].get("ckpt_path")
                raise UserError(f"refusing to load {path}: {unpickling_refusal(exc)}") from None
            except (RuntimeError, EOFError, OSError, ValueError) as exc:
                path = self.config[self.config.subcommand].get("ckpt_path")
                if not path or not Path(path).is_file() or Path(path).name.startswith("last"):
                    return  # "last", or a last.ckpt: the checkpoint IO falls back to the newest readable one
                raise UserError(f"checkpoint {path} is unreadable ({unreadable_reason(path, exc)}); pass another "
                                "with --ckpt_path") from None

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            # Every checkpoint a trainer command reads (`--ckpt_path`, resume) goes through
            # our IO: weights-only always, the last good checkpoint as fallback. A recipe
            # naming its own CheckpointIO subclass of ours keeps it.
            if not isinstance(trainer.strategy.checkpoint_io, LastGoodCheckpointIO):
                trainer.strategy.checkpoint_io = LastGoodCheckpointIO()
            trainer.callbacks.append(MarkTrained())
            return trainer

    no_exit = {"exit_on_error": False}
    with warnings.catch_warnings():  # given args while the process has its own (another command)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            return CLI(args=None if argv == sys.argv[1:] else argv, save_config_kwargs={"overwrite": True},
                       parser_kwargs={**no_exit, **{cmd: no_exit for cmd in TRAINER_COMMANDS}}, **CLI_KWARGS)
        except BaseException:
            if run["created"] is not None and not run["trained"]:
                run["created"].remove_created()  # a fit that failed before its first step leaves nothing
            raise


def fit(recipe: str | Path, *overrides: str) -> Path:
    """Train a recipe file (plus command-line style overrides, e.g. "--trainer.max_steps=10");
    returns the run's log folder (metrics, config.yaml, samples)."""
    cli = run_lightning_cli(["fit", "--config", str(recipe), *overrides])
    return Path(cli.trainer.log_dir or cli.trainer.default_root_dir)
