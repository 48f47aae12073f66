"""Every default written once. Each default has one home (a config dataclass, the quick-test preset,
controller.config.RUN_AS_ID); where a copy has to exist outside it (argparse flags, the Dockerfile, the
chart's values.yaml, the k8s overlays) a table below names the copy and its home, and a test fails when
the two part. Generated copies (the chart's `pipeline:` block, the cpu-dev overlay's preset) are checked
by `tools/sync-chart-schema.py --check` here and in tests/test_chart.py.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from controller.cli import build_parser, resolve_pipeline_config
from controller.config import RUN_AS_ID, KubernetesConfig, PipelineConfig, quick_test_preset
from nexlify.config import ArbitrageConfig, DataConfig, EnvConfig, TrainConfig
from nexlify.configtools import get_path, leaf_index

ROOT = Path(__file__).resolve().parent.parent
VALUES = ROOT / "helm" / "nexlify-train" / "values.yaml"
K8S = ROOT / "k8s"
SYNC = [sys.executable, str(ROOT / "tools" / "sync-chart-schema.py"), "--check"]


def default(cls: type, name: str):
    """A setting's default as its dataclass declares it (a fresh instance: lists and dicts included)."""
    return getattr(cls(), name)


def dig(mapping: dict, dotted: str):
    for part in dotted.split("."):
        mapping = mapping[part]
    return mapping


# ---- command-line flags -------------------------------------------------------------------------------

# (command line up to the flags, flag's dest, home dataclass, home field)
FLAG_DEFAULTS = [
    (["data", "fetch", "--since", "2024-01-01"], "exchange", DataConfig, "exchange"),
    (["data", "fetch", "--since", "2024-01-01"], "pairs", DataConfig, "pairs"),
    (["data", "fetch", "--since", "2024-01-01"], "timeframe", DataConfig, "timeframe"),
    (["data", "fetch", "--since", "2024-01-01"], "second_quote", ArbitrageConfig, "second_quote"),
    (["data", "info"], "exchange", DataConfig, "exchange"),
    (["data", "info"], "pairs", DataConfig, "pairs"),
    (["bench", "env"], "pairs", DataConfig, "pairs"),
    (["bench", "env"], "threads", TrainConfig, "threads"),
    (["bench", "env"], "kernel", EnvConfig, "kernel"),
    (["bench", "env"], "precision", EnvConfig, "precision"),
    (["bench", "train"], "pairs", DataConfig, "pairs"),
    (["bench", "train"], "threads", TrainConfig, "threads"),
    (["bench", "train"], "kernel", EnvConfig, "kernel"),
    (["worker", "train", "--episodes", "1", "--out", "x"], "seed", PipelineConfig, "seed"),
    (["worker", "train", "--episodes", "1", "--out", "x"], "checkpoint_every", PipelineConfig, "checkpoint_every"),
]


@pytest.mark.parametrize("argv,dest,cls,name", FLAG_DEFAULTS,
                         ids=[f"{' '.join(a[:2])} {d}" for a, d, _, _ in FLAG_DEFAULTS])
def test_flag_defaults_are_the_config_defaults(argv: list[str], dest: str, cls: type, name: str) -> None:
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == default(cls, name), f"--{dest.replace('_', '-')} of `{' '.join(argv[:2])}`"


def test_a_parsed_list_default_is_a_copy() -> None:
    """Appending to a parsed --pairs must not change the next parse or the dataclass default."""
    first = build_parser().parse_args(["bench", "env"])
    first.pairs.append("XRP/USDT")
    assert build_parser().parse_args(["bench", "env"]).pairs == DataConfig().pairs == ["BTC/USDT", "ETH/USDT",
                                                                                       "SOL/USDT"]


def _subparser(parser, path: list[str]):
    for name in path:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[name]
    return parser


# (sub-command, flag's dest, home dataclass, home field): the accepted values are the setting's choices
FLAG_CHOICES = [
    (["evaluate"], "device", TrainConfig, "device"),
    (["bench", "env"], "device", TrainConfig, "device"),
    (["bench", "env"], "kernel", EnvConfig, "kernel"),
    (["bench", "env"], "precision", EnvConfig, "precision"),
    (["bench", "train"], "device", TrainConfig, "device"),
    (["bench", "train"], "kernel", EnvConfig, "kernel"),
]


@pytest.mark.parametrize("path,dest,cls,name", FLAG_CHOICES, ids=[f"{' '.join(p)} {d}" for p, d, _, _ in FLAG_CHOICES])
def test_flag_choices_are_the_config_choices(path: list[str], dest: str, cls: type, name: str) -> None:
    action = next(a for a in _subparser(build_parser(), path)._actions if a.dest == dest)
    declared = next(f for f in fields(cls) if f.name == name).metadata["choices"]
    assert tuple(action.choices) == tuple(declared)


