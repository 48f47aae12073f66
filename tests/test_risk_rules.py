"""The risk rules (nexlify.env.risk), table-driven with hand-computed expectations, and the same rules
enforced by the batched environment on hand-made bars (tests/helpers_market.py).

Every expected number below is worked out on paper in the comment beside it; none is obtained by
calling the code under test a second way.
"""

from __future__ import annotations

import math

import pytest
import torch

from nexlify.env import risk
from nexlify.env.batched import CLOSE, HOLD, OPEN_LONG, STATE_NAMES
from tests.helpers_market import actions, costless_env, flat, make_env, make_market, quiet_risk
from tests.helpers_market import one_torch_thread, step_kernel  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("step_kernel")  # every test on the fused kernel and on the tensor step

F64 = torch.float64
INF = math.inf


def t(*values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------------------------- levels


@pytest.mark.parametrize("entry, highest, stop_loss, trailing, expected", [
    (100.0, 100.0, 0.02, 0.0, 98.0),      # fixed stop only: 100 * 0.98
    (100.0, 120.0, 0.02, 0.03, 116.4),    # trailing above the fixed stop: 120 * 0.97
    (100.0, 100.0, 0.02, 0.03, 98.0),     # fixed above trailing: max(98, 97)
    (100.0, 120.0, 0.0, 0.10, 108.0),     # trailing only: 120 * 0.9
    (100.0, 120.0, 0.0, 0.0, 0.0),        # both off: no stop
])
def test_stop_level(entry, highest, stop_loss, trailing, expected):
    got = risk.stop_level(t(entry), t(highest), stop_loss, trailing)
    assert got.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("entry, take_profit, expected", [(100.0, 0.05, 105.0), (80.0, 0.5, 120.0), (100.0, 0.0, INF)])
def test_take_profit_level(entry, take_profit, expected):
    assert risk.take_profit_level(t(entry), take_profit).item() == pytest.approx(expected)


# ----------------------------------------------------------------------------------- exits in a bar

EXIT_CASES = [
    # open, high, low, stop, target -> stop_hit, target_hit, exit price
    pytest.param(100, 101, 97, 98, 105, True, False, 98, id="stop-inside-bar-fills-at-stop"),
    pytest.param(100, 101, 98, 98, 105, True, False, 98, id="low-touches-stop-exactly"),
    pytest.param(95, 96, 94, 98, 105, True, False, 95, id="gap-open-below-stop-fills-at-open"),
    pytest.param(100, 106, 99, 98, 105, False, True, 105, id="target-inside-bar-fills-at-target"),
    pytest.param(107, 108, 106.5, 98, 105, False, True, 107, id="gap-open-above-target-fills-at-open"),
    pytest.param(100, 106, 97, 98, 105, True, False, 98, id="both-in-one-bar-stop-first"),
    pytest.param(100, 104, 99, 98, 105, False, False, 0, id="neither"),
    pytest.param(100, 101, 50, 0, 105, False, False, 0, id="stop-off"),
    pytest.param(100, 1e9, 99, 98, INF, False, False, 0, id="target-off"),
]


@pytest.mark.parametrize("o, h, lo, stop, target, stop_hit, target_hit, price", EXIT_CASES)
def test_exits_in_bar(o, h, lo, stop, target, stop_hit, target_hit, price):
    s, g, p = risk.exits_in_bar(t(o), t(h), t(lo), t(stop), t(target))
    assert (bool(s), bool(g), p.item()) == (stop_hit, target_hit, pytest.approx(price))


def test_exits_in_bar_batched_equals_rowwise():
    """All cases as one [1, N] batch give the same answers as one by one (no mixing across elements)."""
    cols = list(zip(*[c.values for c in EXIT_CASES]))
    o, h, lo, stop, target = (torch.tensor([col], dtype=F64) for col in cols[:5])
    s, g, p = risk.exits_in_bar(o, h, lo, stop, target)
    assert s.tolist() == [list(cols[5])]
    assert g.tolist() == [list(cols[6])]
    assert p.tolist() == [[float(x) for x in cols[7]]]


# ---------------------------------------------------------------------------- concurrent-trade cap


@pytest.mark.parametrize("requested, open_trades, max_trades, expected", [
    ([1, 1, 1, 1], 0, 3, [1, 1, 1, 0]),   # the 4th concurrent trade is refused
    ([1, 1, 1, 1], 0, 4, [1, 1, 1, 1]),
    ([0, 1, 1, 0], 2, 3, [0, 1, 0, 0]),   # one slot left: the first request in pair order gets it
    ([1, 0, 0, 1], 1, 3, [1, 0, 0, 1]),
    ([1, 1, 0, 0], 3, 3, [0, 0, 0, 0]),   # full
    ([1, 1, 0, 0], 5, 3, [0, 0, 0, 0]),   # over the cap (never negative capacity)
    ([0, 0, 0, 0], 0, 3, [0, 0, 0, 0]),
])
def test_accept_entries(requested, open_trades, max_trades, expected):
    got = risk.accept_entries(torch.tensor([requested], dtype=torch.bool), torch.tensor([open_trades]), max_trades)
    assert got.to(torch.int64).tolist() == [expected]


def test_accept_entries_per_episode_capacity():
    requested = torch.ones((3, 4), dtype=torch.bool)
    got = risk.accept_entries(requested, torch.tensor([0, 1, 3]), 3)
    assert got.to(torch.int64).tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


# -------------------------------------------------------------------------------- daily loss limit


@pytest.mark.parametrize("equity, day_start, limit, blocked", [
    (9500.0, 10_000.0, 0.05, True),       # exactly 5% down
    (9499.99, 10_000.0, 0.05, True),
    (9500.01, 10_000.0, 0.05, False),
    (9000.0, 10_000.0, 0.05, True),
    (11_000.0, 10_000.0, 0.05, False),
    (9000.0, 10_000.0, 0.0, False),       # rule off
    (9000.0, 10_000.0, 0.15, False),
])
def test_entries_blocked_by_daily_loss(equity, day_start, limit, blocked):
    assert bool(risk.entries_blocked_by_daily_loss(t(equity), t(day_start), limit)) is blocked


# --------------------------------------------------------------------------------------- Kelly size

KELLY = dict(min_trades=5, fraction=0.5, floor=0.01, fixed_size=0.03)


def ring_of(returns: list[float], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-episode ring buffer holding `returns` (the last `window` of them), and the trade count."""
    ring = torch.zeros((1, window), dtype=F64)
    for i, r in enumerate(returns):
        ring[0, i % window] = r
    return ring, torch.tensor([len(returns)])


@pytest.mark.parametrize("returns, max_position, expected", [
    # 6 wins of +2%, 4 losses of -1%: W = 0.6, R = 2, f* = 0.6 - 0.4/2 = 0.4, half-Kelly 0.2
    pytest.param([0.02] * 6 + [-0.01] * 4, 0.05, 0.05, id="half-kelly-0.2-capped-at-0.05"),
    pytest.param([0.02] * 6 + [-0.01] * 4, 0.5, 0.2, id="half-kelly-0.2"),
    # W = 0.5, R = 0.03/0.01 = 3, f* = 0.5 - 0.5/3 = 1/3, half = 1/6
    pytest.param([0.03, -0.01] * 5, 0.5, 1 / 6, id="half-kelly-1/6"),
    # fewer than min_trades (5): the fixed size
    pytest.param([0.02] * 4, 0.5, 0.03, id="fewer-than-min-trades-fixed"),
    pytest.param([0.02] * 4, 0.02, 0.02, id="fixed-size-capped-by-max-position"),
    # no losses: the cap; no wins: the floor
    pytest.param([0.02] * 8, 0.2, 0.2, id="no-losses-cap"),
    pytest.param([0.02] * 8, 0.8, 0.8, id="no-losses-cap-above-half-kelly"),  # f* = 1, half 0.5: still the cap
    pytest.param([-0.01] * 8, 0.2, 0.01, id="no-wins-floor"),
    # W = 0.2, R = 1: f* = 0.2 - 0.8 = -0.6 -> the floor
    pytest.param([0.01] * 2 + [-0.01] * 8, 0.2, 0.01, id="negative-edge-floor"),
    # a zero return counts as a loss: 5 wins of 2%, 5 of 0% and 1 of -1% ... W = 5/11,
    # mean loss = 0.01/6, R = 0.02 / (0.01/6) = 12, f* = 5/11 - (6/11)/12 = 9/22, half = 9/44
    pytest.param([0.02] * 5 + [0.0] * 5 + [-0.01], 0.5, 9 / 44, id="zero-return-is-a-loss"),
])
def test_kelly_size(returns, max_position, expected):
    ring, count = ring_of(returns, 50)
    got = risk.kelly_size(ring, count, max_position=max_position, **KELLY)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_kelly_off_is_fixed_size():
    ring, count = ring_of([0.02] * 6 + [-0.01] * 4, 50)
    got = risk.kelly_size(ring, count, max_position=0.5, enabled=False, **KELLY)
    assert got.item() == pytest.approx(0.03)


def test_kelly_window_forgets_old_trades():
    """Window 4 after 8 trades holds only the last 4 (2 wins +2%, 2 losses -1%): W = 0.5, R = 2,
    f* = 0.25, half = 0.125; the 4 earlier losses are forgotten (with them W = 1/4 -> floor)."""
    ring, count = ring_of([-0.01] * 4 + [0.02, -0.01, 0.02, -0.01], 4)
    assert count.item() == 8
    got = risk.kelly_size(ring, count, max_position=0.5, min_trades=2, fraction=0.5, floor=0.01, fixed_size=0.03)
    assert got.item() == pytest.approx(0.125)


def test_window_sums_counts_only_valid_entries():
    ring = torch.tensor([[0.02, -0.01, 0.5, -0.5]], dtype=F64)  # only the first 2 were ever written
    n_win, n_loss, s_win, s_loss = risk.window_sums(ring, torch.tensor([2]))
    assert (n_win.item(), n_loss.item()) == (1.0, 1.0)
    assert (s_win.item(), s_loss.item()) == (pytest.approx(0.02), pytest.approx(0.01))


# ------------------------------------------------------------------------------ trade ring buffer


def record(ring: torch.Tensor, head: torch.Tensor, closed: torch.Tensor, returns: torch.Tensor):
    """Record closed trades in a [B, window] ring through whichever form nexlify.env.risk offers: the pure
    `record_trades` (returns the new ring) or the in-place `record_trades_` on a ring with a spare last
    column. Returns (ring [B, window], head, evicted, evicted_valid)."""
    if hasattr(risk, "record_trades"):
        return risk.record_trades(ring, head, closed, returns)
    padded = torch.cat([ring, torch.zeros_like(ring[..., :1])], dim=-1)
    head, evicted, evicted_valid = risk.record_trades_(padded, head, closed, returns)
    return padded[..., :-1], head, evicted, evicted_valid


def test_record_trades_wraps_around_and_reports_evictions():
    """Window 3 holding [a, b, _] with head 2; pairs 0, 2, 3 close trades x, y, z this bar. They go to
    positions 2, 3, 4 = slots 2, 0, 1: the ring becomes [y, z, x], head 5, and y, z evict a, b."""
    a, b, x, y, z = 0.1, -0.2, 0.3, -0.4, 0.5
    ring = torch.tensor([[a, b, 0.0]], dtype=F64)
    head = torch.tensor([2])
    closed = torch.tensor([[True, False, True, True]])
    returns = torch.tensor([[x, 9.9, y, z]], dtype=F64)  # 9.9: pair 1 closed nothing, never recorded
    ring2, head2, evicted, evicted_valid = record(ring, head, closed, returns)
    assert ring2.tolist() == [[y, z, x]]
    assert head2.tolist() == [5]
    assert evicted_valid.tolist() == [[False, False, True, True]]
    assert evicted[0, 2].item() == a and evicted[0, 3].item() == b


def test_record_trades_per_episode_heads():
    """Two episodes at different heads; nothing closed leaves an episode untouched."""
    ring = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=F64)
    head = torch.tensor([4, 1])
    closed = torch.tensor([[False, False], [True, True]])
    returns = torch.tensor([[7.0, 8.0], [5.0, 6.0]], dtype=F64)
    ring2, head2, _, evicted_valid = record(ring, head, closed, returns)
    # episode 1: positions 1, 2 -> slots 1, 0; position 2 evicts the 3.0 written first
    assert ring2.tolist() == [[1.0, 2.0], [6.0, 5.0]]
    assert head2.tolist() == [4, 3]
    assert evicted_valid.tolist() == [[False, False], [False, True]]


# =================================================================================================
# The same rules enforced by the environment, on hand-made bars (no fee, no slippage unless stated)
# =================================================================================================

ENTRY_BARS = [flat(100), (100, 101, 99, 100)]  # decide at bar 0's close, buy 50 units at bar 1's open (100)


@pytest.mark.parametrize("bar2, cash, units", [
    ((100, 101, 97, 99), 5000 + 50 * 98, 0.0),     # low reaches the stop 98: exit at 98
    ((95, 96, 94, 95), 5000 + 50 * 95, 0.0),       # opens below the stop: exit at the open 95
    ((100, 106, 99, 104), 5000 + 50 * 105, 0.0),   # high reaches the target 105: exit at 105
    ((100, 106, 97, 104), 5000 + 50 * 98, 0.0),    # both inside the bar: the stop first
    ((100, 104, 99, 101), 5000.0, 50.0),           # neither: still holding
])
def test_env_stop_and_target(bar2, cash, units):
    market = make_market(ENTRY_BARS + [bar2, flat(100)])
    env = make_env(market, quiet_risk(stop_loss=0.02, take_profit=0.05))
    env.step(actions(OPEN_LONG))
    assert env.units.item() == 50.0 and env.cash.item() == 5000.0
    env.step(actions(HOLD))
    assert env.cash.item() == pytest.approx(cash, abs=1e-9)
    assert env.units.item() == pytest.approx(units, abs=1e-12)
    assert env.equity.item() == pytest.approx(cash + units * bar2[3], abs=1e-9)


def test_env_stop_exit_pays_slippage_and_fee():
    """Fee 0.1% and 5 bps slippage: buy at 100 * 1.0005 = 100.05 with 5000 (+5 fee); the stop is 2% under
    that fill price, 98.049; the exit sells at 98.049 * 0.9995 and pays 0.1% of it."""
    market = make_market(ENTRY_BARS + [(100, 101, 97, 99), flat(100)])
    env = make_env(market, quiet_risk(stop_loss=0.02), costless_env(fee=0.001, slippage_bps=5.0))
    env.step(actions(OPEN_LONG))
    env.step(actions(HOLD))
    units = 5000 / 100.05
    proceeds = units * (100.05 * 0.98) * (1 - 0.0005) * (1 - 0.001)
    assert env.units.item() == 0.0
    assert env.cash.item() == pytest.approx(10_000 - 5005 + proceeds, abs=1e-9)


def test_env_trailing_stop_ratchets_up_never_down():
    """Trailing 10%, entry at 100. Highs 105, 120, 119: the stop follows 94.5, 108, and stays at 108 after
    the lower high (it would be 107.1 if it followed 119). Bar 4's low 107.5 then stops us out at 108."""
    bars = [flat(100), (100, 105, 99, 104), (104, 120, 100, 118), (118, 119, 109, 110), (110, 111, 107.5, 108),
            flat(108)]
    market = make_market(bars)
    env = make_env(market, quiet_risk(trailing_stop=0.10))
    dist = market.n_features + STATE_NAMES.index("dist_to_stop")
    expected_stops = [94.5, 108.0, 108.0]
    obs = env.step(actions(OPEN_LONG))[0]
    for k, stop in enumerate(expected_stops):
        close = bars[k + 1][3]
        assert env.units.item() == 50.0, f"stopped out early at bar {k + 1}"
        assert obs[0, 0, dist].item() == pytest.approx((close - stop) / close, abs=1e-6)
        obs = env.step(actions(HOLD))[0]
    assert env.units.item() == 0.0
    assert env.cash.item() == pytest.approx(5000 + 50 * 108.0, abs=1e-9)


@pytest.mark.parametrize("rules, exit_price", [
    ({}, None),                                # every rule off: the crash bar does not close the trade
    ({"stop_loss": 0.02}, 98.0),
    ({"take_profit": 0.05}, 105.0),
    ({"trailing_stop": 0.10}, 90.0),           # highest before bar 2 is 100: stop 90
])
def test_env_each_exit_rule_switched_off_by_zero(rules, exit_price):
    """Bar 2 ranges from 10 to 200: it triggers every rule that is on. Highest before bar 2 is bar 1's
    high, 100 here (bar 1 is flat), so the trailing stop is 90."""
    market = make_market([flat(100), flat(100), (100, 200, 10, 100), flat(100)])
    env = make_env(market, quiet_risk(**rules))
    env.step(actions(OPEN_LONG))
    env.step(actions(HOLD))
    if exit_price is None:
        assert env.units.item() == 50.0 and env.cash.item() == 5000.0
    else:
        assert env.units.item() == 0.0
        assert env.cash.item() == pytest.approx(5000 + 50 * exit_price, abs=1e-9)


# ------------------------------------------------------------------------- daily loss limit in the env

# Two pairs, hourly from 19:00 UTC. Pair A loses 20% in the 20:00 bar; pair B stays at 50 and shows, in
# env.mask[..., 1], whether an entry is allowed. The day ends after the 23:00 bar.
DAILY_BARS = [
    [flat(100), flat(50)],              # 0  19:00  decide: open A
    [(100, 100, 80, 80), flat(50)],     # 1  20:00  A bought at 100 (50 units), closes 80: equity 9000 (-10%)
    [flat(80), flat(50)],               # 2  21:00  A sold at 80: cash 9000
    [flat(80), flat(50)],               # 3  22:00
    [flat(80), flat(50)],               # 4  23:00  the next bar is tomorrow: entries allowed again
    [flat(80), flat(50)],               # 5  00:00  A bought at 80: 4500 / 80 = 56.25 units
    [(80, 80, 76, 76), flat(50)],       # 6  01:00  equity 4500 + 56.25 * 76 = 8775: -2.5% today (-12.25% vs 10k)
    [flat(76), flat(50)],               # 7  02:00  B bought at 50: 0.5 * 8775 / 50 = 87.75 units
    [flat(76), flat(50)],               # 8
]


def daily_env(limit: float):
    market = make_market(DAILY_BARS, start="2024-01-01T19:00:00Z")
    return make_env(market, quiet_risk(daily_loss_limit=limit))


def test_env_daily_loss_limit_blocks_entries_then_resets_at_midnight():
    env = daily_env(0.05)
    assert env.mask[0, 1, OPEN_LONG].item()
    env.step(actions(OPEN_LONG, HOLD))
    assert env.equity.item() == pytest.approx(9000.0)
    assert not env.mask[0, 1, OPEN_LONG].item(), "10% down today: entries must be blocked"
    env.step(actions(CLOSE, OPEN_LONG))  # the open is refused even though it is requested
    assert env.units[0].tolist() == [0.0, 0.0]
    assert env.cash.item() == pytest.approx(9000.0)
    assert env.mask[0, :, OPEN_LONG].tolist() == [False, False]
    env.step(actions(OPEN_LONG, OPEN_LONG))  # both refused (bar 3 is still today)
    assert env.units[0].tolist() == [0.0, 0.0]
    assert env.mask[0, :, OPEN_LONG].tolist() == [False, False]
    env.step(actions(HOLD, HOLD))  # now at 23:00: an order fills at 00:00, a new UTC day
    assert env.mask[0, :, OPEN_LONG].tolist() == [True, True]
    env.step(actions(OPEN_LONG, HOLD))
    assert env.units[0].tolist() == [pytest.approx(56.25), 0.0]
    env.step(actions(HOLD, HOLD))
    assert env.equity.item() == pytest.approx(8775.0)
    # today's start is 9000 (the equity at midnight), so -2.5% does not block; against 10,000 it would
    assert env.mask[0, 1, OPEN_LONG].item()
    env.step(actions(HOLD, OPEN_LONG))
    assert env.units[0, 1].item() == pytest.approx(87.75)


def test_env_daily_loss_limit_off():
    env = daily_env(0.0)
    env.step(actions(OPEN_LONG, HOLD))
    assert env.mask[0, 1, OPEN_LONG].item()
    env.step(actions(CLOSE, OPEN_LONG))
    assert env.units[0, 1].item() == pytest.approx(0.5 * 9000 / 50)


# ------------------------------------------------------------------------ concurrent trades in the env


def four_pair_env(max_trades: int):
    market = make_market([[flat(100)] * 4] * 4)
    return make_env(market, quiet_risk(max_trades=max_trades, fixed_size=0.05))


def test_env_fourth_concurrent_trade_refused():
    env = four_pair_env(3)
    assert env.mask[0, :, OPEN_LONG].tolist() == [True] * 4
    env.step(actions(OPEN_LONG, OPEN_LONG, OPEN_LONG, OPEN_LONG))
    assert env.units[0].tolist() == [5.0, 5.0, 5.0, 0.0]  # 0.05 * 10,000 / 100 each, the 4th refused
    assert env.mask[0, 3, OPEN_LONG].item() is False
    env.step(actions(HOLD, HOLD, HOLD, OPEN_LONG))
    assert env.units[0].tolist() == [5.0, 5.0, 5.0, 0.0]


def test_env_concurrent_cap_fills_requests_in_pair_order():
    env = four_pair_env(3)
    env.step(actions(OPEN_LONG, OPEN_LONG, HOLD, HOLD))
    assert env.mask[0, :, OPEN_LONG].tolist() == [False, False, True, True]  # 2 open, 1 slot left
    env.step(actions(HOLD, HOLD, OPEN_LONG, OPEN_LONG))
    assert env.units[0].tolist() == [5.0, 5.0, 5.0, 0.0]


def test_env_cap_of_four_allows_four():
    env = four_pair_env(4)
    env.step(actions(OPEN_LONG, OPEN_LONG, OPEN_LONG, OPEN_LONG))
    assert env.units[0].tolist() == [5.0, 5.0, 5.0, 5.0]


# ----------------------------------------------------------------------------------- Kelly in the env


@pytest.mark.parametrize("kelly, final_size", [(True, 0.125), (False, 0.1)])
def test_env_kelly_sizes_from_closed_trades(kelly, final_size):
    """Fixed size 10% until 2 trades have closed: +10% (buy 10 at 100, sell at 110: equity 10,100) and
    -5% (buy 10.1 at 100, sell at 95: equity 10,049.5). Then W = 0.5, R = 0.10 / 0.05 = 2,
    f* = 0.5 - 0.5 / 2 = 0.25, half-Kelly 0.125 (cap 0.5): the third entry buys 0.125 * 10,049.5 / 100."""
    bars = [flat(100), flat(100), flat(110), flat(100), flat(95), flat(100), flat(100)]
    env = make_env(make_market(bars), quiet_risk(kelly=kelly, kelly_min_trades=2, kelly_window=4,
                                                 kelly_fraction=0.5, kelly_floor=0.01, fixed_size=0.1))
    env.step(actions(OPEN_LONG))
    assert env.units.item() == pytest.approx(10.0)
    env.step(actions(CLOSE))
    assert env.position_size().item() == pytest.approx(0.1)  # one trade closed: still the fixed size
    env.step(actions(OPEN_LONG))
    assert env.units.item() == pytest.approx(10.1)
    env.step(actions(CLOSE))
    assert env.cash.item() == pytest.approx(10_049.5)
    assert env.stats.trades.item() == 2 and env.stats.wins.item() == 1
    assert env.position_size().item() == pytest.approx(final_size)
    env.step(actions(OPEN_LONG))
    assert env.units.item() == pytest.approx(final_size * 10_049.5 / 100)


def test_env_kelly_window_wraps_and_forgets():
    """Kelly window 2, min 2 trades, cap 0.5. After 1 trade: the fixed 0.1. After -5%, +10%: W = 0.5,
    R = 2, f* = 0.25, half-Kelly 0.125. After a 2nd +10%: the window holds only the two wins (the loss was
    overwritten), so the size is the cap 0.5; counting all three it would be W = 2/3, R = 2,
    f* = 2/3 - (1/3)/2 = 0.5, half-Kelly 0.25. A 4th trade of -5% overwrites the first win: 0.125 again."""
    closes = [100, 100, 95, 100, 110, 100, 110, 100, 95, 100]
    env = make_env(make_market([flat(p) for p in closes]),
                   quiet_risk(kelly=True, kelly_min_trades=2, kelly_window=2, kelly_fraction=0.5,
                              kelly_floor=0.01, fixed_size=0.1, max_position=0.5))
    sizes = []
    for _ in range(4):
        env.step(actions(OPEN_LONG))
        env.step(actions(CLOSE))
        sizes.append(env.position_size().item())
    assert env.stats.trades.item() == 4 and env.stats.wins.item() == 2
    assert sizes == [pytest.approx(0.1), pytest.approx(0.125), pytest.approx(0.5), pytest.approx(0.125)]
