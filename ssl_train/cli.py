"""The ``ssl-pretrain`` command: one console script, one subcommand per stage of the job.

Errors a user can cause (a bad config, a bad override) are caught here and reported in one
sentence with exit code 2, before any model, storage or cluster work starts.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence

from pipelines.settings import ConfigError
from pipelines.storage.access import StorageError
from ssl_train import packaged_config_names

# The config, the model and Ray load in the commands that need them: ``energy-report`` and
# ``--help`` stay light (34 MB, not the 948 MB of torch, timm and Ray).

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
        help="override one config field, e.g. --set objectives.mae.mask_ratio=0.6 (repeatable)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from ssl_train.config import dump_config, load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    from ssl_train.runtime.launcher import train
    from ssl_train.runtime.lease import RunInUse

    try:
        train(config, address=args.address, options=_storage_options(args),
              slice_steps=args.slice_steps)
    except RunInUse as err:
        raise UsageError(str(err)) from None
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ssl_train.config import load_config
    from ssl_train.runtime.search import SearchFailed, default_space, load_space, search

    config = load_config(args.config, args.overrides)
    if args.space:
        dimensions = load_space(args.space)
    else:
        dimensions, notes = default_space(config)
        for note in notes:
            print(f"default space: {note}")
    try:
        search(config, dimensions, args.trials, metric=args.metric, address=args.address,
               options=_storage_options(args))
    except SearchFailed as err:
        print(f"ssl-pretrain tune: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_k8s_render(args: argparse.Namespace) -> int:
    from ssl_train.config import load_config
    from ssl_train.deploy.k8s import RenderError, load_params, render, write

    config = load_config(args.config, args.overrides)
    params = load_params(args.params)
    command = shlex.join(["ssl-pretrain", "k8s", "render", "--config", args.config,
                          "--image", args.image,
                          *(part for item in args.overrides for part in ("--set", item)),
                          *(["--params", args.params] if args.params else [])])
    try:
        files = render(config, args.image, params, command=command)
    except RenderError as err:
        raise UsageError(str(err)) from None
    for path in write(files, args.out):
        print(f"wrote {path}")
    return 0


def _storage_options(args: argparse.Namespace):
    from pipelines.storage.access import StorageOptions

    return StorageOptions(
        endpoint_url=args.endpoint_url,
        key=args.access_key_id,
        secret=args.secret_access_key,
        anon=args.anon,
        max_attempts=args.storage_attempts,
    )


def _add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "object storage",
        "s3:// credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (preferred: flags "
        "end up in shell history and process lists) and the endpoint from AWS_ENDPOINT_URL, "
        "unless given here",
    )
    group.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://minio:9000")
    group.add_argument("--access-key-id", help="S3 access key id")
    group.add_argument("--secret-access-key", help="S3 secret access key")
    group.add_argument("--anon", action="store_true", help="anonymous access (public buckets)")
    group.add_argument("--storage-attempts", type=_positive_int, default=8, metavar="N",
                       help="attempts per storage request, with exponential backoff, before a "
                       "failing or throttling store stops the command (default 8)")


def _storage_url(text: str) -> str:
    """A path or URL argument, refused if it carries credentials (they would be logged)."""
    from pipelines.storage.access import refuse_credentials_in_url

    try:
        return refuse_credentials_in_url(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 256MB or 1GB")
    scale = 1024 ** "_KMGT".index(match.group(2).upper() or "_")
    return int(float(match.group(1)) * scale)


def _without_none(options: dict) -> dict:
    return {k: _without_none(v) if isinstance(v, dict) else v
            for k, v in options.items() if v is not None}


def _ingest_default(field: str):
    """The ingest option's default, from its one definition (``IngestConfig``)."""
    from pipelines.ingest.config import IngestConfig

    return IngestConfig.model_fields[field].default


def _quality_default(field: str):
    from pipelines.views.quality import QualityConfig

    return QualityConfig.model_fields[field].default


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipelines.ingest import IngestConfig, IngestMetrics, ingest
    from ssl_train.config import validate_section

    options = {
        "samples_per_shard": args.samples_per_shard, "shard_bytes": args.shard_size,
        "reencode": args.reencode, "jpeg_quality": args.jpeg_quality, "max_side": args.max_side,
        "seed": args.seed, "images_per_part": args.images_per_part,
        "quality": {
            "min_side": args.min_side, "max_aspect_ratio": args.max_aspect_ratio,
            "min_pixel_std": args.min_pixel_std,
            "near_duplicate_distance": args.near_duplicate_distance,
        },
    }
    config = validate_section(IngestConfig, _without_none(options), "ingest option")
    metrics = IngestMetrics(args.metrics_port, args.metrics_address)
    ingest(args.src, args.dest, config, _storage_options(args), overwrite=args.overwrite,
           address=args.address, metrics=metrics, list_file=args.list)
    return 0


