"""Parameters of the strategies beyond spot, with their sourced defaults, free of torch.

The dataclasses live here (not beside their arithmetic) so that `nexlify.config` can take its
defaults from them without importing torch: a default lives in one place, and the pipeline's config
code stays light. Each strategy module re-exports its own params class, so
`from nexlify.strategies.staking import StakingParams` keeps working. What builds tensors from them
(`staking.pair_tensors`, `arbitrage.pair_tensors`) lives beside the arithmetic: this module imports
none of the strategy modules, so the imports run one way (strategy module -> params).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from nexlify.errors import InputError

HOURS_PER_YEAR = 8760.0  # 365 days; leap days are ignored (Aave's SECONDS_PER_YEAR is 365 days too)
# Names the environment's layout (nexlify.env.layout) shares with the strategy modules, kept here so the
# layout can be read without importing torch (the report page reads it in the controller process):
NO_LOT = -1  # staking: release_bar of a (episode, pair) with nothing unbonding
SPREAD_FEATURE = "spread_coinbase_usd_vs_binance_usdt_bps"  # arbitrage: includes USDT/USD drift (its module doc)


# ------------------------------------------------------------------------------------------------
# Staking


@dataclass(frozen=True)
class StakedAsset:
    """How one coin stakes: its effective annual yield, how often rewards are credited, and how long
    unstaked coins take to come back."""

    apy: float
    compounds_per_year: float
    unbonding_hours: float
    source: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.apy) and -1.0 < self.apy < 10.0):
            raise InputError(f"staking apy {self.apy!r} is out of range; accepted: a fraction in (-1, 10), "
                             "e.g. 0.03 for 3% a year")
        if not (math.isfinite(self.compounds_per_year) and self.compounds_per_year > 0):
            raise InputError(f"staking compounds_per_year {self.compounds_per_year!r} is invalid; "
                             "accepted: a positive number (365 = daily, 8760 / 48 = every 2 days)")
        if not (math.isfinite(self.unbonding_hours) and self.unbonding_hours >= 0):
            raise InputError(f"staking unbonding_hours {self.unbonding_hours!r} is invalid; "
                             "accepted: hours >= 0")

    @property
    def compounding_hours(self) -> float:
        return HOURS_PER_YEAR / self.compounds_per_year


def default_staking_assets() -> dict[str, StakedAsset]:
    # Sources, dates and reasoning: see the StakingParams docstring.
    return {
        "ETH": StakedAsset(apy=0.02839, compounds_per_year=365.0, unbonding_hours=120.0,
                           source="Lido staking APR 7d MA ~2.8%, late May 2025 (Lido query on Flipside); daily rebase"),
        "SOL": StakedAsset(apy=0.065, compounds_per_year=HOURS_PER_YEAR / 48.0, unbonding_hours=54.0,
                           source="Solana base staking APY ~6.5%, 2025 (starke.finance, data of 2025-08-13)"),
    }


@dataclass(frozen=True)
class StakingParams:
    """Per-asset staking terms, keyed by base coin. A coin with no entry cannot be staked: BTC has no
    native staking and gets none by default. Every value is an assumption with a date, not a live rate.

    ETH, via Lido stETH:
    - apy 0.02839: Lido's published staking APR (7-day moving average, net of Lido's 10% fee) was
      2.80-2.85% over 2025-05-25 .. 2025-06-03 (Lido's "Lido Staking User APR 7days MA" query,
      flipsidecrypto.xyz/lidofinance). ASSUMPTION: APR 2.8%; stETH rebases once a day, so
      APY = (1 + 0.028/365)**365 - 1 = 0.02839.
    - compounds_per_year 365: rewards accrue per beacon-chain epoch (~6.4 min) but reach stETH
      holders at the daily rebase.
    - unbonding_hours 120 (ASSUMPTION): 5 days for a Lido withdrawal request to be finalised and
      claimable; it depends on the validator exit queue, ~1-5 days for most of 2024-25.

    SOL, native delegation:
    - apy 0.065: base staking APY ~6.5% in 2025, 7.19% with MEV tips (starke.finance, "Solana
      Staking Percentage: Metrics & Analysis", data as of 2025-08-13: inflation ~4.4%, 67% of supply
      staked; inflation falls 15% a year towards 1.5%, solana.com/staking). ASSUMPTION: 6.5%, MEV
      left out because only some validators pass it through.
    - compounds_per_year 8760 / 48: rewards are paid and auto-compounded once per epoch, "approximately
      every 2 days" (docs.stake.fish, Solana inflation rewards); an epoch is 432,000 slots at
      0.40-0.45 s = 48-54 h, and compounding uses the nominal 48 h.
    - unbonding_hours 54 (ASSUMPTION): deactivation completes at the next epoch boundary, at most
      one epoch later; we take the conservative end, 432,000 slots * 0.45 s = 54 h.

    How the environment's actions use them (not protocol terms, our choices):
    - stake_fraction 1.0: a STAKE action stakes this fraction of the slot's free (sellable) coins.
    - unstake_fraction 1.0: an UNSTAKE action starts unbonding this fraction of the staked coins.
    """

    assets: Mapping[str, StakedAsset] = field(default_factory=default_staking_assets)
    stake_fraction: float = 1.0
    unstake_fraction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("stake_fraction", "unstake_fraction"):
            fraction = getattr(self, name)
            if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
                raise InputError(f"staking {name} {fraction!r} is out of range; accepted: a fraction in (0, 1]")

    def asset(self, base: str) -> StakedAsset | None:
        return self.assets.get(base.upper())


def base_of(pair: str) -> str:
    """"ETH/USDT" -> "ETH"."""
    return pair.split("/")[0].strip().upper()



# ------------------------------------------------------------------------------------------------
# Uniswap V3

# The fee tiers Uniswap V3 pools exist at on Ethereum (0.01%, 0.05%, 0.3%, 1%).
FEE_TIERS = (0.0001, 0.0005, 0.003, 0.01)


@dataclass(frozen=True)
class LPParams:
    """Assumptions of the liquidity-providing strategy; each value's source or reasoning is given.

    - fee_tier 0.0005: the 0.05% tier, where the deepest ETH/stablecoin pools on Ethereum trade.
      Accepted: one of Uniswap V3's tiers, 0.0001 / 0.0005 / 0.003 / 0.01.
    - range_width 0.10: the position's range is +-10% around the price at opening (0.05 and 0.25
      are the other widths we study). Accepted: 0 < width < 1.
    - dex_volume_share 0.10 (ASSUMPTION): the pool's volume as a fraction of the Binance candle's
      volume. Anchor: CoinGecko's DEX-to-CEX spot volume ratio, ~10% in March 2024, 0.13 in Q1 2025
      and 0.23 in Q2 2025 (CoinGecko Q2 2025 crypto industry report, July 2025; CoinGecko/DefiLlama
      study, Nov 2025: 6% in 2021 -> 21.2% in 2025). That ratio covers all DEXes and pairs, so using
      it for one pool against one Binance pair is a rough stand-in, kept at the low end on purpose.
    - pool_tvl_usd 50e6 and pool_range_width 0.10 (ASSUMPTION): the pool's other liquidity, $50M
      spread like one position over +-10% around the price; our share of fees is L / (L + its L).
    - Gas (chain ASSUMPTION: Ethereum mainnet): gas used by Uniswap's NonfungiblePositionManager from
      its gas snapshots (Uniswap/v3-periphery, test/__snapshots__/NonfungiblePositionManager.spec.ts.snap:
      "mint gas first mint for ticks" 434,903; "multicall exit gas" = decreaseLiquidity + collect +
      burn 178,028), at gas_price_gwei 5 (ASSUMPTION: a typical mainnet base + priority fee in
      2024-25 outside congestion spikes) and eth_usd_for_gas 2,500 (ASSUMPTION: ETH around
      2,500 USD in the first half of 2025; the bundled data ends at ~2,500 in May 2025). That makes
      an open ~5.44 USD and a close ~2.23 USD. On an L2 such as Arbitrum both would be cents.
    - max_gas_share 0.02 (the environment's rule, so that the fixed gas can never eat a position or
      drive equity to zero): an LP action is valid only while its gas is at most this share of the
      value it moves. Opening pays the mint now and the burn later, so a position needs at least
      `min_notional_usd` = (gas open + gas close) / max_gas_share (383.1 USD at the defaults: gas of a
      round trip then costs at most 2%, about 7x a spot round trip's 0.3% of fees and slippage, and
      the smallest position fits in the 5% per-trade cap of the 10,000 USD starting equity); a smaller
      sized position is sized up to it when the per-trade cap allows, else LP_OPEN is masked. A close
      needs the position (accrued fees included, at the last close) worth at least
      `min_close_value_usd` = gas close / max_gas_share (111.3 USD); below it LP_CLOSE is masked and
      the position waits (its value still counts in equity).
    """

    fee_tier: float = 0.0005
    range_width: float = 0.10
    dex_volume_share: float = 0.10
    pool_tvl_usd: float = 50_000_000.0
    pool_range_width: float = 0.10
    gas_units_open: float = 434_903.0
    gas_units_close: float = 178_028.0
    gas_price_gwei: float = 5.0
    eth_usd_for_gas: float = 2_500.0
    max_gas_share: float = 0.02

    def __post_init__(self) -> None:
        if not any(math.isclose(self.fee_tier, tier, rel_tol=0, abs_tol=1e-12) for tier in FEE_TIERS):
            raise InputError(f"LP fee_tier {self.fee_tier!r} is not a Uniswap V3 fee tier; accepted: "
                             + ", ".join(str(t) for t in FEE_TIERS))
        for name in ("range_width", "pool_range_width"):
            width = getattr(self, name)
            if not (math.isfinite(width) and 0.0 < width < 1.0):
                raise InputError(f"LP {name} {width!r} is out of range; accepted: 0 < width < 1 "
                                 "(0.10 = +-10% around the price)")
        if not (math.isfinite(self.dex_volume_share) and self.dex_volume_share > 0):
            raise InputError(f"LP dex_volume_share {self.dex_volume_share!r} is invalid; accepted: a positive "
                             "fraction of the candle's volume, e.g. 0.1")
        for name in ("pool_tvl_usd", "gas_units_open", "gas_units_close", "gas_price_gwei", "eth_usd_for_gas"):
            number = getattr(self, name)
            if not (math.isfinite(number) and number >= 0):
                raise InputError(f"LP {name} {number!r} is invalid; accepted: a number >= 0")
        if not (math.isfinite(self.max_gas_share) and 0.0 < self.max_gas_share <= 1.0):
            raise InputError(f"LP max_gas_share {self.max_gas_share!r} is out of range; accepted: a fraction in "
                             "(0, 1], e.g. 0.02 for gas of at most 2% of the position")

    @property
    def min_notional_usd(self) -> float:
        """The smallest position LP_OPEN may open: its round trip's gas is at most max_gas_share of it."""
        return (self.gas_usd_open + self.gas_usd_close) / self.max_gas_share

    @property
    def min_close_value_usd(self) -> float:
        """The smallest position value (fees included) LP_CLOSE may withdraw: its gas is at most max_gas_share."""
        return self.gas_usd_close / self.max_gas_share

    @property
    def gas_usd_open(self) -> float:
        return self.gas_units_open * self.gas_price_gwei * 1e-9 * self.eth_usd_for_gas

    @property
    def gas_usd_close(self) -> float:
        return self.gas_units_close * self.gas_price_gwei * 1e-9 * self.eth_usd_for_gas


