"""A batched, risk-managed trading environment: B episodes x P pair slots, stepped as tensors.

Timing (no look-ahead):
- The agent decides at the close of bar t, seeing only features of bars <= t and its own state.
- Its orders fill at the open of bar t+1 with slippage and fees; then bar t+1's high and low decide
  which stops and targets trigger (the stop first when both lie inside the bar); then the portfolio
  is marked at bar t+1's close. A bar that was missing on the exchange (a forward-filled gap) fills
  nothing: orders for it are cancelled and stops wait for the next real bar.

Actions (the set is fixed, whatever the config: a disabled strategy's actions are masked, so the
network's shape never depends on the config). Per pair slot:
- 0 hold; 1 open_long: buy `size` of equity (Kelly or fixed, capped by max_position); 2 close: exit
  the slot's coins: the free ones are sold at the open, staked ones start unbonding and are sold at the
  first tradable open after they come free (an exit that waits is "pending").
- 3 stake: stake `stake_fraction` of the slot's free coins (ETH, SOL; BTC only if configured);
  4 unstake: start unbonding `unstake_fraction` of the staked coins (one unbonding lot at a time).
  Staked coins earn the configured APY every bar (units grow), keep their price exposure, count in the
  stop-loss and the daily loss limit like any coin, and cannot be sold. A stop (or target) that
  triggers on a slot with staked or unbonding coins sells the free coins at the stop and leaves the
  exit pending: the staked coins are unstaked at the next open and every coin is sold at the first
  tradable open after it comes free. An unbonding position cannot be stopped out until it is free.
- 5 lp_open: a Uniswap V3 position on the pair against USDT worth `size` of equity on +-range_width
  around the open (the coin half is bought at the spot fee and slippage; gas per open). The gas is fixed,
  so a position is at least LPParams.min_notional_usd (the round trip's gas at most max_gas_share of it):
  a smaller `size` is sized up to it, and LP_OPEN is masked where that exceeds the per-trade cap or the
  position with its swap costs and gas exceeds the cash;
  6 lp_close: withdraw it at the open (the coin half sold at the spot fee and slippage; gas per close),
  collecting the accrued fees; masked while the position (fees included) is worth less than
  LPParams.min_close_value_usd (its gas would be out of proportion: the position waits). Fees accrue
  every bar (uniswap_v3.fee_income); impermanent loss falls out of the V3 formulas. LP positions have no
  stop: the daily loss limit sees their value.
- 7 lend: top the portfolio's Aave supply up to `max_idle_share` (AaveParams) of its idle USDT (cash after
  this bar's entries plus the supply), whatever `size` (the first LEND of a bar in pair order supplies it
  all); masked where nothing is left to supply; 8 withdraw: take the slot's whole supply back. Lending is
  portfolio cash: each slot keeps its own sub-account of the one Aave balance (so its interest is that
  slot's reward); the portfolio's supply is their sum. Interest accrues every bar at the supply rate of
  the utilization path. With AaveParams.sweep (the default) nobody lends by hand: LEND and WITHDRAW are
  masked and after each bar's entries the supply is set to max_idle_share of the idle USDT (topped up,
  or withdrawn down to it when the entries used the cash buffer), in equal sub-accounts per slot.
- 9 arbitrage: buy on the cheaper venue and sell on the dearer one from inventory held on both
  (arbitrage.arb_trade, at both venues' opens). Valid only when the second venue has the candle of bar t
  and the net edge at bar t's closes beats all costs. The first arbitrage of a slot funds its book:
  `size` of equity split into quote and coin on each venue (coins bought at each venue's taker fee), sized
  up to ArbParams' minimum book (one withdrawal fee at most max_withdrawal_share of it); funding is masked
  where that exceeds the per-trade cap or the book with its fees exceeds the cash.
  A book is rebalanced by a transfer (withdrawal fee, configured delay) when a venue runs low;
  10 arb_close: sell the book's coins on both venues (not while a transfer is under way).
Hold, open_long and close stay actions 0, 1, 2.

Risk rules across strategies: the per-trade cap (`size`, at most max_position) sizes spot entries, LP
positions and arbitrage books alike (lending is not a risk trade: it is capped by max_idle_share); the
concurrent-trade cap counts open spot trades, LP positions and arbitrage legs (a book holds one leg on
each venue: 2 trades); the daily loss limit sees the whole portfolio and blocks new spot trades, LP
positions and arbitrage books (not staking, lending or trades from an existing book).

Accounting, in quote currency and float64: equity = cash + spot/staked/unbonding coins * close +
LP value (V3 formula at the close) + accrued LP fees + Aave supply + arbitrage inventories (quote on
both venues and coins on both venues and in transit, coins at the primary close, USD and USDT at par).
Every cost (fee, slippage, gas, withdrawal fee) is paid at the fill, so the identity holds at every bar.
`EpisodeStats.pnl` breaks the PnL down by source (PNL_SOURCES); the sources add up to the equity change.

Finite by construction: cash never goes below zero (entries are scaled to the cash at the open, gas
included, and an LP position or a book that the scaling would shrink below its minimum is not opened;
a withdrawal fee is paid out of the coins it moves), every holding is worth >= 0, and the fixed costs
are kept in proportion by the minimums above, so equity stays > 0 and the log-equity reward and
observation stay finite. The reward's log1p is left unguarded on purpose: nexlify.finite checks every
reward and observation as a run goes, and a violation stops the run instead of being clipped away.

Reward per pair slot: the slot's change in value (including the costs it paid) divided by the
portfolio's previous equity, scaled so that the slots of an episode add up to exactly the change of
log equity: sum_p r_p = log(E_t+1 / E_t). One network is shared by all slots (see nexlify.agent).

The step is a fixed sequence of tensor operations over all episodes and pairs; there is no Python
loop over either, and nothing syncs the device except the scalar done flag (a step counter). A
strategy switched off costs nothing: its block of the step is skipped, and with strategies == [spot]
the environment computes exactly what the spot-only environment computed. What depends on the market
only (the second venue's prices, the edges, pool volumes and liquidity, the Aave rates) is computed once
(nexlify.env.strategy_tables); the arbitrage blocks are also skipped on steps where the host knows from
those tables, without asking the device, that they would change nothing (no edge on any episode's bar,
no book ever funded, no transfer under way).

Layout: per-slot state is held slot-major, [P, B], so that sums over a portfolio's pairs reduce over
the outer axis (on CPU about 30x faster than over a short inner axis) and per-episode tensors [B]
broadcast without reshaping. The public API speaks [B, P]: `units`, `mask`, `step(actions [B, P])`,
observations [B, P, obs]. `precision` chooses float64 (default: exact accounting) or float32 (faster).

This tensor step is the reference and serves every device and strategy. On the CPU (with `kernel`
"auto"), `_advance` hands the step to a numba kernel that computes the same numbers in one pass per
episode, nexlify.env.fused_portfolio, for spot alone and with the strategy tables (tests/test_env_fused.py
holds it to this step, output by output and state by state). The observation's layout, the action ids
and the PnL rows are named once, in nexlify.env.layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from nexlify.config import EnvConfig, RiskConfig
from nexlify.env import fused_portfolio, risk
from nexlify.env import strategy_tables as tables
# the layout (actions, state fields, PnL rows) is nexlify.env.layout's; re-exported for the callers that
# import these names with the environment
from nexlify.env.layout import (  # noqa: F401 (re-exported)
    ACTION_NAMES, ARB, ARB_CLOSE, CLOSE, HOLD, LEND, LP_CLOSE, LP_OPEN, N_ACTIONS, N_SPOT_ACTIONS, NO_LOT,
    NO_TRANSFER, OPEN_LONG, PNL_SOURCES, SPOT_STATE_NAMES, STAKE, STATE_NAMES, STRATEGY_STATE_NAMES, UNSTAKE,
    WITHDRAW, observation_size,
)
from nexlify.env.market import MarketTensors
from nexlify.env.strategy_tables import StrategyTables
from nexlify.strategies import arbitrage, staking, uniswap_v3
from nexlify.strategies.params import StrategyParams


@dataclass
class EpisodeStats:
    """Running statistics per episode [B], enough for the validation metrics without storing curves.
    trades / wins count closed spot trades, closed LP positions and closed arbitrage books; pnl_rows
    [len(PNL_SOURCES), B] accumulates the PnL by source (it adds up to equity - initial_equity); `pnl` is
    the same as [B, len(PNL_SOURCES)]."""

    equity: Tensor
    initial_equity: float
    ret_sum: Tensor
    ret_sq_sum: Tensor
    n_returns: int
    max_drawdown: Tensor
    trades: Tensor
    wins: Tensor
    costs: Tensor
    pnl_rows: Tensor = field(default=None)  # type: ignore[assignment]

    @property
    def pnl(self) -> Tensor:
        """[B, len(PNL_SOURCES)]: each episode's PnL by source, in quote currency."""
        return self.pnl_rows.t()

    def pnl_breakdown(self, episode: int) -> dict[str, float]:
        """One episode's PnL by source, in quote currency, with its total."""
        values = [float(v) for v in self.pnl[episode]]
        out = dict(zip(PNL_SOURCES, values))
        out["total"] = sum(values)
        return out


