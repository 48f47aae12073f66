"""The `nexlify train` / `nexlify preflight` command line, as real processes.

Bad input: exit code 2, exactly one `error:` line naming the bad value, and nothing written (the output
folder does not even exist afterwards). The bad-input cases are launched together once (a module
fixture) and each parametrized test checks its own case, which keeps the file fast on 2 cores.
Then: presets and files against flags, the `nexlify-train` alias, and the preflight table.
"""

from __future__ import annotations

import json
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from controller.config import PipelineConfig, quick_test_preset
from tests.pipeline_support import REPO, child_env, error_lines, non_json_lines, read_json, run_cli

NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}  # `--device cuda` must fail the same way on a GPU machine


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


# (case id, extra args, files to write {name: text}, extra env, strings the error line must contain)
PORT = closed_port()
BAD_INPUT = [
    ("negative-episodes", ["--initial-episodes", "-5"], {}, {}, ["--initial-episodes", "-5"]),
    ("negative-retrain-episodes", ["--retrain-episodes", "-1"], {}, {}, ["--retrain-episodes", "-1"]),
    ("threshold-below-0", ["--improvement-threshold", "-0.5"], {}, {}, ["--improvement-threshold", "-0.5"]),
    ("stop-loss-1", ["--stop-loss", "1"], {}, {}, ["--stop-loss", "1.0"]),
    ("stop-loss-above-1", ["--stop-loss", "1.5"], {}, {}, ["--stop-loss", "1.5"]),
    ("not-a-number", ["--initial-runs", "three"], {}, {}, ["three"]),
    ("unknown-pair", ["--pairs", "DOGE/USDT"], {}, {},
     ["DOGE/USDT", "the bundled sample", "`nexlify data fetch --exchange binance --pairs DOGE/USDT --timeframe 1h "
      "--since 2023-06-01 --until 2025-06-01 --cache-dir ./data`, then pass --data-dir ./data"]),
    ("output-is-a-file", ["--output", "{tmp}/afile"], {"afile": "not a folder\n"}, {},
     ["--output {tmp}/afile is a file, not a folder"]),
    ("output-under-a-file", ["--output", "{tmp}/afile/out"], {"afile": "not a folder\n"}, {},
     ["--output {tmp}/afile/out", "is a file, not a folder"]),
    ("unknown-exchange-data", ["--exchange", "kraken"], {}, {}, ["kraken"]),
    ("val-days-too-large", ["--val-days", "1000"], {}, {}, ["1000", "val_days"]),
    ("unreachable-bucket", ["--output", "s3://nexlify-none/prefix"], {},
     {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORT}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
      "AWS_DEFAULT_REGION": "us-east-1"}, [f"127.0.0.1:{PORT}"]),
    ("unknown-yaml-key", ["--config", "{tmp}/bad.yaml"], {"bad.yaml": "initial_runs: 2\nbogus_setting: 3\n"}, {},
     ["bogus_setting"]),
    ("unknown-yaml-key-in-section", ["--config", "{tmp}/bad.yaml"], {"bad.yaml": "risk:\n  stop_los: 0.1\n"}, {},
     ["stop_los"]),
    ("bad-value-in-yaml", ["--config", "{tmp}/bad.yaml"], {"bad.yaml": "risk:\n  stop_loss: 2\n"}, {},
     ["--stop-loss", "2"]),
    ("malformed-yaml", ["--config", "{tmp}/bad.yaml"], {"bad.yaml": "initial_runs: [2\npatience: 3\n"}, {},
     ["{tmp}/bad.yaml", "not valid YAML"]),
    ("missing-yaml", ["--config", "{tmp}/missing.yaml"], {}, {}, ["{tmp}/missing.yaml"]),
    ("yaml-is-a-folder", ["--config", "{tmp}"], {}, {}, ["--config {tmp}", "cannot be read"]),
    ("yaml-not-a-mapping", ["--config", "{tmp}/list.yaml"], {"list.yaml": "- 1\n- 2\n"}, {}, ["mapping", "list"]),
    ("device-cuda-without-cuda", ["--device", "cuda"], {}, NO_CUDA, ["--device cuda"]),
    # every count has an upper bound: a typo never starts a run that does not end
    ("episodes-beyond-bound", ["--initial-episodes", "99999999999999999999999"], {}, {},
     ["--initial-episodes", "99999999999999999999999", "[1, 1000000]"]),
    ("batch-size-beyond-bound", ["--batch-size", "100000000"], {}, {}, ["--batch-size", "[1, 65536]"]),
    ("patience-beyond-bound", ["--patience", "5000"], {}, {}, ["--patience", "[1, 1000]"]),
    # one YAML, one value per setting: never last-wins
    ("yaml-duplicated-key", ["--config", "{tmp}/dup.yaml"], {"dup.yaml": "initial_runs: 2\ninitial_runs: 3\n"}, {},
     ["'initial_runs' appears twice", "lines 1 and 2"]),
    ("yaml-flat-and-nested", ["--config", "{tmp}/both.yaml"],
     {"both.yaml": "stop_loss: 0.02\nrisk:\n  stop_loss: 0.03\n"}, {},
     ["'stop_loss' is set twice", "as 'stop_loss'", "in section 'risk'"]),
    # every number has an upper bound: none of these may start a run (each wrote files and failed in a worker)
    ("initial-equity-1e308", ["--initial-equity", "1e308"], {}, {}, ["--initial-equity", "1e+308", "out of range"]),
    ("learning-rate-1e300", ["--learning-rate", "1e300"], {}, {}, ["--learning-rate", "1e+300", "(0.0, 1.0]"]),
    ("drawdown-penalty-1e300", ["--drawdown-penalty", "1e300"], {}, {}, ["--drawdown-penalty", "[0.0, 1000.0]"]),
    ("take-profit-1e300", ["--take-profit", "1e300"], {}, {}, ["--take-profit", "[0.0, 100.0]"]),
    # a file the config names is read before anything is written (the workers would fail on it)
    ("utilization-csv-missing", ["--config", "{tmp}/util.yaml"],
     {"util.yaml": "lending:\n  utilization_csv: /nonexistent/util.csv\n"}, {},
     ["/nonexistent/util.csv", "does not exist", "timestamp,utilization"]),
    # YAML: no aliases (a 300-byte file expanding to gigabytes), sections are mappings, lists are lists
    ("yaml-alias-bomb", ["--config", "{tmp}/bomb.yaml"],
     {"bomb.yaml": "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                   "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\npairs: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"}, {},
     ["{tmp}/bomb.yaml", "line 2 uses a YAML alias", "anchors and aliases are refused"]),
    ("yaml-section-not-a-mapping", ["--config", "{tmp}/risk.yaml"], {"risk.yaml": "risk: 5\n"}, {},
     ["'risk' must be a mapping", "got 5"]),
    ("yaml-tolerations-a-string", ["--config", "{tmp}/k8s.yaml"], {"k8s.yaml": "kubernetes:\n  tolerations: x\n"},
     {}, ["'tolerations'", "must be a list of mapping", "got 'x'"]),
    ("yaml-huge-value", ["--config", "{tmp}/huge.yaml"], {"huge.yaml": f"initial_runs: {'x' * 100_000}\n"}, {},
     ["'initial_runs'", "must be an integer", "... (100002 characters)"]),
]


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory) -> dict:
    """Run every bad-input case at once: {case id: (completed process, tmp folder)}."""
    base = tmp_path_factory.mktemp("bad-input")

    def run(case):
        case_id, args, files, env, _ = case
        tmp = base / case_id
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text)
        args = [a.replace("{tmp}", str(tmp)) for a in args]
        if "--output" not in args:
            args += ["--output", str(tmp / "out")]
        got = run_cli(["train", "--pairs", "BTC/USDT", *args], env=env, timeout=120)
        return case_id, (got, tmp)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, BAD_INPUT))


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_exits_2_with_one_clear_line_and_writes_nothing(bad_input_results, case):
    case_id, _, _, _, named = case
    got, tmp = bad_input_results[case_id]
    assert got.returncode == 2, got.stderr
    lines = error_lines(got.stderr)
    assert len(lines) == 1, got.stderr
    for text in named:
        assert text.replace("{tmp}", str(tmp)) in lines[0], lines[0]
    assert "Traceback" not in got.stderr and len(lines[0]) < 2500  # a value echoed is cut at 200 characters
    assert non_json_lines(got.stderr) == []  # stderr is not a terminal: JSON mode, every line JSON
    assert not (tmp / "out").exists()  # not even an empty folder
    assert got.stdout == ""


