"""`nexlify paper`'s settings besides the model and the output: the CLI's flags and their defaults, in a module
without torch (the command line is built by controllers that never import it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PaperSettings:
    """What `nexlify paper` takes besides the model and the output (the CLI's flags)."""

    exchange_url: str | None = None  # a local replay of the exchange's REST API (None: the exchange itself)
    initial_equity: float | None = None  # None: the checkpoint's env.initial_equity
    until: str | None = None  # stop once the bar opening at this time is journaled (None: run for ever)
    poll_s: float = 30.0  # the longest wait between two looks at the exchange
    grace_s: float = 300.0  # /healthz tolerates the last closed candle this late beyond one timeframe
    max_tries: int = 5  # exchange calls tried per request (NetworkError family), with backoff
    backoff_s: float = 1.0  # the first wait; doubled each try, at most 60 s
    candle_tries: int = 5  # looks for a missing candle (waits 1, 2, 4, 8 s at backoff 1 s) before its bar is decided without it
    snapshot_every: int = 24  # bars between two snapshots
    metrics_host: str = "0.0.0.0"  # noqa: S104 (a pod's metrics port must answer the cluster)
    metrics_port: int = 9108  # 0: no HTTP server
    device: str = "cpu"
    session_per_model: bool = False  # the journal in <output>/<the checkpoint's sha256, 16 hex digits>/
