"""Wiring: a PipelineConfig becomes a store, an executor and a Pipeline; events also go to training.log."""

from __future__ import annotations

import os
import tempfile

from controller.config import PipelineConfig, pipeline_hash
from controller.pipeline import Pipeline
from controller.stores import open_store
from nexlify import logs

LOG_KEY = "training.log"


def make_executor(cfg: PipelineConfig, pipeline_id: str):
    if cfg.executor == "kubernetes":
        from controller.executors.kubernetes import KubernetesExecutor

        return KubernetesExecutor(cfg.kubernetes, pipeline_id=pipeline_id)
    from controller.executors.local import LocalExecutor

    return LocalExecutor(cfg.parallel)


def run_pipeline(cfg: PipelineConfig, *, force: bool = False) -> dict:
    store = open_store(cfg.output)
    executor = make_executor(cfg, pipeline_hash(cfg)[:8])
    pipeline = Pipeline(cfg, store, executor, force=force)
    # training.log: appended across resumes; kept in a local temp file and published after each phase.
    fd, log_path = tempfile.mkstemp(prefix="nexlify-training-", suffix=".log")
    os.close(fd)
    try:
        previous = store.read_bytes(LOG_KEY)
    except FileNotFoundError:
        previous = b""
    with open(log_path, "wb") as fh:
        fh.write(previous)
    fh = open(log_path, "a", buffering=1)
    logs.add_file(fh)
    try:
        pipeline.on_transition = lambda: store.upload_file(LOG_KEY, log_path)
        return pipeline.run()
    finally:
        logs.remove_files()
        fh.close()
        try:
            store.upload_file(LOG_KEY, log_path)
        finally:
            os.unlink(log_path)
            executor.close()
