"""The fake Kubernetes API server, exercised through the official client as our controller uses it.

Every test talks HTTP to a `FakeCluster` on loopback via `kubernetes.client` (BatchV1Api, CoreV1Api,
`kubernetes.watch.Watch`) after `kubernetes.config.load_kube_config(config_file=...)`. Containers are
tiny `python -c` programs run as local processes. Expected values are the ones a real apiserver and
Job controller produce (condition order, reasons, messages, status codes); see DIFFERENCES.md for
what the fake does not reproduce.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import threading
import time
from typing import Any, Callable

import pytest
import urllib3
from kubernetes import client, watch

from tests.fake_k8s import ApiCall, FakeCluster
from tests.fake_k8s.fixtures import fake_cluster, fake_cluster_factory  # noqa: F401 - pytest fixtures
from tests.fake_k8s.jobrules import count_finished_pods, match_pod_failure_policy
from tests.fake_k8s.selectors import parse_label_selector, labels_match

NS = "default"
POD_NAME_SUFFIX = "[bcdfghjklmnpqrstvwxz2456789]{5}"


# --- helpers ------------------------------------------------------------------------------------------

def job_body(name: str, code: str, *, restart_policy: str = "Never", labels: dict[str, str] | None = None,
             container: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    """A batch/v1 Job running `python -c <code>` in one container named `main`."""
    main = {"name": "main", "image": "python:3.11-slim", "command": [sys.executable, "-c", code]}
    main.update(container or {})
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
            "spec": {"template": {"spec": {"restartPolicy": restart_policy, "containers": [main]}}, **spec}}


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `predicate` until truthy; time the process was not scheduled at all does not count."""
    deadline = last = time.monotonic()
    deadline += timeout
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now - last > 1.0:
            deadline += now - last
        last = now
        if now >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def conditions(job: client.V1Job) -> list[tuple[str, str, str | None]]:
    return [(c.type, c.status, c.reason) for c in (job.status.conditions or [])]


def watch_job_until_finished(batch: client.BatchV1Api, name: str, resource_version: str,
                             timeout: int = 20) -> list[client.V1Job]:
    """Every state of Job `name` seen by a watch from `resource_version` until Complete or Failed."""
    seen = []
    stream = watch.Watch()
    for event in stream.stream(batch.list_namespaced_job, NS, field_selector=f"metadata.name={name}",
                               resource_version=resource_version, timeout_seconds=timeout):
        job = event["object"]
        seen.append(job)
        if any(t in ("Complete", "Failed") and s == "True" for t, s, _ in conditions(job)):
            stream.stop()
    return seen


def raw_request(method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json") -> tuple[int, Any, dict[str, str]]:
    """A request through the official client's transport, bypassing its model validation."""
    api = client.ApiClient()
    method, url, headers, data, _ = api.param_serialize(
        method, path, query_params=query or [], header_params={"Content-Type": content_type,
                                                               "Accept": "application/json"},
        body=body, auth_settings=["BearerToken"])
    response = api.call_api(method, url, headers, data)
    response.read()
    text = response.data.decode()
    try:
        decoded = json.loads(text)
    except ValueError:  # a watch stream (JSON lines) or plain text
        decoded = text
    return response.status, decoded, dict(response.getheaders())


def api_error(call: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
    with pytest.raises(client.ApiException) as caught:
        call()
    return caught.value.status, json.loads(caught.value.body)


def start_marker_code(marker: str) -> str:
    """Sleep 60 s on the first run (leaving a marker file), exit 0 on any later run."""
    return (f"import os, sys, time\np = {marker!r}\nif os.path.exists(p): sys.exit(0)\n"
            "open(p, 'w').close()\nprint('started', flush=True)\ntime.sleep(60)")


# --- Jobs run to their terminal condition ----------------------------------------------------------------

def test_job_completes_with_success_conditions_in_order(fake_cluster: FakeCluster) -> None:
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    created = batch.create_namespaced_job(NS, job_body("hello", "print('hi')"))

    assert created.metadata.uid and created.metadata.generation == 1
    assert int(created.metadata.resource_version) > int(rv)
    assert created.spec.backoff_limit == 6 and created.spec.completions == 1 and created.spec.parallelism == 1
    assert created.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": created.metadata.uid}
    seen = watch_job_until_finished(batch, "hello", rv)
    final = seen[-1]
    assert conditions(final) == [("SuccessCriteriaMet", "True", "CompletionsReached"),
                                 ("Complete", "True", "CompletionsReached")]
    # SuccessCriteriaMet is written first, on its own, before Complete.
    interim = [conditions(job) for job in seen if conditions(job)]
    assert interim[0] == [("SuccessCriteriaMet", "True", "CompletionsReached")]
    assert final.status.succeeded == 1 and not final.status.active and not final.status.failed
    assert final.status.start_time is not None and final.status.completion_time is not None
    versions = [int(job.metadata.resource_version) for job in seen]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)

    fake_cluster.wait_idle()
    pods = core.list_namespaced_pod(NS, label_selector="job-name=hello").items
    assert len(pods) == 1
    pod = pods[0]
    assert re.fullmatch(f"hello-{POD_NAME_SUFFIX}", pod.metadata.name)
    assert pod.metadata.labels["batch.kubernetes.io/job-name"] == "hello"
    assert pod.metadata.labels["controller-uid"] == created.metadata.uid
    owner = pod.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid, owner.controller) == ("Job", "hello", created.metadata.uid, True)
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert not pod.metadata.finalizers  # the tracking finalizer is released once the pod is counted
    assert core.read_namespaced_pod_log(pod.metadata.name, NS) == "hi\n"


