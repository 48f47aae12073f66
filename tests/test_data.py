"""The data layer on real candles: the bundled sample, real series with gaps the tests cut out of it,
and every way a bad file is refused with a message that names it."""

from __future__ import annotations

import gzip
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nexlify.data import (
    GapReport,
    MarketData,
    align,
    bundled_dir,
    candle_filename,
    fill_gaps,
    iso_utc,
    load_market,
    parse_pair,
    parse_utc_ms,
    read_candles,
    sha256_file,
    split_windows,
    timeframe_ms,
    validate_candles,
    write_candles,
)
from nexlify.errors import InputError

H = 3_600_000
BINANCE = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
HEADER = "timestamp,open,high,low,close,volume\n"
T0 = parse_utc_ms("2024-01-01")  # 1704067200000


def write_gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wt", encoding="ascii") as handle:
        handle.write(text)
    return path


def good_rows(n: int = 4, start: int = T0) -> list[str]:
    """n valid hourly candles as CSV lines: close rises by 1 each hour."""
    return [f"{start + i * H},{100 + i},{102 + i},{99 + i},{101 + i},{10 + i}" for i in range(n)]


def candle_file(tmp_path: Path, rows: list[str], header: str = HEADER,
                name: str = "binance_BTC-USDT_1h.csv.gz") -> Path:
    return write_gz(tmp_path / name, header + "\n".join(rows) + "\n")


# ---- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [("BTC/USDT", ("BTC", "USDT")), ("BTC-USDT", ("BTC", "USDT")),
                                            (" eth/usdt ", ("ETH", "USDT")), ("SOL-USD", ("SOL", "USD"))])
def test_parse_pair_accepts_slash_and_dash(text, expected):
    assert parse_pair(text) == expected


@pytest.mark.parametrize("text", ["BTCUSDT", "BTC/", "/USDT", "BTC/USDT/X", "BTC_USDT", ""])
def test_parse_pair_refuses_other_forms_naming_the_pair(text):
    with pytest.raises(InputError) as info:
        parse_pair(text)
    assert repr(text) in str(info.value) and "BTC/USDT" in str(info.value)


def test_candle_filename_matches_the_bundled_files():
    assert candle_filename("binance", "BTC/USDT", "1h") == "binance_BTC-USDT_1h.csv.gz"
    assert candle_filename("Coinbase", "sol-usd", "1h") == "coinbase_SOL-USD_1h.csv.gz"
    assert (bundled_dir() / candle_filename("binance", "ETH/USDT", "1h")).is_file()
    with pytest.raises(InputError, match="1M"):
        candle_filename("binance", "BTC/USDT", "1M")


def test_timeframes_and_times():
    assert timeframe_ms("1h") == H and timeframe_ms("15m") == 900_000 and timeframe_ms("1d") == 24 * H
    assert parse_utc_ms("2024-01-01") == 1_704_067_200_000
    assert parse_utc_ms("2024-01-01T01:00:00Z") == 1_704_067_200_000 + H
    assert parse_utc_ms("2024-01-01T03:00:00+02:00") == 1_704_067_200_000 + H
    assert iso_utc(1_679_662_800_000) == "2023-03-24T13:00:00Z"
    with pytest.raises(InputError, match="'yesterday'"):
        parse_utc_ms("yesterday", "start")


# ---- the bundled sample ----------------------------------------------------------------------


def bundled_readme_table() -> dict[str, tuple[str, str, int, str]]:
    text = (bundled_dir() / "README.md").read_text()
    rows = re.findall(r"^\| (\S+\.csv\.gz) \| (\S+) \| (\S+) \| ([\d,]+) \| [^|]+ \| `([0-9a-f]{64})` \|$", text, re.M)
    return {name: (first, last, int(count.replace(",", "")), sha) for name, first, last, count, sha in rows}


