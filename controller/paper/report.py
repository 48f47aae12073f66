"""A paper session's report data: its journal replayed through the paper trader, beside the baselines stepped
over the same bars. Like nexlify.report.final_model it needs torch and runs as a process of its own, so the
controller, which draws the page, never imports torch (controller.report starts it and reads its JSON).

    python -m controller.paper.report OUTPUT OUT_JSON

OUTPUT: the session's output (a folder or s3://bucket/prefix holding session.json and journal/); OUT_JSON:
where the page's data is written (the verdict, the evaluation section, the session's facts).

- The bars: the session's own candles (the header's warm-up and every journal line's), as the trader held
  them (nexlify.paper.trader.history_arrays: a candle missing on the exchange is a gap, not tradable).
- The agent: the model the header names (its sha256 and config checked against the header) replays the
  journal line by line through nexlify.paper.trader, and each replayed line must equal the stored one byte
  for byte (as a resumed session checks it); the curves are the replay's, so the agent's equity is the
  journal's. Its metrics are the environment's statistics after the last bar (nexlify.metrics.pair_metrics,
  as nexlify.evaluation computes them).
- The baselines: nexlify.evaluation.evaluate_with_baselines over the same bars, the same environment,
  costs and risk rules (the model's config), as `nexlify evaluate` steps them.
- The verdict: nexlify.evaluate_cmd.model_verdict, the one rule and sentence of every surface.
"""

from __future__ import annotations

import argparse
import hashlib
import sys

SESSION_TITLE = "The paper session (simulated)"


