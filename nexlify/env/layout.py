"""The environment's layout, written once with names: the action ids, the state fields of an observation
and their offsets, and the rows of the PnL by source.

Every implementation of the step (the tensor step nexlify.env.batched and the CPU kernel
nexlify.env.fused_portfolio) and every reader (agents, baselines, evaluation, reports) takes these names
from here; an offset is derived from its name's place in a tuple, never typed as a number. This module
holds no rules and imports nothing heavier than two constants of the strategies (from their torch-free
params module), so the kernels can import it without importing the environment, and the report page
without importing torch.
"""

from __future__ import annotations

from nexlify.strategies.params import NO_LOT, SPREAD_FEATURE

# ------------------------------------------------------------------------------------------------ actions

# The set is fixed whatever the config (a disabled strategy's actions are masked), so the network's
# shape never depends on the config; hold, open_long and close stay 0, 1, 2.
ACTION_NAMES = ("hold", "open_long", "close", "stake", "unstake", "lp_open", "lp_close", "lend", "withdraw",
                "arbitrage", "arb_close")
N_ACTIONS = len(ACTION_NAMES)
HOLD, OPEN_LONG, CLOSE = (ACTION_NAMES.index(n) for n in ("hold", "open_long", "close"))
STAKE, UNSTAKE = (ACTION_NAMES.index(n) for n in ("stake", "unstake"))
LP_OPEN, LP_CLOSE = (ACTION_NAMES.index(n) for n in ("lp_open", "lp_close"))
LEND, WITHDRAW = (ACTION_NAMES.index(n) for n in ("lend", "withdraw"))
ARB, ARB_CLOSE = (ACTION_NAMES.index(n) for n in ("arbitrage", "arb_close"))
N_SPOT_ACTIONS = 3  # hold, open_long, close: the actions of spot alone (the rest is masked off)

# Sentinels of the state: NO_LOT is the release bar of a slot with nothing unbonding (staking.NO_LOT),
# NO_TRANSFER the transfer_due of an arbitrage book with no transfer under way (later than any bar).
NO_TRANSFER = 2 ** 62

# ------------------------------------------------------------------------------------------ observation

# Slot and portfolio state appended to the market features in each slot's observation: the spot state,
# then the strategies' (zero when a strategy is off). Weights are fractions of equity; lp_fees_accrued,
# lp_impermanent_loss and interest_accrued are in % of equity; the APYs x10; the spread (which includes
# the USDT/USD drift) and the better arbitrage edge at the closes in bps / 10, clipped to +-10;
# unbond_wait in weeks (at most 4); lp_dist_* as fractions of the close.
SPOT_STATE_NAMES = (
    "in_position", "unrealised_pnl", "dist_to_stop", "dist_to_target", "bars_in_trade", "position_weight",
    "open_trades_frac", "daily_loss_used", "log_equity_change", "cash_frac", "size_frac",
)
STRATEGY_STATE_NAMES = (
    "staked_weight", "unbonding_weight", "unbond_wait", "staking_apy",
    "lp_weight", "lp_in_range", "lp_dist_lower", "lp_dist_upper", "lp_fees_accrued", "lp_impermanent_loss",
    "lent_weight", "interest_accrued",
    "arb_weight", SPREAD_FEATURE, "arb_edge_bps", "venue2_available", "transfer_pending",
    "aave_supply_apy", "aave_utilization",
)
STATE_NAMES = SPOT_STATE_NAMES + STRATEGY_STATE_NAMES
N_SPOT_STATE = len(SPOT_STATE_NAMES)
N_STATE = len(STATE_NAMES)


def observation_size(n_market_features: int) -> int:
    return n_market_features + N_STATE


# Offsets of the state fields after the market features: field X of a slot is obs[..., n_features + X].
_state = STATE_NAMES.index
(S_IN_POSITION, S_UNREALISED_PNL, S_DIST_TO_STOP, S_DIST_TO_TARGET, S_BARS_IN_TRADE, S_POSITION_WEIGHT) = (
    _state(n) for n in ("in_position", "unrealised_pnl", "dist_to_stop", "dist_to_target", "bars_in_trade",
                        "position_weight"))
S_OPEN_TRADES_FRAC, S_DAILY_LOSS_USED, S_LOG_EQUITY_CHANGE, S_CASH_FRAC, S_SIZE_FRAC = (
    _state(n) for n in ("open_trades_frac", "daily_loss_used", "log_equity_change", "cash_frac", "size_frac"))
S_STAKED_WEIGHT, S_UNBONDING_WEIGHT, S_UNBOND_WAIT, S_STAKING_APY = (
    _state(n) for n in ("staked_weight", "unbonding_weight", "unbond_wait", "staking_apy"))
S_LP_WEIGHT, S_LP_IN_RANGE, S_LP_DIST_LOWER, S_LP_DIST_UPPER, S_LP_FEES_ACCRUED, S_LP_IMPERMANENT_LOSS = (
    _state(n) for n in ("lp_weight", "lp_in_range", "lp_dist_lower", "lp_dist_upper", "lp_fees_accrued",
                        "lp_impermanent_loss"))
S_LENT_WEIGHT, S_INTEREST_ACCRUED = (_state(n) for n in ("lent_weight", "interest_accrued"))
S_ARB_WEIGHT, S_SPREAD, S_ARB_EDGE_BPS, S_VENUE2_AVAILABLE, S_TRANSFER_PENDING = (
    _state(n) for n in ("arb_weight", SPREAD_FEATURE, "arb_edge_bps", "venue2_available", "transfer_pending"))
S_AAVE_SUPPLY_APY, S_AAVE_UTILIZATION = (_state(n) for n in ("aave_supply_apy", "aave_utilization"))
del _state

# ------------------------------------------------------------------------------------------------- PnL

# Where the PnL comes from (EpisodeStats.pnl_rows, one row per source; the rows add up to the equity
# change). spot: price moves of every coin held (spot trades, staked coins, the LP position's opening
# coins as if held, arbitrage inventory); staking_rewards: new coins at the close they are credited;
# lp_fees; impermanent_loss: the LP position's value minus holding its opening amounts; lending_interest;
# arbitrage: the spread captured against the primary's price (includes USDT/USD drift); fees_and_gas:
# every fee, slippage, gas and withdrawal fee paid (negative).
PNL_SOURCES = ("spot", "staking_rewards", "lp_fees", "impermanent_loss", "lending_interest", "arbitrage",
               "fees_and_gas")
(PNL_SPOT, PNL_STAKING_REWARDS, PNL_LP_FEES, PNL_IMPERMANENT_LOSS, PNL_LENDING_INTEREST, PNL_ARBITRAGE,
 PNL_FEES_AND_GAS) = (PNL_SOURCES.index(n) for n in (
    "spot", "staking_rewards", "lp_fees", "impermanent_loss", "lending_interest", "arbitrage", "fees_and_gas"))

__all__ = [
    "ACTION_NAMES", "N_ACTIONS", "N_SPOT_ACTIONS", "HOLD", "OPEN_LONG", "CLOSE", "STAKE", "UNSTAKE", "LP_OPEN",
    "LP_CLOSE", "LEND", "WITHDRAW", "ARB", "ARB_CLOSE", "NO_LOT", "NO_TRANSFER", "SPOT_STATE_NAMES",
    "STRATEGY_STATE_NAMES", "STATE_NAMES", "N_SPOT_STATE", "N_STATE", "observation_size", "PNL_SOURCES",
]