def test_an_output_that_is_a_file_is_refused_before_anything_loads(bad_input_results):
    for case in ("output-is-a-file", "output-under-a-file"):
        got, tmp = bad_input_results[case]
        assert len(got.stderr.strip().splitlines()) == 1, got.stderr  # the error alone: no preflight, no data
        assert (tmp / "afile").read_text() == "not a folder\n"


def test_pairs_are_canonical_before_the_config_hash():
    from controller.config import pipeline_hash
    from nexlify.cli import build_config

    typed = [["btc/usdt"], ["BTC/USDT"], ["btc-usdt"], [" Btc/Usdt "]]
    cfgs = [build_config(PipelineConfig, None, None, {"pairs": pairs}) for pairs in typed]
    assert [c.train.data.pairs for c in cfgs] == [["BTC/USDT"]] * 4
    assert len({pipeline_hash(c) for c in cfgs}) == 1
    assert config_show("--pairs", "eth-usdt", "sol/usdt")["data"]["pairs"] == ["ETH/USDT", "SOL/USDT"]


# ------------------------------------------------------------------------------ presets, files, flags


def config_show(*args: str, cwd: Path | None = None) -> dict:
    got = run_cli(["config", "show", *args], timeout=60, cwd=str(cwd) if cwd else None)
    assert got.returncode == 0, got.stderr
    return yaml.safe_load(got.stdout)


