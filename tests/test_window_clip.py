"""A window the candles do not cover is never silent (controller.pipeline.window_clipped): the summary's
`data` records the window asked for beside the window used, with a sentence naming both."""

from __future__ import annotations

import pytest

from controller.pipeline import window_clipped

FIRST, END = "2023-06-01T00:00:00Z", "2025-06-01T00:00:00Z"  # the bundled sample: first candle, end of the last


@pytest.mark.parametrize("start, end, clipped", [
    ("2023-06-01", "2025-06-01", False),  # exactly the data
    ("2024-01-01", "2025-01-01", False),  # inside it
    ("2019-01-01", "2025-06-01", True),  # starts before the first candle
    ("2023-06-01", "2026-01-01", True),  # ends after the last
    ("2023-05-31T23:00:00Z", "2025-06-01", True),  # one bar early is early
])
def test_the_window_used_is_recorded_when_it_is_not_the_one_asked_for(start, end, clipped):
    got = window_clipped(start, end, FIRST, END)
    if not clipped:
        assert got == {}
        return
    assert got["window_requested"] == {"start": start, "end": end}
    note = got["window_note"]
    assert f"{start} .. {end}" in note and f"{FIRST} .. {END}" in note and "\n" not in note
