"""TrainConfig: everything one training run needs, with its defaults written once.

The same fields are CLI flags (`--stop-loss 0.02`), YAML keys (nested `risk: {stop_loss: 0.02}` or flat
`stop_loss: 0.02`), Helm values (`pipeline.risk.stop_loss`) and the `config` stored in every checkpoint
and summary. Risk defaults are the original guide's seed values.
"""

from __future__ import annotations

from dataclasses import dataclass

from nexlify.configtools import section, setting
from nexlify.errors import InputError

DEFAULT_PAIRS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
ALL_STRATEGIES = ("spot",)  # issue 6 adds staking, lp, lending, arbitrage


@dataclass
class DataConfig:
    exchange: str = setting("binance", "exchange whose candles are used (file prefix in --data-dir)")
    pairs: list[str] = setting(DEFAULT_PAIRS, "pairs to trade, e.g. BTC/USDT ETH/USDT")
    timeframe: str = setting("1h", "candle timeframe", choices=("1h",))
    data_dir: str | None = setting(None, "folder of <exchange>_<BASE>-<QUOTE>_<tf>.csv.gz files; none = bundled sample")
    start: str = setting("2023-06-01", "first day of the data window (UTC date, inclusive)")
    end: str = setting("2025-06-01", "end of the data window (UTC date, exclusive); fixed, never 'now'")
    val_days: int = setting(90, "validation window: the last N days before the test window", lo=1)
    test_days: int = setting(0, "held-out test window at the very end, never used for selection (0 = none)", lo=0)


@dataclass
class RiskConfig:
    """Risk rules enforced by the environment. A fraction of 0 switches a rule off."""

    stop_loss: float = setting(0.02, "stop-loss below entry, as a fraction (0 = off)", lo=0.0, hi=1.0, hi_open=True)
    take_profit: float = setting(0.05, "take-profit above entry, as a fraction (0 = off)", lo=0.0)
    trailing_stop: float = setting(0.03, "trailing stop below the highest price since entry (0 = off)",
                                   lo=0.0, hi=1.0, hi_open=True)
    max_position: float = setting(0.05, "at most this fraction of equity per trade", lo=0.0, hi=1.0, lo_open=True)
    max_trades: int = setting(3, "at most this many concurrent open trades across all pairs", lo=1)
    daily_loss_limit: float = setting(0.05, "no new entries after losing this fraction of the UTC day's "
                                      "starting equity (0 = off)", lo=0.0, hi=1.0, hi_open=True)
    kelly: bool = setting(True, "size trades by half-Kelly from the agent's own closed trades (--no-kelly: fixed size)")
    kelly_fraction: float = setting(0.5, "fraction of the full Kelly bet (0.5 = half-Kelly)", lo=0.0, hi=1.0, lo_open=True)
    kelly_window: int = setting(50, "closed trades in the rolling Kelly estimate", lo=2, hi=1024)
    kelly_min_trades: int = setting(20, "closed trades needed before Kelly sizing replaces the fixed size", lo=1)
    kelly_floor: float = setting(0.01, "smallest Kelly size, as a fraction of equity", lo=0.0, hi=1.0)
    fixed_size: float = setting(0.05, "size before enough trades exist, and with --no-kelly (capped by max_position)",
                                lo=0.0, hi=1.0, lo_open=True)

    def check(self) -> None:
        if self.kelly_min_trades > self.kelly_window:
            raise InputError(f"--kelly-min-trades {self.kelly_min_trades} exceeds --kelly-window {self.kelly_window}; "
                             "accepted: at most the window")


@dataclass
class EnvConfig:
    initial_equity: float = setting(10_000.0, "starting equity in quote currency", lo=0.0, lo_open=True)
    fee: float = setting(0.001, "exchange fee per side, as a fraction of notional", lo=0.0, hi=0.1)
    slippage_bps: float = setting(5.0, "slippage against us on every fill, in basis points", lo=0.0, hi=1000.0)
    episode_bars: int = setting(0, "bars per training episode from a seeded random start (0 = one full pass)", lo=0)
    drawdown_penalty: float = setting(0.0, "reward penalty per unit of new drawdown (0 = pure log-equity reward)", lo=0.0)
    num_envs: int = setting(0, "training episodes stepped together as one batch (0 = all of a run's episodes, "
                            "up to 1024)", lo=0, hi=65536)
    precision: str = setting("float64", "accounting precision: float64 (exact) or float32 (faster)",
                             choices=("float64", "float32"))
    strategies: list[str] = setting(["spot"], "strategies the agent may use", choices=ALL_STRATEGIES)


@dataclass
class AgentConfig:
    """Double DQN with a dueling head and n-step returns, one network shared by all pairs."""

    hidden: int = setting(64, "units per hidden layer", lo=8, hi=4096)
    gamma: float = setting(0.99, "discount per bar", lo=0.0, hi=1.0)
    n_step: int = setting(3, "n-step return length", lo=1, hi=64)
    learning_rate: float = setting(5e-4, "Adam learning rate", lo=0.0, lo_open=True)
    batch_size: int = setting(256, "transitions per gradient step", lo=1)
    buffer_size: int = setting(200_000, "replay capacity in transitions (one per pair and episode and bar)", lo=1)
    learning_starts: int = setting(5_000, "transitions collected before the first gradient step", lo=0)
    train_every: int = setting(2, "batched environment steps per gradient step", lo=1)
    target_update: int = setting(500, "gradient steps between target-network copies", lo=1)
    grad_clip: float = setting(10.0, "max gradient norm", lo=0.0, lo_open=True)
    eps_start: float = setting(1.0, "initial exploration rate of a fresh run", lo=0.0, hi=1.0)
    eps_end: float = setting(0.05, "final exploration rate", lo=0.0, hi=1.0)
    eps_continue: float = setting(0.2, "initial exploration rate of a run that continues from a checkpoint",
                                  lo=0.0, hi=1.0)
    eps_decay_fraction: float = setting(0.5, "fraction of the run over which epsilon decays linearly",
                                        lo=0.0, hi=1.0, lo_open=True)


@dataclass
class TrainConfig:
    data: DataConfig = section(DataConfig)
    env: EnvConfig = section(EnvConfig)
    risk: RiskConfig = section(RiskConfig)
    agent: AgentConfig = section(AgentConfig)
    device: str = setting("auto", "torch device: auto picks cuda when present", choices=("auto", "cpu", "cuda"))
    threads: int = setting(1, "torch CPU threads per run (small networks run fastest on one)", lo=1, hi=256)
