"""A run's data from its config: the candles of the configured window, split into train / validation /
test, with the arbitrage strategy's second venue alongside when arbitrage is on.

Torch-free: the controller prepares and snapshots the data (controller.pipeline, controller.preflight,
controller.report) without importing torch; the trainer (nexlify.training) uses the same functions.
"""

from __future__ import annotations

from nexlify.config import TrainConfig
from nexlify.data.candles import MarketData, Windows, load_market, split_windows
from nexlify.data.second_venue import load_second_venue


def prepare_data(cfg: TrainConfig, data_dir: str | None = None) -> tuple[MarketData, Windows]:
    """The candles of the configured window and its train / validation / test split; with arbitrage on,
    the second venue's candles ride along on the same bars (`market.second_venue`)."""
    d = cfg.data
    folder = data_dir if data_dir is not None else d.data_dir
    market = load_market(d.exchange, d.pairs, d.timeframe, folder, d.start, d.end)
    attach_second_venue(cfg, market, folder)
    return market, split_windows(market, d.val_days, d.test_days)


def attach_second_venue(cfg: TrainConfig, market: MarketData, data_dir: str | None) -> MarketData:
    """Load the arbitrage strategy's second venue onto `market` when arbitrage is on (else leave it)."""
    if "arbitrage" in cfg.env.strategies:
        a = cfg.arbitrage
        market.second_venue = load_second_venue(market, a.second_exchange, a.second_quote, data_dir)
    return market
