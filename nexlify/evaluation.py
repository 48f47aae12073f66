"""Greedy evaluation of a Q-network on a window of bars, one single-pair portfolio per pair, beside
baselines stepped through the same environment (nexlify.baselines).

The greedy policy takes its best valid action only when that action's Q-value beats hold's by the hold
margin (AgentConfig.hold_margin, greedy_policy): a gap smaller than the Q-estimates' noise is no reason
to pay a fee. Validation (so selection), `nexlify evaluate`, the walk-forward and the report all act this way.

Every policy (the agent, each baseline) trades each pair in its own portfolio; all of them step together
as one batch per environment config (the agent, flat, the random seeds, buy-and-hold at the risk budget,
the crossover and, with lending on, cash plus lending share one; buy-and-hold at full size runs under its
own risk config). Episodes of a batch never interact, so the agent's numbers are those it gets alone.

Besides the environment's statistics (nexlify.metrics.pair_metrics and the PnL by source), the loop over
bars keeps a few tensors per episode, with no Python loop over episodes:
- exposure: the share of bars at whose close the portfolio holds coins (free, staked or unbonding; spot
  trades), `exposure_any` the share holding anything besides cash (coins, an LP position, an Aave supply
  or an arbitrage book), and `exposure_by_strategy` the share per kind (spot, staking, lp, lending,
  arbitrage);
- turnover: traded notional / mean equity, where the traded notional is the sum over bars of the absolute
  cash that went into or came out of positions (entries at their cost incl. fees, exits at their
  proceeds, LP and arbitrage books opened and closed), lending supplies and withdrawals excluded (cash
  moved to Aave is not a trade). A round trip opened and stopped out inside one bar nets out and is not
  counted; trades inside an arbitrage book move no cash and are not counted;
- fees_paid: every fee, slippage, gas and withdrawal fee paid, in quote currency (the environment's costs,
  = -pnl_breakdown["fees_and_gas"]);
- sharpe_vs_lending (per pair; avg_sharpe_vs_lending): the annualised Sharpe of the hourly returns in
  excess of what cash plus lending earns (max_idle_share of the cash at the modelled Aave USDT supply
  rate), the riskless return of a USDT book here (riskless_return, nexlify.metrics.sharpe_vs_lending);
  `sharpe` (rf = 0) stays the score's;
- return_moments: n, mean, std (ddof=1), skewness and kurtosis (non-excess, population moments) of the
  per-bar returns of the policy's book (the pair portfolios' equities added up), and its per-bar Sharpe
  (mean / std); excess_return_moments: the same of the book's per-bar return minus lending's
  (nexlify.verdict.excess_moments): what the verdict's deflated Sharpe ratio needs.
With `record=True` each policy also returns its per-bar equity curve and positions per pair (plain lists).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from nexlify import baselines as bl
from nexlify.agent.dqn import NEG_INF, random_valid_actions
from nexlify.config import EnvConfig, RiskConfig
from nexlify.env import fused_portfolio
from nexlify.env.batched import PNL_SOURCES, BatchedTradingEnv
from nexlify.env.layout import HOLD
from nexlify.env.market import MarketTensors
from nexlify.features import WARMUP_BARS
from nexlify.metrics import average_metrics, pair_metrics, return_moments, sharpe_from_sums, sharpe_vs_lending
from nexlify.verdict import excess_moments
from nexlify.strategies import aave
from nexlify.strategies.params import HOURS_PER_YEAR, StrategyParams

AGENT = "agent"
EXPOSURE_KINDS = ("spot", "staking", "lp", "lending", "arbitrage")
_INTEREST = PNL_SOURCES.index("lending_interest")

# (observations [n, P, obs], mask [n, P, A], environment, the policy's rows of the batch) -> actions [n, P]
Policy = Callable[[Tensor, Tensor, BatchedTradingEnv, slice], Tensor]
Observer = Callable[[BatchedTradingEnv, "Tensor | None"], None]


@dataclass
class Group:
    """One policy: `copies` portfolios per pair (the random baseline's seeds), stepped in one batch."""

    name: str
    policy: Policy
    copies: int = 1
    rule: str = "policy"  # how the one pass decides for its rows: see BatchDecisions


def _check_window(window: tuple[int, int]) -> None:
    i0, _ = window
    if i0 - 1 < WARMUP_BARS:
        raise ValueError(f"evaluation window starts at bar {i0}, inside the {WARMUP_BARS}-bar feature warm-up")


@torch.no_grad()
def evaluate_policy(model: torch.nn.Module, market: MarketTensors, window: tuple[int, int], env_cfg: EnvConfig,
                    risk_cfg: RiskConfig, strategy_params: StrategyParams | None = None, *,
                    margin: float, record: bool = False, observer: Observer | None = None) -> dict:
    """Run the greedy policy over bars [i0, i1): the first decision is at the close of bar i0-1 (so the
    first fill is at i0's open) and the last fill at bar i1-1. Each pair trades in its own portfolio;
    all pairs step together as a batch. Returns average metrics, score and the per-pair table, each pair
    with its PnL broken down by source (`pnl_breakdown`, quote currency), exposure, turnover, fees paid
    and the return moments (see the module doc); with `record`, the curves under "curves"; `observer` sees
    every step (see `_simulate`). `margin`: the policy's hold margin (greedy_policy)."""
    _check_window(window)
    agent = Group(AGENT, greedy_policy(model, margin), rule="model")
    if fused_pass_possible(market, [env_cfg]):
        out = _one_pass(market, window, [(env_cfg, risk_cfg, agent)], strategy_params, record, model=model,
                        margin=margin, observer=observer)
    else:
        out = _simulate(market, window, env_cfg, risk_cfg, strategy_params, [agent], record, observer)
    metrics = out["results"][AGENT]
    if record:
        metrics["curves"] = {"bar_ms": out["bar_ms"], **out["curves"][AGENT]}
    return metrics


@torch.no_grad()
def evaluate_with_baselines(model: torch.nn.Module | None, market: MarketTensors, window: tuple[int, int],
                            env_cfg: EnvConfig, risk_cfg: RiskConfig, strategy_params: StrategyParams | None = None,
                            *, margin: float, record: bool = False,
                            seeds: tuple[int, ...] = bl.RANDOM_SEEDS, observer: Observer | None = None) -> dict:
    """The agent (greedy `model` with hold margin `margin`; None: baselines only) and every baseline of
    nexlify.baselines over the same window, in the same environment. Returns {"agent": metrics (as
    evaluate_policy), "baselines": {name: metrics}, "baseline_notes": {name: what it does and what was
    changed for it}} and, with `record`, "curves": {"bar_ms": [...], name: {...}} (see `_curves`).
    `observer` sees every step of the agent's batch as evaluate_policy's does; the agent's portfolios are
    its first rows, one per pair (agent_rows), so a report's trace comes from the pass that gave the metrics."""
    _check_window(window)
    plans, notes = _plans(model, market, env_cfg, risk_cfg, margin, seeds)
    if observer is not None and model is None:
        raise ValueError("an observer watches the agent's rows: it needs a model")
    if fused_pass_possible(market, [cfg for cfg, _, _ in plans]):
        out = _one_pass(market, window, plans, strategy_params, record, model=model, margin=margin, seeds=seeds,
                        observer=observer)
        results, curves, bar_ms = out["results"], out["curves"], out["bar_ms"]
    else:
        results, curves, bar_ms = _grouped(market, window, plans, strategy_params, record, observer)
    return _baseline_report(results, curves, bar_ms, notes, seeds, record)


BASELINES_VERSION = 1  # raised whenever a baseline's rule or metric changes: older stored baselines are not reused


class BaselineStore(Protocol):
    """Where a pipeline keeps the baselines of its windows (controller.worker's is the output's data snapshot
    folder): get(key) -> the stored JSON object or None; put(key, object)."""

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, value: dict) -> None: ...


