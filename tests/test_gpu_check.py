"""The GPU check's CPU smoke run: the script a GPU machine runs, kept from rotting.

It runs as it would there: without Ray, s3fs, imagehash or CodeCarbon importable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_THE_GPU_MACHINE = ("ray", "s3fs", "imagehash", "codecarbon", "botocore", "aiobotocore")

RUN_WITHOUT = textwrap.dedent("""
    import runpy, sys
    absent = set(sys.argv[1].split(","))

    class Absent:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in absent:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Absent)
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


# The compiled case costs some 30 s more on 2 cores (inductor builds C++ for the CPU, where the
# GPU builds Triton kernels): a long variant, run by make reliability.
@pytest.mark.parametrize("variants", [
    "off", pytest.param("both", marks=[pytest.mark.full, pytest.mark.reliability])])
def test_gpu_check_runs_on_the_cpu_without_ray(variants, tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, ",".join(ABSENT_ON_THE_GPU_MACHINE),
         str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--compile", variants,
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout) == report
    assert report["skipped"] == []
    compiled = {"off": [False], "both": [False, True]}[variants]
    assert [(r["model"], r["compile"]) for r in report["results"]] == [
        ("tiny-cpu", c) for c in compiled]
    for row in report["results"]:
        assert row["precision"] == {"param_dtype": "bfloat16", "reduce_dtype": "float32",
                                    "loss_dtype": "float32"}
        assert row["images_per_second"] > 0 and row["step_seconds_median"] > 0
        assert 0 < row["augment_share_of_step"] < 1
        assert row["model_tflop_per_step"] > 0 and row["mfu_vs_measured_matmul"] > 0
        assert row["mfu"] is None and row["joules_per_image"] is None  # no datasheet, no NVML
    assert report["energy_source"] == "no NVML on a CPU"
