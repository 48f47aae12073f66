"""What the agent did, bar by bar: the greedy policy stepped through the environment over a window by
nexlify.evaluation.evaluate_policy itself (one single-pair portfolio per pair, all pairs as a batch, the
first decision at the close of bar i0-1), recording per bar through its observer what the report draws:

    equity, drawdown, the close, the spot position (0/1), exposure per strategy (share of equity held in
    spot coins, staked or unbonding coins, the LP position, the Aave supply, the arbitrage books), the PnL
    by source so far (nexlify.env.batched.PNL_SOURCES), and the trades: each entry, and each exit with its
    kind: "close" (the agent's), "stop", "trailing" (the trailing stop was the binding level), "target",
    or "exit" (a pending exit that completed when staked coins came free).

The metrics are evaluate_policy's own, plus tear-sheet figures from the equity curve (nexlify.report.metrics).
"""

from __future__ import annotations

import numpy as np
import torch

from nexlify.config import ALL_STRATEGIES, EnvConfig, RiskConfig
from nexlify.data.timeframes import iso_utc
from nexlify.env import risk
from nexlify.env.batched import CLOSE, OPEN_LONG, PNL_SOURCES, BatchedTradingEnv
from nexlify.env.market import MarketTensors
from nexlify.evaluation import BaselineStore, agent_rows, evaluate_policy, evaluate_with_stored_baselines
from nexlify.metrics import sharpe_from_sums
from nexlify.report.metrics import max_drawdown, tear_sheet
from nexlify.strategies.params import StrategyParams

EXPOSURES = ALL_STRATEGIES  # one exposure per strategy's book, in the config's order


@torch.no_grad()
def trace_policy(model: torch.nn.Module, market: MarketTensors, window: tuple[int, int], env_cfg: EnvConfig,
                 risk_cfg: RiskConfig, strategy_params: StrategyParams | None = None, *, margin: float) -> dict:
    """The greedy policy (with hold margin `margin`) over bars [i0, i1) with every bar recorded. Returns
    {"start", "end", "bars", "metrics": evaluate_policy's dict (averages, score, per_pair), "pairs": {pair:
    {"time": [iso...], "close", "equity", "drawdown", "position", "exposure": {strategy: [...]},
    "pnl": {source: [...]}, "trades": [{"bar", "time", "side", "kind", "price"}], "tear_sheet": {...}}}}."""
    rec = Recorder()
    metrics = evaluate_policy(model, market, window, env_cfg, risk_cfg, strategy_params, margin=margin,
                              observer=rec)
    return rec.trace(market, window, metrics, env_cfg, risk_cfg)


@torch.no_grad()
def trace_with_baselines(model: torch.nn.Module, market: MarketTensors, window: tuple[int, int], env_cfg: EnvConfig,
                         risk_cfg: RiskConfig, strategy_params: StrategyParams | None = None, *,
                         margin: float, baselines: BaselineStore | None = None) -> tuple[dict, dict]:
    """nexlify.evaluation.evaluate_with_baselines (with its curves) and trace_policy's trace of the agent from
    the same pass: (evaluation, trace), the trace's "metrics" the evaluation's agent metrics. One stepping of
    the agent, not two. `baselines`: where the pipeline stored its windows' baselines
    (evaluate_with_stored_baselines), read instead of stepped when they are there."""
    rec = Recorder(agent_rows(market))
    evaluated = evaluate_with_stored_baselines(model, market, window, env_cfg, risk_cfg, strategy_params, baselines,
                                               margin=margin, record=True, observer=rec)
    return evaluated, rec.trace(market, window, evaluated["agent"], env_cfg, risk_cfg)


