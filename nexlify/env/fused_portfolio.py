"""The step of BatchedTradingEnv as one fused CPU kernel (numba), for spot alone and with the strategies
beyond spot (staking, Uniswap V3, Aave, arbitrage).

On a CPU the tensor step is bound by memory traffic: hundreds of elementwise operations, each of which reads
and writes every slot of the batch. This kernel computes the same step in one pass per episode, keeping a
slot's numbers in registers. Episodes are independent, so the loop over them runs on
`torch.get_num_threads()` threads (numba's prange) when there are several and the batch is large, else
serially; the loop over an episode's pairs is the short inner loop, in pair order, as the rules want
(entries are served in pair order under the concurrent-trade cap). In float32 the kernel computes in float64
and stores float32, so the two agree to float32 rounding.

The body is `episode_steps`, one step of a range of episodes, written once: `_kernel` (the CPU's) calls it for
ranges of the batch, and nexlify.env.fused_cuda compiles the same function with numba-cuda into a CUDA kernel with
one thread per episode (a range of one). It allocates nothing, and the CPU kernel is compiled without reference
counting.

The tensor step (nexlify.env.batched) is the reference and this kernel is a transcription of it, block by
block and operation by operation in the same order, one episode at a time: the open's releases and
transfers, exits, entries under the caps, arbitrage fills and rebalancing, lending, stops and targets, what
the bar earns, the marks, the PnL by source, the Kelly window and the statistics, then the next mask and
observation. In float64 both give the same numbers (tests/test_env_fused.py steps them side by side on
real candles, with spot alone and with every strategy on). The tensor step skips blocks on the host's flags
where it knows them to be exact no-ops (no edge, no book, no transfer under way); the kernel decides per
episode, with the same result. With spot alone it also keeps the tensor step's accounting for spot alone:
the PnL's spot row is the equity change net of costs, and a slot's last value its coins at the last close.

State travels in packed arrays, episode-major so that an episode's numbers lie side by side in memory:
per-slot numbers [B, len(SLOT_FLOATS), P] (and int64 and bool companions), per-episode numbers
[B, len(EPISODE_FLOATS)]; the environment's state tensors are [P, B] and [B] views of them. Every step
writes fresh arrays (so a tensor a caller kept from an earlier step keeps its values), and the next step
passes them back as they are, without packing again, while the environment still holds exactly those
views. The ring of closed-trade returns, its head and the PnL rows are updated in place, as the tensor
step does. The action numbers, sentinels, observation offsets and PnL rows are nexlify.env.layout's.
"""

from __future__ import annotations

import math
import ast
import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nexlify.env import strategy_tables as tables
from nexlify.errors import InputError
from nexlify.env.layout import (
    ARB, ARB_CLOSE, CLOSE, HOLD, LEND, LP_CLOSE, LP_OPEN, N_SPOT_STATE, NO_LOT, NO_TRANSFER, OPEN_LONG,
    PNL_ARBITRAGE, PNL_FEES_AND_GAS, PNL_IMPERMANENT_LOSS, PNL_LENDING_INTEREST, PNL_LP_FEES, PNL_SPOT,
    PNL_STAKING_REWARDS, S_AAVE_SUPPLY_APY, S_AAVE_UTILIZATION, S_ARB_EDGE_BPS, S_ARB_WEIGHT, S_BARS_IN_TRADE,
    S_CASH_FRAC, S_DAILY_LOSS_USED, S_DIST_TO_STOP, S_DIST_TO_TARGET, S_IN_POSITION, S_INTEREST_ACCRUED,
    S_LENT_WEIGHT, S_LOG_EQUITY_CHANGE, S_LP_DIST_LOWER, S_LP_DIST_UPPER, S_LP_FEES_ACCRUED, S_LP_IMPERMANENT_LOSS,
    S_LP_IN_RANGE, S_LP_WEIGHT, S_OPEN_TRADES_FRAC, S_POSITION_WEIGHT, S_SIZE_FRAC, S_SPREAD, S_STAKED_WEIGHT,
    S_STAKING_APY, S_TRANSFER_PENDING, S_UNBOND_WAIT, S_UNBONDING_WEIGHT, S_UNREALISED_PNL, S_VENUE2_AVAILABLE, STAKE,
    UNSTAKE, WITHDRAW,
)
from nexlify.strategies import uniswap_v3

# The environment this kernel steps: a nexlify.env.batched.BatchedTradingEnv. Not imported, even for type
# checking: the environment imports this module, and the imports run one way (batched -> kernel -> layout).
Env = Any

try:
    import numba
except ImportError:  # the tensor step serves alone
    numba = None

# The environment's state, packed: the attribute names in row order. With spot alone only the first rows
# (N_SPOT_FLOATS, N_SPOT_BOOLS: the spot trade's) are packed, and the kernel reads no other row: the rest of
# the state never changes then (and the environment keeps its zeros).
SLOT_FLOATS = ("_units", "_entry", "_entry_cost", "_highest", "_bars_in_trade", "_close", "_staked", "_unbonding",
               "_exit_proceeds", "_lp_L", "_lp_spa", "_lp_spb", "_lp_x0", "_lp_y0", "_lp_fees", "_lp_cost",
               "_lp_value", "_lp_il", "_lent", "_lent_principal", "_qa", "_ca", "_qb", "_cb", "_tr_coin", "_tr_quote",
               "_arb_cost", "_arb_value", "_slot_value")
(UNITS, ENTRY, ENTRY_COST, HIGHEST, BARS, CLOSE_PX, STAKED, UNBONDING, EXIT_PROCEEDS, LP_L, LP_SPA, LP_SPB, LP_X0,
 LP_Y0, LP_FEES, LP_COST, LP_VALUE, LP_IL, LENT, PRINCIPAL, QA, CA, QB, CB, TR_COIN, TR_QUOTE, ARB_COST, ARB_VALUE,
 SLOT_VALUE) = range(len(SLOT_FLOATS))
N_SPOT_FLOATS = CLOSE_PX + 1
SLOT_INTS = ("_release", "_tr_due")
RELEASE, TR_DUE = range(len(SLOT_INTS))
SLOT_BOOLS = ("_tradable_now", "_exit_pending", "_book")
TRADABLE, PENDING, BOOK = range(len(SLOT_BOOLS))
N_SPOT_BOOLS = TRADABLE + 1
EPISODE_FLOATS = ("cash", "equity", "peak", "day_start_equity", "size", "kelly0", "kelly1", "kelly2", "kelly3",
                  "stats.max_drawdown", "stats.costs")
CASH, EQUITY, PEAK, DAY_START, SIZE, N_WIN, N_LOSS, SUM_WIN, SUM_LOSS, MAX_DD, COSTS = range(len(EPISODE_FLOATS))
EPISODE_INTS = ("t", "stats.trades", "stats.wins")
T_BAR, TRADES, WINS = range(len(EPISODE_INTS))
EPISODE_F64 = ("stats.ret_sum", "stats.ret_sq_sum")
RET_SUM, RET_SQ_SUM = range(len(EPISODE_F64))

# Parameters, one float64 array (booleans and counts as 0/1 and whole numbers).
PARAMS = ("fee", "slip", "stop_loss", "take_profit", "trailing_stop", "max_trades", "daily_loss_limit",
          "drawdown_penalty", "initial_equity", "max_position", "kelly", "kelly_min_trades", "kelly_fraction",
          "kelly_floor", "fixed_size", "spot_on", "staking_on", "lp_on", "lending_on", "arb_on", "unstake_fraction",
          "stake_fraction", "lp_range_width", "lp_coin_share", "gas_open", "gas_close", "fee_a", "fee_b",
          "max_notional", "rebalance_below", "tiny", "lp_min_notional", "lp_min_close", "max_withdrawal_share",
          "max_idle_share", "lend_sweep")
(FEE, SLIP, STOP_LOSS, TAKE_PROFIT, TRAILING_STOP, MAX_TRADES, DAILY_LOSS_LIMIT, DD_PENALTY, INITIAL_EQUITY,
 MAX_POSITION, KELLY_ON, KELLY_MIN_TRADES, KELLY_FRACTION, KELLY_FLOOR, FIXED_SIZE, SPOT_ON, STAKING_ON, LP_ON,
 LENDING_ON, ARB_ON, UNSTAKE_FRACTION, STAKE_FRACTION, LP_WIDTH, LP_COIN_SHARE, GAS_OPEN, GAS_CLOSE, FEE_A, FEE_B,
 MAX_NOTIONAL, REBALANCE_BELOW, TINY, LP_MIN_NOTIONAL, LP_MIN_CLOSE, MAX_WITHDRAWAL_SHARE,
 MAX_IDLE_SHARE, LEND_SWEEP) = range(len(PARAMS))

# Per-slot scratch, [B, len, P] (an episode's numbers side by side in memory).
(F_FLOW, F_COST, F_RET, F_LP_RET, F_ARB_RET, F_SPOT_PNL, F_STAKE_PNL, F_LP_FEE_PNL, F_IL_PNL, F_INTEREST, F_ARB_PNL,
 F_COINS_BEFORE, F_X0_BEFORE, F_ARB_COINS_BEFORE, F_LOCKED, F_SPEND, F_VALUE) = range(17)
N_SCRATCH = 17
(K_CLOSED, K_LP_CLOSED, K_ARB_CLOSED, K_ACCEPTED, K_ACCEPTED_LP, K_ACCEPTED_ARB, K_WANT, K_WANT_LP,
 K_WANT_ARB) = range(9)
N_FLAGS = 9
# The PnL rows (layout.PNL_SOURCES) summed over the pairs from the scratch rows (fees_and_gas is -cost)
PNL_FROM_SCRATCH = ((PNL_SPOT, F_SPOT_PNL), (PNL_STAKING_REWARDS, F_STAKE_PNL), (PNL_LP_FEES, F_LP_FEE_PNL),
                    (PNL_IMPERMANENT_LOSS, F_IL_PNL), (PNL_LENDING_INTEREST, F_INTEREST), (PNL_ARBITRAGE, F_ARB_PNL))


def available() -> bool:
    """numba is installed: the fused step can serve on the CPU."""
    return numba is not None


def check_cuda_kernel(device: torch.device) -> None:
    """The CUDA kernel (kernel "cuda") can serve an environment on `device`, else an InputError naming what is
    missing: numba-cuda (the optional extra `gpu`), or a CUDA device (numba's CUDA simulator, for tests, steps
    CPU tensors)."""
    try:
        from nexlify.env import fused_cuda
    except ImportError as e:
        raise InputError(f"kernel 'cuda' needs numba-cuda ({e}); accepted: pip install 'nexlify-train[gpu]', "
                         "or kernel auto or torch") from None
    if device.type != "cuda" and not fused_cuda.simulated():
        raise InputError(f"kernel 'cuda' steps on a CUDA device, not on device {device}; accepted: device cuda, "
                         "or kernel auto or torch")


def _jit_inline(function: Any) -> Any:
    """A rule of the kernel in a function of its own, compiled into the kernel (inlined) when numba is there.
    numba-cuda compiles the same functions into CUDA device code when the CUDA kernel calls them (it compiles a
    numba.njit function's Python source for the device; tests/test_env_fused_cuda.py checks that the whole step
    compiles to PTX). numba.extending.register_jitable, made to share a rule between targets, was tried: with
    inline="always" numba-cuda 0.30 fails to type the inlined calls, and without it the CPU kernel calls the
    rules instead of inlining them."""
    return numba.njit(inline="always", error_model="numpy")(function) if numba is not None else function


