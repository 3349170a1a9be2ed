"""The shipped Kubernetes manifests and container image: rendered from one source, valid against
KubeRay's CRDs and the Kubernetes API models, runnable by the real CLI, free of credentials."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from ssl_train.cli import build_parser
from ssl_train.config import validate_config
from ssl_train.deploy.k8s import CONFIG_PATH, SLICE_DIR, render

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "k8s"
# The command that rendered the shipped manifests (also in each file's header).
RENDER_ARGS = ["k8s", "render", "--config", "vit-b16",
               "--image", "registry.example.com/ssl-pretrain:0.1.0",
               "--set", "run.output_dir=s3://ssl-pretrain/runs",
               "--set", "data.source.url=s3://ssl-pretrain/shards",
               "--params", "k8s/params.yaml", "--out", "k8s"]
MANIFESTS = ["config.yaml", "rayjob.yaml", "raycluster.yaml", "schedule.yaml", "raycronjob.yaml",
             "monitoring.yaml"]


def _ssl_pretrain(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).parent / "ssl-pretrain"
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def documents() -> list[dict]:
    """Every object of every shipped manifest, the slice RayJob inside its ConfigMap included."""
    found = []
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            found.append(doc)
            if doc["kind"] == "ConfigMap" and "rayjob.yaml" in doc.get("data", {}):
                found.extend(yaml.safe_load_all(doc["data"]["rayjob.yaml"]))
    return found


def of_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


def test_shipped_manifests_are_the_renderers_output(tmp_path):
    args = [*RENDER_ARGS[:-1], str(tmp_path)]
    result = _ssl_pretrain(*args)
    assert result.returncode == 0, result.stderr
    for name in MANIFESTS:
        assert (tmp_path / name).read_text() == (K8S / name).read_text(), (
            f"k8s/{name} is stale: run ssl-pretrain {shlex.join(RENDER_ARGS)}")


def _anchors_and_aliases(text: str) -> list[str]:
    found = []
    for event in yaml.parse(text):
        if isinstance(event, yaml.AliasEvent):
            found.append(f"*{event.anchor}")
        elif getattr(event, "anchor", None):
            found.append(f"&{event.anchor}")
    return found


def test_no_manifest_holds_anchors_or_aliases():
    """People read and diff the manifests, and some GitOps linters refuse aliases: every object
    is written out in full, in the files and in the RayJob template the schedule embeds."""
    texts = {name: (K8S / name).read_text() for name in MANIFESTS}
    for name, text in list(texts.items()):
        for doc in yaml.safe_load_all(text):
            for key, value in (doc.get("data") or {}).items():
                if key.endswith((".yaml", ".yml")):
                    texts[f"{name}: {doc['metadata']['name']}/{key}"] = value
    assert any(key.startswith("schedule.yaml: ") for key in texts), "the embedded template"
    for name, text in texts.items():
        assert _anchors_and_aliases(text) == [], name


def test_every_manifest_parses_into_named_objects():
    kinds = [d["kind"] for d in documents()]
    for expected in ("ConfigMap", "RayJob", "RayCluster", "RayCronJob", "CronJob",
                     "ServiceAccount", "Role", "RoleBinding", "PodMonitor", "PrometheusRule"):
        assert expected in kinds
    for doc in documents():
        assert doc["apiVersion"] and doc["metadata"].get("namespace") == "ssl-pretrain"
        assert doc["metadata"].get("name") or doc["metadata"].get("generateName")


def _schemas_dir() -> Path:
    candidates = [os.environ.get("SSL_K8S_SCHEMAS"), ROOT.parent / "shared" / "k8s-schemas"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    pytest.skip("KubeRay v1.7.0's CRDs are needed to validate the manifests: put "
                "ray.io_rayjobs.yaml, ray.io_rayclusters.yaml and ray.io_raycronjobs.yaml from "
                "the release (github.com/ray-project/kuberay, tag v1.7.0, "
                "ray-operator/config/crd/bases/) in ../shared/k8s-schemas, or name their folder "
                "in SSL_K8S_SCHEMAS")


def _crd_schema(kind: str) -> dict:
    plural = {"RayJob": "rayjobs", "RayCluster": "rayclusters", "RayCronJob": "raycronjobs"}[kind]
    crd = yaml.safe_load((_schemas_dir() / f"ray.io_{plural}.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the structural schema does not define (the API server would silently drop them)."""
    problems = []
    if isinstance(value, dict) and "properties" in schema:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        for key, item in value.items():
            if key not in schema["properties"]:
                problems.append(f"{path}.{key}")
            else:
                problems += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            problems += unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return problems