# ------------------------------------------------------------------------------------------------
# Aave


@dataclass(frozen=True)
class AaveParams:
    """Aave V3 Ethereum Core market, USDT reserve, as in force in April-May 2025 (the end of our data).

    - optimal_usage_ratio 0.92: the Ethereum Core stablecoin kink. A public security review of Aave
      v3.4 (early 2025) sets up its test with the "current IRS config used for USDC on mainnet:
      optimalUsageRatio 92_00, base 0, slope1 5_50, slope2 35_00", and USDT's kink was reported at
      92% when a withdrawal pushed its utilization to 92.83% (Lookonchain, Nov 2025). We found no
      dated snapshot of USDT's own ratio for May 2025; 0.92 is inferred from these two.
    - base_variable_borrow_rate 0.
    - variable_rate_slope1 0.065: "[ARFC] Stablecoin Interest Rate Curve Update - 03.04.2025"
      (governance.aave.com/t/21269, April 2025): Aave V3 Ethereum Core USDT slope1 9.50% -> 6.50%.
      It stayed there until Chaos Labs raised stablecoin slope1 by 100 bps in August 2025.
    - variable_rate_slope2 0.35: AIP "Increase Borrow Slope1 to all Stablecoins across all Aave
      Instances" (vote.onaave.com proposal 216, Dec 2024): Ethereum V3 Core USDT slope2 75% -> 35%;
      cut to 22.5% on 2025-06-05 (Chaos Labs Risk Stewards, governance.aave.com/t/22279), after our data.
    - reserve_factor 0.10: "Add USDT to Aave Ethereum V3 pool" (aave/aip, USDTETHV3.md, 2023-02-07),
      reserve factor 10%; we found no later change to it.
    - utilization 0.80 (ASSUMPTION for the constant path): Chaos Labs (governance.aave.com/t/22930,
      2025-08-14): "USDT's utilization has stayed above 80% for most of the time" over the past
      month; in April 2025 stablecoin utilization was below the 92% kink (LlamaRisk, t/21269).
      At 0.80 the supply rate is 0.065 * 0.80/0.92 * 0.80 * 0.90 = 4.07% a year.
    - utilization_csv: optional path of a `timestamp,utilization` CSV to use instead of the constant.
    - max_idle_share 0.85 (the environment's rule, not Aave's): a LEND action tops the portfolio's Aave
      supply up to this share of its idle USDT (cash plus supply; supplying USDT costs no fee in the
      model), whatever the per-trade size, which caps risk trades only. The rest stays cash: 0.15 =
      max_trades 3 x max_position 0.05 of the guide's risk defaults, so the risk trades can open at
      full size without a withdrawal first.
    - sweep True (the environment's rule): idle USDT is swept into Aave every bar, as a broker's cash sweep
      does: after the bar's entries the supply is set to max_idle_share of the idle USDT (topped up, or
      withdrawn down to it when entries used the cash buffer), in equal sub-accounts per slot; LEND and
      WITHDRAW are then masked. Without it the agent lends by hand with LEND and WITHDRAW. Why the default:
      the interest on one bar (about 4e-6 of equity) is far below a learner's Q noise, so a learner left to
      lend by hand churned in and out of the supply and gave up a third of the lending return
      (docs/studies.md).
    """

    optimal_usage_ratio: float = 0.92
    base_variable_borrow_rate: float = 0.0
    variable_rate_slope1: float = 0.065
    variable_rate_slope2: float = 0.35
    reserve_factor: float = 0.10
    utilization: float = 0.80
    utilization_csv: str | None = None
    max_idle_share: float = 0.85
    sweep: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.optimal_usage_ratio) and 0.0 < self.optimal_usage_ratio < 1.0):
            raise InputError(f"aave optimal_usage_ratio {self.optimal_usage_ratio!r} is out of range; "
                             "accepted: 0 < ratio < 1, e.g. 0.92")
        for name in ("base_variable_borrow_rate", "variable_rate_slope1", "variable_rate_slope2"):
            rate = getattr(self, name)
            if not (math.isfinite(rate) and 0.0 <= rate <= 10.0):
                raise InputError(f"aave {name} {rate!r} is out of range; accepted: an annual rate in [0, 10]")
        for name in ("reserve_factor", "utilization", "max_idle_share"):
            fraction = getattr(self, name)
            if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
                raise InputError(f"aave {name} {fraction!r} is out of range; accepted: a fraction in [0, 1]")


