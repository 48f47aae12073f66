"""Learner variants on a planted market: one training run, then how its Q-network sees and trades the edge.

    PYTHONPATH=. python tools/learner-variant-study.py DATA_DIR FAMILY SEED EPISODES [key=value ...]

DATA_DIR: a planted folder of `nexlify bench learn` (<output>/data/<family>-<strength>, or .../control).
It trains one `nexlify.training.train_run` (BTC/USDT and ETH/USDT, every strategy, [2023-06-01, 2025-03-01),
the last 90 days validating) with the defaults overridden by key=value (any AgentConfig, EnvConfig or
RiskConfig field: n_step=12, kelly=false; eval_<key>=value changes the evaluation's config only, e.g.
eval_kelly=true; ema=TAU also keeps a Polyak average of the weights and evaluates that; wd=X trains with
AdamW's decoupled weight decay X instead of Adam). Then, on the
validation quarter and the later test quarter [2025-03-01, 2025-06-01): the greedy policy at hold margins
0 .. 0.04 (return %, trades, exposure), the family's oracle and cash plus lending under the same config, and
the Q-gap open_long - hold on the bars where a slot is flat, split by the oracle's wish (as
nexlify.oracles.q_gap_by_signal, which counts the bars where an entry is allowed). One JSON line, prefixed RESULT. A study: minutes per run; docs/planted-edges.md has its figures.
"""
import json, sys, time
import numpy as np, torch
from nexlify.config import TrainConfig
from nexlify.data.prepare import prepare_data
from nexlify.training import train_run
from nexlify.evaluate_cmd import _market_window, _greedy_model
from nexlify.evaluation import evaluate_policy, evaluate_rules
from nexlify import baselines as bl
from nexlify.oracles import oracle_policy, long_signal

data, family, seed, episodes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = TrainConfig()
cfg.data.pairs = ["BTC/USDT", "ETH/USDT"]
cfg.data.data_dir = data
cfg.data.start, cfg.data.end, cfg.data.val_days, cfg.data.test_days = "2023-06-01", "2025-03-01", 90, 0
over = {}
import copy
eval_over = [kv[5:] for kv in sys.argv[5:] if kv.startswith("eval_")]
def apply(cfg, kvs, over):
  for kv in kvs:
    k, v = kv.split("=")
    for sec in (cfg.agent, cfg.env, cfg.risk):
        if hasattr(sec, k):
            cur = getattr(sec, k)
            val = (v.lower() in ("1", "true")) if isinstance(cur, bool) else type(cur)(v)
            setattr(sec, k, val); over[k] = val
ema = [float(kv[4:]) for kv in sys.argv[5:] if kv.startswith("ema=")]
wd = [float(kv[3:]) for kv in sys.argv[5:] if kv.startswith("wd=")]
apply(cfg, [kv for kv in sys.argv[5:] if not kv.startswith(("eval_", "ema=", "wd="))], over)
if wd:
    from nexlify.agent import dqn as _dqn
    over["weight_decay"] = wd[0]
    _init = _dqn.DQNAgent.__init__
    def init(self, *a, **k):
        _init(self, *a, **k)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.learning_rate, weight_decay=wd[0])
    _dqn.DQNAgent.__init__ = init
if ema:
    from nexlify.agent import dqn as _dqn
    tau = ema[0]; over["ema"] = tau
    _orig = _dqn.DQNAgent.learn
    def learn(self):
        out = _orig(self)
        if out is not None:
            if not hasattr(self, "avg"):
                self.avg = copy.deepcopy(self.model); self.avg.requires_grad_(False)
            with torch.no_grad():
                for pa, pm in zip(self.avg.parameters(), self.model.parameters()):
                    pa.mul_(1 - tau).add_(pm, alpha=tau)
        return out
    _dqn.DQNAgent.learn = learn
t0 = time.time()
market, windows = prepare_data(cfg)
out = train_run(cfg, market, windows, seed=seed, episodes=episodes)
train_s = time.time() - t0
ckpt = {"normalizer": out.normalizer.to_dict(), "model_state_dict": (out.agent.avg if ema else out.agent.model).state_dict()}
cfgs = [("", cfg)]
if eval_over:
    ecfg = copy.deepcopy(cfg); apply(ecfg, eval_over, over.setdefault("eval", {})); cfgs.append(("E", ecfg))
margins = [0.0, 0.005, 0.01, 0.02, 0.04]
res = {"family": family, "seed": seed, "episodes": episodes, "over": over, "train_s": round(train_s)}
for tag, cfg in cfgs:
    for wname, (s, e) in {"val": ("2024-12-01", "2025-03-01"), "test": ("2025-03-01", "2025-06-01")}.items():
        mk, window, raw = _market_window(cfg, None, cfg.data.exchange, data, s, e, market_pairs=cfg.data.pairs)
        tensors, model = _greedy_model(ckpt, cfg, mk, "cpu", raw)
        NF = tensors.n_features
        gaps = []
        class Rec(torch.nn.Module):
            def __init__(s2, m2): super().__init__(); s2.m = m2
            def forward(s2, x):
                q = s2.m(x); gap = (q[..., 1] - q[..., 0]).detach().numpy().reshape(-1).copy(); flat = x[..., NF].numpy().reshape(-1) < 0.5; gap[~flat] = np.nan; gaps.append(gap); return q
        for mg in margins:
            gaps.clear()
            r = evaluate_policy(Rec(model), tensors, window, cfg.env, cfg.risk, cfg.strategy_params(), margin=mg)
            res[f"{tag}{wname}_m{mg}"] = (round(r["avg_return"], 3), r["total_trades"], round(r["exposure"], 3))
        g = np.stack(gaps[: window[1] - window[0]])  # [bars, pairs]: call k decides at bar i0-1+k
        env_cfg, _ = bl.with_strategy(cfg.env, "lending")
        rules = {"cash_plus_lending": lambda obs, mask, env, rows: bl.take_lend(mask)}
        if family != "control":
            rules["oracle"] = oracle_policy(family, tensors)
            wish = long_signal(family, tensors).numpy()[window[0] - 1: window[1] - 1]
            g2 = g[: len(wish)]
            res[f"{tag}{wname}_gap_wish"] = round(float(np.nanmean(g2[wish])), 4) if wish.any() else None
            res[f"{tag}{wname}_gap_nowish"] = round(float(np.nanmean(g2[~wish])), 4)
        res[f"{tag}{wname}_gap_sd"] = round(float(np.nanstd(g)), 4)
        rr = evaluate_rules(tensors, window, env_cfg, cfg.risk, cfg.strategy_params(), rules)
        res[f"{tag}{wname}_lending"] = round(rr["cash_plus_lending"]["avg_return"], 3)
        if "oracle" in rr:
            res[f"{tag}{wname}_oracle"] = round(rr["oracle"]["avg_return"], 3)
print("RESULT " + json.dumps(res), flush=True)
