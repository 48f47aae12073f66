"""Wiring: a PipelineConfig becomes a store, an executor and a Pipeline; events also go to training.log."""

from __future__ import annotations

import os
import tempfile

from controller.config import PipelineConfig, pipeline_hash, pipeline_id
from controller.lease import new_holder, open_lease
from controller.pipeline import Pipeline
from controller.stores import Store, open_store
from nexlify import logs

LOG_KEY = "training.log"


def make_executor(cfg: PipelineConfig, pipeline_id: str, config_hash: str = ""):
    if cfg.executor == "kubernetes":
        from controller.executors.kubernetes import KubernetesExecutor

        return KubernetesExecutor(cfg.kubernetes, pipeline_id=pipeline_id, config_hash=config_hash)
    from controller.executors.local import LocalExecutor

    return LocalExecutor(cfg.parallel, algorithm=cfg.train.agent.algorithm)


def run_pipeline(cfg: PipelineConfig, *, force: bool = False) -> dict:
    store = open_store(cfg.output)
    # The Jobs' identity covers the output too: one config run to two prefixes never shares a Job.
    executor = make_executor(cfg, pipeline_id(cfg, store.root_url), pipeline_hash(cfg))
    pipeline = Pipeline(cfg, store, executor, force=force)
    lease = open_lease(store, new_holder(command="train"))
    try:
        # Another config's output is refused here, before anything (training.log included) is written;
        # then the output is locked: one live controller per output (a second one exits 2).
        pipeline.check_output()
        lease.acquire()
    except BaseException:
        executor.close()
        raise
    pipeline.lease = lease
    try:
        return _run_locked(pipeline, store, executor)
    finally:
        lease.release()


def _run_locked(pipeline: Pipeline, store: Store, executor) -> dict:
    try:
        starting_over = pipeline.check_output()  # again, under the lock: the state may have changed meanwhile
    except BaseException:
        executor.close()
        raise
    try:
        previous = b"" if starting_over else store.read_bytes(LOG_KEY)
    except FileNotFoundError:
        previous = b""
    training_log = TrainingLog(store, previous)
    logs.add_file(training_log.fh)
    try:
        pipeline.on_transition = training_log.publish
        return pipeline.run()
    finally:
        try:
            executor.close()  # stops workers still going (Ctrl-C, SIGTERM, an error): their last events are logged
        finally:
            logs.remove_files()
            try:
                training_log.publish()
            finally:
                training_log.fh.close()


class TrainingLog:
    """training.log: this start's events appended to the previous starts'. Kept in an anonymous temporary
    file (it disappears with the process, even after kill -9, so crashed starts leave nothing in /tmp)
    and published to the store after every transition and at the end."""

    def __init__(self, store: Store, previous: bytes) -> None:
        self.store = store
        self.fh = tempfile.TemporaryFile(mode="w+", encoding="utf-8", buffering=1)
        self.fh.write(previous.decode("utf-8", errors="replace"))

    def publish(self) -> None:
        self.fh.flush()
        fd = self.fh.fileno()
        # pread leaves the file offset alone, so relay threads may keep appending meanwhile
        self.store.write_bytes(LOG_KEY, os.pread(fd, os.fstat(fd).st_size, 0))