def test_bundled_readme_names_each_file_with_its_rows_range_and_sha256():
    table = bundled_readme_table()
    files = sorted(p.name for p in bundled_dir().glob("*.csv.gz"))
    assert sorted(table) == files and len(files) == 6
    total = 0
    for name, (first, last, count, sha) in table.items():
        path = bundled_dir() / name
        candles = read_candles(path)
        assert sha256_file(path) == sha
        assert len(candles) == count
        assert iso_utc(candles["timestamp"].iloc[0]) == first and iso_utc(candles["timestamp"].iloc[-1]) == last
        total += path.stat().st_size
    # 2023-06-01 .. 2025-05-31 23:00 is 731 days; Coinbase 2024-04-18 17:00 .. 2025-05-31 23:00.
    assert table["binance_BTC-USDT_1h.csv.gz"][2] == 731 * 24
    assert table["coinbase_SOL-USD_1h.csv.gz"][2] == 9799
    assert total < 4_000_000


def test_bundled_rows_are_hourly_valid_candles_from_their_first_to_their_last_hour():
    """Each bundled file: the header, then one valid candle per hour (no gap, no repeat), its first line
    parsed to the same numbers (the byte-for-byte copy of ../shared/data is make_bundle's job; the files'
    sha256 are checked against the README above)."""
    for path in sorted(bundled_dir().glob("*.csv.gz")):
        with gzip.open(path, "rt") as handle:
            lines = handle.read().splitlines()
        assert lines[0] == HEADER.strip()
        candles = read_candles(path)
        validate_candles(candles, path.name, H)
        assert np.all(np.diff(candles["timestamp"].to_numpy()) == H), path.name
        first = lines[1].split(",")
        assert int(first[0]) == candles["timestamp"].iloc[0] and float(first[4]) == candles["close"].iloc[0]
        start = parse_utc_ms("2023-06-01") if path.name.startswith("binance") else parse_utc_ms("2024-04-18T17:00")
        assert candles["timestamp"].iloc[0] == start, path.name


def test_write_candles_reproduces_the_bundled_files_exactly(tmp_path):
    """Round trip read -> write gives the same bytes: same float text, gzip mtime 0, no name."""
    for name in ("binance_SOL-USDT_1h.csv.gz", "coinbase_ETH-USD_1h.csv.gz"):
        out = write_candles(read_candles(bundled_dir() / name), tmp_path / name)
        assert sha256_file(out) == sha256_file(bundled_dir() / name)
        assert out.read_bytes()[4:8] == b"\0\0\0\0"  # gzip header mtime field


def test_bundled_market_loads_with_known_closes():
    market = load_market("binance", BINANCE)
    assert market.pairs == BINANCE and market.n_bars == 731 * 24
    assert market.start_iso == "2023-06-01T00:00:00Z" and market.end_iso == "2025-06-01T00:00:00Z"
    assert market.close.shape == (731 * 24, 3) and market.close.dtype == np.float64
    assert market.timestamps.dtype == np.int64 and market.tradable.all()
    assert np.all(np.diff(market.timestamps) == H)
    # Public anchors: closes of the last hour of 2023 and of 2024.
    np.testing.assert_array_equal(market.close[market.index_of("2023-12-31T23:00")], [42283.58, 2281.87, 101.72])
    np.testing.assert_array_equal(market.close[market.index_of("2024-12-31T23:00")], [93576.0, 3337.78, 189.31])
    assert market.gaps == {pair: GapReport(0, 0, 0, "") for pair in BINANCE}
    btc = market.sources["BTC/USDT"]
    assert btc["rows"] == 17544 and btc["sha256"] == bundled_readme_table()["binance_BTC-USDT_1h.csv.gz"][3]
    assert Path(btc["file"]).name == "binance_BTC-USDT_1h.csv.gz"

    coinbase = load_market("coinbase", ["BTC-USD", "ETH/USD", "SOL/USD"], start="2025-01-01")
    assert coinbase.pairs == ["BTC/USD", "ETH/USD", "SOL/USD"]
    assert coinbase.start_iso == "2025-01-01T00:00:00Z" and coinbase.n_bars == (31 + 28 + 31 + 30 + 31) * 24