def _bench_env():
    from nexlify.bench import bench_env

    return bench_env


def _bench_train():
    from nexlify.bench import bench_train

    return bench_train


def _load_market():
    from nexlify.data.candles import load_market

    return load_market


def _split_windows():
    from nexlify.data.candles import split_windows

    return split_windows


# (function, parameter, home dataclass, home field): keyword defaults of library functions
SIGNATURE_DEFAULTS = [
    (_bench_env, "threads", TrainConfig, "threads"),
    (_bench_env, "precision", EnvConfig, "precision"),
    (_bench_env, "kernel", EnvConfig, "kernel"),
    (_bench_train, "threads", TrainConfig, "threads"),
    (_bench_train, "kernel", EnvConfig, "kernel"),
    (_load_market, "timeframe", DataConfig, "timeframe"),
    (_split_windows, "test_days", DataConfig, "test_days"),
]


@pytest.mark.parametrize("function,param,cls,name", SIGNATURE_DEFAULTS,
                         ids=[f"{f.__name__[1:]} {p}" for f, p, _, _ in SIGNATURE_DEFAULTS])
def test_function_defaults_are_the_config_defaults(function, param: str, cls: type, name: str) -> None:
    assert inspect.signature(function()).parameters[param].default == default(cls, name)


def test_evaluate_device_default_is_the_functions() -> None:
    """`nexlify evaluate` runs on the CPU unless asked: the flag and evaluate_checkpoint say the same."""
    from nexlify.evaluate_cmd import evaluate_checkpoint

    flag = build_parser().parse_args(["evaluate", "--model", "m.pt"]).device
    assert flag == inspect.signature(evaluate_checkpoint).parameters["device"].default == "cpu"


def test_log_format_choices_are_the_loggers() -> None:
    from nexlify import logs

    for path in (["train"], ["worker", "train"], ["report"]):
        action = next(a for a in _subparser(build_parser(), path)._actions if a.dest == "log_format")
        assert tuple(action.choices) == logs.FORMATS


# ---- checkpoint_every: PipelineConfig's setting, and no other default anywhere ------------------------


def test_checkpoint_every_has_one_default() -> None:
    from controller.executors.base import RunSpec
    from controller.worker import run_worker
    from nexlify.training import train_run

    assert PipelineConfig().checkpoint_every == 100
    # the pipeline always says how often: a RunSpec and the worker function have no default of their own
    with pytest.raises(TypeError, match="checkpoint_every"):
        RunSpec(run_key="init-1", phase="initial", seed=1, episodes=1, config_url="c", data_url="d", output_url="o")
    spec = RunSpec(run_key="init-1", phase="initial", seed=1, episodes=1, config_url="c", data_url="d",
                   output_url="o", checkpoint_every=7)
    assert spec.worker_args()[spec.worker_args().index("--checkpoint-every") + 1] == "7"
    assert inspect.signature(run_worker).parameters["checkpoint_every"].default is inspect.Parameter.empty
    # train_run checkpoints only for a caller that says how often
    assert inspect.signature(train_run).parameters["checkpoint_every"].default is None
    with pytest.raises(TypeError, match="on_checkpoint needs checkpoint_every"):
        train_run(TrainConfig(), None, None, seed=0, episodes=1, on_checkpoint=lambda state: None)


# ---- the batched environment reads its settings from the config, no fallbacks -------------------------


def test_the_environment_has_no_fallback_for_config_settings() -> None:
    """env_cfg is an EnvConfig: a missing setting is an error, never a second default (once `["spot"]`
    against the config's five strategies)."""
    text = (ROOT / "nexlify" / "env" / "batched.py").read_text()
    assert re.findall(r"getattr\(\s*env_cfg", text) == []


# ---- the container's uid and gid: controller.config.RUN_AS_ID ----------------------------------------


def _dockerfile_ids() -> list[int]:
    text = (ROOT / "Dockerfile").read_text()
    group = re.search(r"groupadd --gid (\d+) nexlify", text)
    user = re.search(r"useradd --uid (\d+) --gid (\d+) ", text)
    directive = re.search(r"^USER (\d+):(\d+)$", text, re.MULTILINE)
    assert group and user and directive, "the Dockerfile's groupadd/useradd/USER lines changed form"
    return [int(x) for x in (*group.groups(), *user.groups(), *directive.groups())]


