"""The spot-only step of BatchedTradingEnv as one fused CPU kernel (numba).

The tensor step (nexlify.env.batched) is the reference: it runs on every device and with every
strategy. On a CPU it is bound by memory traffic: about 300 elementwise operations, each of which
reads and writes every slot of the batch. When only the spot strategy is on and the environment lives
on the CPU, this kernel computes the same step in one pass per episode, keeping a slot's numbers in
registers: fills at the open, stops and targets inside the bar, marks at the close, the reward, the
Kelly window, the episode statistics, then the next mask and observation.

It follows the tensor step operation by operation, in the same order, so in float64 both give the same
numbers (tests/test_env_fused.py steps both side by side on real candles and compares every output and
every piece of state). In float32 the kernel computes in float64 and stores float32, so the two agree to
float32 rounding. It never changes its inputs: every step writes fresh state arrays (the ring buffer of
closed-trade returns and the PnL rows excepted, which the tensor step updates in place too), so tensors
a caller kept from an earlier step keep their values.

Episodes are independent, so the loop over them runs on `torch.get_num_threads()` threads (numba's
prange) when there are several and the batch is large, else serially; the loop over an episode's pairs
is the short inner loop, in pair order, as the tensor step's rules want (entries are served in pair order
under the concurrent-trade cap). nexlify.env.fused_portfolio does the same for the strategies beyond spot.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import math
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nexlify.env.layout import (
    CLOSE, HOLD, N_SPOT_STATE, OPEN_LONG, PNL_FEES_AND_GAS, PNL_SPOT, S_BARS_IN_TRADE, S_CASH_FRAC,
    S_DAILY_LOSS_USED, S_DIST_TO_STOP, S_DIST_TO_TARGET, S_IN_POSITION, S_LOG_EQUITY_CHANGE, S_OPEN_TRADES_FRAC,
    S_POSITION_WEIGHT, S_SIZE_FRAC, S_UNREALISED_PNL,
)

if TYPE_CHECKING:
    from nexlify.env.batched import BatchedTradingEnv

try:
    import numba
except ImportError:  # the tensor step serves alone
    numba = None



def available() -> bool:
    """numba is installed: the fused steps (this one and nexlify.env.fused_portfolio's) can serve on the CPU."""
    return numba is not None


def _jit_inline(function: Any) -> Any:
    """A rule both kernels call, compiled into each of them (inlined) when numba is there."""
    return numba.njit(inline="always", error_model="numpy")(function) if numba is not None else function


@_jit_inline
def stop_and_target(entry, highest, stop_loss, take_profit, trailing_stop):
    """risk.stop_level and risk.take_profit_level for one slot: (stop, 0 = none; target, +inf = none)."""
    stop = 0.0
    if stop_loss > 0:
        stop = max(stop, entry * (1.0 - stop_loss))
    if trailing_stop > 0:
        stop = max(stop, highest * (1.0 - trailing_stop))
    target = entry * (1.0 + take_profit) if take_profit > 0 else math.inf
    return stop, target


@_jit_inline
def exit_in_bar(bar_open, bar_high, bar_low, stop, target):
    """risk.exits_in_bar for one slot: (stop hit, target hit, the exit price before costs; 0 when neither)."""
    stop_hit = stop > 0 and bar_low <= stop
    target_hit = (not stop_hit) and bar_high >= target
    if stop_hit:
        return stop_hit, target_hit, min(bar_open, stop)
    if target_hit:
        return stop_hit, target_hit, max(bar_open, target)
    return stop_hit, target_hit, 0.0


@_jit_inline
def write_spot_state(out, holding, close, entry, highest, bars_in_trade, units, equity, open_frac, daily_used,
                     log_change, cash_frac, size_frac, stop_loss, take_profit, trailing_stop):
    """The N_SPOT_STATE features of one slot (layout.SPOT_STATE_NAMES, as observe() computes them) into out, the
    slot's state fields (out[S_X] is field X)."""
    hf = 1.0 if holding else 0.0
    safe_entry = entry if holding else close
    stop, target = stop_and_target(entry, highest, stop_loss, take_profit, trailing_stop)
    out[S_IN_POSITION] = hf
    out[S_UNREALISED_PNL] = hf * (close / safe_entry - 1.0)
    out[S_DIST_TO_STOP] = hf * ((close - stop) / close if stop > 0 else 1.0)
    out[S_DIST_TO_TARGET] = hf * ((target - close) / close if take_profit > 0 else 1.0)
    out[S_BARS_IN_TRADE] = hf * min(bars_in_trade / 168.0, 4.0)
    out[S_POSITION_WEIGHT] = units * close / equity
    out[S_OPEN_TRADES_FRAC] = open_frac
    out[S_DAILY_LOSS_USED] = daily_used
    out[S_LOG_EQUITY_CHANGE] = log_change
    out[S_CASH_FRAC] = cash_frac
    out[S_SIZE_FRAC] = size_frac


@_jit_inline
def entries_blocked(equity, day_start_equity, daily_loss_limit, day_next, day_now):
    """risk.entries_blocked_by_daily_loss, lifted when the next bar opens a new UTC day (see _entries_blocked)."""
    hit = daily_loss_limit > 0 and equity <= day_start_equity * (1.0 - daily_loss_limit)
    return hit and day_next == day_now


@_jit_inline
def record_closed_trades(ring, head, closed, returns, n_win, n_loss, sum_win, sum_loss):
    """risk.record_trades_ and the window sums' update for one episode: the returns of the trades closed this
    bar (closed[p], returns[p], in pair order) go into its ring (a row [window + 1]) in place; returns the new
    head and the new (wins, losses, sum of wins, sum of losses) over the window. Every evicted return is read
    before any is written (gather, then scatter), as the tensor step does."""
    window = ring.shape[0] - 1
    wins_in = losses_in = wins_out = losses_out = 0
    won_in = lost_in = won_out = lost_out = 0.0
    order = 0
    for p in range(closed.shape[0]):
        if closed[p]:
            position = head + order
            order += 1
            ret = returns[p]
            if ret > 0:
                wins_in += 1
                won_in += ret
            else:
                losses_in += 1
                lost_in += ret
            if position >= window:
                old = ring[position % window]
                if old > 0:
                    wins_out += 1
                    won_out += old
                else:
                    losses_out += 1
                    lost_out += old
    order = 0
    for p in range(closed.shape[0]):
        if closed[p]:
            ring[(head + order) % window] = returns[p]
            order += 1
    return (head + order, n_win + wins_in - wins_out, n_loss + losses_in - losses_out, sum_win + won_in - won_out,
            sum_loss - lost_in + lost_out)


@_jit_inline
def position_size(n_win, n_loss, sum_win, sum_loss, trade_count, kelly_on, min_trades, fraction, floor, fixed_size,
                  max_position):
    """risk.kelly_from_sums for one episode."""
    if not kelly_on or trade_count < min_trades:
        return min(fixed_size, max_position)
    n_all = max(n_win + n_loss, 1.0)
    w = n_win / n_all
    ratio = (sum_win / max(n_win, 1.0)) / max(sum_loss / max(n_loss, 1.0), 1e-12)
    f_star = w - (1.0 - w) / max(ratio, 1e-12)
    size = min(max(fraction * f_star, floor), max_position)
    if n_loss == 0:
        size = max_position
    if n_win == 0:
        size = min(floor, max_position)
    return size


def _kernel(actions, mask, pair, t, prices, tradable_tab, features, day, n_cols, n_bars,
            cash, units, entry, entry_cost, highest, bars, equity, peak, day_start, close, size, blocked,
            ring, head, kelly, ret_sum, ret_sq_sum, max_dd, trades, wins, costs, pnl_rows,
            fee, slip, stop_loss, take_profit, trailing_stop, max_trades, daily_loss_limit, dd_penalty,
            initial_equity, max_position, kelly_on, kelly_min_trades, kelly_fraction, kelly_floor, fixed_size,
            o_cash, o_units, o_entry, o_entry_cost, o_highest, o_bars, o_equity, o_peak, o_day_start, o_close,
            o_tradable, o_size, o_blocked, o_t, o_kelly, o_ret_sum, o_ret_sq_sum, o_max_dd, o_trades, o_wins,
            o_costs, reward, obs, o_mask,
            s_flow, s_cost, s_ret, s_closed, s_act, s_accepted):
    """One step for every episode b (see BatchedTradingEnv._advance, spot alone). Slot arrays are [P, B],
    episode arrays [B]; o_* are written, s_* are scratch [P, B]; obs [B, P, O] and o_mask [B, P, A] are
    written whole."""
    n_pairs, n_episodes = units.shape
    n_feat = features.shape[1]
    for b in numba.prange(n_episodes):
        tb = t[b]
        u = tb + 1
        prev_eq = equity[b]
        ds = prev_eq if day[u] != day[tb] else day_start[b]
        blk = blocked[b]
        # 1. exits at the open (CLOSE), in pair order
        flow_sum = 0.0
        open_after_sells = 0
        for p in range(n_pairs):
            a = actions[b, p]
            if not mask[b, p, a]:
                a = HOLD
            row = u * n_cols + pair[b, p]
            o = prices[row, 0]
            trad = tradable_tab[row]
            un = units[p, b]
            sell = a == CLOSE and un > 0 and trad
            gross = un * (o * (1.0 - slip))
            proceeds = gross * (1.0 - fee) if sell else 0.0
            s_cost[p, b] = un * o * slip + gross * fee if sell else 0.0
            s_ret[p, b] = proceeds / max(entry_cost[p, b], 1e-30) - 1.0 if sell else 0.0
            s_closed[p, b] = sell
            un = 0.0 if sell else un
            o_units[p, b] = un
            s_flow[p, b] = proceeds
            flow_sum += proceeds
            if un > 0:
                open_after_sells += 1
            s_act[p, b] = a
        # 2. entries at the open (OPEN_LONG) under the concurrent-trade cap, scaled to the cash available
        available = cash[b] + flow_sum
        capacity = max(max_trades - open_after_sells, 0)
        notional = size[b] * prev_eq
        rank = 0
        total = 0.0
        for p in range(n_pairs):
            row = u * n_cols + pair[b, p]
            want = s_act[p, b] == OPEN_LONG and o_units[p, b] == 0 and tradable_tab[row] and not blk
            if want:
                rank += 1
            accepted = want and rank <= capacity
            s_accepted[p, b] = accepted
            total += notional * (1.0 + fee) if accepted else 0.0
        scale = available / max(total, 1e-30) if total > available else 1.0
        for p in range(n_pairs):
            row = u * n_cols + pair[b, p]
            o = prices[row, 0]
            accepted = s_accepted[p, b]
            spend = (notional * (1.0 + fee) if accepted else 0.0) * scale
            buy_px = o * (1.0 + slip)
            bought = spend / (1.0 + fee) / buy_px
            if accepted:
                s_cost[p, b] = s_cost[p, b] + (bought * o * slip + spend * (fee / (1.0 + fee)))
            s_flow[p, b] = s_flow[p, b] - spend
            if accepted:
                o_units[p, b] = bought
                o_entry[p, b] = buy_px
                o_entry_cost[p, b] = spend
                o_highest[p, b] = buy_px
                o_bars[p, b] = 0.0
            else:
                o_entry[p, b] = entry[p, b]
                o_entry_cost[p, b] = entry_cost[p, b]
                o_highest[p, b] = highest[p, b]
                o_bars[p, b] = bars[p, b]
        # 3. stops and targets inside the bar; 4. marks at the close
        cost_b = 0.0
        n_closed = 0
        n_won = 0
        for p in range(n_pairs):
            row = u * n_cols + pair[b, p]
            o, h, lo, c = prices[row, 0], prices[row, 1], prices[row, 2], prices[row, 3]
            trad = tradable_tab[row]
            un, en, hi = o_units[p, b], o_entry[p, b], o_highest[p, b]
            stop, target = stop_and_target(en, hi, stop_loss, take_profit, trailing_stop)
            stop_hit, target_hit, exit_px = exit_in_bar(o, h, lo, stop, target)
            forced = un > 0 and trad and (stop_hit or target_hit)
            if forced:
                forced_gross = un * exit_px * (1.0 - slip)
                forced_proceeds = forced_gross * (1.0 - fee)
                s_cost[p, b] = s_cost[p, b] + (un * exit_px * slip + forced_gross * fee)
                s_ret[p, b] = forced_proceeds / max(o_entry_cost[p, b], 1e-30) - 1.0
                s_closed[p, b] = True
                s_flow[p, b] = s_flow[p, b] + forced_proceeds
                un = 0.0
            still = un > 0
            o_units[p, b] = un
            if still and trad:
                o_highest[p, b] = max(hi, h)
            o_bars[p, b] = o_bars[p, b] + 1.0 if still else 0.0
            if not still:
                o_entry[p, b] = 0.0
                o_entry_cost[p, b] = 0.0
            o_close[p, b] = c
            o_tradable[p, b] = trad
            cost_b += s_cost[p, b]
            if s_closed[p, b]:
                n_closed += 1
                if s_ret[p, b] > 0:
                    n_won += 1
        # cash is the old cash plus the slots' flows summed in pair order (as flow.sum(0) does)
        flow_total = 0.0
        for p in range(n_pairs):
            flow_total += s_flow[p, b]
        new_cash = cash[b] + flow_total
        value_sum = 0.0
        for p in range(n_pairs):
            value_sum += o_units[p, b] * o_close[p, b]
        equity_b = new_cash + value_sum
        x = equity_b / prev_eq - 1.0
        scale_log = 1.0 - x / 2.0 if abs(x) <= 1e-6 else math.log1p(x) / x
        peak_b = max(peak[b], equity_b)
        drawdown = 1.0 - equity_b / peak_b
        penalty = 0.0
        if dd_penalty > 0:
            prev_dd = 1.0 - prev_eq / peak[b]
            penalty = dd_penalty * max(drawdown - prev_dd, 0.0) / n_pairs
        for p in range(n_pairs):
            slot_change = o_units[p, b] * o_close[p, b] - units[p, b] * close[p, b] + s_flow[p, b]
            reward[b, p] = slot_change * (scale_log / prev_eq) - penalty
        # 5. Kelly window (record_trades_, then _update_window_sums), statistics
        new_head, n_win, n_loss, sum_win, sum_loss = record_closed_trades(
            ring[b], head[b], s_closed[:, b], s_ret[:, b], kelly[0, b], kelly[1, b], kelly[2, b], kelly[3, b])
        head[b] = new_head
        o_kelly[0, b], o_kelly[1, b], o_kelly[2, b], o_kelly[3, b] = n_win, n_loss, sum_win, sum_loss
        o_ret_sum[b] = ret_sum[b] + x
        o_ret_sq_sum[b] = ret_sq_sum[b] + x * x
        o_max_dd[b] = max(max_dd[b], drawdown)
        o_trades[b] = trades[b] + n_closed
        o_wins[b] = wins[b] + n_won
        o_costs[b] = costs[b] + cost_b
        pnl_rows[PNL_SPOT, b] += (equity_b - prev_eq) + cost_b
        pnl_rows[PNL_FEES_AND_GAS, b] -= cost_b
        o_cash[b], o_equity[b], o_peak[b], o_day_start[b], o_t[b] = new_cash, equity_b, peak_b, ds, u
        # 6. the next bar's derived state (_refresh): Kelly size, daily-loss block, mask
        size_b = position_size(n_win, n_loss, sum_win, sum_loss, new_head, kelly_on, kelly_min_trades, kelly_fraction,
                               kelly_floor, fixed_size, max_position)
        o_size[b] = size_b
        blocked_b = entries_blocked(equity_b, ds, daily_loss_limit, day[min(u + 1, n_bars - 1)], day[u])
        o_blocked[b] = blocked_b
        holding_count = 0
        for p in range(n_pairs):
            if o_units[p, b] > 0:
                holding_count += 1
        for p in range(n_pairs):
            holding = o_units[p, b] > 0
            for k in range(o_mask.shape[2]):
                o_mask[b, p, k] = False
            o_mask[b, p, HOLD] = True
            o_mask[b, p, OPEN_LONG] = ((not holding) and o_tradable[p, b] and holding_count < max_trades
                                       and not blocked_b and new_cash > 0)
            o_mask[b, p, CLOSE] = holding
        # 7. the observation at bar u: market features, then the spot state, then zeros
        daily_used = 0.0
        if daily_loss_limit > 0:
            daily_used = min(max((1.0 - equity_b / ds) / daily_loss_limit, 0.0), 1.0)
        open_frac = holding_count / max_trades
        log_change = math.log(equity_b / initial_equity)
        cash_frac = new_cash / equity_b
        size_frac = size_b / max_position
        for p in range(n_pairs):
            row = u * n_cols + pair[b, p]
            for f in range(n_feat):
                obs[b, p, f] = features[row, f]
            c = o_close[p, b]
            un = o_units[p, b]
            k = n_feat
            write_spot_state(obs[b, p, k:k + N_SPOT_STATE], un > 0, c, o_entry[p, b], o_highest[p, b], o_bars[p, b], un,
                             equity_b, open_frac, daily_used, log_change, cash_frac, size_frac, stop_loss, take_profit,
                             trailing_stop)
            for f in range(k + N_SPOT_STATE, obs.shape[2]):
                obs[b, p, f] = 0.0


_compiled: dict[tuple[str, bool], Any] = {}
PARALLEL_MIN_SLOTS = 4096  # below this many episode slots, threads cost more than they save


def compiled(kernel: Any, name: str, parallel: bool) -> Any:
    """`kernel` compiled on first use (5-20 s) and cached on disk where numba can write (next to this
    file, else the user's cache directory, e.g. $XDG_CACHE_HOME/numba or $NUMBA_CACHE_DIR): later
    processes load it in about a second. The serial build starts no thread pool: one-thread workers
    running side by side must not have idle pool threads spinning on each other's cores."""
    key = (name, parallel)
    if key not in _compiled:
        # numba's cache tells entries apart by the function's name, not by the `parallel` flag, and checks only
        # the kernel's own file for changes, not those of the rules it inlines or the constants it compiles in
        # (the layout, the tables' rows): each build gets a name of its own that carries a digest of the
        # sources of the kernel's module and of every nexlify module it imports, transitively
        flavour = "threaded" if parallel else "serial"
        build = f"{name}_{flavour}_{_sources_digest(kernel.__module__)}"
        function = types.FunctionType(kernel.__code__, kernel.__globals__, build)
        function.__qualname__ = build
        try:
            _compiled[key] = numba.njit(parallel=parallel, nogil=True, cache=True, error_model="numpy")(function)
        except RuntimeError:  # no writable cache location: compile in every process
            _compiled[key] = numba.njit(parallel=parallel, nogil=True, cache=False, error_model="numpy")(function)
    return _compiled[key]


@functools.cache
def _sources_digest(module: str) -> str:
    files = sorted(kernel_sources(module))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def kernel_sources(module: str) -> set[Path]:
    """The files of `module` and of every nexlify module it imports at its top level, transitively (imports
    under `if TYPE_CHECKING:` and inside functions are not followed: a kernel cannot use them)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        spec = importlib.util.find_spec(name)
        tree = ast.parse(Path(spec.origin).read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] == "nexlify"]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "nexlify":
                todo.append(node.module)
                if importlib.util.find_spec(node.module).submodule_search_locations is not None:
                    # `from package import module` names modules, `from package import name` a name
                    todo += [f"{node.module}.{a.name}" for a in node.names
                             if importlib.util.find_spec(f"{node.module}.{a.name}") is not None]
    return {Path(importlib.util.find_spec(name).origin) for name in seen}


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (a contiguous copy when it is not contiguous)."""
    return x.detach().contiguous().numpy()


class FusedSpotStep:
    """Steps a spot-only BatchedTradingEnv on the CPU with the fused kernel; state stays in the env's
    tensors (numpy views of fresh arrays each step), so every property and test sees the usual state."""

    def __init__(self, env: "BatchedTradingEnv") -> None:
        self.threads = torch.get_num_threads()
        self.parallel = self.threads > 1 and env.B * env.P >= PARALLEL_MIN_SLOTS
        self.kernel = compiled(_kernel, "_kernel", self.parallel)
        m = env.market
        self.prices = as_numpy(env._prices)
        self.tradable = as_numpy(env._tradable)
        self.features = as_numpy(env._features)
        self.day = as_numpy(m.day.to(torch.int64))
        self.pair = as_numpy(env._pair_bp.to(torch.int64))
        self.n_cols, self.n_bars = env._n_cols, m.n_bars
        P, B = env.P, env.B
        self.scratch = (np.empty((P, B)), np.empty((P, B)), np.empty((P, B)), np.empty((P, B), dtype=np.bool_),
                        np.empty((P, B), dtype=np.int64), np.empty((P, B), dtype=np.bool_))
        r, e = env.risk_cfg, env.env_cfg
        self.params = (float(env.fee), float(env.slip), float(r.stop_loss), float(r.take_profit),
                       float(r.trailing_stop), int(r.max_trades), float(r.daily_loss_limit),
                       float(e.drawdown_penalty), float(e.initial_equity), float(r.max_position), bool(r.kelly),
                       int(r.kelly_min_trades), float(r.kelly_fraction), float(r.kelly_floor), float(r.fixed_size))

    def advance(self, env: "BatchedTradingEnv", actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = env._units.numpy().dtype
        P, B = env.P, env.B
        st = env.stats
        slot = lambda: np.empty((P, B), dtype=dt)  # noqa: E731
        ep = lambda: np.empty(B, dtype=dt)  # noqa: E731
        out = {
            "cash": ep(), "units": slot(), "entry": slot(), "entry_cost": slot(), "highest": slot(), "bars": slot(),
            "equity": ep(), "peak": ep(), "day_start": ep(), "close": slot(),
            "tradable": np.empty((P, B), dtype=np.bool_), "size": ep(), "blocked": np.empty(B, dtype=np.bool_),
            "t": np.empty(B, dtype=np.int64), "kelly": np.empty((4, B), dtype=dt),
            "ret_sum": np.empty(B), "ret_sq_sum": np.empty(B), "max_dd": ep(),
            "trades": np.empty(B, dtype=np.int64), "wins": np.empty(B, dtype=np.int64), "costs": ep(),
        }
        reward = np.empty((B, P), dtype=np.float32)
        obs = np.empty((B, P, env.obs_size), dtype=np.float32)
        mask = np.empty(tuple(env.mask.shape), dtype=np.bool_)
        kelly = np.stack([as_numpy(s) for s in env.kelly_sums]).astype(dt, copy=False)
        if self.parallel:
            numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
        n = as_numpy
        self.kernel(
            n(actions.to(torch.int64)), n(env.mask), self.pair, n(env.t), self.prices, self.tradable,
            self.features, self.day, self.n_cols, self.n_bars,
            n(env.cash), n(env._units), n(env._entry), n(env._entry_cost), n(env._highest),
            n(env._bars_in_trade), n(env.equity), n(env.peak), n(env.day_start_equity), n(env._close),
            n(env.size), n(env.blocked), env.trade_ring.numpy(), env.trade_head.numpy(), kelly,
            n(st.ret_sum), n(st.ret_sq_sum), n(st.max_drawdown), n(st.trades), n(st.wins),
            n(st.costs), st.pnl_rows.numpy(), *self.params,
            out["cash"], out["units"], out["entry"], out["entry_cost"], out["highest"], out["bars"],
            out["equity"], out["peak"], out["day_start"], out["close"], out["tradable"], out["size"],
            out["blocked"], out["t"], out["kelly"], out["ret_sum"], out["ret_sq_sum"], out["max_dd"],
            out["trades"], out["wins"], out["costs"], reward, obs, mask, *self.scratch)
        T = {k: torch.from_numpy(v) for k, v in out.items()}
        env.cash, env._units, env._entry, env._entry_cost = T["cash"], T["units"], T["entry"], T["entry_cost"]
        env._highest, env._bars_in_trade = T["highest"], T["bars"]
        env.equity, env.peak, env.day_start_equity = T["equity"], T["peak"], T["day_start"]
        env._close, env._tradable_now, env.t = T["close"], T["tradable"], T["t"]
        env.size, env.blocked = T["size"], T["blocked"]
        env.kelly_sums = tuple(T["kelly"].unbind(0))
        st.ret_sum, st.ret_sq_sum, st.max_drawdown = T["ret_sum"], T["ret_sq_sum"], T["max_dd"]
        st.trades, st.wins, st.costs, st.equity = T["trades"], T["wins"], T["costs"], T["equity"]
        env.mask = torch.from_numpy(mask)
        return torch.from_numpy(obs), torch.from_numpy(reward)