def baselines_key(market: MarketTensors, window: tuple[int, int], env_cfg: EnvConfig, risk_cfg: RiskConfig,
                  strategy_params: StrategyParams | None, seeds: tuple[int, ...] = bl.RANDOM_SEEDS) -> str:
    """A digest of everything the baselines of a window depend on: the candles (prices, volume, tradability,
    the second venue's, the timestamps), the window, the environment, risk and strategy configs (the lending
    rate's path included) and the random baseline's seeds. Not the model and not the features: no baseline
    reads an observation. The same data snapshot, window and config give the same key; any change, another."""
    params = strategy_params or StrategyParams()
    what = {"version": BASELINES_VERSION, "pairs": list(market.pairs), "window": [int(window[0]), int(window[1])],
            "env": asdict(env_cfg), "risk": asdict(risk_cfg), "params": asdict(params), "seeds": [int(x) for x in seeds]}
    h = hashlib.sha256(json.dumps(what, sort_keys=True, default=repr).encode())
    arrays = [market.timestamps, market.prices, market.volume, market.tradable, market.venue2_prices,
              market.venue2_available]
    if params.aave.utilization_csv is not None:  # the file's numbers, not its name
        arrays.append(aave.utilization_path(params.aave, torch.as_tensor(np.asarray(market.timestamps))))
    for array in arrays:
        if array is not None:
            h.update(np.ascontiguousarray(array.cpu().numpy() if isinstance(array, Tensor) else array).tobytes())
    return h.hexdigest()[:32]


@torch.no_grad()
def evaluate_with_stored_baselines(model: torch.nn.Module, market: MarketTensors, window: tuple[int, int],
                                   env_cfg: EnvConfig, risk_cfg: RiskConfig,
                                   strategy_params: StrategyParams | None, store: BaselineStore | None, *,
                                   margin: float, record: bool = False, observer: Observer | None = None,
                                   seeds: tuple[int, ...] = bl.RANDOM_SEEDS) -> dict:
    """evaluate_with_baselines's result, the baselines computed once per data snapshot, window and config:
    read from `store` under baselines_key when it holds them (then only the agent is stepped), else stepped
    with the agent in one pass and put there (with their curves, so a report can draw them). The numbers are
    the same either way (the agent's rows step alone as they do beside the baselines). store None: no reuse."""
    if store is None:
        return evaluate_with_baselines(model, market, window, env_cfg, risk_cfg, strategy_params, margin=margin,
                                       record=record, seeds=seeds, observer=observer)
    key = baselines_key(market, window, env_cfg, risk_cfg, strategy_params, seeds)
    stored = store.get(key)
    if stored is not None and stored.get("key") == key:
        agent = evaluate_policy(model, market, window, env_cfg, risk_cfg, strategy_params, margin=margin,
                                record=record, observer=observer)
        out = {"agent": agent, "baselines": stored["baselines"], "baseline_notes": stored["baseline_notes"]}
        if record:
            curves = agent.pop("curves")
            out["curves"] = {**stored["curves"], AGENT: {k: v for k, v in curves.items() if k != "bar_ms"}}
        return out
    out = evaluate_with_baselines(model, market, window, env_cfg, risk_cfg, strategy_params, margin=margin,
                                  record=True, seeds=seeds, observer=observer)
    curves = out["curves"] if record else out.pop("curves")
    store.put(key, {"key": key, "baselines": out["baselines"], "baseline_notes": out["baseline_notes"],
                    "curves": {k: v for k, v in curves.items() if k != AGENT}})
    return out


