"""The warm launcher (controller.executors.prefork): a forked worker behaves as a fresh `python -m` process
would (its output, exit code, threads and atexit handlers, signals, its own session), and nothing outlives
the launcher or the controller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from controller.executors.prefork import Launcher, gpu_device_nodes, supported
from tests.pipeline_support import REPO, alive

forking = pytest.mark.skipif(not supported(), reason="the launcher forks: Linux without a GPU only")

TARGETS = "tests.prefork_targets"


@pytest.fixture(scope="module")
def launcher():
    env = dict(os.environ, PYTHONPATH=str(REPO), NEXLIFY_LOG_FORMAT="json")
    started = Launcher(env)
    assert started.ready(), started.error
    yield started
    started.close()


def without_timestamps(stderr: str) -> list[dict]:
    events = [json.loads(line) for line in stderr.splitlines()]
    for event in events:
        event.pop("timestamp")
    return events


def run(launcher: Launcher, argv: list[str], main: str) -> tuple[int, str]:
    forked = launcher.spawn(argv, main=main)
    with forked.stderr:
        err = forked.stderr.read()
    return forked.wait(timeout=60), err


@forking
def test_a_forked_worker_answers_bad_input_exactly_as_a_fresh_process(launcher, tmp_path):
    args = ["worker", "train", "--episodes", "-3", "--out", str(tmp_path / "out")]
    fresh = subprocess.run([sys.executable, "-m", "controller", *args], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, NEXLIFY_LOG_FORMAT="json"), cwd=REPO)
    code, err = run(launcher, args, "controller.cli:main")
    assert fresh.returncode == 2 and "-3" in fresh.stderr
    assert code == fresh.returncode
    assert without_timestamps(err) == without_timestamps(fresh.stderr)
    assert not (tmp_path / "out").exists()


@forking
@pytest.mark.parametrize("target, argv, code, last_line", [
    ("exit_with", ["0"], 0, None),
    ("exit_with", ["7"], 7, None),
    ("raise_error", ["boom"], 1, "RuntimeError: boom"),  # the traceback, as the interpreter prints it
    ("exit_with_message", ["no such model"], 1, "no such model"),  # sys.exit("...") prints it, exit code 1
    ("interrupted", [], -signal.SIGINT, "KeyboardInterrupt"),  # the interpreter dies by SIGINT
])
def test_exit_codes_and_last_words_as_the_interpreter_gives_them(launcher, target, argv, code, last_line):
    got, err = run(launcher, argv, f"{TARGETS}:{target}")
    assert got == code
    if last_line is None:
        assert err == ""
    else:
        assert err.splitlines()[-1] == last_line
        if target in ("raise_error", "interrupted"):
            assert err.startswith("Traceback (most recent call last):")


@forking
def test_on_exit_threads_are_joined_and_atexit_handlers_run(launcher, tmp_path):
    marker = tmp_path / "late"
    code, err = run(launcher, [str(marker)], f"{TARGETS}:late_thread_and_atexit")
    assert code == 0 and marker.read_text() == "written"
    assert err == "goodbye from atexit\n"


@forking
def test_a_worker_has_its_own_session_and_ends_by_signal_with_its_code(launcher):
    forked = launcher.spawn([], main=f"{TARGETS}:sleep_until_signalled")
    assert forked.stderr.readline() == "sleeping\n"
    assert os.getsid(forked.pid) == forked.pid  # Ctrl-C on the controller's terminal does not reach it
    assert forked.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        forked.wait(timeout=0.2)
    forked.terminate()
    assert forked.wait(timeout=30) == -signal.SIGTERM  # as subprocess.Popen.returncode says it
    forked.stderr.close()


@forking
def test_a_killed_launcher_takes_its_workers_with_it():
    own = Launcher(dict(os.environ, PYTHONPATH=str(REPO)))
    assert own.ready(), own.error
    forked = own.spawn([], main=f"{TARGETS}:sleep_until_signalled")
    assert forked.stderr.readline() == "sleeping\n"
    own.process.kill()  # SIGKILL: no cleanup; the worker's PDEATHSIG ends it
    assert forked.wait(timeout=30) == -signal.SIGTERM
    assert not alive(forked.pid)
    with pytest.raises(OSError, match="launcher ended"):
        own.spawn([], main=f"{TARGETS}:exit_with")
    own.close()
    forked.stderr.close()


@forking
def test_closing_a_launcher_still_importing_does_not_wait_for_its_imports():
    own = Launcher(dict(os.environ, PYTHONPATH=str(REPO)))
    t0 = time.monotonic()
    own.close()
    assert time.monotonic() - t0 < 5
    assert own.process.returncode == -signal.SIGKILL
    own.close()  # twice: nothing happens


@pytest.mark.parametrize("nodes, forks", [
    ([], True),
    (["null", "nvidiactl", "nvidia-uvm"], True),  # the driver's control nodes alone: no device
    (["nvidia0"], False),
    (["nvidiactl", "nvidia3"], False),
    (["kfd"], False),  # AMD ROCm
])
def test_with_a_gpu_each_worker_is_a_fresh_process(tmp_path, nodes, forks):
    for name in nodes:
        (tmp_path / name).touch()
    assert supported(str(tmp_path)) is forks
    assert bool(gpu_device_nodes(str(tmp_path))) is not forks


@forking
def test_an_executor_whose_launcher_died_starts_fresh_processes_and_says_so(tmp_path):
    """Both ways give a run the same outcome: here a config that does not exist (exit 2, its cause)."""
    from structlog.testing import capture_logs

    from controller.executors.base import RunSpec
    from controller.executors.local import LocalExecutor

    missing = str(tmp_path / "no-such-config.json")
    outcomes = {}
    for how in ("forked", "launcher killed"):
        executor = LocalExecutor(1, progress=False)
        assert executor._launcher is not None
        if how == "launcher killed":
            executor._launcher.process.kill()
        spec = RunSpec(run_key="init-1", phase="initial", seed=1, episodes=1, config_url=missing,
                       data_url=str(tmp_path / "data"), output_url=str(tmp_path / how / "run_1"), checkpoint_every=0)
        with capture_logs() as logs:
            [outcomes[how]] = executor.wait([executor.start(spec)])
        executor.close()
        warned = [e for e in logs if e["event"] == "worker_launcher_unavailable"]
        assert len(warned) == (how == "launcher killed"), warned
    forked, fresh = outcomes["forked"], outcomes["launcher killed"]
    assert not forked.succeeded and forked.details["exit_code"] == 2 and missing in forked.reason
    assert (fresh.succeeded, fresh.reason, fresh.details["exit_code"]) == (False, forked.reason, 2)


@forking
def test_one_launcher_serves_a_process_while_the_workers_environment_stays_the_same():
    from controller.executors import prefork

    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = prefork.shared(env)
    assert prefork.shared(dict(env)) is first  # the next fold's executor: the imports are done once
    other = prefork.shared(dict(env, NEXLIFY_TEST_MARK="1"))
    assert other is not first and first.process.poll() is not None  # the old one closed
    other.process.kill()
    other.process.wait()
    third = prefork.shared(dict(env, NEXLIFY_TEST_MARK="1"))
    assert third is not other and third.alive()  # a dead one is replaced
    assert third.ready(), third.error
    sleeper = third.spawn([], main=f"{TARGETS}:sleep_until_signalled")
    assert sleeper.stderr.readline() == "sleeping\n"
    fourth = prefork.shared(env)  # another environment while a worker of the third still runs
    assert fourth is not third and third.alive() and sleeper.poll() is None  # the third is left running
    sleeper.terminate()
    assert sleeper.wait(timeout=30) == -signal.SIGTERM
    sleeper.stderr.close()
    for launcher in (third, fourth):
        launcher.close()
        assert not launcher.alive()


@forking
def test_the_reports_evaluation_falls_back_to_a_fresh_process_when_the_launcher_is_gone(tmp_path):
    """A missing model: the evaluation process says so and exits 2, forked or not; a dead launcher changes
    nothing but where the process comes from."""
    from controller import report
    from nexlify.errors import InputError

    dead = Launcher(dict(os.environ, PYTHONPATH=str(REPO)))
    dead.process.kill()
    dead.process.wait()
    args = [str(tmp_path / "no-model.pt"), str(tmp_path / "no-data")]
    errors = []
    for launcher in (dead, None):
        with pytest.raises(InputError) as caught:
            report._child("nexlify.report.final_model", args, "the final model's evaluation", launcher)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "no-model.pt" in errors[0]
    dead.close()