def test_exit_code_3_with_backoff_limit_1_runs_two_pods_then_fails(fake_cluster: FakeCluster) -> None:
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    rv = core.list_namespaced_pod(NS).metadata.resource_version
    batch.create_namespaced_job(NS, job_body("fails", "import sys; sys.exit(3)", backoffLimit=1))
    final = watch_job_until_finished(batch, "fails", rv)[-1]

    assert conditions(final) == [("FailureTarget", "True", "BackoffLimitExceeded"),
                                 ("Failed", "True", "BackoffLimitExceeded")]
    assert final.status.conditions[1].message == "Job has reached the specified backoff limit"
    assert final.status.failed == 2 and not final.status.succeeded and not final.status.active
    fake_cluster.wait_idle()
    pods = fake_cluster.pods_of("fails")
    assert len(pods) == 2
    for pod in pods:
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (pod["status"]["phase"], terminated["exitCode"], terminated["reason"]) == ("Failed", 3, "Error")
    # Sequential retries: the second pod is created only after the first one has failed.
    events = list(watch.Watch().stream(core.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=1))
    first, second = (p["metadata"]["name"] for p in pods)
    failed_at = min(int(e["object"].metadata.resource_version) for e in events
                    if e["object"].metadata.name == first and e["object"].status.phase == "Failed")
    added_at = next(int(e["object"].metadata.resource_version) for e in events
                    if e["type"] == "ADDED" and e["object"].metadata.name == second)
    assert added_at > failed_at


def test_pod_failure_policy_fail_job_on_exit_code_2_stops_after_one_pod(fake_cluster: FakeCluster) -> None:
    batch = client.BatchV1Api()
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In",
                                                                 "values": [2]}}]}
    batch.create_namespaced_job(NS, job_body("policy", "import sys; sys.exit(2)", backoffLimit=6,
                                             podFailurePolicy=policy))
    final = watch_job_until_finished(batch, "policy", rv)[-1]

    pods = fake_cluster.pods_of("policy")
    assert len(pods) == 1
    assert conditions(final) == [("FailureTarget", "True", "PodFailurePolicy"), ("Failed", "True", "PodFailurePolicy")]
    assert final.status.conditions[1].message == (
        f"Container main for pod default/{pods[0]['metadata']['name']} failed with exit code 2 "
        "matching FailJob rule at index 0")
    assert final.status.failed == 1
    assert final.spec.pod_replacement_policy == "Failed"  # the default when a podFailurePolicy is set


def test_eviction_with_disruption_target_is_ignored_and_replaced(fake_cluster: FakeCluster, tmp_path) -> None:
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    rv = core.list_namespaced_pod(NS).metadata.resource_version
    policy = {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                        {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0]}}]}
    batch.create_namespaced_job(NS, job_body("evicted", start_marker_code(str(tmp_path / "marker")),
                                             backoffLimit=0, podFailurePolicy=policy))
    first = wait_for(lambda: [p for p in fake_cluster.pods_of("evicted") if p["status"]["phase"] == "Running"
                              and (tmp_path / "marker").exists()], what="first pod running")[0]
    fake_cluster.evict_pod(first["metadata"]["name"])
    final = watch_job_until_finished(batch, "evicted", rv)[-1]

    assert conditions(final) == [("SuccessCriteriaMet", "True", "CompletionsReached"),
                                 ("Complete", "True", "CompletionsReached")]
    assert final.status.succeeded == 1 and not final.status.failed  # the evicted pod is not counted
    fake_cluster.wait_idle()
    names = [p["metadata"]["name"] for p in fake_cluster.pods_of("evicted")]
    assert first["metadata"]["name"] not in names and len(names) == 1  # evicted pods are deleted
    history = [e["object"] for e in watch.Watch().stream(core.list_namespaced_pod, NS, resource_version=rv,
                                                          timeout_seconds=1)
               if e["object"].metadata.name == first["metadata"]["name"]]
    last = history[-1]
    assert last.status.phase == "Failed"
    disruption = next(c for c in last.status.conditions if c.type == "DisruptionTarget")
    assert (disruption.status, disruption.reason) == ("True", "EvictionByEvictionAPI")
    assert last.status.container_statuses[0].state.terminated.exit_code == 143  # SIGTERM


def test_oom_kill_is_reported_as_oomkilled(fake_cluster: FakeCluster) -> None:
    batch = client.BatchV1Api()
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    batch.create_namespaced_job(NS, job_body("oom", "import time; time.sleep(60)", backoffLimit=0))
    pod = wait_for(lambda: [p for p in fake_cluster.pods_of("oom") if p["status"]["phase"] == "Running"])[0]
    fake_cluster.inject_oom(pod["metadata"]["name"])
    final = watch_job_until_finished(batch, "oom", rv)[-1]

    assert conditions(final)[-1] == ("Failed", "True", "BackoffLimitExceeded")
    terminated = fake_cluster.pods_of("oom")[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)


def test_active_deadline_on_unschedulable_job_fails_with_deadline_exceeded(fake_cluster: FakeCluster) -> None:
    batch = client.BatchV1Api()
    fake_cluster.unschedulable("stuck")
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    batch.create_namespaced_job(NS, job_body("stuck", "print('never')", activeDeadlineSeconds=1))
    pending = wait_for(lambda: [p for p in fake_cluster.pods_of("stuck")
                                if any(c["type"] == "PodScheduled" for c in p["status"].get("conditions", []))])[0]
    scheduled = next(c for c in pending["status"]["conditions"] if c["type"] == "PodScheduled")
    assert (pending["status"]["phase"], scheduled["status"], scheduled["reason"]) == ("Pending", "False", "Unschedulable")
    started = time.monotonic()
    final = watch_job_until_finished(batch, "stuck", rv)[-1]

    assert conditions(final) == [("FailureTarget", "True", "DeadlineExceeded"), ("Failed", "True", "DeadlineExceeded")]
    assert final.status.conditions[1].message == "Job was active longer than specified deadline"
    assert time.monotonic() - started < 5
    fake_cluster.wait_idle()
    assert fake_cluster.pods_of("stuck") == []  # the unscheduled pod was deleted at the deadline


