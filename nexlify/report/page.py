"""report.html: one self-contained page (plotly.js inlined once, no CDN, opens offline).

The page's numbers travel as JSON inside it: `<script type="application/json" id="report-data">` holds
the data every table and chart is drawn from (the summary's and the evaluation's numbers, as given), and
`id="report-figures"` the plotly figures built from them. A small script draws each `.chart` element;
a chart that fails to draw logs a console error and marks itself `data-drawn="error"`.

Plots: plotly (a maintained library; interactive zoom and hover over thousands of bars, and its figures
are JSON, so the page carries data rather than pictures). Only its JavaScript bundle is embedded.
"""

from __future__ import annotations

import html
import json
import math

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from nexlify.config import ALL_STRATEGIES as EXPOSURES  # one exposure per strategy's book
from nexlify.data.timeframes import parse_utc_ms
from nexlify.env.layout import PNL_SOURCES

CHART_HEIGHT = 320
COLORS = {"agent": "#1f77b4", "flat": "#7f7f7f", "cash_plus_lending": "#17becf", "buy_and_hold_full": "#ff7f0e",
          "buy_and_hold_sized": "#bcbd22", "ma_crossover": "#9467bd", "random_valid": "#e377c2",
          "buy_and_hold (no fees)": "#8c564b"}
LENDING = "cash_plus_lending"
TRADE_MARKERS = {"entry": ("triangle-up", "#2ca02c"), "close": ("x", "#1f77b4"), "stop": ("triangle-down", "#d62728"),
                 "trailing": ("triangle-down", "#ff7f0e"), "target": ("star", "#9467bd"), "exit": ("circle", "#8c564b")}
TRAINING_TAGS = (("train/episode_return", "episode return %"), ("train/loss", "loss"), ("train/epsilon", "epsilon"),
                 ("q/mean_max", "mean max-Q"), ("checks/finite_share", "share of finite checks passed"))


GRID = dict(gridcolor="#ebebeb", zerolinecolor="#cfcfcf")


def _layout(title: str, **extra) -> dict:
    """A white plot with light grids, set per figure (plotly's named templates weigh ~10 kB a chart)."""
    layout = dict(title=dict(text=title, font=dict(size=14)), height=CHART_HEIGHT,
                  margin=dict(l=60, r=20, t=40, b=40), legend=dict(orientation="h", y=-0.18),
                  plot_bgcolor="white", paper_bgcolor="white")
    for axis in ("xaxis", "yaxis"):
        layout[axis] = {**GRID, **extra.pop(axis, {})}
    return {**layout, **extra}


def _fig(data: list, title: str, **layout) -> dict:
    fig = go.Figure(data=data, layout=_layout(title, **layout))
    fig.layout.template = None
    return fig.to_plotly_json()


# ------------------------------------------------------------------------------------------ pipeline


def pipeline_figures(p: dict) -> dict[str, dict]:
    runs = p["runs"]
    names = [r["key"] for r in runs]
    colors = ["#2ca02c" if r["key"] == p["winner"]["key"] else "#1f77b4" for r in runs]
    figs = {
        "runs-return": _fig([go.Bar(x=names, y=[r["val_return"] for r in runs], marker_color=colors,
                                    name="val return %")], "Validation return % per run (winner in green)"),
        "runs-sharpe": _fig([go.Bar(x=names, y=[r["val_sharpe"] for r in runs], marker_color=colors, name="Sharpe")],
                            "Validation Sharpe per run"),
        "runs-score": _fig([go.Bar(x=names, y=[r["score"] for r in runs], marker_color=colors, name="score")],
                           "Score per run (the guide's score: selection and stopping use it)"),
    }
    rule = p["rule"]
    its = [r for r in runs if r["phase"] == "retrain"]
    if its:
        x = [r["key"] for r in its]
        imp = [r["improvement_pct"] for r in its]
        labels = [r.get("decision") or "" for r in its]
        data = [go.Bar(x=x, y=imp, name="improvement % over the best so far", text=labels, textposition="outside",
                       marker_color=["#2ca02c" if r["new_best"] else "#9e9e9e" for r in its])]
        shapes = [dict(type="line", xref="paper", x0=0, x1=1, y0=rule["improvement_threshold"],
                       y1=rule["improvement_threshold"], line=dict(color="#d62728", dash="dash")),
                  dict(type="line", xref="paper", x0=0, x1=1, y0=0, y1=0, line=dict(color="#333", width=1))]
        notes = [dict(xref="paper", x=1, y=rule["improvement_threshold"], xanchor="right", yanchor="bottom",
                      showarrow=False, text=f"threshold {rule['improvement_threshold']:g} %",
                      font=dict(color="#d62728")),
                 dict(xref="paper", x=0, y=1.0, yref="paper", xanchor="left", yanchor="bottom", showarrow=False,
                      text=f"patience {rule['patience']}, at most {rule['max_iterations']} iterations")]
        figs["stop-rule"] = _fig(data, f"Stopping rule: {p['stop_reason']}", shapes=shapes, annotations=notes,
                                 yaxis=dict(title="improvement %"))
    else:
        figs["stop-rule"] = _fig([go.Bar(x=[p["winner"]["key"]], y=[p["winner"]["score"]], name="score")],
                                 f"Stopping rule: {p['stop_reason']} (no retraining)")
    return figs