def _jit_steps(function: Any) -> Any:
    """episode_steps compiled as a function of its own, called by the CPU kernel (numba's inliner, the only way to
    inline a call, costs time that grows with the callee's size times its number of blocks: see episode_steps).
    Without reference counting, as the kernel: it allocates nothing. numba-cuda compiles the same Python source
    into a device function for the CUDA kernel."""
    return numba.njit(error_model="numpy", nogil=True, _nrt=False)(function) if numba is not None else function


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


@_jit_inline
def open_bar(b, u, actions, mask, pair, n_cols, tradable_tab, o_sf, o_si, o_sb, f, acts, S, AR):
    """0. What the open of bar u brings for episode b: the actions (invalid ones turn into hold), unbonding lots
    that come free (staking.release_unbonded), transfers between the venues that land; the coins marked at the
    last close go into the scratch f (for the price PnL)."""
    n_pairs = acts.shape[1]
    for p in range(n_pairs):
        a = actions[b, p]
        if not mask[b, p, a]:
            a = HOLD
        acts[b, p] = a
        row = u * n_cols + pair[b, p]
        o_sb[b, TRADABLE, p] = tradable_tab[row]
        units = o_sf[b, UNITS, p]
        f[F_COINS_BEFORE, p] = units
        if S:
            staked, unbonding, release = o_sf[b, STAKED, p], o_sf[b, UNBONDING, p], o_si[b, RELEASE, p]
            f[F_COINS_BEFORE, p] = units + staked + unbonding
            if unbonding > 0 and release != NO_LOT and u >= release:  # staking.release_unbonded
                o_sf[b, UNITS, p] = units + unbonding
                o_sf[b, UNBONDING, p] = 0.0
                o_si[b, RELEASE, p] = NO_LOT
        if AR:
            tr_coin = o_sf[b, TR_COIN, p]
            f[F_ARB_COINS_BEFORE, p] = o_sf[b, CA, p] + o_sf[b, CB, p] + abs(tr_coin)
            if o_si[b, TR_DUE, p] <= u:
                tr_quote = o_sf[b, TR_QUOTE, p]
                o_sf[b, CA, p] = o_sf[b, CA, p] + max(tr_coin, 0.0)
                o_sf[b, CB, p] = o_sf[b, CB, p] - min(tr_coin, 0.0)
                o_sf[b, QA, p] = o_sf[b, QA, p] + max(tr_quote, 0.0)
                o_sf[b, QB, p] = o_sf[b, QB, p] - min(tr_quote, 0.0)
                o_sf[b, TR_COIN, p], o_sf[b, TR_QUOTE, p] = 0.0, 0.0
                o_si[b, TR_DUE, p] = NO_TRANSFER


@_jit_inline
def arbitrage_fills(b, u, n_cols, pair, prices, floats, flags, withdrawal_fee, transfer_bars, acts, o_sf, o_si, o_sb,
                    f, prm):
    """3. Arbitrage from the books of episode b at both venues' opens of bar u (arbitrage.directed_units, then
    arbitrage.settle), then the rebalancing transfer of a book that ran low."""
    n_pairs = acts.shape[1]
    fa, fb = prm[FEE_A], prm[FEE_B]
    rb = 2.0 * prm[REBALANCE_BELOW]
    for p in range(n_pairs):
        row = u * n_cols + pair[b, p]
        o, o2 = prices[row, 0], floats[tables.V2_OPEN, row]
        trade = acts[b, p] == ARB and o_sb[b, BOOK, p]
        qa, ca, qb, cb = o_sf[b, QA, p], o_sf[b, CA, p], o_sf[b, QB, p], o_sf[b, CB, p]
        # arbitrage.directed_units, then arbitrage.settle (torch divides a number by a tensor as the
        # tensor's reciprocal times the number: so does this, to the last bit)
        q_ab = min(min(max(qa, 0.0) / (o * (1.0 + fa)), max(cb, 0.0)), (1.0 / o) * prm[MAX_NOTIONAL])
        q_ba = min(min(max(qb, 0.0) / (o2 * (1.0 + fb)), max(ca, 0.0)), (1.0 / o2) * prm[MAX_NOTIONAL])
        units_arb = ((q_ab if trade and flags[tables.FILL_AB, row] else 0.0)
                     - (q_ba if trade and flags[tables.FILL_BA, row] else 0.0))
        size_arb = abs(units_arb)
        qa = qa - units_arb * o - size_arb * (o * fa)
        ca = ca + units_arb
        qb = qb + units_arb * o2 - size_arb * (o2 * fb)
        cb = cb - units_arb
        f[F_COST, p] = f[F_COST, p] + size_arb * (o * fa + o2 * fb)
        f[F_ARB_PNL, p] = f[F_ARB_PNL, p] + units_arb * (o2 - o)
        coins_mean, quote_mean = (ca + cb) * 0.5, (qa + qb) * 0.5
        low = min(ca, cb) <= rb * coins_mean or min(qa, qb) <= rb * quote_mean
        if units_arb != 0 and o_si[b, TR_DUE, p] == NO_TRANSFER and low:
            to_a = coins_mean - ca
            fee_units = min(abs(to_a), withdrawal_fee[pair[b, p]])
            sign = 1.0 if to_a > 0 else (-1.0 if to_a < 0 else 0.0)
            o_sf[b, TR_COIN, p] = to_a - sign * fee_units
            o_sf[b, TR_QUOTE, p] = quote_mean - qa
            ca, cb = min(ca, coins_mean), min(cb, coins_mean)
            qa, qb = min(qa, quote_mean), min(qb, quote_mean)
            o_si[b, TR_DUE, p] = u + transfer_bars[pair[b, p]]
            f[F_COST, p] = f[F_COST, p] + fee_units * o
        o_sf[b, QA, p], o_sf[b, CA, p], o_sf[b, QB, p], o_sf[b, CB, p] = qa, ca, qb, cb


@_jit_inline
def lend(b, ef, o_sf, f, acts, prm):
    """4. Lending for episode b. By the sweep: the supply is set to max_idle_share of the idle USDT left after the
    entries (cash plus supply), in equal sub-accounts per slot (a withdrawal takes its share of the interest).
    By hand: a LEND tops the Aave supply up to max_idle_share of that idle USDT (the first LEND of the bar in
    pair order supplies it all)."""
    n_pairs = acts.shape[1]
    flow_sum = 0.0
    supply = 0.0
    for p in range(n_pairs):
        flow_sum += f[F_FLOW, p]
        supply += o_sf[b, LENT, p]
    if prm[LEND_SWEEP] > 0:
        target = prm[MAX_IDLE_SHARE] / n_pairs * max(ef[b, CASH] + flow_sum + supply, 0.0)
        for p in range(n_pairs):
            lent = o_sf[b, LENT, p]
            moved = target - lent
            if moved < 0:
                o_sf[b, PRINCIPAL, p] = o_sf[b, PRINCIPAL, p] * (target / lent)
            else:
                o_sf[b, PRINCIPAL, p] = o_sf[b, PRINCIPAL, p] + moved
            f[F_FLOW, p] = f[F_FLOW, p] - moved
            o_sf[b, LENT, p] = target
        return
    room = max(ef[b, CASH] + flow_sum, 0.0)
    lendable = max(prm[MAX_IDLE_SHARE] * (room + supply) - supply, 0.0)
    cumulative = 0.0
    for p in range(n_pairs):
        chunk = lendable if acts[b, p] == LEND else 0.0
        cumulative = cumulative + chunk
        supplied = min(chunk, max(lendable - (cumulative - chunk), 0.0))
        f[F_FLOW, p] = f[F_FLOW, p] - supplied
        o_sf[b, LENT, p] = o_sf[b, LENT, p] + supplied
        o_sf[b, PRINCIPAL, p] = o_sf[b, PRINCIPAL, p] + supplied


@_jit_inline
def refresh_mask(o_mask, b, u, n_cols, pair, o_sf, o_si, o_sb, flags, stakeable, withdrawal_fee, prm, spot_on, S, LP,
                 LE, AR, equity, cash, size_b, blocked_b):
    """8a. The mask at bar u for episode b (BatchedTradingEnv._action_mask) into o_mask[b]; returns the open
    trades toward the concurrent cap (spot trades, LP positions, 2 legs per arbitrage book)."""
    n_pairs = o_mask.shape[1]
    fee, slip, fa, fb, coin_share = prm[FEE], prm[SLIP], prm[FEE_A], prm[FEE_B], prm[LP_COIN_SHARE]
    max_trades = int(prm[MAX_TRADES])
    open_trades = 0
    for p in range(n_pairs):
        units = o_sf[b, UNITS, p]
        if (units + o_sf[b, STAKED, p] + o_sf[b, UNBONDING, p] if S else units) > 0:
            open_trades += 1
        if LP and o_sf[b, LP_L, p] > 0:
            open_trades += 1
        if AR and o_sb[b, BOOK, p]:
            open_trades += 2
    supply = 0.0
    if LE:
        for p in range(n_pairs):
            supply += o_sf[b, LENT, p]
    sweep = LE and prm[LEND_SWEEP] > 0
    spendable = cash + supply if sweep else cash  # the sweep withdraws what the entries need
    can_enter = (not blocked_b) and spendable > 0
    cap = prm[MAX_POSITION] * equity  # the per-trade cap in quote
    sized = size_b * equity
    lp_fits = (prm[LP_MIN_NOTIONAL] <= cap and max(sized, prm[LP_MIN_NOTIONAL]) * (1.0 + coin_share * (fee + slip))
               + prm[GAS_OPEN] <= spendable)
    lendable = max(prm[MAX_IDLE_SHARE] * (cash + supply) - supply, 0.0)
    for p in range(n_pairs):
        row = u * n_cols + pair[b, p]
        units = o_sf[b, UNITS, p]
        staked = o_sf[b, STAKED, p] if S else 0.0
        holding = (units + staked + o_sf[b, UNBONDING, p] if S else units) > 0
        pending = S and o_sb[b, PENDING, p]  # no exit waits without staking
        may_enter = o_sb[b, TRADABLE, p] and can_enter and open_trades < max_trades
        for a in range(o_mask.shape[2]):
            o_mask[b, p, a] = False
        o_mask[b, p, HOLD] = True
        o_mask[b, p, OPEN_LONG] = spot_on and (not holding) and may_enter
        o_mask[b, p, CLOSE] = holding and not pending
        if S:
            o_mask[b, p, STAKE] = stakeable[pair[b, p]] and units > 0 and not pending
            o_mask[b, p, UNSTAKE] = staked > 0 and o_sf[b, UNBONDING, p] <= 0 and not pending
        if LP:
            lp_live = o_sf[b, LP_L, p] > 0
            o_mask[b, p, LP_OPEN] = (not lp_live) and may_enter and lp_fits
            o_mask[b, p, LP_CLOSE] = lp_live and o_sf[b, LP_VALUE, p] + o_sf[b, LP_FEES, p] >= prm[LP_MIN_CLOSE]
        if LE and not sweep:  # else the sweep lends
            o_mask[b, p, LEND] = lendable > 0
            o_mask[b, p, WITHDRAW] = o_sf[b, LENT, p] > 0
        if AR:
            book = o_sb[b, BOOK, p]
            o_mask[b, p, ARB_CLOSE] = book and o_si[b, TR_DUE, p] == NO_TRANSFER
            ab, ba = flags[tables.MASK_AB, row], flags[tables.MASK_BA, row]
            stocked = ((ab and o_sf[b, QA, p] > 0 and o_sf[b, CB, p] > 0)
                       or (ba and o_sf[b, QB, p] > 0 and o_sf[b, CA, p] > 0))
            book_min = withdrawal_fee[pair[b, p]] * o_sf[b, CLOSE_PX, p] / prm[MAX_WITHDRAWAL_SHARE]
            fits = book_min <= cap and max(sized, book_min) * (1.0 + (fa + fb) / 4.0) <= spendable
            fund = (not book) and (ab or ba) and can_enter and open_trades + 2 <= max_trades and fits
            o_mask[b, p, ARB] = (book and stocked) or fund
    return open_trades


