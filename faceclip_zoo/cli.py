"""The command line: LightningCLI for fit/validate/test/predict, plus zoo commands.

    python -m faceclip_zoo fit --config recipes/quickstart/faceclip.yaml
    python -m faceclip_zoo export --ckpt runs/.../last.ckpt --out checkpoints/my-encoder
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from faceclip_zoo.utils import UserError

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _export(argv: list[str]) -> int:
    from jsonargparse import CLI

    from faceclip_zoo.export import export_checkpoint

    out = CLI(export_checkpoint, args=argv, as_positional=False)
    print(f"exported to {out}")
    return 0


EXTRA_COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "export": (_export, "fit checkpoint -> model.safetensors + config.json + recipe.yaml"),
}

HELP = """usage: python -m faceclip_zoo <command> [options]

Train, export and use identity-preserving text-to-image models.

Training (LightningCLI; `<command> --help` lists every option):
  fit        train a recipe:  fit --config recipes/quickstart/faceclip.yaml
  validate   run validation of a recipe / checkpoint
  test       run the test loop
  predict    run prediction
Zoo commands:
{extra}
"""


def run_lightning_cli(argv: list[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(
        args=None if argv == sys.argv[1:] else argv,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def _setup_logging() -> None:
    """Our own messages (data preparation, exports) at INFO; Lightning keeps its own."""
    logger = logging.getLogger("faceclip_zoo")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("FACECLIP_ZOO_LOG", "INFO"))
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            extra = "\n".join(f"  {name:<10} {desc}" for name, (_, desc) in EXTRA_COMMANDS.items())
            print(HELP.format(extra=extra))
            return 0
        if argv[0] in EXTRA_COMMANDS:
            return EXTRA_COMMANDS[argv[0]][0](argv[1:])
        if argv[0] not in TRAINER_COMMANDS:
            raise UserError(f"unknown command {argv[0]!r}; run `python -m faceclip_zoo --help`")
        run_lightning_cli(argv)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
