"""Is the data stage slower than at an earlier commit? Interleaved runs of
benchmarks/data_stage.py (stages 3 and 4 only) on this tree and on a base commit, compared by
the rate from the stage's start.

    .venv/bin/python benchmarks/stage_regression.py --base a65dfd0 --pairs 6

The base commit is checked out in a temporary git worktree (removed at the end) and measured
with this tree's data_stage.py, on this tree's virtual environment. The runs alternate base
first, then this tree first, because this machine's speed drifts by a third within an hour:
only runs close in time compare. Progress goes to stderr, one line a run. The result is one
JSON object on stdout: each side's runs and medians, and the medians' change a stage.

The rate after the first batch is given too, but it does not decide anything. It counts the
images cut before its timer started, so a stream that holds its first batch back reads faster
by it (docs/benchmarks.md, 2026-12-06).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "data_stage.py"
MEASURES = {
    "3_from_start": "3_ray_stage_photometric_on_data_from_start_images_per_s",
    "4_from_start": "4_ray_stage_photometric_on_device_from_start_images_per_s",
    "3_after_first_batch": "3_ray_stage_photometric_on_data_images_per_s",
    "4_after_first_batch": "4_ray_stage_photometric_on_device_images_per_s",
}


def run_once(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    """One data_stage.py run on ``tree``: its rates by ``MEASURES`` name."""
    command = [sys.executable, str(SCRIPT), "--images", str(args.images), "--workers",
               str(args.workers), "--epochs", str(args.epochs), "--samples-per-shard",
               str(args.samples_per_shard), "--repeats", "1", "--stage-only"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"data_stage.py failed on {tree} (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    lines = done.stdout.splitlines()
    try:  # the result is the JSON object from a line "{" to a line "}"
        start, end = lines.index("{"), lines.index("}")
        result = json.loads("\n".join(lines[start:end + 1]))
    except ValueError as err:
        raise SystemExit(f"no result in data_stage.py's output on {tree}: {err}\n"
                         f"{done.stdout[-3000:]}") from err
    return {name: result[key] for name, key in MEASURES.items()}


def checkout(base: str) -> Path:
    """``base`` in a temporary worktree of this repository."""
    folder = Path(tempfile.mkdtemp(prefix="ssl-stage-base-")) / "tree"
    added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder),
                            base], capture_output=True, text=True)
    if added.returncode != 0:
        shutil.rmtree(folder.parent, ignore_errors=True)
        raise SystemExit(f"cannot check out {base!r}: {added.stderr.strip()}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--pairs", type=int, default=6, help="runs of each side")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=32,
                        help="the shards' size: a view worker's group holds up to 16 of them")
    parser.add_argument("--epochs", type=int, default=24,
                        help="enough that the stage's start-up is a small part of a run")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    base_tree = checkout(args.base)
    # stopped with SIGTERM (kill, a CI timeout), still remove the worktree
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    runs: dict[str, list[dict]] = {"base": [], "now": []}
    try:
        for pair in range(args.pairs):
            order = ("base", "now") if pair % 2 == 0 else ("now", "base")
            for side in order:
                rates = run_once(base_tree if side == "base" else ROOT, args)
                runs[side].append(rates)
                print(f"pair {pair + 1}/{args.pairs} {side}: " + ", ".join(
                    f"{name} {rate:.0f}" for name, rate in rates.items()),
                    file=sys.stderr, flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                       capture_output=True)
        shutil.rmtree(base_tree.parent, ignore_errors=True)
    report: dict = {"base": args.base, "pairs": args.pairs, "epochs": args.epochs,
                    "images": args.images, "workers": args.workers,
                    "samples_per_shard": args.samples_per_shard}
    for name in MEASURES:
        sides = {side: [r[name] for r in runs[side]] for side in runs}
        base_median, now_median = (statistics.median(sides[s]) for s in ("base", "now"))
        report[name] = {"base_median": round(base_median, 1), "now_median": round(now_median, 1),
                        # no change when the base timed nothing (every image in the first batch)
                        "change": (f"{100 * (now_median / base_median - 1):+.1f}%"
                                   if base_median else None),
                        "base_runs": [round(r, 1) for r in sides["base"]],
                        "now_runs": [round(r, 1) for r in sides["now"]]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
