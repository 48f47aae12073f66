"""TrainConfig: everything one training run needs, with its defaults written once.

The same fields are CLI flags (`--stop-loss 0.02`), YAML keys (nested `risk: {stop_loss: 0.02}` or flat
`stop_loss: 0.02`), Helm values (`pipeline.risk.stop_loss`) and the `config` stored in every checkpoint
and summary. Risk defaults are the original guide's seed values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from nexlify.configtools import section, setting
from nexlify.errors import InputError
from nexlify.strategies.params import (
    FEE_TIERS, AaveParams, ArbParams, LPParams, StakedAsset, StakingParams, StrategyParams, default_staking_assets,
)

DEFAULT_PAIRS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
# spot: long trades; staking: stake held coins; lp: Uniswap V3 liquidity; lending: Aave USDT supply;
# arbitrage: Binance (USDT) vs a second venue (USD). See nexlify.env.batched for the actions.
ALL_STRATEGIES = ("spot", "staking", "lp", "lending", "arbitrage")


@dataclass
class DataConfig:
    exchange: str = setting("binance", "exchange whose candles are used (file prefix in --data-dir)")
    pairs: list[str] = setting(DEFAULT_PAIRS, "pairs to trade, e.g. BTC/USDT ETH/USDT")
    timeframe: str = setting("1h", "candle timeframe", choices=("1h",))
    data_dir: str | None = setting(None, "folder of <exchange>_<BASE>-<QUOTE>_<tf> candle files (.csv.gz, .csv or "
                                   ".parquet); none = bundled sample")
    start: str = setting("2023-06-01", "first day of the data window (UTC date, inclusive)")
    end: str = setting("2025-06-01", "end of the data window (UTC date, exclusive); fixed, never 'now'")
    val_days: int = setting(90, "validation window: the last N days before the test window", lo=1, hi=3650)
    test_days: int = setting(0, "held-out test window at the very end, never used for selection (0 = none)", lo=0,
                               hi=3650)

    def check(self) -> None:
        """Pairs in their canonical spelling (btc/usdt, BTC-USDT: BTC/USDT) before anything hashes or compares
        the config, so one pipeline has one config whatever the spelling typed."""
        from nexlify.data.candles import normalize_pair

        self.pairs = [normalize_pair(p) for p in self.pairs]


@dataclass
class RiskConfig:
    """Risk rules enforced by the environment. A fraction of 0 switches a rule off."""

    stop_loss: float = setting(0.02, "stop-loss below entry, as a fraction (0 = off)", lo=0.0, hi=1.0, hi_open=True)
    take_profit: float = setting(0.05, "take-profit above entry, as a fraction (0 = off)", lo=0.0, hi=100.0)
    trailing_stop: float = setting(0.03, "trailing stop below the highest price since entry (0 = off)",
                                   lo=0.0, hi=1.0, hi_open=True)
    max_position: float = setting(0.05, "at most this fraction of equity per trade", lo=0.0, hi=1.0, lo_open=True)
    max_trades: int = setting(3, "at most this many concurrent open trades across all pairs", lo=1, hi=1000)
    daily_loss_limit: float = setting(0.05, "no new entries after losing this fraction of the UTC day's "
                                      "starting equity (0 = off)", lo=0.0, hi=1.0, hi_open=True)
    kelly: bool = setting(True, "size trades by half-Kelly from the agent's own closed trades (--no-kelly: fixed size)")
    kelly_fraction: float = setting(0.5, "fraction of the full Kelly bet (0.5 = half-Kelly)", lo=0.0, hi=1.0, lo_open=True)
    kelly_window: int = setting(50, "closed trades in the rolling Kelly estimate", lo=2, hi=1024)
    kelly_min_trades: int = setting(20, "closed trades needed before Kelly sizing replaces the fixed size", lo=1,
                                    hi=1024)
    kelly_floor: float = setting(0.01, "smallest Kelly size, as a fraction of equity", lo=0.0, hi=1.0)
    fixed_size: float = setting(0.05, "size before enough trades exist, and with --no-kelly (capped by max_position)",
                                lo=0.0, hi=1.0, lo_open=True)

    def check(self) -> None:
        if self.kelly_min_trades > self.kelly_window:
            raise InputError(f"--kelly-min-trades {self.kelly_min_trades} exceeds --kelly-window {self.kelly_window}; "
                             "accepted: at most the window")


@dataclass
class EnvConfig:
    initial_equity: float = setting(10_000.0, "starting equity in quote currency", lo=0.0, lo_open=True,
                                   hi=1e12)
    fee: float = setting(0.001, "exchange fee per side, as a fraction of notional", lo=0.0, hi=0.1)
    slippage_bps: float = setting(5.0, "slippage against us on every fill, in basis points", lo=0.0, hi=1000.0)
    episode_bars: int = setting(720, "bars per training episode, each from a seeded random start in the training "
                                "window (0 = the whole window, every episode the same pass)", lo=0, hi=10_000_000)
    drawdown_penalty: float = setting(0.0, "reward penalty per unit of new drawdown (0 = pure log-equity reward)", lo=0.0,
                                     hi=1000.0)
    num_envs: int = setting(256, "training episodes stepped together as one batch, each at its own random offset "
                            "(0 = all of a run's episodes, up to 1024)", lo=0, hi=65536)
    precision: str = setting("float64", "accounting precision: float64 (exact) or float32 (faster)",
                             choices=("float64", "float32"))
    strategies: list[str] = setting(list(ALL_STRATEGIES), "strategies the agent may use (the others' actions are "
                                    "masked)", choices=ALL_STRATEGIES)
    kernel: str = setting("auto", "how the environment steps: auto (on the CPU one fused numba kernel for every "
                          "strategy set, spot alone included; on a GPU tensor ops), torch (tensor ops always: the "
                          "reference) or cuda (the fused kernel's source compiled by numba-cuda, one GPU thread per "
                          "episode; needs --device cuda and the extra nexlify-train[gpu]; its speed is not yet "
                          "measured)", choices=("auto", "torch", "cuda"))

    def check(self) -> None:
        if not self.strategies:
            raise InputError("--strategies is empty; accepted: one or more of " + ", ".join(ALL_STRATEGIES))
        if "staking" in self.strategies and "spot" not in self.strategies:
            raise InputError(f"--strategies {','.join(self.strategies)}: staking stakes coins bought by spot "
                             "trades, so it needs spot; accepted: add spot, or drop staking")


# --------------------------------------------------------------------------------------------------
# Strategy parameters: each section mirrors a params dataclass of nexlify.strategies.params, whose
# docstrings give every default's source and date; the defaults are read from there (one place).


def _staking_assets_table() -> dict:
    return {coin: asdict(asset) for coin, asset in default_staking_assets().items()}


@dataclass
class StakingConfig:
    """Strategy `staking` (nexlify.strategies.staking): terms per coin and what STAKE / UNSTAKE move."""

    staking_assets: dict = setting(
        _staking_assets_table(), "per coin: apy (effective annual yield), compounds_per_year, unbonding_hours, "
        "source; the mapping replaces the whole table, and a coin absent from it cannot be staked (BTC by default)",
        cli=False)
    stake_fraction: float = setting(StakingParams.stake_fraction, "fraction of a slot's free coins a STAKE action "
                                    "stakes", lo=0.0, hi=1.0, lo_open=True)
    unstake_fraction: float = setting(StakingParams.unstake_fraction, "fraction of a slot's staked coins an UNSTAKE "
                                      "action starts unbonding", lo=0.0, hi=1.0, lo_open=True)

    def params(self) -> StakingParams:
        assets = {}
        for coin, terms in self.staking_assets.items():
            if not isinstance(terms, dict):
                raise InputError(f"staking_assets[{coin!r}] is {terms!r}; accepted: a mapping with apy, "
                                 "compounds_per_year, unbonding_hours (and optionally source)")
            unknown = set(terms) - {"apy", "compounds_per_year", "unbonding_hours", "source"}
            missing = {"apy", "compounds_per_year", "unbonding_hours"} - set(terms)
            if unknown or missing:
                raise InputError(f"staking_assets[{coin!r}]: unknown keys {sorted(unknown)}, missing keys "
                                 f"{sorted(missing)}; accepted: apy, compounds_per_year, unbonding_hours, source")
            try:
                assets[str(coin).upper()] = StakedAsset(
                    apy=float(terms["apy"]), compounds_per_year=float(terms["compounds_per_year"]),
                    unbonding_hours=float(terms["unbonding_hours"]), source=str(terms.get("source", "")))
            except (TypeError, ValueError):
                raise InputError(f"staking_assets[{coin!r}] = {terms!r}: apy, compounds_per_year and "
                                 "unbonding_hours must be numbers") from None
        return StakingParams(assets=assets, stake_fraction=self.stake_fraction, unstake_fraction=self.unstake_fraction)

    def check(self) -> None:
        self.params()


@dataclass
class LPConfig:
    """Strategy `lp`: a Uniswap V3 position on a pair against USDT (nexlify.strategies.uniswap_v3)."""

    fee_tier: float = setting(LPParams.fee_tier, "pool fee tier", choices=FEE_TIERS)
    range_width: float = setting(LPParams.range_width, "position range: +- this fraction around the price at "
                                 "opening (0.05, 0.10, 0.25 ...)", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    dex_volume_share: float = setting(LPParams.dex_volume_share, "pool volume as a fraction of the candle's volume "
                                      "(assumption)", lo=0.0, lo_open=True, hi=1000.0)
    pool_tvl_usd: float = setting(LPParams.pool_tvl_usd, "the pool's other liquidity in USD (assumption)", lo=0.0,
                                 hi=1e13)
    pool_range_width: float = setting(LPParams.pool_range_width, "the pool's liquidity is spread like one position "
                                      "over +- this fraction", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    gas_units_open: float = setting(LPParams.gas_units_open, "gas used by opening (mint)", lo=0.0, hi=1e8)
    gas_units_close: float = setting(LPParams.gas_units_close, "gas used by closing (decrease + collect + burn)",
                                     lo=0.0, hi=1e8)
    gas_price_gwei: float = setting(LPParams.gas_price_gwei, "gas price in gwei", lo=0.0, hi=1e6)
    eth_usd_for_gas: float = setting(LPParams.eth_usd_for_gas, "ETH price in USD that converts gas to USD", lo=0.0,
                                    hi=1e9)
    max_gas_share: float = setting(LPParams.max_gas_share, "an LP action's gas is at most this share of the value "
                                   "it moves: positions start at (gas open + close) / share (sized up within the "
                                   "per-trade cap, else masked), close only while worth gas close / share",
                                   lo=0.0, hi=1.0, lo_open=True)

    def params(self) -> LPParams:
        return LPParams(**asdict(self))

    def check(self) -> None:
        self.params()


@dataclass
class LendingConfig:
    """Strategy `lending`: supplying USDT to Aave V3 (nexlify.strategies.aave); USDT reserve parameters."""

    optimal_usage_ratio: float = setting(AaveParams.optimal_usage_ratio, "utilization at the kink of the rate "
                                         "curve", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    base_variable_borrow_rate: float = setting(AaveParams.base_variable_borrow_rate, "borrow rate at zero "
                                               "utilization (annual)", lo=0.0, hi=10.0)
    variable_rate_slope1: float = setting(AaveParams.variable_rate_slope1, "borrow rate slope below the kink",
                                          lo=0.0, hi=10.0)
    variable_rate_slope2: float = setting(AaveParams.variable_rate_slope2, "borrow rate slope above the kink",
                                          lo=0.0, hi=10.0)
    reserve_factor: float = setting(AaveParams.reserve_factor, "share of interest kept by the protocol",
                                    lo=0.0, hi=1.0)
    utilization: float = setting(AaveParams.utilization, "constant utilization path (assumption)", lo=0.0, hi=1.0)
    utilization_csv: str | None = setting(AaveParams.utilization_csv, "CSV timestamp,utilization (ms, fraction) "
                                          "used instead of the constant, joined as of each bar")
    max_idle_share: float = setting(AaveParams.max_idle_share, "LEND tops the Aave supply up to this share of idle "
                                    "USDT (cash plus supply), whatever the per-trade size; the rest stays cash",
                                    lo=0.0, hi=1.0)
    sweep: bool = setting(AaveParams.sweep, "sweep idle USDT into Aave every bar (the supply is kept at "
                          "max_idle_share of idle USDT; LEND and WITHDRAW are masked); false: lend by hand")

    def params(self) -> AaveParams:
        return AaveParams(**asdict(self))

    def check(self) -> None:
        self.params()


@dataclass
class ArbitrageConfig:
    """Strategy `arbitrage`: the primary exchange (USDT pairs) against a second venue quoting the same coins
    (nexlify.strategies.arbitrage). Its candles are <second_exchange>_<BASE>-<second_quote>_<tf>.csv.gz."""

    second_exchange: str = setting("coinbase", "the second venue's exchange id (file prefix)")
    second_quote: str = setting("USD", "the second venue's quote currency (USD: spreads include USDT/USD drift)")
    taker_fee_a: float = setting(ArbParams.taker_fee_a, "taker fee on the primary exchange", lo=0.0, hi=0.1,
                                 hi_open=True)
    taker_fee_b: float = setting(ArbParams.taker_fee_b, "taker fee on the second venue", lo=0.0, hi=0.1,
                                 hi_open=True)
    withdrawal_fee_units: dict = setting(dict(ArbParams().withdrawal_fee_units), "withdrawal fee per coin, in coin "
                                         "units (replaces the whole table)", cli=False)
    rebalance_delay_hours: dict = setting(dict(ArbParams().rebalance_delay_hours), "hours a transfer between the "
                                          "venues takes, per coin (replaces the whole table)", cli=False)
    rebalance_notional_usd: float = setting(ArbParams.rebalance_notional_usd, "arbitrage volume one transfer "
                                            "serves (amortises the withdrawal fee in the edge)", lo=0.0, lo_open=True,
                                            hi=1e12)
    min_edge_bps: float = setting(ArbParams.min_edge_bps, "net edge needed on top of all costs, in bps", lo=0.0,
                                 hi=10000.0)
    max_notional_usd: float = setting(ArbParams.max_notional_usd, "largest arbitrage per pair and bar, in USD",
                                      lo=0.0, lo_open=True, hi=1e12)
    rebalance_below: float = setting(ArbParams.rebalance_below, "rebalance the inventory when a venue holds at "
                                     "most this fraction of the book's coins or quote", lo=0.0, hi=0.5, hi_open=True)
    max_withdrawal_share: float = setting(ArbParams.max_withdrawal_share, "a book is funded only when one withdrawal "
                                          "fee is at most this share of it (sized up within the per-trade cap, else "
                                          "masked)", lo=0.0, hi=1.0, lo_open=True)

    def params(self) -> ArbParams:
        fields_ = asdict(self)
        fields_.pop("second_exchange")
        fields_.pop("second_quote")
        try:
            fields_["withdrawal_fee_units"] = {str(k).upper(): float(v) for k, v in self.withdrawal_fee_units.items()}
            fields_["rebalance_delay_hours"] = {str(k).upper(): float(v) for k, v in self.rebalance_delay_hours.items()}
        except (TypeError, ValueError):
            raise InputError(f"withdrawal_fee_units {self.withdrawal_fee_units!r} / rebalance_delay_hours "
                             f"{self.rebalance_delay_hours!r}: accepted: a mapping of coin to a number") from None
        return ArbParams(**fields_)

    def check(self) -> None:
        self.params()


@dataclass
class AgentConfig:
    """The learner, one network shared by all pairs: a Double DQN with a dueling head and n-step returns
    (nexlify.agent.dqn), or a forecast of the next bars' return traded with a band (nexlify.agent.forecast).
    Both decide by the same greedy rule with the hold margin."""

    algorithm: str = setting("forecast", "the learner: dqn (Q-values learned from the environment's rewards) or forecast "
                             "(the return over forecast_horizon bars learned from the candles, stopped early on the "
                             "training window's last forecast_holdout_days, traded long while it beats the hold "
                             "margin; it does not use the episodes, exploration or replay settings)",
                             choices=("dqn", "forecast"))
    hidden: int = setting(64, "units per hidden layer", lo=8, hi=4096)
    gamma: float = setting(0.9, "discount per bar: 0.9 weighs about the next ten bars, long enough for an edge held "
                           "for hours to pay a round trip's costs; 0.99 buried edges of that size in the noise of a "
                           "hundred bars (docs/planted-edges.md)", lo=0.0, hi=1.0)
    n_step: int = setting(6, "n-step return length: rewards summed before the target network's estimate is used",
                          lo=1, hi=64)
    learning_rate: float = setting(5e-4, "Adam learning rate", lo=0.0, lo_open=True, hi=1.0)
    batch_size: int = setting(1024, "transitions per gradient step", lo=1, hi=65536)
    buffer_size: int = setting(200_000, "replay capacity in transitions (one per pair and episode and bar)", lo=1,
                               hi=100_000_000)
    learning_starts: int = setting(5_000, "transitions collected before the first gradient step", lo=0,
                                   hi=100_000_000)
    train_every: int = setting(1, "batched environment steps per gradient step", lo=1, hi=100_000)
    target_update: int = setting(250, "gradient steps between target-network copies", lo=1, hi=10_000_000)
    grad_clip: float = setting(10.0, "max gradient norm", lo=0.0, lo_open=True, hi=1e6)
    eps_start: float = setting(1.0, "initial exploration rate of a fresh run", lo=0.0, hi=1.0)
    eps_end: float = setting(0.05, "final exploration rate", lo=0.0, hi=1.0)
    eps_continue: float = setting(0.2, "initial exploration rate of a run that continues from a checkpoint",
                                  lo=0.0, hi=1.0)
    eps_decay_fraction: float = setting(0.5, "fraction of the run over which epsilon decays linearly",
                                        lo=0.0, hi=1.0, lo_open=True)
    hold_margin: float = setting(0.02, "the greedy policy (validation, selection, evaluate, backtest, report) takes "
                                 "its best valid action only when that action's Q-value beats hold's by at least "
                                 "this, in the rewards' units (percent of equity at reward_scale 100), else it holds: "
                                 "a guard against trading on noise in the Q-values (0 = plain argmax; training's "
                                 "exploration and targets never use it)", lo=0.0, hi=1e6)
    forecast_horizon: int = setting(8, "forecast: bars from the next open over which the return is forecast (8 "
                                    "captured more of every planted edge than 4: docs/planted-edges.md)", lo=1, hi=720)
    forecast_holdout_days: int = setting(90, "forecast: the training window's last days (at most its last third), on "
                                         "which the fit is stopped early before it is refitted on the whole window",
                                         lo=1, hi=3650)
    forecast_min_t: float = setting(2.0, "forecast: the fit trades only when its early-stopped weights forecast the "
                                    "holdout better than forecasting zero by at least this t-statistic (Newey-West over "
                                    "the horizon); else its forecast is set to zero and the policy holds cash, lent: a "
                                    "fit that cannot show an edge on unseen days invents none (0 = always trade the fit)",
                                    lo=0.0, hi=100.0)
    forecast_members: int = setting(5, "forecast: networks fitted side by side from their own random starts and "
                                    "batches, their forecasts averaged (the holdout gate and the policy read the "
                                    "average; 5 captured more of every planted edge than 1: docs/planted-edges.md); "
                                    "1 = a single network", lo=1, hi=64)
    forecast_batch_size: int = setting(256, "forecast: rows (bar and pair) per gradient step", lo=1, hi=65536)
    forecast_eval_every: int = setting(50, "forecast: gradient steps between two measurements of the holdout loss",
                                       lo=1, hi=1_000_000)
    forecast_patience: int = setting(10, "forecast: measurements without a lower holdout loss before the fit stops",
                                     lo=1, hi=100_000)
    forecast_max_steps: int = setting(5000, "forecast: at most this many gradient steps before the refit", lo=0,
                                      hi=10_000_000)
    reward_scale: float = setting(100.0, "the learner's rewards are the environment's (log-equity change per slot) "
                                  "times this: 100 puts them in percent of equity, so that Q-values of a few "
                                  "tenths separate instead of hiding in float noise at 1e-4", lo=0.0, lo_open=True,
                                  hi=1e6)


@dataclass
class TrainConfig:
    data: DataConfig = section(DataConfig)
    env: EnvConfig = section(EnvConfig)
    risk: RiskConfig = section(RiskConfig)
    agent: AgentConfig = section(AgentConfig)
    staking: StakingConfig = section(StakingConfig)
    lp: LPConfig = section(LPConfig)
    lending: LendingConfig = section(LendingConfig)
    arbitrage: ArbitrageConfig = section(ArbitrageConfig)
    device: str = setting("auto", "torch device: auto picks cuda when present", choices=("auto", "cpu", "cuda"))
    threads: int = setting(1, "torch CPU threads per run (small networks run fastest on one); a Kubernetes worker uses its CPU request instead", lo=1, hi=256)

    def strategy_params(self) -> StrategyParams:
        """The strategy sections as the environment takes them (validated: InputError on a bad value)."""
        return StrategyParams(staking=self.staking.params(), lp=self.lp.params(), aave=self.lending.params(),
                              arbitrage=self.arbitrage.params())