DTYPES = {"float64": torch.float64, "float32": torch.float32}


class HostFlags(NamedTuple):
    """What the host knows about a step from the strategy tables, without a device sync. The arbitrage
    blocks that would be exact no-ops otherwise are skipped."""

    may_fund: bool  # some episode's bar t has an arbitrage edge: the mask allowed funding a book somewhere
    may_fill: bool  # some episode's bar t+1 has an edge at the opens: a book may trade
    transfers: bool  # a rebalancing transfer may land at t+1
    edge_next: bool  # some episode's bar t+1 has an edge: the mask at t+1 may allow ARB


NO_FLAGS = HostFlags(False, False, False, False)


class _Bar:
    """The working values of one tensor step, handed from phase to phase (BatchedTradingEnv._advance): the
    bar's prices, the actions, and each piece of state as the phases change it before it is written back."""


class BatchedTradingEnv:
    """B episodes stepping together over a shared MarketTensors.

    pair_idx [B, P] maps each episode's pair slots to market columns (training: every episode trades
    all pairs; validation: one episode per pair). start [B] is each episode's first decision bar, and
    every episode runs n_steps steps, so all of them end together. `strategy_params` holds the
    parameters of the strategies beyond spot (defaults when None); `env_cfg.strategies` says which are on.
    """

    def __init__(self, market: MarketTensors, pair_idx: Tensor, start: Tensor, n_steps: int,
                 env_cfg: EnvConfig, risk_cfg: RiskConfig, strategy_params: StrategyParams | None = None) -> None:
        self.market = market
        self.device = market.prices.device
        self.dtype = DTYPES[env_cfg.precision]
        self.B, self.P = pair_idx.shape
        self.start = start.to(self.device)
        self._start_host = start.cpu().numpy().astype("int64")  # bar of each episode, known without a sync
        # every episode starting at one bar (an evaluation's rows): the host flags read one bar, not B
        first = int(self._start_host[0]) if self._start_host.size else 0
        self._one_start = first if bool((self._start_host == first).all()) else None
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
        strategies = list(env_cfg.strategies)
        self.spot_on = "spot" in strategies
        self.strategy_params = strategy_params or StrategyParams()
        tb = StrategyTables.for_market(market, strategies, self.strategy_params, self.dtype)
        self._tables = tb if tb.any else None
        self.staking_on, self.lp_on, self.lending_on, self.arb_on = tb.staking, tb.lp, tb.lending, tb.arbitrage
        pb = self._pair_pb
        self._stake_growth = tb.stake_growth[pb]  # [P, B] per-slot constants
        self._stake_apy_feature = tb.stake_apy[pb] * 10.0
        self._unbond_bars = tb.unbond_bars[pb]
        self._stakeable = tb.stakeable[pb]
        self._withdrawal_fee = tb.withdrawal_fee_units[pb]
        self._transfer_bars = tb.transfer_bars[pb]
        self._max_transfer_bars = int(tb.transfer_bars.max()) if tb.transfer_bars.numel() else 1
        self._zeros = torch.zeros((self.P, self.B), dtype=self.dtype, device=self.device)  # never written to
        self._coin_share = uniswap_v3.coin_share(self.strategy_params.lp.range_width)
        self._strategy_zeros = torch.zeros((self.B, self.P, len(STRATEGY_STATE_NAMES)), dtype=torch.float32,
                                           device=self.device)
        self._mask_off = torch.zeros((self.B, self.P, N_ACTIONS - N_SPOT_ACTIONS), dtype=torch.bool,
                                     device=self.device)
        self.reset()
        # On the CPU one fused kernel computes the same step in a pass per episode, for spot alone and with the
        # strategy tables; kernel "cuda" runs the same source compiled by numba-cuda, one GPU thread per episode.
        self._fused = None
        kernel = env_cfg.kernel
        cpu_kernel = self.device.type == "cpu" and kernel == "auto"
        if kernel == "cuda":
            fused_portfolio.check_cuda_kernel(self.device)
            self._fused = fused_portfolio.FusedPortfolioStep(self, tb, target="cuda")
        elif cpu_kernel and fused_portfolio.available() and (self._tables is not None or self.spot_on):
            self._fused = fused_portfolio.FusedPortfolioStep(self, tb)

    # ----------------------------------------------------------------------------------------- state

    def reset(self) -> Tensor:
        B, P, dev, dt = self.B, self.P, self.device, self.dtype
        e0 = float(self.env_cfg.initial_equity)
        self.t = self.start.clone()
        self.steps_done = 0
        self.cash = torch.full((B,), e0, dtype=dt, device=dev)
        self._units = torch.zeros((P, B), dtype=dt, device=dev)  # free (sellable) spot coins
        self._entry = torch.zeros((P, B), dtype=dt, device=dev)  # fill price paid (incl. slippage)
        self._entry_cost = torch.zeros((P, B), dtype=dt, device=dev)  # cash paid incl. the entry fee
        self._highest = torch.zeros((P, B), dtype=dt, device=dev)
        self._bars_in_trade = torch.zeros((P, B), dtype=dt, device=dev)
        self.trade_ring = torch.zeros((B, self.risk_cfg.kelly_window + 1), dtype=dt, device=dev)  # +1: spare
        self.trade_head = torch.zeros((B,), dtype=torch.int64, device=dev)
        # Running sums over the Kelly window: wins, losses, sum of wins, sum of losses.
        self.kelly_sums = tuple(torch.zeros((B,), dtype=dt, device=dev) for _ in range(4))
        zeros, no = self._zeros, torch.zeros((P, B), dtype=torch.bool, device=dev)
        # staking: coins staked and unbonding (one lot per slot, free at the open of release), an exit that
        # waits for locked coins, and the proceeds of the trade's exits so far
        self._staked, self._unbonding = zeros, zeros
        self._release = torch.full((P, B), NO_LOT, dtype=torch.int64, device=dev)
        self._exit_pending, self._exit_proceeds = no, zeros
        # LP: liquidity on [sqrt_pa^2, sqrt_pb^2] (a harmless 1..2 when empty), the opening amounts, accrued
        # fees, the cash it cost, and its value and impermanent loss at the last close
        self._lp_L, self._lp_x0, self._lp_y0, self._lp_fees, self._lp_cost = zeros, zeros, zeros, zeros, zeros
        self._lp_spa, self._lp_spb = torch.ones_like(zeros), torch.full_like(zeros, 2.0 ** 0.5)
        self._lp_value, self._lp_il = zeros, zeros
        # lending: each slot's sub-account of the Aave supply and the principal it put in
        self._lent, self._lent_principal = zeros, zeros
        # arbitrage: quote and coin on venue A (primary) and B, the transfer under way (coin and quote,
        # signed: + towards A) and the bar it lands at, whether a book is open, the cash it cost, its value
        self._qa, self._ca, self._qb, self._cb = zeros, zeros, zeros, zeros
        self._tr_coin, self._tr_quote = zeros, zeros
        self._tr_due = torch.full((P, B), NO_TRANSFER, dtype=torch.int64, device=dev)
        self._book, self._arb_cost, self._arb_value = no, zeros, zeros
        self._arb_live = False  # no book was ever funded (known on the host)
        self._transfers_until = -1  # the last step at which a transfer may still land
        self._slot_value = zeros  # everything a slot holds, at the last close
        self._strategy_rows_stale = False  # _fx, _bx, _sbar are not those of bar t (see _strategy_state)
        rows = self._rows(self.t.unsqueeze(0), self._pair_pb)
        self._close = self._prices.index_select(0, rows).view(P, B, 4)[..., 3]
        self._tradable_now = self._tradable.index_select(0, rows).view(P, B)
        if self._tables is not None:
            self._gather_strategy_rows(rows, self.t)
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
            pnl_rows=torch.zeros((len(PNL_SOURCES), B), dtype=torch.float64, device=dev),
        )
        self._refresh(self._host_flags(0).may_fund)
        return self.observe()

    def _rows(self, t: Tensor, pair: Tensor) -> Tensor:
        """Flattened (bar, pair) row numbers; index_select on them is the cheapest gather on CPU and GPU."""
        return (t * self._n_cols + pair).reshape(-1)

    def _bar(self, t: Tensor) -> Tensor:
        """open, high, low, close of bar t_b for every slot: [P, B, 4]."""
        return self._prices.index_select(0, self._rows(t.unsqueeze(0), self._pair_pb)).view(self.P, self.B, 4)

    def _tradable_at(self, t: Tensor) -> Tensor:
        return self._tradable.index_select(0, self._rows(t.unsqueeze(0), self._pair_pb)).view(self.P, self.B)

    def _gather_strategy_rows(self, rows: Tensor, t: Tensor) -> None:
        """The strategy tables at bar t: [FLOAT_ROWS, P, B], [FLAG_ROWS, P, B] and [BAR_ROWS, B] (the fills of
        the step that reaches t, then the mask and the observation at t)."""
        tb = self._tables  # gather with an expanded index: about twice as fast as index_select along dim 1 on CPU
        self._strategy_rows_stale = False
        self._fx = tb.floats.gather(1, rows.expand(tb.floats.shape[0], -1)).view(-1, self.P, self.B)
        self._bx = tb.flags.gather(1, rows.expand(tb.flags.shape[0], -1)).view(-1, self.P, self.B)
        self._sbar = tb.bars.index_select(1, t)

    # Public views in the [B, P] layout.
    @property
    def units(self) -> Tensor:
        """Free (sellable) spot coins per slot."""
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
        """A spot trade is open: free, staked or unbonding coins."""
        return (self._units + self._staked + self._unbonding > 0).t()

    @property
    def staked_units(self) -> Tensor:
        return self._staked.t()

    @property
    def unbonding_units(self) -> Tensor:
        return self._unbonding.t()

    @property
    def release_bar(self) -> Tensor:
        """Bar at whose open the unbonding lot comes free (NO_LOT = -1 where none), [B, P] int64."""
        return self._release.t()

    @property
    def exit_pending(self) -> Tensor:
        """A close (or a stop) waits for staked or unbonding coins to come free, then sells them."""
        return self._exit_pending.t()

    @property
    def lp_liquidity(self) -> Tensor:
        return self._lp_L.t()

    @property
    def lp_range(self) -> tuple[Tensor, Tensor]:
        """(pa, pb) of each slot's LP position (meaningful where lp_liquidity > 0)."""
        return (self._lp_spa * self._lp_spa).t(), (self._lp_spb * self._lp_spb).t()

    @property
    def lp_amounts_at_open(self) -> tuple[Tensor, Tensor]:
        """The coin and quote amounts each LP position held when it was opened."""
        return self._lp_x0.t(), self._lp_y0.t()

    @property
    def lp_fees_accrued(self) -> Tensor:
        return self._lp_fees.t()

    @property
    def lp_value(self) -> Tensor:
        """The LP position's value at the last close (V3 formula), fees excluded."""
        return self._lp_value.t()

    @property
    def lent(self) -> Tensor:
        """Each slot's Aave supply, interest included; the portfolio's supply is the sum over slots."""
        return self._lent.t()

    @property
    def arb_inventory(self) -> dict[str, Tensor]:
        """The arbitrage books [B, P]: quote and coin on venue A (primary) and B, the transfer under way
        (signed: + towards A) and the bar it lands at (NO_TRANSFER: none), whether a book is open."""
        return {"quote_a": self._qa.t(), "coin_a": self._ca.t(), "quote_b": self._qb.t(), "coin_b": self._cb.t(),
                "transit_coin": self._tr_coin.t(), "transit_quote": self._tr_quote.t(),
                "transfer_due": self._tr_due.t(), "open": self._book.t()}

    @property
    def slot_value(self) -> Tensor:
        """Everything each slot holds, at the last close [B, P]: equity = cash + slot_value.sum(-1)."""
        if self._tables is None:
            return (self._units * self._close).t()
        return self._slot_value.t()

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

    def _refresh(self, edge_now: bool) -> None:
        """Derived state the agent and the next step both need, computed once per bar (edge_now: some
        episode's bar has an arbitrage edge, known on the host)."""
        self.size = self.position_size()
        self.blocked = self._entries_blocked()
        # [B, P, N_ACTIONS], contiguous for the agent: the [P, B] masks stacked [P, N_ACTIONS, B], then one
        # blocked 2-D transpose ([P * N_ACTIONS, B] -> [B, P * N_ACTIONS])
        live = self._action_mask(edge_now)
        n = len(live)
        mask = torch.stack(live, dim=1).view(self.P * n, self.B).t().contiguous().view(self.B, self.P, n)
        if n < N_ACTIONS:
            mask = torch.cat([mask, self._mask_off], dim=-1)
        self.mask = mask

    # ------------------------------------------------------------------------------ observe and mask

    def _open_trades(self, holding: Tensor) -> Tensor:
        """[B] open trades toward the concurrent cap: spot trades, LP positions, 2 legs per arbitrage book."""
        count = holding.sum(0)
        if self.lp_on:
            count = count + (self._lp_L > 0).sum(0)
        if self.arb_on:
            count = count + 2 * self._book.sum(0)
        return count

    def _action_mask(self, edge_now: bool) -> list[Tensor]:
        """The masks [P, B] bool of the actions, in order (only the first 3 when spot is alone): hold
        always; open when flat, allowed by the risk rules and the bar is real; close when holding (and no
        exit waits already); the strategies' actions where they can act (see the module doc)."""
        if self._tables is None:  # spot alone: hold, open, close (the rest is appended off by _refresh)
            holding = self._units > 0
            open_trades = holding.sum(0)
            can_open = (~holding) & self._tradable_now & (open_trades < self.risk_cfg.max_trades) \
                & ~self.blocked & (self.cash > 0)
            if not self.spot_on:
                can_open = torch.zeros_like(holding)
            return [torch.ones_like(holding), can_open, holding]
        r = self.risk_cfg
        holding = self._units + self._staked + self._unbonding > 0
        pending = self._exit_pending
        open_trades = self._open_trades(holding)
        spendable = self._spendable()
        can_enter = ~self.blocked & (spendable > 0)
        may_enter = self._tradable_now & can_enter & (open_trades < r.max_trades)
        off = torch.zeros_like(holding)
        can_open = ~holding & may_enter if self.spot_on else off
        close = holding & ~pending
        if self.staking_on:
            stake = self._stakeable & (self._units > 0) & ~pending
            unstake = (self._staked > 0) & (self._unbonding <= 0) & ~pending
        else:
            stake = unstake = off
        cap = r.max_position * self.equity  # the per-trade cap in quote [B]
        if self.lp_on:
            # fixed gas in proportion (LPParams.max_gas_share): a position of at least min_notional_usd (sized
            # up within the per-trade cap) whose cost, gas included, the cash covers; a close worth its gas
            lpp = self.strategy_params.lp
            live = self._lp_L > 0
            lp_notional = torch.clamp(self.size * self.equity, min=lpp.min_notional_usd)
            lp_fits = (lpp.min_notional_usd <= cap) & (
                lp_notional * (1.0 + self._coin_share * (self.fee + self.slip)) + lpp.gas_usd_open <= spendable)
            lp_open = ~live & may_enter & lp_fits
            lp_close = live & (self._lp_value + self._lp_fees >= lpp.min_close_value_usd)
        else:
            lp_open = lp_close = off
        if self.lending_on and not self.strategy_params.aave.sweep:
            lend = (self._lendable(self.cash, self._lent) > 0).expand(self.P, self.B)
            withdraw = self._lent > 0
        else:  # off, or the sweep lends
            lend = withdraw = off
        arb = arb_close = off
        if self.arb_on:
            book = self._book
            if self._arb_live:
                arb_close = book & (self._tr_due == NO_TRANSFER)
            if edge_now:  # else no pair has an edge at this bar
                ab, ba = self._bx[tables.MASK_AB], self._bx[tables.MASK_BA]
                stocked = (ab & (self._qa > 0) & (self._cb > 0)) | (ba & (self._qb > 0) & (self._ca > 0))
                ap = self.strategy_params.arbitrage
                book_min = self._arb_min_book(self._close)
                book_notional = torch.maximum(self.size * self.equity, book_min)
                fits = (book_min <= cap) & (book_notional * (1.0 + (ap.taker_fee_a + ap.taker_fee_b) / 4.0)
                                            <= spendable)
                fund = ~book & (ab | ba) & can_enter & (open_trades + 2 <= r.max_trades) & fits
                arb = (book & stocked) | fund
        return [torch.ones_like(holding), can_open, close, stake, unstake, lp_open, lp_close, lend, withdraw, arb,
                arb_close]

    def _spendable(self) -> Tensor:
        """[B] what entries may spend at the next open: the cash, plus the Aave supply when the sweep lends
        (it withdraws what the entries need)."""
        if self.lending_on and self.strategy_params.aave.sweep:
            return self.cash + self._lent.sum(0)
        return self.cash

    def _lendable(self, cash: Tensor, lent: Tensor) -> Tensor:
        """[B] what a LEND may supply: the Aave supply is topped up to max_idle_share of the idle USDT (cash plus
        supply), whatever the per-trade size (AaveParams.max_idle_share)."""
        supply = lent.sum(0)
        return (self.strategy_params.aave.max_idle_share * (cash + supply) - supply).clamp(min=0.0)

    def _arb_min_book(self, close: Tensor) -> Tensor:
        """[P, B] the smallest arbitrage book per slot: one withdrawal fee at `close` is at most max_withdrawal_share
        of it (ArbParams.max_withdrawal_share)."""
        return self._withdrawal_fee * close / self.strategy_params.arbitrage.max_withdrawal_share

    def observe(self) -> Tensor:
        """[B, P, obs_size] float32: market features at the cursor, then slot and portfolio state."""
        B, P = self.B, self.P
        feats = self._features.index_select(0, self._rows(self.t.unsqueeze(-1), self._pair_bp))
        close, units = self._close, self._units
        holding = units > 0 if self._tables is None else units + self._staked + self._unbonding > 0
        r = self.risk_cfg
        stop = risk.stop_level(self._entry, self._highest, r.stop_loss, r.trailing_stop)
        target = risk.take_profit_level(self._entry, r.take_profit)
        safe_entry = torch.where(holding, self._entry, close)
        hf = holding.to(self.dtype)
        daily_used = torch.zeros_like(self.equity)
        if r.daily_loss_limit > 0:
            daily_used = ((1.0 - self.equity / self.day_start_equity) / r.daily_loss_limit).clamp(min=0.0, max=1.0)
        open_trades = hf.sum(0) if self._tables is None else self._open_trades(holding).to(self.dtype)
        portfolio = [
            open_trades / r.max_trades,
            daily_used,
            torch.log(self.equity / self.stats.initial_equity),
            self.cash / self.equity,
            self.size / r.max_position,
        ]
        slot = [
            hf,
            hf * (close / safe_entry - 1.0),
            hf * torch.where(stop > 0, (close - stop) / close, 1.0),
            hf * torch.where(torch.isfinite(target), (target - close) / close, 1.0),
            hf * (self._bars_in_trade / 168.0).clamp(max=4.0),
            units * close / self.equity,
        ]
        state = slot + [x.expand(P, B) for x in portfolio]
        if self._tables is not None:
            strategy_slot, strategy_portfolio = self._strategy_state()
            state += strategy_slot + [x.expand(P, B) for x in strategy_portfolio]
        # Stacked [P, S, B] (one contiguous write per feature), then [P * S, B] -> [B, P * S] by one blocked
        # 2-D transpose: the [B, P, S] layout the observation needs, far cheaper than permuting [S, P, B]
        # element by element.
        n = len(state)
        stacked = torch.stack(state, dim=1).to(torch.float32).view(P * n, B).t().contiguous().view(B, P, n)
        parts = [feats.view(B, P, -1), stacked]
        if self._tables is None:
            parts.append(self._strategy_zeros)
        return torch.cat(parts, dim=-1)

    def _strategy_state(self) -> tuple[list[Tensor], list[Tensor]]:
        """The STRATEGY_STATE_NAMES features in the state's dtype, zeros where a strategy is off: the per-slot
        ones [P, B], then the per-portfolio ones [B]."""
        if self._strategy_rows_stale:  # the fused kernel stepped without gathering the tables' rows
            self._gather_strategy_rows(self._rows(self.t.unsqueeze(0), self._pair_pb), self.t)
        c, zero = self._close, self._zeros
        inv_eq = 1.0 / self.equity
        parts: list[Tensor] = []
        if self.staking_on:
            wait = ((self._release - self.t).to(self.dtype) * (1.0 / 168.0)).clamp(min=0.0, max=4.0)
            parts += [self._staked * c * inv_eq, self._unbonding * c * inv_eq,
                      torch.where(self._unbonding > 0, wait, 0.0), self._stake_apy_feature]
        else:
            parts += [zero] * 4
        if self.lp_on:
            live = self._lp_L > 0
            lower, upper = self._lp_spa * self._lp_spa / c, self._lp_spb * self._lp_spb / c  # pa / c, pb / c
            parts += [self._lp_value * inv_eq, (live & (lower <= 1.0) & (upper >= 1.0)).to(self.dtype),
                      torch.where(live, 1.0 - lower, 0.0), torch.where(live, upper - 1.0, 0.0),
                      self._lp_fees * (inv_eq * 100.0), self._lp_il * (inv_eq * 100.0)]
        else:
            parts += [zero] * 6
        if self.lending_on:
            parts += [self._lent * inv_eq, (self._lent - self._lent_principal) * (inv_eq * 100.0)]
        else:
            parts += [zero] * 2
        if self.arb_on:
            fx = self._fx
            live = self._arb_live
            parts += [self._arb_value * inv_eq if live else zero, fx[tables.SPREAD_FEATURE], fx[tables.EDGE_FEATURE],
                      fx[tables.V2_AVAILABLE], (self._tr_due != NO_TRANSFER).to(self.dtype) if live else zero]
        else:
            parts += [zero] * 5
        if self.lending_on:
            portfolio = [self._sbar[tables.SUPPLY_APY_FEATURE], self._sbar[tables.UTILIZATION]]
        else:
            portfolio = [zero[0]] * 2
        return parts, portfolio

    # ------------------------------------------------------------------------------------------- step

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Apply actions [B, P] decided at the close of bar t; advance to t+1.
        Returns (observation at t+1 [B, P, obs], reward [B, P] float32, done)."""
        k = self.steps_done
        flags = self._host_flags(k)
        obs, reward = self._advance(actions, flags)
        if self.arb_on and self._arb_live and flags.may_fill:
            self._transfers_until = max(self._transfers_until, k + self._max_transfer_bars)
        self.stats.n_returns += 1
        self.steps_done = k + 1
        return obs, reward, self.steps_done >= self.n_steps

    def _host_flags(self, k: int) -> HostFlags:
        """What the strategy tables tell the host about step k (bar t -> t+1) without asking the device."""
        if not self.arb_on:
            return NO_FLAGS
        tb = self._tables
        if self._one_start is not None:
            bar = self._one_start + k
            return HostFlags(may_fund=bool(tb.bar_has_mask[bar]), may_fill=bool(tb.bar_has_fill[bar + 1]),
                             transfers=k <= self._transfers_until, edge_next=bool(tb.bar_has_mask[bar + 1]))
        bar = self._start_host + k
        return HostFlags(may_fund=bool(tb.bar_has_mask[bar].any()), may_fill=bool(tb.bar_has_fill[bar + 1].any()),
                         transfers=k <= self._transfers_until, edge_next=bool(tb.bar_has_mask[bar + 1].any()))

    def _advance(self, actions: Tensor, flags: HostFlags) -> tuple[Tensor, Tensor]:
        """The step's tensor work, one method per phase of the bar (fills, exits, marks, statistics, then the
        mask and observation at t+1). No Python number in it changes from step to step (flags are booleans),
        so it can be compiled. `b` carries the bar's working values from phase to phase; the environment's
        state is written once, at the end."""
        if self._fused is not None:
            self._arb_live = self._arb_live or (self.arb_on and flags.may_fund)
            return self._fused.advance(self, actions)
        b = self._bar_open(actions, flags)
        self._bar_exits(b)
        self._bar_entries(b, flags)
        if self.arb_on and b.books and flags.may_fill:
            # 3. Arbitrage from the books at both venues' opens (arbitrage.arb_trade's rule: the direction
            #    whose net edge at the opens beats min_edge); then a book that ran low is rebalanced. Skipped
            #    on a step where no episode's bar has an edge for any pair (known on the host: no sync).
            (b.qa, b.ca, b.qb, b.cb), (b.tr_coin, b.tr_quote, b.tr_due), b.cost_slot, b.arb_pnl = self._arbitrage_fills(
                b.act, b.book, b.u, b.o, b.o2, (b.qa, b.ca, b.qb, b.cb), (b.tr_coin, b.tr_quote, b.tr_due),
                b.cost_slot, b.arb_pnl)
        if self.lending_on:
            # 4. Lending: the sweep sets the supply to max_idle_share of the idle USDT left after the entries, or
            #    (by hand) a LEND tops it up to that (the first LEND of the bar in pair order supplies it all).
            b.flow, b.lent, b.principal = self._lend(b.act, b.flow, b.lent, b.principal)
        self._bar_stops(b)
        reward = self._bar_mark(b)
        self._bar_commit(b)
        self._refresh(flags.edge_next)
        return self.observe(), reward.t().to(torch.float32)

    def _bar_open(self, actions: Tensor, flags: HostFlags) -> _Bar:
        """The bar t+1 the step fills in: its prices and tradability, the valid actions laid out like the state
        [P, B], the state the phases start from, and (0.) what its open brings: unbonding lots that come free
        and transfers between the venues that land."""
        valid = self.mask.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        b = _Bar()
        b.act = torch.where(valid, actions, HOLD).t().contiguous()  # [P, B] laid out like the state: fast ops
        b.prev_equity, b.prev_close, b.prev_units = self.equity, self._close, self._units
        b.u = u = self.t + 1
        rows = self._rows(u.unsqueeze(0), self._pair_pb)
        b.tb = tb = self._tables
        if tb is None:
            b.o, b.h, b.lo, b.c = self._prices.index_select(0, rows).view(self.P, self.B, 4).unbind(-1)
        else:
            b.o, b.h, b.lo, b.c = tb.prices.gather(1, rows.expand(4, -1)).view(4, self.P, self.B).unbind(0)
            self._gather_strategy_rows(rows, u)  # bar u: its fills now, its mask and observation after
        b.tradable = self._tradable.index_select(0, rows).view(self.P, self.B)
        new_day = self.market.day[u] != self.market.day[self.t]
        b.day_start = torch.where(new_day, b.prev_equity, self.day_start_equity)
        b.units, b.entry, b.entry_cost = self._units, self._entry, self._entry_cost
        b.highest, b.bars_in_trade = self._highest, self._bars_in_trade
        b.coins_before = b.units  # the coins marked at the previous close (for the price PnL)
        b.stake_pnl = b.lp_fee_pnl = b.il_pnl = b.interest = b.arb_pnl = self._zeros
        b.lp_closed = b.arb_closed = b.lp_ret = b.arb_ret = None
        if self.staking_on:
            b.staked, b.unbonding, b.release = self._staked, self._unbonding, self._release
            b.coins_before = b.units + b.staked + b.unbonding
            freed, b.unbonding, b.release = staking.release_unbonded(u, b.release, b.unbonding)
            b.units = b.units + freed
            b.pending = self._exit_pending
        if self.arb_on:
            # What the host knows without a device sync: whether some episode may fund a book this step (the
            # mask allowed ARB at bar t somewhere), whether a book may exist, whether a transfer may land.
            # The blocks that would be exact no-ops otherwise are skipped.
            b.o2, b.quoted = self._fx[tables.V2_OPEN], self._bx[tables.QUOTED]
            b.qa, b.ca, b.qb, b.cb = self._qa, self._ca, self._qb, self._cb
            b.tr_coin, b.tr_quote, b.tr_due, b.book = self._tr_coin, self._tr_quote, self._tr_due, self._book
            b.arb_cost, b.arb_value = self._arb_cost, self._arb_value
            b.may_fund = flags.may_fund
            b.books_before, b.books = self._arb_live, self._arb_live or flags.may_fund
            if b.books_before:
                b.arb_coins_before = b.ca + b.cb + b.tr_coin.abs()
            if flags.transfers:
                (b.qa, b.ca, b.qb, b.cb), (b.tr_coin, b.tr_quote, b.tr_due) = self._land_transfers(
                    u, (b.qa, b.ca, b.qb, b.cb), (b.tr_coin, b.tr_quote, b.tr_due))
        return b

    def _bar_exits(self, b: _Bar) -> None:
        """1. Exits at the open: spot coins (a close unbonds staked coins, sold once free), then LP positions,
        arbitrage books and Aave supply; staking moves."""
        fee, slip, o = self.fee, self.slip, b.o
        want_close = b.act == CLOSE
        if self.staking_on:
            want_close = want_close | b.pending
        sell = want_close & (b.units > 0) & b.tradable
        gross = b.units * (o * (1.0 - slip))
        proceeds = torch.where(sell, gross * (1.0 - fee), 0.0)
        b.cost_slot = torch.where(sell, b.units * o * slip + gross * fee, 0.0)
        b.units = torch.where(sell, 0.0, b.units)
        b.flow = proceeds  # cash into (+) or out of (-) each slot this bar
        if self.staking_on:
            b.units, (b.staked, b.unbonding, b.release), (b.locked, b.pending, b.exit_proceeds), closed = (
                self._staking_exits(b.act, b.u, want_close, sell, proceeds, b.units, b.entry_cost,
                                    (b.staked, b.unbonding, b.release)))
            b.closed, b.closed_ret = closed
        else:
            b.closed_ret = torch.where(sell, proceeds / b.entry_cost.clamp(min=1e-30) - 1.0, 0.0)
            b.closed = sell
        if self.lp_on:
            b.spa, b.spb, b.lp_cost = self._lp_spa, self._lp_spb, self._lp_cost
            b.x0_before = self._lp_x0
            b.lp_closed, b.lp_ret, lp_cash, lp_costs, b.il_pnl, (b.L, b.x0, b.y0, b.lp_fees) = self._close_lp(
                b.act, b.tradable, o)
            b.flow = b.flow + lp_cash
            b.cost_slot = b.cost_slot + lp_costs
        if self.arb_on and b.books_before:
            b.arb_closed, b.arb_ret, book_cash, book_costs, b.arb_pnl, (b.qa, b.ca, b.qb, b.cb, b.arb_cost) = (
                self._close_books(b.act, b.quoted, o, b.o2, (b.qa, b.ca, b.qb, b.cb, b.arb_cost)))
            b.flow = b.flow + book_cash
            b.cost_slot = b.cost_slot + book_costs
            b.book = b.book & ~b.arb_closed
        if self.lending_on:
            withdrawing = (b.act == WITHDRAW).to(self.dtype)
            b.flow = b.flow + self._lent * withdrawing
            keep = 1.0 - withdrawing
            b.lent, b.principal = self._lent * keep, self._lent_principal * keep

    def _bar_entries(self, b: _Bar, flags: HostFlags) -> None:
        """2. Entries at the open, under the concurrent-trade cap, sized by Kelly or fixed size: spot trades, LP
        positions and new arbitrage books, scaled down together when cash runs short."""
        fee, slip, o = self.fee, self.slip, b.o
        S, LP, AR = self.staking_on, self.lp_on, self.arb_on
        want = (b.act == OPEN_LONG) & (b.units == 0) & b.tradable & ~self.blocked
        if S:
            want = want & (b.locked <= 0)
            open_trades = (b.units + b.locked > 0).sum(0)
        else:
            open_trades = (b.units > 0).sum(0)
        available = self.cash + b.flow.sum(0)
        if self.lending_on and self.strategy_params.aave.sweep:
            available = available + b.lent.sum(0)  # the sweep withdraws what the entries need
        if LP or AR:
            arb_books = (b.book, b.quoted, b.books_before, b.may_fund) if AR else None
            accepted, accepted_lp, accepted_arb, spend, scale, lp_notional, book_notional, book_min = (
                self._admit_portfolio_entries(b.act, b.tradable, want, open_trades, available, b.prev_equity,
                                              b.prev_close, b.L if LP else None, arb_books))
        else:
            accepted = risk.accept_entries(want.t(), open_trades, self.risk_cfg.max_trades).t()
            spend = torch.where(accepted, (self.size * b.prev_equity) * (1.0 + fee), 0.0)
            total = spend.sum(0)
            spend = spend * torch.where(total > available, available / total.clamp(min=1e-30), 1.0)
        buy_px = o * (1.0 + slip)
        bought = spend / (1.0 + fee) / buy_px
        b.cost_slot = b.cost_slot + torch.where(accepted, bought * o * slip + spend * (fee / (1.0 + fee)), 0.0)
        b.flow = b.flow - spend
        b.units = torch.where(accepted, bought, b.units)
        b.entry = torch.where(accepted, buy_px, b.entry)
        b.entry_cost = torch.where(accepted, spend, b.entry_cost)
        b.highest = torch.where(accepted, buy_px, b.highest)
        b.bars_in_trade = torch.where(accepted, 0.0, b.bars_in_trade)
        if LP:
            lp_out, lp_costs, (b.L, b.spa, b.spb, b.x0, b.y0, b.lp_cost) = self._open_lp(
                accepted_lp, lp_notional * scale, scale, o, (b.L, b.spa, b.spb, b.x0, b.y0, b.lp_cost))
            b.flow = b.flow - lp_out
            b.cost_slot = b.cost_slot + lp_costs
        if AR and b.may_fund:
            book_out, funding_fees, b.arb_pnl, (b.qa, b.ca, b.qb, b.cb, b.book, b.arb_cost) = self._fund_books(
                accepted_arb, book_notional, book_min, scale, o, b.o2, (b.qa, b.ca, b.qb, b.cb, b.book, b.arb_cost),
                b.arb_pnl)
            b.flow = b.flow - book_out
            b.cost_slot = b.cost_slot + funding_fees

    def _bar_stops(self, b: _Bar) -> None:
        """5. Stops and targets inside bar t+1 (including positions just opened at its open). Staked and unbonding
        coins count: the stop sells the free coins and leaves an exit pending for the rest."""
        S = self.staking_on
        trade, staking_state, b.still, (b.closed, b.closed_ret), b.cost_slot, b.flow, (stopped_units, exit_px) = (
            self._stops(
                (b.units, b.entry, b.entry_cost, b.highest, b.bars_in_trade),
                (b.locked, b.pending, b.exit_proceeds) if S else None, b.tradable, b.o, b.h, b.lo,
                (b.closed, b.closed_ret), b.cost_slot, b.flow))
        b.units, b.entry, b.entry_cost, b.highest, b.bars_in_trade = trade
        if S:
            b.locked, b.pending, b.exit_proceeds = staking_state
        b.coins_after = b.units + b.locked if S else b.units
        if b.tb is not None:
            # price PnL of the coins: held from the last close to the open, sold at the stop, held to the close
            b.spot_pnl = (b.coins_before * (b.o - b.prev_close) + stopped_units * (exit_px - b.o)
                          + b.coins_after * (b.c - b.o))

    def _bar_mark(self, b: _Bar) -> Tensor:
        """6. What the bar earns (staking rewards, LP fees, Aave interest); everything marked at the close c.
        Returns the reward [P, B]."""
        c = b.c
        b.cash = self.cash + b.flow.sum(0)
        if b.tb is None:
            b.value = b.units * c
            b.equity = b.cash + b.value.sum(0)
            slot_change = b.value - b.prev_units * b.prev_close + b.flow
        else:
            value = b.coins_after * c
            if self.staking_on:
                grown = b.staked * self._stake_growth
                b.stake_pnl = (grown - b.staked) * c
                b.staked = grown
                value = value + b.stake_pnl
            if self.lp_on:
                b.lp_fee_pnl, b.lp_fees, b.lp_value, b.lp_il = self._mark_lp(
                    b.h, b.lo, c, (b.L, b.spa, b.spb, b.x0, b.y0, b.lp_fees))
                b.il_pnl = b.il_pnl + b.lp_il - self._lp_il
                b.spot_pnl = b.spot_pnl + b.x0_before * (b.o - b.prev_close) + b.x0 * (c - b.o)
                value = value + b.lp_value + b.lp_fees
            if self.lending_on:
                grown = b.lent * self._sbar[tables.SUPPLY_GROWTH]
                b.interest = grown - b.lent
                b.lent = grown
                value = value + b.lent
            if self.arb_on and b.books:
                b.spot_pnl, b.arb_value = self._mark_books(
                    b.o, c, b.prev_close, (b.qa, b.ca, b.qb, b.cb, b.tr_coin, b.tr_quote),
                    b.arb_coins_before if b.books_before else None, b.spot_pnl)
                value = value + b.arb_value
            b.value = value
            b.equity = b.cash + value.sum(0)
            slot_change = value - self._slot_value + b.flow
        reward, b.x, b.peak, b.drawdown = self._reward(slot_change, b.equity, b.prev_equity)
        return reward

    def _bar_commit(self, b: _Bar) -> None:
        """7. Bookkeeping (Kelly history of spot trades, episode statistics), then the bar's values become the
        environment's state and the cursor moves to t+1."""
        sources = (None if b.tb is None
                   else [b.spot_pnl, b.stake_pnl, b.lp_fee_pnl, b.il_pnl, b.interest, b.arb_pnl])
        self._bookkeeping((b.closed, b.closed_ret), ((b.lp_closed, b.lp_ret), (b.arb_closed, b.arb_ret)), b.x,
                          b.drawdown, b.cost_slot, b.equity, b.prev_equity, sources)
        self.cash, self._units, self._entry, self._entry_cost = b.cash, b.units, b.entry, b.entry_cost
        self._highest, self._bars_in_trade = b.highest, b.bars_in_trade
        if self.staking_on:
            self._staked, self._unbonding, self._release = b.staked, b.unbonding, b.release
            self._exit_pending, self._exit_proceeds = b.pending & b.still, b.exit_proceeds
        if self.lp_on:
            self._lp_L, self._lp_spa, self._lp_spb, self._lp_x0, self._lp_y0 = b.L, b.spa, b.spb, b.x0, b.y0
            self._lp_fees, self._lp_cost, self._lp_value, self._lp_il = b.lp_fees, b.lp_cost, b.lp_value, b.lp_il
        if self.lending_on:
            self._lent, self._lent_principal = b.lent, b.principal
        if self.arb_on:
            self._qa, self._ca, self._qb, self._cb = b.qa, b.ca, b.qb, b.cb
            self._tr_coin, self._tr_quote, self._tr_due = b.tr_coin, b.tr_quote, b.tr_due
            self._book, self._arb_cost, self._arb_value = b.book, b.arb_cost, b.arb_value
            self._arb_live = b.books
        if b.tb is not None:
            self._slot_value = b.value
        self.equity, self.peak, self.day_start_equity = b.equity, b.peak, b.day_start
        self._close = b.c
        self._tradable_now = b.tradable
        self.t = b.u

    def _staking_exits(self, act: Tensor, u: Tensor, want_close: Tensor, sell: Tensor, proceeds: Tensor,
                       units: Tensor, entry_cost: Tensor, stake: tuple[Tensor, Tensor, Tensor]) -> tuple:
        """1a. Staking at the open of bar u: a close (want_close) or an UNSTAKE starts unbonding staked coins
        (staking.start_unbond), a STAKE stakes a share of the free ones; a spot trade counts as closed once no coins
        are left locked, else its exit waits. stake: (staked, unbonding, release bar). Returns (free units, stake
        after, (locked, exit pending, exit proceeds), (closed, returns))."""
        sp = self.strategy_params.staking
        staked, unbonding, release = stake
        request = torch.where(want_close, staked, torch.where(act == UNSTAKE, staked * sp.unstake_fraction, 0.0))
        staked, unbonding, release = staking.start_unbond(staked, unbonding, release, request, u, self._unbond_bars)
        moved = torch.where(act == STAKE, units * sp.stake_fraction, 0.0)
        units, staked = units - moved, staked + moved
        locked = staked + unbonding
        exit_proceeds = self._exit_proceeds + proceeds
        closed = sell & (locked <= 0)
        closed_ret = torch.where(closed, exit_proceeds / entry_cost.clamp(min=1e-30) - 1.0, 0.0)
        pending = want_close & (locked > 0)
        return units, (staked, unbonding, release), (locked, pending, exit_proceeds), (closed, closed_ret)

    def _mark_lp(self, h: Tensor, lo: Tensor, c: Tensor, position: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """6b. What the Uniswap V3 positions earn in the bar (high h, low lo, close c): their share of the pool's
        fees for the part of the bar's range inside their own (uniswap_v3.fee_income with fee_tier * pool volume
        read from the table), their value and impermanent loss at the close. position: (L, sqrt pa, sqrt pb, x0,
        y0, fees). Returns (fee PnL, fees accrued, value, impermanent loss)."""
        fx = self._fx
        L, spa, spb, x0, y0, lp_fees = position
        pa, pb = spa * spa, spb * spb
        lp_fee_pnl = (uniswap_v3.in_range_fraction(lo, h, pa, pb) * uniswap_v3.liquidity_share(
            L, fx[tables.POOL_LIQUIDITY]) * fx[tables.POOL_FEE_VOLUME])
        lp_fees = lp_fees + lp_fee_pnl
        x_close, y_close = uniswap_v3.amounts_sqrt(L, fx[tables.SQRT_CLOSE], spa, spb)
        lp_value = x_close * c + y_close
        return lp_fee_pnl, lp_fees, lp_value, lp_value - (x0 * c + y0)

    def _mark_books(self, o: Tensor, c: Tensor, prev_close: Tensor, books: tuple[Tensor, ...],
                    coins_before: Tensor | None, spot_pnl: Tensor) -> tuple[Tensor, Tensor]:
        """6d. The arbitrage books marked at the close c: their coins' price move (those held at the last close,
        coins_before, None where no book was open, from that close to the open; those after the open's trades to
        the close) goes to the spot PnL. books: (qa, ca, qb, cb, coin in transit, quote in transit). Returns
        (spot_pnl, the books' value)."""
        qa, ca, qb, cb, tr_coin, tr_quote = books
        arb_coins_after = ca + cb + tr_coin.abs()
        if coins_before is not None:
            spot_pnl = spot_pnl + coins_before * (o - prev_close)
        spot_pnl = spot_pnl + arb_coins_after * (c - o)
        return spot_pnl, qa + qb + tr_quote.abs() + arb_coins_after * c

    def _admit_portfolio_entries(self, act: Tensor, tradable: Tensor, want: Tensor, open_trades: Tensor,
                                 available: Tensor, prev_equity: Tensor, prev_close: Tensor, lp_L: Tensor | None,
                                 arb: tuple | None) -> tuple:
        """2a. The entries admitted under the concurrent-trade cap with LP or arbitrage on: single trades in pair
        order (spot then LP for each pair), then arbitrage books (2 legs each), their spend scaled down together
        when the cash available runs short. lp_L: the LP positions' liquidity (None: LP off); arb: (books,
        quoted, a book may exist, a book may be funded) (None: arbitrage off). Returns (accepted spot, LP and
        book entries, spend, scale, LP notional, book notional, book minimum; None where off)."""
        r, fee, slip = self.risk_cfg, self.fee, self.slip
        notional = self.size * prev_equity
        no = self._zeros > 0
        want_lp, want_arb = no, no
        if lp_L is not None:
            open_trades = open_trades + (lp_L > 0).sum(0)
            want_lp = (act == LP_OPEN) & tradable & ~self.blocked
        may_fund = arb is not None and arb[3]
        if arb is not None:
            book, quoted, books_before, _ = arb
            if books_before:
                open_trades = open_trades + 2 * book.sum(0)
            if may_fund:
                want_arb = (act == ARB) & ~book & quoted & ~self.blocked
        singles = torch.stack([want, want_lp], dim=1).view(2 * self.P, self.B)
        granted, accepted_arb = risk.accept_trades_then_books(singles, want_arb, open_trades, r.max_trades)
        pairs_granted = granted.view(self.P, 2, self.B)
        accepted, accepted_lp = pairs_granted[:, 0], pairs_granted[:, 1]
        spend = torch.where(accepted, notional * (1.0 + fee), 0.0)
        variable, gas = spend.sum(0), 0.0
        lp_notional = book_notional = book_min = None
        # an LP position and an arbitrage book are sized up to their minimum (the mask checked the cap)
        if lp_L is not None:
            lpp = self.strategy_params.lp
            n_lp = accepted_lp.sum(0)
            lp_notional = notional.clamp(min=lpp.min_notional_usd)
            variable = variable + n_lp * lp_notional * (1.0 + self._coin_share * (fee + slip))
            gas = n_lp.to(self.dtype) * lpp.gas_usd_open
        if may_fund:
            ap = self.strategy_params.arbitrage
            fa, fb = ap.taker_fee_a, ap.taker_fee_b
            book_min = self._arb_min_book(prev_close)
            book_notional = torch.maximum(notional, book_min)
            variable = variable + torch.where(accepted_arb, book_notional * (1.0 + (fa + fb) / 4.0), 0.0).sum(0)
        scale = torch.where(variable + gas > available,
                            (available - gas).clamp(min=0.0) / variable.clamp(min=1e-30), 1.0)
        return accepted, accepted_lp, accepted_arb, spend * scale, scale, lp_notional, book_notional, book_min

    def _open_lp(self, accepted_lp: Tensor, budget: Tensor, scale: Tensor, o: Tensor,
                 position: tuple[Tensor, ...]) -> tuple:
        """2b. The admitted LP_OPENs: a symmetric Uniswap V3 position of `budget` quote around the open (never below
        the minimum), the coin share swapped in at fee and slippage, gas paid. position: (L, sqrt pa, sqrt pb, x0,
        y0, cost). Returns (cash out, costs, the position after)."""
        lpp, fee, slip = self.strategy_params.lp, self.fee, self.slip
        L, spa, spb, x0, y0, lp_cost = position
        accepted_lp = accepted_lp & (scale > 0) & (budget >= lpp.min_notional_usd)  # never below the minimum
        opened = uniswap_v3.open_symmetric(budget, o, lpp.range_width, sqrt_p=self._fx[tables.SQRT_OPEN])
        swap_in = budget * (self._coin_share * (fee + slip))  # buying the coin share
        lp_out = budget + swap_in + lpp.gas_usd_open
        opening = accepted_lp.to(self.dtype)
        L = torch.where(accepted_lp, opened.L, L)
        spa, spb = torch.where(accepted_lp, opened.sqrt_pa, spa), torch.where(accepted_lp, opened.sqrt_pb, spb)
        x0, y0 = torch.where(accepted_lp, opened.x, x0), torch.where(accepted_lp, opened.y, y0)
        lp_cost = torch.where(accepted_lp, lp_out, lp_cost)
        return lp_out * opening, (swap_in + lpp.gas_usd_open) * opening, (L, spa, spb, x0, y0, lp_cost)

    def _fund_books(self, accepted_arb: Tensor, book_notional: Tensor, book_min: Tensor, scale: Tensor, o: Tensor,
                    o2: Tensor, books: tuple[Tensor, ...], arb_pnl: Tensor) -> tuple:
        """2c. The admitted new arbitrage books: a quarter of the notional (sized up to the book's minimum) in quote
        and a quarter in coins at each venue, bought at the venues' opens with taker fees. books: (qa, ca, qb, cb,
        book, cost). Returns (cash out, fees, the arbitrage PnL, the books after)."""
        ap = self.strategy_params.arbitrage
        fa, fb = ap.taker_fee_a, ap.taker_fee_b
        qa, ca, qb, cb, book, arb_cost = books
        accepted_arb = accepted_arb & (scale > 0) & (book_notional * scale >= book_min)
        quarter = book_notional * scale * 0.25
        funding_fees = quarter * (fa + fb)
        book_out = 4.0 * quarter + funding_fees
        funding = accepted_arb.to(self.dtype)
        coin_b = quarter / o2
        arb_pnl = arb_pnl + (coin_b * o - quarter) * funding  # B's coins bought at B's price
        qa, qb = torch.where(accepted_arb, quarter, qa), torch.where(accepted_arb, quarter, qb)
        ca, cb = torch.where(accepted_arb, quarter / o, ca), torch.where(accepted_arb, coin_b, cb)
        book = book | accepted_arb
        arb_cost = torch.where(accepted_arb, book_out, arb_cost)
        return book_out * funding, funding_fees * funding, arb_pnl, (qa, ca, qb, cb, book, arb_cost)

    def _stops(self, trade: tuple[Tensor, ...], staking_state: tuple[Tensor, ...] | None, tradable: Tensor,
               o: Tensor, h: Tensor, lo: Tensor, closed: tuple[Tensor, Tensor], cost_slot: Tensor,
               flow: Tensor) -> tuple:
        """5. Stops and targets inside the bar (open o, high h, low lo), positions just opened included: a spot
        trade that touches its stop or target is sold there (risk.exits_in_bar). With staking (staking_state:
        locked coins, exit pending, exit proceeds), staked and unbonding coins count: the stop sells the free
        coins and leaves an exit pending for the rest. trade: (units, entry, entry cost, highest, bars held).
        Returns (the trade after, the staking state after, still open, (closed, returns), costs, flow, (stopped
        units, exit price))."""
        r, fee, slip = self.risk_cfg, self.fee, self.slip
        units, entry, entry_cost, highest, bars_in_trade = trade
        closed, closed_ret = closed
        if staking_state is not None:
            locked, pending, exit_proceeds = staking_state
            holding = (units + locked > 0) & tradable & ~pending
        else:
            holding = (units > 0) & tradable
        stop = risk.stop_level(entry, highest, r.stop_loss, r.trailing_stop)
        target = risk.take_profit_level(entry, r.take_profit)
        stop_hit, target_hit, exit_px = risk.exits_in_bar(o, h, lo, stop, target)
        forced = holding & (stop_hit | target_hit)
        forced_gross = units * exit_px * (1.0 - slip)
        forced_proceeds = torch.where(forced, forced_gross * (1.0 - fee), 0.0)
        cost_slot = cost_slot + torch.where(forced, units * exit_px * slip + forced_gross * fee, 0.0)
        stopped_units = torch.where(forced, units, 0.0) if self._tables is not None else None
        if staking_state is not None:
            exit_proceeds = exit_proceeds + forced_proceeds
            forced_closed = forced & (locked <= 0)
            closed_ret = torch.where(forced_closed, exit_proceeds / entry_cost.clamp(min=1e-30) - 1.0, closed_ret)
            closed = closed | forced_closed
            pending = pending | (forced & (locked > 0))
        else:
            closed_ret = torch.where(forced, forced_proceeds / entry_cost.clamp(min=1e-30) - 1.0, closed_ret)
            closed = closed | forced
        flow = flow + forced_proceeds
        units = torch.where(forced, 0.0, units)
        still = units > 0
        if staking_state is not None:
            still = still | (locked > 0)
            staking_state = (locked, pending, torch.where(still, exit_proceeds, 0.0))
        highest = torch.where(still & tradable, torch.maximum(highest, h), highest)
        bars_in_trade = torch.where(still, bars_in_trade + 1.0, 0.0)
        entry = torch.where(still, entry, 0.0)
        entry_cost = torch.where(still, entry_cost, 0.0)
        return ((units, entry, entry_cost, highest, bars_in_trade), staking_state, still, (closed, closed_ret),
                cost_slot, flow, (stopped_units, exit_px))

    def _land_transfers(self, u: Tensor, book: tuple[Tensor, ...],
                        transfers: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """0. Transfers between the venues that land at the open of bar u join the receiving venue's book.
        Returns the book (qa, ca, qb, cb) and the transfers (coin, quote, due bar) after."""
        qa, ca, qb, cb = book
        tr_coin, tr_quote, tr_due = transfers
        lands = tr_due <= u
        landing_coin, landing_quote = torch.where(lands, tr_coin, 0.0), torch.where(lands, tr_quote, 0.0)
        ca, cb = ca + landing_coin.clamp(min=0.0), cb - landing_coin.clamp(max=0.0)
        qa, qb = qa + landing_quote.clamp(min=0.0), qb - landing_quote.clamp(max=0.0)
        tr_coin, tr_quote = tr_coin - landing_coin, tr_quote - landing_quote
        tr_due = torch.where(lands, NO_TRANSFER, tr_due)
        return (qa, ca, qb, cb), (tr_coin, tr_quote, tr_due)

    def _close_lp(self, act: Tensor, tradable: Tensor, o: Tensor) -> tuple:
        """1b. An LP_CLOSE at the open o: the position's coins (swapped back to quote at fee and slippage) and
        quote plus the fees it earned, less gas. Returns (closed, its return, cash in, costs, impermanent loss
        realised at the open, the position after: (L, x0, y0, fees))."""
        fee, slip, lpp, fx = self.fee, self.slip, self.strategy_params.lp, self._fx
        L, spa, spb, x0, y0 = self._lp_L, self._lp_spa, self._lp_spb, self._lp_x0, self._lp_y0
        lp_fees = self._lp_fees
        lp_closed = (act == LP_CLOSE) & tradable
        closing = lp_closed.to(self.dtype)
        x_open, y_open = uniswap_v3.amounts_sqrt(L, fx[tables.SQRT_OPEN], spa, spb)
        coin_open = x_open * o
        swap_out = coin_open * (fee + slip)  # selling the coin share back to quote
        lp_cash = coin_open + y_open + lp_fees - swap_out - lpp.gas_usd_close
        il_pnl = (coin_open + y_open - (x0 * o + y0)) * closing  # the loss vs holding, at the open
        lp_ret = lp_cash / self._lp_cost.clamp(min=1e-30) - 1.0
        keep = 1.0 - closing
        return (lp_closed, lp_ret, lp_cash * closing, (swap_out + lpp.gas_usd_close) * closing, il_pnl,
                (L * keep, x0 * keep, y0 * keep, lp_fees * keep))

    def _close_books(self, act: Tensor, quoted: Tensor, o: Tensor, o2: Tensor, book: tuple[Tensor, ...]) -> tuple:
        """1c. An ARB_CLOSE where both venues quote: each venue's coins sold at its open, taker fees paid. Returns
        (closed, its return, cash in, costs, arbitrage PnL, the book after: (qa, ca, qb, cb, cost))."""
        ap = self.strategy_params.arbitrage
        fa, fb = ap.taker_fee_a, ap.taker_fee_b
        qa, ca, qb, cb, arb_cost = book
        arb_closed = (act == ARB_CLOSE) & quoted
        closing = arb_closed.to(self.dtype)
        coin_a_value, coin_b_value = ca * o, cb * o2
        book_cash = qa + qb + coin_a_value * (1.0 - fa) + coin_b_value * (1.0 - fb)
        arb_pnl = (coin_b_value - cb * o) * closing  # B's coins sold at B's price, not A's
        arb_ret = book_cash / self._arb_cost.clamp(min=1e-30) - 1.0
        keep = 1.0 - closing
        return (arb_closed, arb_ret, book_cash * closing, (coin_a_value * fa + coin_b_value * fb) * closing, arb_pnl,
                (qa * keep, ca * keep, qb * keep, cb * keep, arb_cost * keep))

    def _arbitrage_fills(self, act: Tensor, book: Tensor, u: Tensor, o: Tensor, o2: Tensor,
                         inventory: tuple[Tensor, ...], transfers: tuple[Tensor, ...], cost_slot: Tensor,
                         arb_pnl: Tensor) -> tuple:
        """3. Arbitrage from the books at both venues' opens (arbitrage.arb_trade's rule: the direction whose net
        edge at the opens beats min_edge); then a book that ran low is rebalanced by a transfer. Returns the
        inventory (qa, ca, qb, cb), the transfers (coin, quote, due bar), the costs and the arbitrage PnL."""
        ap, bx = self.strategy_params.arbitrage, self._bx
        fa, fb = ap.taker_fee_a, ap.taker_fee_b
        qa, ca, qb, cb = inventory
        tr_coin, tr_quote, tr_due = transfers
        trade = (act == ARB) & book
        units_arb = arbitrage.directed_units(qa, ca, qb, cb, o, o2, trade & bx[tables.FILL_AB],
                                             trade & bx[tables.FILL_BA], fa, fb, ap.max_notional_usd)
        legs = arbitrage.settle(qa, ca, qb, cb, units_arb, o, o2, fa, fb)
        qa, ca, qb, cb = legs.quote_a, legs.coin_a, legs.quote_b, legs.coin_b
        cost_slot = cost_slot + legs.fees
        arb_pnl = arb_pnl + units_arb * (o2 - o)  # sold on B above A's price (or bought on B below it)
        coins_mean, quote_mean = (ca + cb) * 0.5, (qa + qb) * 0.5
        low = ((torch.minimum(ca, cb) <= (2.0 * ap.rebalance_below) * coins_mean)
               | (torch.minimum(qa, qb) <= (2.0 * ap.rebalance_below) * quote_mean))
        rebalance = (units_arb != 0) & (tr_due == NO_TRANSFER) & low
        to_a = coins_mean - ca  # coins the rich venue sends towards A (negative: towards B)
        fee_units = torch.where(rebalance, torch.minimum(to_a.abs(), self._withdrawal_fee), 0.0)
        tr_coin = torch.where(rebalance, to_a - torch.sign(to_a) * fee_units, tr_coin)
        tr_quote = torch.where(rebalance, quote_mean - qa, tr_quote)
        ca, cb = torch.where(rebalance, torch.minimum(ca, coins_mean), ca), torch.where(
            rebalance, torch.minimum(cb, coins_mean), cb)
        qa, qb = torch.where(rebalance, torch.minimum(qa, quote_mean), qa), torch.where(
            rebalance, torch.minimum(qb, quote_mean), qb)
        tr_due = torch.where(rebalance, u + self._transfer_bars, tr_due)
        cost_slot = cost_slot + fee_units * o
        return (qa, ca, qb, cb), (tr_coin, tr_quote, tr_due), cost_slot, arb_pnl

    def _lend(self, act: Tensor, flow: Tensor, lent: Tensor, principal: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """4. Lending. By the sweep: the supply is set to max_idle_share of the idle USDT left after the entries
        (cash plus supply: the entries could spend both), in equal sub-accounts per slot; a withdrawal takes its
        share of the interest. By hand: a LEND tops the supply up to max_idle_share of that idle USDT (the first
        LEND of the bar in pair order supplies it all). Returns (flow, lent, principal)."""
        aave = self.strategy_params.aave
        if aave.sweep:
            target = (aave.max_idle_share / self.P) * (self.cash + flow.sum(0) + lent.sum(0)).clamp(min=0.0)
            moved = target - lent
            kept = torch.where(moved < 0, target / lent.clamp(min=torch.finfo(self.dtype).tiny), 1.0)
            principal = torch.where(moved < 0, principal * kept, principal + moved)
            return flow - moved, target.expand(self.P, self.B).clone(), principal
        lendable = self._lendable((self.cash + flow.sum(0)).clamp(min=0.0), lent)
        chunk = torch.where(act == LEND, lendable, 0.0)
        supplied = torch.minimum(chunk, (lendable - (torch.cumsum(chunk, 0) - chunk)).clamp(min=0.0))
        return flow - supplied, lent + supplied, principal + supplied

    def _reward(self, slot_change: Tensor, equity: Tensor, prev_equity: Tensor) -> tuple[Tensor, ...]:
        """6c. Each slot's reward: its change of value plus its cash flows, on the log scale of the equity change,
        less the drawdown penalty. Returns (reward [P, B], x: the equity's relative change, peak, drawdown)."""
        x = equity / prev_equity - 1.0
        small = x.abs() <= 1e-6
        scale_log = torch.where(small, 1.0 - x / 2.0, torch.log1p(x) / torch.where(small, 1.0, x))
        reward = slot_change * (scale_log / prev_equity)
        peak = torch.maximum(self.peak, equity)
        drawdown = 1.0 - equity / peak
        if self.env_cfg.drawdown_penalty > 0:
            prev_dd = 1.0 - prev_equity / self.peak
            reward = reward - self.env_cfg.drawdown_penalty * (drawdown - prev_dd).clamp(min=0.0) / self.P
        return reward, x, peak, drawdown

    def _bookkeeping(self, spot: tuple[Tensor, Tensor], others: tuple, x: Tensor, drawdown: Tensor,
                     cost_slot: Tensor, equity: Tensor, prev_equity: Tensor, sources: list[Tensor] | None) -> None:
        """7. Bookkeeping: the Kelly history (spot trades: (closed, returns)), the episode statistics (others: the
        (closed, returns) of LP positions and arbitrage books, None where off), the PnL by source (sources: the
        scratch rows of layout.PNL_SOURCES before fees; None for spot alone)."""
        closed, closed_ret = spot
        closed_bp, ret_bp = closed.t(), closed_ret.t()
        self.trade_head, evicted, evicted_valid = risk.record_trades_(self.trade_ring, self.trade_head, closed_bp,
                                                                      ret_bp)
        self.kelly_sums = _update_window_sums(self.kelly_sums, closed_bp, ret_bp, evicted_valid, evicted)
        st = self.stats
        x64 = x.to(torch.float64)
        st.ret_sum = st.ret_sum + x64
        st.ret_sq_sum = st.ret_sq_sum + x64 * x64
        st.max_drawdown = torch.maximum(st.max_drawdown, drawdown)
        done, won = [closed], [closed & (closed_ret > 0)]
        for done_now, ret_now in others:
            if done_now is not None:
                done.append(done_now)
                won.append(done_now & (ret_now > 0))
        st.trades = st.trades + (torch.stack(done).sum((0, 1)) if len(done) > 1 else closed.sum(0))
        st.wins = st.wins + (torch.stack(won).sum((0, 1)) if len(won) > 1 else won[0].sum(0))
        costs = cost_slot.sum(0)
        st.costs = st.costs + costs
        if sources is None:  # spot alone: every change of equity that is not a cost is the coins' price move
            st.pnl_rows[0] += (equity - prev_equity) + costs
            st.pnl_rows[-1] -= costs
        else:
            st.pnl_rows += torch.stack([s.sum(0) for s in sources] + [-costs])
        st.equity = equity


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
