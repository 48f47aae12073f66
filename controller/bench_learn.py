"""`nexlify bench learn`: does the learner capture an edge that is there? The planted-edge benchmark.

For each planted family (nexlify.planted) and strength, and an unplanted control (the real candles):

    <output>/data/<family>-<strength>/            the planted candles of both venues and plant.json
    <output>/<family>-<strength>/seed_<s>/        a complete pipeline output (controller.run.run_pipeline)
    <output>/<family>-<strength>/seed_<s>/test_result.json   the test of its final model, beside the oracle
    <output>/learn_bench.json                     every row (rewritten after each)

Each pipeline is the one `nexlify train` runs (the flags given here, or the defaults; --quick-test too),
only its data moved to the planted folder and its window to [TRAIN_START, TEST_START) (the last val_days
of it validate), so it runs through the same executor (local workers or Kubernetes Jobs). Its final model
is then tested on the later planted window [TEST_START, TEST_END) by nexlify.evaluate_cmd.evaluate_checkpoint
(`nexlify evaluate`'s code), and the family's oracle (nexlify.oracles) is stepped on the same window in the
same environment, risk config and costs. A row reads: agent, oracle and cash-plus-lending test returns
(mean over pairs, %), and captured = (agent - lending) / (oracle - lending) (blank when the oracle does not
beat lending there), and the Q-gap seen (nexlify.oracles.q_gap_by_signal): along the agent's greedy path, the
mean Q-gap open_long - hold (for the forecast learner: its forecast) on the bars where the oracle wants in,
less that on the others, in the learner's reward units. It separates "the network sees the edge" (> 0) from "it trades it" (captured). The control
row has no oracle of its own: it shows the agent against lending.

Rerunning the same command reuses every finished test_result.json whose pipeline config hash matches, and
an interrupted pipeline resumes itself (controller.pipeline).

`--oracle-only` trains nothing: per family and strength (strength 0 = the rule on the real candles) the
oracle's and lending's return over the window given by --oracle-start/--oracle-end, which is how the
reference strengths of nexlify.planted.REFERENCE_DRIFT were calibrated.

Per market (not per seed: it is deterministic) the signal study's forecast policy (nexlify.signal_policy)
is stepped on the same test window: a ridge forecast of the agent's features, its horizon and entry chosen on
the same validation window, fitted on the pipeline's training window, in the same environment. It separates
"the signal is seen by a plain forecast" (its capture) from "the learner trades it" (the agent's).
<output>/<family>-<strength>/signal_policy.json keeps it (recomputed when the config changes).
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import structlog

from controller.config import MAX_PIPELINE_SEED, PipelineConfig, pipeline_hash
from nexlify.errors import InputError, NexlifyError, PermanentError

log = structlog.get_logger("nexlify.bench_learn")

TRAIN_START = "2023-06-01"
TEST_START = "2025-03-01"  # the pipeline trains (and validates) before it
TEST_END = "2025-06-01"
ORACLE_START, ORACLE_END = "2024-06-01", "2025-06-01"  # the calibration year
CONTROL = "control"
DEFAULT_STRENGTHS = (1.0, 2.0)
DEFAULT_OUTPUT = "./planted_bench_output"
BENCH_KEY = "learn_bench.json"
TEST_RESULT = "test_result.json"
MAX_STRENGTH = 100.0


def market_name(family: str, strength: float) -> str:
    return CONTROL if family == CONTROL else f"{family}-{strength:g}"


def check_args(families: list[str], strengths: list[float], seeds: list[int]) -> None:
    from nexlify.planted import FAMILIES

    for f in families:
        if f not in FAMILIES:
            raise InputError(f"--families {f!r} is unknown; accepted: {', '.join(FAMILIES)}")
    for s in strengths:
        if not (math.isfinite(s) and 0.0 < s <= MAX_STRENGTH):
            raise InputError(f"--strengths {s!r} is out of range; accepted: numbers in (0, {MAX_STRENGTH:g}] "
                             "(multiples of the reference strength; the control is always run)")
    for s in seeds:
        if not 0 <= s <= MAX_PIPELINE_SEED:
            raise InputError(f"--seeds {s!r} is out of range; accepted: 0 .. {MAX_PIPELINE_SEED}")


def planted_dir(root: Path, family: str, strength: float) -> Path:
    """The planted candles of a market under root/data (built once; rebuilt if plant.json differs)."""
    from nexlify.planted import REFERENCE_DRIFT, Plant, build_planted_dir

    plant = Plant("calendar", 0.0) if family == CONTROL else Plant(family, strength)
    out = root / "data" / market_name(family, strength)
    meta = out / "plant.json"
    want = REFERENCE_DRIFT[plant.family] * plant.strength
    if meta.is_file() and json.loads(meta.read_text()).get("drift_per_bar") == want:
        return out
    return build_planted_dir(out, plant)


def _tensors(cfg, data_dir: Path, start: str, end: str):
    """The market of cfg's pairs from data_dir with the feature warm-up before `start`, and the window."""
    from nexlify.data.candles import load_market
    from nexlify.data.prepare import attach_second_venue
    from nexlify.data.timeframes import MS_PER_DAY, iso_utc, parse_utc_ms
    from nexlify.env.market import MarketTensors, market_features
    from nexlify.evaluate_cmd import WARMUP_DAYS
    from nexlify.features import Normalizer

    d = cfg.data
    first = iso_utc(parse_utc_ms(start, "start") - WARMUP_DAYS * MS_PER_DAY)
    market = load_market(d.exchange, d.pairs, d.timeframe, str(data_dir), first, end)
    attach_second_venue(cfg, market, str(data_dir))
    i0 = market.index_of(start)
    raw = market_features(market)
    return MarketTensors.build(market, Normalizer.fit(raw, 0, i0), "cpu", raw), (i0, market.n_bars)