@_jit_inline
def observe(obs, b, u, n_cols, pair, features, o_sf, o_si, floats, bar_tab, stake_apy_feature, prm, S, LP, LE, AR,
            equity, cash, ds, size_b, open_trades):
    """8b. The observation at bar u for episode b (BatchedTradingEnv.observe) into obs[b]: the market features,
    the spot state, then the strategies' state (zeros where a strategy is off)."""
    n_pairs, n_feat = obs.shape[1], features.shape[1]
    max_trades, daily_loss_limit = int(prm[MAX_TRADES]), prm[DAILY_LOSS_LIMIT]
    stop_loss, take_profit, trailing_stop = prm[STOP_LOSS], prm[TAKE_PROFIT], prm[TRAILING_STOP]
    daily_used = 0.0
    if daily_loss_limit > 0:
        daily_used = min(max((1.0 - equity / ds) / daily_loss_limit, 0.0), 1.0)
    open_frac = open_trades / max_trades
    log_change = math.log(equity / prm[INITIAL_EQUITY])
    cash_frac = cash / equity
    size_frac = size_b / prm[MAX_POSITION]
    inv_eq = 1.0 / equity
    for p in range(n_pairs):
        row = u * n_cols + pair[b, p]
        for j in range(n_feat):
            obs[b, p, j] = features[row, j]
        c = o_sf[b, CLOSE_PX, p]
        units = o_sf[b, UNITS, p]
        holding = (units + o_sf[b, STAKED, p] + o_sf[b, UNBONDING, p] if S else units) > 0
        j = n_feat  # the state fields: obs[b, p, j + S_X] is field X (nexlify.env.layout)
        write_spot_state(obs[b, p, j:j + N_SPOT_STATE], holding, c, o_sf[b, ENTRY, p], o_sf[b, HIGHEST, p],
                         o_sf[b, BARS, p], units, equity, open_frac, daily_used, log_change, cash_frac, size_frac,
                         stop_loss, take_profit, trailing_stop)
        for q in range(j + N_SPOT_STATE, obs.shape[2]):
            obs[b, p, q] = 0.0
        if S:
            unbonding = o_sf[b, UNBONDING, p]
            obs[b, p, j + S_STAKED_WEIGHT] = o_sf[b, STAKED, p] * c * inv_eq
            obs[b, p, j + S_UNBONDING_WEIGHT] = unbonding * c * inv_eq
            wait = min(max((o_si[b, RELEASE, p] - u) * (1.0 / 168.0), 0.0), 4.0)
            obs[b, p, j + S_UNBOND_WAIT] = wait if unbonding > 0 else 0.0
            obs[b, p, j + S_STAKING_APY] = stake_apy_feature[pair[b, p]]
        if LP:
            lp_live = o_sf[b, LP_L, p] > 0
            spa, spb = o_sf[b, LP_SPA, p], o_sf[b, LP_SPB, p]
            lower, upper = spa * spa / c, spb * spb / c
            obs[b, p, j + S_LP_WEIGHT] = o_sf[b, LP_VALUE, p] * inv_eq
            obs[b, p, j + S_LP_IN_RANGE] = 1.0 if lp_live and lower <= 1.0 and upper >= 1.0 else 0.0
            obs[b, p, j + S_LP_DIST_LOWER] = 1.0 - lower if lp_live else 0.0
            obs[b, p, j + S_LP_DIST_UPPER] = upper - 1.0 if lp_live else 0.0
            obs[b, p, j + S_LP_FEES_ACCRUED] = o_sf[b, LP_FEES, p] * (inv_eq * 100.0)
            obs[b, p, j + S_LP_IMPERMANENT_LOSS] = o_sf[b, LP_IL, p] * (inv_eq * 100.0)
        if LE:
            obs[b, p, j + S_LENT_WEIGHT] = o_sf[b, LENT, p] * inv_eq
            obs[b, p, j + S_INTEREST_ACCRUED] = (o_sf[b, LENT, p] - o_sf[b, PRINCIPAL, p]) * (inv_eq * 100.0)
            obs[b, p, j + S_AAVE_SUPPLY_APY] = bar_tab[tables.SUPPLY_APY_FEATURE, u]
            obs[b, p, j + S_AAVE_UTILIZATION] = bar_tab[tables.UTILIZATION, u]
        if AR:
            obs[b, p, j + S_ARB_WEIGHT] = o_sf[b, ARB_VALUE, p] * inv_eq
            obs[b, p, j + S_SPREAD] = floats[tables.SPREAD_FEATURE, row]
            obs[b, p, j + S_ARB_EDGE_BPS] = floats[tables.EDGE_FEATURE, row]
            obs[b, p, j + S_VENUE2_AVAILABLE] = floats[tables.V2_AVAILABLE, row]
            obs[b, p, j + S_TRANSFER_PENDING] = 1.0 if o_si[b, TR_DUE, p] != NO_TRANSFER else 0.0


@_jit_inline
def sell_coins(b, p, u, a, o, trad, unbond_bars, pair, o_sf, o_si, o_sb, f, k, prm, S):
    """1a. The spot exit of slot p at the open o: a CLOSE (or an exit waiting on unbonding) sells the free coins;
    with staking, a close or an UNSTAKE starts unbonding staked coins and a STAKE stakes free ones. The trade
    counts as closed (k[K_CLOSED], its return in f[F_RET]) once no coins are left locked."""
    fee, slip = prm[FEE], prm[SLIP]
    units = o_sf[b, UNITS, p]
    pending = S and o_sb[b, PENDING, p]  # no exit waits without staking
    want_close = a == CLOSE
    if S:
        want_close = want_close or pending
    sell = want_close and units > 0 and trad
    gross = units * (o * (1.0 - slip))
    proceeds = gross * (1.0 - fee) if sell else 0.0
    f[F_COST, p] = units * o * slip + gross * fee if sell else 0.0
    if sell:
        units = 0.0
    f[F_FLOW, p] = proceeds
    entry_cost = o_sf[b, ENTRY_COST, p]
    if S:
        staked, unbonding = o_sf[b, STAKED, p], o_sf[b, UNBONDING, p]
        if want_close:
            request = staked
        elif a == UNSTAKE:
            request = staked * prm[UNSTAKE_FRACTION]
        else:
            request = 0.0
        amount = 0.0 if unbonding > 0 else min(max(request, 0.0), max(staked, 0.0))
        if amount > 0:
            o_si[b, RELEASE, p] = u + unbond_bars[pair[b, p]]
        staked, unbonding = staked - amount, unbonding + amount
        moved = units * prm[STAKE_FRACTION] if a == STAKE else 0.0
        units, staked = units - moved, staked + moved
        o_sf[b, STAKED, p], o_sf[b, UNBONDING, p] = staked, unbonding
        locked = staked + unbonding
        f[F_LOCKED, p] = locked
        exit_proceeds = o_sf[b, EXIT_PROCEEDS, p] + proceeds
        o_sf[b, EXIT_PROCEEDS, p] = exit_proceeds
        closed = sell and locked <= 0
        f[F_RET, p] = exit_proceeds / max(entry_cost, 1e-30) - 1.0 if closed else 0.0
        o_sb[b, PENDING, p] = want_close and locked > 0
    else:
        closed = sell
        f[F_RET, p] = proceeds / max(entry_cost, 1e-30) - 1.0 if sell else 0.0
    k[K_CLOSED, p] = closed
    o_sf[b, UNITS, p] = units


@_jit_inline
def close_lp(b, p, a, o, row, trad, floats, o_sf, f, k, prm):
    """1b. An LP_CLOSE of slot p's Uniswap V3 position at the open o: its coins and quote at the open's price
    (the coins swapped to quote), plus the fees it earned, less gas; the impermanent loss realised."""
    fee, slip = prm[FEE], prm[SLIP]
    L, spa, spb = o_sf[b, LP_L, p], o_sf[b, LP_SPA, p], o_sf[b, LP_SPB, p]
    x0, y0 = o_sf[b, LP_X0, p], o_sf[b, LP_Y0, p]
    f[F_X0_BEFORE, p] = x0
    lp_closed = a == LP_CLOSE and trad
    k[K_LP_CLOSED, p] = lp_closed
    closing = 1.0 if lp_closed else 0.0
    sp = min(max(floats[tables.SQRT_OPEN, row], spa), spb)
    x_open, y_open = L * (1.0 / sp - 1.0 / spb), L * (sp - spa)
    coin_open = x_open * o
    swap_out = coin_open * (fee + slip)
    lp_cash = coin_open + y_open + o_sf[b, LP_FEES, p] - swap_out - prm[GAS_CLOSE]
    f[F_FLOW, p] = f[F_FLOW, p] + lp_cash * closing
    f[F_COST, p] = f[F_COST, p] + (swap_out + prm[GAS_CLOSE]) * closing
    f[F_IL_PNL, p] = (coin_open + y_open - (x0 * o + y0)) * closing
    f[F_LP_RET, p] = lp_cash / max(o_sf[b, LP_COST, p], 1e-30) - 1.0
    keep = 1.0 - closing
    o_sf[b, LP_L, p], o_sf[b, LP_X0, p], o_sf[b, LP_Y0, p] = L * keep, x0 * keep, y0 * keep
    o_sf[b, LP_FEES, p] = o_sf[b, LP_FEES, p] * keep


@_jit_inline
def close_book(b, p, a, o, row, floats, flags, o_sf, o_sb, f, k, prm):
    """1c. An ARB_CLOSE of slot p's arbitrage book, where both venues quote: each venue's coins sold at its
    open, taker fees paid; the venues' price gap on venue B's coins goes to the arbitrage PnL."""
    fa, fb = prm[FEE_A], prm[FEE_B]
    o2 = floats[tables.V2_OPEN, row]
    arb_closed = a == ARB_CLOSE and flags[tables.QUOTED, row]
    k[K_ARB_CLOSED, p] = arb_closed
    closing = 1.0 if arb_closed else 0.0
    qa, ca, qb, cb = o_sf[b, QA, p], o_sf[b, CA, p], o_sf[b, QB, p], o_sf[b, CB, p]
    coin_a_value, coin_b_value = ca * o, cb * o2
    book_cash = qa + qb + coin_a_value * (1.0 - fa) + coin_b_value * (1.0 - fb)
    f[F_FLOW, p] = f[F_FLOW, p] + book_cash * closing
    f[F_COST, p] = f[F_COST, p] + (coin_a_value * fa + coin_b_value * fb) * closing
    f[F_ARB_PNL, p] = (coin_b_value - cb * o) * closing
    f[F_ARB_RET, p] = book_cash / max(o_sf[b, ARB_COST, p], 1e-30) - 1.0
    keep = 1.0 - closing
    o_sf[b, QA, p], o_sf[b, CA, p] = qa * keep, ca * keep
    o_sf[b, QB, p], o_sf[b, CB, p] = qb * keep, cb * keep
    o_sf[b, ARB_COST, p] = o_sf[b, ARB_COST, p] * keep
    o_sb[b, BOOK, p] = o_sb[b, BOOK, p] and not arb_closed