def test_suspended_job_waits_until_patched(fake_cluster: FakeCluster) -> None:
    batch = client.BatchV1Api()
    batch.create_namespaced_job(NS, job_body("later", "print('resumed')", suspend=True))
    fake_cluster.wait_idle()
    job = batch.read_namespaced_job("later", NS)
    assert fake_cluster.pods_of("later") == []
    assert conditions(job) == [("Suspended", "True", "JobSuspended")]
    assert job.status.start_time is None and not job.status.active

    rv = job.metadata.resource_version
    patched = batch.patch_namespaced_job("later", NS, {"spec": {"suspend": False}})
    assert patched.spec.suspend is False and patched.metadata.generation == 2
    final = watch_job_until_finished(batch, "later", rv)[-1]
    assert conditions(final) == [("Suspended", "False", "JobResumed"),
                                 ("SuccessCriteriaMet", "True", "CompletionsReached"),
                                 ("Complete", "True", "CompletionsReached")]
    assert len(fake_cluster.pods_of("later")) == 1


def test_container_env_secret_field_ref_and_command_map(fake_cluster_factory, tmp_path) -> None:
    cluster = fake_cluster_factory(image_command_map={
        "greet": [sys.executable, "-c", "import os, sys; print('mapped', sys.argv[1:], os.environ['TOKEN'], "
                  "os.environ['POD'], os.environ['NAMESPACE'], os.environ['GREETING'], "
                  "os.environ['TMPDIR'] != '/tmp', os.getcwd())"]})
    core, batch = client.CoreV1Api(), client.BatchV1Api()
    core.create_namespaced_secret(NS, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}})
    assert core.read_namespaced_secret("creds", NS).data == {"token": base64.b64encode(b"s3cr3t").decode()}
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
           {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "WHO", "value": "world"}, {"name": "GREETING", "value": "hello-$(WHO)"}]
    batch.create_namespaced_job(NS, job_body("env", "", container={"command": ["greet"], "args": ["a", "$(WHO)"],
                                                                   "env": env, "workingDir": str(tmp_path)}))
    cluster.wait_idle()
    pod = cluster.pods_of("env")[0]
    name = pod["metadata"]["name"]
    assert core.read_namespaced_pod_log(name, NS) == \
        f"mapped ['a', 'world'] s3cr3t {name} default hello-world True {tmp_path}\n"


def test_missing_secret_keeps_pod_pending_with_create_container_config_error(fake_cluster: FakeCluster) -> None:
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "token"}}}]
    batch.create_namespaced_job(NS, job_body("nosecret", "print('ok')", container={"env": env}))
    pod = wait_for(lambda: [p for p in fake_cluster.pods_of("nosecret")
                            if p["status"].get("containerStatuses", [{}])[0].get("state", {}).get("waiting", {})
                            .get("reason") == "CreateContainerConfigError"])[0]
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert (pod["status"]["phase"], waiting["message"]) == ("Pending", 'secret "absent" not found')
    status, body = api_error(lambda: core.read_namespaced_pod_log(pod["metadata"]["name"], NS))
    assert (status, body["reason"]) == (400, "BadRequest")
    assert body["message"] == f'container "main" in pod "{pod["metadata"]["name"]}" is waiting to start: ' \
                              "CreateContainerConfigError"
    core.create_namespaced_secret(NS, {"metadata": {"name": "absent"}, "stringData": {"token": "late"}})
    fake_cluster.wait_idle()
    assert conditions(batch.read_namespaced_job("nosecret", NS))[-1] == ("Complete", "True", "CompletionsReached")


def test_pod_log_tail_lines_and_limit_bytes(fake_cluster: FakeCluster) -> None:
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    code = "import sys\nfor i in range(1, 11): print(i, flush=True)\nprint('err', file=sys.stderr)"
    batch.create_namespaced_job(NS, job_body("logs", code))
    fake_cluster.wait_idle()
    name = fake_cluster.pods_of("logs")[0]["metadata"]["name"]
    assert core.read_namespaced_pod_log(name, NS, tail_lines=3) == "9\n10\nerr\n"
    assert core.read_namespaced_pod_log(name, NS, tail_lines=3, limit_bytes=4) == "9\n10"
    assert core.read_namespaced_pod_log(name, NS, container="main") == "".join(f"{i}\n" for i in range(1, 11)) + "err\n"
    status, body = api_error(lambda: core.read_namespaced_pod_log(name, NS, container="other"))
    assert (status, body["message"]) == (400, f"container other is not valid for pod {name}")


# --- API semantics: errors, validation, selectors ---------------------------------------------------------

def test_duplicate_create_is_409_already_exists(fake_cluster: FakeCluster) -> None:
    batch = client.BatchV1Api()
    batch.create_namespaced_job(NS, job_body("dup", "print(1)", suspend=True))
    status, body = api_error(lambda: batch.create_namespaced_job(NS, job_body("dup", "print(1)", suspend=True)))
    assert status == 409
    assert (body["kind"], body["status"], body["reason"], body["code"]) == ("Status", "Failure", "AlreadyExists", 409)
    assert body["message"] == 'jobs.batch "dup" already exists'
    assert body["details"] == {"name": "dup", "group": "batch", "kind": "jobs"}


