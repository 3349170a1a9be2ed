"""Configs: packaged ones load, overrides apply, bad ones stop with exit code 2 naming the key."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from ssl_train.cli import main
from ssl_train.config import (
    ConfigError,
    load_config,
    packaged_config_names,
    validate_config,
)


def test_packaged_configs_are_selectable_by_name():
    assert {"tiny-cpu", "vit-s16", "vit-b16", "vit-l16"} <= set(packaged_config_names())
    for name in packaged_config_names():
        assert load_config(name).run.name == name


def test_config_is_selectable_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {image_size: 32, encoder: {patch_size: 8}}\nenergy: {region: FRA}\n")
    config = load_config(str(path))
    assert config.model.image_size == 32 and config.model.num_patches == 16
    assert config.energy.grid()["year"] >= 2020


def test_overrides_set_any_field_with_yaml_typed_values():
    config = load_config(
        "tiny-cpu",
        ["objectives.mae.mask_ratio=0.6", "objectives.mae.norm_pix_loss=false",
         "model.encoder.depth=3", "run.name=ablation-1", "weighting=fixed",
         "objectives.simclr.weight=0.5"],
    )
    assert config.objective("mae").mask_ratio == 0.6
    assert config.objective("mae").norm_pix_loss is False
    assert config.objective("mae").decoder.depth == 2  # the file's other fields stay
    assert config.model.encoder.depth == 3
    assert config.run.name == "ablation-1"
    assert config.weighting == "fixed" and config.objective("simclr").weight == 0.5


def test_objectives_are_a_list_of_names_or_mappings(tmp_path):
    # A bare name in a file takes the objective's defaults; a mapping sets its fields.
    path = tmp_path / "mine.yaml"
    path.write_text("objectives: [simclr, {name: mae, mask_ratio: 0.6}]\n"
                    "energy: {region: world}\n")
    config = load_config(str(path))
    assert config.objective_names == ["simclr", "mae"]
    assert config.objective("simclr").temperature == 0.2
    assert config.objective("mae").mask_ratio == 0.6
    # --set objectives=[mae] keeps what the config set for mae and drops the rest...
    masked = load_config("tiny-cpu", ["objectives=[mae]"])
    assert masked.objective_names == ["mae"]
    assert masked.objective("mae") == load_config("tiny-cpu").objective("mae")
    # ...so the data stage cuts only MAE's view.
    assert [view.name for view in masked.views()] == ["view_mae"]
    assert [v.name for v in load_config("tiny-cpu").views()] == ["view_a", "view_b", "view_mae"]
    # The resolved config (what checkpoints and workers get) loads back to the same objectives.
    assert validate_config(masked.model_dump(mode="json")) == masked


def test_print_config_prints_the_resolved_config_that_loads_back(capsys, tmp_path):
    assert main(["train", "--config", "tiny-cpu", "--set", "train.steps=7", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["train"]["steps"] == 7
    (tmp_path / "resolved.yaml").write_text(printed)
    assert load_config(str(tmp_path / "resolved.yaml")) == load_config("tiny-cpu", ["train.steps=7"])


BAD_OVERRIDES = [
    ("objectives.mae.mask_ratio=1.0", "objectives.mae.mask_ratio"),
    ("objectives.mae.mask_ratio=0", "objectives.mae.mask_ratio"),
    ("objectives.mae.mask_ratio=-0.2", "objectives.mae.mask_ratio"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("objectives.simclr.temperature=0", "objectives.simclr.temperature"),
    ("objectives.simclr.temperature=-1", "objectives.simclr.temperature"),
    ("train.steps=ten", "train.steps"),
    ("model.image_size=70", "model.image_size"),
    ("objectives.mae.mask_ratoi=0.5", "objectives.mae.mask_ratoi"),
    ("model.encoder.num_heads=5", "model.encoder"),
    ("objectives=[simclr, dino2]", "dino2"),
    ("objectives=[]", "objectives"),
    ("objectives=[mae, mae]", "objectives.mae is listed twice"),
    ("objectives.byol.weight=2", "no objective byol"),
    ("weighting=adaptive", "weighting"),
    ("optim.accumulation_steps=0", "optim.accumulation_steps"),
    ("optim.accumulation_steps=3", "optim.accumulation_steps"),
    ("objectives.mae.decoder.depth=12", "objectives.mae.decoder.depth"),
    ("run.name=../escape", "run.name"),
    ("train.global_batch_size=1", "train.global_batch_size"),
    ("model.encoder=3", "model.encoder"),
]


@pytest.mark.parametrize("override,key", BAD_OVERRIDES)
def test_bad_values_exit_2_naming_the_key(override, key, capsys):
    assert main(["train", "--config", "tiny-cpu", "--set", override, "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert key in captured.err and "error" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_bad_config_file_exits_2_from_the_installed_command(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objectives: [{name: simclr, temperature: 0}]\nmodel:\n  batch: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "ssl_train.cli", "train", "--config", str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "objectives.simclr.temperature" in result.stderr
    assert "unknown key model.batch" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text,fragment", [
    ("model: [1, 2]\n", "model"),
    ("objectives: {name: mae}\n", "objectives must be a non-empty list"),
    ("- a\n- b\n", "mapping"),
    ("model: {image_size: 64\n", "not valid YAML"),
])
def test_malformed_files_are_config_errors(tmp_path, text, fragment):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(str(path))


def test_missing_config_and_bad_override_syntax_are_named():
    with pytest.raises(ConfigError, match="no config named 'tiny-gpu'"):
        load_config("tiny-gpu")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nowhere/config.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config("tiny-cpu", ["objectives.mae.mask_ratio"])
    with pytest.raises(ConfigError, match="model.image_size is a value"):
        load_config("tiny-cpu", ["model.image_size.x=1"])


def test_validate_config_rejects_non_mappings():
    with pytest.raises(ConfigError, match="mapping"):
        validate_config([1, 2])


def test_every_config_field_has_a_description_that_explain_prints():
    from pydantic import BaseModel

    from ssl_train.config import PretrainConfig, explain_fields
    from ssl_train.objectives import objective_class, objective_names

    def undescribed(model: type[BaseModel], prefix: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{prefix}{name}")
            for kind in (field.annotation, *typing.get_args(field.annotation)):
                if isinstance(kind, type) and issubclass(kind, BaseModel) and kind.__name__ != \
                        "ObjectiveConfig":
                    missing += undescribed(kind, f"{prefix}{name}.")
        return missing

    missing = undescribed(PretrainConfig, "")
    for name in objective_names():
        config_class = objective_class(name).config_class
        if config_class.__module__.startswith("ssl_train."):  # not a test's own plug-in
            missing += undescribed(config_class, f"objectives.{name}.")
    assert not missing, missing
    lines = explain_fields()
    keys = [line.split(":")[0] for line in lines if not line.startswith(" ")]
    assert "objectives.dino.teacher_temperature" in keys and "data.view_workers" in keys
    assert all(line.startswith("    ") and line.strip() for line in lines[1::2])
    assert "(no description)" not in "\n".join(
        line for key, line in zip(keys, lines[1::2]) if not key.startswith("objectives.rotation"))


def test_config_explain_prints_a_fields_type_default_and_description():
    executable = Path(sys.executable).parent / "ssl-pretrain"
    result = subprocess.run([str(executable), "config", "explain", "objectives.mae.crop"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # The masked branch's own crop default, not the generic one.
    assert "objectives.mae.crop.scale: (float, float), default [0.2, 1.0]" in result.stdout
    assert "objectives.mae.crop.flip_p: float (>= 0, <= 1), default 0.5" in result.stdout
    result = subprocess.run([str(executable), "config", "explain", "train.stepz"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no config field train.stepz" in result.stderr and "Traceback" not in result.stderr