def test_quick_test_preset_and_flags_win_over_it():
    preset = quick_test_preset()
    plain = config_show("--quick-test")
    assert plain["data"]["pairs"] == preset["pairs"] == ["BTC/USDT"]
    assert (plain["initial_runs"], plain["max_iterations"]) == (preset["initial_runs"], preset["max_iterations"])
    assert (plain["initial_episodes"], plain["retrain_episodes"]) == (preset["initial_episodes"], preset["retrain_episodes"])
    assert plain["env"]["num_envs"] == preset["num_envs"] and plain["checkpoint_every"] == preset["checkpoint_every"]
    assert plain["device"] == preset["device"] == "cpu"

    mixed = config_show("--quick-test", "--initial-runs", "3", "--num-envs", "8", "--pairs", "ETH/USDT", "SOL/USDT",
                        "--device", "auto")
    assert mixed["initial_runs"] == 3 and mixed["env"]["num_envs"] == 8 and mixed["device"] == "auto"
    assert mixed["data"]["pairs"] == ["ETH/USDT", "SOL/USDT"]
    assert mixed["max_iterations"] == preset["max_iterations"]  # what no flag names stays the preset's
    assert mixed["initial_episodes"] == preset["initial_episodes"]


def test_config_file_nested_and_flat_keys_and_flags_override_it(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "initial_runs": 4, "patience": 2, "improvement_threshold": 0.5,     # flat, pipeline level
        "risk": {"stop_loss": 0.03, "take_profit": 0.07},                   # nested section
        "max_trades": 5,                                                    # flat key of a section
        "data": {"pairs": ["ETH/USDT"], "val_days": 60},
    }))
    from_file = config_show("--config", str(path))
    assert (from_file["initial_runs"], from_file["patience"], from_file["improvement_threshold"]) == (4, 2, 0.5)
    assert from_file["risk"]["stop_loss"] == 0.03 and from_file["risk"]["take_profit"] == 0.07
    assert from_file["risk"]["max_trades"] == 5
    assert from_file["data"]["pairs"] == ["ETH/USDT"] and from_file["data"]["val_days"] == 60
    assert from_file["retrain_episodes"] == PipelineConfig().retrain_episodes  # untouched: the documented default

    flags = config_show("--config", str(path), "--patience", "6", "--stop-loss", "0.01", "--pairs", "SOL/USDT")
    assert flags["patience"] == 6 and flags["risk"]["stop_loss"] == 0.01 and flags["data"]["pairs"] == ["SOL/USDT"]
    assert flags["initial_runs"] == 4 and flags["risk"]["take_profit"] == 0.07  # the rest still from the file


