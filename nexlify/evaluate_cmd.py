"""`nexlify evaluate`: a checkpoint's greedy metrics on any window, beside the baselines stepped through
the same environment (nexlify.baselines) and the market's fee-less move (buy_and_hold)."""

from __future__ import annotations

import numpy as np

from nexlify import checkpoint
from nexlify.baselines import CASH_PLUS_LENDING
from nexlify.data.candles import load_market, normalize_pair
from nexlify.data.prepare import attach_second_venue
from nexlify.data.timeframes import MS_PER_DAY, iso_utc, parse_utc_ms
from nexlify.env.market import MarketTensors
from nexlify.agent import build_model
from nexlify.config import TrainConfig
from nexlify.configtools import check_leaf, coerce, leaf_index
from nexlify.errors import InputError
from nexlify.evaluation import buy_and_hold, evaluate_policy, evaluate_with_baselines
from nexlify.features import MARKET_FEATURES, WARMUP_BARS, Normalizer, compute_features
from nexlify.device import resolve_device
from nexlify.verdict import verdict

WARMUP_DAYS = WARMUP_BARS // 24 + 2


def evaluate_checkpoint(model_path: str, *, pairs: list[str] | None = None, exchange: str | None = None,
                        data_dir: str | None = None, start: str | None = None, end: str | None = None,
                        device: str = "cpu", hold_margin: float | None = None, record: bool = False,
                        inspect=None, threads: int | None = None, trace: bool = False) -> dict:
    """The checkpoint's greedy policy on a window: "agent" (metrics), "baselines" ({name: metrics}, see
    nexlify.evaluation), "baseline_notes", "buy_and_hold" (per pair, no fees), the window and, with `record`,
    "curves" (per-bar equity and positions of the agent and every baseline).

    Window: --start and --end; --start alone runs to the end of the data; neither is the checkpoint's own
    validation window (val_days before its test window). `hold_margin` replaces the checkpoint's
    agent.hold_margin (None: keep it). inspect(model, tensors, window, cfg), when given, is called with what
    was evaluated (the report draws it). `threads`: torch's CPU threads (None: the checkpoint's `threads`, as
    its pipeline validated with; see set_threads). `trace`: also record what the agent did bar by bar in the
    same pass ("trace": nexlify.report.trace's, for the page; implies the curves)."""
    dev = resolve_device(device)
    ckpt = checkpoint.load(model_path, map_location=dev)
    cfg = checkpoint.train_config(ckpt, model_path)
    set_threads(cfg.threads if threads is None else threads)
    if hold_margin is not None:
        leaf = leaf_index(TrainConfig)["hold_margin"]
        check_leaf(leaf, coerce(leaf, hold_margin, "--hold-margin"))
        cfg.agent.hold_margin = hold_margin
    exchange = exchange or cfg.data.exchange
    market, window, raw = _market_window(cfg, pairs, exchange, data_dir, start, end,
                                         market_pairs=_market_pairs(ckpt, cfg))
    i0 = window[0]
    tensors, model = _greedy_model(ckpt, cfg, market, dev, raw)
    agent_trace = None
    if trace:
        from nexlify.report.trace import trace_with_baselines

        evaluated, agent_trace = trace_with_baselines(model, tensors, window, cfg.env, cfg.risk, cfg.strategy_params(),
                                                      margin=cfg.agent.hold_margin)
        record = True
    else:
        evaluated = evaluate_with_baselines(model, tensors, window, cfg.env, cfg.risk, cfg.strategy_params(),
                                            margin=cfg.agent.hold_margin, record=record)
    if inspect is not None:
        inspect(model, tensors, window, cfg)
    report = {
        "model": model_path,
        "window": {"start": iso_utc(int(market.timestamps[i0])), "end": market.end_iso, "bars": window[1] - window[0]},
        "exchange": exchange,
        "agent": evaluated["agent"],
        "baselines": evaluated["baselines"],
        "baseline_notes": evaluated["baseline_notes"],
        "buy_and_hold": buy_and_hold(tensors, window, cfg.strategy_params()),
        "checkpoint": {"seed": ckpt["seed"], "episodes_trained": ckpt["episodes_trained"]},
        "hold_margin": cfg.agent.hold_margin,
    }
    report["verdict"] = model_verdict(report)
    if record:
        report["curves"] = evaluated["curves"]
    if agent_trace is not None:
        report["trace"] = agent_trace
    return report


def set_threads(threads: int) -> None:
    """torch's CPU threads for an evaluation. Its batches are a few dozen rows, for which one thread is the
    fastest by far: on a 2-core machine with other work on it a 3-row Q-network call took 0.5 ms of CPU with
    two threads and 0.01 ms with one. The pipeline's validation runs with its config's `threads`, so the same
    count gives the same numbers."""
    import torch

    if threads < 1:
        raise InputError(f"--threads {threads}: accepted: a whole number of threads >= 1")
    torch.set_num_threads(threads)


