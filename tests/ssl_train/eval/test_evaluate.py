"""Frozen-encoder evaluation and export: read-outs on features of known structure, a timm round
trip of the exported encoder, and the eval CLI on a checkpoint of a short run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pipelines.sample_images import digits_images, random_view_batches
from ssl_train.config import load_config
from ssl_train.eval.evaluate import evaluate_features, labelled_images, load_model
from ssl_train.eval.export import export, load_exported
from ssl_train.train.checkpoint import save_checkpoint
from ssl_train.train.loop import train_in_process
from ssl_train.train.optim import build_optimizer
from tests.conftest import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[3]


def clusters(classes: int, per_class: int, dim: int, spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 5
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(size=(len(labels), dim)) * spread, labels


def test_well_separated_clusters_are_read_out_almost_perfectly():
    features, labels = clusters(classes=5, per_class=120, dim=32, spread=0.5)
    result = evaluate_features(features, labels, shots=[1, 5], seeds=3)
    assert result["knn"]["top1"] >= 0.99
    assert result["linear_probe"]["top1"] >= 0.99
    assert result["few_shot"]["1"]["mean"] >= 0.95 and len(result["few_shot"]["1"]["runs"]) == 3
    assert result["num_train"] == result["num_test"] == 300


def test_random_labels_are_read_out_at_chance():
    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(2000, 32)), rng.integers(0, 5, size=2000)
    result = evaluate_features(features, labels, shots=[5], seeds=2)
    assert result["chance"] == 0.2
    for top1 in (result["knn"]["top1"], result["linear_probe"]["top1"],
                 result["few_shot"]["5"]["mean"]):
        assert abs(top1 - 0.2) < 0.06


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, photographs):
    """A checkpoint of tiny-cpu (shrunk) after 4 in-process steps on the photographs."""
    root = tmp_path_factory.mktemp("short-run")
    config = load_config("tiny-cpu", [*TINY_OVERRIDES, "train.steps=4",
                                      f"run.output_dir={root}", "run.name=short"])
    batches = random_view_batches(photographs, config.model.image_size,
                                  config.train.global_batch_size, seed=0)
    model = train_in_process(config, batches, root / "short", log=lambda line: None)
    directory = root / "short" / "checkpoint_000000004"
    directory.mkdir()
    save_checkpoint(directory, model, build_optimizer(model, config),
                    {"step": 4, "config": config.model_dump(mode="json")})
    return directory, model, config


def test_export_loads_in_timm_with_the_checkpoints_outputs(checkpoint, tmp_path):
    directory, trained, config = checkpoint
    weights = export(str(directory), tmp_path / "encoder")
    tensors = load_file(weights)
    assert set(tensors) == set(trained.encoder.state_dict())  # no projector, decoder, weights
    assert not any(k.startswith(("projector", "decoder", "weighting")) for k in tensors)
    timm_model = load_exported(tmp_path / "encoder").eval()
    images = torch.randn(3, 3, config.model.image_size, config.model.image_size)
    with torch.no_grad():
        expected = load_model(str(directory))[0].encode(images)
        assert torch.allclose(timm_model(images), expected, atol=1e-5)
        assert torch.allclose(trained.eval().encode(images), expected, atol=1e-5)
    # timm loads strictly: a key the architecture lacks is refused, not ignored.
    save_file({**tensors, "projector.extra": torch.zeros(1)}, str(weights))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_exported(tmp_path / "encoder")


PACKAGED = sorted(path.stem for path in (ROOT / "ssl_train" / "configs").glob("*.yaml"))


def docs_recipe(folder: Path) -> dict:
    """Runs the loading recipe of docs/evaluation.md as written, on ``folder``."""
    text = (ROOT / "docs" / "evaluation.md").read_text()
    section = text[text.index("## `ssl-pretrain export"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n\n")]
    namespace: dict = {}
    exec(code.replace('"OUT/', f'"{folder}/'), namespace)
    return namespace


@pytest.mark.parametrize("name", PACKAGED)
def test_the_export_names_timms_architecture_of_each_packaged_config(name):
    """The name is timm's model of the same width and heads; model_args build exactly the
    encoder's parameters (shapes compared on the meta device: ViT-L costs no memory)."""
    import timm

    from ssl_train.eval.export import shape_note, timm_architecture
    from ssl_train.models.encoder import build_encoder

    model = load_config(name).model
    architecture, model_args = timm_architecture(model)
    with torch.device("meta"):
        family = timm.create_model(architecture, pretrained=False, num_classes=0)
        recipe = timm.create_model(architecture, pretrained=False, **model_args)
        ours = build_encoder(model)
    assert (family.embed_dim, family.blocks[0].attn.num_heads) == (
        model.encoder.embed_dim, model.encoder.num_heads), architecture
    assert {k: v.shape for k, v in recipe.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()}
    same = (len(family.blocks), family.patch_embed.patch_size[0]) == (
        model.encoder.depth, model.encoder.patch_size) and model.image_size == 224
    assert shape_note(architecture, model_args).endswith(
        "as timm defines it" if same else "model_args define the encoder")