def _runs_table(p: dict) -> str:
    head = ("run", "phase", "seed", "val return %", "val Sharpe", "score", "train return %", "improvement %",
            "decision", "model")
    rows = []
    for r in p["runs"]:
        cls = ' class="winner"' if r["key"] == p["winner"]["key"] else ""
        cells = (r["key"], r["phase"], r["seed"], _num(r["val_return"]), _num(r["val_sharpe"]), _num(r["score"]),
                 _num(r["train_return"]), _num(r.get("improvement_pct")), r.get("decision") or "", r["model_path"])
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return _table(head, rows, "runs")


# ---------------------------------------------------------------------------------------- evaluation


def window_figures(prefix: str, w: dict) -> dict[str, dict]:
    """Per pair: equity beside the baselines, drawdown, price with the trades, PnL by source, exposure. The
    per-bar series sit on the window's regular bar grid, so they carry x0 and dx (the bar in ms, plotly's
    step on a date axis) instead of a timestamp per point: a quarter's page is ~3 MB lighter."""
    figs = {}
    for pair, p in w["pairs"].items():
        key = f"{prefix}-{_slug(pair)}"
        t = p["time"]
        grid = dict(x0=t[0], dx=parse_utc_ms(t[1]) - parse_utc_ms(t[0]) if len(t) > 1 else 1)
        dates = dict(xaxis=dict(type="date"))
        agent = go.Scatter(**grid, y=p["equity"], name="agent", line=dict(color=COLORS["agent"], width=2))
        curves = {name: b["equity"] for name, b in (w.get("baselines", {}).get(pair) or {}).items() if b.get("equity")}
        lending = curves.get(LENDING)
        # the agent against cash plus lending alone, on a scale their difference sets (buy-and-hold and random
        # actions swing far more and would flatten both into one line), then the agent's equity less
        # lending's, then every baseline on a panel of its own
        eq = [agent] + ([go.Scatter(**grid, y=lending, name=LENDING, line=dict(color=COLORS[LENDING], width=2,
                                                                                  dash="dot"))] if lending else [])
        figs[f"{key}-equity"] = _fig(eq, f"{pair}: equity, the agent against cash plus lending",
                                     yaxis=dict(title="equity"), **dates)
        if lending and len(lending) == len(p["equity"]):
            excess = [a - b for a, b in zip(p["equity"], lending)]
            figs[f"{key}-excess"] = _fig([go.Scatter(**grid, y=excess, name="agent - cash_plus_lending",
                                                     fill="tozeroy", line=dict(color=COLORS["agent"]))],
                                         f"{pair}: the agent's equity less cash plus lending's (above 0: ahead)",
                                         yaxis=dict(title="quote currency"), **dates)
        figs[f"{key}-baselines"] = _fig(
            [agent] + [go.Scatter(**grid, y=y, name=name, line=dict(color=COLORS.get(name), width=1, dash="dot"))
                       for name, y in curves.items()], f"{pair}: equity beside every baseline",
            yaxis=dict(title="equity"), **dates)
        figs[f"{key}-drawdown"] = _fig([go.Scatter(**grid, y=p["drawdown"], fill="tozeroy", name="drawdown %",
                                                   line=dict(color="#d62728"))], f"{pair}: drawdown %", **dates)
        price = [go.Scatter(**grid, y=p["close"], name="close", line=dict(color="#555", width=1))]
        for kind, (symbol, color) in TRADE_MARKERS.items():
            marks = [tr for tr in p["trades"] if tr["kind"] == kind]
            if marks:
                price.append(go.Scatter(x=[m["time"] for m in marks], y=[m["price"] for m in marks], mode="markers",
                                        name=f"{kind} ({len(marks)})", marker=dict(symbol=symbol, color=color, size=9)))
        figs[f"{key}-price"] = _fig(price, f"{pair}: price with entries, exits, stops, targets and trailing stops",
                                    **dates)
        figs[f"{key}-pnl"] = _fig([go.Scatter(**grid, y=p["pnl"][s], name=s) for s in PNL_SOURCES],
                                  f"{pair}: PnL by source so far (quote currency)", **dates)
        used = [s for s in EXPOSURES if any(p["exposure"][s])] or ["spot"]  # strategies never used are left out
        figs[f"{key}-exposure"] = _fig([go.Scatter(**grid, y=p["exposure"][s], name=s, stackgroup="exposure")
                                        for s in used], f"{pair}: exposure per strategy (share of equity)",
                                       yaxis=dict(tickformat=".1%"), **dates)
    return figs


