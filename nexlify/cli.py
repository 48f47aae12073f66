"""The trainer's own commands: `evaluate`, `data`, `bench`. (`train`, `worker` and `preflight` belong to the
pipeline, in controller.cli, which also assembles the `nexlify` command line.)"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from nexlify.config import ArbitrageConfig, DataConfig, EnvConfig, TrainConfig
from nexlify.configtools import apply_mapping, check_bounds, validate_tree


def add_commands(sub: argparse._SubParsersAction, bench_extra=None) -> None:
    """The trainer's commands; `bench_extra(bench_subparsers)` adds the bench commands that run pipelines
    (controller.bench_learn), which the controller owns."""
    # Defaults shared with training are the config dataclasses' own (one place): a fresh instance each, so a
    # parsed list is never the dataclass's.
    data_cfg, env_cfg, arb_cfg, train_cfg = DataConfig(), EnvConfig(), ArbitrageConfig(), TrainConfig()
    ev = sub.add_parser("evaluate", help="metrics of a checkpoint on any window, beside baselines in the same "
                        "environment")
    ev.add_argument("--model", required=True, help="checkpoint file (.pt)")
    ev.add_argument("--pairs", nargs="+", help="pairs (default: the checkpoint's)")
    ev.add_argument("--exchange", help="exchange (default: the checkpoint's)")
    ev.add_argument("--data-dir", help="candle folder (default: the checkpoint's, else the bundled sample)")
    ev.add_argument("--start", help="first day evaluated, UTC (default: the checkpoint's validation window)")
    ev.add_argument("--end", help="end of the window, UTC, exclusive (default: the end of the data with --start, "
                    "else the end of the checkpoint's validation window)")
    # cpu unless asked (unlike the config's `device`, auto): the choices are the config's
    ev.add_argument("--device", default="cpu", choices=_choices(TrainConfig, "device"))
    ev.add_argument("--threads", type=int, help="torch CPU threads (default: the checkpoint's threads setting, as its "
                    "pipeline validated with; one is fastest for evaluation's small batches)")
    ev.add_argument("--hold-margin", type=float, metavar="Q", help="the greedy policy's hold margin (agent."
                    "hold_margin; default: the checkpoint's; 0 = plain argmax)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--record", action="store_true", help="with --json: add per-bar equity curves and positions "
                    "of the agent and every baseline (\"curves\")")
    ev.add_argument("--report", metavar="FILE.html", help="also write the evaluation as a self-contained HTML page "
                    "(equity beside the baselines, drawdown, trades, PnL by source, exposure per strategy)")
    ev.set_defaults(handler=cmd_evaluate)

    data = sub.add_parser("data", help="fetch and inspect candles")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download candles with ccxt into an incremental cache")
    fetch.add_argument("--exchange", default=data_cfg.exchange)
    fetch.add_argument("--pairs", nargs="+", default=list(data_cfg.pairs))
    fetch.add_argument("--timeframe", default=data_cfg.timeframe)
    fetch.add_argument("--since", required=True, help="first candle, UTC date")
    fetch.add_argument("--until", help="end, UTC date, exclusive (default: the last closed candle)")
    fetch.add_argument("--cache-dir", default="./data", help="folder of <exchange>_<BASE>-<QUOTE>_<tf>.csv.gz")
    fetch.add_argument("--second-exchange", help="also fetch the same coins from this venue for the arbitrage "
                       "strategy (e.g. coinbase), quoted in --second-quote")
    fetch.add_argument("--second-quote", default=arb_cfg.second_quote,
                       help="quote currency on the second venue (default: %(default)s)")
    fetch.set_defaults(handler=cmd_data_fetch)
    info = data_sub.add_parser("info", help="check candle files and report ranges and gaps")
    info.add_argument("--exchange", default=data_cfg.exchange)
    info.add_argument("--pairs", nargs="+", default=list(data_cfg.pairs))
    info.add_argument("--data-dir", help="candle folder (default: the bundled sample)")
    info.add_argument("--start")
    info.add_argument("--end")
    info.set_defaults(handler=cmd_data_info)

    bench = sub.add_parser("bench", help="measure environment and training throughput")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, help_text in (("env", "environment steps per second with random valid actions"),
                            ("train", "environment steps per second while learning")):
        b = bench_sub.add_parser(name, help=help_text)
        b.add_argument("--pairs", nargs="+", default=list(data_cfg.pairs))
        b.add_argument("--batch-size", type=int, default=4096 if name == "env" else 256,
                       help="episodes stepped together")
        b.add_argument("--steps", type=int, default=1000 if name == "env" else 2000)
        b.add_argument("--device", default="cpu", choices=_choices(TrainConfig, "device"))
        b.add_argument("--threads", type=int, default=train_cfg.threads)
        b.add_argument("--strategies", nargs="+", default=None, metavar="STRATEGY",
                       help="strategies on, e.g. spot,staking,lp,lending,arbitrage (default: the config default, "
                            "all of them)")
        b.add_argument("--kernel", default=env_cfg.kernel, choices=_choices(EnvConfig, "kernel"),
                       help="auto: a fused CPU kernel (spot alone, or with the strategies; tensor ops on a GPU); "
                            "torch: tensor ops (the reference); cuda: the fused kernel compiled by numba-cuda "
                            "(--device cuda)")
        if name == "env":
            b.add_argument("--precision", default=env_cfg.precision, choices=_choices(EnvConfig, "precision"),
                           help="accounting precision of the environment")
            b.add_argument("--policy", default="valid", choices=("valid", "uniform"),
                           help="random valid actions, or uniform over all actions (invalid ones act as hold)")
        b.add_argument("--busy-core", action="store_true",
                       help="measure with one CPU of this process's kept busy by a spinning process beside it, as on a "
                            "shared machine (stopped when the measurement ends)")
        b.add_argument("--json", action="store_true")
        b.set_defaults(handler=cmd_bench_env if name == "env" else cmd_bench_train)
    b = bench_sub.add_parser("eval", help="evaluation policy-steps per second (the agent and every baseline), beside "
                                          "bench env's environment steps per second")
    b.add_argument("--pairs", nargs="+", default=["BTC/USDT", "ETH/USDT", "SOL/USDT"])
    b.add_argument("--bars", type=int, default=8616, help="bars evaluated (the last before the test window)")
    b.add_argument("--seeds", type=int, default=5, help="seeds of the random baseline")
    b.add_argument("--threads", type=int, default=train_cfg.threads)
    b.add_argument("--strategies", nargs="+", default=None, metavar="STRATEGY",
                   help="strategies on (default: the config default, all of them)")
    b.add_argument("--grouped", action="store_true",
                   help="also time the evaluation stepped one batch per config, each policy called for its rows")
    b.add_argument("--json", action="store_true")
    b.set_defaults(handler=cmd_bench_eval)
    if bench_extra is not None:
        bench_extra(bench_sub)


def _choices(cls: type, name: str) -> tuple:
    """The accepted values of a config setting, as its dataclass declares them."""
    return next(f for f in fields(cls) if f.name == name).metadata["choices"]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nexlify.evaluate_cmd import evaluate_checkpoint, render_table

    seen: dict = {}
    report = evaluate_checkpoint(args.model, pairs=args.pairs, exchange=args.exchange, data_dir=args.data_dir,
                                 start=args.start, end=args.end, device=args.device, hold_margin=args.hold_margin,
                                 record=args.record or bool(args.report), threads=args.threads,
                                 trace=bool(args.report),
                                 inspect=(lambda *a: seen.update(args=a)) if args.report else None)
    if args.report:
        from nexlify.report import evaluation_page

        evaluation_page(args.report, report, *seen["args"], trace=report.pop("trace"))
        if not args.record:
            report.pop("curves", None)  # drawn in the page; printed with --record only
    print(json.dumps(report, indent=2) if args.json else render_table(report))
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from nexlify.data.fetch import fetch_many

    paths = fetch_many(args.exchange, args.pairs, args.timeframe, args.since, args.until, args.cache_dir)
    if args.second_exchange:
        from nexlify.data.fetch import fetch_second_venue

        paths.update(fetch_second_venue(args.second_exchange, args.second_quote, args.pairs, args.timeframe,
                                        args.since, args.until, args.cache_dir))
    for pair, path in paths.items():
        print(f"{pair}: {path}")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from nexlify.data.candles import load_market

    market = load_market(args.exchange, args.pairs, DataConfig().timeframe, args.data_dir, args.start, args.end)
    print(f"{market.exchange} {market.timeframe}: {market.start_iso} .. {market.end_iso}, {market.n_bars} bars")
    for pair in market.pairs:
        gaps = market.gaps[pair]
        print(f"  {pair}: {market.sources[pair]['rows']} rows, gaps {gaps.count} ({gaps.missing_bars} bars, "
              f"longest {gaps.longest_bars}{' from ' + gaps.longest_start if gaps.longest_start else ''}), "
              f"sha256 {market.sources[pair]['sha256'][:12]}")
    return 0


def _strategies(args: argparse.Namespace) -> list[str] | None:
    if args.strategies is None:
        return None
    return [s for item in args.strategies for s in item.replace(",", " ").split() if s]


# Bounds of the bench commands' own counts (one line and exit 2 outside them): episodes stepped together as
# the training config allows them (num_envs), and steps enough for minutes of measurement.
BENCH_MAX_BATCH = 65536
BENCH_MAX_STEPS = 10_000_000


def _check_bench(args: argparse.Namespace) -> None:
    check_bounds("--batch-size", args.batch_size, 1, BENCH_MAX_BATCH)
    check_bounds("--steps", args.steps, 1, BENCH_MAX_STEPS)
    check_bounds("--threads", args.threads, 1, 256)


def cmd_bench_env(args: argparse.Namespace) -> int:
    from nexlify.bench import bench_env

    _check_bench(args)
    result = bench_env(args.pairs, args.batch_size, args.steps, args.device, args.threads, _strategies(args),
                       args.precision, args.policy, args.kernel, busy_core=args.busy_core)
    _print_bench(result, args.json)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from nexlify.bench import bench_train

    _check_bench(args)
    result = bench_train(args.pairs, args.batch_size, args.steps, args.device, args.threads, _strategies(args),
                         args.kernel, busy_core=args.busy_core)
    _print_bench(result, args.json)
    return 0


def cmd_bench_eval(args: argparse.Namespace) -> int:
    from nexlify.bench import bench_eval

    check_bounds("--bars", args.bars, 2, BENCH_MAX_STEPS)
    check_bounds("--seeds", args.seeds, 0, 64)
    check_bounds("--threads", args.threads, 1, 256)
    result = bench_eval(args.pairs, args.bars, args.threads, _strategies(args), args.seeds, grouped=args.grouped)
    _print_bench(result, args.json)
    return 0


def _print_bench(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value:,}" if isinstance(value, (int, float)) else f"{key:>24}: {value}")


def build_config(cls: type, file_mapping: dict | None, preset: dict | None, flags: dict):
    """defaults < config file < preset (--quick-test) < flags the user typed; then validated."""
    cfg = cls()
    if file_mapping:
        apply_mapping(cfg, file_mapping, "config file")
    if preset:
        apply_mapping(cfg, {k: v for k, v in preset.items() if k not in flags}, "--quick-test")
    apply_mapping(cfg, flags, "flags")
    validate_tree(cfg)
    return cfg

