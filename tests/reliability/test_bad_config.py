"""Every mistake a user can make in ``ssl-pretrain train`` (a bad field in any config section, data
that is not there, object storage without credentials or out of reach) ends with exit code 2 and
one sentence naming what to change, before any cluster work: no Ray instance is started and no
run directory is created. Bad storage goes through the installed command against a real S3
endpoint (moto); the wide sweep of bad fields runs the same ``main`` in-process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import ssl_train.runtime.launcher
from ssl_train.cli import main
from tests.conftest import S3_CREDENTIALS
from tests.reliability.faultproxy import Fault

pytestmark = pytest.mark.reliability

_USER_ENVIRONMENT = ("RAY_ADDRESS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                     "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE")


@pytest.fixture
def ray_tmpdir():
    """An empty folder for RAY_TMPDIR: a Ray instance started by the command leaves its session
    here. Short, because Ray's socket paths under it must stay within 107 characters."""
    folder = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _environment(ray_tmpdir: Path, **variables: str) -> dict[str, str]:
    """This machine's environment without a Ray address or AWS settings, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if k not in _USER_ENVIRONMENT}
    return {**env, "RAY_TMPDIR": str(ray_tmpdir), **variables}


def _one_error_line(stderr: str) -> str:
    """The error sentence, checked to be all that was printed on stderr."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssl-pretrain train: error: "), stderr[-3000:]
    return lines[0].removeprefix("ssl-pretrain train: error: ")


