"""What torch sees on this machine, asked of a child process so that the controller never imports torch:
torch's version and threads, the device a run with `--device NAME` would use, and the CUDA devices.

    python -m nexlify.probe NAME        one JSON object on stdout (describe(NAME))

`probe(NAME)` runs that child once per name and process and returns its object. The controller's
preflight shows it as the `torch` and `device` rows; the local executor sizes its default parallelism by
the CUDA devices.
"""

from __future__ import annotations

import json
import subprocess
import sys

from nexlify.errors import NexlifyError

PROBE_TIMEOUT_S = 300  # importing torch on a cold node with a slow disk can take a minute


def describe(name: str) -> dict:
    """{"torch": "2.13.0, 2 threads", "cuda_devices": n, "device": "cpu" | "cuda: NAME xN"}, with
    "device_error" (one line) in place of "device" when `--device NAME` cannot be used here, and only
    "torch_error" when torch cannot be imported. Runs in the child: imports torch."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - reported as the torch row's failure
        return {"torch_error": f"torch cannot be imported: {type(exc).__name__}: {exc}"}
    from nexlify.device import resolve_device

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out: dict = {"torch": f"{torch.__version__}, {torch.get_num_threads()} threads", "cuda_devices": cuda}
    try:
        dev = resolve_device(name)
    except Exception as exc:  # noqa: BLE001 - reported as the device row's failure
        out["device_error"] = str(exc)
        return out
    if dev.type == "cuda":
        out["device"] = f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        out["device"] = "cpu" + (" (no CUDA device found)" if name == "auto" else "")
    return out


_answers: dict[str, dict] = {}  # every probe's answer in this process, by device name


def probe(name: str) -> dict:
    """describe(name), computed in a child process (this one stays free of torch) once per name and process;
    NexlifyError with the child's last line when it fails."""
    if name not in _answers:
        _answers[name] = _ask_child(name)
    return _answers[name]


def cuda_devices() -> int:
    """The CUDA devices torch sees: from a probe this process already ran (for any device name: the count is
    the same), else from a probe of "auto". A child costs seconds (it imports torch); `nexlify train` asks
    for the device in preflight, then for the count when sizing the local executor."""
    found = next((a for a in _answers.values() if "cuda_devices" in a), None) or probe("auto")
    return int(found.get("cuda_devices") or 0)


def _ask_child(name: str) -> dict:
    try:
        child = subprocess.run([sys.executable, "-m", "nexlify.probe", name], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise NexlifyError(f"the torch probe did not answer within {PROBE_TIMEOUT_S} s") from None
    lines = child.stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1]) if child.returncode == 0 and lines else None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        tail = child.stderr.strip().splitlines()
        raise NexlifyError(f"the torch probe failed ({tail[-1] if tail else f'exit code {child.returncode}'})")
    return found


if __name__ == "__main__":
    print(json.dumps(describe(sys.argv[1])))