# ------------------------------------------------------------------------------------------------
# Arbitrage


def _default_withdrawal_fees() -> dict[str, float]:
    return {"BTC": 0.0005, "ETH": 0.00168, "SOL": 0.01}  # coin units; sources in ArbParams


def _default_delays() -> dict[str, float]:
    return {"BTC": 1.0, "ETH": 0.25, "SOL": 0.1}  # hours; reasoning in ArbParams


@dataclass(frozen=True)
class ArbParams:
    """Costs and limits of cross-exchange arbitrage.

    - taker_fee_a 0.001: Binance spot, regular (VIP 0) account, taker 0.10% (maker 0.10%), before
      the 25% discount for paying fees in BNB (binance.com/en/fee/trading; restated in Binance
      Square posts of 2025).
    - taker_fee_b 0.006: Coinbase Advanced (help.coinbase.com/en/coinbase/trading-and-funding/
      advanced-trade/advanced-trade-fees: maker-taker fees by trailing 30-day USD volume). 0.60%
      taker / 0.40% maker is the lowest-volume tier ($0-10K) of the 2023-24 table as we recall it;
      the stored copy of that page omits its table, so this figure is NOT verified against a dated
      copy. CAUTION: a later table (API Evangelist's copy of the page, May 2026) starts with
      "Intro 1" (under $1K a month) at 1.20% taker / 0.60% maker. Set 0.012 for a very small account.
    - withdrawal_fee_units, fixed per withdrawal in coin units, set by Binance and changed with network
      conditions: BTC (Bitcoin network) 0.0005 BTC and ETH (ERC-20) 0.00168 ETH, as summarised from
      Binance's withdrawal-fee page in 2025 (do-binance.com, "withdraw fee calculation"); SOL (Solana
      network) 0.01 SOL is an ASSUMPTION, no dated published figure found.
    - rebalance_delay_hours (ASSUMPTIONS, block times plus exchange processing and confirmation
      waits): BTC 1 h (a few 10-minute blocks), ETH 0.25 h (~64 blocks of 12 s to finality), SOL
      0.1 h. `arbitrage.pair_tensors` rounds them up to whole bars.
    - rebalance_notional_usd 25,000 (ASSUMPTION): one coin transfer per 25,000 USD of arbitrage
      volume; e.g. BTC at 100,000: 0.0005 * 100,000 / 25,000 = 20 bps per trade.
    - min_edge_bps 5 (ASSUMPTION): safety buffer for slippage and the fills not being simultaneous.
    - max_notional_usd 10,000 (ASSUMPTION): largest arbitrage per (episode, pair) and bar.
    - rebalance_below 0.10 (ASSUMPTION, the environment's policy): after an arbitrage, the inventory is
      rebalanced (coins withdrawn to the venue short of them, at the withdrawal fee, arriving after the
      delay; quote moved at par) when a venue holds no more than this fraction of the book's coins or
      quote. Small books pay the fixed fee on small transfers; relying on the spread to flip back keeps
      transfers rare. 0 = only once a venue has run out.
    - max_withdrawal_share 0.02 (the environment's rule, so that the fixed withdrawal fee stays in
      proportion): a book is funded only when one withdrawal fee at the decision bar's close is at most
      this share of the book (`min_book_usd` = fee units * close / max_withdrawal_share: at the defaults
      ~75 USD for SOL at 150, ~210 USD for ETH at 2,500, 2,500 USD for BTC at 100,000). A smaller sized
      book is sized up to it when the per-trade cap allows, else funding is masked (a BTC book does not
      fit the 5% cap of 10,000 USD: a 500 USD book would pay 10% of itself per rebalance).
    """

    taker_fee_a: float = 0.001
    taker_fee_b: float = 0.006
    withdrawal_fee_units: Mapping[str, float] = field(default_factory=_default_withdrawal_fees)
    rebalance_delay_hours: Mapping[str, float] = field(default_factory=_default_delays)
    rebalance_notional_usd: float = 25_000.0
    min_edge_bps: float = 5.0
    max_notional_usd: float = 10_000.0
    rebalance_below: float = 0.10
    max_withdrawal_share: float = 0.02

    def __post_init__(self) -> None:
        for name in ("taker_fee_a", "taker_fee_b"):
            fee = getattr(self, name)
            if not (math.isfinite(fee) and 0.0 <= fee < 0.1):
                raise InputError(f"arbitrage {name} {fee!r} is out of range; accepted: a fraction in [0, 0.1), "
                                 "e.g. 0.001 for 0.10%")
        for coin, fee in self.withdrawal_fee_units.items():
            if not (math.isfinite(fee) and fee >= 0):
                raise InputError(f"arbitrage withdrawal fee for {coin} {fee!r} is invalid; accepted: coin units >= 0")
        for coin, hours in self.rebalance_delay_hours.items():
            if not (math.isfinite(hours) and hours >= 0):
                raise InputError(f"arbitrage rebalance delay for {coin} {hours!r} is invalid; accepted: hours >= 0")
        for name in ("rebalance_notional_usd", "max_notional_usd"):
            number = getattr(self, name)
            if not (math.isfinite(number) and number > 0):
                raise InputError(f"arbitrage {name} {number!r} is invalid; accepted: a positive amount of USD")
        if not (math.isfinite(self.rebalance_below) and 0.0 <= self.rebalance_below < 0.5):
            raise InputError(f"arbitrage rebalance_below {self.rebalance_below!r} is out of range; accepted: a "
                             "fraction in [0, 0.5)")
        if not (math.isfinite(self.max_withdrawal_share) and 0.0 < self.max_withdrawal_share <= 1.0):
            raise InputError(f"arbitrage max_withdrawal_share {self.max_withdrawal_share!r} is out of range; "
                             "accepted: a fraction in (0, 1], e.g. 0.02")
        if not (math.isfinite(self.min_edge_bps) and self.min_edge_bps >= 0):
            raise InputError(f"arbitrage min_edge_bps {self.min_edge_bps!r} is invalid; accepted: bps >= 0")

    @property
    def min_edge(self) -> float:
        return self.min_edge_bps * 1e-4


# ------------------------------------------------------------------------------------------------
# All of them


@dataclass(frozen=True)
class StrategyParams:
    """The parameters of every strategy beyond spot, as the environment takes them (built from a
    TrainConfig by `nexlify.config.TrainConfig.strategy_params`)."""

    staking: StakingParams = field(default_factory=StakingParams)
    lp: LPParams = field(default_factory=LPParams)
    aave: AaveParams = field(default_factory=AaveParams)
    arbitrage: ArbParams = field(default_factory=ArbParams)
