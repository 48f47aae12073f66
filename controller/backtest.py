"""Walk-forward backtest: the rules, as pure functions of dates and recorded metrics.

    plan_folds       fixed fold dates from the config's data window (never "now")
    fold_row         one fold's table row from its test evaluation (agent beside whatever baselines exist)
    aggregate        mean / median of the agent's return and Sharpe, and in how many folds it beats each
                     baseline on return and on Sharpe
    candidates_on_test  every model a fold's pipeline tried, on the fold's test window: does the selection
                     on validation carry over (the selected model's rank, the rank correlation of validation
                     score and test return, how many beat cash plus lending)?
    combine_seeds    the walk-forward run once per seed (--seeds): fold-seeds won against each baseline
    render_table     the table printed by `nexlify backtest --walk-forward` (render_seeds: the seeds' lines)

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

import pandas as pd

from controller.config import MAX_PIPELINE_SEED
from controller.selection import CASH_PLUS_LENDING
from nexlify.verdict import verdict
from nexlify.configtools import setting
from nexlify.data.timeframes import MS_PER_DAY, iso_utc, parse_utc_ms
from nexlify.errors import InputError

# `evaluate_checkpoint`'s older yardstick (per pair, no fees), shown beside the baselines when present.
BUY_AND_HOLD_KEY = "buy_and_hold"


@dataclass
class WalkForwardConfig:
    """The fold layout of `nexlify backtest --walk-forward` (the training settings are the pipeline's)."""

    fold_days: int = setting(30, "days in each fold's test window", lo=1)
    step_days: int = setting(0, "days between the ends of consecutive test windows (0 = fold_days: test windows "
                                "side by side); at least fold_days, so test windows never overlap", lo=0)
    folds: int = setting(4, "number of folds; the last test window ends at the data end (--end)", lo=1, hi=100)
    train_days: int = setting(0, "days of training data per fold, ending where its test window starts (0 = all "
                                 "data from --start: an expanding window)", lo=0)
    seeds: list[int] = setting([], "run the whole walk-forward once per seed (each the pipeline's --seed), in "
                                   "<output>/seed_<s>/, and count the fold-seeds won (empty: --seed alone, in "
                                   "<output>)")

    @property
    def step(self) -> int:
        return self.step_days or self.fold_days

    def check(self) -> None:
        if self.step < self.fold_days:
            raise InputError(f"--step-days {self.step_days} is shorter than --fold-days {self.fold_days}, so test "
                             "windows would overlap; accepted: 0 (= fold days) or at least --fold-days")
        for seed in self.seeds:
            if not 0 <= seed <= MAX_PIPELINE_SEED:
                raise InputError(f"--seeds: {seed} is out of range; accepted: integers in [0, {MAX_PIPELINE_SEED}]")
        if len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"--seeds {' '.join(map(str, self.seeds))} names a seed twice; accepted: distinct seeds")


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


def fold_row(fold: Fold, evaluation: dict, candidates: list[dict] | None = None) -> dict:
    """One table row: the fold's dates, the agent's test metrics, and each baseline's return and Sharpe.

    `evaluation` is `nexlify.evaluate_cmd.evaluate_checkpoint`'s result. Every entry of its `baselines`
    (name -> metrics with avg_return, avg_sharpe) becomes a comparison, and so does its per-pair
    `buy_and_hold` (averaged over pairs, like the agent's avg_return) when present. With `candidates` (every
    model the fold's pipeline tried, with its test return; see candidates_on_test) the row carries their
    summary under "candidates"."""
    agent = evaluation["agent"]
    exposure = agent.get("avg_exposure", agent.get("exposure"))
    baselines = {name: {"return": float(m["avg_return"]), "sharpe": _sharpe(m)}
                 for name, m in (evaluation.get("baselines") or {}).items()}
    bnh = evaluation.get(BUY_AND_HOLD_KEY)
    if bnh and BUY_AND_HOLD_KEY not in baselines:
        key = "sharpe_vs_lending" if all("sharpe_vs_lending" in m for m in bnh.values()) else "sharpe"
        baselines[BUY_AND_HOLD_KEY] = {"return": _mean_over_pairs(bnh, "total_return"),
                                       "sharpe": _mean_over_pairs(bnh, key)}
    excess = agent.get("excess_return_moments")
    own = None if excess is None else excess.get("sharpe")
    lending = (evaluation.get("baselines") or {}).get(CASH_PLUS_LENDING)
    v = verdict(float(agent["avg_return"]), None if lending is None else float(lending["avg_return"]), excess,
                [c.get("test_excess_sharpe") for c in candidates] if candidates else [own],
                window=f"fold {fold.index}, test {fold.test_start[:10]} .. {fold.test_end[:10]}")
    return {
        "fold": fold.index,
        **{k: v for k, v in fold.as_dict().items() if k != "index"},
        "verdict": v,
        "agent": {"return": float(agent["avg_return"]), "sharpe": _sharpe(agent),
                  "max_drawdown": float(agent["avg_drawdown"]), "trades": int(agent["total_trades"]),
                  "exposure": None if exposure is None else float(exposure)},
        "baselines": baselines,
        **({"candidates": candidates_on_test(candidates, baselines.get(CASH_PLUS_LENDING, {}).get("return"))}
           if candidates else {}),
    }