def _window_section(name: str, prefix: str, w: dict, figs: dict) -> str:
    m = w["metrics"]
    head = ("pair", "return %", "Sharpe", "Sortino", "Calmar", "max drawdown %", "win rate", "trades", "exposure",
            "fees paid")
    rows = []
    for pair, pm in m["per_pair"].items():
        ts = w["pairs"][pair]["tear_sheet"]
        cells = (pair, _num(pm["total_return"]), _num(pm["sharpe"]), _num(ts["sortino"]), _num(ts["calmar"]),
                 _num(pm["max_drawdown"]), f"{pm['win_rate']:.1%}", pm["trades"], f"{ts['exposure_share']:.1%}",
                 _num(ts["fees_paid"]))
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    parts = [f'<h3>{html.escape(name)}: {html.escape(w["start"])} .. {html.escape(w["end"])} ({w["bars"]} bars)</h3>',
             f'<p class="metrics">average return <b>{_num(m["avg_return"])} %</b>, '
             f'Sharpe <b>{_num(m["avg_sharpe"])}</b>, '
             f'max drawdown {_num(m["avg_drawdown"])} %, win rate {m["avg_win_rate"]:.1%}; the guide\'s '
             f'selection score {_num(m["score"])} (not a return)</p>', _table(head, rows, f"{prefix}-metrics")]
    baseline_rows = []
    for pair, table in (w.get("baselines") or {}).items():
        for bname, b in table.items():
            share = b.get("exposure_any", b.get("exposure"))
            baseline_rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
                pair, bname, _num(b.get("total_return")), _num(b.get("sharpe")), _num(b.get("max_drawdown")),
                "" if share is None else f"{share:.1%}", _num(b.get("turnover")), _num(b.get("fees_paid")),
                "yes" if b.get("equity") else "")) + "</tr>")
    if baseline_rows:
        parts.append(_table(("pair", "baseline (same environment, costs and risk rules)", "return %", "Sharpe",
                             "max drawdown %", "exposure", "turnover", "fees paid", "curve drawn"), baseline_rows,
                            f"{prefix}-baselines"))
    notes = w.get("baseline_notes") or {}
    if notes:
        parts.append("<details><summary>What each baseline does</summary><ul>" + "".join(
            f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in notes.items()) + "</ul></details>")
    for pair in w["pairs"]:
        key = f"{prefix}-{_slug(pair)}"
        parts.append(f"<h4>{html.escape(pair)}</h4>")
        parts += [_chart(f"{key}-{kind}") for kind in ("equity", "excess", "baselines", "drawdown", "price", "pnl",
                                                          "exposure") if f"{key}-{kind}" in figs]
    return "\n".join(parts)


def evaluation_section(evaluation: dict) -> tuple[str, dict]:
    figs, parts = {}, []
    for name, w in evaluation["windows"].items():
        prefix = f"eval-{_slug(name)}"
        figs.update(window_figures(prefix, w))
        parts.append(_window_section(name, prefix, w, figs))
    title = evaluation.get("title", "The final model")
    return f'<section id="evaluation"><h2>{html.escape(title)}</h2>\n' + "\n".join(parts) + "</section>", figs