def test_the_docs_recipe_loads_the_packaged_tiny_export(tmp_path):
    """tiny-cpu as packaged (192 wide, 3 heads: timm's vit_tiny, patch 8, 6 deep), exported and
    loaded with the documented recipe, gives the checkpoint's outputs."""
    from ssl_train.models.ssl_model import SSLModel

    config = load_config("tiny-cpu")
    torch.manual_seed(0)
    model = SSLModel(config)
    directory = tmp_path / "checkpoint_000000000"
    directory.mkdir()
    save_checkpoint(directory, model, build_optimizer(model, config),
                    {"step": 0, "config": config.model_dump(mode="json")})
    export(str(directory), tmp_path / "OUT")
    meta = json.loads((tmp_path / "OUT" / "config.json").read_text())
    assert meta["architecture"] == "vit_tiny_patch16_224"
    assert "patch_size 8 (not 16)" in meta["shape"] and "depth 6 (not 12)" in meta["shape"]
    encoder = docs_recipe(tmp_path / "OUT")["encoder"].eval()
    images = torch.randn(2, 3, config.model.image_size, config.model.image_size)
    with torch.no_grad():
        assert torch.allclose(encoder(images), model.eval().encode(images), atol=1e-5)


def test_dinos_export_and_eval_take_its_teacher(tmp_path, photographs):
    config = load_config("tiny-cpu", [*TINY_OVERRIDES, "objectives=[dino, mae]", "train.steps=3",
                                      "objectives.dino.head.out_dim=64",
                                      "objectives.dino.local_crops=1", "run.name=dino"])
    batches = random_view_batches(photographs, config.model.image_size,
                                  config.train.global_batch_size, seed=0, views=config.views())
    model = train_in_process(config, batches, tmp_path / "dino", log=lambda line: None)
    directory = tmp_path / "dino" / "checkpoint_000000003"
    directory.mkdir()
    save_checkpoint(directory, model, build_optimizer(model, config),
                    {"step": 3, "config": config.model_dump(mode="json")})
    tensors = load_file(export(str(directory), tmp_path / "encoder"))
    teacher = model.objectives["dino"].teacher["encoder"].state_dict()
    student = model.encoder.state_dict()
    assert set(tensors) == set(teacher)
    key = "blocks.0.attn.qkv.weight"  # moved by three EMA updates, not all the way
    assert torch.equal(tensors[key], teacher[key]) and not torch.equal(tensors[key], student[key])
    timm_model = load_exported(tmp_path / "encoder").eval()
    images = torch.randn(2, 3, config.model.image_size, config.model.image_size)
    with torch.no_grad():
        assert torch.allclose(timm_model(images), model.eval().encode(images), atol=1e-5)


def _class_folder(root: Path, classes: int = 3, per_class: int = 12) -> Path:
    images, labels = digits_images(32)
    for label in range(classes):
        (root / f"digit-{label}").mkdir(parents=True)
        for index in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[index]).save(root / f"digit-{label}" / f"{index}.png")
    (root / "digit-0" / "notes.txt").write_text("not an image")
    (root / "digit-1" / "broken.png").write_bytes(b"\x89PNG truncated")
    return root


