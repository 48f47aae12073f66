"""TensorBoard curves of a run, written with tensorboardX (the standard event-file format that
`tensorboard --logdir` reads; tensorboardX needs only protobuf and numpy, where torch.utils.tensorboard
needs the whole `tensorboard` package) and read back from the same files for the report and the tests.

Tags (x axis: episodes trained in this run):
    train/episode_return    each episode's total return, % (step: the episode's number)
    train/round_return      the round's mean episode return, %
    train/epsilon           exploration rate at the round's end
    train/loss              mean Huber loss of the round's gradient steps
    q/mean_max              mean over the states acted on of the highest valid Q-value
    q/best_gap              mean gap between the best and the second-best valid action's Q-value
    checks/finite_share     share of the round's checked numbers (losses, rewards) that were finite
    val/<metric>, test/<metric>   the run's validation (and test) metrics, at the last episode
"""

from __future__ import annotations

import glob
import os
import struct
import sys
import time

EVENT_GLOB = "events.out.tfevents.*"
# The run's event file in its folder: a fixed name (tensorboard reads any file with "tfevents" in its name),
# so a run resumed elsewhere replaces it instead of adding a second, and outputs compare by name.
EVENTS_FILE = "events.out.tfevents.nexlify"
ROUND_TAGS = {"mean_return": "train/round_return", "epsilon": "train/epsilon", "loss": "train/loss",
              "q_max_mean": "q/mean_max", "q_gap_mean": "q/best_gap", "finite_share": "checks/finite_share"}
METRIC_KEYS = ("avg_return", "avg_sharpe", "avg_drawdown", "avg_win_rate", "total_trades", "score")


class RunBoard:
    """One run's curves. tensorboardX's EventsWriter writes them synchronously to a file in `logdir` (a local
    folder; the SummaryWriter would hand them to a background thread, and its flush does not wait for it,
    so a checkpoint could carry fewer events than its round wrote). `blob()` is what goes into the run's
    folder as EVENTS_FILE: the events a resumed run had before (carried in its resume checkpoint, so they stop
    exactly where the checkpoint does) followed by this process's. TFRecord files are sequences of
    self-framed records, so the two concatenated are one valid event file."""

    def __init__(self, logdir: str, previous: bytes | None = None) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self.previous = previous or b""
        self.writer = EventsWriter(os.path.join(logdir, "events"))
        self.closed = False

    def _scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        self.writer.write_event(Event(wall_time=time.time(), step=int(step), summary=scalar(tag, float(value))))

    def round(self, info: dict) -> None:
        """The training loop's on_round info: per-episode returns, then the round's statistics."""
        done = int(info["episodes_done"])
        returns = info.get("returns") or []
        for j, value in enumerate(returns):
            self._scalar("train/episode_return", value, done - len(returns) + j + 1)
        for key, tag in ROUND_TAGS.items():
            if info.get(key) is not None:
                self._scalar(tag, info[key], done)
        self.writer.flush()

    def metrics(self, prefix: str, metrics: dict | None, step: int) -> None:
        for key in METRIC_KEYS:
            if metrics and metrics.get(key) is not None:
                self._scalar(f"{prefix}/{key}", metrics[key], step)
        self.writer.flush()

    def blob(self) -> bytes:
        if not self.closed:
            self.writer.flush()
        parts = [self.previous]
        for path in sorted(glob.glob(os.path.join(self.logdir, EVENT_GLOB))):
            with open(path, "rb") as fh:
                parts.append(fh.read())
        return b"".join(parts)

    def close(self) -> None:
        if not self.closed:
            self.writer.close()
            self.closed = True


def _load_tensorboardx_without_torch() -> None:
    """Import tensorboardX in a process that has not imported torch, without importing it. tensorboardX's
    package imports torch whenever it can (its SummaryWriter accepts tensors) and falls back to numpy when
    it cannot; the controller reads event files for report.html and stays free of torch, so while the
    package loads, `import torch` is refused (a None in sys.modules makes it raise ImportError). A process
    that has torch (a worker) loads tensorboardX as usual."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tensorboardX  # noqa: F401
    finally:
        del sys.modules["torch"]


def read_records(blob: bytes) -> list[bytes]:
    """The records of a TFRecord file (the event file's framing): u64 length, masked crc32c of the length,
    the data, masked crc32c of the data. A record whose checksum is wrong raises ValueError; a torn last
    record (a file still being written) ends the list."""
    _load_tensorboardx_without_torch()
    from tensorboardX.crc32c import crc32c

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    out, pos = [], 0
    while pos + 12 <= len(blob):
        header = blob[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
        if masked(header) != header_crc:
            raise ValueError(f"event file: bad length checksum at byte {pos}")
        end = pos + 12 + length + 4
        if end > len(blob):
            break
        data = blob[pos + 12:pos + 12 + length]
        if masked(data) != struct.unpack("<I", blob[end - 4:end])[0]:
            raise ValueError(f"event file: bad data checksum at byte {pos}")
        out.append(data)
        pos = end
    return out


def read_scalars(blobs: list[bytes]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the bytes of one or more event files, in file order."""
    _load_tensorboardx_without_torch()
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for blob in blobs:
        for record in read_records(blob):
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return scalars