@_jit_inline
def withdraw(b, p, a, o_sf, f):
    """1d. A WITHDRAW takes slot p's whole Aave supply (interest included) back to cash."""
    withdrawing = 1.0 if a == WITHDRAW else 0.0
    f[F_FLOW, p] = f[F_FLOW, p] + o_sf[b, LENT, p] * withdrawing
    keep = 1.0 - withdrawing
    o_sf[b, LENT, p], o_sf[b, PRINCIPAL, p] = o_sf[b, LENT, p] * keep, o_sf[b, PRINCIPAL, p] * keep


@_jit_inline
def exits_at_open(b, u, n_cols, pair, prices, floats, flags, unbond_bars, acts, o_sf, o_si, o_sb, f, k, prm, S, LP,
                  LE, AR):
    """1. Exits at the open of bar u for episode b, slot by slot in pair order: spot coins (a close unbonds
    staked coins, sold once free) and staking moves, then LP positions, arbitrage books and Aave supply. The
    cash each slot receives goes to f[F_FLOW], its costs to f[F_COST]."""
    for p in range(acts.shape[1]):
        a = acts[b, p]
        row = u * n_cols + pair[b, p]
        o = prices[row, 0]
        trad = o_sb[b, TRADABLE, p]
        sell_coins(b, p, u, a, o, trad, unbond_bars, pair, o_sf, o_si, o_sb, f, k, prm, S)
        if LP:
            close_lp(b, p, a, o, row, trad, floats, o_sf, f, k, prm)
        if AR:
            close_book(b, p, a, o, row, floats, flags, o_sf, o_sb, f, k, prm)
        if LE:
            withdraw(b, p, a, o_sf, f)


@_jit_inline
def entry_room(b, u, n_cols, pair, flags, ef, acts, o_sf, o_sb, f, k, prm, S, LP, LE, AR, blk):
    """2a. What episode b may enter at the open of bar u: the wishes (k[K_WANT], k[K_WANT_LP], k[K_WANT_ARB]),
    the trades open toward the concurrent cap (spot trades, LP positions, 2 legs per arbitrage book) and the
    cash available (the cash after the exits, plus the Aave supply under the sweep). Returns (open trades,
    available)."""
    n_pairs = acts.shape[1]
    open_trades = 0
    flow_sum = 0.0
    for p in range(n_pairs):
        units = o_sf[b, UNITS, p]
        want = acts[b, p] == OPEN_LONG and units == 0 and o_sb[b, TRADABLE, p] and not blk
        if S:
            want = want and f[F_LOCKED, p] <= 0
            if units + f[F_LOCKED, p] > 0:
                open_trades += 1
        elif units > 0:
            open_trades += 1
        k[K_WANT, p] = want
        flow_sum += f[F_FLOW, p]
    available = ef[b, CASH] + flow_sum
    if LE and prm[LEND_SWEEP] > 0:
        for p in range(n_pairs):
            available += o_sf[b, LENT, p]  # the sweep withdraws what the entries need
    if LP:
        for p in range(n_pairs):
            if o_sf[b, LP_L, p] > 0:
                open_trades += 1
            k[K_WANT_LP, p] = acts[b, p] == LP_OPEN and o_sb[b, TRADABLE, p] and not blk
    if AR:
        for p in range(n_pairs):
            if o_sb[b, BOOK, p]:
                open_trades += 2
        for p in range(n_pairs):
            row = u * n_cols + pair[b, p]
            k[K_WANT_ARB, p] = acts[b, p] == ARB and not o_sb[b, BOOK, p] and flags[tables.QUOTED, row] and not blk
    return open_trades, available


@_jit_inline
def admit_entries(b, pair, withdrawal_fee, sf, f, k, prm, LP, AR, open_trades, available, notional, lp_notional):
    """2b. The entries of episode b admitted under the concurrent-trade cap: single trades in pair order (spot
    then LP for each pair), then arbitrage books (2 legs each); each one's spend in f[F_SPEND], scaled down
    together when the cash available runs short. Returns the scale (1 when the cash suffices)."""
    n_pairs = f.shape[1]
    fee, slip, fa, fb = prm[FEE], prm[SLIP], prm[FEE_A], prm[FEE_B]
    capacity = max(int(prm[MAX_TRADES]) - open_trades, 0)
    if not (LP or AR):
        rank = 0
        total = 0.0
        for p in range(n_pairs):
            rank += 1 if k[K_WANT, p] else 0
            k[K_ACCEPTED, p] = k[K_WANT, p] and rank <= capacity
            f[F_SPEND, p] = notional * (1.0 + fee) if k[K_ACCEPTED, p] else 0.0
            total += f[F_SPEND, p]
        shrink = available / max(total, 1e-30) if total > available else 1.0
        for p in range(n_pairs):
            f[F_SPEND, p] = f[F_SPEND, p] * shrink
        return 1.0
    rank = 0
    for p in range(n_pairs):
        rank += 1 if k[K_WANT, p] else 0
        k[K_ACCEPTED, p] = k[K_WANT, p] and rank <= capacity
        rank += 1 if k[K_WANT_LP, p] else 0
        k[K_ACCEPTED_LP, p] = k[K_WANT_LP, p] and rank <= capacity
    used = min(rank, capacity)
    book_rank = 0
    for p in range(n_pairs):
        book_rank += 2 if k[K_WANT_ARB, p] else 0
        k[K_ACCEPTED_ARB, p] = k[K_WANT_ARB, p] and book_rank <= capacity - used
    variable = 0.0
    n_lp = 0
    arb_sum = 0.0
    for p in range(n_pairs):
        f[F_SPEND, p] = notional * (1.0 + fee) if k[K_ACCEPTED, p] else 0.0
        variable += f[F_SPEND, p]
        n_lp += 1 if k[K_ACCEPTED_LP, p] else 0
        if AR and k[K_ACCEPTED_ARB, p]:  # a book sized up to its minimum (the mask checked the cap)
            book_min = withdrawal_fee[pair[b, p]] * sf[b, CLOSE_PX, p] / prm[MAX_WITHDRAWAL_SHARE]
            arb_sum += max(notional, book_min) * (1.0 + (fa + fb) / 4.0)
    gas = 0.0
    if LP:
        variable = variable + n_lp * lp_notional * (1.0 + prm[LP_COIN_SHARE] * (fee + slip))
        gas = n_lp * prm[GAS_OPEN]
    if AR:
        variable = variable + arb_sum
    scale = 1.0
    if variable + gas > available:
        scale = max(available - gas, 0.0) / max(variable, 1e-30)
    for p in range(n_pairs):
        f[F_SPEND, p] = f[F_SPEND, p] * scale
    return scale


@_jit_inline
def open_lp(b, p, o, row, floats, o_sf, f, k, prm, budget, scale, up, down, k_lp):
    """2d. An admitted LP_OPEN of slot p: a symmetric Uniswap V3 position of `budget` quote around the open
    (uniswap_v3.open_symmetric), the coin share swapped in at fee and slippage, gas paid."""
    fee, slip = prm[FEE], prm[SLIP]
    accepted_lp = k[K_ACCEPTED_LP, p] and scale > 0 and budget >= prm[LP_MIN_NOTIONAL]
    s = floats[tables.SQRT_OPEN, row]
    swap_in = budget * (prm[LP_COIN_SHARE] * (fee + slip))
    lp_out = budget + swap_in + prm[GAS_OPEN]
    opening = 1.0 if accepted_lp else 0.0
    f[F_FLOW, p] = f[F_FLOW, p] - lp_out * opening
    f[F_COST, p] = f[F_COST, p] + (swap_in + prm[GAS_OPEN]) * opening
    if accepted_lp:  # uniswap_v3.open_symmetric
        o_sf[b, LP_L, p] = budget / (s * k_lp)
        o_sf[b, LP_SPA, p], o_sf[b, LP_SPB, p] = s * down, s * up
        o_sf[b, LP_X0, p] = budget * ((1.0 - 1.0 / up) / k_lp) / o
        o_sf[b, LP_Y0, p] = budget * ((1.0 - down) / k_lp)
        o_sf[b, LP_COST, p] = lp_out


@_jit_inline
def fund_book(b, p, o, row, floats, withdrawal_fee, pair, sf, o_sf, o_sb, f, k, prm, notional, scale):
    """2e. An admitted new arbitrage book of slot p: a quarter of its notional (sized up to the book's minimum)
    in quote and a quarter in coins at each venue, bought at the venues' opens with taker fees."""
    fa, fb = prm[FEE_A], prm[FEE_B]
    o2 = floats[tables.V2_OPEN, row]
    book_min = withdrawal_fee[pair[b, p]] * sf[b, CLOSE_PX, p] / prm[MAX_WITHDRAWAL_SHARE]
    book_notional = max(notional, book_min)
    k[K_ACCEPTED_ARB, p] = k[K_ACCEPTED_ARB, p] and scale > 0 and book_notional * scale >= book_min
    quarter = book_notional * scale * 0.25
    funding_fees = quarter * (fa + fb)
    book_out = 4.0 * quarter + funding_fees
    funding = 1.0 if k[K_ACCEPTED_ARB, p] else 0.0
    f[F_FLOW, p] = f[F_FLOW, p] - book_out * funding
    f[F_COST, p] = f[F_COST, p] + funding_fees * funding
    coin_b = quarter / o2
    f[F_ARB_PNL, p] = f[F_ARB_PNL, p] + (coin_b * o - quarter) * funding
    if k[K_ACCEPTED_ARB, p]:
        o_sf[b, QA, p], o_sf[b, QB, p] = quarter, quarter
        o_sf[b, CA, p], o_sf[b, CB, p] = quarter / o, coin_b
        o_sb[b, BOOK, p] = True
        o_sf[b, ARB_COST, p] = book_out


@_jit_inline
def fill_entries(b, u, n_cols, pair, prices, floats, withdrawal_fee, sf, o_sf, o_sb, f, k, prm, LP, AR, notional,
                 lp_notional, scale):
    """2c. The admitted entries of episode b filled at the open of bar u, slot by slot: spot coins bought at the
    open plus slippage with f[F_SPEND], then LP positions and arbitrage books."""
    slip, fee = prm[SLIP], prm[FEE]
    width = prm[LP_WIDTH]
    up, down = math.sqrt(1.0 + width), math.sqrt(1.0 - width)
    k_lp = 2.0 - 1.0 / up - down
    for p in range(f.shape[1]):
        row = u * n_cols + pair[b, p]
        o = prices[row, 0]
        spend = f[F_SPEND, p]
        buy_px = o * (1.0 + slip)
        bought = spend / (1.0 + fee) / buy_px
        if k[K_ACCEPTED, p]:
            f[F_COST, p] = f[F_COST, p] + (bought * o * slip + spend * (fee / (1.0 + fee)))
        f[F_FLOW, p] = f[F_FLOW, p] - spend
        if k[K_ACCEPTED, p]:
            o_sf[b, UNITS, p], o_sf[b, ENTRY, p], o_sf[b, ENTRY_COST, p] = bought, buy_px, spend
            o_sf[b, HIGHEST, p], o_sf[b, BARS, p] = buy_px, 0.0
        if LP:
            open_lp(b, p, o, row, floats, o_sf, f, k, prm, lp_notional * scale, scale, up, down, k_lp)
        if AR:
            fund_book(b, p, o, row, floats, withdrawal_fee, pair, sf, o_sf, o_sb, f, k, prm, notional, scale)