def test_help_works():
    got = run_cli(["train", "--help"], timeout=60)
    assert got.returncode == 0, got.stderr
    assert "--improvement-threshold" in got.stdout and "--quick-test" in got.stdout


def test_nexlify_train_alias_runs_the_pipeline_with_preset_and_flags(tmp_path):
    out = tmp_path / "out"
    program = "import sys; from controller.cli import train_alias; sys.exit(train_alias())"
    args = ["--quick-test", "--initial-runs", "1", "--initial-episodes", "4", "--num-envs", "4", "--episode-bars", "200",
            "--max-iterations", "0", "--start", "2025-01-01", "--val-days", "20", "--output", str(out),
            "--log-format", "json"]
    import subprocess

    got = subprocess.run([sys.executable, "-c", program, *args], cwd=str(REPO), env=child_env(), capture_output=True,
                         text=True, timeout=180)
    assert got.returncode == 0, got.stderr[-3000:]
    printed = json.loads(got.stdout)
    summary = read_json(out / "complete_training_summary.json")
    assert printed["final_best_score"] == summary["final_best_score"]
    assert printed["stop_reason"] == summary["stop_reason"] == "max_iterations"
    cfg = summary["config"]
    assert (cfg["initial_runs"], cfg["initial_episodes"], cfg["env"]["num_envs"]) == (1, 4, 4)  # flags
    assert cfg["data"]["pairs"] == ["BTC/USDT"] and cfg["checkpoint_every"] == quick_test_preset()["checkpoint_every"]
    assert [r["seed"] for r in summary["initial_runs"]] == [42] and summary["retraining_iterations"] == []
    assert summary["final_model_key"] == summary["initial_runs"][0]["model_path"]
    assert summary["final_model_path"] == str(out / summary["final_model_key"])  # usable from anywhere


# ------------------------------------------------------------------------------ preflight


def preflight_rows(stderr: str) -> dict[str, tuple[str, str]]:
    """The preflight table: `preflight_check` JSON events (stderr is not a terminal here, so the command
    logs JSON and every line of it is JSON), or the printed table."""
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    checks = {e["check"]: (e["status"], e["detail"]) for e in events if e.get("event") == "preflight_check"}
    if checks:
        assert non_json_lines(stderr) == []
        return checks
    lines = stderr.splitlines()
    start = lines.index("preflight") + 1
    rows = {}
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        name, status, detail = line.split(None, 2)
        rows[name] = (status, detail)
    return rows


def test_preflight_passes_and_writes_nothing(tmp_path):
    got = run_cli(["preflight", "--pairs", "BTC/USDT", "--output", str(tmp_path / "out")], timeout=60)
    assert got.returncode == 0, got.stderr
    rows = preflight_rows(got.stderr)
    assert list(rows) == ["python", "output", "disk", "torch", "device", "data"]  # the output before anything loads
    assert {status for status, _ in rows.values()} == {"pass"}
    assert "17544 bars" in rows["data"][1]  # 2023-06-01 .. 2025-06-01 hourly: 731 days * 24
    assert error_lines(got.stderr) == []
    assert not (tmp_path / "out").exists()


