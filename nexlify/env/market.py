"""Market tensors: prices, normalised features and calendar of a candle series, on one device.

Built once per run from the candles; every environment built on them only indexes them by cursor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nexlify.features import Normalizer, compute_features

MS_PER_DAY = 86_400_000


@dataclass
class MarketTensors:
    pairs: list[str]
    timestamps: np.ndarray  # [T] int64 ms, candle open time
    prices: torch.Tensor  # [T, N, 4] float64: open, high, low, close
    volume: torch.Tensor  # [T, N] float64, base units
    tradable: torch.Tensor  # [T, N] bool: False on forward-filled gap bars
    features: torch.Tensor  # [T, N, F] float32, normalised
    day: torch.Tensor  # [T] int64 UTC day number
    # The arbitrage strategy's second venue on the same bars (nexlify.data.second_venue), or None:
    venue2_prices: torch.Tensor | None = None  # [T, N, 4] float64 open, high, low, close; NaN where missing
    venue2_available: torch.Tensor | None = None  # [T, N] bool: the second venue has this very candle
    # Tables derived from these tensors once per strategy configuration (nexlify.env.strategy_tables).
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_bars(self) -> int:
        return int(self.timestamps.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[-1])

    @classmethod
    def build(cls, market, normalizer: Normalizer, device: torch.device | str = "cpu",
              raw_features: np.ndarray | None = None) -> "MarketTensors":
        """From a nexlify.data MarketData (or anything with the same arrays) and a fitted normaliser."""
        if raw_features is None:
            raw_features = market_features(market)
        prices = np.stack([market.open, market.high, market.low, market.close], axis=-1)
        venue = getattr(market, "second_venue", None)
        venue2_prices = venue2_available = None
        if venue is not None:
            stacked = np.stack([venue.open, venue.high, venue.low, venue.close], axis=-1)
            venue2_prices = torch.as_tensor(np.ascontiguousarray(stacked, dtype=np.float64), device=device)
            venue2_available = torch.as_tensor(np.ascontiguousarray(venue.available, dtype=bool), device=device)
        return cls(
            pairs=list(market.pairs),
            timestamps=np.asarray(market.timestamps, dtype=np.int64),
            prices=torch.as_tensor(np.ascontiguousarray(prices), dtype=torch.float64, device=device),
            volume=torch.as_tensor(np.ascontiguousarray(market.volume, dtype=np.float64), device=device),
            tradable=torch.as_tensor(np.ascontiguousarray(market.tradable, dtype=bool), device=device),
            # C order matters: the environment gathers rows of the flattened (bar, pair) axis every step.
            features=torch.as_tensor(np.ascontiguousarray(normalizer.apply(raw_features)), device=device),
            day=torch.as_tensor(np.asarray(market.timestamps, dtype=np.int64) // MS_PER_DAY, device=device),
            venue2_prices=venue2_prices, venue2_available=venue2_available,
        )


def market_features(market) -> np.ndarray:
    return compute_features(market.timestamps, market.open, market.high, market.low, market.close,
                            market.volume, market.tradable)