def candidates_on_test(candidates: list[dict], lending_return: float | None) -> dict:
    """Every model the fold's pipeline tried (its initial runs and retraining iterations), on the fold's test
    window. candidates: [{"source", "val_score", "test_return", "selected"}], exactly one selected.

    Returns the count, the median / mean / best test return, how many beat cash plus lending's return
    (strictly; None without it), the selected model's rank on test (1 = best; ties share the better rank)
    and the Spearman rank correlation between the validation score that selects and the test return (ties
    averaged; None with fewer than 3 candidates or when either side is constant). Near 0, choosing the best
    of them on validation picks no better than chance on the window after it."""
    returns = [float(c["test_return"]) for c in candidates]
    chosen = [c for c in candidates if c["selected"]]
    if len(chosen) != 1:
        raise ValueError(f"{len(chosen)} candidates are marked selected; expected exactly one")
    selected = float(chosen[0]["test_return"])
    return {
        "models": len(returns),
        "median_return": statistics.median(returns),
        "mean_return": statistics.fmean(returns),
        "best_return": max(returns),
        "beat_cash_plus_lending": None if lending_return is None else sum(r > lending_return for r in returns),
        "selected_source": chosen[0]["source"],
        "selected_rank": 1 + sum(r > selected for r in returns),
        "rank_correlation": _spearman([float(c["val_score"]) for c in candidates], returns),
    }


def _spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho: Pearson's correlation of the average ranks (pandas ranks, ties averaged)."""
    if len(x) < 3:
        return None
    rx, ry = pd.Series(x).rank().tolist(), pd.Series(y).rank().tolist()
    if len(set(rx)) == 1 or len(set(ry)) == 1:
        return None
    return statistics.correlation(rx, ry)


