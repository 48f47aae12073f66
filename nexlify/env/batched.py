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

Layout: per-slot state is held slot-major, [P, B], so that sums over a portfolio's pairs reduce over
the outer axis (on CPU about 30x faster than over a short inner axis) and per-episode tensors [B]
broadcast without reshaping. The public API speaks [B, P]: `units`, `mask`, `step(actions [B, P])`,
observations [B, P, obs]. `precision` chooses float64 (default: exact accounting) or float32 (faster).
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


DTYPES = {"float64": torch.float64, "float32": torch.float32}


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
        self.dtype = DTYPES[getattr(env_cfg, "precision", "float64")]
        self.B, self.P = pair_idx.shape
        self.start = start.to(self.device)
        self.n_steps = int(n_steps)
        if int(start.max()) + self.n_steps >= market.n_bars:
            raise ValueError("episodes run past the end of the market data")
        self.env_cfg = env_cfg
        self.risk_cfg = risk_cfg
        self.slip = env_cfg.slippage_bps / 10_000.0
        self.fee = env_cfg.fee
        self.obs_size = observation_size(market.n_features)
        n = market.prices.shape[1]
        self._pair_bp = pair_idx.to(self.device)  # [B, P], for observations laid out [B, P, ...]
        self._pair_pb = self._pair_bp.t().contiguous()  # [P, B], for the state
        self._prices = market.prices.to(self.dtype).reshape(-1, 4)  # (bar, pair) flattened
        self._tradable = market.tradable.reshape(-1)
        self._features = market.features.reshape(-1, market.n_features)
        self._n_cols = n
        self.reset()

    # ----------------------------------------------------------------------------------------- state

    def reset(self) -> Tensor:
        B, P, dev, dt = self.B, self.P, self.device, self.dtype
        e0 = float(self.env_cfg.initial_equity)
        self.t = self.start.clone()
        self.steps_done = 0
        self.cash = torch.full((B,), e0, dtype=dt, device=dev)
        self._units = torch.zeros((P, B), dtype=dt, device=dev)
        self._entry = torch.zeros((P, B), dtype=dt, device=dev)  # fill price paid (incl. slippage)
        self._entry_cost = torch.zeros((P, B), dtype=dt, device=dev)  # cash paid incl. the entry fee
        self._highest = torch.zeros((P, B), dtype=dt, device=dev)
        self._bars_in_trade = torch.zeros((P, B), dtype=dt, device=dev)
        self.trade_ring = torch.zeros((B, self.risk_cfg.kelly_window + 1), dtype=dt, device=dev)  # +1: spare
        self.trade_head = torch.zeros((B,), dtype=torch.int64, device=dev)
        # Running sums over the Kelly window: wins, losses, sum of wins, sum of losses.
        self.kelly_sums = tuple(torch.zeros((B,), dtype=dt, device=dev) for _ in range(4))
        self._close = self._bar(self.t)[..., 3]
        self.equity = self.cash.clone()
        self.day_start_equity = self.equity.clone()
        self.peak = self.equity.clone()
        self.stats = EpisodeStats(
            equity=self.equity, initial_equity=e0,
            ret_sum=torch.zeros(B, dtype=torch.float64, device=dev),
            ret_sq_sum=torch.zeros(B, dtype=torch.float64, device=dev),
            n_returns=0, max_drawdown=torch.zeros(B, dtype=dt, device=dev),
            trades=torch.zeros(B, dtype=torch.int64, device=dev), wins=torch.zeros(B, dtype=torch.int64, device=dev),
            costs=torch.zeros(B, dtype=dt, device=dev),
        )
        self._refresh()
        return self.observe()

    def _rows(self, t: Tensor, pair: Tensor) -> Tensor:
        """Flattened (bar, pair) row numbers; index_select on them is the cheapest gather on CPU and GPU."""
        return (t * self._n_cols + pair).reshape(-1)

    def _bar(self, t: Tensor) -> Tensor:
        """open, high, low, close of bar t_b for every slot: [P, B, 4]."""
        return self._prices.index_select(0, self._rows(t.unsqueeze(0), self._pair_pb)).view(self.P, self.B, 4)

    def _tradable_at(self, t: Tensor) -> Tensor:
        return self._tradable.index_select(0, self._rows(t.unsqueeze(0), self._pair_pb)).view(self.P, self.B)

    # Public views in the [B, P] layout.
    @property
    def units(self) -> Tensor:
        return self._units.t()

    @property
    def entry(self) -> Tensor:
        return self._entry.t()

    @property
    def highest(self) -> Tensor:
        return self._highest.t()

    @property
    def close_now(self) -> Tensor:
        return self._close.t()

    @property
    def in_position(self) -> Tensor:
        return self.units > 0

    def position_size(self) -> Tensor:
        """Fraction of equity the next entry uses [B] (Kelly or fixed, capped by max_position)."""
        r = self.risk_cfg
        return risk.kelly_from_sums(*self.kelly_sums, self.trade_head, min_trades=r.kelly_min_trades,
                                    fraction=r.kelly_fraction, floor=r.kelly_floor, fixed_size=r.fixed_size,
                                    max_position=r.max_position, enabled=r.kelly)

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
        self._mask = self._action_mask()
        self.mask = self._mask.permute(1, 0, 2)  # [B, P, N_ACTIONS]

    # ------------------------------------------------------------------------------ observe and mask

    def _action_mask(self) -> Tensor:
        """[P, B, N_ACTIONS] bool: hold always; open when flat, allowed by the risk rules and the bar is
        real; close when holding."""
        holding = self._units > 0
        open_trades = holding.sum(0)
        can_open = (~holding) & self._tradable_at(self.t) & (open_trades < self.risk_cfg.max_trades) \
            & ~self.blocked & (self.cash > 0)
        return torch.stack([torch.ones_like(holding), can_open, holding], dim=-1)

    def observe(self) -> Tensor:
        """[B, P, obs_size] float32: market features at the cursor, then slot and portfolio state."""
        feats = self._features.index_select(0, self._rows(self.t.unsqueeze(-1), self._pair_bp))
        feats = feats.view(self.B, self.P, -1)
        close, units = self._close, self._units
        holding = units > 0
        r = self.risk_cfg
        stop = risk.stop_level(self._entry, self._highest, r.stop_loss, r.trailing_stop)
        target = risk.take_profit_level(self._entry, r.take_profit)
        safe_entry = torch.where(holding, self._entry, close)
        hf = holding.to(self.dtype)
        daily_used = torch.zeros_like(self.equity)
        if r.daily_loss_limit > 0:
            daily_used = ((1.0 - self.equity / self.day_start_equity) / r.daily_loss_limit).clamp(min=0.0, max=1.0)
        portfolio = torch.stack([
            hf.sum(0) / r.max_trades,
            daily_used,
            torch.log(self.equity / self.stats.initial_equity),
            self.cash / self.equity,
            self.size / r.max_position,
        ]).unsqueeze(1).expand(5, self.P, self.B)
        slot = torch.stack([
            hf,
            hf * (close / safe_entry - 1.0),
            hf * torch.where(stop > 0, (close - stop) / close, 1.0),
            hf * torch.where(torch.isfinite(target), (target - close) / close, 1.0),
            hf * (self._bars_in_trade / 168.0).clamp(max=4.0),
            units * close / self.equity,
        ])
        # [S, P, B] stacked on a leading axis (cheap), then laid out as [B, P, features + state] in one copy.
        state = torch.cat([slot, portfolio]).to(torch.float32).permute(2, 1, 0)
        return torch.cat([feats, state], dim=-1)

    # ------------------------------------------------------------------------------------------- step

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Apply actions [B, P] decided at the close of bar t; advance to t+1.
        Returns (observation at t+1 [B, P, obs], reward [B, P] float32, done)."""
        r, fee, slip = self.risk_cfg, self.fee, self.slip
        act = actions.t()
        act = torch.where(self._mask.gather(-1, act.unsqueeze(-1)).squeeze(-1), act, HOLD)
        prev_equity, prev_close, prev_units = self.equity, self._close, self._units
        u = self.t + 1
        o, h, lo, c = self._bar(u).unbind(-1)
        tradable = self._tradable_at(u)
        new_day = self.market.day[u] != self.market.day[self.t]
        day_start = torch.where(new_day, prev_equity, self.day_start_equity)

        units, entry, entry_cost = self._units, self._entry, self._entry_cost
        highest, bars_in_trade = self._highest, self._bars_in_trade

        # 1. The agent's exits at the open.
        sell = (act == CLOSE) & (units > 0) & tradable
        gross = units * (o * (1.0 - slip))
        proceeds = torch.where(sell, gross * (1.0 - fee), 0.0)
        cost_slot = torch.where(sell, units * o * slip + gross * fee, 0.0)
        closed_ret = torch.where(sell, proceeds / entry_cost.clamp(min=1e-30) - 1.0, 0.0)
        closed = sell
        flow = proceeds  # cash into (+) or out of (-) each slot this bar
        units = torch.where(sell, 0.0, units)

        # 2. The agent's entries at the open, under the concurrent-trade cap, sized by Kelly or fixed size.
        want = (act == OPEN_LONG) & (units == 0) & tradable & ~self.blocked
        accepted = risk.accept_entries(want.t(), (units > 0).sum(0), r.max_trades).t()
        spend = torch.where(accepted, (self.size * prev_equity) * (1.0 + fee), 0.0)
        available = self.cash + flow.sum(0)
        total = spend.sum(0)
        spend = spend * torch.where(total > available, available / total.clamp(min=1e-30), 1.0)
        buy_px = o * (1.0 + slip)
        bought = spend / (1.0 + fee) / buy_px
        cost_slot = cost_slot + torch.where(accepted, bought * o * slip + spend * (fee / (1.0 + fee)), 0.0)
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
        cost_slot = cost_slot + torch.where(forced, units * exit_px * slip + forced_gross * fee, 0.0)
        closed_ret = torch.where(forced, forced_proceeds / entry_cost.clamp(min=1e-30) - 1.0, closed_ret)
        closed = closed | forced
        flow = flow + forced_proceeds
        units = torch.where(forced, 0.0, units)
        still = units > 0
        highest = torch.where(still & tradable, torch.maximum(highest, h), highest)
        bars_in_trade = torch.where(still, bars_in_trade + 1.0, 0.0)
        entry = torch.where(still, entry, 0.0)
        entry_cost = torch.where(still, entry_cost, 0.0)

        # 4. Mark to market at the close of t+1; per-slot rewards that add up to the log-equity change.
        cash = self.cash + flow.sum(0)
        value = units * c
        equity = cash + value.sum(0)
        slot_change = value - prev_units * prev_close + flow
        x = equity / prev_equity - 1.0
        small = x.abs() <= 1e-6
        scale = torch.where(small, 1.0 - x / 2.0, torch.log1p(x) / torch.where(small, 1.0, x))
        reward = slot_change * (scale / prev_equity)
        peak = torch.maximum(self.peak, equity)
        drawdown = 1.0 - equity / peak
        if self.env_cfg.drawdown_penalty > 0:
            prev_dd = 1.0 - prev_equity / self.peak
            reward = reward - self.env_cfg.drawdown_penalty * (drawdown - prev_dd).clamp(min=0.0) / self.P

        # 5. Bookkeeping: Kelly history, episode statistics, cursor.
        closed_bp, ret_bp = closed.t(), closed_ret.t()
        self.trade_head, evicted, evicted_valid = risk.record_trades_(self.trade_ring, self.trade_head, closed_bp,
                                                                      ret_bp)
        self.kelly_sums = _update_window_sums(self.kelly_sums, closed_bp, ret_bp, evicted_valid, evicted)
        st = self.stats
        x64 = x.to(torch.float64)
        st.ret_sum = st.ret_sum + x64
        st.ret_sq_sum = st.ret_sq_sum + x64 * x64
        st.n_returns += 1
        st.max_drawdown = torch.maximum(st.max_drawdown, drawdown)
        st.trades = st.trades + closed.sum(0)
        st.wins = st.wins + (closed & (closed_ret > 0)).sum(0)
        st.costs = st.costs + cost_slot.sum(0)
        st.equity = equity

        self.cash, self._units, self._entry, self._entry_cost = cash, units, entry, entry_cost
        self._highest, self._bars_in_trade = highest, bars_in_trade
        self.equity, self.peak, self.day_start_equity = equity, peak, day_start
        self._close = c
        self.t = u
        self.steps_done += 1
        self._refresh()
        done = self.steps_done >= self.n_steps
        return self.observe(), reward.t().to(torch.float32), done


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