class FolderBaselines:
    """A BaselineStore in a local folder: <folder>/<key>.json (a pipeline's stored baselines copied beside
    its data snapshot for the report). A file that cannot be read as JSON counts as absent: recomputed."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def get(self, key: str) -> dict | None:
        import os

        try:
            with open(os.path.join(self.folder, f"{key}.json"), encoding="utf-8") as fh:
                value = json.load(fh)
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict) -> None:
        import os

        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"{key}.json"), "w", encoding="utf-8") as fh:
            json.dump(value, fh)


def agent_rows(market: MarketTensors) -> slice:
    """The agent's rows in evaluate_with_baselines's batch (what its observer sees): the first, one per pair."""
    return slice(0, len(market.pairs))


@torch.no_grad()
def evaluate_with_baselines_grouped(model: torch.nn.Module | None, market: MarketTensors, window: tuple[int, int],
                                    env_cfg: EnvConfig, risk_cfg: RiskConfig,
                                    strategy_params: StrategyParams | None = None, *, margin: float,
                                    record: bool = False, seeds: tuple[int, ...] = bl.RANDOM_SEEDS) -> dict:
    """evaluate_with_baselines the way it is computed without the fused CPU kernel: one batch per distinct
    (environment config, risk config), each policy called for its own rows at every step. The same numbers as
    the one pass (the tests compare the two)."""
    _check_window(window)
    plans, notes = _plans(model, market, env_cfg, risk_cfg, margin, seeds)
    results, curves, bar_ms = _grouped(market, window, plans, strategy_params, record)
    return _baseline_report(results, curves, bar_ms, notes, seeds, record)


def _plans(model: torch.nn.Module | None, market: MarketTensors, env_cfg: EnvConfig, risk_cfg: RiskConfig,
           margin: float, seeds: tuple[int, ...]) -> tuple[list[tuple[EnvConfig, RiskConfig, Group]], dict[str, str]]:
    """Every policy of evaluate_with_baselines with the environment and risk config it runs under, and the
    notes that say what each baseline does."""
    pairs = market.pairs
    n_pairs = len(pairs)
    notes: dict[str, str] = {}
    spot_cfg, spot_added = bl.with_strategy(env_cfg, "spot")
    spot_note = " Spot was off in the model's config; this baseline ran with spot switched on." if spot_added else ""
    lend_cfg, lend_added = bl.with_strategy(env_cfg, "lending")
    full_risk = bl.full_size_risk(risk_cfg)
    signal = bl.ma_long_signal(market.prices[..., 3])

    def ma_policy(obs: Tensor, mask: Tensor, env: BatchedTradingEnv, rows: slice) -> Tensor:
        # the signal at each episode's decision bar t (its closes of bars <= t only)
        return bl.ma_crossover(mask, signal[env.t[rows].unsqueeze(-1), env._pair_bp[rows]])

    generators = [torch.Generator(device=market.prices.device).manual_seed(int(s)) for s in seeds]

    def random_policy(obs: Tensor, mask: Tensor, env: BatchedTradingEnv, rows: slice) -> Tensor:
        return torch.cat([random_valid_actions(mask[i * n_pairs:(i + 1) * n_pairs], g)
                          for i, g in enumerate(generators)])

    plans: list[tuple[EnvConfig, RiskConfig, Group]] = []
    if model is not None:
        plans.append((env_cfg, risk_cfg, Group(AGENT, greedy_policy(model, margin), rule="model")))
    plans.append((bl.without_strategy(env_cfg, "lending"), risk_cfg,
                  Group(bl.FLAT, lambda obs, mask, env, rows: bl.flat(mask), rule="hold")))
    notes[bl.FLAT] = "Always hold with lending off (no sweep): all cash, no costs."
    plans.append((lend_cfg, risk_cfg, Group(bl.CASH_PLUS_LENDING, lambda obs, mask, env, rows: bl.take_lend(mask),
                                                      rule="lend")))
    notes[bl.CASH_PLUS_LENDING] = ("Hold and let the sweep lend (with the sweep off: LEND whenever the mask "
                                   "allows it; the environment decides how much).") + (
        " Lending was off in the model's config; this baseline ran with lending switched on." if lend_added else "")
    def buy(obs: Tensor, mask: Tensor, env: BatchedTradingEnv, rows: slice) -> Tensor:
        return bl.buy_when_flat(mask)

    plans.append((spot_cfg, full_risk, Group(bl.BUY_AND_HOLD_FULL, buy, rule="buy")))
    notes[bl.BUY_AND_HOLD_FULL] = (
        "Buy at the first tradable open with all the equity and hold: the model's risk config with "
        "max_position=1, fixed_size=1 (the order is scaled to the cash, so fees come out of the position), "
        "kelly off, stop_loss=take_profit=trailing_stop=0 and daily_loss_limit=0." + spot_note)
    plans.append((spot_cfg, risk_cfg, Group(bl.BUY_AND_HOLD_SIZED, buy, rule="buy")))
    notes[bl.BUY_AND_HOLD_SIZED] = ("open_long whenever flat and allowed, under the model's own risk config "
                                    "(per-trade cap, Kelly, stops, targets, daily loss limit)." + spot_note)
    plans.append((spot_cfg, risk_cfg, Group(bl.MA_CROSSOVER, ma_policy, rule="ma")))
    notes[bl.MA_CROSSOVER] = (f"Long while the {bl.MA_FAST}-bar mean of the closes of bars <= t is above the "
                              f"{bl.MA_SLOW}-bar mean (open when allowed, close when it falls to or below); the "
                              "model's risk config." + spot_note)
    if seeds:
        plans.append((env_cfg, risk_cfg, Group(bl.RANDOM_VALID, random_policy, copies=len(seeds), rule="random")))
        notes[bl.RANDOM_VALID] = (f"Uniform over the valid actions, the mean over seeds {list(seeds)} "
                                  "(a seeded torch.Generator each).")

    return plans, notes


def _grouped(market: MarketTensors, window: tuple[int, int], plans: list[tuple[EnvConfig, RiskConfig, Group]],
             strategy_params: StrategyParams | None, record: bool,
             observer: Observer | None = None) -> tuple[dict, dict, list[int]]:
    """The plans stepped as one batch per distinct (environment config, risk config), each group's policy
    called for its rows; `observer` watches the first batch (the agent's, its rows first)."""
    # one batch per distinct (environment config, risk config)
    batches: list[tuple[EnvConfig, RiskConfig, list[Group]]] = []
    for cfg, risk, group in plans:
        for bcfg, brisk, groups in batches:
            if bcfg == cfg and brisk == risk:
                groups.append(group)
                break
        else:
            batches.append((cfg, risk, [group]))
    results: dict[str, dict] = {}
    curves: dict[str, dict] = {}
    bar_ms: list[int] = []
    for i, (cfg, risk, groups) in enumerate(batches):
        out = _simulate(market, window, cfg, risk, strategy_params, groups, record, observer if i == 0 else None)
        results.update(out["results"])
        if record:
            curves.update(out["curves"])
            bar_ms = out["bar_ms"]
    return results, curves, bar_ms


def _baseline_report(results: dict, curves: dict, bar_ms: list[int], notes: dict[str, str], seeds: tuple[int, ...],
                     record: bool) -> dict:
    if seeds:
        results[bl.RANDOM_VALID]["seeds"] = [int(s) for s in seeds]
    report = {"agent": results.pop(AGENT, None),
              "baselines": {name: results[name] for name in bl.BASELINES if name in results},
              "baseline_notes": notes}
    if record:
        report["curves"] = {"bar_ms": bar_ms, **curves}
    return report


def evaluate_rules(market: MarketTensors, window: tuple[int, int], env_cfg: EnvConfig, risk_cfg: RiskConfig,
                   strategy_params: StrategyParams | None, rules: dict[str, Policy]) -> dict[str, dict]:
    """Fixed rules over rows (each a Policy; the planted markets' oracles, nexlify.oracles), each pair in its
    own portfolio, stepped together in one batch through the same environment as the agent and the baselines:
    {name: metrics as evaluate_policy's}."""
    _check_window(window)
    groups = [Group(name, policy) for name, policy in rules.items()]
    with torch.no_grad():
        return _simulate(market, window, env_cfg, risk_cfg, strategy_params, groups, False)["results"]


def greedy_policy(model: torch.nn.Module, margin: float) -> Policy:
    """The agent's greedy choice among the valid actions (the model in eval mode for the call), taken only
    when its Q-value beats hold's by at least `margin` (AgentConfig.hold_margin), else hold."""

    def act(obs: Tensor, mask: Tensor, env: BatchedTradingEnv, rows: slice) -> Tensor:
        was_training = model.training
        model.eval()
        q = model(obs)
        model.train(was_training)
        return hold_unless_margin(torch.where(mask, q, NEG_INF), margin)

    return act


def hold_unless_margin(q: Tensor, margin: float) -> Tensor:
    """The argmax of q [..., actions] (invalid actions already at NEG_INF; hold is always valid) where it
    beats hold's Q by at least `margin`, else HOLD. margin 0 is the plain argmax."""
    best = q.argmax(dim=-1)
    if margin <= 0:
        return best
    gap = q.gather(-1, best.unsqueeze(-1)).squeeze(-1) - q[..., HOLD]
    return torch.where(gap >= margin, best, torch.full_like(best, HOLD))


def _rows(groups: list[Group], n_pairs: int, i0: int, device) -> tuple[list[slice], Tensor, Tensor]:
    """The batch's rows: each group's span (its copies x pairs, one pair per portfolio), every row's pair
    index [B, 1] and its start bar (the bar before the window's first) [B]."""
    spans, cols, first = [], [], 0
    for g in groups:
        spans.append(slice(first, first + g.copies * n_pairs))
        cols += list(range(n_pairs)) * g.copies
        first += g.copies * n_pairs
    pair_idx = torch.tensor(cols, dtype=torch.int64, device=device).unsqueeze(1)
    return spans, pair_idx, torch.full((first,), i0 - 1, dtype=torch.int64, device=device)


def _simulate(market: MarketTensors, window: tuple[int, int], env_cfg: EnvConfig, risk_cfg: RiskConfig,
              strategy_params: StrategyParams | None, groups: list[Group], record: bool,
              observer: Observer | None = None) -> dict:
    """Step every group's portfolios (copies x pairs each, one pair per portfolio) over the window in one
    batch; return {"results": {name: metrics}, "curves": {name: ...}, "bar_ms": [...]}. `observer(env,
    actions)` is called before each step with the actions about to be taken, and once after the last step
    with None (nexlify.report.trace records what the agent did through it)."""
    i0, i1 = window
    n_steps = i1 - i0
    n_pairs = len(market.pairs)
    device = market.prices.device
    spans, pair_idx, start = _rows(groups, n_pairs, i0, device)
    B = pair_idx.shape[0]
    env = BatchedTradingEnv(market, pair_idx, start, n_steps, env_cfg, risk_cfg, strategy_params)
    obs = env.reset()
    e0 = float(env.stats.initial_equity)
    equity = torch.empty((n_steps + 1, B), dtype=torch.float64, device=device)
    equity[0] = e0
    held = torch.zeros((n_steps, len(EXPOSURE_KINDS), B), dtype=torch.bool, device=device)
    traded = torch.zeros(B, dtype=torch.float64, device=device)
    cash_prev, lent_prev, interest_prev = env.cash.to(torch.float64).clone(), _lent(env), _interest(env)
    k, done = 0, False
    while not done:
        mask = env.mask
        actions = torch.cat([g.policy(obs[rows], mask[rows], env, rows) for g, rows in zip(groups, spans)])
        if observer is not None:
            observer(env, actions)
        obs, _, done = env.step(actions)
        equity[k + 1] = env.equity
        held[k] = _holdings(env)
        # the cash that went into or came out of positions this bar (P = 1: the slot's flow), lending excluded:
        # the change of the Aave supply less its interest is what was supplied minus what was withdrawn
        cash, lent, interest = env.cash.to(torch.float64).clone(), _lent(env), _interest(env)
        traded += (cash - cash_prev + (lent - lent_prev) - (interest - interest_prev)).abs()
        cash_prev, lent_prev, interest_prev = cash, lent, interest
        k += 1
    if observer is not None:
        observer(env, None)

    return _summarise(market, window, strategy_params, groups, spans, env.stats, equity, held, traded, record)


def fused_pass_possible(market: MarketTensors, configs: list[EnvConfig]) -> bool:
    """Rows of several configs can step in one pass of the fused CPU kernel: the market is on the CPU, every
    config leaves the kernel to "auto" (the kernel the environment picks on the CPU) and uses one precision."""
    return (market.prices.device.type == "cpu" and fused_portfolio.available()
            and all(c.kernel == "auto" for c in configs) and len({c.precision for c in configs}) == 1
            and len({(c.fee, c.slippage_bps, c.initial_equity, c.drawdown_penalty) for c in configs}) == 1)


class BatchDecisions:
    """Every row's action at one bar, for a batch whose rows belong to several policies (the groups, laid out
    one after the other: copies x pairs rows each): the agent's rows by one call of its greedy policy, the
    baselines' rules vectorised over their rows (flat holds; cash plus lending LENDs where allowed; buy-and-hold
    OPEN_LONGs where allowed; the crossover OPEN_LONGs where its signal holds and CLOSEs where it does not),
    and the random rows from draws made for the whole window at once (the same numbers each seeded generator
    gives step by step). Call it with the observation and mask at step k; it returns actions [B, P]."""

    def __init__(self, groups: list[Group], spans: list[slice], env: BatchedTradingEnv, n_steps: int, *,
                 model: torch.nn.Module | None = None, margin: float = 0.0, signal: Tensor | None = None,
                 seeds: tuple[int, ...] = ()) -> None:
        from nexlify.env.layout import CLOSE, LEND, OPEN_LONG

        B, P, dev = env.B, env.P, env.device
        self.model, self.margin = model, margin
        self.agent = next((rows for g, rows in zip(groups, spans) if g.rule == "model"), None)
        self.random = next((rows for g, rows in zip(groups, spans) if g.rule == "random"), None)
        # the action each rule row wants at each step; taken where the mask allows it, else hold
        want = torch.full((n_steps, B, P), HOLD, dtype=torch.int64, device=dev)
        for g, rows in zip(groups, spans):
            if g.rule == "lend":
                want[:, rows] = LEND
            elif g.rule == "buy":
                want[:, rows] = OPEN_LONG
            elif g.rule == "ma":
                bars = env.start[rows].unsqueeze(0) + torch.arange(n_steps, device=dev).unsqueeze(1)  # [n, rows]
                sig = signal[bars.unsqueeze(-1), env._pair_bp[rows].unsqueeze(0)]  # the signal at each decision bar
                want[:, rows] = torch.where(sig, OPEN_LONG, CLOSE)
            elif g.rule not in ("hold", "model", "random"):
                raise ValueError(f"no vectorised rule {g.rule!r} for group {g.name}")
        # numpy from here on: a decision step reads the kernel's mask (a numpy buffer) and writes int64 actions;
        # on arrays this small numpy's calls cost a few microseconds less than torch's
        A = env.mask.shape[-1]
        flat_rows = (torch.arange(B * P, device=dev) * A).view(1, B, P)
        self.want = want.numpy()  # [n, B, P]
        self.want_at = (flat_rows + want).numpy()  # where in the flattened mask each wanted action sits
        self.draws = None
        if self.random is not None:
            n_rows = self.random.stop - self.random.start
            per_seed = n_rows // len(seeds)
            gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
            # [n, rows, P]: torch.rand draws in order, so a window's draws at once are the steps' draws one by one
            self.draws = torch.cat([torch.rand((n_steps, per_seed, P), device=dev, generator=g) for g in gens],
                                   1).numpy()
        self.out = np.empty((B, P), dtype=np.int64)
        self.out_t = torch.from_numpy(self.out)
        self.q, self.flat = _q_function(model) if model is not None else (None, False)
        # numpy views of the masks and the agent's observation rows, made once per buffer: the bound kernel
        # writes two sets of buffers in turn (FusedPortfolioStep.bind), so two entries each
        self._masks: dict[int, tuple[Tensor, np.ndarray]] = {}
        self._obs: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, obs: Tensor, mask: Tensor, k: int) -> Tensor:
        m = self._masks.get(id(mask))
        if m is None or m[0] is not mask:
            m = self._masks[id(mask)] = (mask, mask.numpy())
        m = m[1]
        act = self.out
        np.copyto(act, np.where(m.reshape(-1)[self.want_at[k]], self.want[k], HOLD))
        if self.random is not None:
            rows = self.random
            act[rows] = _kth_valid(m[rows], self.draws[k])
        if self.agent is not None:
            rows = self.agent
            x = self._obs.get(id(obs))
            if x is None or x[0] is not obs:
                view = obs[rows]
                x = self._obs[id(obs)] = (obs, view.reshape(-1, view.shape[-1]) if self.flat else view)
            mask_rows = m[rows]
            q = self.q(x[1]).numpy().reshape(mask_rows.shape)
            act[rows] = greedy_actions(q, mask_rows, self.margin)
        return self.out_t