def _checkpoint_of(source: str, options) -> str:
    """The checkpoint a command reads: SOURCE itself, or the latest complete one of the run
    directory SOURCE (said on the console)."""
    from ssl_train.train.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(source, options)
    if checkpoint != source:
        print(f"using {checkpoint}, the latest complete checkpoint of {source}")
    return checkpoint


def cmd_eval(args: argparse.Namespace) -> int:
    from ssl_train.eval.evaluate import default_result_path, evaluate, result_table, write_result

    options = _storage_options(args)
    checkpoint = _checkpoint_of(args.checkpoint, options)
    result = evaluate(checkpoint, args.data, options,
                      k=args.k, temperature=args.temperature, shots=args.shots,
                      seeds=args.seeds, test_fraction=args.test_fraction)
    print(result_table(result))
    out = args.out or default_result_path(checkpoint)
    print(f"result: {write_result(result, out, options)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ssl_train.eval.export import export

    options = _storage_options(args)
    weights = export(_checkpoint_of(args.checkpoint, options), args.out, options)
    print(f"wrote {weights} and {weights.parent / 'config.json'}")
    return 0


def _shots(text: str) -> list[int]:
    try:
        shots = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        shots = []
    if not shots or min(shots) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive numbers like 1,5,10")
    return shots


def cmd_energy_report(args: argparse.Namespace) -> int:
    from ssl_train.energy.report import write_report
    from ssl_train.train.checkpoint import run_directory

    options = _storage_options(args)
    write_report(run_directory(args.run_dir, options), options, out=args.out)
    return 0


def cmd_config_explain(args: argparse.Namespace) -> int:
    from ssl_train.config import explain_fields

    print("\n".join(explain_fields(args.key)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl-pretrain",
        description="Hybrid self-supervised (contrastive + masked) ViT pretraining on Ray.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = commands.add_parser(
        "ingest", help="turn a folder or prefix of raw images into quality-filtered shards"
    )
    ingest.add_argument("src", type=_storage_url,
                        help="folder or prefix of raw images (local path or fsspec URL)")
    ingest.add_argument("dest", type=_storage_url,
                        help="prefix to write WebDataset tar shards to")
    size = ingest.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="images per shard")
    size.add_argument("--shard-size", type=_byte_size,
                      help=f"bytes per shard, e.g. 256MB (default {_ingest_default('shard_bytes')}"
                      " bytes)")
    ingest.add_argument("--reencode", choices=("keep", "jpeg"),
                        help="keep the original bytes (default) or re-encode to JPEG")
    ingest.add_argument("--jpeg-quality", type=int,
                        help=f"default {_ingest_default('jpeg_quality')}")
    ingest.add_argument("--max-side", type=int, help="downscale longer sides to this (jpeg only)")
    ingest.add_argument("--min-side", type=int, help=f"drop smaller images (default "
                        f"{_quality_default('min_side')})")
    ingest.add_argument("--max-aspect-ratio", type=float,
                        help=f"default {_quality_default('max_aspect_ratio')}")
    ingest.add_argument("--min-pixel-std", type=float,
                        help="drop near-constant images (grey-level std below this; default "
                        f"{_quality_default('min_pixel_std')})")
    ingest.add_argument("--near-duplicate-distance", type=int,
                        help="perceptual-hash bits within which images are near duplicates "
                        f"(default {_quality_default('near_duplicate_distance')})")
    ingest.add_argument("--list", metavar="FILE", type=_storage_url,
                        help="take the images from this file (or prefix of files) instead of "
                        "listing SRC: text (a path or URL a line), or CSV/Parquet with a url, "
                        "path or key (and bucket) column, such as an S3 Inventory")
    ingest.add_argument("--seed", type=int,
                        help=f"seed of the order of samples across shards (default "
                        f"{_ingest_default('seed')})")
    ingest.add_argument("--images-per-part", type=int,
                        help="images per unit of work: what a killed ingest does again "
                        f"(default {_ingest_default('images_per_part')})")
    ingest.add_argument("--overwrite", action="store_true",
                        help="replace shards already in DEST, or an unfinished ingest of other "
                        "options (rerunning the same command resumes it)")
    ingest.add_argument("--address", help="Ray cluster address (default: start a local one)")
    ingest.add_argument("--metrics-port", type=int,
                        help="serve ssl_ingest_* Prometheus metrics on this port while it runs")
    ingest.add_argument("--metrics-address", default="127.0.0.1",
                        help="address the metrics endpoint binds to (default 127.0.0.1)")
    _add_storage_arguments(ingest)
    ingest.set_defaults(handler=cmd_ingest)

    train = commands.add_parser("train", help="pretrain the hybrid model")
    _add_config_arguments(train)
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    train.add_argument("--address", help="Ray cluster address, e.g. auto (default: start a "
                       "local one)")
    train.add_argument("--slice-steps", type=_positive_int, metavar="N",
                       help="train at most N more steps, then checkpoint and stop (one slice of a "
                       "scheduled run; the schedule still spans train.steps)")
    _add_storage_arguments(train)
    train.set_defaults(handler=cmd_train)

    tune = commands.add_parser(
        "tune", help="search hyperparameters over real training runs (Ray Tune, Optuna, ASHA)")
    _add_config_arguments(tune)
    tune.add_argument("--space", metavar="SPACE.yaml",
                      help="the fields to search, e.g. 'optim.base_lr: {loguniform: [1.0e-4, "
                      "1.0e-2]}' (uniform, loguniform, randint, choice); default: each "
                      "objective's temperature, MAE's mask ratio, the learning rate and, under "
                      "fixed weighting, the objectives' weights")
    tune.add_argument("--trials", type=_positive_int, default=8, help="trials to run (8)")
    tune.add_argument("--metric", choices=("rankme", "knn"), default="rankme",
                      help="what ranks the trials: rankme (the held batch's effective rank, no "
                      "labels; default) or knn (kNN accuracy on scikit-learn's digits)")
    tune.add_argument("--address", help="Ray cluster address, e.g. auto (default: start a "
                      "local one)")
    _add_storage_arguments(tune)
    tune.set_defaults(handler=cmd_tune)

    evaluate = commands.add_parser("eval", help="kNN and linear-probe accuracy of a checkpoint")
    evaluate.add_argument("checkpoint", type=_storage_url, metavar="RUN_DIR_OR_CHECKPOINT",
                          help="a run directory (its latest complete checkpoint is used) or a "
                          "checkpoint directory; local path or fsspec URL")
    evaluate.add_argument("--data", default="digits",
                          help="labelled data: 'digits' (scikit-learn's, default), a folder with "
                          "one sub-folder per class, or a folder of WebDataset shards with a cls "
                          "member")
    evaluate.add_argument("--k", type=_positive_int, default=20, help="kNN neighbours (20)")
    evaluate.add_argument("--temperature", type=float, default=0.07,
                          help="kNN vote temperature (0.07)")
    evaluate.add_argument("--shots", type=_shots, default=[1, 5, 10],
                          help="few-shot sizes per class (1,5,10)")
    evaluate.add_argument("--seeds", type=_positive_int, default=5,
                          help="few-shot repetitions (5)")
    evaluate.add_argument("--test-fraction", type=float, default=0.5,
                          help="share of each class held out for testing (0.5)")
    evaluate.add_argument("--out", help="result JSON path or URL (default: "
                          "eval_result_<checkpoint>.json in the run directory)")
    _add_storage_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_eval)

    export = commands.add_parser("export", help="write the encoder alone as timm safetensors")
    export.add_argument("checkpoint", type=_storage_url, metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory (its latest complete checkpoint is used) or a "
                        "checkpoint directory; local path or fsspec URL")
    export.add_argument("out", help="output directory")
    _add_storage_arguments(export)
    export.set_defaults(handler=cmd_export)

    energy = commands.add_parser(
        "energy-report", help="energy and carbon report of a run from its ledger"
    )
    energy.add_argument("run_dir", type=_storage_url, metavar="RUN_DIR_OR_CHECKPOINT",
                        help="run directory, or one of its checkpoints (local path or fsspec "
                        "URL)")
    energy.add_argument("--out", help="write the report here instead of into RUN_DIR")
    _add_storage_arguments(energy)
    energy.set_defaults(handler=cmd_energy_report)

    config = commands.add_parser("config", help="what the config's fields are")
    config_commands = config.add_subparsers(dest="config_command", required=True,
                                            metavar="ACTION")
    explain = config_commands.add_parser(
        "explain", help="each field's type, default and description")
    explain.add_argument("key", nargs="?",
                         help="a field or section, e.g. data or objectives.mae.mask_ratio "
                         "(default: every field)")
    explain.set_defaults(handler=cmd_config_explain)

    k8s = commands.add_parser("k8s", help="Kubernetes manifests of a run (KubeRay)")
    k8s_commands = k8s.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    k8s_render = k8s_commands.add_parser(
        "render", help="write the RayJob, RayCluster, schedule and monitoring manifests")
    _add_config_arguments(k8s_render)
    k8s_render.add_argument("--image", required=True,
                            help="training image (GPU pods); IMAGE-cpu is used for the others")
    k8s_render.add_argument("--params", help="cluster shape YAML (default: built-in defaults; "
                            "see k8s/params.yaml)")
    k8s_render.add_argument("--out", default="k8s-rendered", help="folder to write into")
    k8s_render.set_defaults(handler=cmd_k8s_render)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, UsageError, StorageError) as err:
        print(f"ssl-pretrain {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