# ------------------------------------------------------------------------------------------ training


def training_figures(training: dict) -> dict[str, dict]:
    figs = {}
    for tag, title in TRAINING_TAGS:
        data = [go.Scatter(x=[s for s, _ in curves[tag]], y=[v for _, v in curves[tag]], name=run,
                           mode="lines+markers" if len(curves[tag]) < 30 else "lines")
                for run, curves in training.items() if curves.get(tag)]
        if data:
            figs[f"train-{_slug(tag)}"] = _fig(data, f"{title} (x: episodes of the run)", xaxis=dict(title="episode"))
    return figs


# -------------------------------------------------------------------------------------------- page


def render(data: dict) -> str:
    """The page for `data`: {"title", "verdict"?: ..., "paper"?: ..., "pipeline"?: ..., "evaluation"?: ...,
    "training"?: ...}."""
    figs: dict[str, dict] = {}
    body = [_verdict_section(data["verdict"])] if data.get("verdict") else []
    if data.get("paper"):
        body.append(_paper_section(data["paper"]))
    p = data.get("pipeline")
    if p:
        figs.update(pipeline_figures(p))
        body.append(_pipeline_section(p))
    if data.get("evaluation"):
        html_part, efigs = evaluation_section(data["evaluation"])
        figs.update(efigs)
        body.append(html_part)
    if data.get("training"):
        tfigs = training_figures(data["training"])
        figs.update(tfigs)
        body.append('<section id="training"><h2>Training curves</h2>'
                    '<p>From each run\'s TensorBoard event file (<code>tensorboard --logdir OUTPUT</code> shows the '
                    'same curves).</p>' + "".join(_chart(k) for k in tfigs) + "</section>")
    return TEMPLATE.format(title=html.escape(data.get("title", "nexlify report")), css=CSS,
                           body="\n".join(body), data=_script_json(data), figures=_script_json(figs, digits=7),
                           plotly=get_plotlyjs(), script=SCRIPT)


def _verdict_section(v: dict) -> str:
    """The verdict (nexlify.verdict), first on the page, before any score: its sentence as every surface says it."""
    beats = v.get("beats_cash_plus_lending")
    cls = {True: "beats", False: "loses"}.get(beats, "unknown")
    return (f'<section id="verdict-section"><p id="verdict" class="verdict {cls}" '
            f'data-beats="{json.dumps(beats)}">{html.escape(v["text"])}</p></section>')


def _paper_section(s: dict) -> str:
    """What a paper session is: simulated money on real closed candles, and which yields are modelled."""
    yields = s.get("modelled_yields") or []
    said = (f"The DeFi yields in it ({html.escape(', '.join(yields))}) are modelled at the environment's rates "
            "and parameters, not earned on-chain." if yields else "It models no DeFi yield (staking, liquidity "
            "provision, lending: none was in the model's strategies; cash plus lending's yield is the baseline's "
            "model).")
    skipped = (f" {s['skipped']} pair decision(s) were not taken: the candle was missing after the retries."
               if s.get("skipped") else "")
    return f"""<section id="paper"><h2>A simulated paper session</h2>
<p id="paper-statement">Simulated: the model traded paper money on the exchange's closed candles; no order was
placed. Fills, fees, slippage and every risk rule are the environment's, as in a backtest. {said}</p>
<p>{html.escape(str(s.get('exchange')))} {html.escape(", ".join(s.get('pairs') or []))}
{html.escape(str(s.get('timeframe')))}, first decision at the close of {html.escape(str(s.get('first_decision')))},
last bar {html.escape(str(s.get('last_bar')))} ({s.get('bars')} bars journaled), initial equity
{_num(s.get('initial_equity'))} per pair, book equity now <span id="paper-book-equity">{_num(s.get('book_equity'))}</span>.{skipped}
Model <code>{html.escape(str(s.get('model')))}</code> (sha256 <code>{html.escape(str(s.get('checkpoint_sha256')))}</code>),
strategies {html.escape(", ".join(s.get('strategies') or []))}; the baselines below were stepped over the
same bars, in the same environment.</p></section>"""