def paper_report(url: str) -> dict:
    """The page's data for the paper session at `url`; InputError naming a damaged file."""
    import numpy as np
    import torch

    from controller.stores import open_store
    from nexlify import checkpoint
    from nexlify.data.timeframes import iso_utc
    from nexlify.errors import InputError
    from nexlify.evaluate_cmd import model_verdict
    from nexlify.evaluation import evaluate_with_baselines, riskless_return
    from nexlify.metrics import average_metrics, pair_metrics, return_moments, sharpe_vs_lending
    from nexlify.paper.feed import NO_CANDLE
    from controller.paper.journal import HEADER_KEY, Journal
    from controller.paper.service import load_model
    from nexlify.paper.trader import PaperTrader, canonical_json
    from nexlify.report import evaluation
    from nexlify.report.trace import Recorder
    from nexlify.verdict import excess_moments

    journal = Journal(open_store(url))
    header = journal.read_header()
    if header is None:
        raise InputError(f"{journal.url(HEADER_KEY)} does not exist; accepted: the output of `nexlify paper`")
    lines = journal.read_lines()  # each line's chain link checked; InputError naming the first damaged one
    if len(lines) < 2:
        raise InputError(f"the paper session at {url} has {len(lines)} bar(s) journaled; accepted: a session "
                         "with at least one bar traded after its first decision")
    try:
        model_url = str(header["model"])
        ckpt, data = load_model(model_url)
        cfg = checkpoint.train_config(ckpt, model_url)
        cfg.env.initial_equity = float(header["initial_equity"])
        warm = header["warmup"]
        warm_rows = [np.asarray([NO_CANDLE if c is None else c for c in row], dtype=np.float64)
                     for row in warm["candles"]]
        warm_ms = [int(x) for x in warm["open_ms"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"paper session header {journal.url(HEADER_KEY)} is damaged ({exc!r} missing or "
                         "wrong); accepted: the file as nexlify wrote it") from None
    sha = hashlib.sha256(data).hexdigest()
    if sha != header.get("checkpoint_sha256"):
        raise InputError(f"the model {model_url} is not the session's (sha256 {sha}, the session's "
                         f"{header.get('checkpoint_sha256')}); accepted: the checkpoint the session traded, at the "
                         f"place {journal.url(HEADER_KEY)} names")
    trader = PaperTrader(ckpt, cfg, checkpoint_sha256=sha)
    if trader.config_sha256 != header.get("config_sha256"):
        raise InputError(f"the model {model_url} carries another config than the session's (config_sha256 "
                         f"{trader.config_sha256}, the session's {header.get('config_sha256')}); accepted: the "
                         "checkpoint the session traded")

    # the journal replayed line by line, every step recorded as the report records an evaluation's
    rec = Recorder()
    prev = journal.head  # the stored header's sha256: the first line's chain link
    for k, (key, stored, line) in enumerate(lines):
        if k == 0:
            replayed = trader.start(warm_ms, warm_rows)
        else:
            row = np.asarray([NO_CANDLE if line["candles"].get(p) is None else line["candles"][p]
                              for p in trader.pairs], dtype=np.float64)
            rec(trader.env, trader.actions)
            replayed = trader.advance(int(line["open_ms"]), row)
        if canonical_json({**replayed, "prev_sha256": prev}) + b"\n" != stored:
            raise InputError(f"paper journal line {journal.url(key)} differs from its replay (damaged, or written "
                             "by another version); accepted: the journal as nexlify wrote it")
        prev = hashlib.sha256(stored).hexdigest()
    rec(trader.env, None)

    market = trader.market()
    window = (trader.first_bar + 1, len(trader.timestamps))
    params = cfg.strategy_params()
    st = trader.env.stats
    equity = torch.stack(rec.rec["equity"]).cpu().numpy()  # [bars+1, pairs]
    risk_free = riskless_return(market, window, params)
    per_pair = {}
    for j, pair in enumerate(trader.pairs):
        m = pair_metrics(float(st.equity[j]), st.initial_equity, float(st.ret_sum[j]), float(st.ret_sq_sum[j]),
                         st.n_returns, float(st.max_drawdown[j]), int(st.trades[j]), int(st.wins[j]),
                         pnl_breakdown=st.pnl_breakdown(j))
        m["sharpe_vs_lending"] = sharpe_vs_lending(equity[1:, j] / equity[:-1, j] - 1.0, risk_free)
        m["costs_paid"] = m["fees_paid"] = float(st.costs[j])
        per_pair[pair] = m
    agent = average_metrics(per_pair)
    book = equity.sum(1)
    book_returns = book[1:] / book[:-1] - 1.0
    agent["return_moments"] = return_moments(book_returns)
    agent["excess_return_moments"] = excess_moments(book_returns, risk_free)

    evaluated = evaluate_with_baselines(None, market, window, cfg.env, cfg.risk, params,
                                        margin=cfg.agent.hold_margin, record=True)
    trace = rec.trace(market, window, agent, cfg.env, cfg.risk)
    first, last = iso_utc(int(market.timestamps[window[0]])), trace["end"]
    section = evaluation(None, market, {"session": window}, cfg, {"session": evaluated},
                         title=f"{SESSION_TITLE}: {first} .. {last}", traces={"session": trace})
    report = {"agent": agent, "baselines": evaluated["baselines"], "window": {"start": first, "end": last}}
    return {"title": f"nexlify paper session {url}", "verdict": model_verdict(report), "evaluation": section,
            "paper": {"output": url, "exchange": header.get("exchange"), "pairs": trader.pairs,
                      "timeframe": header.get("timeframe"), "model": model_url, "checkpoint_sha256": sha,
                      "first_decision": lines[0][2]["bar"], "last_bar": lines[-1][2]["bar"], "bars": len(lines),
                      "skipped": sum(len(x[2].get("skipped") or []) for x in lines),
                      "initial_equity": cfg.env.initial_equity, "strategies": list(cfg.env.strategies),
                      "modelled_yields": list(header.get("modelled_yields")
                                              or [s for s in cfg.env.strategies if s in ("staking", "lp", "lending")]),
                      "book_equity": lines[-1][2]["book_equity"]}}


def main(argv: list[str] | None = None) -> int:
    from nexlify.report.final_model import write_result

    parser = argparse.ArgumentParser(prog="python -m controller.paper.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output")
    parser.add_argument("out_json")
    args = parser.parse_args(argv)
    return write_result(lambda: paper_report(args.output), args.out_json)


if __name__ == "__main__":
    sys.exit(main())