def _values_ids() -> list[int]:
    values = yaml.safe_load(VALUES.read_text())
    return [dig(values, path) for path in (
        "worker.podSecurityContext.runAsUser", "worker.podSecurityContext.runAsGroup",
        "worker.podSecurityContext.fsGroup", "podSecurityContext.runAsUser", "podSecurityContext.runAsGroup",
        "podSecurityContext.fsGroup", "securityContext.runAsUser", "securityContext.runAsGroup")]


def _base_job_ids() -> list[int]:
    job = yaml.safe_load((K8S / "base" / "job.yaml").read_text())["spec"]["template"]["spec"]
    container = job["containers"][0]["securityContext"]
    return [job["securityContext"][k] for k in ("runAsUser", "runAsGroup", "fsGroup")] + \
        [container[k] for k in ("runAsUser", "runAsGroup")]


def _base_config_ids() -> list[int]:
    config_map = yaml.safe_load((K8S / "base" / "configmap.yaml").read_text())
    pod = yaml.safe_load(config_map["data"]["pipeline.yaml"])["kubernetes"]["pod_security_context"]
    return [pod[k] for k in ("runAsUser", "runAsGroup", "fsGroup")]


def _kubernetes_config_ids() -> list[int]:
    pod = KubernetesConfig().pod_security_context
    return [pod[k] for k in ("runAsUser", "runAsGroup", "fsGroup")]


def _readme_ids() -> list[int]:
    return [int(x) for x in re.findall(r"runs as uid (\d+)", (K8S / "README.md").read_text())]


UID_COPIES = [("Dockerfile", _dockerfile_ids), ("values.yaml", _values_ids), ("k8s/base/job.yaml", _base_job_ids),
              ("k8s/base/configmap.yaml", _base_config_ids), ("KubernetesConfig", _kubernetes_config_ids),
              ("k8s/README.md", _readme_ids)]


@pytest.mark.parametrize("where,read", UID_COPIES, ids=[w for w, _ in UID_COPIES])
def test_every_uid_and_gid_is_run_as_id(where: str, read) -> None:
    ids = read()
    assert ids, f"{where}: no uid found"
    assert set(ids) == {RUN_AS_ID}, f"{where} has {ids}; controller.config.RUN_AS_ID is {RUN_AS_ID}"


# ---- values.yaml's `worker:` section: KubernetesConfig's defaults under the chart's names -------------

# values.yaml path -> KubernetesConfig field (helm/nexlify-train/templates/_helpers.tpl maps them)
WORKER_VALUES = {
    "worker.gpus": "gpus",
    "worker.resources.requests.cpu": "cpu_request",
    "worker.resources.requests.memory": "memory_request",
    "worker.resources.limits.cpu": "cpu_limit",
    "worker.resources.limits.memory": "memory_limit",
    "worker.podSecurityContext": "pod_security_context",
    "worker.securityContext": "container_security_context",
    "worker.podAnnotations": "pod_annotations",
    "worker.podLabels": "pod_labels",
    "worker.nodeSelector": "node_selector",
    "worker.tolerations": "tolerations",
    "worker.affinity": "affinity",
    "worker.priorityClassName": "priority_class_name",
    "worker.backoffLimit": "backoff_limit",
    "worker.activeDeadlineSeconds": "active_deadline_seconds",
    "worker.ttlSecondsAfterFinished": "ttl_seconds_after_finished",
    "image.pullPolicy": "image_pull_policy",
    "storage.existingSecret": "s3_secret",
    "storage.endpoint": "s3_endpoint",
    "kueue.queueName": "kueue_queue",
}
# Set by the chart from the release (name, namespace, appVersion, the service account it creates) or by the
# controller at run time: no default of KubernetesConfig's to copy.
CHART_SET = {"namespace", "name", "image", "worker_service_account", "owner_job"}


@pytest.mark.parametrize("path,name", WORKER_VALUES.items(), ids=list(WORKER_VALUES))
def test_worker_values_are_kubernetes_config_defaults(path: str, name: str) -> None:
    values = yaml.safe_load(VALUES.read_text())
    assert dig(values, path) == default(KubernetesConfig, name), f"values.yaml {path} vs KubernetesConfig.{name}"


