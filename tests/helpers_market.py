"""Hand-made markets for the environment tests: a few OHLC bars written out by hand, so that every fill,
fee, stop and equity value a test expects can be computed on paper.

`make_market` builds a `MarketTensors` directly (features are zeros: the environment only indexes them),
`make_env` wraps it in a one-episode `BatchedTradingEnv`, and `quiet_risk` is a RiskConfig with every rule
switched off, to which a test adds only the rule it checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from nexlify.config import EnvConfig, RiskConfig
from nexlify.data.candles import load_market
from nexlify.data.second_venue import load_second_venue
from nexlify.data.timeframes import parse_utc_ms
from nexlify.env import fused_portfolio
from nexlify.env.batched import BatchedTradingEnv
from nexlify.env.market import MS_PER_DAY, MarketTensors, market_features
from nexlify.features import WARMUP_BARS, Normalizer
from nexlify.strategies.params import AaveParams, StrategyParams

MS_PER_HOUR = 3_600_000

Bar = Sequence[float]  # (open, high, low, close)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors run fastest on one CPU thread (as training runs do); a busy 2-core machine makes a
    second thread 10x slower. Import this fixture into a test module to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["fused", "tensor"])
def step_kernel(request, monkeypatch):
    """Runs a test on both environment steps: the fused CPU kernel (what kernel "auto" picks on a CPU) and
    the tensor step (the reference, and what a GPU runs). Import it into a test module and mark the module
    with `pytestmark = pytest.mark.usefixtures("step_kernel")`, or ask for it by name."""
    if request.param == "tensor":
        monkeypatch.setattr(fused_portfolio, "available", lambda: False)
    return request.param


def binance_with_coinbase() -> MarketTensors:
    """Real candles: BTC, ETH and SOL/USDT of the bundled sample from 2024-03-20 to 2024-06-01 with the
    Coinbase USD candles as the second venue (from 2024-04-18), features normalised on the first 1,200 bars."""
    market = load_market("binance", ["BTC/USDT", "ETH/USDT", "SOL/USDT"], start="2024-03-20", end="2024-06-01")
    market.second_venue = load_second_venue(market, "coinbase", "USD")
    raw = market_features(market)
    return MarketTensors.build(market, Normalizer.fit(raw, WARMUP_BARS, 1200), "cpu", raw)


def flat(price: float) -> tuple[float, float, float, float]:
    """A bar that opens, closes and trades at one price."""
    return (price, price, price, price)


def make_market(
    bars: Sequence[Bar] | Sequence[Sequence[Bar]],
    *,
    start: str = "2024-01-01T00:00:00Z",
    tradable: Sequence[bool] | Sequence[Sequence[bool]] | None = None,
    volume: Sequence[float] | Sequence[Sequence[float]] | None = None,
    pairs: list[str] | None = None,
    n_features: int = 3,
) -> MarketTensors:
    """Hourly bars from `start`. `bars` is [T] (o, h, l, c) tuples for one pair, or [T][P] tuples for
    several; `tradable` and `volume` follow the same layout ([T] or [T][P]); all bars tradable and
    volume 1 by default."""
    prices = np.asarray(bars, dtype=np.float64)
    if prices.ndim == 2:  # one pair
        prices = prices[:, None, :]
    if prices.ndim != 3 or prices.shape[-1] != 4:
        raise ValueError(f"bars must be [T][4] or [T][P][4], got shape {prices.shape}")
    n_bars, n_pairs, _ = prices.shape
    trad = np.ones((n_bars, n_pairs), dtype=bool) if tradable is None else np.asarray(tradable, dtype=bool)
    vol = np.ones((n_bars, n_pairs)) if volume is None else np.asarray(volume, dtype=np.float64)
    trad = trad.reshape(n_bars, n_pairs)
    vol = vol.reshape(n_bars, n_pairs)
    t0 = parse_utc_ms(start, "start")
    timestamps = t0 + MS_PER_HOUR * np.arange(n_bars, dtype=np.int64)
    return MarketTensors(
        pairs=pairs or [f"P{i}/USDT" for i in range(n_pairs)],
        timestamps=timestamps,
        prices=torch.as_tensor(prices),
        volume=torch.as_tensor(vol),
        tradable=torch.as_tensor(trad),
        features=torch.zeros((n_bars, n_pairs, n_features), dtype=torch.float32),
        day=torch.as_tensor(timestamps // MS_PER_DAY),
    )


def quiet_risk(**overrides) -> RiskConfig:
    """Every risk rule off and a fixed size of 50% of equity; `overrides` switch on what a test checks."""
    values = dict(stop_loss=0.0, take_profit=0.0, trailing_stop=0.0, daily_loss_limit=0.0, kelly=False,
                  max_position=0.5, fixed_size=0.5, max_trades=3)
    values.update(overrides)
    return RiskConfig(**values)


def costless_env(**overrides) -> EnvConfig:
    """No fee, no slippage, 10,000 of equity: prices on paper are fill prices."""
    values = dict(fee=0.0, slippage_bps=0.0, initial_equity=10_000.0)
    values.update(overrides)
    return EnvConfig(**values)


# The hand-computed spot tests: every strategy available, none acting unasked (the Aave sweep, which lends
# idle cash without being asked, is off; tests of the sweep switch it on).
NO_SWEEP = StrategyParams(aave=AaveParams(sweep=False))


def make_env(market: MarketTensors, risk_cfg: RiskConfig, env_cfg: EnvConfig | None = None, *,
             start: int = 0, n_steps: int | None = None, episodes: int = 1,
             params: StrategyParams = NO_SWEEP) -> BatchedTradingEnv:
    """`episodes` identical episodes trading every pair of `market` from bar `start` (the first decision is
    at that bar's close) for n_steps steps (default: up to the last bar); lending by hand unless `params`
    say otherwise."""
    n_pairs = len(market.pairs)
    steps = market.n_bars - 1 - start if n_steps is None else n_steps
    pair_idx = torch.arange(n_pairs).unsqueeze(0).expand(episodes, n_pairs)
    return BatchedTradingEnv(market, pair_idx, torch.full((episodes,), start, dtype=torch.int64), steps,
                             env_cfg or costless_env(), risk_cfg, params)


def actions(*per_pair: int, episodes: int = 1) -> torch.Tensor:
    """An action tensor [episodes, P] with the same action per pair in every episode."""
    return torch.tensor([list(per_pair)] * episodes, dtype=torch.int64)


def write_untrained_model(folder, pairs: Sequence[str], hold_margin: float | None = None) -> str:
    """An untrained network (seed 0) whose spot-only config trades `pairs` with data ending 2025-04-01 (the
    bundled sample runs to 2025-06-01), saved as folder/model.pt; `hold_margin` the config's, when given."""
    from nexlify import checkpoint
    from nexlify.agent.dqn import DuelingQNet
    from nexlify.config import TrainConfig
    from nexlify.configtools import to_dict
    from nexlify.env.batched import N_ACTIONS, observation_size

    cfg = TrainConfig()
    cfg.data.pairs, cfg.data.start, cfg.data.end, cfg.data.val_days = list(pairs), "2025-01-01", "2025-04-01", 10
    cfg.env.strategies = ["spot"]
    cfg.agent.algorithm = "dqn"  # an untrained Q-network trades (an untrained forecast never does)
    if hold_margin is not None:
        cfg.agent.hold_margin = hold_margin
    data = load_market("binance", cfg.data.pairs, start=cfg.data.start, end=cfg.data.end)
    raw = market_features(data)
    normalizer = Normalizer.fit(raw, WARMUP_BARS, 1000)
    torch.manual_seed(0)
    net = DuelingQNet(observation_size(raw.shape[-1]), N_ACTIONS, cfg.agent.hidden)
    state = {"model_state_dict": net.state_dict(), "target_model_state_dict": net.state_dict(),
             "optimizer_state_dict": {}}
    ckpt = checkpoint.build_checkpoint(state, config=to_dict(cfg), normalizer=normalizer.to_dict(), episodes_trained=0,
                                       seed=0, metrics={})
    path = folder / "model.pt"
    path.write_bytes(checkpoint.to_bytes(ckpt))
    return str(path)


def bundled_two_pairs() -> MarketTensors:
    """BTC/USDT and ETH/USDT of the bundled sample, 2025-01-01 .. 2025-03-01, normalised on bars up to 800 (the
    evaluation tests step windows after that)."""
    data = load_market("binance", ["BTC/USDT", "ETH/USDT"], start="2025-01-01", end="2025-03-01")
    raw = market_features(data)
    return MarketTensors.build(data, Normalizer.fit(raw, WARMUP_BARS, 800), "cpu", raw)


def untrained_qnet(market: MarketTensors, seed: int):
    """A Q-network of the default shape for `market`'s features, initialised from `seed`."""
    from nexlify.agent.dqn import DuelingQNet
    from nexlify.config import TrainConfig
    from nexlify.env.batched import N_ACTIONS, observation_size

    torch.manual_seed(seed)
    return DuelingQNet(observation_size(market.n_features), N_ACTIONS, TrainConfig().agent.hidden)