def test_load_market_is_fast():
    load_market("binance", BINANCE)  # warm the imports and the page cache
    started = time.perf_counter()
    load_market("binance", BINANCE)
    assert time.perf_counter() - started < 1.0


def test_start_end_crop_half_open_and_end_iso_round_trips():
    market = load_market("binance", ["BTC/USDT", "ETH/USDT"], start="2024-02-01", end="2024-03-01T05:00:00Z")
    assert market.n_bars == 29 * 24 + 5  # 2024 is a leap year
    assert market.start_iso == "2024-02-01T00:00:00Z" and market.last_iso == "2024-03-01T04:00:00Z"
    again = load_market("binance", ["BTC/USDT", "ETH/USDT"], start=market.start_iso, end=market.end_iso)
    np.testing.assert_array_equal(again.timestamps, market.timestamps)
    np.testing.assert_array_equal(again.close, market.close)
    source = read_candles(bundled_dir() / "binance_ETH-USDT_1h.csv.gz").set_index("timestamp")
    np.testing.assert_array_equal(market.open[:, 1], source.loc[market.timestamps, "open"].to_numpy())


def test_market_helpers_index_of_and_slice():
    market = load_market("binance", BINANCE, start="2024-01-01", end="2024-01-03")
    assert market.index_of(parse_utc_ms("2024-01-02")) == 24
    with pytest.raises(InputError, match="2024-01-02T00:30:00Z"):
        market.index_of(parse_utc_ms("2024-01-02") + 1_800_000)
    part = market.slice(24, 30)
    assert part.n_bars == 6 and part.start_iso == "2024-01-02T00:00:00Z" and part.end_iso == "2024-01-02T06:00:00Z"
    np.testing.assert_array_equal(part.close, market.close[24:30])
    assert part.sources == market.sources
    with pytest.raises(ValueError):
        market.slice(30, 30)


# ---- real candles with gaps the test makes (the suite needs nothing outside the repository) --------


def bundled(name: str = "binance_BTC-USDT_1h.csv.gz") -> pd.DataFrame:
    return read_candles(bundled_dir() / name)


def with_gaps(name: str, starts: list[str], lengths: list[int]) -> pd.DataFrame:
    """The bundled series with real rows removed: runs of `lengths` hours from each of `starts`."""
    frame = bundled(name)
    drop = set()
    for start, length in zip(starts, lengths):
        drop |= {parse_utc_ms(start) + k * H for k in range(length)}
    kept = frame[~frame["timestamp"].isin(drop)].reset_index(drop=True)
    assert len(kept) == len(frame) - sum(lengths)
    return kept


def test_gap_report_of_real_candles_with_gaps_cut_out():
    # the bundled BTC series with 3 gaps cut out: 1 h, 33 h (the length of Binance's 2018-02-08 halt), 2 h
    btc = with_gaps("binance_BTC-USDT_1h.csv.gz", ["2023-09-10T05:00", "2024-02-08T01:00", "2024-03-24T13:00"],
                    [1, 33, 2])
    validate_candles(btc, "binance BTC", H)
    filled, report = fill_gaps(btc, H)
    assert report == GapReport(3, 36, 33, "2024-02-08T01:00:00Z")
    assert len(filled) == 731 * 24  # back to every hour of the sample
    # the bundled files themselves have no gap (their README says "none")
    for name in ("binance_SOL-USDT_1h.csv.gz", "coinbase_BTC-USD_1h.csv.gz"):
        assert fill_gaps(bundled(name), H)[1] == GapReport(0, 0, 0, "")


