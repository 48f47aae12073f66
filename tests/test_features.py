"""The market-wide features by hand on the bundled candles, and normalisers stored before they existed: an old
checkpoint's normaliser picks exactly its own columns, so its network sees what it was trained on."""

from __future__ import annotations

import numpy as np
import pytest

from nexlify.data.candles import load_market
from nexlify.env.market import MarketTensors, market_features
from nexlify.errors import InputError
from nexlify.features import FEATURE_NAMES, MARKET_FEATURES, WARMUP_BARS, Normalizer, compute_features

MARKET_WIDE = ["mkt_ret_24h", "mkt_ret_168h", "lead_ret_1h", "lead_ret_24h"]
OLD_NAMES = list(FEATURE_NAMES[:-len(MARKET_WIDE)])  # the 19 features before the market-wide four


@pytest.fixture(scope="module")
def market():
    return load_market("binance", ["BTC/USDT", "ETH/USDT", "SOL/USDT"]).slice(0, 600)


def test_market_wide_features_by_hand(market):
    raw = market_features(market)
    col = {name: raw[..., FEATURE_NAMES.index(name)] for name in MARKET_WIDE}
    logc = np.log(market.close)
    for t in (WARMUP_BARS, 350, 599):
        # the mean over the three pairs of their 24 h / 168 h log returns; BTC's (the first pair's) 1 h and 24 h
        expected = {"mkt_ret_24h": (logc[t] - logc[t - 24]).mean(), "mkt_ret_168h": (logc[t] - logc[t - 168]).mean(),
                    "lead_ret_1h": logc[t, 0] - logc[t - 1, 0], "lead_ret_24h": logc[t, 0] - logc[t - 24, 0]}
        for name, value in expected.items():
            np.testing.assert_allclose(col[name][t], [value] * 3, rtol=1e-5, atol=1e-7)  # float32, every pair alike
    # before a window is full the value is 0, as every other feature's
    assert col["mkt_ret_168h"][100].tolist() == [0.0, 0.0, 0.0]


def test_the_market_can_be_other_columns_than_those_traded(market):
    # SOL alone traded, the market made of BTC and ETH (columns 0 and 1; BTC leads), as a model trained on those
    # two and evaluated on SOL sees it: the market features are those of the BTC+ETH computation, SOL's own
    # features those of the computation over all three
    m = market
    args = (m.timestamps, m.open, m.high, m.low, m.close, m.volume, m.tradable)
    three = compute_features(*args, market=[0, 1])
    two = market_features(m.select(["BTC/USDT", "ETH/USDT"]))
    own = market_features(m)
    idx = [FEATURE_NAMES.index(n) for n in MARKET_FEATURES]
    np.testing.assert_array_equal(three[:, 2][..., idx], two[:, 0][..., idx])
    np.testing.assert_array_equal(three[..., :idx[0]], own[..., :idx[0]])
    logc = np.log(m.close)
    t = 400  # by hand: the mean of BTC's and ETH's 24 h log returns
    assert three[t, 2, FEATURE_NAMES.index("mkt_ret_24h")] == pytest.approx(
        ((logc[t, :2] - logc[t - 24, :2]).mean()), rel=1e-5)
    assert not np.array_equal(three[:, 2][..., idx], own[:, 2][..., idx])  # the three-pair market differs


def test_an_old_normaliser_takes_its_own_columns(market):
    raw = market_features(market)
    new = Normalizer.fit(raw, WARMUP_BARS, 500)
    assert new.features == list(FEATURE_NAMES) and new.to_dict()["features"] == list(FEATURE_NAMES)
    n_old = len(OLD_NAMES)
    stored = {"mean": new.mean[:n_old], "std": new.std[:n_old], "features": OLD_NAMES}  # as a checkpoint kept it
    old = Normalizer.from_dict(stored)
    assert old.features == OLD_NAMES and old.to_dict() == stored
    np.testing.assert_array_equal(old.apply(raw), new.apply(raw)[..., :n_old])
    assert MarketTensors.build(market, old, "cpu", raw).n_features == n_old
    # the oldest checkpoints stored no names: the first len(mean) features
    assert Normalizer.from_dict({"mean": stored["mean"], "std": stored["std"]}).features == OLD_NAMES


@pytest.mark.parametrize("stored, message", [
    ({"mean": [0.0], "std": [1.0], "features": ["funding_rate"]}, "['funding_rate'] are not among"),
    ({"mean": [0.0, 0.0], "std": [1.0, 1.0], "features": ["ret_1h"]}, "['ret_1h'] are not among"),
])
def test_a_normaliser_this_version_cannot_serve_is_refused(stored, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Normalizer.from_dict(stored)