def test_preflight_fails_with_a_table_and_exit_2(tmp_path):
    got = run_cli(["preflight", "--pairs", "BTC/USDT", "--device", "cuda", "--val-days", "1000",
                   "--output", str(tmp_path / "out")], timeout=60, env=NO_CUDA)
    assert got.returncode == 2
    rows = preflight_rows(got.stderr)
    assert rows["device"][0] == "FAIL" and "--device cuda" in rows["device"][1]
    assert rows["data"][0] == "FAIL" and "1000" in rows["data"][1]
    assert all(rows[name][0] == "pass" for name in ("python", "torch", "output", "disk"))  # every check ran
    lines = error_lines(got.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: preflight failed: device:")
    assert not (tmp_path / "out").exists()


def test_train_preflight_failure_is_one_line_and_the_table_only_with_verbose(tmp_path):
    base = ["train", "--pairs", "BTC/USDT", "--device", "cuda", "--output", str(tmp_path / "out")]
    cases = {"console": base + ["--log-format", "console"], "json": base + ["--log-format", "json"],
             "verbose": base + ["--log-format", "console", "--verbose"]}
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = dict(zip(cases, pool.map(lambda args: run_cli(args, timeout=120, env=NO_CUDA), cases.values())))
    assert {name: g.returncode for name, g in got.items()} == {"console": 2, "json": 2, "verbose": 2}
    # a terminal user: one error line and no table (the data check's own log events may come first)
    [line] = error_lines(got["console"].stderr)
    assert line.startswith("error: preflight failed: device:") and "--device cuda" in line
    assert got["console"].stderr.splitlines()[-1] == line
    assert "preflight" not in got["console"].stderr.splitlines() and " FAIL " not in got["console"].stderr
    # JSON mode: every line JSON, the failure one event, no table
    assert non_json_lines(got["json"].stderr) == []
    events = [json.loads(line) for line in got["json"].stderr.splitlines()]
    assert [e["event"] for e in events if e["level"] == "error"] == ["failed"] and events[-1]["exit_code"] == 2
    assert "preflight_check" not in {e["event"] for e in events}
    # --verbose: the table first, then the one error line
    lines = got["verbose"].stderr.splitlines()
    table = lines.index("preflight")
    assert lines[table + 5].split()[:2] == ["device", "FAIL"]  # python, output, disk, torch, device, ...
    assert error_lines(got["verbose"].stderr) == [line] and lines[-1] == line
    assert not (tmp_path / "out").exists()


BENCH_BAD = [
    (["bench", "env", "--batch-size", "0"], "--batch-size: 0"),
    (["bench", "env", "--batch-size", "-1"], "--batch-size: -1"),
    (["bench", "env", "--batch-size", "100000000000"], "--batch-size: 100000000000"),
    (["bench", "train", "--batch-size", "0"], "--batch-size: 0"),
    (["bench", "env", "--steps", "0"], "--steps: 0"),
    (["bench", "train", "--steps", "-5"], "--steps: -5"),
    (["worker", "train", "--episodes", "99999999999", "--out", "/nonexistent/x"], "--episodes: 99999999999"),
]


def test_bench_and_worker_counts_out_of_bounds_exit_2_with_one_line():
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: run_cli(case[0] + (["--log-format", "console"]
                                                                  if case[0][0] == "worker" else []),
                                                     timeout=120, env={"NEXLIFY_LOG_FORMAT": "console"}),
                                BENCH_BAD))
    for (args, named), got in zip(BENCH_BAD, results):
        assert got.returncode == 2, (args, got.stderr[-2000:])
        [line] = got.stderr.splitlines()
        assert line.startswith(f"error: {named} is out of range; accepted: an integer in ["), line
        assert got.stdout == ""


def test_an_oserror_reaching_main_is_one_line(monkeypatch, capsys):
    import errno

    import controller.cli as cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/model.pt")

    monkeypatch.setattr(cli, "cmd_config_schema", full_disk)
    assert cli.main(["config", "schema"]) == 1
    err = capsys.readouterr().err
    assert non_json_lines(err) == [] and error_lines(err) == ["error: No space left on device: /data/out/model.pt"]


@pytest.mark.parametrize("args, named", [
    (["train", "--seed"], "nexlify train: argument --seed: expected one argument"),
    (["train", "--no-such-flag"], "nexlify: unrecognized arguments: --no-such-flag"),
    (["backtest", "--walk-forward", "--log-format", "xml"], "nexlify backtest: argument --log-format: invalid choice"),
    (["bogus"], "nexlify: argument command: invalid choice: 'bogus'"),
])
def test_a_bad_command_line_is_one_line_with_a_hint_to_help(args, named):
    """argparse's own errors: one line (not the usage block of up to 80 lines before it), exit 2."""
    got = run_cli(args, timeout=60)
    assert got.returncode == 2 and got.stdout == ""
    [line] = got.stderr.splitlines()
    assert line.startswith("error: ") and named in line and line.endswith(" --help"), line