@_jit_inline
def stop_or_target(b, p, o, h, lo, trad, o_sf, o_sb, f, k, prm, S):
    """5. Stops and targets of slot p inside the bar (open o, high h, low lo): a spot trade that touches its stop
    or target is sold there (risk.exits_in_bar); a stop with coins still unbonding leaves the exit pending.
    Updates the trade's highest price and bars held. Returns (coins left, coins stopped out, exit price)."""
    fee, slip = prm[FEE], prm[SLIP]
    units, entry, highest = o_sf[b, UNITS, p], o_sf[b, ENTRY, p], o_sf[b, HIGHEST, p]
    locked = f[F_LOCKED, p]
    pending = S and o_sb[b, PENDING, p]  # no exit waits without staking
    if S:
        holding = units + locked > 0 and trad and not pending
    else:
        holding = units > 0 and trad
    stop, target = stop_and_target(entry, highest, prm[STOP_LOSS], prm[TAKE_PROFIT], prm[TRAILING_STOP])
    stop_hit, target_hit, exit_px = exit_in_bar(o, h, lo, stop, target)
    forced = holding and (stop_hit or target_hit)
    forced_gross = units * exit_px * (1.0 - slip)
    forced_proceeds = forced_gross * (1.0 - fee) if forced else 0.0
    if forced:
        f[F_COST, p] = f[F_COST, p] + (units * exit_px * slip + forced_gross * fee)
    stopped_units = units if forced else 0.0
    entry_cost = o_sf[b, ENTRY_COST, p]
    exit_proceeds = 0.0
    if S:
        exit_proceeds = o_sf[b, EXIT_PROCEEDS, p] + forced_proceeds
        forced_closed = forced and locked <= 0
        if forced_closed:
            f[F_RET, p] = exit_proceeds / max(entry_cost, 1e-30) - 1.0
            k[K_CLOSED, p] = True
        if forced and locked > 0:
            pending = True
    else:
        if forced:
            f[F_RET, p] = forced_proceeds / max(entry_cost, 1e-30) - 1.0
            k[K_CLOSED, p] = True
    f[F_FLOW, p] = f[F_FLOW, p] + forced_proceeds
    if forced:
        units = 0.0
    still = units > 0
    if S:
        still = still or locked > 0
        o_sf[b, EXIT_PROCEEDS, p] = exit_proceeds if still else 0.0
        o_sb[b, PENDING, p] = pending and still
    if still and trad:
        o_sf[b, HIGHEST, p] = max(highest, h)
    o_sf[b, BARS, p] = o_sf[b, BARS, p] + 1.0 if still else 0.0
    if not still:
        o_sf[b, ENTRY, p], o_sf[b, ENTRY_COST, p] = 0.0, 0.0
    o_sf[b, UNITS, p] = units
    return units, stopped_units, exit_px


@_jit_inline
def mark_lp(b, p, row, o, h, lo, c, floats, sf, o_sf, f, prm, spot_pnl, value):
    """6b. What slot p's Uniswap V3 position earns in the bar: its share of the pool's fees for the part of the
    bar's range inside its own (uniswap_v3.in_range_fraction), its value and impermanent loss at the close, its
    coins' price move. Returns (spot_pnl, value) with the position's added."""
    L, spa, spb = o_sf[b, LP_L, p], o_sf[b, LP_SPA, p], o_sf[b, LP_SPB, p]
    pa, pb = spa * spa, spb * spb
    span = h - lo
    if span <= 0:  # uniswap_v3.in_range_fraction
        fraction = 1.0 if lo >= pa and lo <= pb else 0.0
    else:
        fraction = min(max(min(h, pb) - max(lo, pa), 0.0) / max(span, prm[TINY]), 1.0)
    share = L / max(L + floats[tables.POOL_LIQUIDITY, row], prm[TINY])
    lp_fee_pnl = fraction * share * floats[tables.POOL_FEE_VOLUME, row]
    f[F_LP_FEE_PNL, p] = lp_fee_pnl
    lp_fees = o_sf[b, LP_FEES, p] + lp_fee_pnl
    o_sf[b, LP_FEES, p] = lp_fees
    sp = min(max(floats[tables.SQRT_CLOSE, row], spa), spb)
    x_close, y_close = L * (1.0 / sp - 1.0 / spb), L * (sp - spa)
    lp_value = x_close * c + y_close
    x0, y0 = o_sf[b, LP_X0, p], o_sf[b, LP_Y0, p]
    lp_il = lp_value - (x0 * c + y0)
    f[F_IL_PNL, p] = f[F_IL_PNL, p] + lp_il - sf[b, LP_IL, p]
    o_sf[b, LP_VALUE, p], o_sf[b, LP_IL, p] = lp_value, lp_il
    spot_pnl = spot_pnl + f[F_X0_BEFORE, p] * (o - sf[b, CLOSE_PX, p]) + x0 * (c - o)
    value = value + lp_value + lp_fees
    return spot_pnl, value


@_jit_inline
def mark_slot(b, p, u, row, o, h, lo, c, units, stopped_units, exit_px, pair, floats, bar_tab, stake_growth, sf,
              o_sf, f, prm, S, LP, LE, AR):
    """6. What slot p earns in the bar, everything marked at the close c: the coins' price move (from the last
    close to the open, the stopped coins' exit, the rest to the close), staking rewards, LP fees and impermanent
    loss, Aave interest, the arbitrage books' coins. The PnL by source goes to the scratch rows, the slot's
    value at the close to f[F_VALUE]."""
    locked = f[F_LOCKED, p]
    coins_after = units + locked if S else units
    spot_pnl = (f[F_COINS_BEFORE, p] * (o - sf[b, CLOSE_PX, p]) + stopped_units * (exit_px - o)
                + coins_after * (c - o))
    value = coins_after * c
    if S:
        staked = o_sf[b, STAKED, p]
        grown = staked * stake_growth[pair[b, p]]
        stake_pnl = (grown - staked) * c
        f[F_STAKE_PNL, p] = stake_pnl
        o_sf[b, STAKED, p] = grown
        value = value + stake_pnl
    if LP:
        spot_pnl, value = mark_lp(b, p, row, o, h, lo, c, floats, sf, o_sf, f, prm, spot_pnl, value)
    if LE:
        lent = o_sf[b, LENT, p]
        grown = lent * bar_tab[tables.SUPPLY_GROWTH, u]
        f[F_INTEREST, p] = grown - lent
        o_sf[b, LENT, p] = grown
        value = value + grown
    if AR:
        arb_coins_after = o_sf[b, CA, p] + o_sf[b, CB, p] + abs(o_sf[b, TR_COIN, p])
        spot_pnl = spot_pnl + f[F_ARB_COINS_BEFORE, p] * (o - sf[b, CLOSE_PX, p])
        spot_pnl = spot_pnl + arb_coins_after * (c - o)
        arb_value = o_sf[b, QA, p] + o_sf[b, QB, p] + abs(o_sf[b, TR_QUOTE, p]) + arb_coins_after * c
        o_sf[b, ARB_VALUE, p] = arb_value
        value = value + arb_value
    f[F_SPOT_PNL, p] = spot_pnl
    f[F_VALUE, p] = value
    o_sf[b, CLOSE_PX, p] = c


@_jit_inline
def stops_and_marks(b, u, n_cols, pair, prices, floats, bar_tab, stake_growth, sf, o_sf, o_sb, f, k, prm, S, LP, LE,
                    AR):
    """5 and 6, slot by slot in one pass over episode b's pairs: the stops and targets inside bar u, then what
    the bar earns, marked at its close."""
    for p in range(f.shape[1]):
        row = u * n_cols + pair[b, p]
        o, h, lo, c = prices[row, 0], prices[row, 1], prices[row, 2], prices[row, 3]
        trad = o_sb[b, TRADABLE, p]
        units, stopped_units, exit_px = stop_or_target(b, p, o, h, lo, trad, o_sf, o_sb, f, k, prm, S)
        mark_slot(b, p, u, row, o, h, lo, c, units, stopped_units, exit_px, pair, floats, bar_tab, stake_growth, sf,
                  o_sf, f, prm, S, LP, LE, AR)


@_jit_inline
def settle(b, sf, ef, o_sf, f, reward, prm, prev_eq, spot_alone):
    """6c. Episode b's cash and equity at the close, its peak and drawdown, and each slot's reward: its change of
    value plus its cash flows, on the log scale of the equity change, less the drawdown penalty. Returns (cash,
    equity, peak, drawdown, x: the equity's relative change)."""
    n_pairs = f.shape[1]
    flow_sum = 0.0
    for p in range(n_pairs):
        flow_sum += f[F_FLOW, p]
    cash = ef[b, CASH] + flow_sum
    value_sum = 0.0
    for p in range(n_pairs):
        value_sum += f[F_VALUE, p]
    equity = cash + value_sum
    x = equity / prev_eq - 1.0
    scale_log = 1.0 - x / 2.0 if abs(x) <= 1e-6 else math.log1p(x) / x
    peak = max(ef[b, PEAK], equity)
    drawdown = 1.0 - equity / peak
    penalty = 0.0
    if prm[DD_PENALTY] > 0:
        prev_dd = 1.0 - prev_eq / ef[b, PEAK]
        penalty = prm[DD_PENALTY] * max(drawdown - prev_dd, 0.0) / n_pairs
    for p in range(n_pairs):
        # spot alone: a slot's value at the last close is its coins at that close, whatever the packed state
        # says (the tensor step keeps no slot values for spot alone)
        last_value = sf[b, UNITS, p] * sf[b, CLOSE_PX, p] if spot_alone else sf[b, SLOT_VALUE, p]
        slot_change = f[F_VALUE, p] - last_value + f[F_FLOW, p]
        reward[b, p] = slot_change * (scale_log / prev_eq) - penalty
        if not spot_alone:
            o_sf[b, SLOT_VALUE, p] = f[F_VALUE, p]
    return cash, equity, peak, drawdown, x