def test_not_found_is_404_status(fake_cluster: FakeCluster) -> None:
    status, body = api_error(lambda: client.BatchV1Api().read_namespaced_job("nope", NS))
    assert (status, body["reason"], body["message"]) == (404, "NotFound", 'jobs.batch "nope" not found')
    status, body = api_error(lambda: client.CoreV1Api().read_namespaced_pod("nope", NS))
    assert body["details"] == {"name": "nope", "kind": "pods"}
    code, body, _ = raw_request("GET", "/apis/batch/v1/namespaces/default/cronjobs")
    assert (code, body["kind"], body["reason"]) == (404, "Status", "NotFound")
    code, body, _ = raw_request("GET", "/no/such/path")
    assert (code, body["reason"]) == (404, "NotFound")
    status, body = api_error(lambda: client.BatchV1Api().create_namespaced_job("ghost", job_body("x", "1")))
    assert (status, body["message"]) == (404, 'namespaces "ghost" not found')


def test_unknown_field_is_422_in_strict_mode(fake_cluster: FakeCluster) -> None:
    body = job_body("typo", "print(1)")
    body["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    code, status, _ = raw_request("POST", "/apis/batch/v1/namespaces/default/jobs", body)
    assert (code, status["reason"]) == (422, "Invalid")
    [cause] = status["details"]["causes"]
    assert cause["field"] == "spec.template.spec.containers[0].comand"
    assert 'unknown field "spec.template.spec.containers[0].comand"' in cause["message"]
    assert "('comand' was unexpected)" in cause["message"]  # the validator's own words
    assert status["message"].startswith('Job.batch "typo" is invalid: spec.template.spec.containers[0].comand: ')
    assert fake_cluster.get("jobs", "typo") is None


def test_schema_follows_the_pinned_kubernetes_version(fake_cluster_factory) -> None:
    """`spec.managedBy` exists from Kubernetes 1.30: unknown to the 1.29 schema, known (though not
    implemented by the fake) in 1.33."""
    body = job_body("managed", "print(1)", managedBy="example.com/queue")
    fake_cluster_factory(kubernetes_version="1.29")
    code, old, _ = raw_request("POST", "/apis/batch/v1/namespaces/default/jobs", body)
    assert code == 422 and old["details"]["causes"][0]["field"] == "spec.managedBy"
    assert "unknown field" in old["details"]["causes"][0]["message"]
    assert client.VersionApi().get_code().minor == "29"
    fake_cluster_factory(kubernetes_version="1.33")
    code, new, _ = raw_request("POST", "/apis/batch/v1/namespaces/default/jobs", body)
    assert code == 422 and new["details"]["causes"][0]["field"] == "spec.managedBy"
    assert "fake_k8s does not implement managedBy" in new["details"]["causes"][0]["message"]


@pytest.mark.parametrize(("mutate", "field", "message"), [
    (lambda j: j["metadata"].update(name="Bad_Name"), "metadata.name",
     'Invalid value: "Bad_Name": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric '
     "characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
     r"used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"),
    (lambda j: j["metadata"].update(name="a" * 64), "spec.template.labels",
     f'Invalid value: "{"a" * 64}": must be no more than 63 characters'),
    (lambda j: j["metadata"].update(labels={"team": "-bad"}), "metadata.labels",
     'Invalid value: "-bad": a valid label must be an empty string or consist of alphanumeric characters, '
     "'-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
     "'12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"),
    (lambda j: j["spec"]["template"]["spec"].update(restartPolicy="Always"), "spec.template.spec.restartPolicy",
     'Unsupported value: "Always": supported values: "OnFailure", "Never"'),
    (lambda j: j["spec"].update(podFailurePolicy={"rules": [{"action": "Ignore", "onPodConditions": [
        {"type": "DisruptionTarget", "status": "True"}]}]}) or j["spec"]["template"]["spec"].update(restartPolicy="OnFailure"),
     "spec.template.spec.restartPolicy",
     'Invalid value: "OnFailure": only "Never" is supported when podFailurePolicy is specified'),
    (lambda j: j["spec"].update(backoffLimit=-1), "spec.backoffLimit",
     "Invalid value: -1: must be greater than or equal to 0"),
    (lambda j: j["spec"].update(podFailurePolicy={"rules": [{"action": "FailJob", "onExitCodes": {
        "operator": "In", "values": [0]}}]}), "spec.podFailurePolicy.rules[0].onExitCodes.values[0]",
     "Invalid value: 0: must not be 0 for the In operator"),
])
def test_invalid_job_is_422_with_causes(fake_cluster: FakeCluster, mutate, field: str, message: str) -> None:
    body = job_body("valid-name", "print(1)")
    mutate(body)
    status, status_body = api_error(lambda: client.BatchV1Api().create_namespaced_job(NS, body))
    assert (status, status_body["reason"]) == (422, "Invalid")
    assert {"field": field, "message": message} in [{"field": c["field"], "message": c["message"]}
                                                   for c in status_body["details"]["causes"]]


def test_pod_replacement_policy_failed_is_accepted(fake_cluster: FakeCluster) -> None:
    job = client.BatchV1Api().create_namespaced_job(NS, job_body("prp", "print(1)", podReplacementPolicy="Failed",
                                                                 suspend=True))
    assert job.spec.pod_replacement_policy == "Failed"


@pytest.mark.parametrize(("selector", "expected"), [
    ("app=web", {"web-a", "web-b"}),
    ("app==web", {"web-a", "web-b"}),
    ("app!=web", {"db", "plain"}),
    ("app in (web,db)", {"web-a", "web-b", "db"}),
    ("app notin (web)", {"db", "plain"}),
    ("tier", {"web-a", "db"}),
    ("!tier", {"web-b", "plain"}),
    ("app=web,tier", {"web-a"}),
    ("app=web,tier=front,!missing", {"web-a"}),
])
def test_label_selectors_on_list(fake_cluster: FakeCluster, selector: str, expected: set[str]) -> None:
    batch = client.BatchV1Api()
    for name, labels in (("web-a", {"app": "web", "tier": "front"}), ("web-b", {"app": "web"}),
                         ("db", {"app": "db", "tier": "back"}), ("plain", None)):
        batch.create_namespaced_job(NS, job_body(name, "print(1)", labels=labels, suspend=True))
    found = batch.list_namespaced_job(NS, label_selector=selector)
    assert {job.metadata.name for job in found.items} == expected
    assert int(found.metadata.resource_version) == fake_cluster.store.resource_version


def test_field_selector_and_bad_selectors(fake_cluster: FakeCluster) -> None:
    batch = client.BatchV1Api()
    for name in ("one", "two"):
        batch.create_namespaced_job(NS, job_body(name, "print(1)", suspend=True))
    assert [j.metadata.name for j in batch.list_namespaced_job(NS, field_selector="metadata.name=two").items] == ["two"]
    assert [j.metadata.name for j in batch.list_namespaced_job(NS, field_selector="metadata.name!=two").items] == ["one"]
    status, body = api_error(lambda: batch.list_namespaced_job(NS, field_selector="spec.parallelism=1"))
    assert (status, body["message"]) == (400, "field label not supported: spec.parallelism")
    status, body = api_error(lambda: batch.list_namespaced_job(NS, label_selector="app in ()"))
    assert status == 400


def test_label_selector_rules_match_the_apiserver() -> None:
    """The parser alone, on hand-made label sets (`!=`/`notin` also match objects without the key)."""
    def match(selector: str, labels: dict[str, str]) -> bool:
        return labels_match(parse_label_selector(selector), {"metadata": {"labels": labels}})
    assert match("a!=1", {}) and match("a notin (1)", {}) and not match("a in (1)", {})
    assert match("a>3", {"a": "4"}) and not match("a>3", {"a": "3"}) and match("a<3", {"a": "-1"})
    assert match("", {"x": "y"}) and match(" a = 1 , b ", {"a": "1", "b": ""})


def test_list_pagination_with_limit_and_continue(fake_cluster: FakeCluster) -> None:
    core = client.CoreV1Api()
    for index in range(5):
        core.create_namespaced_secret(NS, {"metadata": {"name": f"s{index}"}, "stringData": {"k": "v"}})
    first = core.list_namespaced_secret(NS, limit=2)
    assert [s.metadata.name for s in first.items] == ["s0", "s1"] and first.metadata.remaining_item_count == 3
    rest = core.list_namespaced_secret(NS, limit=10, _continue=first.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["s2", "s3", "s4"] and not rest.metadata._continue


# --- watch ---------------------------------------------------------------------------------------------

def test_watch_resumes_after_a_resource_version(fake_cluster: FakeCluster) -> None:
    core = client.CoreV1Api()
    core.create_namespaced_secret(NS, {"metadata": {"name": "before"}, "stringData": {"k": "v"}})
    rv = core.list_namespaced_secret(NS).metadata.resource_version
    core.create_namespaced_secret(NS, {"metadata": {"name": "after", "labels": {"x": "1"}}, "stringData": {"k": "v"}})
    core.delete_namespaced_secret("before", NS)

    events = [(e["type"], e["object"].metadata.name, int(e["object"].metadata.resource_version))
              for e in watch.Watch().stream(core.list_namespaced_secret, NS, resource_version=rv, timeout_seconds=1)]
    assert [(kind, name) for kind, name, _ in events] == [("ADDED", "after"), ("DELETED", "before")]
    assert int(rv) < events[0][2] < events[1][2]
    # Without a resourceVersion a watch starts with the current state as ADDED events.
    current = [(e["type"], e["object"].metadata.name)
               for e in watch.Watch().stream(core.list_namespaced_secret, NS, timeout_seconds=1)]
    assert current == [("ADDED", "after")]
    # A selector turns objects leaving it into DELETED events.
    batch = client.BatchV1Api()
    batch.create_namespaced_job(NS, job_body("sel", "print(1)", labels={"keep": "yes"}, suspend=True))
    fake_cluster.wait_idle()
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    batch.patch_namespaced_job("sel", NS, {"metadata": {"labels": {"keep": "no"}}})
    seen = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        batch.list_namespaced_job, NS, label_selector="keep=yes", resource_version=rv, timeout_seconds=1)]
    assert seen == [("DELETED", "sel")]


