"""The command line: LightningCLI for fit/validate/test/predict, plus zoo commands.

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
from typing import Callable

from jsonargparse import ArgumentError

from faceclip_zoo.train import TRAINER_COMMANDS, run_lightning_cli
from faceclip_zoo.utils import UserError



def _export(argv: list[str]) -> int:
    from jsonargparse import CLI

    from faceclip_zoo.export import export_checkpoint

    out = CLI(export_checkpoint, args=argv, as_positional=False)
    print(f"exported to {out}")
    return 0


def _convert(argv: list[str]) -> int:
    from jsonargparse import CLI

    from faceclip_zoo.convert import convert

    report = CLI(convert, args=argv, as_positional=False)
    for name, info in report.items():
        print(f"{name}: {info if isinstance(info, str) else ', '.join(info)}")
    return 0


def _prepare(argv: list[str]) -> int:
    from jsonargparse import CLI

    from faceclip_zoo.data.prepare import prepare

    manifest = CLI(prepare, args=argv, as_positional=False)
    c = manifest["counts"]
    print(f"{c['inputs']} inputs: {c['accepted']} accepted in {len(manifest['shards'])} shard(s), "
          f"{c['rejected']} rejected {c['rejected_by_reason'] or ''}")
    return 0


def _cache(argv: list[str]) -> int:
    from jsonargparse import CLI

    from faceclip_zoo.cache import cache

    total = CLI(cache, args=argv, as_positional=False)
    print(f"cached {','.join(total['features'])} for {total['cached']} samples "
          f"({total['already']} already cached, {total['undecodable']} undecodable kept as they are) "
          f"in {total['seconds']} s")
    return 0


def _generate(argv: list[str]) -> int:
    from faceclip_zoo.generate import main as generate_main

    return generate_main(argv)


def _demo(argv: list[str]) -> int:
    from jsonargparse import CLI

    from faceclip_zoo.demo import demo

    CLI(demo, args=argv, as_positional=False)
    return 0


def _evaluate(argv: list[str]) -> int:
    from faceclip_zoo.evaluation.run import main as evaluate_main

    return evaluate_main(argv)


def _ablation(argv: list[str]) -> int:
    from faceclip_zoo.evaluation.ablation import main as ablation_main

    return ablation_main(argv)


def _bench(argv: list[str]) -> int:
    from faceclip_zoo.bench.run import main as bench_main

    return bench_main(argv)


EXTRA_COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "export": (_export, "fit checkpoint -> model directory (encoder) or pipeline folder (SDXL)"),
    "generate": (_generate, "exported pipeline + face photo + prompt -> PNG"),
    "demo": (_demo, "a local web page (Gradio): upload photos, prompt, see the aligned crops and the images"),
    "evaluate": (_evaluate, "pipeline + benchmark spec -> Face Sim, CLIP-T, FID, contact sheets; "
                            "encoder -> zero-shot, t-SNE"),
    "ablation": (_ablation, "the paper's loss ablation (Table 3) and Fig. 2 in miniature, synthetic identities"),
    "prepare": (_prepare, "photos + captions -> aligned, filtered training shards"),
    "cache": (_cache, "fit recipe + shards -> frozen-model outputs stored in the shards"),
    "convert": (_convert, "official release weights -> faceclip_zoo model directories"),
    "bench": (_bench, "speed and memory against the peers (open_clip, diffusers), one table; --size tiny..real"),
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
    except ArgumentError as exc:
        print(f"error: {one_line_parse_error(str(exc))}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # A UserError raised while LightningCLI instantiates a recipe's class reaches us
        # wrapped in jsonargparse's account of every Union alternative it tried.
        if "Does not validate against any of the Union subtypes" not in str(exc):
            raise
        print(f"error: {one_line_parse_error(str(exc), hint=False)}", file=sys.stderr)
        return 2
