"""The controller runs without torch in its own process.

It prepares and snapshots the data, runs preflight, starts and waits for the workers and draws
report.html; what needs torch runs in child processes: the workers, the torch/device probe of preflight
(nexlify.probe) and the final model's evaluation for the report (nexlify.report.final_model). Each check
runs in a fresh interpreter, whose sys.modules is the controller's own.
"""

from __future__ import annotations

import json
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import controller
from tests.pipeline_support import REPO, TINY, child_env, error_lines, non_json_lines, read_json, run_cli

# every module of the controller but the processes of their own that step a model: the worker (`nexlify worker
# train`), the paper trader's service and journal (`nexlify paper`) and a paper session's replay for the report
TORCH_PROCESSES = ("controller.worker", "controller.__main__", "controller.paper.service", "controller.paper.journal",
                   "controller.paper.report")
CONTROLLER_MODULES = sorted(
    m.name for m in pkgutil.walk_packages(controller.__path__, "controller.") if m.name not in TORCH_PROCESSES)
# the nexlify modules the controller process uses besides (on demand, inside functions)
NEXLIFY_MODULES = ["nexlify.cli", "nexlify.config", "nexlify.configtools", "nexlify.data.prepare", "nexlify.probe",
                   "nexlify.report", "nexlify.report.page", "nexlify.report.final_model", "nexlify.tb",
                   "nexlify.env.layout", "nexlify.metrics"]

TORCH_MODULES = "sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))"


def python(program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", program, *args], cwd=str(REPO), env=child_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def torch_modules_after_import(modules: list[str]) -> list[str]:
    got = python("import importlib, json, sys\n"
                 f"for name in {modules!r}:\n    importlib.import_module(name)\n"
                 f"print(json.dumps({TORCH_MODULES}))")
    assert got.returncode == 0, got.stderr
    return json.loads(got.stdout)


def test_the_controllers_modules_import_no_torch():
    assert "controller.pipeline" in CONTROLLER_MODULES and "controller.executors.local" in CONTROLLER_MODULES
    assert torch_modules_after_import(CONTROLLER_MODULES + NEXLIFY_MODULES) == []
    # the check sees torch where it is imported: the trainer, and the worker that runs it
    assert "torch" in torch_modules_after_import(["nexlify.training"])
    assert "torch" in torch_modules_after_import(["controller.worker"])


# `nexlify train` in this interpreter; then the torch modules it holds go to the file named by argv[1]
TRAIN_PROGRAM = f"""
import json, sys
from controller.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    json.dump({TORCH_MODULES}, fh)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, list[str]]:
    """One tiny pipeline (one run, no retraining) with its report, in an interpreter that records torch."""
    base = tmp_path_factory.mktemp("torch-free")
    out, record = base / "out", base / "torch_modules.json"
    tiny = list(TINY)
    for flag, value in (("--initial-runs", "1"), ("--max-iterations", "0")):
        tiny[tiny.index(flag) + 1] = value
    got = python(TRAIN_PROGRAM, str(record), "train", *tiny, "--parallel", "0", "--output", str(out),
                 "--log-format", "json", timeout=300)
    assert got.returncode == 0, got.stderr[-4000:]
    return out, got, json.loads(record.read_text())


def test_a_pipeline_and_its_report_run_in_a_controller_without_torch(trained):
    out, got, torch_modules = trained
    assert torch_modules == []
    summary = read_json(out / "complete_training_summary.json")
    assert summary["stop_reason"] == "max_iterations" and len(summary["initial_runs"]) == 1
    assert summary["versions"]["torch"]  # the worker's torch, recorded in its result.json
    page = (out / "report.html").read_text()
    assert "The final model on the validation and test windows" in page
    events = [json.loads(line) for line in got.stderr.splitlines() if line.startswith("{")]
    names = [e.get("event") for e in events]
    assert "report_written" in names and "report_failed" not in names
    # the evaluation process's events are relayed into the controller's log: it loaded the snapshot
    loaded = [e for e in events if e.get("event") == "market_loaded"
              and e.get("process") == "nexlify.report.final_model"]
    assert [(e["pairs"], e["bars"]) for e in loaded] == [(["BTC/USDT"], summary["data"]["bars"])]
    assert non_json_lines(got.stderr) == []


def test_a_final_model_that_cannot_be_loaded_fails_the_report_naming_it(trained, tmp_path):
    out, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    summary = read_json(copy / "complete_training_summary.json")
    summary.pop("final_model_sha256")  # a summary without the model's digest: the loader itself must refuse it
    (copy / "complete_training_summary.json").write_text(json.dumps(summary))
    (copy / summary["final_model_key"]).write_bytes(b"not a checkpoint")
    got = run_cli(["report", str(copy)], timeout=120)
    assert got.returncode == 2
    lines = error_lines(got.stderr)
    # named by where it lives in the output (not the temporary copy the evaluation process read)
    assert len(lines) == 1
    assert lines[0].startswith(f"error: checkpoint {copy / summary['final_model_key']} cannot be loaded safely")
    assert not (copy / "report.html").exists()
