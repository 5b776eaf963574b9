"""The command line: LightningCLI for fit/validate/test/predict; every other command is a
typed function (ZOO_COMMANDS) whose signature and docstring jsonargparse turns into its
options and --help, so all commands take options the same way (`--name value`, lists as
`--name a --name+ b`, booleans as `--name true`).

    python -m faceclip_zoo fit --config recipes/quickstart/faceclip.yaml
    python -m faceclip_zoo export --ckpt runs/.../last.ckpt --out checkpoints/my-encoder
    python -m faceclip_zoo prepare --input photos/ --out data/my-shards
    python -m faceclip_zoo cache --recipe recipes/quickstart/faceclip.yaml
    python -m faceclip_zoo generate --pipeline checkpoints/my-sdxl --face me.png --prompt "..."
    python -m faceclip_zoo demo --pipeline checkpoints/my-sdxl
    python -m faceclip_zoo evaluate --pipeline checkpoints/my-sdxl --benchmark bench.yaml --out runs/eval
    python -m faceclip_zoo bench --size tiny
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable, NamedTuple

from jsonargparse import ArgumentError

from faceclip_zoo.train import TRAINER_COMMANDS, run_lightning_cli
from faceclip_zoo.utils import UserError



def _prepared(manifest: dict) -> str:
    if not manifest:
        return "this rank's inputs are done; rank 0 assembles the shards"
    c = manifest["counts"]
    missing = manifest.get("not_downloaded", {}).get("total")
    return (f"{c['inputs']} inputs: {c['accepted']} accepted in {len(manifest['shards'])} shard(s), "
            f"{c['rejected']} rejected {c['rejected_by_reason'] or ''}"
            + (f"; {missing} rows img2dataset could not download {manifest['not_downloaded']['by_status']}"
               if missing else ""))


def _cached(total: dict) -> str:
    if not total:
        return "this rank's shards are done; rank 0 writes cache.json"
    return (f"cached {','.join(total['features'])} for {total['cached']} samples ({total['already']} already "
            f"cached, {total['undecodable']} undecodable kept as they are) in {total['seconds']} s")


class ZooCommand(NamedTuple):
    """A command besides LightningCLI's: a typed function (its signature and docstring are
    its options and --help, through jsonargparse) and how its return value is reported
    (None: the function prints what it has to say)."""

    function: str  # "module:function"
    summary: str
    report: Callable[[Any], str] | None = None


ZOO_COMMANDS: dict[str, ZooCommand] = {
    "export": ZooCommand("faceclip_zoo.export:export_checkpoint",
                         "fit checkpoint -> model directory (encoder) or pipeline folder (SDXL, FLUX)",
                         lambda out: f"exported to {out}"),
    "generate": ZooCommand("faceclip_zoo.generate:generate", "exported pipeline + face photo + prompt -> PNG"),
    "demo": ZooCommand("faceclip_zoo.demo:demo",
                       "a local web page (Gradio): upload photos, prompt, see the aligned crops and the images"),
    "evaluate": ZooCommand("faceclip_zoo.evaluation.run:evaluate",
                           "pipeline + benchmark spec -> Face Sim, CLIP-T, FID, contact sheets; "
                           "encoder -> zero-shot, t-SNE"),
    "ablation": ZooCommand("faceclip_zoo.evaluation.ablation:ablation",
                           "the paper's loss ablation (Table 3) and Fig. 2 in miniature, synthetic identities"),
    "prepare": ZooCommand("faceclip_zoo.prepare:prepare", "photos + captions -> aligned, filtered training shards",
                          _prepared),
    "cache": ZooCommand("faceclip_zoo.cache:cache", "fit recipe + shards -> frozen-model outputs stored in the shards",
                        _cached),
    "convert": ZooCommand("faceclip_zoo.convert:convert", "official release weights -> faceclip_zoo model directories",
                          lambda report: "\n".join(f"{name}: {info if isinstance(info, str) else ', '.join(info)}"
                                                   for name, info in report.items())),
    "standins": ZooCommand("faceclip_zoo.bench.standins:standins",
                           "seeded random weights in the layouts the production recipes read (real size)",
                           lambda paths: "\n".join(paths)),
    "bench": ZooCommand("faceclip_zoo.bench.run:bench",
                        "speed and memory against the peers (open_clip, diffusers), one table; --size tiny..real"),
}


def refuse_repeated_options(argv: list[str]) -> None:
    """jsonargparse keeps the last of an option given twice; for a list such as generate's
    --face that would drop a photo without a word. Several values go as `--face a.png
    --face+ b.png`."""
    seen = set()
    for token in argv:
        if not token.startswith("--") or token == "--":
            continue
        name = token[2:].split("=", 1)[0]
        if name.endswith("+"):
            continue
        if name in seen:
            raise UserError(f"--{name} is given twice (the second would replace the first); for several values "
                            f"write --{name} <first> --{name}+ <second>")
        seen.add(name)


def run_zoo_command(name: str, argv: list[str]) -> Any:
    """Parse `argv` into the command's function (jsonargparse), call it, report its result."""
    import importlib
    import inspect

    from jsonargparse import CLI

    command = ZOO_COMMANDS[name]
    module, function = command.function.split(":")
    fn = getattr(importlib.import_module(module), function)
    refuse_repeated_options(argv)
    if "config" in inspect.signature(fn).parameters:
        # CLI() reserves --config for jsonargparse's own config-file action, which would
        # shadow the function's `config` and silently run its default instead
        from jsonargparse import ArgumentParser

        parser = ArgumentParser(prog=f"python -m faceclip_zoo {name}", description=inspect.getdoc(fn))
        parser.add_function_arguments(fn, as_positional=False)
        result = fn(**parser.parse_args(argv).as_dict())
    else:
        result = CLI(fn, args=argv, as_positional=False, prog=f"python -m faceclip_zoo {name}")
    if command.report is not None:
        print(command.report(result))
    return result


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


