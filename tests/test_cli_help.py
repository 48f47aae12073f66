"""Every command's --help renders (argparse formats help text with %, so a stray % breaks it)."""

import subprocess
import sys

import pytest

COMMANDS = [
    [], ["train"], ["preflight"], ["worker", "train"], ["evaluate"], ["data", "fetch"], ["data", "info"],
    ["bench", "env"], ["bench", "train"], ["bench", "learn"], ["config", "schema"], ["config", "show"], ["report"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "nexlify")
def test_help_renders(command: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "controller", *command, "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: nexlify")


def test_train_help_names_the_guide_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "controller", "train", "--help"], capture_output=True, text=True,
                         timeout=60)
    for flag in ("--pairs", "--initial-episodes", "--retrain-episodes", "--quick-test", "--automated",
                 "--initial-runs", "--improvement-threshold", "--patience", "--max-iterations", "--stop-loss",
                 "--take-profit", "--trailing-stop", "--max-position", "--max-trades", "--no-kelly", "--output",
                 "--config", "--exchange", "--data-dir", "--end", "--val-days", "--test-days", "--device",
                 "--parallel", "--checkpoint-every", "--force", "--log-format", "--executor", "--namespace"):
        assert flag in out.stdout, flag