def test_labelled_data_from_class_folders_and_labelled_shards(tmp_path):
    images, labels, names = labelled_images(str(_class_folder(tmp_path / "folders")), 32)
    assert names == ["digit-0", "digit-1", "digit-2"]
    assert images.shape == (36, 32, 32, 3) and np.bincount(labels).tolist() == [12, 12, 12]
    digits, digit_labels = digits_images(40)
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "part-0.tar", "w") as archive:
        for index in range(30):
            for ext, payload in (("png", _png(digits[index])),
                                 ("cls", str(digit_labels[index]).encode())):
                member = tarfile.TarInfo(f"{index:05d}.{ext}")
                member.size = len(payload)
                archive.addfile(member, io.BytesIO(payload))
    images, labels, names = labelled_images(str(tmp_path / "shards"), 32)
    assert images.shape == (30, 32, 32, 3) and labels.tolist() == digit_labels[:30].tolist()
    assert names == [str(d) for d in sorted(set(digit_labels[:30]))]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _ssl_pretrain(*args: str) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).parent / "ssl-pretrain"
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=600)


def test_eval_cli_on_a_short_runs_checkpoint_writes_every_read_out(checkpoint, tmp_path):
    directory, _, _ = checkpoint
    out = tmp_path / "result.json"
    result = _ssl_pretrain("eval", str(directory), "--data", "digits", "--shots", "1,5",
                           "--seeds", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "linear probe" in result.stdout and "5-shot" in result.stdout
    report = json.loads(out.read_text())
    assert report["step"] == 4 and report["num_classes"] == 10
    assert report["num_train"] + report["num_test"] == 1797
    for top1 in (report["knn"]["top1"], report["linear_probe"]["top1"]):
        assert report["chance"] < top1 <= 1.0  # even a barely trained ViT beats chance on digits
    assert set(report["few_shot"]) == {"1", "5"}
    assert all(len(v["runs"]) == 2 for v in report["few_shot"].values())


def test_eval_names_unusable_data_with_exit_2(checkpoint, tmp_path):
    directory, _, _ = checkpoint
    (tmp_path / "one-class" / "cats").mkdir(parents=True)
    Image.new("RGB", (40, 40), "red").save(tmp_path / "one-class" / "cats" / "a.png")
    for data, message in ((tmp_path / "missing", "does not exist"),
                          (tmp_path / "one-class", "has 1 labelled class(es)")):
        result = _ssl_pretrain("eval", str(directory), "--data", str(data))
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_eval_and_export_on_a_run_directory_take_its_latest_complete_checkpoint(checkpoint,
                                                                                 tmp_path):
    directory, model, _ = checkpoint
    run_dir = directory.parent
    # A newer checkpoint that was never finished (a run killed while writing it): passed over.
    unfinished = run_dir / "checkpoint_000000008"
    unfinished.mkdir(exist_ok=True)
    (unfinished / "__0_0.distcp").write_bytes(b"partial")

    result = _ssl_pretrain("eval", str(run_dir), "--data", "digits", "--shots", "1",
                           "--seeds", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"using {directory}, the latest complete checkpoint of {run_dir}" in result.stdout
    written = run_dir / "eval_result_checkpoint_000000004.json"  # in the run directory
    assert json.loads(written.read_text())["step"] == 4

    out = tmp_path / "export"
    result = _ssl_pretrain("export", str(run_dir), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["source"] == {**config["source"], "checkpoint": str(directory), "step": 4}

    missing = tmp_path / "no-such-run"
    result = _ssl_pretrain("export", str(missing), str(out))
    assert result.returncode == 2
    assert f"{missing} does not exist" in result.stderr and "bucket" not in result.stderr
    empty = tmp_path / "empty-run"
    empty.mkdir()
    result = _ssl_pretrain("eval", str(empty))
    assert result.returncode == 2 and "holds no complete checkpoint" in result.stderr