def greedy_actions(q: np.ndarray, mask: np.ndarray, margin: float) -> np.ndarray:
    """hold_unless_margin(torch.where(mask, q, NEG_INF), margin) on numpy arrays, in the same float32
    arithmetic (torch compares a float32 tensor with a Python number in float32; argmax takes the first
    largest, as torch's does): a few microseconds instead of a dozen torch calls."""
    qm = np.where(mask, q, np.float32(NEG_INF))
    best = qm.argmax(-1)
    if margin <= 0:
        return best
    gap = qm.max(-1) - qm[..., HOLD]  # the largest is the value at best
    return np.where(gap >= np.float32(margin), best, HOLD)


def _q_function(model: torch.nn.Module) -> tuple[Callable[[Tensor], Tensor], bool]:
    """model's forward, and whether it takes the rows flattened to [rows, obs]: for a DuelingQNet its layers
    called directly on the flattened rows (the same operations in the same order, so the same numbers:
    without nn.Module's per-call work, and a linear layer on [rows, obs] costs a third of one on
    [rows, 1, obs]; together a tenth of a millisecond a step when the batch is a few rows)."""
    from torch.nn import functional as F

    from nexlify.agent.dqn import DuelingQNet

    torso = list(getattr(model, "torso", []))
    plain = (type(model) is DuelingQNet and len(torso) % 2 == 0
             and all(type(a) is torch.nn.Linear and type(b) is torch.nn.ReLU for a, b in zip(torso[::2], torso[1::2])))
    if not plain:
        return model, False
    layers = [(a.weight, a.bias) for a in torso[::2]]
    value, advantage = (model.value.weight, model.value.bias), (model.advantage.weight, model.advantage.bias)

    def q(x: Tensor) -> Tensor:
        for w, b in layers:
            x = torch.relu(F.linear(x, w, b))
        adv = F.linear(x, *advantage)
        return F.linear(x, *value) + adv - adv.mean(dim=-1, keepdim=True)

    return q, True


