"""A small, strict fake Kubernetes API server for end-to-end tests of the Kubernetes executor.

`FakeCluster` serves batch/v1 Jobs and v1 Pods, pods/log, Events, Secrets and Namespaces over plain
HTTP on 127.0.0.1, validates every object with `kubernetes-validate` in strict mode, and runs each
Job's pod as a local process. Where it differs from a real cluster: DIFFERENCES.md in this folder.
"""

from .cluster import FakeCluster, python_command_map
from .server import ApiCall, RequestLog

__all__ = ["ApiCall", "FakeCluster", "RequestLog", "python_command_map"]
