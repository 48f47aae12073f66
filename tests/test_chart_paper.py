"""The chart with `paper.enabled`: `nexlify paper` as a one-replica StatefulSet with its headless Service,
rendered by the real helm binary and validated strictly (kubernetes-validate) for every supported minor;
the args the container gets are parsed by the real CLI parser."""

from __future__ import annotations

import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from controller.cli import build_parser
from tests.test_chart import CHART, FULL_VALUES, KUBE_MINORS, ROOT, _template_cmd, by_kind, one, run

PAPER = {"paper": {"enabled": True}}
PINNED = {**FULL_VALUES, "paper": {"enabled": True, "model": "nexlify/prod/runs/init-0/model_return3.2.pt",
                                   "initialEquity": 5000, "metricsPort": 9200,
                                   "podAnnotations": {"prometheus.io/scrape": "true"}}}


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    """render(values=None, kube_version=None) -> the documents `helm template` renders (test_chart's helm)."""
    subprocess.run([sys.executable, str(ROOT / "tools" / "get-helm.py")], check=True, capture_output=True)
    tools_bin = ROOT / ".tools" / "bin"
    folder = tmp_path_factory.mktemp("values")
    counter = iter(range(10**6))

    def _render(values: dict | None = None, kube_version: str | None = None) -> list[dict]:
        out = run(_template_cmd(tools_bin, folder, next(counter), values, kube_version))
        assert out.returncode == 0, out.stderr
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]

    _render.tools_bin = tools_bin
    return _render


@pytest.mark.parametrize("minor", [KUBE_MINORS[0], KUBE_MINORS[-1]])
def test_paper_renders_and_validates_strictly(render, minor: str) -> None:
    for values in (PAPER, PINNED):
        docs = render(values, kube_version=f"{minor}.0")
        for doc in docs:
            assert kubernetes_validate.validate(doc, f"{minor}.0", strict=True) == minor
        assert len(by_kind(docs, "StatefulSet")) == 1 and len(by_kind(docs, "Service")) == 1


def test_paper_is_off_by_default(render) -> None:
    assert by_kind(render(None), "StatefulSet") == [] and by_kind(render(None), "Service") == []


def _container(docs: list[dict]) -> tuple[dict, dict]:
    sts = one(docs, "StatefulSet")
    return sts, sts["spec"]["template"]["spec"]["containers"][0]


def test_one_replica_latest_model_probes_and_metrics_port(render) -> None:
    docs = render(PAPER)
    sts, container = _container(docs)
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["serviceName"] == one(docs, "Service")["metadata"]["name"]
    args = build_parser().parse_args(container["args"])
    assert args.model == "s3://nexlify-training/nexlify"  # latest: the pipeline's output, its summary's model
    assert args.output == "s3://nexlify-training/nexlify/paper" and args.session_per_model
    assert args.metrics_port == 9108 and args.initial_equity is None
    assert container["ports"] == [{"name": "metrics", "containerPort": 9108, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    service = one(docs, "Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == 9108
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    pod = sts["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "NEXLIFY_LOG_FORMAT", "value": "json"} in container["env"]
    owner = next(e for e in container["env"] if e["name"] == "NEXLIFY_OWNER_JOB")  # the lease's holder: the pod
    assert owner["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_pinned_model_and_settings_reach_the_args(render) -> None:
    sts, container = _container(render(PINNED))
    args = build_parser().parse_args(container["args"])
    assert args.model == "s3://ml-models/nexlify/prod/runs/init-0/model_return3.2.pt"
    assert args.output == "s3://ml-models/nexlify/prod/paper"
    assert args.initial_equity == 5000 and args.metrics_port == 9200
    assert sts["spec"]["template"]["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    assert sts["spec"]["template"]["spec"]["serviceAccountName"].endswith("-worker")


@pytest.mark.parametrize("paper", [{"enabled": "yes"}, {"replicas": 2}, {"metricsPort": 0}, {"model": ""}])
def test_schema_refuses_bad_paper_values(render, tmp_path, paper: dict) -> None:
    out = run(_template_cmd(render.tools_bin, tmp_path, 0, {"paper": paper}, None))
    assert out.returncode != 0 and "paper" in out.stderr


def test_values_yaml_documents_the_paper_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["paper"]) == {"enabled", "model", "prefix", "initialEquity", "metricsPort", "graceSeconds",
                                    "pollSeconds", "resources", "podAnnotations", "podLabels", "nodeSelector",
                                    "tolerations", "affinity", "extraEnv"}


K8S = ROOT / "k8s"


def test_plain_manifests_are_the_charts_and_build_with_kustomize(render) -> None:
    chart = [d for d in render({"paper": {"enabled": True}})
             if d["metadata"]["labels"].get("app.kubernetes.io/component") == "paper"]
    files = [yaml.safe_load((K8S / "paper" / f"{d['kind'].lower()}.yaml").read_text()) for d in chart]
    assert files == chart, "k8s/paper drifted from the chart: run python tools/render-k8s-paper.py"
    out = run([str(render.tools_bin / "kubectl"), "kustomize", str(K8S / "paper")])
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, f"{KUBE_MINORS[-1]}.0", strict=True)
    sts = one(docs, "StatefulSet")
    account = sts["spec"]["template"]["spec"]["serviceAccountName"]
    assert account in {sa["metadata"]["name"] for sa in by_kind(docs, "ServiceAccount")}  # the base's worker account
    assert len(by_kind(docs, "Job")) == 1  # beside the pipeline


def test_argocd_paper_application_renders(render) -> None:
    app = yaml.safe_load((K8S / "gitops" / "argocd" / "paper-application.yaml").read_text())
    assert (ROOT / app["spec"]["source"]["path"] / "Chart.yaml").is_file()
    values = app["spec"]["source"]["helm"]["valuesObject"]
    docs = render(values)
    for doc in docs:
        kubernetes_validate.validate(doc, f"{KUBE_MINORS[-1]}.0", strict=True)
    _, container = _container(docs)
    args = build_parser().parse_args(container["args"])
    assert args.model == "s3://nexlify-training/pipelines/2025-06-01"
    assert str(args.metrics_port) == values["paper"]["podAnnotations"]["prometheus.io/port"]
