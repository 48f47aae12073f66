"""Multi-start ensemble study: K seeds trained alike, then each alone and their averaged Q-values, greedy at hold
margins 0 / 0.01 / 0.02 on the validation quarter and the later test quarter, beside cash plus lending and the
family's oracle.

    PYTHONPATH=. python tools/ensemble-study.py DATA_DIR FAMILY EPISODES SEED [SEED ...]

DATA_DIR: a planted folder of `nexlify bench learn` (or its control). Training as tools/learner-variant-study.py
(BTC/USDT and ETH/USDT, every strategy, [2023-06-01, 2025-03-01), the last 90 days validating), with the
defaults. Checkpoints are kept in $NEXLIFY_STUDY_DIR (default ./ensemble_study) and reused. One JSON line,
prefixed RESULT. Figures: docs/planted-edges.md.
"""
import sys, json, os, torch
from nexlify.config import TrainConfig
from nexlify.data.prepare import prepare_data
from nexlify.training import train_run
from nexlify.evaluate_cmd import _market_window, _greedy_model
from nexlify.evaluation import evaluate_policy
from controller.bench_learn import oracle_returns
data, family, episodes = sys.argv[1], sys.argv[2], int(sys.argv[3]); seeds = [int(s) for s in sys.argv[4:]]
cfg = TrainConfig(); cfg.data.pairs = ["BTC/USDT", "ETH/USDT"]; cfg.data.data_dir = data
cfg.data.start, cfg.data.end, cfg.data.val_days, cfg.data.test_days = "2023-06-01", "2025-03-01", 90, 0
study_dir = os.environ.get("NEXLIFY_STUDY_DIR", "ensemble_study")
os.makedirs(study_dir, exist_ok=True)
ckpts = []
for s in seeds:
    path = os.path.join(study_dir, f"{family}-s{s}-{episodes}.pt")
    if not os.path.exists(path):
        market, windows = prepare_data(cfg)
        out = train_run(cfg, market, windows, seed=s, episodes=episodes)
        torch.save({"normalizer": out.normalizer.to_dict(), "model_state_dict": out.agent.model.state_dict()}, path)
    ckpts.append(torch.load(path, weights_only=True))
class Avg(torch.nn.Module):
    def __init__(self, ms): super().__init__(); self.ms = torch.nn.ModuleList(ms)
    def forward(self, x): return torch.stack([m(x) for m in self.ms]).mean(0)
res = {"family": family, "episodes": episodes, "seeds": seeds}
for wname, (s, e) in {"val": ("2024-12-01", "2025-03-01"), "test": ("2025-03-01", "2025-06-01")}.items():
    mk, window, raw = _market_window(cfg, None, cfg.data.exchange, data, s, e, market_pairs=cfg.data.pairs)
    models = []
    for c in ckpts:
        tensors, m = _greedy_model(c, cfg, mk, "cpu", raw); models.append(m)
    cands = {f"s{sd}": m for sd, m in zip(seeds, models)}; cands["avg"] = Avg(models)
    for name, m in cands.items():
        for mg in (0.0, 0.01, 0.02):
            r = evaluate_policy(m, tensors, window, cfg.env, cfg.risk, cfg.strategy_params(), margin=mg)
            res[f"{wname}_{name}_m{mg}"] = (round(r["avg_return"], 3), r["total_trades"])
    rr = oracle_returns(family, tensors, window, cfg)
    res[f"{wname}_lend"] = round(rr["lending"], 3)
    if "oracle" in rr: res[f"{wname}_oracle"] = round(rr["oracle"], 3)
print("RESULT " + json.dumps(res), flush=True)