def test_every_kubernetes_setting_has_a_value_or_is_set_by_the_chart() -> None:
    values = yaml.safe_load(VALUES.read_text())
    # `resources` is what worker.resources holds besides cpu and memory (_helpers.tpl): nothing by default
    resources = values["worker"]["resources"]
    extra = {kind: {k: v for k, v in resources[kind].items() if k not in ("cpu", "memory")}
             for kind in ("requests", "limits")}
    assert {k: v for k, v in extra.items() if v} == default(KubernetesConfig, "resources")
    names = {f.name for f in fields(KubernetesConfig)}
    assert names == set(WORKER_VALUES.values()) | CHART_SET | {"resources"}, \
        "a KubernetesConfig setting is neither mapped to a chart value (WORKER_VALUES) nor set by the chart"


# ---- the quick-test preset: controller.config.quick_test_preset --------------------------------------


def test_cpu_dev_overlay_carries_the_quick_test_preset() -> None:
    path = K8S / "overlays" / "cpu-dev" / "pipeline.yaml"
    cfg = resolve_pipeline_config(build_parser().parse_args(["train", "--config", str(path)]))
    index = leaf_index(PipelineConfig)
    preset = quick_test_preset()
    for key, value in preset.items():
        assert get_path(cfg, index[key].path) == value, f"cpu-dev overlay {key}"
    # and nothing else of the preset's is typed again in the file: its keys sit in the generated block only
    text = path.read_text()
    block = text[text.index("# BEGIN generated"):text.index("# END generated")]
    outside = text.replace(block, "")
    assert not [key for key in preset if re.search(rf"^\s*{key}:", outside, re.MULTILINE)]


def test_overlay_preset_drift_is_detected(tmp_path: Path) -> None:
    assert subprocess.run(SYNC, capture_output=True, text=True).returncode == 0
    overlays = tmp_path / "overlays"
    shutil.copytree(K8S / "overlays", overlays)
    path = overlays / "cpu-dev" / "pipeline.yaml"
    text = path.read_text()
    assert "initial_runs: 2\n" in text
    path.write_text(text.replace("initial_runs: 2\n", "initial_runs: 3\n"))
    out = subprocess.run(SYNC + ["--overlays-dir", str(overlays)], capture_output=True, text=True)
    assert out.returncode == 1 and "cpu-dev/pipeline.yaml" in out.stderr


def test_quick_test_help_is_the_preset() -> None:
    action = next(a for a in _subparser(build_parser(), ["train"])._actions if a.dest == "quick_test")
    for key, value in quick_test_preset().items():
        shown = " ".join(value) if isinstance(value, list) else str(value)
        assert f"{key} {shown}" in action.help


def test_readme_tells_the_quick_test_preset() -> None:
    line = re.search(r"nexlify train --quick-test +# (\d+) pairs?, (\d+) initial runs, <= (\d+) iterations, .*CPU",
                     (ROOT / "README.md").read_text())
    assert line, "README's quick-test line changed form"
    preset = quick_test_preset()
    told = tuple(int(x) for x in line.groups())
    assert told == (len(preset["pairs"]), preset["initial_runs"], preset["max_iterations"])
    assert preset["device"] == "cpu"


# ---- the overlays' copies of what the chart renders into k8s/base ------------------------------------


@pytest.mark.parametrize("overlay", ["gpu", "cpu-dev"])
def test_overlay_kubernetes_settings_match_the_base(overlay: str) -> None:
    """The overlays keep the base's Jobs, service accounts and image: their config must name the same."""
    cfg = yaml.safe_load((K8S / "overlays" / overlay / "pipeline.yaml").read_text())["kubernetes"]
    job = yaml.safe_load((K8S / "base" / "job.yaml").read_text())
    worker_sa = yaml.safe_load((K8S / "base" / "serviceaccount-worker.yaml").read_text())
    assert cfg["namespace"] == job["metadata"]["namespace"]
    assert cfg["image"] == job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert cfg["worker_service_account"] == worker_sa["metadata"]["name"]


# ---- the release version and the image name ---------------------------------------------------------


def test_version_is_one_across_package_chart_and_overlays() -> None:
    """pyproject.toml's version is the package's; nexlify.__version__, the chart's appVersion (the image tag
    the chart deploys) and the overlays' image tag copy it."""
    import tomllib

    import nexlify

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((ROOT / "helm" / "nexlify-train" / "Chart.yaml").read_text())
    assert nexlify.__version__ == version
    assert chart["appVersion"] == version
    for overlay in ("gpu", "cpu-dev"):
        image = yaml.safe_load((K8S / "overlays" / overlay / "pipeline.yaml").read_text())["kubernetes"]["image"]
        assert image.rsplit(":", 1)[1] == version, overlay


def test_chart_image_repository_is_the_configs() -> None:
    values = yaml.safe_load(VALUES.read_text())
    assert values["image"]["repository"] == default(KubernetesConfig, "image").rsplit(":", 1)[0]