def _train_refuses(tmp_path: Path, ray_tmpdir: Path, *arguments: str,
                   env: dict[str, str] | None = None) -> str:
    """Run the installed ``ssl-pretrain train`` with a run directory under ``tmp_path``; check that
    it stopped with exit code 2, one error line and no cluster work; return the message."""
    executable = Path(sys.executable).parent / "ssl-pretrain"
    result = subprocess.run(
        [str(executable), "train", "--set", f"run.output_dir={tmp_path / 'runs'}", *arguments],
        env=env or _environment(ray_tmpdir), cwd=tmp_path, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    message = _one_error_line(result.stderr)
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert list(ray_tmpdir.iterdir()) == [], "a Ray instance was started"
    assert not (tmp_path / "runs").exists()
    return message


@pytest.mark.full  # checks the check, not our code: Ray takes ~15 s to start here
def test_a_started_ray_instance_would_be_seen(tmp_path, ray_tmpdir):
    """The check above is meaningful: the launcher's way of starting Ray fills RAY_TMPDIR."""
    script = "from pipelines.cluster import ensure_ray; ensure_ray(num_cpus=1).shutdown()"
    subprocess.run([sys.executable, "-c", script], env=_environment(ray_tmpdir), cwd=tmp_path,
                   check=True, capture_output=True, timeout=300)
    assert (ray_tmpdir / "ray").is_dir()


# ---------------------------------------------------------------- data and storage

def test_a_missing_local_shard_folder(tmp_path, ray_tmpdir):
    missing = tmp_path / "nowhere"
    message = _train_refuses(tmp_path, ray_tmpdir, "--set", f"data.source.url={missing}")
    assert str(missing) in message


def test_a_local_folder_without_shards(tmp_path, ray_tmpdir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a shard")
    message = _train_refuses(tmp_path, ray_tmpdir, "--set", f"data.source.url={empty}")
    assert f"no webdataset shards under {empty}" in message


def _s3_environment(ray_tmpdir: Path, endpoint: str, **credentials: str) -> dict[str, str]:
    return _environment(ray_tmpdir, **{"AWS_ENDPOINT_URL": endpoint,
                                       "AWS_DEFAULT_REGION": "us-east-1", **credentials})


def test_a_missing_s3_prefix(tmp_path, ray_tmpdir, s3_bucket, s3_server):
    message = _train_refuses(
        tmp_path, ray_tmpdir, "--set", f"data.source.url={s3_bucket}/no-shards-here",
        env=_s3_environment(ray_tmpdir, s3_server, **S3_CREDENTIALS))
    assert f"no webdataset shards under {s3_bucket}/no-shards-here" in message


@pytest.mark.full
def test_a_missing_bucket(tmp_path, ray_tmpdir, s3_server):
    message = _train_refuses(
        tmp_path, ray_tmpdir, "--set", "data.source.url=s3://no-such-bucket/x",
        env=_s3_environment(ray_tmpdir, s3_server, **S3_CREDENTIALS))
    assert "s3://no-such-bucket/x" in message and "does not exist" in message


def test_an_output_directory_in_a_missing_bucket(tmp_path, ray_tmpdir, s3_server):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-000000.tar").write_bytes(b"\0" * 1024)  # listed, never read
    message = _train_refuses(
        tmp_path, ray_tmpdir, "--set", f"data.source.url={shards}",
        "--set", "run.output_dir=s3://no-such-bucket/runs",
        env=_s3_environment(ray_tmpdir, s3_server, **S3_CREDENTIALS))
    assert "s3://no-such-bucket/runs" in message and "does not exist" in message


def test_missing_credentials_name_the_variables_to_set(tmp_path, ray_tmpdir, s3_bucket,
                                                        s3_server):
    message = _train_refuses(tmp_path, ray_tmpdir, "--set", f"data.source.url={s3_bucket}/shards",
                             env=_s3_environment(ray_tmpdir, s3_server))
    assert "no credentials" in message
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message


def test_unreachable_storage_stops_after_the_given_attempts(tmp_path, ray_tmpdir):
    message = _train_refuses(
        tmp_path, ray_tmpdir, "--storage-attempts", "2",
        "--set", "data.source.url=s3://bucket/shards",
        env=_s3_environment(ray_tmpdir, "http://127.0.0.1:9", **S3_CREDENTIALS))
    assert "cannot reach storage for s3://bucket/shards" in message
    assert "http://127.0.0.1:9" in message


def test_rejected_credentials_are_named(tmp_path, ray_tmpdir, faulty_s3):
    # moto takes any key, so the proxy answers as S3 does for an unknown one.
    proxy, bucket, _ = faulty_s3
    proxy.add(Fault("error", code="InvalidAccessKeyId"))
    message = _train_refuses(tmp_path, ray_tmpdir, "--set", f"data.source.url={bucket}/shards",
                             env=_s3_environment(ray_tmpdir, proxy.url, **S3_CREDENTIALS))
    # S3 answers a HEAD with a bare 403, so a first HEAD reads as "access denied".
    assert "credentials" in message and ("rejected" in message or "access denied" in message)


# ---------------------------------------------------------------- config fields

# (override, the key the message must name): at least one mistake in every section, and each
# kind of mistake (range, type, choice, unknown key, cross-field rule, override syntax).
BAD_FIELDS = [
    ("run.name=team/run", "run.name"),
    ("run.name=", "run.name"),
    ("run.output_dir=", "run.output_dir"),
    ("model.image_size=0", "model.image_size"),
    ("model.encoder.patch_size=7", "model.encoder.patch_size"),
    ("model.encoder.pos_embed=rope", "model.encoder.pos_embed"),
    ("model.encoder.drop_path_rate=1.0", "model.encoder.drop_path_rate"),
    ("objectives.mae.decoder.embed_dim=512", "objectives.mae.decoder.embed_dim"),
    ("objectives.simclr.projector.out_dim=0", "objectives.simclr.projector.out_dim"),
    ("objectives.mae.mask_ratio=1.5", "objectives.mae.mask_ratio"),
    ("objectives.mae.norm_pix_loss=sometimes", "objectives.mae.norm_pix_loss"),
    ("objectives.mae.weight=-1", "objectives.mae.weight"),
    ("objectives=[mocov9]", "mocov9"),
    ("weighting=uncertain", "weighting"),
    ("optim.base_lr=0", "optim.base_lr"),
    ("optim.beta2=1.0", "optim.beta2"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.grad_clip_norm=0", "optim.grad_clip_norm"),
    ("train.steps=-5", "train.steps"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("train.stepz=10", "unknown key train.stepz"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("train.num_workers=3", "train.num_workers"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker"),
    ("train.max_failures=-2", "train.max_failures"),
    ("train.placement_strategy=EVERYWHERE", "train.placement_strategy"),
    ("parallel.mixed_precision=fp8", "parallel.mixed_precision"),
    ("parallel.activation_checkpointing=maybe", "parallel.activation_checkpointing"),
    ("data.source.format=zip", "data.source.format"),
    ("data.source.images_per_shard=0", "data.source.images_per_shard"),
    ("data.epochs=0", "data.epochs"),
    ("data.view_workers=0", "data.view_workers"),
    ("data.quality.min_side=0", "data.quality.min_side"),
    ("data.quality.near_duplicate_distance=17", "data.quality.near_duplicate_distance"),
    ("objectives.simclr.crop.scale=[0.9, 0.1]", "objectives.simclr.crop"),
    ("data.augment.photometric.hue=0.7", "data.augment.photometric.hue"),
    ("data.augment.photometric_on=gpu", "data.augment.photometric_on"),
    ("telemetry.health_every=0", "telemetry.health_every"),
    ("telemetry.metrics_port=80", "telemetry.metrics_port"),
    ("telemetry.knn_monitor=imagenet", "telemetry.knn_monitor"),
    ("energy.region=atlantis", "energy.region"),
    ("energy.pue.value=0.5", "energy.pue.value"),
    ("energy.interval_seconds=0", "energy.interval_seconds"),
    ("energy.grid_intensity={g_per_kwh: 50}", "energy.grid_intensity"),
    ("optimiser.base_lr=1", "unknown key optimiser"),
    ("train=3", "train:"),
    ("train.steps", "train.steps"),
    ("train.steps=[1", "train.steps"),
]


class _RayStarted(Exception):
    pass


@pytest.mark.parametrize("override,key", BAD_FIELDS, ids=[case[0] for case in BAD_FIELDS])
def test_a_bad_field_is_exit_2_naming_the_key(override, key, tmp_path, capsys, monkeypatch):
    def ray_started(*args, **kwargs):
        raise _RayStarted("train went on to start Ray")

    monkeypatch.setattr(ssl_train.runtime.launcher, "ensure_ray", ray_started)
    code = main(["train", "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", override])
    captured = capsys.readouterr()
    assert code == 2
    assert key in _one_error_line(captured.err)
    assert captured.out == ""
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text", ["model: {image_size: 64\n", "train:\n  steps: 3\n bad: 1\n"],
                         ids=["unclosed-brace", "bad-indent"])
def test_a_config_file_that_is_not_yaml_is_one_line_naming_the_file(text, tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    message = _one_error_line(capsys.readouterr().err)
    assert str(path) in message and "not valid YAML" in message


# The installed command with a few of them: the same sentence reaches a user's terminal.
COMMAND_LINE_FIELDS = [
    ("train.stepz=10", "unknown key train.stepz"),
    ("parallel.mixed_precision=fp8", "parallel.mixed_precision"),
    pytest.param("train.steps=abc", "train.steps", marks=pytest.mark.full),
    pytest.param("telemetry.knn_monitor=imagenet", "telemetry.knn_monitor",
                 marks=pytest.mark.full),
    pytest.param("energy.region=atlantis", "energy.region", marks=pytest.mark.full),
]


@pytest.mark.parametrize("override,key", COMMAND_LINE_FIELDS)
def test_a_bad_field_from_the_installed_command(override, key, tmp_path, ray_tmpdir):
    assert key in _train_refuses(tmp_path, ray_tmpdir, "--set", override)
