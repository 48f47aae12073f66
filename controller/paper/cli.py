"""`nexlify paper`'s command line (torch-free: the service it starts is imported when it runs)."""

from __future__ import annotations

import argparse
import json

from nexlify.configtools import check_bounds


def add_parser(sub: argparse._SubParsersAction) -> None:
    from nexlify.paper.settings import PaperSettings

    d = PaperSettings()
    pa = sub.add_parser("paper", help="paper trading: the model on live closed candles with simulated money (no "
                        "order is ever sent)")
    pa.add_argument("--model", required=True, help="checkpoint: a .pt path or s3://bucket/key; or a pipeline's "
                    "output (folder or s3://bucket/prefix): the final model of its summary")
    pa.add_argument("--output", default="./paper", help="folder or s3://bucket/prefix for the session's journal "
                    "and snapshots; an output holding a session resumes it (default: %(default)s)")
    pa.add_argument("--initial-equity", type=float, help="simulated money per pair's portfolio, in quote "
                    "currency (default: the checkpoint's env.initial_equity)")
    pa.add_argument("--exchange-url", help="base URL of a local replay of the exchange's public REST API "
                    "(default: the exchange itself)")
    pa.add_argument("--until", help="stop once the bar opening at this UTC time is journaled (default: run on)")
    pa.add_argument("--poll-seconds", type=float, default=d.poll_s, help="longest wait between two looks at "
                    "the exchange (default: %(default)s)")
    pa.add_argument("--grace-seconds", type=float, default=d.grace_s, help="/healthz fails when the last closed "
                    "candle is older than one timeframe plus this (default: %(default)s)")
    pa.add_argument("--max-tries", type=int, default=d.max_tries, help="tries per exchange request on network "
                    "errors, with exponential backoff (default: %(default)s)")
    pa.add_argument("--backoff-seconds", type=float, default=d.backoff_s, help="first backoff wait, doubled each "
                    "try up to 60 s (default: %(default)s)")
    pa.add_argument("--candle-tries", type=int, default=d.candle_tries, help="looks for a missing candle before "
                    "its bar is decided without it (default: %(default)s)")
    pa.add_argument("--snapshot-every", type=int, default=d.snapshot_every, help="bars between two snapshots "
                    "(default: %(default)s)")
    pa.add_argument("--session-per-model", action="store_true", help="journal under <output>/<the checkpoint's "
                    "sha256, 16 hex digits>/, so that a new model (a retrained pipeline's) starts its own session")
    pa.add_argument("--metrics-host", default=d.metrics_host, help="address of /metrics and /healthz "
                    "(default: %(default)s)")
    pa.add_argument("--metrics-port", type=int, default=d.metrics_port, help="port of /metrics and /healthz; 0: "
                    "none (default: %(default)s)")
    pa.set_defaults(handler=cmd_paper)


def cmd_paper(args: argparse.Namespace) -> int:
    from controller.paper.service import PaperService
    from nexlify.paper.settings import PaperSettings

    check_bounds("--poll-seconds", args.poll_seconds, 0.0, 3600.0)
    check_bounds("--grace-seconds", args.grace_seconds, 0.0, 86400.0)
    check_bounds("--max-tries", args.max_tries, 1, 100)
    check_bounds("--backoff-seconds", args.backoff_seconds, 0.0, 60.0)
    check_bounds("--candle-tries", args.candle_tries, 1, 100)
    check_bounds("--snapshot-every", args.snapshot_every, 1, 1_000_000)
    check_bounds("--metrics-port", args.metrics_port, 0, 65535)
    settings = PaperSettings(exchange_url=args.exchange_url, initial_equity=args.initial_equity, until=args.until,
                             poll_s=args.poll_seconds, grace_s=args.grace_seconds, max_tries=args.max_tries,
                             backoff_s=args.backoff_seconds, candle_tries=args.candle_tries,
                             snapshot_every=args.snapshot_every, metrics_host=args.metrics_host,
                             metrics_port=args.metrics_port, session_per_model=args.session_per_model)
    import signal
    import sys

    # SIGTERM (a pod stopped) unwinds like an exit: the lease is released and the metrics server closed; the
    # journal holds whole lines only, whenever it comes
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    result = PaperService(args.model, args.output, settings).run()
    print(json.dumps(result))
    return 0
