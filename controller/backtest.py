"""Walk-forward backtest: the rules, as pure functions of dates and recorded metrics.

    plan_folds       fixed fold dates from the config's data window (never "now")
    fold_row         one fold's table row from its test evaluation (agent beside whatever baselines exist)
    aggregate        mean / median of the agent's return and Sharpe, and in how many folds it beats each
                     baseline on return and on Sharpe
    render_table     the table printed by `nexlify backtest --walk-forward`

Sharpe here is the annualised Sharpe of hourly returns in excess of what cash plus lending earns
(max_idle_share of the cash at the modelled Aave USDT supply rate; nexlify.metrics.sharpe_vs_lending,
`avg_sharpe_vs_lending`): the risk-free rate of a USDT book here, so that cash plus lending, riskless, has
0 and "beats it on Sharpe" means earning more than lending per unit of risk. (With rf = 0 its
near-constant returns give a Sharpe in the hundreds of thousands.) Results written before that metric
existed fall back to `avg_sharpe`.

Fold k of n (k = 1 is the oldest) tests on [test_start_k, test_end_k) with
    test_end_k   = data.end - (n - k) * step_days
    test_start_k = test_end_k - fold_days
and its pipeline trains on [train_start_k, test_start_k): data strictly before its test window, the last
val_days of it being the validation window as in any pipeline. train_start_k is data.start (an expanding
window) or, with train_days > 0, test_start_k - train_days (a rolling one). The last fold's test window ends
at data.end. Running the folds is controller.backtest_run's job.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from nexlify.configtools import setting
from nexlify.data.timeframes import MS_PER_DAY, iso_utc, parse_utc_ms
from nexlify.errors import InputError

# `evaluate_checkpoint`'s older yardstick (per pair, no fees), shown beside the baselines when present.
BUY_AND_HOLD_KEY = "buy_and_hold"
CASH_LENDING = "cash_lending"


@dataclass
class WalkForwardConfig:
    """The fold layout of `nexlify backtest --walk-forward` (the training settings are the pipeline's)."""

    fold_days: int = setting(30, "days in each fold's test window", lo=1)
    step_days: int = setting(0, "days between the ends of consecutive test windows (0 = fold_days: test windows "
                                "side by side); at least fold_days, so test windows never overlap", lo=0)
    folds: int = setting(4, "number of folds; the last test window ends at the data end (--end)", lo=1, hi=100)
    train_days: int = setting(0, "days of training data per fold, ending where its test window starts (0 = all "
                                 "data from --start: an expanding window)", lo=0)

    @property
    def step(self) -> int:
        return self.step_days or self.fold_days

    def check(self) -> None:
        if self.step < self.fold_days:
            raise InputError(f"--step-days {self.step_days} is shorter than --fold-days {self.fold_days}, so test "
                             "windows would overlap; accepted: 0 (= fold days) or at least --fold-days")


@dataclass(frozen=True)
class Fold:
    index: int  # 1 = the oldest
    train_start: str  # ISO UTC; the fold pipeline's data.start
    train_end: str  # = test_start: the fold pipeline's data.end (exclusive)
    test_start: str
    test_end: str  # exclusive

    def as_dict(self) -> dict:
        return asdict(self)


def _iso_day(ms: int) -> str:
    """Midnight as a plain date ("2025-05-02"), any other instant as ISO UTC text."""
    text = iso_utc(ms)
    return text[:10] if ms % MS_PER_DAY == 0 else text


def plan_folds(data_start: str, data_end: str, wf: WalkForwardConfig, *, val_days: int) -> list[Fold]:
    """The folds, oldest first. InputError (one line) when a fold's training data would start before the data
    window or be shorter than twice the validation window (the pipeline's own least: train >= validation)."""
    start_ms = parse_utc_ms(data_start, "--start")
    end_ms = parse_utc_ms(data_end, "--end")
    folds = []
    for k in range(1, wf.folds + 1):
        test_end = end_ms - (wf.folds - k) * wf.step * MS_PER_DAY
        test_start = test_end - wf.fold_days * MS_PER_DAY
        train_start = start_ms if wf.train_days == 0 else test_start - wf.train_days * MS_PER_DAY
        if train_start < start_ms:
            raise InputError(f"--train-days {wf.train_days}: fold {k}'s training data would start at "
                             f"{_iso_day(train_start)}, before --start {data_start}; accepted: an earlier --start, "
                             "fewer --folds, or shorter --train-days / --fold-days / --step-days")
        train_days = (test_start - train_start) / MS_PER_DAY
        if train_days < 2 * val_days:
            raise InputError(f"fold {k} would train on {train_days:g} day(s) ({_iso_day(train_start)} .. "
                             f"{_iso_day(test_start)}), fewer than 2 x --val-days {val_days}; accepted: an earlier "
                             "--start, fewer --folds, shorter --fold-days / --step-days, longer --train-days or a "
                             "smaller --val-days")
        folds.append(Fold(k, _iso_day(train_start), _iso_day(test_start), _iso_day(test_start), _iso_day(test_end)))
    return folds


def _mean_over_pairs(per_pair: dict, key: str) -> float:
    return sum(m[key] for m in per_pair.values()) / len(per_pair)


def _sharpe(metrics: dict) -> float:
    """The Sharpe the folds compare: in excess of the lending rate where recorded, else with rf = 0."""
    return float(metrics.get("avg_sharpe_vs_lending", metrics["avg_sharpe"]))


def fold_row(fold: Fold, evaluation: dict) -> dict:
    """One table row: the fold's dates, the agent's test metrics, and each baseline's return and Sharpe.

    `evaluation` is `nexlify.evaluate_cmd.evaluate_checkpoint`'s result. Every entry of its `baselines`
    (name -> metrics with avg_return, avg_sharpe) becomes a comparison, and so does its per-pair
    `buy_and_hold` (averaged over pairs, like the agent's avg_return) when present."""
    agent = evaluation["agent"]
    exposure = agent.get("avg_exposure", agent.get("exposure"))
    baselines = {name: {"return": float(m["avg_return"]), "sharpe": _sharpe(m)}
                 for name, m in (evaluation.get("baselines") or {}).items()}
    bnh = evaluation.get(BUY_AND_HOLD_KEY)
    if bnh and BUY_AND_HOLD_KEY not in baselines:
        key = "sharpe_vs_lending" if all("sharpe_vs_lending" in m for m in bnh.values()) else "sharpe"
        baselines[BUY_AND_HOLD_KEY] = {"return": _mean_over_pairs(bnh, "total_return"),
                                       "sharpe": _mean_over_pairs(bnh, key)}
    return {
        "fold": fold.index,
        **{k: v for k, v in fold.as_dict().items() if k != "index"},
        "agent": {"return": float(agent["avg_return"]), "sharpe": _sharpe(agent),
                  "max_drawdown": float(agent["avg_drawdown"]), "trades": int(agent["total_trades"]),
                  "exposure": None if exposure is None else float(exposure)},
        "baselines": baselines,
    }


def comparators(rows: list[dict]) -> list[str]:
    """Baseline names in order of first appearance, cash + lending first, buy-and-hold last."""
    names: list[str] = []
    for row in rows:
        names += [n for n in row["baselines"] if n not in names]
    first = [n for n in (CASH_LENDING,) if n in names]
    last = [n for n in (BUY_AND_HOLD_KEY,) if n in names]
    return first + [n for n in names if n not in first + last] + last


def aggregate(rows: list[dict]) -> dict:
    """Mean and median of the agent's return and Sharpe over the folds, and per baseline in how many of the
    folds that report it the agent's return / Sharpe is strictly higher (a tie is not a win)."""
    returns = [r["agent"]["return"] for r in rows]
    sharpes = [r["agent"]["sharpe"] for r in rows]
    out: dict = {
        "folds": len(rows),
        "agent": {
            "mean_return": statistics.fmean(returns) if rows else None,
            "median_return": statistics.median(returns) if rows else None,
            "mean_sharpe": statistics.fmean(sharpes) if rows else None,
            "median_sharpe": statistics.median(sharpes) if rows else None,
        },
        "versus": {},
    }
    for name in comparators(rows):
        pairs = [(r["agent"], r["baselines"][name]) for r in rows if name in r["baselines"]]
        out["versus"][name] = {
            "folds": len(pairs),
            "beats_return": sum(a["return"] > b["return"] for a, b in pairs),
            "beats_sharpe": sum(a["sharpe"] > b["sharpe"] for a, b in pairs),
            "mean_return": statistics.fmean(b["return"] for _, b in pairs),
            "mean_sharpe": statistics.fmean(b["sharpe"] for _, b in pairs),
        }
    return out


def _num(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt) if math.isfinite(value) else str(value)


def render_table(rows: list[dict], agg: dict) -> str:
    """The per-fold table (agent, then each baseline's return % / Sharpe) and the aggregate lines."""
    names = comparators(rows)
    head = (f"{'fold':>4}  {'train':<23}  {'test':<23}  {'return %':>8} {'sharpe':>7} {'max dd %':>8} {'trades':>6} "
            f"{'exposure':>8}")
    head += "".join(f"  {name[:18]:>18}" for name in names)
    lines = ["walk-forward: agent on each fold's test window; baselines as return % / Sharpe (Sharpe: annualised, "
             "in excess of cash plus lending's return)", head]
    for r in rows:
        a = r["agent"]
        line = (f"{r['fold']:>4}  {r['train_start'][:10] + ' .. ' + r['train_end'][:10]:<23}  "
                f"{r['test_start'][:10] + ' .. ' + r['test_end'][:10]:<23}  {_num(a['return'], '.2f'):>8} "
                f"{_num(a['sharpe'], '.2f'):>7} {_num(a['max_drawdown'], '.2f'):>8} {a['trades']:>6} "
                f"{_num(a['exposure'], '.3f'):>8}")
        for name in names:
            b = r["baselines"].get(name)
            cell = "-" if b is None else f"{_num(b['return'], '.2f')} / {_num(b['sharpe'], '.2f')}"
            line += f"  {cell:>18}"
        lines.append(line)
    a = agg["agent"]
    n = agg["folds"]
    lines.append(f"aggregate over {n} fold(s): return mean {_num(a['mean_return'], '.2f')} %, median "
                 f"{_num(a['median_return'], '.2f')} %; Sharpe mean {_num(a['mean_sharpe'], '.2f')}, median "
                 f"{_num(a['median_sharpe'], '.2f')}")
    for name, v in agg["versus"].items():
        lines.append(f"agent beats {name}: on return in {v['beats_return']}/{v['folds']} folds, on Sharpe in "
                     f"{v['beats_sharpe']}/{v['folds']} folds (its mean return {_num(v['mean_return'], '.2f')} %, "
                     f"Sharpe {_num(v['mean_sharpe'], '.2f')})")
    if not agg["versus"]:
        lines.append("no baselines in the evaluation: nothing to compare against")
    return "\n".join(lines)
