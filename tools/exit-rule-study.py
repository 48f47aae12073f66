"""Decision-rule study over saved checkpoints: does closing a position on weak evidence turn a seen edge into
capture? Each model (and the models' averaged Q-values) is stepped greedy at entry margins 0 / 0.01 / 0.02,
with today's rule (a position is closed only when close beats hold by the margin) and with an exit rule:
in a position, CLOSE unless hold's Q beats close's by at least X (X = 0, 0.005, 0.01), on the validation
quarter and the later test quarter, beside cash plus lending and the family's oracle.

    PYTHONPATH=. python tools/exit-rule-study.py DATA_DIR FAMILY 'CHECKPOINT_GLOB'

CHECKPOINT_GLOB: the checkpoints tools/ensemble-study.py keeps ($NEXLIFY_STUDY_DIR/FAMILY-s*-EPISODES.pt),
trained on DATA_DIR (BTC/USDT and ETH/USDT, every strategy, [2023-06-01, 2025-03-01)). One JSON line, prefixed
RESULT: per window, model, exit rule and margin (return %, trades, exposure). Figures: docs/planted-edges.md.
"""
import glob, json, sys, torch
from nexlify.config import TrainConfig
from nexlify.evaluate_cmd import _market_window, _greedy_model
from nexlify.evaluation import evaluate_policy
from controller.bench_learn import oracle_returns
from nexlify.env.layout import CLOSE, HOLD
data, family, paths = sys.argv[1], sys.argv[2], sorted(glob.glob(sys.argv[3]))
cfg = TrainConfig(); cfg.data.pairs = ["BTC/USDT", "ETH/USDT"]; cfg.data.data_dir = data
cfg.data.start, cfg.data.end, cfg.data.val_days, cfg.data.test_days = "2023-06-01", "2025-03-01", 90, 0
ckpts = [torch.load(p, weights_only=True) for p in paths]
class Avg(torch.nn.Module):
    def __init__(s, ms): super().__init__(); s.ms = torch.nn.ModuleList(ms)
    def forward(s, x): return torch.stack([m(x) for m in s.ms]).mean(0)
class ExitRule(torch.nn.Module):
    """The model's Q-values with CLOSE forced (to 1e6) in a position where hold beats close by less than
    `exit_margin`, and barred (-1e6) where it beats it by more; flat rows untouched. The observation's first
    state field after the market features is in_position (nexlify.env.layout.SPOT_STATE_NAMES)."""
    def __init__(s, m, n_features, exit_margin): super().__init__(); s.m, s.nf, s.x = m, n_features, exit_margin
    def forward(s, obs):
        q = s.m(obs).clone()
        in_pos = obs[..., s.nf] > 0.5
        close = in_pos & (q[..., CLOSE] >= q[..., HOLD] - s.x)
        q[..., CLOSE] = torch.where(close, 1e6, torch.where(in_pos, -1e6, q[..., CLOSE]))
        return q
res = {"family": family, "paths": paths}
for wname, (s, e) in {"val": ("2024-12-01", "2025-03-01"), "test": ("2025-03-01", "2025-06-01")}.items():
    mk, window, raw = _market_window(cfg, None, cfg.data.exchange, data, s, e, market_pairs=cfg.data.pairs)
    models = []
    for c in ckpts:
        tensors, m = _greedy_model(c, cfg, mk, "cpu", raw); models.append(m)
    cands = {f"s{i + 1}": m for i, m in enumerate(models)}; cands["avg"] = Avg(models)
    for name, m in cands.items():
        for x in (None, 0.0, 0.005, 0.01):
            policy = m if x is None else ExitRule(m, tensors.n_features, x)
            for mg in (0.0, 0.01, 0.02):
                r = evaluate_policy(policy, tensors, window, cfg.env, cfg.risk, cfg.strategy_params(), margin=mg)
                res[f"{wname}_{name}_x{x}_m{mg}"] = (round(r["avg_return"], 3), r["total_trades"], round(r["exposure"], 3))
    rr = oracle_returns(family, tensors, window, cfg)
    res[f"{wname}_lend"] = round(rr["lending"], 3)
    if "oracle" in rr: res[f"{wname}_oracle"] = round(rr["oracle"], 3)
print("RESULT " + json.dumps(res), flush=True)