def test_watch_timeout_and_bookmarks(fake_cluster_factory) -> None:
    cluster = fake_cluster_factory(bookmark_interval=0.3)
    code, text, headers = raw_request("GET", "/api/v1/namespaces/default/secrets",
                                      query=[("watch", "true"), ("allowWatchBookmarks", "true"),
                                             ("resourceVersion", str(cluster.store.resource_version)),
                                             ("timeoutSeconds", "1")])
    lines = [json.loads(line) for line in text.splitlines()]
    assert code == 200 and headers.get("Transfer-Encoding") == "chunked"
    # every 0.3 s and once at the 1 s deadline: 4 on an idle machine, fewer when the runner is slow
    assert {line["type"] for line in lines} == {"BOOKMARK"} and 2 <= len(lines) <= 5
    assert lines[-1]["object"]["metadata"]["resourceVersion"] == str(cluster.store.resource_version)


def test_watch_from_compacted_history_gets_410_expired(fake_cluster: FakeCluster) -> None:
    core = client.CoreV1Api()
    rv = core.list_namespaced_secret(NS).metadata.resource_version
    core.create_namespaced_secret(NS, {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    fake_cluster.compact_history()

    code, text, _ = raw_request("GET", "/api/v1/namespaces/default/secrets",
                                query=[("watch", "true"), ("resourceVersion", rv), ("timeoutSeconds", "1")])
    event = text  # the stream holds exactly one JSON line, the ERROR event
    assert code == 200 and event["type"] == "ERROR"
    current = fake_cluster.store.resource_version
    assert event["object"] == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": f"too old resource version: {rv} ({current})", "reason": "Expired",
                               "code": 410}
    with pytest.raises(client.ApiException) as caught:
        list(watch.Watch().stream(core.list_namespaced_secret, NS, resource_version=rv, timeout_seconds=1))
    assert caught.value.status == 410
    # From the current resourceVersion on, watching works again.
    fresh = core.list_namespaced_secret(NS).metadata.resource_version
    assert list(watch.Watch().stream(core.list_namespaced_secret, NS, resource_version=fresh, timeout_seconds=1)) == []


def test_bounded_history_expires_old_resource_versions(fake_cluster_factory) -> None:
    cluster = fake_cluster_factory(history_size=3)
    core = client.CoreV1Api()
    rv = core.list_namespaced_secret(NS).metadata.resource_version
    for index in range(4):
        core.create_namespaced_secret(NS, {"metadata": {"name": f"s{index}"}, "stringData": {"k": "v"}})
    with pytest.raises(client.ApiException) as caught:
        list(watch.Watch().stream(core.list_namespaced_secret, NS, resource_version=rv, timeout_seconds=1))
    assert caught.value.status == 410 and caught.value.reason.startswith("Expired: too old resource version")
    names = [e["object"].metadata.name for e in watch.Watch().stream(
        core.list_namespaced_secret, NS, resource_version=str(cluster.store.resource_version - 3), timeout_seconds=1)]
    assert names == ["s1", "s2", "s3"]


def test_drop_watches_cuts_open_streams(fake_cluster: FakeCluster) -> None:
    outcome: list[BaseException | str] = []

    def consume() -> None:
        try:
            for _ in watch.Watch().stream(client.CoreV1Api().list_namespaced_secret, NS, timeout_seconds=30):
                pass
            outcome.append("ended cleanly")
        except BaseException as error:  # noqa: BLE001 - the test inspects it
            outcome.append(error)

    thread = threading.Thread(target=consume)
    thread.start()
    wait_for(lambda: fake_cluster.open_watches() == 1, what="watch open")
    assert fake_cluster.drop_watches() == 1
    assert fake_cluster.open_watches() == 0  # a cut watch is not counted, even before its handler notices
    thread.join(5)
    assert not thread.is_alive() and len(outcome) == 1
    assert isinstance(outcome[0], urllib3.exceptions.ProtocolError)


# --- delete and propagation ----------------------------------------------------------------------------

def test_delete_with_background_propagation_removes_pods_and_kills_processes(fake_cluster: FakeCluster,
                                                                            tmp_path) -> None:
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    batch.create_namespaced_job(NS, job_body("bg", start_marker_code(str(tmp_path / "m"))))
    wait_for(lambda: (tmp_path / "m").exists(), what="process started")
    assert fake_cluster.kubelet.running_processes() == 1
    status = batch.delete_namespaced_job("bg", NS, propagation_policy="Background")  # the client returns a dict
    assert (status["kind"], status["status"], status["details"]["name"], status["details"]["kind"],
            status["details"]["group"]) == ("Status", "Success", "bg", "jobs", "batch")
    status_code, _ = api_error(lambda: batch.read_namespaced_job("bg", NS))
    assert status_code == 404  # the Job goes at once; its pods follow
    fake_cluster.wait_idle()
    assert core.list_namespaced_pod(NS, label_selector="job-name=bg").items == []
    assert fake_cluster.kubelet.running_processes() == 0


def test_delete_with_foreground_waits_for_pods(fake_cluster: FakeCluster, tmp_path) -> None:
    batch = client.BatchV1Api()
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    batch.create_namespaced_job(NS, job_body("fg", start_marker_code(str(tmp_path / "m"))))
    wait_for(lambda: (tmp_path / "m").exists(), what="process started")
    marked = batch.delete_namespaced_job("fg", NS, propagation_policy="Foreground")
    assert marked["metadata"]["deletionTimestamp"] and marked["metadata"]["finalizers"] == ["foregroundDeletion"]
    fake_cluster.wait_idle()
    assert fake_cluster.get("jobs", "fg") is None and fake_cluster.pods_of("fg") == []
    kinds = [e["type"] for e in watch.Watch().stream(batch.list_namespaced_job, NS, resource_version=rv,
                                                       timeout_seconds=1)]
    assert kinds[-1] == "DELETED"


def test_delete_without_policy_orphans_pods_with_a_warning(fake_cluster: FakeCluster) -> None:
    batch = client.BatchV1Api()
    batch.create_namespaced_job(NS, job_body("orphan", "print(1)"))
    fake_cluster.wait_idle()
    code, body, headers = raw_request("DELETE", "/apis/batch/v1/namespaces/default/jobs/orphan")
    assert code == 200 and body["metadata"]["finalizers"] == ["orphan"]
    assert "child pods are preserved by default" in headers["Warning"]
    fake_cluster.wait_idle()
    assert fake_cluster.get("jobs", "orphan") is None
    [pod] = fake_cluster.pods_of("orphan")
    assert "ownerReferences" not in pod["metadata"] and pod["status"]["phase"] == "Succeeded"


# --- test hooks: injected failures, request log, discovery, auth ---------------------------------------------

def test_fail_next_answers_injected_errors(fake_cluster: FakeCluster) -> None:
    batch = client.BatchV1Api()
    fake_cluster.fail_next(2, 500)
    for _ in range(2):
        status, body = api_error(lambda: batch.list_namespaced_job(NS))
        assert (status, body["reason"]) == (500, "InternalError")
    assert batch.list_namespaced_job(NS).items == []
    fake_cluster.fail_next(1, 429, verb="create")
    batch.list_namespaced_job(NS)  # not a create: not failed
    with pytest.raises(client.ApiException) as caught:
        batch.create_namespaced_job(NS, job_body("throttled", "print(1)", suspend=True))
    assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "1"


def test_requests_are_recorded_with_rbac_verbs(fake_cluster: FakeCluster) -> None:
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    batch.create_namespaced_job(NS, job_body("rec", "print('x')"))
    fake_cluster.wait_idle()
    batch.read_namespaced_job_status("rec", NS)
    pod = core.list_namespaced_pod(NS, label_selector="job-name=rec").items[0].metadata.name
    core.read_namespaced_pod_log(pod, NS, tail_lines=1)
    list(watch.Watch().stream(batch.list_namespaced_job, NS, timeout_seconds=1))
    batch.patch_namespaced_job("rec", NS, {"metadata": {"labels": {"a": "b"}}})
    batch.delete_namespaced_job("rec", NS, propagation_policy="Background")
    client.CoreV1Api().read_namespace(NS)
    assert list(fake_cluster.requests) == [
        ApiCall("create", "batch", "v1", "jobs", "", NS, ""),
        ApiCall("get", "batch", "v1", "jobs", "status", NS, "rec"),
        ApiCall("list", "", "v1", "pods", "", NS, ""),
        ApiCall("get", "", "v1", "pods", "log", NS, pod),
        ApiCall("watch", "batch", "v1", "jobs", "", NS, ""),
        ApiCall("patch", "batch", "v1", "jobs", "", NS, "rec"),
        ApiCall("delete", "batch", "v1", "jobs", "", NS, "rec"),
        ApiCall("get", "", "v1", "namespaces", "", NS, NS),
    ]


def test_discovery_version_and_authentication(fake_cluster: FakeCluster) -> None:
    version = client.VersionApi().get_code()
    assert (version.major, version.minor) == ("1", "33")
    core_resources = {r.name: r for r in client.CoreV1Api().get_api_resources().resources}
    assert {"pods", "pods/log", "secrets", "events", "namespaces"} <= set(core_resources)
    assert core_resources["pods"].namespaced and not core_resources["namespaces"].namespaced
    batch_resources = {r.name: r.verbs for r in client.BatchV1Api().get_api_resources().resources}
    assert set(batch_resources["jobs"]) >= {"create", "get", "list", "watch", "delete", "patch"}
    assert [g.name for g in client.ApisApi().get_api_versions().groups] == ["batch"]
    assert client.CoreApi().get_api_versions().versions == ["v1"]

    for api_key in ({"authorization": "Bearer wrong"}, {}):
        configuration = client.Configuration(host=fake_cluster.url, api_key=api_key)
        status, body = api_error(lambda: client.BatchV1Api(client.ApiClient(configuration)).list_namespaced_job(NS))
        assert (status, body["reason"]) == (401, "Unauthorized")


def test_events_are_recorded_for_jobs(fake_cluster: FakeCluster) -> None:
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    batch.create_namespaced_job(NS, job_body("ev", "print(1)"))
    fake_cluster.wait_idle()
    events = core.list_namespaced_event(NS, field_selector="involvedObject.name=ev").items
    pod = fake_cluster.pods_of("ev")[0]["metadata"]["name"]
    assert [(e.reason, e.message) for e in events] == [("SuccessfulCreate", f"Created pod: {pod}"),
                                                       ("Completed", "Job completed")]
    created = core.create_namespaced_event(NS, {"metadata": {"name": "mine"}, "involvedObject": {"kind": "Job",
                                                                                                   "name": "ev"},
                                                "reason": "Tested", "message": "by a test"})
    assert created.involved_object.namespace == NS and created.count == 1


def test_restart_policy_on_failure_restarts_in_the_same_pod(fake_cluster: FakeCluster, tmp_path) -> None:
    batch = client.BatchV1Api()
    code = (f"import os, sys\np = {str(tmp_path / 'm')!r}\nif os.path.exists(p): print('second'); sys.exit(0)\n"
            "open(p, 'w').close(); print('first'); sys.exit(5)")
    batch.create_namespaced_job(NS, job_body("onfail", code, restart_policy="OnFailure", backoffLimit=2))
    fake_cluster.wait_idle()
    job = batch.read_namespaced_job("onfail", NS)
    assert conditions(job)[-1] == ("Complete", "True", "CompletionsReached")
    [pod] = fake_cluster.pods_of("onfail")
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1 and status["lastState"]["terminated"]["exitCode"] == 5
    name = pod["metadata"]["name"]
    core = client.CoreV1Api()
    assert core.read_namespaced_pod_log(name, NS) == "second\n"
    assert core.read_namespaced_pod_log(name, NS, previous=True) == "first\n"


def test_followed_log_streams_until_the_container_ends(fake_cluster: FakeCluster) -> None:
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    code = "import time\nprint('a', flush=True)\ntime.sleep(0.5)\nprint('b', flush=True)"
    batch.create_namespaced_job(NS, job_body("follow", code))
    pod = wait_for(lambda: [p for p in fake_cluster.pods_of("follow") if p["status"]["phase"] == "Running"])[0]
    lines = list(watch.Watch().stream(core.read_namespaced_pod_log, pod["metadata"]["name"], NS))
    assert lines == ["a", "b"]


def test_job_spec_is_immutable_and_updates_are_optimistic(fake_cluster: FakeCluster) -> None:
    batch = client.BatchV1Api()
    created = batch.create_namespaced_job(NS, job_body("frozen", "print(1)", suspend=True))
    status, body = api_error(lambda: batch.patch_namespaced_job("frozen", NS, {"spec": {"template": {"spec": {
        "containers": [{"name": "main", "image": "other:1"}]}}}}))
    assert (status, body["reason"]) == (422, "Invalid")
    assert body["details"]["causes"][0]["field"] == "spec.template"
    assert "field is immutable" in body["details"]["causes"][0]["message"]

    code, merged, _ = raw_request("PATCH", "/apis/batch/v1/namespaces/default/jobs/frozen",
                                  {"spec": {"backoffLimit": 2}}, content_type="application/merge-patch+json")
    assert code == 200 and merged["spec"]["backoffLimit"] == 2 and merged["metadata"]["generation"] == 2
    code, patched, _ = raw_request("PATCH", "/apis/batch/v1/namespaces/default/jobs/frozen",
                                   [{"op": "replace", "path": "/spec/backoffLimit", "value": 3}],
                                   content_type="application/json-patch+json")
    assert code == 200 and patched["spec"]["backoffLimit"] == 3

    stale = batch.api_client.sanitize_for_serialization(created)  # its resourceVersion is out of date now
    stale["spec"]["backoffLimit"] = 4
    code, conflict, _ = raw_request("PUT", "/apis/batch/v1/namespaces/default/jobs/frozen", stale)
    assert (code, conflict["reason"]) == (409, "Conflict")
    current = batch.read_namespaced_job("frozen", NS)
    current.spec.backoff_limit = 4
    replaced = batch.replace_namespaced_job("frozen", NS, current)
    assert replaced.spec.backoff_limit == 4
    assert int(replaced.metadata.resource_version) > int(current.metadata.resource_version)


def test_generate_name_and_ttl_after_finished(fake_cluster: FakeCluster) -> None:
    batch, core = client.BatchV1Api(), client.CoreV1Api()
    body = job_body("unused", "print(1)", ttlSecondsAfterFinished=0)
    body["metadata"] = {"generateName": "gen-"}
    job = batch.create_namespaced_job(NS, body)
    assert re.fullmatch(f"gen-{POD_NAME_SUFFIX}", job.metadata.name)
    assert job.spec.template.metadata.labels["job-name"] == job.metadata.name
    rv = job.metadata.resource_version
    fake_cluster.wait_idle()
    # Finished, then deleted by the TTL controller with its pods (Background propagation).
    assert fake_cluster.get("jobs", job.metadata.name) is None
    assert core.list_namespaced_pod(NS, label_selector=f"job-name={job.metadata.name}").items == []
    history = [(e["type"], conditions(e["object"])[-1:] if e["object"].status else [])
               for e in watch.Watch().stream(batch.list_namespaced_job, NS, resource_version=rv, timeout_seconds=1)]
    assert history[-2:] == [("MODIFIED", [("Complete", "True", "CompletionsReached")]),
                            ("DELETED", [("Complete", "True", "CompletionsReached")])]


def test_start_error_for_a_missing_executable(fake_cluster: FakeCluster) -> None:
    batch = client.BatchV1Api()
    body = job_body("noexec", "", backoffLimit=0, container={"command": ["/nonexistent/tool"]})
    batch.create_namespaced_job(NS, body)
    fake_cluster.wait_idle()
    assert conditions(batch.read_namespaced_job("noexec", NS))[-1] == ("Failed", "True", "BackoffLimitExceeded")
    terminated = fake_cluster.pods_of("noexec")[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("StartError", 128)
    assert '"/nonexistent/tool"' in terminated["message"]


def _failed_pod(exit_code: int, container: str = "main", conditions_: list[str] = ()) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "ns"},
            "status": {"phase": "Failed" if exit_code else "Succeeded",
                       "conditions": [{"type": c, "status": "True"} for c in conditions_],
                       "containerStatuses": [{"name": container, "state": {"terminated": {"exitCode": exit_code}}}]}}