_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Problem with given class_path",
          "Expected a <class 'NoneType'>", "Given value", "- Expected a <class 'NoneType'>")


def one_line_parse_error(message: str, hint: bool = True) -> str:
    """jsonargparse explains a bad recipe over many lines (every Union alternative, the
    whole given value); keep the key and the specific complaint."""
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines() if line.strip()]
    key = re.search(r'Parser key "([^"]+)"', message)
    lines = [re.sub(r'^Parser key "[^"]+":\s*', "", line) for line in lines]
    detail = next((line for line in lines if line and not line.startswith(_NOISE)), message)
    prefix = f'recipe key "{key.group(1)}": ' if key else ""
    return f"{prefix}{detail}" + (" (see `python -m faceclip_zoo <command> --help`)" if hint else "")


def _setup_logging() -> None:
    """Our own messages (data preparation, exports) at INFO; Lightning keeps its own."""
    logger = logging.getLogger("faceclip_zoo")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("FACECLIP_ZOO_LOG", "INFO"))
        logger.propagate = False
    # diffusers warns at import that it cannot find torchao classes that torchao 0.18 moved;
    # they matter only for loading checkpoints pickled with torchao, which we never write.
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)
    # torchao 0.18 registers two enums with torch's pytree, which torch 2.14 calls
    # deprecated, one warning each whenever peft or torchao is imported.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def _lightning_setting_errors() -> tuple[type, ...]:
    """Lightning's MisconfigurationException, once Lightning is imported (evaluated when an
    exception reaches main's handlers; a command that never imports Lightning pays nothing)."""
    if "lightning" not in sys.modules:
        return ()
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (MisconfigurationException,)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            extra = "\n".join(f"  {name:<10} {command.summary}" for name, command in ZOO_COMMANDS.items())
            print(HELP.format(extra=extra))
            return 0
        if argv[0] in ZOO_COMMANDS:
            run_zoo_command(argv[0], argv[1:])
            return 0
        if argv[0] not in TRAINER_COMMANDS:
            raise UserError(f"unknown command {argv[0]!r}; run `python -m faceclip_zoo --help`")
        run_lightning_cli(argv)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ArgumentError as exc:
        print(f"error: {one_line_parse_error(str(exc))}", file=sys.stderr)
        return 2
    except _lightning_setting_errors() as exc:  # Lightning refusing a trainer setting (max_steps=-5, ...)
        print(f"error: trainer: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # A UserError raised while LightningCLI instantiates a recipe's class reaches us
        # wrapped in jsonargparse's account of every Union alternative it tried.
        if "Does not validate against any of the Union subtypes" not in str(exc):
            raise
        print(f"error: {one_line_parse_error(str(exc), hint=False)}", file=sys.stderr)
        return 2