def _pipeline_section(p: dict) -> str:
    d = p["data"]
    windows = "".join(f"<li>{k}: {html.escape(str(d[k]['start']))} .. {html.escape(str(d[k]['end']))} "
                      f"({d[k]['bars']} bars)</li>" for k in ("train", "validation", "test") if d.get(k))
    files = "".join(f"<tr><td>{html.escape(f['key'])}</td><td>{f['rows']}</td>"
                    f"<td><code>{f['sha256']}</code></td></tr>" for f in d.get("files", []))
    config = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                     for k, v in _flatten(p["config"]).items())
    w = p["winner"]
    return f"""<section id="pipeline"><h2>The pipeline at a glance</h2>
<p>Winner: <b id="winner">{html.escape(w['key'])}</b>, model <code>{html.escape(w['model_path'])}</code>.
Stopped: <b id="stop-reason">{html.escape(p['stop_reason'])}</b>.</p>
<p class="score-note">The guide's selection score (it ranks models and decides when to stop; it is not a
return): winner <span id="winner-score">{_num(w['score'])}</span>, best initial {_num(p['best_initial_score'])},
final {_num(p['final_best_score'])}, a change of {_num(p['total_improvement_pct'])} % in the score.</p>
<p>Pipeline <code>{html.escape(p['pipeline_id'])}</code>, {html.escape(d['exchange'])} {html.escape(", ".join(d['pairs']))}
{html.escape(d['timeframe'])}, {d['bars']} bars from {html.escape(d['start'])} to {html.escape(d['end'])}.</p>
<ul>{windows}</ul>
{_runs_table(p)}
{_chart('runs-return')}{_chart('runs-sharpe')}{_chart('runs-score')}{_chart('stop-rule')}
<details><summary>Data snapshot (sha256)</summary><table><tr><th>file</th><th>rows</th><th>sha256</th></tr>{files}</table></details>
<details><summary>Config</summary><table>{config}</table></details>
</section>"""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _chart(key: str) -> str:
    return f'<div class="chart" id="chart-{key}" data-figure="{key}"></div>'


def _table(head, rows, ident: str) -> str:
    return (f'<table id="{ident}"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) +
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _num(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:,.3f}" if isinstance(x, float) else str(x)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def _script_json(obj, digits: int | None = None) -> str:
    """JSON that is safe inside <script>: no `</` can close the element early. NaN and infinities (not
    JSON) become null. `digits`: significant digits kept (the figures: what a chart can show; the
    report's data keeps every digit)."""
    text = json.dumps(_finite(obj, digits), separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/")


def _finite(obj, digits: int | None = None):
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays and scalars in figures
        obj = obj.tolist()
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return float(f"{obj:.{digits}g}") if digits else obj
    if isinstance(obj, dict):
        return {k: _finite(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, digits) for v in obj]
    return obj


CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
tr.winner { background: #e7f6e7; font-weight: bold; }
.chart { width: 100%; height: 320px; margin: .5em 0; }
.verdict { font-size: 1.1em; } code { font-size: .9em; }
#verdict { font-weight: bold; padding: .5em .8em; border-left: 4px solid #999; background: #f7f7f7; }
#verdict.loses { border-color: #c62828; } #verdict.beats { border-color: #2e7d32; }
"""

SCRIPT = """
(function () {
  var figures = JSON.parse(document.getElementById('report-figures').textContent);
  var charts = document.querySelectorAll('.chart');
  var pending = charts.length;
  document.body.setAttribute('data-charts', String(pending));
  charts.forEach(function (el) {
    var fig = figures[el.getAttribute('data-figure')];
    if (!fig) { console.error('report: no figure ' + el.getAttribute('data-figure')); el.setAttribute('data-drawn', 'error'); return; }
    Plotly.newPlot(el, fig.data, fig.layout, {responsive: true, displaylogo: false}).then(function () {
      el.setAttribute('data-drawn', 'yes');
      if (--pending === 0) { document.body.setAttribute('data-ready', 'yes'); }
    }, function (err) { console.error('report: chart ' + el.id + ' failed: ' + err); el.setAttribute('data-drawn', 'error'); });
  });
  if (pending === 0) { document.body.setAttribute('data-ready', 'yes'); }
})();
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{css}</style>
<script>{plotly}</script>
</head><body>
<h1>{title}</h1>
{body}
<script type="application/json" id="report-data">{data}</script>
<script type="application/json" id="report-figures">{figures}</script>
<script>{script}</script>
</body></html>
"""
