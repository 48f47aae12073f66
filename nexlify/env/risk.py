"""Risk rules as pure functions of tensors.

Each function takes tensors of any broadcastable shape (the environment passes [B episodes, P pairs]
or [B]), returns new tensors, and never leaves the device or syncs to Python, so the tests can call
them on hand-made paths and the environment can call them for thousands of episodes at once.
A rule configured with 0 is off.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stop_level(entry: Tensor, highest: Tensor, stop_loss: float, trailing_stop: float) -> Tensor:
    """The price at which a long position is stopped out: the higher of the fixed stop below entry and
    the trailing stop below the highest price seen since entry (up to the previous bar). 0 = no stop."""
    level = torch.zeros_like(entry)
    if stop_loss > 0:
        level = torch.maximum(level, entry * (1.0 - stop_loss))
    if trailing_stop > 0:
        level = torch.maximum(level, highest * (1.0 - trailing_stop))
    return level


def take_profit_level(entry: Tensor, take_profit: float) -> Tensor:
    """The price at which a long position takes profit; +inf when the rule is off."""
    if take_profit > 0:
        return entry * (1.0 + take_profit)
    return torch.full_like(entry, float("inf"))


def exits_in_bar(
    bar_open: Tensor, bar_high: Tensor, bar_low: Tensor, stop: Tensor, target: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Which stops and targets a bar triggers, and at what price (before slippage and fees).

    The stop triggers when the bar's low reaches it; it fills at the stop, or at the open if the bar
    opened below it (a gap). The target triggers when the high reaches it and fills at the target or a
    better open. When both lie inside one bar we cannot know the order, so we assume the stop filled
    first (the conservative choice). Returns (stop_hit, target_hit, exit_price).
    """
    stop_hit = (stop > 0) & (bar_low <= stop)
    target_hit = (~stop_hit) & (bar_high >= target)
    price = torch.where(stop_hit, torch.minimum(bar_open, stop), torch.maximum(bar_open, target))
    price = torch.where(stop_hit | target_hit, price, torch.zeros_like(price))
    return stop_hit, target_hit, price


def accept_entries(requested: Tensor, open_trades: Tensor, max_trades: int) -> Tensor:
    """Entries [B, P] allowed under the cap on concurrent trades across pairs: requests are filled in
    pair order while capacity remains, so with 2 trades open and a cap of 3 only the first request of
    the bar goes through."""
    capacity = (max_trades - open_trades).clamp(min=0).unsqueeze(-1)
    rank = torch.cumsum(requested.to(torch.int64), dim=-1)
    return requested & (rank <= capacity)


def accept_weighted_entries(requested: Tensor, weights: Tensor, open_trades: Tensor, max_trades: int,
                            dim: int = -1) -> Tensor:
    """Entries allowed under the concurrent-trade cap when a request may open several trades at once:
    request k (along `dim` of `requested`, e.g. [B, K]) opens weights[k] trades (an arbitrage book opens
    2, one leg on each venue); open_trades [B]. Requests are served in order while capacity remains.
    With weights non-decreasing along the order (the environment serves single trades first and
    arbitrage books last) this is exactly first-come, first-served: a request refused for lack of room
    leaves no room that a later request (as heavy or heavier) could use."""
    shape = [1] * requested.dim()
    shape[dim] = -1
    capacity = (max_trades - open_trades).clamp(min=0).unsqueeze(dim)
    rank = torch.cumsum(requested.to(torch.int64) * weights.view(shape), dim=dim)
    return requested & (rank <= capacity)


def accept_trades_then_books(trades: Tensor, books: Tensor, open_trades: Tensor, max_trades: int,
                             legs: int = 2) -> tuple[Tensor, Tensor]:
    """`accept_weighted_entries` along dim 0 for the environment's two kinds of request, cheaper: single
    trades [K, B] (spot and LP requests in pair order) are served first, then arbitrage books [M, B] that
    open `legs` trades each, from what capacity the single trades left. Returns (trades, books) accepted."""
    capacity = (max_trades - open_trades).clamp(min=0)
    rank = torch.cumsum(trades, dim=0)
    used = torch.minimum(rank[-1], capacity)
    book_rank = torch.cumsum(books, dim=0) * legs
    return trades & (rank <= capacity), books & (book_rank <= capacity - used)