def model_verdict(report: dict) -> dict:
    """The verdict (nexlify.verdict) on one model evaluated alone: its return beside cash plus lending's on
    the same window, its Sharpe in excess of lending and the deflated Sharpe for the one model tried."""
    agent = report["agent"]
    lending = (report.get("baselines") or {}).get(CASH_PLUS_LENDING)
    excess = agent.get("excess_return_moments")
    w = report["window"]
    return verdict(agent["avg_return"], None if lending is None else lending["avg_return"], excess,
                   [None if excess is None else excess.get("sharpe")], window=f"{w['start']} .. {w['end']}")


def evaluate_models(model_paths: list[str], *, start: str, end: str, data_dir: str | None = None,
                    device: str = "cpu", threads: int | None = None) -> list[dict]:
    """Each checkpoint's greedy policy alone (no baselines) on [start, end), in the environment it was
    trained in: {"model": path, "agent": metrics as evaluate_checkpoint's}. The candles are read once, with
    the first checkpoint's data settings; every checkpoint must trade the same pairs on the same exchange
    and timeframe (one pipeline's models do), else InputError. `threads`: as evaluate_checkpoint's (None: each
    checkpoint's own)."""
    dev = resolve_device(device)
    out: list[dict] = []
    market = window = first = raw = None
    for path in model_paths:
        ckpt = checkpoint.load(path, map_location=dev)
        cfg = checkpoint.train_config(ckpt, path)
        set_threads(cfg.threads if threads is None else threads)
        d = cfg.data
        what = (d.exchange, tuple(d.pairs), d.timeframe)
        if market is None:
            first = what
            # once: each model only normalises the features its own way
            market, window, raw = _market_window(cfg, None, d.exchange, data_dir, start, end)
        elif what != first:
            raise InputError(f"{path} trades {what}, not {first} like {model_paths[0]}; accepted: checkpoints "
                             "of one pipeline")
        tensors, model = _greedy_model(ckpt, cfg, market, dev, raw)
        out.append({"model": path, "agent": evaluate_policy(model, tensors, window, cfg.env, cfg.risk,
                                                            cfg.strategy_params(), margin=cfg.agent.hold_margin)})
    return out


def _market_pairs(ckpt: dict, cfg) -> list[str] | None:
    """The pairs whose candles make a checkpoint's market features: its training pairs when its normaliser
    reads any (nexlify.features.MARKET_FEATURES), else None (it reads none)."""
    names = Normalizer.from_dict(ckpt["normalizer"]).features
    return list(cfg.data.pairs) if any(n in MARKET_FEATURES for n in names) else None


def _market_window(cfg, pairs: list[str] | None, exchange: str, data_dir: str | None, start: str | None,
                   end: str | None, *, market_pairs: list[str] | None = None):
    """The candles of `pairs` (None: the config's) with the warm-up before the window, the window [i0, n_bars)
    as evaluate_checkpoint's docstring says (--start and --end; --start alone to the end of the data; neither:
    the validation window), and their raw features [T, P, F]. The market features are computed over
    `market_pairs` (None: the pairs evaluated), whose candles are read beside when they are other pairs, so a
    model evaluated on other pairs than it trained on sees the market it was trained to see."""
    d = cfg.data
    pairs = [normalize_pair(p) for p in (pairs or d.pairs)]  # InputError on a pair that is not BASE/QUOTE
    market_pairs = [normalize_pair(p) for p in (market_pairs or pairs)]
    loaded = pairs + [p for p in market_pairs if p not in pairs]
    data_dir = data_dir if data_dir is not None else d.data_dir
    end_ms: int | None
    if end is not None:
        end_ms = parse_utc_ms(end, "--end")
    elif start is not None:  # from --start to the end of the data
        end_ms = None
    else:  # the checkpoint's own validation window: val_days before its test window
        end_ms = parse_utc_ms(d.end, "--end") - d.test_days * MS_PER_DAY
    start_ms = end_ms - d.val_days * MS_PER_DAY if start is None else parse_utc_ms(start, "--start")
    if end_ms is not None and start_ms >= end_ms:
        raise InputError(f"--start {start} is not before --end {end}; accepted: start < end (end is exclusive)")
    try:
        market = load_market(exchange, loaded, d.timeframe, data_dir, iso_utc(start_ms - WARMUP_DAYS * MS_PER_DAY),
                             iso_utc(end_ms) if end_ms is not None else None, asked=_asked(start, end))
    except InputError as exc:
        if loaded == pairs:
            raise
        raise InputError(f"the model's market features are computed over the pairs it was trained on "
                         f"({' '.join(market_pairs)}), whose candles are needed beside --pairs: {exc}") from None
    raw = compute_features(market.timestamps, market.open, market.high, market.low, market.close, market.volume,
                           market.tradable, market=[loaded.index(p) for p in market_pairs])
    if loaded != pairs:
        market, raw = market.select(pairs), raw[:, :len(pairs)]
    if end_ms is None and int(market.timestamps[-1]) < start_ms:
        raise InputError(f"--start {start} is after the data's last candle ({iso_utc(int(market.timestamps[-1]))}, "
                         f"its bar ending {market.end_iso}); accepted: a start before {market.end_iso}")
    attach_second_venue(cfg, market, data_dir)
    i0 = int(np.searchsorted(market.timestamps, start_ms, side="left"))
    if i0 - 1 < WARMUP_BARS:
        raise InputError(f"not enough candles before --start {iso_utc(start_ms)} for the {WARMUP_BARS}-bar "
                         f"feature warm-up; the data starts at {market.start_iso}")
    return market, (i0, market.n_bars), raw


