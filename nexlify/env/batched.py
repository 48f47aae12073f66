"""A batched, risk-managed spot trading environment: B episodes x P pair slots, stepped as tensors.

Timing (no look-ahead):
- The agent decides at the close of bar t, seeing only features of bars <= t and its own state.
- Its orders fill at the open of bar t+1 with slippage and fees; then bar t+1's high and low decide
  which stops and targets trigger (the stop first when both lie inside the bar); then the portfolio
  is marked at bar t+1's close. A bar that was missing on the exchange (a forward-filled gap) fills
  nothing: orders for it are cancelled and stops wait for the next real bar.

Accounting, in quote currency and float64: equity = cash + sum(units * close). Every cost (fee,
slippage) is paid out of cash at the fill, so the identity holds exactly at every bar.

Reward per pair slot: the slot's change in value (including the costs it paid) divided by the
portfolio's previous equity, scaled so that the slots of an episode add up to exactly the change of
log equity: sum_p r_p = log(E_t+1 / E_t). One network is shared by all slots (see nexlify.agent).

The step is a fixed sequence of tensor operations over all episodes and pairs; there is no Python
loop over either, and nothing syncs the device except the scalar done flag (a step counter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nexlify.config import EnvConfig, RiskConfig
from nexlify.env import risk
from nexlify.env.market import MarketTensors

HOLD, OPEN_LONG, CLOSE = 0, 1, 2
ACTION_NAMES = ("hold", "open_long", "close")
N_ACTIONS = len(ACTION_NAMES)

# Slot and portfolio state appended to the market features in each slot's observation.
STATE_NAMES = (
    "in_position", "unrealised_pnl", "dist_to_stop", "dist_to_target", "bars_in_trade", "position_weight",
    "open_trades_frac", "daily_loss_used", "log_equity_change", "cash_frac", "size_frac",
)


def observation_size(n_market_features: int) -> int:
    return n_market_features + len(STATE_NAMES)


@dataclass
class EpisodeStats:
    """Running statistics per episode [B], enough for the validation metrics without storing curves."""

    equity: Tensor
    initial_equity: float
    ret_sum: Tensor
    ret_sq_sum: Tensor
    n_returns: int
    max_drawdown: Tensor
    trades: Tensor
    wins: Tensor
    costs: Tensor


class BatchedTradingEnv:
    """B episodes stepping together over a shared MarketTensors.

    pair_idx [B, P] maps each episode's pair slots to market columns (training: every episode trades
    all pairs; validation: one episode per pair). start [B] is each episode's first decision bar, and
    every episode runs n_steps steps, so all of them end together.
    """

    def __init__(self, market: MarketTensors, pair_idx: Tensor, start: Tensor, n_steps: int,
                 env_cfg: EnvConfig, risk_cfg: RiskConfig) -> None:
        self.market = market
        self.device = market.prices.device
        self.pair_idx = pair_idx.to(self.device)
        self.start = start.to(self.device)
        self.n_steps = int(n_steps)
        if int(start.max()) + self.n_steps >= market.n_bars:
            raise ValueError("episodes run past the end of the market data")
        self.env_cfg = env_cfg
        self.risk_cfg = risk_cfg
        self.B, self.P = self.pair_idx.shape
        self.slip = env_cfg.slippage_bps / 10_000.0
        self.fee = env_cfg.fee
        self.obs_size = observation_size(market.n_features)
        self.reset()

    # ----------------------------------------------------------------------------------------- state

    def reset(self) -> Tensor:
        B, P, dev, f64 = self.B, self.P, self.device, torch.float64
        e0 = float(self.env_cfg.initial_equity)
        self.t = self.start.clone()
        self.steps_done = 0
        self.cash = torch.full((B,), e0, dtype=f64, device=dev)
        self.units = torch.zeros((B, P), dtype=f64, device=dev)
        self.entry = torch.zeros((B, P), dtype=f64, device=dev)  # fill price paid (incl. slippage)
        self.entry_cost = torch.zeros((B, P), dtype=f64, device=dev)  # cash paid incl. the entry fee
        self.highest = torch.zeros((B, P), dtype=f64, device=dev)
        self.bars_in_trade = torch.zeros((B, P), dtype=f64, device=dev)
        self.trade_ring = torch.zeros((B, self.risk_cfg.kelly_window), dtype=f64, device=dev)
        self.trade_head = torch.zeros((B,), dtype=torch.int64, device=dev)
        # Running sums over the Kelly window: wins, losses, sum of wins, sum of losses.
        self.kelly_sums = tuple(torch.zeros((B,), dtype=f64, device=dev) for _ in range(4))
        self.close_now = self._gather(self.market.prices, self.t)[..., 3]
        self.equity = self.cash.clone()
        self.day_start_equity = self.equity.clone()
        self.peak = self.equity.clone()
        self.stats = EpisodeStats(
            equity=self.equity, initial_equity=e0,
            ret_sum=torch.zeros(B, dtype=f64, device=dev), ret_sq_sum=torch.zeros(B, dtype=f64, device=dev),
            n_returns=0, max_drawdown=torch.zeros(B, dtype=f64, device=dev),
            trades=torch.zeros(B, dtype=torch.int64, device=dev), wins=torch.zeros(B, dtype=torch.int64, device=dev),
            costs=torch.zeros(B, dtype=f64, device=dev),
        )
        self._refresh()
        return self.observe()

    def _gather(self, series: Tensor, t: Tensor) -> Tensor:
        """series[t_b, pair_idx[b, p]] for every episode and slot: [B, P, ...]. index_select on the
        flattened (bar, pair) axis is the cheapest gather on both CPU and GPU."""
        n = series.shape[1]
        flat = series.reshape(series.shape[0] * n, *series.shape[2:])
        index = (t.unsqueeze(-1) * n + self.pair_idx).reshape(-1)
        return flat.index_select(0, index).view(self.B, self.P, *series.shape[2:])

    @property
    def in_position(self) -> Tensor:
        return self.units > 0

    def position_size(self) -> Tensor:
        """Fraction of equity the next entry uses [B] (Kelly or fixed, capped by max_position)."""
        r = self.risk_cfg
        return risk.kelly_from_sums(*self.kelly_sums, self.trade_head, min_trades=r.kelly_min_trades,
                                    fraction=r.kelly_fraction, floor=r.kelly_floor, fixed_size=r.fixed_size,
                                    max_position=r.max_position, enabled=r.kelly)

    def _levels(self) -> tuple[Tensor, Tensor]:
        r = self.risk_cfg
        return (risk.stop_level(self.entry, self.highest, r.stop_loss, r.trailing_stop),
                risk.take_profit_level(self.entry, r.take_profit))

    def _entries_blocked(self) -> Tensor:
        """[B] True while today's loss limit is hit; an order that would fill in the next UTC day is free."""
        next_bar = (self.t + 1).clamp(max=self.market.n_bars - 1)  # after the last step there is no next bar
        next_day = self.market.day[next_bar] != self.market.day[self.t]
        hit = risk.entries_blocked_by_daily_loss(self.equity, self.day_start_equity, self.risk_cfg.daily_loss_limit)
        return hit & ~next_day

    def _refresh(self) -> None:
        """Derived state the agent and the next step both need, computed once per bar."""
        self.size = self.position_size()
        self.blocked = self._entries_blocked()
        self.mask = self.action_mask()

    # ------------------------------------------------------------------------------ observe and mask

    def action_mask(self) -> Tensor:
        """Recompute the mask (normally read the cached `self.mask`). [B, P, N_ACTIONS] bool: hold always; open when flat, allowed by the risk rules and the bar is
        real; close when holding."""
        holding = self.in_position
        open_trades = holding.sum(-1, keepdim=True)
        tradable_now = self._gather(self.market.tradable, self.t)
        can_open = (~holding) & tradable_now & (open_trades < self.risk_cfg.max_trades) \
            & (~self.blocked).unsqueeze(-1) & (self.cash > 0).unsqueeze(-1)
        return torch.stack([torch.ones_like(holding), can_open, holding], dim=-1)

    def observe(self) -> Tensor:
        """[B, P, obs_size] float32: market features at the cursor, then slot and portfolio state."""
        feats = self._gather(self.market.features, self.t)
        close = self.close_now
        holding = self.in_position
        hf = holding.to(torch.float64)
        stop, target = self._levels()
        safe_entry = torch.where(holding, self.entry, close)
        r = self.risk_cfg
        eq = self.equity.unsqueeze(-1)
        daily_used = torch.zeros_like(self.equity)
        if r.daily_loss_limit > 0:
            daily_used = ((1.0 - self.equity / self.day_start_equity) / r.daily_loss_limit).clamp(min=0.0, max=1.0)
        portfolio = torch.stack([
            holding.sum(-1).to(torch.float64) / r.max_trades,
            daily_used,
            torch.log(self.equity / self.stats.initial_equity),
            self.cash / self.equity,
            self.size / r.max_position,
        ], dim=-1).unsqueeze(1).expand(self.B, self.P, 5)
        slot = torch.stack([
            hf,
            hf * (close / safe_entry - 1.0),
            hf * torch.where(stop > 0, (close - stop) / close, torch.ones_like(close)),
            hf * torch.where(torch.isfinite(target), (target - close) / close, torch.ones_like(close)),
            hf * (self.bars_in_trade / 168.0).clamp(max=4.0),
            self.units * close / eq,
        ], dim=-1)
        state = torch.cat([slot, portfolio], dim=-1).to(torch.float32)
        return torch.cat([feats, state], dim=-1)

    # ------------------------------------------------------------------------------------------- step

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Apply actions [B, P] decided at the close of bar t; advance to t+1.
        Returns (observation at t+1, reward [B, P] float32, done)."""
        r, fee, slip = self.risk_cfg, self.fee, self.slip
        mask = self.mask
        actions = torch.where(mask.gather(-1, actions.unsqueeze(-1)).squeeze(-1), actions, HOLD)
        prev_equity = self.equity
        prev_close = self.close_now
        prev_units = self.units
        u = self.t + 1
        bar = self._gather(self.market.prices, u)
        o, h, lo, c = bar.unbind(-1)
        tradable = self._gather(self.market.tradable, u)
        new_day = self.market.day[u] != self.market.day[self.t]
        day_start = torch.where(new_day, prev_equity, self.day_start_equity)
        blocked = self.blocked

        cash = self.cash
        units, entry, entry_cost = self.units, self.entry, self.entry_cost
        highest, bars_in_trade = self.highest, self.bars_in_trade
        flow = torch.zeros_like(units)  # cash into (+) or out of (-) each slot this bar
        costs = torch.zeros_like(cash)

        # 1. The agent's exits at the open.
        sell = (actions == CLOSE) & (units > 0) & tradable
        sell_px = o * (1.0 - slip)
        gross = units * sell_px
        proceeds = torch.where(sell, gross * (1.0 - fee), 0.0)
        costs = costs + torch.where(sell, units * o * slip + gross * fee, 0.0).sum(-1)
        closed_ret = torch.where(sell, proceeds / entry_cost.clamp(min=1e-300) - 1.0, 0.0)
        closed = sell
        flow = flow + proceeds
        units = torch.where(sell, 0.0, units)

        # 2. The agent's entries at the open, under the concurrent-trade cap, sized by Kelly or fixed size.
        want = (actions == OPEN_LONG) & (units == 0) & tradable & (~blocked).unsqueeze(-1)
        accepted = risk.accept_entries(want, (units > 0).sum(-1), r.max_trades)
        notional = (self.size * prev_equity).unsqueeze(-1).expand_as(units)
        spend = torch.where(accepted, notional * (1.0 + fee), 0.0)
        available = cash + flow.sum(-1)
        scale = torch.where(spend.sum(-1) > available, available / spend.sum(-1).clamp(min=1e-300), 1.0)
        spend = spend * scale.unsqueeze(-1)
        buy_px = o * (1.0 + slip)
        bought = spend / (1.0 + fee) / buy_px
        costs = costs + torch.where(accepted, bought * o * slip + spend * fee / (1.0 + fee), 0.0).sum(-1)
        flow = flow - spend
        units = torch.where(accepted, bought, units)
        entry = torch.where(accepted, buy_px, entry)
        entry_cost = torch.where(accepted, spend, entry_cost)
        highest = torch.where(accepted, buy_px, highest)
        bars_in_trade = torch.where(accepted, 0.0, bars_in_trade)

        # 3. Stops and targets inside bar t+1 (including positions just opened at its open).
        holding = (units > 0) & tradable
        stop = risk.stop_level(entry, highest, r.stop_loss, r.trailing_stop)
        target = risk.take_profit_level(entry, r.take_profit)
        stop_hit, target_hit, exit_px = risk.exits_in_bar(o, h, lo, stop, target)
        forced = holding & (stop_hit | target_hit)
        forced_gross = units * exit_px * (1.0 - slip)
        forced_proceeds = torch.where(forced, forced_gross * (1.0 - fee), 0.0)
        costs = costs + torch.where(forced, units * exit_px * slip + forced_gross * fee, 0.0).sum(-1)
        closed_ret = torch.where(forced, forced_proceeds / entry_cost.clamp(min=1e-300) - 1.0, closed_ret)
        closed = closed | forced
        flow = flow + forced_proceeds
        units = torch.where(forced, 0.0, units)
        still = units > 0
        highest = torch.where(still & tradable, torch.maximum(highest, h), highest)
        bars_in_trade = torch.where(still, bars_in_trade + 1.0, 0.0)
        entry = torch.where(still, entry, 0.0)
        entry_cost = torch.where(still, entry_cost, 0.0)

        # 4. Mark to market at the close of t+1; per-slot rewards that add up to the log-equity change.
        cash = cash + flow.sum(-1)
        equity = cash + (units * c).sum(-1)
        slot_change = units * c - prev_units * prev_close + flow
        x = equity / prev_equity - 1.0
        log_ratio = torch.log1p(x)
        scale = torch.where(x.abs() > 1e-12, log_ratio / torch.where(x.abs() > 1e-12, x, 1.0), 1.0 - x / 2.0)
        reward = slot_change / prev_equity.unsqueeze(-1) * scale.unsqueeze(-1)
        peak = torch.maximum(self.peak, equity)
        drawdown = 1.0 - equity / peak
        if self.env_cfg.drawdown_penalty > 0:
            prev_dd = 1.0 - prev_equity / self.peak
            reward = reward - (self.env_cfg.drawdown_penalty * (drawdown - prev_dd).clamp(min=0.0) / self.P).unsqueeze(-1)

        # 5. Bookkeeping: Kelly history, episode statistics, cursor.
        self.trade_ring, self.trade_head, evicted, evicted_valid = risk.record_trades(
            self.trade_ring, self.trade_head, closed, closed_ret)
        self.kelly_sums = _update_window_sums(self.kelly_sums, closed, closed_ret, evicted_valid, evicted)
        st = self.stats
        step_ret = x
        st.ret_sum = st.ret_sum + step_ret
        st.ret_sq_sum = st.ret_sq_sum + step_ret * step_ret
        st.n_returns += 1
        st.max_drawdown = torch.maximum(st.max_drawdown, drawdown)
        st.trades = st.trades + closed.sum(-1)
        st.wins = st.wins + (closed & (closed_ret > 0)).sum(-1)
        st.costs = st.costs + costs
        st.equity = equity

        self.cash, self.units, self.entry, self.entry_cost = cash, units, entry, entry_cost
        self.highest, self.bars_in_trade = highest, bars_in_trade
        self.equity, self.peak, self.day_start_equity = equity, peak, day_start
        self.close_now = c
        self.t = u
        self.steps_done += 1
        self._refresh()
        done = self.steps_done >= self.n_steps
        return self.observe(), reward.to(torch.float32), done


def _update_window_sums(sums: tuple[Tensor, ...], added: Tensor, added_ret: Tensor, removed: Tensor,
                        removed_ret: Tensor) -> tuple[Tensor, ...]:
    """Kelly window sums after trades entered ([B, P] mask, returns) and older ones left the window."""
    n_win, n_loss, sum_win, sum_loss = sums
    win_in, loss_in = added & (added_ret > 0), added & (added_ret <= 0)
    win_out, loss_out = removed & (removed_ret > 0), removed & (removed_ret <= 0)
    return (
        n_win + win_in.sum(-1) - win_out.sum(-1),
        n_loss + loss_in.sum(-1) - loss_out.sum(-1),
        sum_win + torch.where(win_in, added_ret, 0.0).sum(-1) - torch.where(win_out, removed_ret, 0.0).sum(-1),
        sum_loss - torch.where(loss_in, added_ret, 0.0).sum(-1) + torch.where(loss_out, removed_ret, 0.0).sum(-1),
    )
