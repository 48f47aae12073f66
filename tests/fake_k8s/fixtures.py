"""pytest fixtures that start a `FakeCluster` in-process and point the official client at it.

Import them into a test module (or a conftest) to use them:

    from tests.fake_k8s.fixtures import fake_cluster, fake_cluster_factory  # noqa: F401

`fake_cluster` is a started cluster whose kubeconfig is loaded into the client's default
configuration with `kubernetes.config.load_kube_config(config_file=...)`, exactly as on a laptop;
its path is `fake_cluster.kubeconfig_path`. `fake_cluster_factory(**kwargs)` builds one with other
constructor arguments (an `image_command_map`, a `retry_delay`...). On teardown every process is
killed, and the test fails if the fake itself hit an internal error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import kubernetes
import pytest

from .cluster import FakeCluster


def _started(tmp_path: Path, name: str, **kwargs: Any) -> FakeCluster:
    cluster = FakeCluster(**kwargs).start()
    path = cluster.kubeconfig(tmp_path / f"{name}.kubeconfig")
    kubernetes.config.load_kube_config(config_file=str(path))
    return cluster


@pytest.fixture
def fake_cluster_factory(tmp_path: Path) -> Iterator[Callable[..., FakeCluster]]:
    clusters: list[FakeCluster] = []

    def make(**kwargs: Any) -> FakeCluster:
        cluster = _started(tmp_path, f"fake-{len(clusters)}", **kwargs)
        clusters.append(cluster)
        return cluster

    yield make
    errors = []
    for cluster in clusters:
        errors += cluster.errors
        cluster.stop()
    assert not errors, "fake_k8s internal errors:\n" + "\n".join(errors)


@pytest.fixture
def fake_cluster(fake_cluster_factory: Callable[..., FakeCluster]) -> FakeCluster:
    return fake_cluster_factory()