def oracle_returns(family: str, tensors, window, train_cfg) -> dict:
    """The family's oracle and cash plus lending over `window` in train_cfg's environment: mean returns over
    the pairs (%) and the oracle's trades. The control (CONTROL) has no oracle: lending alone."""
    from dataclasses import replace as dc_replace

    from nexlify import baselines as bl
    from nexlify.evaluation import evaluate_rules
    from nexlify.oracles import oracle_policy

    env_cfg, _ = bl.with_strategy(train_cfg.env, "lending")
    rules = {"cash_plus_lending": lambda obs, mask, env, rows: bl.take_lend(mask)}
    if family != CONTROL:
        rules["oracle"] = oracle_policy(family, tensors)
    out = evaluate_rules(tensors, window, dc_replace(env_cfg), train_cfg.risk, train_cfg.strategy_params(), rules)
    lending = {"lending": out["cash_plus_lending"]["avg_return"]}
    if family == CONTROL:
        return lending
    return {"oracle": out["oracle"]["avg_return"], "oracle_trades": out["oracle"]["total_trades"],
            "oracle_exposure": out["oracle"]["exposure"], **lending}


def oracle_table(cfg: PipelineConfig, families: list[str], strengths: list[float], root: Path,
                 start: str = ORACLE_START, end: str = ORACLE_END) -> list[dict]:
    """`--oracle-only`: each family's oracle at each strength (0: on the real candles)."""
    rows = []
    for family in families:
        for strength in strengths:
            data = planted_dir(root, CONTROL if strength == 0 else family, strength)
            tensors, window = _tensors(cfg.train, data, start, end)
            r = oracle_returns(family, tensors, window, cfg.train)
            years = (window[1] - window[0]) / 8760.0
            r |= {"family": family, "strength": strength, "excess": r["oracle"] - r["lending"],
                  "excess_per_year": (r["oracle"] - r["lending"]) / years, "start": start, "end": end}
            log.info("oracle_row", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
            rows.append(r)
    return rows


def captured(agent: float, oracle: float | None, lending: float) -> float | None:
    """(agent - lending) / (oracle - lending); None when the oracle does not beat lending (nothing to capture)."""
    if oracle is None or not oracle > lending:
        return None
    return (agent - lending) / (oracle - lending)


def market_config(cfg: PipelineConfig, data_dir: Path, seed: int, output: Path) -> PipelineConfig:
    out = copy.deepcopy(cfg)
    out.train.data.data_dir = str(data_dir)
    out.train.data.start = TRAIN_START
    out.train.data.end = TEST_START
    out.train.data.test_days = 0
    out.seed = seed
    out.output = str(output)
    return out


def run_market(cfg: PipelineConfig, root: Path, family: str, strength: float, seed: int, *, force: bool) -> dict:
    """One family/strength/seed: its pipeline (or the finished one reused), then its test beside the oracle."""
    from controller.run import run_pipeline
    from nexlify.evaluate_cmd import evaluate_checkpoint

    name = market_name(family, strength)
    data = planted_dir(root, family, strength)
    out = root / name / f"seed_{seed}"
    mcfg = market_config(cfg, data, seed, out)
    mhash = pipeline_hash(mcfg)
    result_path = out / TEST_RESULT
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        if done.get("config_hash") == mhash:
            log.info("market_adopted", market=name, seed=seed)
            return done["row"]
    t0 = time.perf_counter()
    log.info("market_started", market=name, seed=seed, output=str(out))
    try:
        summary = run_pipeline(mcfg, force=force)
    except NexlifyError as exc:
        raise PermanentError(f"{name} seed {seed}: its pipeline failed: {exc}") from exc
    seen = {}

    def inspect(model, tensors, window, tcfg) -> None:
        if family != CONTROL:
            from nexlify.oracles import q_gap_by_signal

            seen.update(oracle_returns(family, tensors, window, tcfg))
            seen["q_gap"] = q_gap_by_signal(model, family, tensors, window, tcfg.env, tcfg.risk,
                                            tcfg.strategy_params(), margin=tcfg.agent.hold_margin)

    ev = evaluate_checkpoint(summary["final_model_path"], pairs=mcfg.train.data.pairs,
                             exchange=mcfg.train.data.exchange, data_dir=str(data), start=TEST_START, end=TEST_END,
                             device="cpu", inspect=inspect)
    agent = ev["agent"]
    lending = ev["baselines"]["cash_plus_lending"]["avg_return"]
    oracle = seen.get("oracle")
    row = {"market": name, "family": family, "strength": strength, "seed": seed, "agent": agent["avg_return"],
           "lending": lending, "oracle": oracle, "captured": captured(agent["avg_return"], oracle, lending),
           "agent_trades": agent["total_trades"], "agent_exposure": agent["exposure"],
           "oracle_trades": seen.get("oracle_trades"),
           "q_gap_seen": (seen.get("q_gap") or {}).get("seen"),
           "q_gap_signal": (seen.get("q_gap") or {}).get("gap_signal"),
           "q_gap_other": (seen.get("q_gap") or {}).get("gap_other"), "val_return": (summary.get("selection") or {}).get("val_return"),
           "seconds": round(time.perf_counter() - t0, 1)}
    result_path.write_text(json.dumps({"config_hash": mhash, "window": [TEST_START, TEST_END], "row": row,
                                       "evaluation": {"agent": {k: v for k, v in agent.items() if k != "per_pair"},
                                                      "cash_plus_lending": lending}}, indent=2) + "\n")
    log.info("market_finished", **{k: v for k, v in row.items() if v is not None})
    return row


def signal_policy(cfg: PipelineConfig, root: Path, family: str, strength: float) -> dict:
    """The signal study's forecast policy on one market (nexlify.signal_policy.choose_and_test): fitted on the
    pipeline's training window, its choices made on the pipeline's validation window, tested on [TEST_START,
    TEST_END); read back from the market's signal_policy.json when its config hash matches."""
    name = market_name(family, strength)
    path = root / name / "signal_policy.json"
    key = pipeline_hash(cfg)
    if path.is_file():
        done = json.loads(path.read_text())
        if done.get("config_hash") == key:
            return done["result"]
    import numpy as np

    from nexlify.data.candles import load_market
    from nexlify.data.prepare import attach_second_venue
    from nexlify.data.timeframes import MS_PER_DAY, iso_utc, parse_utc_ms
    from nexlify.env.market import MarketTensors
    from nexlify.features import WARMUP_BARS, Normalizer, compute_features
    from nexlify.signal_policy import choose_and_test

    tcfg, data = cfg.train, planted_dir(root, family, strength)
    market = load_market(tcfg.data.exchange, tcfg.data.pairs, tcfg.data.timeframe, str(data), TRAIN_START, TEST_END)
    attach_second_venue(tcfg, market, str(data))
    feats = compute_features(market.timestamps, market.open, market.high, market.low, market.close,
                             market.volume, market.tradable).astype(np.float64)
    # the policy reads its own forecasts, not the observations: any normaliser will do for the environment
    tensors = MarketTensors.build(market, Normalizer.fit(feats, WARMUP_BARS, market.n_bars), "cpu", feats)
    val_start = iso_utc(parse_utc_ms(TEST_START) - tcfg.data.val_days * MS_PER_DAY)
    result = choose_and_test(feats, np.log(market.close), market.tradable, tensors, tcfg, WARMUP_BARS,
                             market.index_of(val_start), market.index_of(TEST_START), market.n_bars)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config_hash": key, "result": result}, indent=2) + "\n")
    log.info("signal_policy_tested", market=name, **result)
    return result


def run_bench(cfg: PipelineConfig, families: list[str], strengths: list[float], seeds: list[int], root: Path, *,
              control: bool = True, force: bool = False) -> dict:
    markets = [(f, s) for f in families for s in strengths] + ([(CONTROL, 0.0)] if control else [])
    rows = []
    report = {"complete": False, "train": [TRAIN_START, TEST_START], "test": [TEST_START, TEST_END],
              "pipeline_config_hash": pipeline_hash(cfg), "rows": rows}
    root.mkdir(parents=True, exist_ok=True)
    signal = report["signal_policy"] = {}
    for family, strength in markets:
        for seed in seeds:
            rows.append(run_market(cfg, root, family, strength, seed, force=force))
            (root / BENCH_KEY).write_text(json.dumps(report, indent=2) + "\n")
        signal[market_name(family, strength)] = signal_policy(cfg, root, family, strength)
    report["complete"] = True
    report["summary"] = summarize(rows, signal)
    (root / BENCH_KEY).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def summarize(rows: list[dict], signal: dict | None = None) -> list[dict]:
    """Per market: the medians over its seeds of agent, oracle, lending and captured; beside them the signal
    study's forecast policy (`signal`: market -> signal_policy), its return and its capture."""
    out = []
    for name in dict.fromkeys(r["market"] for r in rows):
        rs = [r for r in rows if r["market"] == name]
        s = {"market": name, "seeds": [r["seed"] for r in rs],
             **{k: _median([r.get(k) for r in rs]) for k in ("agent", "oracle", "lending", "captured", "q_gap_seen")},
             "captured_each": [r["captured"] for r in rs]}
        ridge = (signal or {}).get(name)
        if ridge is not None:
            s["signal_policy"] = ridge["return"]
            s["signal_captured"] = captured(ridge["return"], s["oracle"], s["lending"])
        out.append(s)
    return out


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}%" if pct else f"{v:.2f}"