def comparators(rows: list[dict]) -> list[str]:
    """Baseline names in order of first appearance, cash + lending first, buy-and-hold last."""
    names: list[str] = []
    for row in rows:
        names += [n for n in row["baselines"] if n not in names]
    first = [n for n in (CASH_PLUS_LENDING,) if n in names]
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
    tested = [r["candidates"] for r in rows if r.get("candidates")]
    if tested:
        rhos = [c["rank_correlation"] for c in tested if c["rank_correlation"] is not None]
        beat = [c["beat_cash_plus_lending"] for c in tested if c["beat_cash_plus_lending"] is not None]
        out["candidates"] = {
            "folds": len(tested), "models": sum(c["models"] for c in tested),
            "mean_return": statistics.fmean(c["mean_return"] for c in tested),  # mean of the folds' means
            "beat_cash_plus_lending": sum(beat) if beat else None,
            "models_with_lending": sum(c["models"] for c in tested if c["beat_cash_plus_lending"] is not None),
            "mean_rank_correlation": statistics.fmean(rhos) if rhos else None,
            "selected_best_on_test": sum(c["selected_rank"] == 1 for c in tested),
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


def combine_seeds(by_seed: dict[int, list[dict]]) -> dict:
    """The same walk-forward run once per seed (`--seeds`), fold rows per seed (fold_row's), combined: per
    fold the seeds' returns and Sharpes and their mean; per baseline in how many fold-seeds the agent beats
    it (strictly, as in aggregate) and in how many folds it does so with most of the seeds (more than half).
    Four quarters are too few to tell one variant from another with one seed; this is the count that can.
    ValueError when the seeds' fold windows differ (they come from one fold plan)."""
    seeds = list(by_seed)
    windows = {s: [(r["fold"], r["test_start"], r["test_end"]) for r in rows] for s, rows in by_seed.items()}
    if len({tuple(w) for w in windows.values()}) > 1:
        raise ValueError(f"the seeds' fold windows differ: {windows}")
    first = by_seed[seeds[0]] if seeds else []
    by_fold = []
    for i, row in enumerate(first):
        rows = [by_seed[s][i] for s in seeds]
        returns = [r["agent"]["return"] for r in rows]
        by_fold.append({
            "fold": row["fold"], "test_start": row["test_start"], "test_end": row["test_end"],
            "returns": returns, "sharpes": [r["agent"]["sharpe"] for r in rows],  # in the order of "seeds"
            "mean_return": statistics.fmean(returns),
            "baselines": dict(row["baselines"]),  # the same window and costs for every seed: the first's
            "seeds_beating": {name: {"return": sum(r["agent"]["return"] > r["baselines"][name]["return"] for r in rows),
                                     "sharpe": sum(r["agent"]["sharpe"] > r["baselines"][name]["sharpe"] for r in rows)}
                              for name in row["baselines"] if all(name in r["baselines"] for r in rows)},
        })
    every = [r for rows in by_seed.values() for r in rows]
    versus = {}
    for name in comparators(every):
        folds = [f for f in by_fold if name in f["seeds_beating"]]
        versus[name] = {
            "fold_seeds": len(folds) * len(seeds),
            "beats_return": sum(f["seeds_beating"][name]["return"] for f in folds),
            "beats_sharpe": sum(f["seeds_beating"][name]["sharpe"] for f in folds),
            "folds": len(folds),
            "folds_most_seeds_return": sum(2 * f["seeds_beating"][name]["return"] > len(seeds) for f in folds),
            "folds_most_seeds_sharpe": sum(2 * f["seeds_beating"][name]["sharpe"] > len(seeds) for f in folds),
        }
    returns = [r["agent"]["return"] for r in every]
    return {
        "seeds": seeds, "folds": len(first),
        "agent": {"mean_return": statistics.fmean(returns) if returns else None,
                  "median_return": statistics.median(returns) if returns else None,
                  "mean_sharpe": statistics.fmean(r["agent"]["sharpe"] for r in every) if every else None},
        "by_fold": by_fold, "versus": versus,
    }


def render_seeds(combined: dict) -> str:
    """combine_seeds' lines: each fold's returns by seed, then the fold-seeds won against each baseline."""
    seeds = combined["seeds"]
    lines = [f"over {len(seeds)} seeds ({', '.join(map(str, seeds))}), {combined['folds']} folds each: agent's test "
             "return % by seed"]
    for f in combined["by_fold"]:
        by_seed = " / ".join(_num(r, ".2f") for r in f["returns"])
        lending = f["baselines"].get(CASH_PLUS_LENDING)
        beside = "" if lending is None else (
            f"; {CASH_PLUS_LENDING} {_num(lending['return'], '.2f')} %, beaten with "
            f"{f['seeds_beating'][CASH_PLUS_LENDING]['return']}/{len(seeds)} seeds on return, "
            f"{f['seeds_beating'][CASH_PLUS_LENDING]['sharpe']}/{len(seeds)} on Sharpe")
        lines.append(f"  fold {f['fold']} {f['test_start'][:10]} .. {f['test_end'][:10]}: {by_seed} (mean "
                     f"{_num(f['mean_return'], '.2f')}){beside}")
    a = combined["agent"]
    lines.append(f"  all fold-seeds: return mean {_num(a['mean_return'], '.2f')} %, median "
                 f"{_num(a['median_return'], '.2f')} %; Sharpe mean {_num(a['mean_sharpe'], '.2f')}")
    for name, v in combined["versus"].items():
        lines.append(f"  agent beats {name}: on return in {v['beats_return']}/{v['fold_seeds']} fold-seeds, on Sharpe "
                     f"in {v['beats_sharpe']}/{v['fold_seeds']}; with most seeds in {v['folds_most_seeds_return']}"
                     f"/{v['folds']} folds on return, {v['folds_most_seeds_sharpe']}/{v['folds']} on Sharpe")
    return "\n".join(lines)


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
             "of each pair's hourly return in excess of cash plus lending's, averaged over the pairs; a verdict "
             "below takes the whole book's hourly excess, so the two can differ, even in sign)", head]
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
    lines += _candidate_lines(rows, agg.get("candidates"))
    lines += [r["verdict"]["text"] for r in rows if r.get("verdict")]  # the verdict of each fold, last
    return "\n".join(lines)


def _candidate_lines(rows: list[dict], total: dict | None) -> list[str]:
    """Every model each fold's pipeline tried, on that fold's test window (candidates_on_test)."""
    if total is None:
        return []
    lines = ["every model each fold's pipeline tried, on the fold's test window (does choosing on validation carry "
             "over?):"]
    for r in rows:
        c = r.get("candidates")
        if not c:
            continue
        beat = "-" if c["beat_cash_plus_lending"] is None else f"{c['beat_cash_plus_lending']}/{c['models']}"
        lines.append(f"  fold {r['fold']}: {c['models']} models, test return median {_num(c['median_return'], '.2f')} "
                     f"%, best {_num(c['best_return'], '.2f')} %; {beat} beat cash plus lending; the selected "
                     f"{c['selected_source']} ranks {c['selected_rank']}/{c['models']}; rank correlation of "
                     f"validation score with test return {_num(c['rank_correlation'], '.2f')}")
    beat = ("-" if total["beat_cash_plus_lending"] is None
            else f"{total['beat_cash_plus_lending']}/{total['models_with_lending']}")
    lines.append(f"  all folds: {total['models']} models, mean test return {_num(total['mean_return'], '.2f')} %; {beat} "
                 f"beat cash plus lending; the selected model was the best on test in "
                 f"{total['selected_best_on_test']}/{total['folds']} folds; mean rank correlation "
                 f"{_num(total['mean_rank_correlation'], '.2f')}")
    return lines