def entries_blocked_by_daily_loss(equity: Tensor, day_start_equity: Tensor, daily_loss_limit: float) -> Tensor:
    """True where today's loss has reached the limit: no new entries until the next UTC day."""
    if daily_loss_limit <= 0:
        return torch.zeros_like(equity, dtype=torch.bool)
    return equity <= day_start_equity * (1.0 - daily_loss_limit)


def window_sums(trade_returns: Tensor, trade_count: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(wins, losses, sum of wins, sum of losses as positive numbers) over the valid entries of a ring
    buffer [B, window] of closed-trade returns (record_trades' ring without its spare column),
    trade_count [B] trades ever closed."""
    window = trade_returns.shape[-1]
    n = trade_count.clamp(max=window)
    valid = torch.arange(window, device=trade_returns.device).unsqueeze(0) < n.unsqueeze(-1)
    wins = (trade_returns > 0) & valid
    losses = (trade_returns <= 0) & valid
    return (wins.sum(-1).to(trade_returns.dtype), losses.sum(-1).to(trade_returns.dtype),
            torch.where(wins, trade_returns, 0.0).sum(-1), torch.where(losses, -trade_returns, 0.0).sum(-1))


def kelly_from_sums(
    n_win: Tensor, n_loss: Tensor, sum_win: Tensor, sum_loss: Tensor, trade_count: Tensor, *, min_trades: int,
    fraction: float, floor: float, fixed_size: float, max_position: float, enabled: bool = True,
) -> Tensor:
    """Position size as a fraction of equity, per episode, from the closed trades in the Kelly window.

    With fewer than min_trades closed trades (or Kelly off) the size is fixed_size. Otherwise, with win
    rate W and win/loss ratio R = mean win / mean loss, Kelly's f* = W - (1 - W) / R and the size is
    fraction * f*, clamped to [floor, max_position]. A window without losses sizes at the cap; one
    without wins (f* <= 0) at the floor. Always capped by max_position.
    """
    fixed = torch.full_like(sum_win, min(fixed_size, max_position))
    if not enabled:
        return fixed
    n_all = (n_win + n_loss).clamp(min=1.0)
    w = n_win / n_all
    ratio = (sum_win / n_win.clamp(min=1.0)) / (sum_loss / n_loss.clamp(min=1.0)).clamp(min=1e-12)
    f_star = w - (1.0 - w) / ratio.clamp(min=1e-12)
    size = (fraction * f_star).clamp(min=floor, max=max_position)
    size = torch.where(n_loss == 0, torch.full_like(size, max_position), size)
    size = torch.where(n_win == 0, torch.full_like(size, min(floor, max_position)), size)
    return torch.where(trade_count >= min_trades, size, fixed)


def kelly_size(trade_returns: Tensor, trade_count: Tensor, **kwargs) -> Tensor:
    """kelly_from_sums over a ring buffer of closed-trade returns (see window_sums)."""
    return kelly_from_sums(*window_sums(trade_returns, trade_count), trade_count, **kwargs)


def record_trades_(
    ring: Tensor, head: Tensor, closed: Tensor, returns: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Append the returns of trades closed this bar ([B, P] mask and values) to each episode's ring
    buffer IN PLACE, in pair order, without a Python loop.

    ring is [B, window + 1]: the last column is a spare slot that absorbs the writes of pairs that
    closed nothing (so one scatter serves every pair); only ring[..., :window] holds trades.
    Returns (head, evicted, evicted_valid): head counts all trades ever closed; evicted [B, P]
    holds the older returns the new ones overwrote (valid where the window was already full), so
    running sums over the window can be kept up to date in O(B * P).
    """
    window = ring.shape[-1] - 1
    order = torch.cumsum(closed.to(torch.int64), dim=-1) - 1
    position = head.unsqueeze(-1) + order
    index = torch.where(closed, position % window, window)
    evicted = ring.gather(-1, index)
    evicted_valid = closed & (position >= window)
    ring.scatter_(-1, index, torch.where(closed, returns, 0.0))
    return head + closed.sum(-1), evicted, evicted_valid