def _kth_valid(mask: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """nexlify.agent.dqn.random_valid_actions with its uniform draws given, in numpy (the same arithmetic: the
    float32 draw times the float32 count, truncated)."""
    count = mask.sum(-1, dtype=np.int32)
    k = np.minimum((draw * count.astype(np.float32)).astype(np.int32), count - 1) + 1
    rank = mask.cumsum(-1, dtype=np.int32)
    return ((rank == k[..., None]) & mask).argmax(-1)


def step_bar(env: BatchedTradingEnv, obs: Tensor, decide: Callable[[Tensor, Tensor, int], Tensor],
             k: int) -> tuple[Tensor, Tensor, bool, Tensor]:
    """One bar for a batch of rows: the policy decides at the close of bar t on the observation and mask
    (decide(obs, mask, k), e.g. a BatchDecisions), the environment fills at t+1. Returns (observation at t+1,
    reward, done, the actions taken)."""
    actions = decide(obs, env.mask, k)
    obs, reward, done = env.step(actions)
    return obs, reward, done, actions


def _one_pass(market: MarketTensors, window: tuple[int, int], plans: list[tuple[EnvConfig, RiskConfig, Group]],
              strategy_params: StrategyParams | None, record: bool, *, model: torch.nn.Module | None = None,
              margin: float = 0.0, seeds: tuple[int, ...] = (), observer: Observer | None = None) -> dict:
    """Every plan's rows (copies x pairs each) stepped in ONE pass of the fused CPU kernel: one environment
    laid out for all the strategies any plan uses, each row with its own config's parameters (costs, risk rules,
    strategy switches) and starting from the state its own config's reset gives, the kernel's arguments bound
    once (FusedPortfolioStep.bind), the decisions made by BatchDecisions. The numbers are those of each plan
    stepped alone (_grouped; the tests compare them). Returns what _simulate returns."""
    i0, i1 = window
    n_steps = i1 - i0
    n_pairs = len(market.pairs)
    device = market.prices.device
    groups = [g for _, _, g in plans]
    if observer is not None and groups[0].rule != "model":
        raise ValueError("the observer watches the agent's rows, the first of the pass")
    spans, pair_idx, start = _rows(groups, n_pairs, i0, device)
    B = pair_idx.shape[0]
    base_cfg, base_risk = plans[0][0], plans[0][1]
    strategies = list(base_cfg.strategies)
    for cfg, _, _ in plans:
        strategies += [s for s in cfg.strategies if s not in strategies]
    union = replace(base_cfg, strategies=strategies)
    env = BatchedTradingEnv(market, pair_idx, start, n_steps, union, base_risk, strategy_params)
    fused = env._fused
    if fused is None or any(r.kelly_window != base_risk.kelly_window for _, r, _ in plans):
        raise ValueError("the one pass needs the fused CPU kernel and one Kelly window")
    # each plan's rows start where its own config's reset leaves them, and step with its parameters
    names = (fused_portfolio.SLOT_FLOATS + fused_portfolio.SLOT_INTS + fused_portfolio.SLOT_BOOLS
             + fused_portfolio.EPISODE_FLOATS + fused_portfolio.EPISODE_INTS + fused_portfolio.EPISODE_F64)
    state = {n: fused_portfolio._state_attr(env, n).clone() for n in names}
    mask, blocked, obs = env.mask.clone(), env.blocked.clone(), env.observe().clone()
    ring, head, pnl = env.trade_ring.clone(), env.trade_head.clone(), env.stats.pnl_rows.clone()
    for (cfg, risk, _), rows in zip(plans, spans):
        own = BatchedTradingEnv(market, pair_idx[rows], start[rows], n_steps, cfg, risk, strategy_params)
        for n in names:
            state[n][..., rows] = fused_portfolio._state_attr(own, n)
        mask[rows], blocked[rows], obs[rows] = own.mask, own.blocked, own.observe()
        ring[rows], head[rows], pnl[:, rows] = own.trade_ring, own.trade_head, own.stats.pnl_rows
        fused.set_row_params(rows, own._fused)
    fused_portfolio._set_state(env, list(state.items()))
    env.mask, env.blocked, env.trade_ring, env.trade_head = mask, blocked, ring, head
    env.stats.pnl_rows = pnl
    fused.bind(env)

    decide = BatchDecisions(groups, spans, env, n_steps, model=model, margin=margin,
                            signal=bl.ma_long_signal(market.prices[..., 3]), seeds=seeds)
    # what each step leaves, read from the kernel's packed outputs (numpy views, no tensor op per step): equity,
    # cash, the Aave interest so far and the slots' holdings; the exposure and turnover are computed after the loop
    fp = fused_portfolio
    full = env._fused.groups is fp.GROUPS
    slot_rows = np.array([fp.UNITS, fp.STAKED, fp.UNBONDING, fp.LP_L, fp.LENT] if full else [fp.UNITS])
    ef_rows = np.array([fp.EQUITY, fp.CASH])
    ef_h = np.empty((n_steps + 1, B, 2), dtype=fused._packed["ef"].dtype)  # equity, cash
    interest_h = np.empty((n_steps + 1, B), dtype=np.float64)
    slots_h = np.empty((n_steps + 1, B, len(slot_rows), env.P), dtype=fused._packed["sf"].dtype)
    book_h = np.zeros((n_steps + 1, B, env.P), dtype=np.bool_)
    pnl_rows = env.stats.pnl_rows.numpy()  # the kernel adds to it in place

    def keep(k: int) -> None:
        packed = fused._packed
        np.take(packed["ef"], ef_rows, axis=1, out=ef_h[k])
        np.take(packed["sf"], slot_rows, axis=1, out=slots_h[k])
        if full:
            book_h[k] = packed["sb"][:, fp.BOOK]
        interest_h[k] = pnl_rows[_INTEREST]

    keep(0)
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        for k in range(n_steps):
            actions = decide(obs, env.mask, k)
            if observer is not None:
                observer(env, actions)
            obs, _, _ = env.step(actions)
            keep(k + 1)
    finally:
        if model is not None:
            model.train(was_training)
    if observer is not None:
        observer(env, None)
    equity = torch.from_numpy(ef_h[..., 0]).to(torch.float64)
    equity[0] = float(env.stats.initial_equity)
    slots = torch.from_numpy(slots_h[1:])  # [n, B, rows, P]
    no = torch.zeros((n_steps, B), dtype=torch.bool)
    if full:
        units, staked, unbonding, lp, lent = slots.unbind(2)
        coins = staked + unbonding
        held = torch.stack([(units + staked + unbonding > 0).any(-1), (coins > 0).any(-1), (lp > 0).any(-1),
                            (lent > 0).any(-1), torch.from_numpy(book_h[1:]).any(-1)], 1)
        lent_sum = torch.from_numpy(slots_h[:, :, 4]).sum(-1).to(torch.float64)  # [n+1, B]
    else:
        held = torch.stack([(slots[:, :, 0] > 0).any(-1), no, no, no, no], 1)
        lent_sum = torch.zeros((n_steps + 1, B), dtype=torch.float64)
    # the cash that went into or came out of positions at each bar, lending excluded (see _simulate), summed in
    # bar order
    cash = torch.from_numpy(ef_h[..., 1]).to(torch.float64)
    interest = torch.from_numpy(interest_h)
    dc, dl, di = cash[1:] - cash[:-1], lent_sum[1:] - lent_sum[:-1], interest[1:] - interest[:-1]
    traded = (dc + dl - di).abs().cumsum(0)[-1]
    return _summarise(market, window, strategy_params, groups, spans, env.stats, equity, held, traded, record)


def _summarise(market: MarketTensors, window: tuple[int, int], strategy_params: StrategyParams | None,
               groups: list[Group], spans: list[slice], st, equity: Tensor, held: Tensor, traded: Tensor,
               record: bool) -> dict:
    """Each group's metrics from what the steps recorded: equity [n+1, B], held [n, kinds, B], traded [B]."""
    i0, i1 = window
    n_pairs = len(market.pairs)
    bar_returns = (equity[1:] / equity[:-1] - 1.0).cpu().numpy()  # [n_steps, B]
    risk_free = riskless_return(market, window, strategy_params or StrategyParams())
    exposure = held.to(torch.float64).mean(0)  # [kinds, B]
    exposure_any = held.any(1).to(torch.float64).mean(0)
    turnover = traded / equity[1:].t().contiguous().mean(-1)  # row by row: the same sum whatever the batch
    results, curves = {}, {}
    for g, rows in zip(groups, spans):
        copies = []
        for c in range(g.copies):
            per_pair = {}
            for j, pair in enumerate(market.pairs):
                i = rows.start + c * n_pairs + j
                m = pair_metrics(float(st.equity[i]), st.initial_equity, float(st.ret_sum[i]), float(st.ret_sq_sum[i]),
                                 st.n_returns, float(st.max_drawdown[i]), int(st.trades[i]), int(st.wins[i]),
                                 pnl_breakdown=st.pnl_breakdown(i))
                m["sharpe_vs_lending"] = sharpe_vs_lending(bar_returns[:, i], risk_free)
                m["costs_paid"] = float(st.costs[i])
                m["fees_paid"] = float(st.costs[i])
                m["exposure"] = float(exposure[0, i])
                m["exposure_any"] = float(exposure_any[i])
                m["exposure_by_strategy"] = {kind: float(exposure[j_kind, i])
                                             for j_kind, kind in enumerate(EXPOSURE_KINDS)}
                m["turnover"] = float(turnover[i])
                per_pair[pair] = m
            copies.append(per_pair)
        per_pair = (copies[0] if g.copies == 1
                    else {pair: _mean_of([cp[pair] for cp in copies]) for pair in market.pairs})
        metrics = _with_extras(average_metrics(per_pair))
        book = equity[:, rows].sum(1)
        book_returns = (book[1:] / book[:-1] - 1.0).cpu().numpy()
        metrics["return_moments"] = return_moments(book_returns)
        metrics["excess_return_moments"] = excess_moments(book_returns, risk_free)  # the verdict's (nexlify.verdict)
        if g.copies > 1:
            metrics["copies_avg_return"] = [sum(cp[p]["total_return"] for p in cp) / n_pairs for cp in copies]
        results[g.name] = metrics
        if record:
            curves[g.name] = _curves(market.pairs, equity[:, rows], held[:, 0, rows], held.any(1)[:, rows], g.copies)
    bar_ms = market.timestamps[i0 - 1:i1].tolist() if record else []
    return {"results": results, "curves": curves, "bar_ms": bar_ms}


def riskless_return(market: MarketTensors, window: tuple[int, int], params: StrategyParams) -> np.ndarray:
    """[n_steps] what cash plus lending earns in each bar of the window: max_idle_share of the idle USDT in
    Aave, growing by the supply rate / 8760 (the environment's growth of a supply, less 1). The riskless
    return a USDT book has on offer here, whether or not the model lends: the risk-free rate of
    nexlify.metrics.sharpe_vs_lending. (With the sweep it is cash plus lending's return to the last bit.)"""
    i0, i1 = window
    utilization = aave.utilization_path(params.aave, torch.as_tensor(np.asarray(market.timestamps[i0:i1])))
    rate = aave.supply_rate_for(utilization, params.aave) / HOURS_PER_YEAR
    return (params.aave.max_idle_share * rate).numpy()


def riskless_total_return(market: MarketTensors, window: tuple[int, int], params: StrategyParams) -> float:
    """What riskless_return compounds to over the window, in percent: cash plus lending's return there."""
    return float(np.prod(1.0 + riskless_return(market, window, params)) - 1.0) * 100.0


def _lent(env: BatchedTradingEnv) -> Tensor:
    return env.lent.sum(-1).to(torch.float64) if env.lending_on else torch.zeros_like(env.cash, dtype=torch.float64)


def _interest(env: BatchedTradingEnv) -> Tensor:
    return env.stats.pnl_rows[_INTEREST].clone()  # the fused kernels update this row in place


def _holdings(env: BatchedTradingEnv) -> Tensor:
    """[len(EXPOSURE_KINDS), B] bool: what each portfolio holds at the close of the bar just stepped."""
    no = torch.zeros(env.B, dtype=torch.bool, device=env.device)
    staking = (env.staked_units + env.unbonding_units > 0).any(-1) if env.staking_on else no
    lp = (env.lp_liquidity > 0).any(-1) if env.lp_on else no
    lending = (env.lent > 0).any(-1) if env.lending_on else no
    arb = env.arb_inventory["open"].any(-1) if env.arb_on else no
    return torch.stack([env.in_position.any(-1), staking, lp, lending, arb])


def _mean_of(tables: list[dict]) -> dict:
    """The mean of per-pair metric tables (the random baseline's seeds), key by key (nested dicts too)."""
    out = {}
    for key, value in tables[0].items():
        if isinstance(value, dict):
            out[key] = _mean_of([t[key] for t in tables])
        else:
            out[key] = sum(float(t[key]) for t in tables) / len(tables)
    return out


def _with_extras(avg: dict) -> dict:
    """average_metrics plus the means over pairs of exposure, turnover and fees paid."""
    per_pair = list(avg["per_pair"].values())
    n = max(len(per_pair), 1)
    extras = {key: sum(m[key] for m in per_pair) / n for key in ("exposure", "exposure_any", "turnover", "fees_paid")}
    extras["exposure_by_strategy"] = {kind: sum(m["exposure_by_strategy"][kind] for m in per_pair) / n
                                      for kind in EXPOSURE_KINDS}
    out = {k: v for k, v in avg.items() if k != "per_pair"}
    out.update(extras)
    out["per_pair"] = avg["per_pair"]
    return out


def _curves(pairs: list[str], equity: Tensor, spot: Tensor, any_held: Tensor, copies: int) -> dict:
    """Per pair: equity at the close of each bar from the decision bar before the window to its last bar
    (n+1 values; the mean over copies), and the position held at each bar's close (n values; 1/0 spot and
    any-strategy, or the share of copies holding). Entries and exits are where the position changes."""
    n_pairs = len(pairs)
    eq = equity.view(equity.shape[0], copies, n_pairs).mean(1).cpu().numpy()
    sp = spot.view(spot.shape[0], copies, n_pairs).to(torch.float64).mean(1).cpu().numpy()
    an = any_held.view(any_held.shape[0], copies, n_pairs).to(torch.float64).mean(1).cpu().numpy()
    return {"equity": {p: eq[:, j].tolist() for j, p in enumerate(pairs)},
            "position": {p: sp[:, j].tolist() for j, p in enumerate(pairs)},
            "position_any": {p: an[:, j].tolist() for j, p in enumerate(pairs)}}


def buy_and_hold(market: MarketTensors, window: tuple[int, int],
                 strategy_params: StrategyParams | None = None) -> dict[str, dict]:
    """Holding each coin from the open of bar i0 to the close of bar i1-1 with no fees: the market's own
    move, a yardstick beside the baselines that pay the environment's costs (its Sharpe in excess of the
    lending rate of `strategy_params`, the defaults where None)."""
    i0, i1 = window
    closes = market.prices[i0:i1, :, 3].cpu().numpy()
    first_open = market.prices[i0, :, 0].cpu().numpy()
    path = np.vstack([first_open[None, :], closes])
    rets = path[1:] / path[:-1] - 1.0
    risk_free = riskless_return(market, window, strategy_params or StrategyParams())
    peak = np.maximum.accumulate(path, axis=0)
    max_dd = (1.0 - path / peak).max(axis=0)
    out = {}
    for i, pair in enumerate(market.pairs):
        out[pair] = {
            "total_return": float((path[-1, i] / path[0, i] - 1.0) * 100.0),
            "sharpe": sharpe_from_sums(float(rets[:, i].sum()), float((rets[:, i] ** 2).sum()), rets.shape[0]),
            "sharpe_vs_lending": sharpe_vs_lending(rets[:, i], risk_free),
            "max_drawdown": float(max_dd[i] * 100.0),
        }
    return out