def test_the_crd_check_finds_misspelled_and_mistyped_fields():
    import copy

    import jsonschema

    schema = _crd_schema("RayJob")
    job = copy.deepcopy(of_kind("RayJob")[0])
    job["spec"]["shutdownAfterJobFinish"] = True
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "volumeMount"] = []
    assert unknown_fields(job, schema) == [
        ".spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].volumeMount",
        ".spec.shutdownAfterJobFinish"]
    job["spec"]["backoffLimit"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        jsonschema.validate(job, schema)


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster", "RayCronJob"])
def test_kuberay_objects_validate_against_the_v1_7_crds(kind):
    import jsonschema

    schema = _crd_schema(kind)
    objects = of_kind(kind)
    assert objects
    for obj in objects:
        jsonschema.validate(obj, schema)
        assert unknown_fields(obj, schema) == [], obj["metadata"]


def _deserialize(obj: dict, model: str):
    """The kubernetes client's model of ``obj``; raises on missing or mistyped fields."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    parsed = api.deserialize(json.dumps(obj), model, "application/json")
    # Keys the model does not know are dropped: a round trip must give the object back.
    assert api.sanitize_for_serialization(parsed) == obj, model
    return parsed


@pytest.mark.parametrize("kind,model", [
    ("ConfigMap", "V1ConfigMap"), ("CronJob", "V1CronJob"), ("ServiceAccount", "V1ServiceAccount"),
    ("Role", "V1Role"), ("RoleBinding", "V1RoleBinding")])
def test_core_objects_validate_against_the_kubernetes_models(kind, model):
    for obj in of_kind(kind):
        _deserialize(obj, model)


def test_pod_templates_inside_the_ray_objects_are_valid_pods():
    for job in of_kind("RayJob"):
        spec = job["spec"]["rayClusterSpec"]
        templates = [spec["headGroupSpec"]["template"],
                     *(g["template"] for g in spec["workerGroupSpecs"]),
                     job["spec"]["submitterPodTemplate"]]
        for template in templates:
            _deserialize(template, "V1PodTemplateSpec")


def test_entrypoints_are_commands_the_cli_accepts_on_the_mounted_config():
    parser = build_parser()
    config_map = next(d for d in of_kind("ConfigMap") if "config.yaml" in d["data"])
    config = validate_config(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert config.data.source.url.startswith("s3://")
    entrypoints = ([j["spec"]["entrypoint"] for j in of_kind("RayJob")]
                   + [c["spec"]["jobTemplate"]["entrypoint"] for c in of_kind("RayCronJob")])
    assert len(entrypoints) == 3
    for entrypoint in entrypoints:
        argv = shlex.split(entrypoint)
        assert argv[0] == "ssl-pretrain"
        args = parser.parse_args(argv[1:])
        assert args.command == "train" and args.address == "auto" and args.config == CONFIG_PATH
    # The config is mounted where the entrypoint reads it, on the head (where the driver runs).
    head = of_kind("RayJob")[0]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert mounts["config"] == str(Path(CONFIG_PATH).parent)
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    # Slices continue the same run: same config (run name, storage path), a number of steps.
    slices = [shlex.split(e) for e in entrypoints if "--slice-steps" in e]
    assert len(slices) == 2 and all(int(s[s.index("--slice-steps") + 1]) > 0 for s in slices)


def test_the_schedule_forbids_overlap_and_reports_energy_after_each_slice():
    (cron,) = of_kind("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["command"][-1]
    assert f"kubectl create -f {SLICE_DIR}/rayjob.yaml" in script
    report = re.search(r"ssl-pretrain energy-report (\S+)", script)
    assert report and shlex.split(report.group(1))[0] == "s3://ssl-pretrain/runs/vit-b16"
    assert build_parser().parse_args(["energy-report", "s3://ssl-pretrain/runs/vit-b16"])
    (role,) = [r for r in of_kind("Role") if r["metadata"]["name"] == pod["serviceAccountName"]]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list", "watch"]}]


CREDENTIAL_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",  # AWS access key ids
    r"(?i)(secret_access_key|secretaccesskey|password|token)\s*[:=]\s*\S+",
    r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",  # AWS secret access keys
]


def test_no_manifest_or_image_file_contains_a_credential():
    for path in [*(K8S / n for n in MANIFESTS), K8S / "params.yaml",
                 ROOT / "infra" / "docker" / "Dockerfile"]:
        text = path.read_text()
        for pattern in CREDENTIAL_PATTERNS:
            assert not re.search(pattern, text), (path, pattern)
    for doc in documents():
        for container in _containers(doc):
            for variable in container.get("env", []):
                assert "value" not in variable or not re.search(
                    "KEY|SECRET|TOKEN|PASSWORD", variable["name"]), variable
            for source in container.get("envFrom", []):
                assert set(source) == {"secretRef"}


def _containers(value):
    if isinstance(value, dict):
        if "containers" in value and isinstance(value["containers"], list):
            yield from value["containers"]
        for item in value.values():
            yield from _containers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _containers(item)


def test_every_container_runs_as_a_non_root_user():
    containers = [c for d in documents() for c in _containers(d)]
    assert len(containers) >= 10
    for container in containers:
        assert container["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_the_image_installs_the_pinned_torch():
    pins = dict(re.findall(r'"(torch|torchvision)==([^"]+)"',
                           (ROOT / "pyproject.toml").read_text()))
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    installs = re.findall(r"pip install (torch==[\w.+]+) (torchvision==[\w.+]+)", dockerfile)
    assert len(installs) == 2  # the CUDA and the CPU variant
    for install in installs:
        assert install == (f"torch=={pins['torch']}", f"torchvision=={pins['torchvision']}")


def test_podmonitors_store_ray_series_under_their_own_names():
    monitors = of_kind("PodMonitor")
    assert {m["spec"]["selector"]["matchLabels"]["ray.io/node-type"] for m in monitors} == {
        "head", "worker"}
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "metrics"
        (rule,) = endpoint["metricRelabelings"]
        # Prometheus anchors the regex and expands $1 (Go syntax) in the replacement.
        match = re.fullmatch(rule["regex"], "ray_ssl_energy_joules_total")
        assert match and rule["replacement"].replace("$1", match.group(1)) == (
            "ssl_energy_joules_total")
        assert re.fullmatch(rule["regex"], "ray_object_store_memory") is None


def test_the_prometheus_rule_is_accepted_by_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("Debian's promtool is not installed (apt-get install prometheus)")
    (rule,) = of_kind("PrometheusRule")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overrides,message", [
    (["--set", "train.num_workers=4", "--set", "train.global_batch_size=2048"],
     "train.num_workers (4) must equal the GPUs of the train group"),
    (["--set", "data.source.url="], "data.source.url is empty"),
    (["--set", "run.output_dir=runs"], "must be object storage"),
])
def test_render_refuses_a_config_that_does_not_fit_the_cluster(tmp_path, overrides, message):
    args = [*RENDER_ARGS[:-1], str(tmp_path / "out")]
    result = _ssl_pretrain(*args, *overrides)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_render_names_a_bad_params_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train: {gpus: -1}\nnamespce: x\n")
    result = _ssl_pretrain("k8s", "render", "--config", "vit-b16", "--image", "img:1",
                           "--set", "run.output_dir=s3://b/runs", "--set",
                           "data.source.url=s3://b/shards", "--params", str(params),
                           "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "train.gpus" in result.stderr and "unknown key namespce" in result.stderr


def test_kueue_queue_suspends_the_job_and_labels_it():
    from ssl_train.config import load_config
    from ssl_train.deploy.k8s import K8sConfig

    config = load_config("vit-b16", ["run.output_dir=s3://b/runs", "data.source.url=s3://b/s"])
    files = render(config, "img:1", K8sConfig(kueue_queue="research"))
    (job,) = yaml.safe_load_all(files["rayjob.yaml"])
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"


def test_the_renderer_reads_its_prometheus_rules_from_an_installed_package(tmp_path):
    """The container image installs the packages (no infra/ folder): the renderer's alert and
    relabel rules must come with them, and be the files infra/prometheus/ ships."""
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info beside it
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for package in ("ssl_train", "pipelines"):
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name in ("prometheus.yml", "alerts.yml"):
            packaged = archive.read(f"ssl_train/deploy/assets/{name}")
            assert packaged == (ROOT / "infra" / "prometheus" / name).read_bytes()