class Recorder:
    """The observer that records a policy's steps (evaluate_policy's `observer`; the paper report replays a
    session's journal through it): called with the environment before each step and the actions that step
    takes, and once after the last step with None. `rows`: the policy's rows of the batch, one per pair
    (None: all of them)."""

    def __init__(self, rows: slice | None = None) -> None:
        self.rows = slice(None) if rows is None else rows
        self.rec: dict[str, list] = {k: [] for k in ("equity", "holding", "action", "entry", "highest", "pnl",
                                                     *EXPOSURES)}

    def __call__(self, env: BatchedTradingEnv, actions: torch.Tensor | None) -> None:
        """The state before each step (and after the last one), and the action each step takes."""
        rec, r = self.rec, self.rows
        if actions is not None:
            valid = env.mask[r].gather(-1, actions[r].unsqueeze(-1)).squeeze(-1)
            rec["action"].append(torch.where(valid, actions[r], 0)[:, 0].clone())
        eq = env.stats.equity[r].to(torch.float64).clone()
        rec["equity"].append(eq)
        rec["holding"].append(env.in_position[r, 0].clone())
        rec["entry"].append(env.entry[r, 0].to(torch.float64).clone())
        rec["highest"].append(env.highest[r, 0].to(torch.float64).clone())
        rec["pnl"].append(env.stats.pnl_rows[:, r].to(torch.float64).clone())
        close_now = env.close_now[r]
        close = close_now[:, 0].to(torch.float64)
        arb = {k: v[r] for k, v in env.arb_inventory.items()}
        arb_value = (arb["quote_a"] + arb["quote_b"] + arb["transit_quote"].abs()
                     + (arb["coin_a"] + arb["coin_b"] + arb["transit_coin"].abs()) * close_now)[:, 0]
        held = {"spot": env.units[r, 0] * close,
                "staking": (env.staked_units[r] + env.unbonding_units[r])[:, 0] * close,
                "lp": (env.lp_value[r] + env.lp_fees_accrued[r])[:, 0], "lending": env.lent[r, 0],
                "arbitrage": arb_value}
        for name in EXPOSURES:
            rec[name].append(held[name].to(torch.float64) / eq)

    def trace(self, market: MarketTensors, window: tuple[int, int], metrics: dict, env_cfg: EnvConfig,
              risk_cfg: RiskConfig) -> dict:
        """trace_policy's dict from what was recorded over bars [i0, i1) of `market`; `metrics`: the policy's
        (evaluate_policy's dict: averages, score, per_pair with costs_paid)."""
        i0, i1 = window
        rec = self.rec
        per_pair = metrics["per_pair"]
        stack = {k: torch.stack(v).cpu().numpy() for k, v in rec.items() if k != "pnl"}  # [bars(+1), pairs]
        pnl = torch.stack(rec["pnl"]).cpu().numpy()  # [bars+1, sources, pairs]
        bars = np.arange(i0 - 1, i1)
        times = [iso_utc(int(t)) for t in market.timestamps[bars]]
        prices = market.prices[i0 - 1:i1].to(torch.float64).cpu().numpy()  # [bars+1, pairs, 4]
        pairs = {}
        for i, pair in enumerate(market.pairs):
            equity = stack["equity"][:, i]
            peak = np.maximum.accumulate(equity)
            trades = _trades(stack, prices[:, i], i, times, risk_cfg, env_cfg.slippage_bps / 10_000.0)
            pairs[pair] = {
                "time": times,
                "close": prices[:, i, 3].tolist(),
                "first_open": float(prices[1, i, 0]),  # the first fill's open (buy-and-hold starts there)
                "equity": equity.tolist(),
                "drawdown": (100.0 * (equity / peak - 1.0)).tolist(),
                "position": stack["holding"][:, i].astype(int).tolist(),
                "exposure": {name: stack[name][:, i].tolist() for name in EXPOSURES},
                "pnl": {source: pnl[:, s, i].tolist() for s, source in enumerate(PNL_SOURCES)},
                "trades": trades,
                "tear_sheet": tear_sheet(equity, stack["holding"][1:, i], per_pair[pair]["costs_paid"]),
            }
        bar_ms = int(market.timestamps[1] - market.timestamps[0])
        return {"start": times[1], "end": iso_utc(int(market.timestamps[i1 - 1]) + bar_ms), "bars": i1 - i0,
                "metrics": metrics, "pairs": pairs}


def _trades(stack: dict, prices: np.ndarray, i: int, times: list[str], risk_cfg: RiskConfig,
            slip: float) -> list[dict]:
    """Entries and exits of pair i from the recorded positions; an exit the agent did not ask for is
    classified by the stop and target levels the bar met (risk.exits_in_bar, the environment's rule)."""
    out = []
    holding, action = stack["holding"][:, i], stack["action"][:, i]
    for k in range(len(action)):  # step k: decided at bar k's close, filled in bar k+1
        before, after = bool(holding[k]), bool(holding[k + 1])
        o, h, lo, _ = prices[k + 1]
        entry, highest = stack["entry"][k, i], stack["highest"][k, i]
        opened = int(action[k]) == OPEN_LONG and not before
        if opened:
            entry = highest = o * (1.0 + slip)  # the fill at the open, as the environment books it
            out.append({"bar": k + 1, "time": times[k + 1], "side": "entry", "kind": "entry",
                        "price": float(stack["entry"][k + 1, i]) if after else float(entry)})
        if (before or opened) and not after:
            if before and int(action[k]) == CLOSE:
                out.append({"bar": k + 1, "time": times[k + 1], "side": "exit", "kind": "close", "price": float(o)})
                continue
            kind, price = _forced_exit(o, h, lo, entry, highest, risk_cfg)
            out.append({"bar": k + 1, "time": times[k + 1], "side": "exit", "kind": kind, "price": price})
    return out


def _forced_exit(o: float, h: float, lo: float, entry: float, highest: float, r: RiskConfig) -> tuple[str, float]:
    t = lambda x: torch.tensor([float(x)], dtype=torch.float64)  # noqa: E731
    stop = risk.stop_level(t(entry), t(highest), r.stop_loss, r.trailing_stop)
    target = risk.take_profit_level(t(entry), r.take_profit)
    stop_hit, target_hit, px = risk.exits_in_bar(t(o), t(h), t(lo), stop, target)
    if bool(stop_hit):
        fixed = entry * (1.0 - r.stop_loss) if r.stop_loss > 0 else 0.0
        trailing = highest * (1.0 - r.trailing_stop) if r.trailing_stop > 0 else 0.0
        return ("trailing" if trailing > fixed else "stop"), float(px)
    if bool(target_hit):
        return "target", float(px)
    return "exit", float(o)


def buy_and_hold_curves(trace: dict, initial_equity: float) -> dict[str, dict]:
    """The yardstick drawn from the trace's own prices, per pair: the coin held from the first fill's open
    to the last close without fees (nexlify.evaluation.buy_and_hold's path and numbers).
    {pair: {name: {"equity": [...], "total_return": %, "sharpe", "max_drawdown"}}}."""
    out = {}
    for pair, p in trace["pairs"].items():
        close = np.asarray(p["close"])
        first_open = p["first_open"]
        path = np.concatenate([[first_open], close[1:]])
        hold = initial_equity * path / path[0]
        rets = path[1:] / path[:-1] - 1.0
        out[pair] = {"buy_and_hold (no fees)": {  # nexlify.evaluation.buy_and_hold's numbers, with the curve
                         "equity": hold.tolist(), "total_return": float((path[-1] / path[0] - 1.0) * 100.0),
                         "sharpe": sharpe_from_sums(float(rets.sum()), float((rets ** 2).sum()), len(rets)),
                         "max_drawdown": max_drawdown(path) * 100.0}}
    return out