@pytest.mark.parametrize(("rules", "pod", "expected"), [
    ([{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2, 3]}}], _failed_pod(3), ("FailJob", 0)),
    ([{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}], _failed_pod(3), None),
    ([{"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [1]}}], _failed_pod(0), None),
    ([{"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [1]}}], _failed_pod(4), ("FailJob", 0)),
    ([{"action": "FailJob", "onExitCodes": {"containerName": "other", "operator": "In", "values": [4]}}],
     _failed_pod(4), None),
    ([{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
      {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [143]}}],
     _failed_pod(143, conditions_=["DisruptionTarget"]), ("Ignore", 0)),
    ([{"action": "Count", "onExitCodes": {"operator": "In", "values": [143]}},
      {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}],
     _failed_pod(143, conditions_=["DisruptionTarget"]), ("Count", 0)),
])
def test_pod_failure_policy_first_matching_rule_wins(rules, pod, expected) -> None:
    match = match_pod_failure_policy({"rules": rules}, pod)
    assert (None if match is None else (match.action, match.index)) == expected


def test_count_finished_pods_applies_the_policy() -> None:
    spec = {"podFailurePolicy": {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]}}
    tally = count_finished_pods(spec, [_failed_pod(0), _failed_pod(1), _failed_pod(143, conditions_=["DisruptionTarget"]),
                                       _failed_pod(2)])
    assert (tally.succeeded, tally.failed, tally.ignored) == (1, 2, [("p", 0)])
    assert tally.failure == ("PodFailurePolicy", "Container main for pod ns/p failed with exit code 2 matching "
                                                 "FailJob rule at index 1")