def _asked(start: str | None, end: str | None) -> str:
    """The window as the user typed it, for errors (with its feature warm-up before it)."""
    if start is None and end is None:
        return "the checkpoint's validation window (with its feature warm-up)"
    typed = " ".join(f"{flag} {value}" for flag, value in (("--start", start), ("--end", end)) if value is not None)
    return f"{typed}{'' if end is not None else ' (to the end of the data)'} with its {WARMUP_DAYS}-day feature warm-up"


def _greedy_model(ckpt: dict, cfg, market, dev, raw_features=None):
    """The market's tensors under the checkpoint's normaliser (from `raw_features` when given, else computed),
    and its policy network (Q-network or forecast) with its weights."""
    tensors = MarketTensors.build(market, Normalizer.from_dict(ckpt["normalizer"]), dev, raw_features)
    model = build_model(cfg.agent, tensors.n_features, ckpt["model_state_dict"]).to(dev)
    return tensors, model


def render_table(report: dict) -> str:
    lines = [f"{report['model']}  {report['exchange']}  {report['window']['start']} .. {report['window']['end']} "
             f"({report['window']['bars']} bars)",
             f"{'pair':<10} {'return %':>9} {'sharpe':>7} {'max dd %':>8} {'win rate':>8} {'trades':>6} | "
             f"{'hold %':>8} {'hold sh':>7} {'hold dd':>7}"]
    for pair, m in report["agent"]["per_pair"].items():
        h = report["buy_and_hold"][pair]
        lines.append(f"{pair:<10} {m['total_return']:>9.2f} {m['sharpe']:>7.2f} {m['max_drawdown']:>8.2f} "
                     f"{m['win_rate']:>8.2%} {m['trades']:>6d} | {h['total_return']:>8.2f} {h['sharpe']:>7.2f} "
                     f"{h['max_drawdown']:>7.2f}")
    a = report["agent"]
    lines.append(f"average: return {a['avg_return']:.2f} %, sharpe {a['avg_sharpe']:.2f}, drawdown "
                 f"{a['avg_drawdown']:.2f} %, win rate {a['avg_win_rate']:.2%}; the guide's selection score {a['score']:.3f} "
                 "(not a return)")
    if a.get("pnl_breakdown"):
        lines.append("average PnL by source: " + ", ".join(f"{k} {v:,.2f}" for k, v in a["pnl_breakdown"].items()))
    lines += ["", "the agent beside baselines in the same environment (averages over pairs):", baseline_table(report)]
    if report.get("verdict"):
        lines += ["", report["verdict"]["text"]]
    return "\n".join(lines)


def baseline_table(report: dict) -> str:
    """One line per policy: return, Sharpe, drawdown, exposure (spot / anything), turnover, fees paid."""
    rows = [("agent", report["agent"])] + list(report.get("baselines", {}).items())
    lines = [f"{'policy':<20} {'return %':>9} {'sharpe':>8} {'max dd %':>8} {'exposure':>8} {'any':>6} "
             f"{'turnover':>8} {'fees':>10}"]
    for name, m in rows:
        lines.append(f"{name:<20} {m['avg_return']:>9.2f} {m['avg_sharpe']:>8.2f} {m['avg_drawdown']:>8.2f} "
                     f"{m['exposure']:>8.1%} {m['exposure_any']:>6.1%} {m['turnover']:>8.2f} {m['fees_paid']:>10,.2f}")
    for name, note in report.get("baseline_notes", {}).items():
        lines.append(f"  {name}: {note}")
    return "\n".join(lines)