def render(summary: list[dict]) -> str:
    lines = ["| market | seeds | agent | oracle | cash+lending | captured (median) | captured per seed | Q-gap seen "
             "| signal policy | its captured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        gap = s.get("q_gap_seen")
        lines.append(f"| {s['market']} | {len(s['seeds'])} | {_fmt(s['agent'], True)} | {_fmt(s['oracle'], True)} | "
                     f"{_fmt(s['lending'], True)} | {_fmt(s['captured'])} | "
                     f"{' '.join(_fmt(c) for c in s['captured_each'])} | {'-' if gap is None else f'{gap:+.4f}'} | "
                     f"{_fmt(s.get('signal_policy'), True)} | {_fmt(s.get('signal_captured'))} |")
    return "\n".join(lines)


def render_oracles(rows: list[dict]) -> str:
    lines = ["| family | strength | oracle | cash+lending | excess | excess per year | oracle trades |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['strength']:g} | {r['oracle']:+.2f}% | {r['lending']:+.2f}% | "
                     f"{r['excess']:+.2f} | {r['excess_per_year']:+.2f} | {r['oracle_trades']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI


def add_parser(bench_sub, add_pipeline_args) -> None:
    from nexlify.planted import FAMILIES

    b = bench_sub.add_parser("learn", help="the planted-edge benchmark: the pipeline on planted markets, its "
                                           "final model against each edge's oracle and lending")
    b.add_argument("--families", nargs="+", default=list(FAMILIES), metavar="FAMILY",
                   help=f"planted families ({', '.join(FAMILIES)}; default: all)")
    b.add_argument("--strengths", nargs="+", type=float, default=list(DEFAULT_STRENGTHS), metavar="X",
                   help="multiples of each family's reference strength (default: 1 2)")
    b.add_argument("--seeds", nargs="+", type=int, default=[42], metavar="SEED",
                   help="pipeline seeds, one pipeline per market and seed (default: 42)")
    b.add_argument("--no-control", action="store_true", help="skip the unplanted control market")
    b.add_argument("--oracle-only", action="store_true",
                   help="train nothing: the oracles' and lending's returns per family and strength (0 = the real "
                        "candles) over --oracle-start .. --oracle-end")
    b.add_argument("--oracle-start", default=ORACLE_START)
    b.add_argument("--oracle-end", default=ORACLE_END)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    add_pipeline_args(b)
    b.set_defaults(handler=cmd_bench_learn)


def cmd_bench_learn(args) -> int:
    from controller.cli import resolve_pipeline_config

    check_args(args.families, args.strengths, args.seeds)
    cfg = resolve_pipeline_config(args)
    root = Path(cfg.output if "output" in vars(args) else DEFAULT_OUTPUT)
    if cfg.output.startswith("s3://"):
        raise InputError("--output for bench learn: accepted: a local folder (its pipelines may still run as "
                         "Kubernetes Jobs with --executor kubernetes)")
    if args.oracle_only:
        rows = oracle_table(cfg, args.families, [0.0, *args.strengths], root, args.oracle_start, args.oracle_end)
        print(json.dumps({"rows": rows}) if args.json else render_oracles(rows))
        return 0
    report = run_bench(cfg, args.families, args.strengths, args.seeds, root, control=not args.no_control,
                       force=args.force)
    print(json.dumps(report) if args.json else render(report["summary"]))
    return 0
