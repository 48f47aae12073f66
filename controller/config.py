"""PipelineConfig: the training settings (TrainConfig, inlined) plus how the pipeline runs.

Written once here; the CLI flags, the YAML file (`--config`), the Helm chart's `pipeline:` values and
the summary's `config` are all this structure. TrainConfig's sections (data, env, risk, agent) sit at
the top level of files and flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from nexlify.config import TrainConfig
from nexlify.configtools import config_hash, section, setting, to_dict
from nexlify.errors import InputError

DEFAULT_OUTPUT = "./complete_auto_training_output"
# Upper bounds of the pipeline's counts: far above any useful value, low enough that a typo (an extra
# digit or ten) is refused at once instead of starting a run that never ends.
MAX_EPISODES = 1_000_000  # episodes of one run
MAX_SEED = 2**31 - 1  # seeds stay valid for every RNG (numpy takes < 2**32; run i adds 1000*i)
MAX_PIPELINE_SEED = MAX_SEED - 1_000_000  # the pipeline's --seed: room for its runs' offsets
# The uid and gid every container runs as: the image's `nexlify` user. Written here; the Dockerfile's
# useradd/USER and the chart's securityContexts are copies that tests/test_defaults.py holds to this value.
RUN_AS_ID = 10001


@dataclass
class KubernetesConfig:
    """How runs become Jobs (`--executor kubernetes`). The Helm chart fills these from its values."""

    namespace: str = setting("default", "namespace for the run Jobs")
    name: str = setting("nexlify", "name prefix of the Jobs (<name>-<pipeline-id>-init-<i>)")
    image: str = setting("nexlify-train:latest", "container image of the workers")
    image_pull_policy: str = setting("IfNotPresent", "image pull policy",
                                     choices=("Always", "IfNotPresent", "Never"))
    worker_service_account: str = setting("", "service account of the worker pods (no API access needed)")
    s3_secret: str = setting("", "Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the workers "
                                 "(empty: IRSA / workload identity)")
    s3_endpoint: str = setting("", "S3 endpoint URL passed to workers as AWS_ENDPOINT_URL (empty: AWS)")
    gpus: int = setting(0, "nvidia.com/gpu per worker", lo=0, hi=64)
    cpu_request: str = setting("1", "worker CPU request")
    memory_request: str = setting("2Gi", "worker memory request")
    cpu_limit: str = setting("", "worker CPU limit (empty: none)")
    memory_limit: str = setting("4Gi", "worker memory limit")
    resources: dict = setting({}, "more worker resource requirements: {requests: {name: quantity}, limits: {name: "
                              "quantity}} with any Kubernetes resource name (amd.com/gpu, nvidia.com/mig-1g.10gb, "
                              "ephemeral-storage, ...); merged over the cpu/memory settings and gpus ('' unsets one)",
                              cli=False)
    pod_security_context: dict = setting(
        {"runAsNonRoot": True, "runAsUser": RUN_AS_ID, "runAsGroup": RUN_AS_ID, "fsGroup": RUN_AS_ID,
         "seccompProfile": {"type": "RuntimeDefault"}}, "securityContext of the worker pods (replaces the default)",
        cli=False)
    container_security_context: dict = setting(
        {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
         "capabilities": {"drop": ["ALL"]}}, "securityContext of the worker container (replaces the default)",
        cli=False)
    pod_annotations: dict = setting({}, "extra annotations of the worker pods", cli=False)
    pod_labels: dict = setting({}, "extra labels of the worker pods (the nexlify.io/* and app.kubernetes.io/* "
                               "labels the controller selects by win)", cli=False)
    node_selector: dict = setting({}, "worker nodeSelector", cli=False)
    tolerations: list[dict] = setting([], "worker tolerations", cli=False)
    affinity: dict = setting({}, "worker affinity", cli=False)
    priority_class_name: str = setting("", "worker priorityClassName")
    kueue_queue: str = setting("", "Kueue LocalQueue name (empty: no Kueue)")
    backoff_limit: int = setting(2, "pod retries per Job", lo=0, hi=100)
    active_deadline_seconds: int = setting(6 * 3600, "seconds before a run Job is failed", lo=1, hi=366 * 86400)
    ttl_seconds_after_finished: int = setting(7 * 24 * 3600, "seconds a finished Job is kept", lo=0,
                                              hi=366 * 86400)
    owner_job: str = setting("", "name of the controller's own Job, for ownerReferences (set in-cluster)",
                             cli=False)


@dataclass
class PipelineConfig:
    train: TrainConfig = section(TrainConfig, inline=True)
    seed: int = setting(42, "seed of the first initial run; run i uses seed + 1000*i", lo=0, hi=MAX_PIPELINE_SEED)
    initial_runs: int = setting(3, "independent initial runs (multi-start)", lo=1, hi=64)
    initial_episodes: int = setting(2048, "episodes per initial run (an episode is env.episode_bars bars)", lo=1,
                                    hi=MAX_EPISODES)
    retrain_episodes: int = setting(1024, "episodes per retraining iteration", lo=1, hi=MAX_EPISODES)
    improvement_threshold: float = setting(1.0, "minimum improvement in % that keeps retraining going", lo=0.0,
                                          hi=1e6)
    patience: int = setting(3, "retraining iterations without improvement before stopping", lo=1, hi=1000)
    max_iterations: int = setting(10, "retraining iterations at most (0 = no retraining)", lo=0, hi=1000)
    output: str = setting(DEFAULT_OUTPUT, "output folder or s3://bucket/prefix")
    executor: str = setting("local", "where runs execute", choices=("local", "kubernetes"))
    parallel: int = setting(0, "runs at once (0 = what the cores or GPUs allow)", lo=0, hi=1024)
    checkpoint_every: int = setting(100, "episodes between a run's resume checkpoints (0 = only at the end)", lo=0,
                                    hi=MAX_EPISODES)
    kubernetes: KubernetesConfig = section(KubernetesConfig)

    def check(self) -> None:
        if self.output.startswith("s3://") and len(self.output) <= len("s3://"):
            raise InputError(f"--output {self.output!r}: accepted: a folder or s3://bucket/prefix")


# Settings that may change between a crash and the resume without changing what is computed.
RUNTIME_ONLY = ("output", "executor", "parallel", "kubernetes", "device", "threads")


def pipeline_hash(cfg: PipelineConfig) -> str:
    data = to_dict(cfg)
    for key in RUNTIME_ONLY:
        data.pop(key, None)
    return config_hash(data)


def pipeline_id(cfg: PipelineConfig, output_url: str) -> str:
    """The pipeline's identity (8 hex digits, in Job names): its config hash AND its output, so the same
    config run to two outputs in one namespace never shares (or adopts) a Job."""
    import hashlib

    return hashlib.sha256(f"{pipeline_hash(cfg)}|{output_url.rstrip('/')}".encode()).hexdigest()[:8]


def quick_test_preset() -> dict:
    """--quick-test: one pair, two initial runs, at most three iterations, small episode counts, on the CPU
    (16 episodes per batch keep a GPU waiting on kernel launches: the quick test took 250 s on an H200 and
    30 s on two CPU cores). Flags the user typed still win."""
    return {
        "device": "cpu",
        "pairs": ["BTC/USDT"],
        "initial_runs": 2,
        "max_iterations": 3,
        "initial_episodes": 32,
        "retrain_episodes": 16,
        "num_envs": 16,
        "batch_size": 256,  # 16 new transitions a step: a 1,024 batch would replay each one 64 times
        "episode_bars": 1500,
        "checkpoint_every": 16,
    }
