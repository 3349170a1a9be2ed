"""The ``ssl-pretrain`` command: one console script, one subcommand per stage of the job.

Errors a user can cause (a bad config, a bad override) are caught here and reported in one
sentence with exit code 2, before any model, storage or cluster work starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ssl_train.config import ConfigError, dump_config, load_config, packaged_config_names

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with what the user asked for; its message says what to change."""


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="tiny-cpu",
        help=f"a packaged config ({', '.join(packaged_config_names())}) or a YAML path "
        "(default: tiny-cpu)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set loss.mask_ratio=0.6 (repeatable)",
    )


def _not_yet(stage: str) -> None:
    raise UsageError(f"'ssl-pretrain {stage}' is not available in this version yet")


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    from pipelines.sample_images import random_view_batches, sample_photographs
    from ssl_train.runner import run_in_process

    run_dir = Path(config.run.output_dir) / config.run.name
    images = sample_photographs(min_side=config.model.image_size)
    print(
        f"training {config.run.name}: {config.train.steps} steps, batch "
        f"{config.train.global_batch_size}, objective {config.loss.objective}, on "
        f"{len(images)} scikit-image sample photographs, in this process"
    )
    batches = random_view_batches(
        images, config.model.image_size, config.train.global_batch_size, config.train.seed
    )
    run_in_process(config, batches, run_dir)
    print(f"run directory: {run_dir.resolve()} (config.yaml, metrics.jsonl)")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    _not_yet("ingest")
    return 1


def cmd_eval(args: argparse.Namespace) -> int:
    _not_yet("eval")
    return 1


def cmd_export(args: argparse.Namespace) -> int:
    _not_yet("export")
    return 1


def cmd_energy_report(args: argparse.Namespace) -> int:
    _not_yet("energy-report")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-pretrain",
        description="Hybrid self-supervised (contrastive + masked) ViT pretraining on Ray.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = commands.add_parser(
        "ingest", help="turn a folder or prefix of raw images into quality-filtered shards"
    )
    ingest.add_argument("src", help="folder or prefix of raw images (local path or fsspec URL)")
    ingest.add_argument("dest", help="prefix to write WebDataset tar shards to")
    ingest.set_defaults(handler=cmd_ingest)

    train = commands.add_parser("train", help="pretrain the hybrid model")
    _add_config_arguments(train)
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="kNN and linear-probe accuracy of a checkpoint")
    evaluate.add_argument("checkpoint", help="checkpoint directory")
    evaluate.add_argument("--data", help="labelled dataset (folder per class, shards, or 'digits')")
    evaluate.set_defaults(handler=cmd_eval)

    export = commands.add_parser("export", help="write the encoder alone as timm safetensors")
    export.add_argument("checkpoint", help="checkpoint directory")
    export.add_argument("out", help="output directory")
    export.set_defaults(handler=cmd_export)

    energy = commands.add_parser(
        "energy-report", help="energy and carbon report of a run from its ledger"
    )
    energy.add_argument("run_dir", help="run directory")
    energy.set_defaults(handler=cmd_energy_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, UsageError) as err:
        print(f"ssl-pretrain {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