def test_forward_fill_marks_the_missing_hour_and_never_shifts_a_real_row():
    btc = with_gaps("binance_BTC-USDT_1h.csv.gz", ["2024-03-24T13:00"], [1])
    filled, _ = fill_gaps(btc, H)
    missing = parse_utc_ms("2024-03-24T13:00")
    assert missing not in set(btc["timestamp"])
    row = filled.index[filled["timestamp"] == missing][0]
    before = btc[btc["timestamp"] == missing - H].iloc[0]
    assert not filled["tradable"].iloc[row]
    assert list(filled.loc[row, ["open", "high", "low", "close", "volume"]]) == [before["close"]] * 4 + [0.0]
    # Every real row is where its timestamp says, with its own values.
    real = filled[filled["tradable"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(real.drop(columns="tradable"), btc)
    assert np.all(np.diff(filled["timestamp"].to_numpy()) == H)
    assert int((~filled["tradable"]).sum()) == 1


def test_load_market_over_the_gap_reports_it_for_the_window(tmp_path):
    write_candles(with_gaps("binance_BTC-USDT_1h.csv.gz", ["2024-03-24T13:00"], [1]),
                  tmp_path / "binance_BTC-USDT_1h.csv.gz")
    write_candles(with_gaps("binance_SOL-USDT_1h.csv.gz", ["2024-03-24T13:00"], [1]),
                  tmp_path / "binance_SOL-USDT_1h.csv.gz")
    market = load_market("binance", ["BTC/USDT", "SOL/USDT"], data_dir=tmp_path, start="2024-03-01", end="2024-04-01")
    assert market.n_bars == 31 * 24
    assert market.gaps["BTC/USDT"] == GapReport(1, 1, 1, "2024-03-24T13:00:00Z")
    i = market.index_of("2024-03-24T13:00")
    assert market.tradable[i].tolist() == [False, False] and market.tradable.sum() == 2 * (31 * 24 - 1)
    np.testing.assert_array_equal(market.close[i], market.close[i - 1])
    np.testing.assert_array_equal(market.volume[i], [0.0, 0.0])
    btc = bundled().set_index("timestamp")
    after = parse_utc_ms("2024-03-24T14:00")
    assert market.open[i + 1, 0] == btc.loc[after, "open"] and market.close[i + 1, 0] == btc.loc[after, "close"]


def test_pairs_align_from_the_latest_first_candle(tmp_path):
    # SOL "listed" later: its file starts 2024-01-01 with a 2-hour gap after it; BTC and ETH are whole
    sol = bundled("binance_SOL-USDT_1h.csv.gz")
    sol = sol[sol["timestamp"] >= parse_utc_ms("2024-01-01")]
    sol = sol[~sol["timestamp"].isin([parse_utc_ms("2024-01-05T10:00"), parse_utc_ms("2024-01-05T11:00")])]
    write_candles(sol, tmp_path / "binance_SOL-USDT_1h.csv.gz")
    for name in ("binance_BTC-USDT_1h.csv.gz", "binance_ETH-USDT_1h.csv.gz"):
        write_candles(bundled(name), tmp_path / name)
    market = load_market("binance", BINANCE, data_dir=tmp_path)
    assert market.start_iso == "2024-01-01T00:00:00Z"
    assert market.end_iso == "2025-06-01T00:00:00Z"
    assert market.n_bars == len(sol) + 2  # SOL's rows plus its 2 missing bars
    assert market.gaps["SOL/USDT"] == GapReport(1, 2, 2, "2024-01-05T10:00:00Z")


# ---- fill_gaps and align on hand-made frames --------------------------------------------------


def frame(stamps_h: list[int], closes: list[float]) -> pd.DataFrame:
    closes = np.asarray(closes, dtype=np.float64)
    return pd.DataFrame({"timestamp": T0 + np.asarray(stamps_h, dtype=np.int64) * H, "open": closes - 0.5,
                         "high": closes + 1.0, "low": closes - 1.0, "close": closes,
                         "volume": np.arange(1.0, len(closes) + 1.0)})


def test_fill_gaps_by_hand():
    filled, report = fill_gaps(frame([0, 1, 4, 5, 7], [10, 11, 14, 15, 17]), H)
    assert report == GapReport(count=2, missing_bars=3, longest_bars=2, longest_start=iso_utc(T0 + 2 * H))
    assert filled["timestamp"].tolist() == [T0 + i * H for i in range(8)]
    assert filled["close"].tolist() == [10, 11, 11, 11, 14, 15, 15, 17]
    assert filled["open"].tolist() == [9.5, 10.5, 11, 11, 13.5, 14.5, 15, 16.5]
    assert filled["high"].tolist() == [11, 12, 11, 11, 15, 16, 15, 18]
    assert filled["volume"].tolist() == [1, 2, 0, 0, 3, 4, 0, 5]
    assert filled["tradable"].tolist() == [True, True, False, False, True, True, False, True]


def test_align_by_timestamp_with_different_starts_and_a_hole():
    a = frame([0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15, 16])
    b = frame([2, 3, 5, 6, 7, 8], [22, 23, 25, 26, 27, 28])  # starts later, misses hour 4, ends later
    arrays = align({"A/USDT": a, "B/USDT": b})
    assert arrays.timestamps.tolist() == [T0 + h * H for h in (2, 3, 4, 5, 6)]
    assert arrays.close.tolist() == [[12, 22], [13, 23], [14, 23], [15, 25], [16, 26]]
    assert arrays.open[:, 1].tolist() == [21.5, 22.5, 23, 24.5, 25.5]
    assert arrays.volume[:, 1].tolist() == [1, 2, 0, 3, 4]
    assert arrays.tradable.tolist() == [[True, True], [True, True], [True, False], [True, True], [True, True]]
    assert arrays.volume[:, 0].tolist() == [3, 4, 5, 6, 7]  # A's rows 2..6, not A's rows 0..4

    # With a grid, an hour that neither pair has still gets a (filled, untradable) bar.
    c = frame([2, 3, 5, 6], [12, 13, 15, 16])
    gridded = align({"C/USDT": c, "B/USDT": b}, timeframe_ms=H)
    assert gridded.timestamps.tolist() == [T0 + h * H for h in (2, 3, 4, 5, 6)]
    assert gridded.tradable[:, 0].tolist() == [True, True, False, True, True]
    with pytest.raises(InputError, match="no time in common"):
        align({"A/USDT": frame([0, 1], [1, 2]), "B/USDT": frame([5, 6], [1, 2])})


# ---- split_windows --------------------------------------------------------------------------


def hours(n: int) -> np.ndarray:
    return T0 + np.arange(n, dtype=np.int64) * H


def test_split_windows_90_days_is_2160_hourly_bars():
    windows = split_windows(hours(10_000), val_days=90)
    assert windows.train == (0, 7_840) and windows.val == (7_840, 10_000) and windows.test is None


def test_split_windows_with_a_test_window():
    windows = split_windows(hours(10_000), val_days=90, test_days=30)
    assert windows.test == (10_000 - 720, 10_000)
    assert windows.val == (10_000 - 720 - 2_160, 10_000 - 720)
    assert windows.train == (0, 10_000 - 720 - 2_160)


def test_split_windows_counts_time_not_rows():
    stamps = np.delete(hours(10_000), np.arange(9_000, 9_010))  # ten hours missing inside validation
    windows = split_windows(stamps, val_days=90, timeframe_ms=H)
    assert windows.train == (0, 7_840) and windows.val == (7_840, 9_990)


def test_split_windows_on_market_data():
    market = load_market("binance", BINANCE)
    windows = split_windows(market, val_days=90, test_days=31)
    assert windows.test == (17_544 - 744, 17_544)
    assert market.timestamps[windows.test[0]] == parse_utc_ms("2025-05-01")
    assert market.timestamps[windows.val[0]] == parse_utc_ms("2025-01-31")  # 90 days before May 1st
    assert windows.train == (0, windows.val[0])


@pytest.mark.parametrize("n, val_days, test_days", [(4_000, 90, 0), (2_160, 90, 0), (4_400, 90, 10)])
def test_split_windows_refuses_training_shorter_than_validation(n, val_days, test_days):
    with pytest.raises(InputError, match="training would have"):
        split_windows(hours(n), val_days=val_days, test_days=test_days)


def test_split_windows_refuses_bad_day_counts():
    with pytest.raises(InputError, match="val_days 0"):
        split_windows(hours(10_000), val_days=0)
    with pytest.raises(InputError, match="test_days -1"):
        split_windows(hours(10_000), val_days=10, test_days=-1)


# ---- bad files ---------------------------------------------------------------------------------


def test_missing_file_lists_what_is_there(tmp_path):
    candle_file(tmp_path, good_rows(), name="binance_ETH-USDT_1h.csv.gz")
    with pytest.raises(InputError) as info:
        read_candles(tmp_path / "binance_BTC-USDT_1h.csv.gz")
    message = str(info.value)
    assert "binance_BTC-USDT_1h.csv.gz" in message and "present: binance_ETH-USDT_1h.csv.gz" in message


def test_unknown_pair_names_pair_exchange_folder_and_present_files(tmp_path):
    candle_file(tmp_path, good_rows())
    with pytest.raises(InputError) as info:
        load_market("binance", ["BTC/USDT", "SOL/USDT"], data_dir=tmp_path)
    message = str(info.value)
    assert f"no candles for SOL/USDT on binance 1h in {tmp_path}" in message
    assert "present: binance_BTC-USDT_1h.csv.gz" in message
    with pytest.raises(InputError, match="DOGE/USDT"):
        load_market("binance", ["DOGE/USDT"])


@pytest.mark.parametrize("header, suffix, expected", [
    ("timestamp,open,high,low,close\n", None, "missing columns volume"),
    ("timestamp,open,high,low,close,volume,trades\n", ",7", "extra columns trades"),
    ("time,open,high,low,close,volume\n", "", "missing columns timestamp; extra columns time"),
])
def test_wrong_columns(tmp_path, header, suffix, expected):
    rows = [line.rsplit(",", 1)[0] if suffix is None else line + suffix for line in good_rows()]
    path = candle_file(tmp_path, rows, header=header)
    with pytest.raises(InputError) as info:
        read_candles(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_unparsable_value_names_file_line_and_value(tmp_path):
    rows = good_rows()
    rows[2] = f"{T0 + 2 * H},102,104,101,1O3,12"  # letter O instead of a zero
    path = candle_file(tmp_path, rows)
    with pytest.raises(InputError) as info:
        read_candles(path)
    message = str(info.value)
    assert str(path) in message and "close value '1O3' on line 4" in message


def test_unreadable_files(tmp_path):
    not_gzip = tmp_path / "binance_BTC-USDT_1h.csv.gz"
    not_gzip.write_text(HEADER + "\n".join(good_rows()))
    with pytest.raises(InputError, match=re.escape(str(not_gzip))):
        read_candles(not_gzip)
    empty = write_gz(tmp_path / "binance_ETH-USDT_1h.csv.gz", "")
    with pytest.raises(InputError, match="is empty"):
        read_candles(empty)
    header_only = write_gz(tmp_path / "binance_SOL-USDT_1h.csv.gz", HEADER)
    with pytest.raises(InputError, match="no candles"):
        validate_candles(read_candles(header_only), str(header_only), H)


BAD_ROWS = {
    # name: (row index to break, replacement line, rule text)
    "nan": (2, f"{T0 + 2 * H},102,104,101,,12", "no NaN values"),
    "high below close": (1, f"{T0 + H},101,101.5,100,102,11", "high >= max(open, close)"),
    "low above open": (3, f"{T0 + 3 * H},103,105,103.5,104,13", "low <= min(open, close)"),
    "duplicate": (2, f"{T0 + H},102,104,101,103,12", "duplicate timestamp"),
    "decreasing": (3, f"{T0},103,105,102,104,13", "strictly increasing"),
    "off grid": (2, f"{T0 + 2 * H + 60_000},102,104,101,103,12", "grid"),
    "zero price": (1, f"{T0 + H},0,102,0,101,11", "prices > 0"),
    "negative price": (1, f"{T0 + H},-101,102,-101.5,-101,11", "prices > 0"),
    "negative volume": (2, f"{T0 + 2 * H},102,104,101,103,-1", "volume >= 0"),
    # values that pass every rule above yet overflow the arithmetic: refused before any training
    "infinite high": (2, f"{T0 + 2 * H},102,inf,101,103,12", "prices finite and below 1e12"),
    "1e308 prices": (1, f"{T0 + H},1e308,1e308,1e308,1e308,11", "prices finite and below 1e12"),
    "price 1e12": (3, f"{T0 + 3 * H},103,1e12,102,104,13", "prices finite and below 1e12"),
    "infinite volume": (2, f"{T0 + 2 * H},102,104,101,103,inf", "volume finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_time_and_rule(tmp_path, case):
    index, line, rule = BAD_ROWS[case]
    rows = good_rows()
    rows[index] = line
    path = candle_file(tmp_path, rows)
    with pytest.raises(InputError) as info:
        validate_candles(read_candles(path), str(path), H)
    message = str(info.value)
    stamp = int(line.split(",")[0])
    assert str(path) in message and rule in message
    assert iso_utc(stamp) in message and f"line {index + 2}" in message
    # load_market refuses the same file the same way, before anything else happens.
    with pytest.raises(InputError, match=re.escape(rule)):
        load_market("binance", ["BTC/USDT"], data_dir=tmp_path)


def test_first_offending_row_is_reported(tmp_path):
    rows = good_rows(6)
    rows[4] = f"{T0 + 4 * H},104,104.5,103,105,14"  # high below close, later row
    rows[1] = f"{T0 + H},101,102,99,101,-5"  # negative volume, earlier row
    path = candle_file(tmp_path, rows)
    with pytest.raises(InputError) as info:
        validate_candles(read_candles(path), str(path), H)
    assert iso_utc(T0 + H) in str(info.value) and "volume >= 0" in str(info.value)
    assert "2 row(s) break some rule" in str(info.value)


def test_empty_range_names_pair_range_and_coverage(tmp_path):
    candle_file(tmp_path, good_rows(48))
    with pytest.raises(InputError) as info:
        load_market("binance", ["BTC/USDT"], data_dir=tmp_path, start="2025-01-01", end="2025-02-01")
    message = str(info.value)
    assert "BTC/USDT" in message and "[2025-01-01, 2025-02-01)" in message
    assert "covers 2024-01-01T00:00:00Z .. 2024-01-02T23:00:00Z" in message
    with pytest.raises(InputError, match="only 5 1h bar"):
        load_market("binance", ["BTC/USDT"], data_dir=tmp_path, start="2024-01-02T19:00", min_bars=24)
    with pytest.raises(InputError, match="not before end"):
        load_market("binance", ["BTC/USDT"], data_dir=tmp_path, start="2024-01-02", end="2024-01-01")


def test_pairs_without_common_time_are_refused(tmp_path):
    candle_file(tmp_path, good_rows(5))
    candle_file(tmp_path, good_rows(5, start=T0 + 100 * H), name="binance_ETH-USDT_1h.csv.gz")
    with pytest.raises(InputError, match="no time in common"):
        load_market("binance", ["BTC/USDT", "ETH/USDT"], data_dir=tmp_path)


def test_market_from_small_files_with_a_hole(tmp_path):
    rows = good_rows(6)
    del rows[3]
    candle_file(tmp_path, rows)
    candle_file(tmp_path, good_rows(6, start=T0 + H), name="binance_ETH-USDT_1h.csv.gz")
    market = load_market("binance", ["btc-usdt", "ETH/USDT"], data_dir=tmp_path)
    assert isinstance(market, MarketData) and market.pairs == ["BTC/USDT", "ETH/USDT"]
    assert market.timestamps.tolist() == [T0 + h * H for h in range(1, 6)]
    assert market.tradable[:, 0].tolist() == [True, True, False, True, True]
    assert market.close[:, 0].tolist() == [102, 103, 103, 105, 106]
    assert market.close[:, 1].tolist() == [101, 102, 103, 104, 105]
    assert market.gaps["BTC/USDT"] == GapReport(1, 1, 1, iso_utc(T0 + 3 * H))
    assert market.sources["BTC/USDT"]["rows"] == 5
    with pytest.raises(InputError, match="given twice"):
        load_market("binance", ["BTC/USDT", "BTC-USDT"], data_dir=tmp_path)


def test_timestamps_in_seconds_get_a_hint(tmp_path):
    rows = [f"{1_704_067_200 + i * 3600},100,102,99,101,10" for i in range(3)]
    path = candle_file(tmp_path, rows)
    with pytest.raises(InputError) as info:
        validate_candles(read_candles(path), str(path), H)
    assert "within 2009-01-01T00:00:00Z .. 2100-01-01T00:00:00Z" in str(info.value)
    assert "look like seconds" in str(info.value) and "timestamp 1704067200 (row 1, line 2)" in str(info.value)


@pytest.mark.parametrize("stamp", [10**15, 4_102_444_800_000, 1_230_764_400_000])
def test_a_timestamp_beyond_2009_2100_names_file_line_and_what_is_accepted(tmp_path, stamp):
    """10**15 ms is the year 33658: named as the number it is (no date can be printed for it)."""
    rows = good_rows(4)
    rows[2] = f"{stamp},102,104,101,103,12"
    path = candle_file(tmp_path, rows)
    with pytest.raises(InputError) as info:
        load_market("binance", ["BTC/USDT"], data_dir=tmp_path)
    message = str(info.value)
    assert str(path) in message and f"timestamp {stamp} (row 3, line 4)" in message, message
    assert "timestamps in ms since the epoch within 2009-01-01T00:00:00Z .. 2100-01-01T00:00:00Z" in message


# ---- --data-dir formats: .csv.gz, .csv and Parquet --------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_data_dir_reads_plain_csv_and_parquet_to_the_same_market(tmp_path, suffix):
    btc = bundled()
    path = tmp_path / f"binance_BTC-USDT_1h{suffix}"
    if suffix == ".csv":
        btc.to_csv(path, index=False)
    else:
        btc.to_parquet(path, index=False)
    got = load_market("binance", ["BTC/USDT"], data_dir=tmp_path, start="2024-01-01", end="2024-02-01")
    want = load_market("binance", ["BTC/USDT"], data_dir=None, start="2024-01-01", end="2024-02-01")
    assert got.n_bars == 31 * 24
    np.testing.assert_array_equal(got.close, want.close)
    np.testing.assert_array_equal(got.volume, want.volume)
    assert got.sources["BTC/USDT"]["file"] == str(path)


def test_data_dir_without_the_file_lists_accepted_names_and_formats(tmp_path):
    (tmp_path / "binance_BTC-USDT_1h.json").write_text("{}")
    with pytest.raises(InputError) as info:
        load_market("binance", ["BTC/USDT"], data_dir=tmp_path)
    message = str(info.value)
    for accepted in ("binance_BTC-USDT_1h.csv.gz", "binance_BTC-USDT_1h.csv", "binance_BTC-USDT_1h.parquet",
                     "accepted formats: .csv.gz, .csv, .parquet"):
        assert accepted in message


def test_a_damaged_parquet_file_is_named(tmp_path):
    path = tmp_path / "binance_BTC-USDT_1h.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="binance_BTC-USDT_1h.parquet is not a readable Parquet file"):
        read_candles(path)