@_jit_inline
def bookkeeping(b, u, ring, head, ef, ei, e64, o_ef, o_ei, o_e64, pnl_rows, f, k, spot_alone, prev_eq, cash, equity,
                peak, drawdown, x, ds):
    """7. Episode b's bookkeeping: the Kelly history (spot trades' returns into the ring), the statistics (trades,
    wins, costs, returns, drawdown), the PnL by source, the episode's new numbers. Returns the Kelly window's
    (head, wins, losses, sum of wins, sum of losses), in float64 for the next size."""
    new_head, n_win, n_loss, sum_win, sum_loss = record_closed_trades(
        ring[b], head[b], k[K_CLOSED], f[F_RET], ef[b, N_WIN], ef[b, N_LOSS], ef[b, SUM_WIN], ef[b, SUM_LOSS])
    head[b] = new_head
    o_ef[b, N_WIN], o_ef[b, N_LOSS], o_ef[b, SUM_WIN], o_ef[b, SUM_LOSS] = n_win, n_loss, sum_win, sum_loss
    done = 0
    won = 0
    cost_b = 0.0
    for p in range(f.shape[1]):
        if k[K_CLOSED, p]:
            done += 1
            won += 1 if f[F_RET, p] > 0 else 0
        if k[K_LP_CLOSED, p]:
            done += 1
            won += 1 if f[F_LP_RET, p] > 0 else 0
        if k[K_ARB_CLOSED, p]:
            done += 1
            won += 1 if f[F_ARB_RET, p] > 0 else 0
        cost_b += f[F_COST, p]
    if spot_alone:  # every change of equity that is not a cost is the coins' price move (as the tensor step)
        pnl_rows[PNL_SPOT, b] += (equity - prev_eq) + cost_b
    else:
        for source, scratch_row in PNL_FROM_SCRATCH:
            total = 0.0
            for p in range(f.shape[1]):
                total += f[scratch_row, p]
            pnl_rows[source, b] += total
    pnl_rows[PNL_FEES_AND_GAS, b] += -cost_b
    o_e64[b, RET_SUM] = e64[b, RET_SUM] + x
    o_e64[b, RET_SQ_SUM] = e64[b, RET_SQ_SUM] + x * x
    o_ef[b, MAX_DD] = max(ef[b, MAX_DD], drawdown)
    o_ei[b, TRADES] = ei[b, TRADES] + done
    o_ei[b, WINS] = ei[b, WINS] + won
    o_ef[b, COSTS] = ef[b, COSTS] + cost_b
    o_ef[b, CASH], o_ef[b, EQUITY], o_ef[b, PEAK], o_ef[b, DAY_START] = cash, equity, peak, ds
    o_ei[b, T_BAR] = u
    return new_head, n_win, n_loss, sum_win, sum_loss


@_jit_inline
def carry_state(b, sf, si, sb, o_sf, o_si, o_sb, spot_alone):
    """The slot state of episode b copied into the outputs, where the phases update it (element by element: CUDA
    device code has no array assignment). The scratch is not cleared: it starts at zero, and each step writes
    every entry of a strategy that is on before reading it."""
    n_pairs = sf.shape[2]
    for r in range(sf.shape[1]):
        for p in range(n_pairs):
            o_sf[b, r, p] = sf[b, r, p]
    if si.shape[1] > 0:  # the strategies' rows are laid out (a batch with a strategy on in any of its rows)
        for p in range(n_pairs):
            o_si[b, RELEASE, p], o_si[b, TR_DUE, p] = si[b, RELEASE, p], si[b, TR_DUE, p]
            o_sb[b, PENDING, p], o_sb[b, BOOK, p] = sb[b, PENDING, p], sb[b, BOOK, p]


@_jit_steps
def episode_steps(lo, hi, step_in, market, columns, state, params, out, scratch):
    """One step of episodes lo .. hi-1 (see BatchedTradingEnv._advance): the body of both kernels, the CPU's
    (_kernel, ranges of EPISODES_PER_CALL episodes, on numba's threads) and the GPU's (nexlify.env.fused_cuda,
    one CUDA thread per episode: the range b .. b), compiled from this one source. It allocates nothing (CUDA
    device code cannot): everything it writes goes into the arrays it is given. The arguments are _kernel's, in
    its order, grouped in tuples (a call with over 30 arguments compiles to a *args call); params holds every
    episode's parameter row. The body is the list of the bar's phases, each a function of its own, inlined.
    It is compiled as a function of its own (see _jit_steps), not inlined into the kernel: numba's inliner
    copies a callee's IR block by block, each block with the whole of its variable scope, so inlining a
    function this large cost half of the kernel's compile; a call per range of episodes costs nothing."""
    actions, mask, pair, t = step_in
    prices, tradable_tab, features, day, n_cols, n_bars = market
    (floats, flags, bar_tab, stake_growth, stake_apy_feature, unbond_bars, stakeable, withdrawal_fee,
     transfer_bars) = columns
    sf, si, sb, ef, ei, e64, blocked, ring, head, pnl_rows = state
    o_sf, o_si, o_sb, o_ef, o_ei, o_e64, o_blocked, reward, obs, o_mask = out
    fs, ks, acts = scratch
    for b in range(lo, hi):
        prm = params[b]
        spot_on, S, LP = prm[SPOT_ON] > 0, prm[STAKING_ON] > 0, prm[LP_ON] > 0
        LE, AR = prm[LENDING_ON] > 0, prm[ARB_ON] > 0
        spot_alone = not (S or LP or LE or AR)
        f, k = fs[b], ks[b]
        tb = t[b]
        u = tb + 1
        prev_eq = ef[b, EQUITY]
        ds = prev_eq if day[u] != day[tb] else ef[b, DAY_START]
        blk = blocked[b]
        notional = ef[b, SIZE] * prev_eq
        lp_notional = max(notional, prm[LP_MIN_NOTIONAL])  # an LP position is sized up to its minimum
        carry_state(b, sf, si, sb, o_sf, o_si, o_sb, spot_alone)

        # 0. What the open brings: unbonding lots that come free, transfers between the venues that land.
        open_bar(b, u, actions, mask, pair, n_cols, tradable_tab, o_sf, o_si, o_sb, f, acts, S, AR)

        # 1. Exits at the open: spot coins (a close unbonds staked coins, sold once free), then LP
        #    positions, arbitrage books and Aave supply; staking moves.
        exits_at_open(b, u, n_cols, pair, prices, floats, flags, unbond_bars, acts, o_sf, o_si, o_sb, f, k, prm, S, LP,
                      LE, AR)

        # 2. Entries at the open, under the concurrent-trade cap, sized by Kelly or fixed size: spot trades,
        #    LP positions and new arbitrage books, scaled down together when cash runs short.
        open_trades, available = entry_room(b, u, n_cols, pair, flags, ef, acts, o_sf, o_sb, f, k, prm, S, LP, LE, AR,
                                            blk)
        scale = admit_entries(b, pair, withdrawal_fee, sf, f, k, prm, LP, AR, open_trades, available, notional,
                              lp_notional)
        fill_entries(b, u, n_cols, pair, prices, floats, withdrawal_fee, sf, o_sf, o_sb, f, k, prm, LP, AR, notional,
                     lp_notional, scale)

        # 3. Arbitrage from the books at both venues' opens, then rebalancing of a book that ran low.
        if AR:
            arbitrage_fills(b, u, n_cols, pair, prices, floats, flags, withdrawal_fee, transfer_bars, acts, o_sf, o_si,
                            o_sb, f, prm)

        # 4. Lending: the sweep sets the supply to max_idle_share of the idle USDT left after the entries, or (by
        #    hand) a LEND tops it up to that (the first LEND of the bar in pair order supplies it all).
        if LE:
            lend(b, ef, o_sf, f, acts, prm)

        # 5. Stops and targets inside bar t+1; 6. what the bar earns, everything marked at the close; the rewards.
        stops_and_marks(b, u, n_cols, pair, prices, floats, bar_tab, stake_growth, sf, o_sf, o_sb, f, k, prm, S, LP, LE,
                        AR)
        cash, equity, peak, drawdown, x = settle(b, sf, ef, o_sf, f, reward, prm, prev_eq, spot_alone)

        # 7. Bookkeeping: Kelly history (spot trades), episode statistics, PnL by source.
        new_head, n_win, n_loss, sum_win, sum_loss = bookkeeping(
            b, u, ring, head, ef, ei, e64, o_ef, o_ei, o_e64, pnl_rows, f, k, spot_alone, prev_eq, cash, equity, peak,
            drawdown, x, ds)

        # 8. The next bar's derived state (_refresh): Kelly size, daily-loss block, mask; then the observation.
        size_b = position_size(n_win, n_loss, sum_win, sum_loss, new_head, prm[KELLY_ON] > 0,
                               prm[KELLY_MIN_TRADES], prm[KELLY_FRACTION], prm[KELLY_FLOOR], prm[FIXED_SIZE],
                               prm[MAX_POSITION])
        o_ef[b, SIZE] = size_b
        blocked_b = entries_blocked(equity, ds, prm[DAILY_LOSS_LIMIT], day[min(u + 1, n_bars - 1)], day[u])
        o_blocked[b] = blocked_b
        open_trades = refresh_mask(o_mask, b, u, n_cols, pair, o_sf, o_si, o_sb, flags, stakeable, withdrawal_fee,
                                   prm, spot_on, S, LP, LE, AR, equity, cash, size_b, blocked_b)
        observe(obs, b, u, n_cols, pair, features, o_sf, o_si, floats, bar_tab, stake_apy_feature, prm, S, LP, LE, AR,
                equity, cash, ds, size_b, open_trades)


# episodes per call of episode_steps from the CPU kernel: a call passes a few hundred words of array descriptors,
# nothing beside 64 episodes' steps; the threaded build splits the ranges evenly between its threads
EPISODES_PER_CALL = 64


