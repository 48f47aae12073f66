"""Preflight: the checks `nexlify train` runs before any work, printed as a pass/fail table."""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable

from controller.config import PipelineConfig
from nexlify.errors import NexlifyError
from nexlify.probe import probe

MIN_FREE_BYTES = 1 << 30  # 1 GiB for checkpoints and logs of a local output


def checks(cfg: PipelineConfig) -> list[tuple[str, Callable[[], str]]]:
    """(name, check) pairs; a check returns a detail string or raises with the reason it failed."""

    def python() -> str:
        if sys.version_info < (3, 11):
            raise NexlifyError(f"Python {sys.version.split()[0]}; accepted: 3.11 or newer")
        return sys.version.split()[0]

    # torch and the device are asked of a child process (nexlify.probe): the controller imports no torch
    def torch_version() -> str:
        found = probe(cfg.train.device)
        if "torch_error" in found:
            raise NexlifyError(found["torch_error"])
        return found["torch"]

    def device() -> str:
        found = probe(cfg.train.device)
        if "torch_error" in found or "device_error" in found:
            raise NexlifyError(found.get("device_error") or found["torch_error"])
        return found["device"]

    def data() -> str:
        from nexlify.data.prepare import prepare_data

        market, windows = prepare_data(cfg.train)
        src = cfg.train.data.data_dir or "bundled sample"
        _named_files(cfg)
        return (f"{', '.join(market.pairs)} on {cfg.train.data.exchange} from {src}: {market.start_iso} .. "
                f"{market.end_iso}, {market.n_bars} bars (train {windows.train[1] - windows.train[0]}, "
                f"validation {windows.val[1] - windows.val[0]})")

    items = [("python", python), ("output", functools.partial(_output, cfg.output)),
             ("disk", functools.partial(_disk, cfg.output)), ("torch", torch_version), ("device", device),
             ("data", data)]
    if cfg.executor == "kubernetes":
        def kubernetes() -> str:
            from controller.executors.kubernetes import check_cluster

            return check_cluster(cfg.kubernetes)

        items.append(("kubernetes", kubernetes))
    return items


def _nearest_existing(path: str) -> str:
    """`path` or its nearest ancestor that exists: where a missing output folder would be created."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_local_output(output: str) -> None:
    """A local output that cannot be a folder (a file, or under one) refused before anything loads: InputError."""
    from controller.stores import is_s3_url
    from nexlify.errors import InputError

    if is_s3_url(output):
        return
    folder = os.path.abspath(output)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise InputError(f"--output {output} is a file, not a folder; accepted: a folder path or s3://bucket/prefix")
    parent = _nearest_existing(os.path.dirname(folder))
    if not os.path.isdir(parent):
        raise InputError(f"--output {output}: {parent} is a file, not a folder; accepted: a folder path")


def _named_files(cfg: PipelineConfig) -> None:
    """Every file the config names is read and checked now (by the same function the runs use), so a bad
    one is refused before anything is written or `--force` moves an output's results aside. A path in a
    cluster's config is the pods' (the image's or a volume's): it is checked where the workers run."""
    csv = cfg.train.lending.utilization_csv
    if csv is not None and cfg.executor == "local":
        from nexlify.strategies.utilization import load_utilization_csv

        load_utilization_csv(csv)


def _output(output: str) -> str:
    """The output can be written: a probe file written and deleted, or a missing folder creatable."""
    from controller.stores import is_s3_url, open_store

    store = open_store(output)
    if not is_s3_url(output) and not os.path.isdir(store.root_url):
        return _creatable_folder(store.root_url)
    store.check_writable()  # writes a probe and deletes it again
    return f"{store.root_url} writable"


def _disk(output: str) -> str:
    """At least MIN_FREE_BYTES free on the disk of a local output."""
    if output.startswith("s3://"):
        return "bucket output: local disk holds temporary files only"
    path = os.path.abspath(output)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise NexlifyError(f"{free / 2**30:.2f} GiB free at {path}; accepted: at least 1 GiB")
    return f"{free / 2**30:.1f} GiB free"


def _creatable_folder(folder: str) -> str:
    """Check that a missing output folder could be created, without creating it: preflight writes
    nothing, so a run refused for bad input leaves no empty folder behind."""
    if os.path.exists(folder):
        raise NexlifyError(f"output {folder} is a file, not a folder; accepted: a folder path or s3://bucket/prefix")
    parent = _nearest_existing(os.path.dirname(folder))
    if not os.path.isdir(parent):
        raise NexlifyError(f"output {folder}: {parent} is a file, not a folder; accepted: a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NexlifyError(f"output {folder}: {parent} is not writable; accepted: a folder you may write to")
    return f"{folder} will be created (in {parent}, writable)"


def run_preflight(cfg: PipelineConfig, *, print_table: bool = True) -> bool:
    """Run every check (all of them, even after a failure); with print_table, show the result (a table on
    a terminal, one JSON event per check in JSON mode). Returns whether all passed."""
    ok, rows, _ = preflight(cfg)
    if print_table:
        show_table(rows)
    return ok


def preflight(cfg: PipelineConfig) -> tuple[bool, list[tuple[str, str, str]], str | None]:
    """(all passed, rows (name, pass|FAIL, detail), the first failure as one line or None)."""
    rows, ok = [], True
    first_error: str | None = None
    for name, check in checks(cfg):
        try:
            rows.append((name, "pass", check()))
        except Exception as exc:  # a check's failure is a row in the table, not a crash
            ok = False
            rows.append((name, "FAIL", str(exc)))
            first_error = first_error or f"{name}: {exc}"
    return ok, rows, first_error


def show_table(rows: list[tuple[str, str, str]]) -> None:
    """The pass/fail table on stderr, or under JSON logging one `preflight_check` event per row (every
    line of JSON mode is JSON)."""
    from nexlify import logs

    if logs.json_mode():
        import structlog

        log = structlog.get_logger("nexlify.preflight")
        for name, status, detail in rows:
            (log.info if status == "pass" else log.error)("preflight_check", check=name, status=status, detail=detail)
        return
    width = max(len(r[0]) for r in rows)
    print("preflight", file=sys.stderr)
    for name, status, detail in rows:
        print(f"  {name:<{width}}  {status:<4}  {detail}", file=sys.stderr)