def _kernel(actions, mask, pair, t, prices, tradable_tab, features, day, n_cols, n_bars,
            floats, flags, bar_tab, stake_growth, stake_apy_feature, unbond_bars, stakeable, withdrawal_fee,
            transfer_bars, sf, si, sb, ef, ei, e64, blocked, ring, head, pnl_rows, prm,
            o_sf, o_si, o_sb, o_ef, o_ei, o_e64, o_blocked, reward, obs, o_mask, fs, ks, acts):
    """One step for every episode b (see BatchedTradingEnv._advance). sf/si/sb are the
    slot state [B, rows, P], ef/ei/e64 the episode state [B, rows]; o_* are written whole, and so are obs
    [B, P, O] and o_mask [B, P, A]; stake_growth .. transfer_bars are constants per market column; fs
    [B, N_SCRATCH, P], ks [B, N_FLAGS, P] (bool) and acts [B, P] are scratch; prm [B, PARAMS] holds each
    episode's parameters (its costs, risk rules and strategy switches: rows of several configs may step in one
    pass). The episodes go to episode_steps in ranges of EPISODES_PER_CALL, on numba's threads in the threaded
    build."""
    n = sf.shape[0]
    for r in numba.prange((n + EPISODES_PER_CALL - 1) // EPISODES_PER_CALL):
        episode_steps(r * EPISODES_PER_CALL, min(n, (r + 1) * EPISODES_PER_CALL), (actions, mask, pair, t),
                      (prices, tradable_tab, features, day, n_cols, n_bars),
                      (floats, flags, bar_tab, stake_growth, stake_apy_feature, unbond_bars, stakeable, withdrawal_fee,
                       transfer_bars), (sf, si, sb, ef, ei, e64, blocked, ring, head, pnl_rows), prm,
                      (o_sf, o_si, o_sb, o_ef, o_ei, o_e64, o_blocked, reward, obs, o_mask), (fs, ks, acts))


_compiled: dict[tuple[str, bool], Any] = {}
PARALLEL_MIN_SLOTS = 4096  # below this many episode slots, threads cost more than they save


def compiled(kernel: Any, name: str, parallel: bool) -> Any:
    """`kernel` compiled on first use (COMPILE_SECONDS) and cached on disk where numba can write (next to this
    file, else the user's cache directory, e.g. $XDG_CACHE_HOME/numba or $NUMBA_CACHE_DIR): later
    processes load it in about a second. The serial build starts no thread pool: one-thread workers
    running side by side must not have idle pool threads spinning on each other's cores."""
    key = (name, parallel)
    if key not in _compiled:
        seeded = seed_cache_dir(numba.config.CACHE_DIR, user_cache_dir())
        if seeded is not None:
            numba.config.CACHE_DIR = seeded
        # numba's cache tells entries apart by the function's name, not by the `parallel` flag, and checks only
        # the kernel's own file for changes, not those of the rules it inlines or the constants it compiles in
        # (the layout, the tables' rows): each build gets a name of its own that carries a digest of the
        # sources of the kernel's module and of every nexlify module it imports, transitively
        flavour = "threaded" if parallel else "serial"
        build = f"{name}_{flavour}_{_sources_digest(kernel.__module__)}"
        function = types.FunctionType(kernel.__code__, kernel.__globals__, build)
        function.__qualname__ = build
        # _nrt=False: no reference counting. The kernel allocates nothing (its body is CUDA device code too), and
        # the counts numba keeps on the arrays grouped into episode_steps' tuples, per episode, halved its speed
        options = {"parallel": parallel, "nogil": True, "error_model": "numpy", "_nrt": False}
        try:
            _compiled[key] = numba.njit(cache=True, **options)(function)
        except RuntimeError:  # no writable cache location: compile in every process
            _compiled[key] = numba.njit(cache=False, **options)(function)
        announce_compiles(_compiled[key], flavour)
    return _compiled[key]


def user_cache_dir() -> Path:
    """numba's folder in the user's cache directory ($XDG_CACHE_HOME, else ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "numba"


def _writable(folder: str | Path) -> bool:
    """numba's own test of a cache folder: a temporary file can be made in it."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def seed_cache_dir(cache_dir: str | None, user_cache: Path, writable: Callable[[str | Path], bool] = _writable) -> str | None:
    """Where numba should cache when $NUMBA_CACHE_DIR holds kernels it may not write to (an image's kernels,
    compiled at its build, under a read-only root filesystem): numba skips a cache folder it cannot write to and
    would compile anew, so its files are copied into the user's writable cache, whose path is returned; a file
    already there is kept (it may hold kernels compiled there since). None: nothing to do (no such folder, or
    it is writable), or no writable copy could be made."""
    if not cache_dir or not os.path.isdir(cache_dir) or writable(cache_dir):
        return None

    def copy_new(src: str, dst: str) -> None:
        if not os.path.exists(dst):
            shutil.copy2(src, dst)

    try:
        shutil.copytree(cache_dir, user_cache, copy_function=copy_new, dirs_exist_ok=True)
    except OSError:
        return None
    return str(user_cache) if writable(user_cache) else None


# about how long a build takes, measured in docs/speed.md ("First run"): on a quiet core of the 2-core machine the
# serial build took 42 s and the threaded one 49 s (85 s and 235 s while the whole step was inlined into the kernel)
COMPILE_SECONDS = {"serial": "about 40 s on a quiet core, minutes on a busy one",
                   "threaded": "about 50 s on a quiet 2-core machine, minutes on a busy one"}


def _has_cache_index(dispatcher: Any) -> bool:
    """numba's disk cache holds an index for the kernel (code for some argument types, maybe not these)."""
    cache = getattr(dispatcher, "_cache", None)
    index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
    return index is not None and Path(index).exists()


def _say_compiling(dispatcher: Any, flavour: str, **extra: Any) -> None:
    import structlog

    where = getattr(getattr(dispatcher, "_cache", None), "_cache_path", None)
    structlog.get_logger("nexlify.env").info(
        "kernel_compiling", kernel=f"environment step ({flavour})", about=COMPILE_SECONDS[flavour],
        cached_in=str(where) if where else "nowhere writable: set NUMBA_CACHE_DIR to keep it", **extra)


# a load from numba's disk cache takes about a second (more on a busy machine); a compile, far longer
COMPILE_NOTICE_AFTER_S = 5.0


def announce_compiles(dispatcher: Any, flavour: str, *, after_s: float = COMPILE_NOTICE_AFTER_S,
                      in_cache: Callable[[Any], bool] = _has_cache_index) -> None:
    """Compile `dispatcher` under the compile lock (compile_lock: processes side by side compile a kernel once)
    and say so when it compiles, so that a first run does not sit silent. numba's dispatcher calls its
    `_compile_for_args` only for argument types it holds no code for in this process; then, holding the lock:
    - no index in the disk cache (`in_cache`; a first run after an install or an upgrade): it compiles, and one
      line says so at once (what, about how long, where it is cached). A process that waited for another's
      compile finds the index by then and says only that it waited (compile_lock);
    - an index, which may still lack these argument types (another precision, another layout of the
      strategies): numba loads the code in about a second or compiles a new specialisation, which cannot be
      told before the call, so a timer says so if the call is still compiling after `after_s` seconds."""
    original = dispatcher._compile_for_args
    lock_path = _compile_lock_path(dispatcher)

    def compile_for_args(*args: Any, **kws: Any) -> Any:
        with compile_lock(lock_path, flavour):
            if not in_cache(dispatcher):
                _say_compiling(dispatcher, flavour)
                return original(*args, **kws)
            timer = threading.Timer(after_s, _say_compiling, (dispatcher, flavour), {"new_argument_types": True})
            timer.daemon = True
            timer.start()
            try:
                return original(*args, **kws)
            finally:
                timer.cancel()

    dispatcher._compile_for_args = compile_for_args


def _compile_lock_path(dispatcher: Any) -> Path | None:
    """The lock file beside the kernel's cache entries (None when it has no writable disk cache)."""
    cache = getattr(dispatcher, "_cache", None)
    where = getattr(cache, "_cache_path", None)
    name = getattr(getattr(dispatcher, "py_func", None), "__qualname__", "kernel")
    if not where or not os.path.isdir(where) or not _writable(where):
        return None
    return Path(where) / f"{name}.compile.lock"


@contextlib.contextmanager
def compile_lock(path: Path | None, flavour: str) -> Any:
    """Hold an exclusive lock on `path` while compiling, so that processes starting side by side (a
    pipeline's workers on a fresh install) compile a kernel once: the others wait, then numba's dispatcher
    finds the first one's code in the disk cache (it looks there before it compiles) and loads it in about a
    second, instead of each compiling for a minute on cores they share. No lock where there is no disk cache
    or no POSIX file locks (each process compiles, as before)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            import structlog

            structlog.get_logger("nexlify.env").info(
                "kernel_compile_waiting", kernel=f"environment step ({flavour})",
                why="another process is compiling it; its code is then loaded from the cache", lock=str(path))
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def _state_attr(env: Env, name: str) -> torch.Tensor:
    if name.startswith("kelly"):
        return env.kelly_sums[int(name[-1])]
    if name.startswith("stats."):
        return getattr(env.stats, name[len("stats."):])
    return getattr(env, name)


def _set_state(env: Env, views: list[tuple[str, torch.Tensor]]) -> None:
    for name, view in views:
        if name.startswith("stats."):
            setattr(env.stats, name[len("stats."):], view)
        elif not name.startswith("kelly"):
            setattr(env, name, view)
    env.kelly_sums = tuple(view for name, view in views if name.startswith("kelly"))
    env.stats.equity = env.equity


def copy_step_state(source: Env, target: Env) -> None:
    """Copies everything that carries from one step to the next (the names this kernel packs, the Kelly ring,
    the PnL rows, the mask and the host's flags) from source onto target, on target's device: the two then
    take their next step from the same state (tests and tools/gpu-check.py compare steps that way)."""
    dev = target.device
    names = SLOT_FLOATS + SLOT_INTS + SLOT_BOOLS + EPISODE_FLOATS + EPISODE_INTS + EPISODE_F64
    _set_state(target, [(n, _state_attr(source, n).to(dev, copy=True)) for n in names])
    target.trade_ring, target.trade_head = source.trade_ring.to(dev, copy=True), source.trade_head.to(dev, copy=True)
    target.stats.pnl_rows = source.stats.pnl_rows.to(dev, copy=True)
    target.blocked, target.mask = source.blocked.to(dev, copy=True), source.mask.to(dev, copy=True)
    target._arb_live, target._transfers_until = source._arb_live, source._transfers_until
    target.steps_done, target.stats.n_returns = source.steps_done, source.stats.n_returns


GROUPS = (("sf", SLOT_FLOATS), ("si", SLOT_INTS), ("sb", SLOT_BOOLS), ("ef", EPISODE_FLOATS), ("ei", EPISODE_INTS),
          ("e64", EPISODE_F64))
# spot alone: the spot trade's rows only (see SLOT_FLOATS)
SPOT_GROUPS = (("sf", SLOT_FLOATS[:N_SPOT_FLOATS]), ("si", ()), ("sb", SLOT_BOOLS[:N_SPOT_BOOLS])) + GROUPS[3:]


class FusedPortfolioStep:
    """Steps a BatchedTradingEnv with the fused kernel (tb: its strategy tables, every strategy off for spot
    alone); the environment's state tensors become views of the packed arrays the kernel writes (see the module
    doc). target "cpu": the numba CPU kernel on numpy views of CPU tensors; "cuda": the same episode_steps
    compiled by numba-cuda (nexlify.env.fused_cuda), on the tensors where they lie (a CUDA device, or CPU
    tensors under numba's CUDA simulator)."""

    def __init__(self, env: Env, tb: tables.StrategyTables, target: str = "cpu") -> None:
        self.target = target
        self.threads = torch.get_num_threads()
        parallel = target == "cpu" and self.threads > 1 and env.B * env.P >= PARALLEL_MIN_SLOTS
        self.kernel = compiled(_kernel, "_portfolio_kernel", parallel) if target == "cpu" else None
        self.parallel = parallel
        m = env.market
        # the kernel's constants: numpy views for the CPU kernel; for CUDA's, views of the tensors on the device,
        # made once (a view costs microseconds of Python at each launch)
        if target == "cpu":
            array = as_numpy
        else:
            from nexlify.env import fused_cuda  # numba-cuda: the optional extra `gpu`

            def array(x: torch.Tensor) -> Any:
                return fused_cuda.device_array(x.detach().contiguous())
        self.prices = array(env._prices)
        self.tradable = array(env._tradable)
        self.features = array(env._features)
        self.day = array(m.day.to(torch.int64))
        self.pair = array(env._pair_bp.to(torch.int64))
        self.n_cols, self.n_bars = env._n_cols, m.n_bars
        self.floats, self.flags, self.bar_tab = array(tb.floats), array(tb.flags), array(tb.bars)
        self.column_constants = tuple(array(x) for x in (
            tb.stake_growth, tb.stake_apy * 10.0, tb.unbond_bars.to(torch.int64), tb.stakeable,
            tb.withdrawal_fee_units, tb.transfer_bars.to(torch.int64)))
        P, B = env.P, env.B
        self.scratch = tuple(array(torch.zeros(shape, dtype=dtype, device=env.device)) for shape, dtype in (
            ((B, N_SCRATCH, P), torch.float64), ((B, N_FLAGS, P), torch.bool), ((B, P), torch.int64)))
        r, e, sp = env.risk_cfg, env.env_cfg, env.strategy_params
        values = {
            "fee": env.fee, "slip": env.slip, "stop_loss": r.stop_loss, "take_profit": r.take_profit,
            "trailing_stop": r.trailing_stop, "max_trades": r.max_trades, "daily_loss_limit": r.daily_loss_limit,
            "drawdown_penalty": e.drawdown_penalty, "initial_equity": e.initial_equity,
            "max_position": r.max_position, "kelly": r.kelly, "kelly_min_trades": r.kelly_min_trades,
            "kelly_fraction": r.kelly_fraction, "kelly_floor": r.kelly_floor, "fixed_size": r.fixed_size,
            "spot_on": env.spot_on, "staking_on": env.staking_on, "lp_on": env.lp_on, "lending_on": env.lending_on,
            "arb_on": env.arb_on, "unstake_fraction": sp.staking.unstake_fraction,
            "stake_fraction": sp.staking.stake_fraction, "lp_range_width": sp.lp.range_width,
            "lp_coin_share": uniswap_v3.coin_share(sp.lp.range_width), "gas_open": sp.lp.gas_usd_open,
            "gas_close": sp.lp.gas_usd_close, "fee_a": sp.arbitrage.taker_fee_a, "fee_b": sp.arbitrage.taker_fee_b,
            "max_notional": sp.arbitrage.max_notional_usd, "rebalance_below": sp.arbitrage.rebalance_below,
            "tiny": torch.finfo(env.dtype).tiny, "lp_min_notional": sp.lp.min_notional_usd,
            "lp_min_close": sp.lp.min_close_value_usd, "max_withdrawal_share": sp.arbitrage.max_withdrawal_share,
            "max_idle_share": sp.aave.max_idle_share, "lend_sweep": sp.aave.sweep,
        }
        # one row per episode (the same for all here; set_row_params gives rows other configs' parameters)
        self.params = array(torch.tensor([float(values[name]) for name in PARAMS], dtype=torch.float64,
                                         device=env.device).expand(B, len(PARAMS)).contiguous())
        self.groups = GROUPS if tb.any else SPOT_GROUPS
        self._views: list[tuple[str, torch.Tensor]] = []  # the tensors the last step gave the environment
        self._packed: dict[str, Any] = {}
        self._bound: list[tuple] | None = None  # see bind
        self._side = 0

    def set_row_params(self, rows: slice, other: "FusedPortfolioStep") -> None:
        """Episodes `rows` step with `other`'s parameters (its costs, risk rules and strategy switches): rows of
        several configs in one pass. Their strategies must be laid out here (this batch's strategies include
        theirs), and their state set as their own environment's reset left it."""
        self.params[rows] = other.params[0]

    def bind(self, env: Env) -> None:
        """Binds the kernel's arguments once for the rest of the episode (CPU kernel): two sets of packed state,
        mask and outputs that the steps write in turn, so a step copies in its actions and calls the kernel, with
        no argument built anew. The environment's tensors are views of the set last written, as with advance.
        Anything that replaces the environment's state (reset, copy_step_state) ends the binding."""
        if self.target != "cpu":
            return
        state = self._pack(env)
        B, P = env.B, env.P
        sets = [state, {group: np.empty_like(array) for group, array in state.items()}]
        masks = [as_numpy(env.mask).copy(), np.empty(tuple(env.mask.shape), dtype=np.bool_)]
        blocked = [as_numpy(env.blocked).copy(), np.empty((B,), dtype=np.bool_)]
        obs = [np.empty((B, P, env.obs_size), dtype=np.float32) for _ in range(2)]
        reward = [np.empty((B, P), dtype=np.float32) for _ in range(2)]
        self._actions = np.zeros((B, P), dtype=np.int64)
        self._t = as_numpy(env.t).copy()
        carried = (env.trade_ring.numpy(), env.trade_head.numpy(), env.stats.pnl_rows.numpy())
        bound = []
        for side in (0, 1):
            i, o = sets[side], sets[1 - side]
            arguments = (
                self._actions, masks[side], self.pair, self._t, self.prices, self.tradable, self.features, self.day,
                self.n_cols, self.n_bars, self.floats, self.flags, self.bar_tab, *self.column_constants,
                i["sf"], i["si"], i["sb"], i["ef"], i["ei"], i["e64"], blocked[side], *carried,
                self.params, o["sf"], o["si"], o["sb"], o["ef"], o["ei"], o["e64"],
                blocked[1 - side], reward[side], obs[side], masks[1 - side], *self.scratch)
            views = []
            for group, names in self.groups:
                rows = torch.from_numpy(o[group]).unbind(1)
                views += list(zip(names, (r.t() for r in rows) if o[group].ndim == 3 else rows))
            written = (torch.from_numpy(blocked[1 - side]), torch.from_numpy(masks[1 - side]),
                       torch.from_numpy(obs[side]), torch.from_numpy(reward[side]))
            # _set_state's assignments, sorted once: the environment's attributes, the statistics', the Kelly sums
            plain = {n: v for n, v in views if not n.startswith(("stats.", "kelly"))}
            stats = {n[len("stats."):]: v for n, v in views if n.startswith("stats.")}
            stats["equity"] = plain["equity"]
            kelly = tuple(v for n, v in views if n.startswith("kelly"))
            bound.append((arguments, (views, plain, stats, kelly), o, written, i["ei"]))
        self._bound, self._side = bound, 0
        self._actions_t = torch.from_numpy(self._actions)
        # the input set of the first step: the environment's tensors become its views (the packed copy)
        views = []
        for group, names in self.groups:
            rows = torch.from_numpy(state[group]).unbind(1)
            views += list(zip(names, (r.t() for r in rows) if state[group].ndim == 3 else rows))
        _set_state(env, views)
        env.blocked, env.mask = torch.from_numpy(blocked[0]), torch.from_numpy(masks[0])
        self._views, self._packed = views, state
        self._expect = (env.mask, env.equity)

    def _advance_bound(self, env: Env, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        arguments, (views, plain, stats, kelly), outputs, (o_blocked, mask, obs, reward), ei = self._bound[self._side]
        self._actions_t.copy_(actions)
        np.copyto(self._t, ei[:, T_BAR])
        if self.parallel:
            numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
        self.kernel(*arguments)
        env.__dict__.update(plain)  # _set_state's work: none of these names is a property
        env.stats.__dict__.update(stats)
        env.kelly_sums = kelly
        env.blocked, env.mask = o_blocked, mask
        env._strategy_rows_stale = True
        self._views, self._packed = views, outputs
        self._expect = (mask, env.equity)
        self._side = 1 - self._side
        return obs, reward

    def _still_bound(self, env: Env) -> bool:
        """The environment holds the mask and equity the last bound step (or bind) gave it: nothing replaced its
        state since."""
        if self._bound is not None and env.mask is self._expect[0] and env.equity is self._expect[1]:
            return True
        self._bound = None
        return False

    def _pack(self, env: Env) -> dict[str, Any]:
        """The packed state: last step's arrays while the environment holds their views, else stacked anew."""
        if self._views and all(_state_attr(env, name) is view for name, view in self._views):
            return self._packed
        if self.target == "cuda":
            return self._pack_tensors(env)
        dt = env._units.numpy().dtype
        out = {}
        B, P = env.B, env.P
        for group, names in self.groups:
            dtype = {"si": np.int64, "sb": np.bool_, "ei": np.int64, "e64": np.float64}.get(group, dt)
            if not names:
                out[group] = np.empty((B, 0, P), dtype=dtype)
                continue
            rows = np.stack([as_numpy(_state_attr(env, name)).astype(dtype, copy=False) for name in names])
            # [rows, P, B] -> [B, rows, P] and [rows, B] -> [B, rows]: an episode's numbers side by side
            out[group] = np.ascontiguousarray(np.moveaxis(rows, -1, 0))
        return out

    def _pack_tensors(self, env: Env) -> dict[str, torch.Tensor]:
        """_pack for the CUDA kernel: the same layout, stacked by torch on the environment's device (a group
        with no rows gets one unused row: the kernel never reads it, and a CUDA view needs memory behind it)."""
        dt, B, P = env._units.dtype, env.B, env.P
        out = {}
        for group, names in self.groups:
            dtype = {"si": torch.int64, "sb": torch.bool, "ei": torch.int64, "e64": torch.float64}.get(group, dt)
            if not names:
                out[group] = torch.zeros((B, 1, P), dtype=dtype, device=env.device)
                continue
            rows = torch.stack([_state_attr(env, name).to(dtype) for name in names])
            out[group] = rows.movedim(-1, 0).contiguous()  # [B, rows, P] and [B, rows], as _pack
        return out

    def arguments(self, env: Env, actions: torch.Tensor) -> tuple[tuple, dict[str, Any], tuple]:
        """The kernel's arguments for env's next step (_kernel's, in its order: the state packed, the outputs
        allocated), the packed outputs by group, and (blocked, mask, observation, reward) as written: numpy
        arrays for the CPU kernel, tensors on the environment's device for the CUDA kernel."""
        state = self._pack(env)
        B, P = env.B, env.P
        shapes = {"o_blocked": ((B,), torch.bool), "mask": (tuple(env.mask.shape), torch.bool),
                  "obs": ((B, P, env.obs_size), torch.float32), "reward": ((B, P), torch.float32)}
        if self.target == "cpu":
            outputs = {group: np.empty_like(array) for group, array in state.items()}
            written = {name: np.empty(shape, dtype=np.bool_ if dtype == torch.bool else np.float32)
                       for name, (shape, dtype) in shapes.items()}
            step_in = (as_numpy(actions.to(torch.int64)), as_numpy(env.mask), self.pair, as_numpy(env.t))
            carried = (as_numpy(env.blocked), env.trade_ring.numpy(), env.trade_head.numpy(),
                       env.stats.pnl_rows.numpy())
        else:
            outputs = {group: torch.empty_like(array) for group, array in state.items()}
            written = {name: torch.empty(shape, dtype=dtype, device=env.device)
                       for name, (shape, dtype) in shapes.items()}
            step_in = (actions.to(torch.int64).contiguous(), env.mask.contiguous(), self.pair, env.t.contiguous())
            carried = (env.blocked.contiguous(), env.trade_ring, env.trade_head, env.stats.pnl_rows)
        arguments = (
            *step_in, self.prices, self.tradable, self.features, self.day, self.n_cols, self.n_bars,
            self.floats, self.flags, self.bar_tab, *self.column_constants,
            state["sf"], state["si"], state["sb"], state["ef"], state["ei"], state["e64"], *carried,
            self.params, outputs["sf"], outputs["si"], outputs["sb"], outputs["ef"], outputs["ei"], outputs["e64"],
            written["o_blocked"], written["reward"], written["obs"], written["mask"], *self.scratch)
        return arguments, outputs, (written["o_blocked"], written["mask"], written["obs"], written["reward"])

    def advance(self, env: Env, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bound is not None and self._still_bound(env):
            return self._advance_bound(env, actions)
        arguments, outputs, written = self.arguments(env, actions)
        if self.target == "cuda":  # every array a tensor on the device: nothing is copied to or from the host
            from nexlify.env import fused_cuda  # numba-cuda: the optional extra `gpu`

            fused_cuda.launch(arguments, env.B, env.device)
            return self._unpack(env, outputs, *written)
        if self.parallel:
            numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
        self.kernel(*arguments)
        return self._unpack(env, outputs, *(torch.from_numpy(x) for x in written))

    def _unpack(self, env: Env, outputs: dict[str, Any], o_blocked: torch.Tensor, mask: torch.Tensor,
                obs: torch.Tensor, reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The environment's state tensors become views of the arrays the kernel wrote."""
        views = []
        for group, names in self.groups:
            packed = outputs[group] if isinstance(outputs[group], torch.Tensor) else torch.from_numpy(outputs[group])
            rows = packed.unbind(1)  # [B, P] or [B] each
            views += list(zip(names, (r.t() for r in rows) if packed.dim() == 3 else rows))
        _set_state(env, views)
        env.blocked = o_blocked
        env.mask = mask
        env._strategy_rows_stale = True  # the tables' rows at the new bar are gathered only if asked for
        self._views, self._packed = views, outputs
        return obs, reward
