"""Supervised learnability probe: can the Q-network's MLP, fed the agent's normalised market features, learn a
planted drift as a plain forecast of the return from the next open over H bars (in the learner's units for a 5 %
position), without reinforcement-learning targets?

    PYTHONPATH=. python tools/supervised-probe.py DATA_DIR FAMILY H LEARNING_RATE STEPS BATCH [SEED]

DATA_DIR: a planted folder of `nexlify bench learn`, FAMILY its plant (control: the unplanted candles, where the
wish split uses the calendar rule's hours and the rules are given in points against lending). Trains on
[2023-06-01, 2025-03-03) (normaliser fitted there; labels end inside it), reports on the 90 days after it,
[2025-03-03, 2025-06-01): the
forecast's IC, and its mean on the bars where the family's oracle wants in (nexlify.oracles.long_signal) less
elsewhere, beside the realised difference and over the forecast's spread. Then the forecast traded as a rule
on that quarter (enter when it exceeds IN, close when it falls below OUT, for a few IN/OUT pairs), stepped by
nexlify.evaluation.evaluate_rules beside cash plus lending and the oracle, in the same environment:
captured = (rule - lending) / (oracle - lending), and the rule's trades. Figures: docs/planted-edges.md.
"""
import sys, numpy as np, torch
from nexlify.config import TrainConfig
from nexlify.data.prepare import prepare_data
from nexlify.env.market import MarketTensors, market_features
from nexlify.oracles import long_signal, oracle_policy
from nexlify.evaluation import evaluate_rules
from nexlify import baselines as bl
from nexlify.env.layout import CLOSE, HOLD, OPEN_LONG
from nexlify.features import WARMUP_BARS, Normalizer
from nexlify.agent.dqn import DuelingQNet
data, family = sys.argv[1], sys.argv[2]
H, lr, steps, bs = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
seed = int(sys.argv[7]) if len(sys.argv) > 7 else 0  # the network's initial weights and the batches drawn
torch.manual_seed(seed)
cfg = TrainConfig(); cfg.data.pairs = ["BTC/USDT", "ETH/USDT"]; cfg.data.data_dir = data
cfg.data.start, cfg.data.end, cfg.data.val_days = "2023-06-01", "2025-06-01", 90
market, windows = prepare_data(cfg)
raw = market_features(market)
t0, t1 = max(windows.train[0], WARMUP_BARS), windows.train[1]
normalizer = Normalizer.fit(raw, t0, t1)
X = normalizer.apply(raw)  # [T, P, F]
# the oracle's wish at the close of bar t, for the bars from t+1 on: [T, P]
tensors = MarketTensors.build(market, normalizer, "cpu", raw)
plant = "calendar" if family == "control" else family  # the control has no edge: any rule's hours split it
wish_all = long_signal(plant, tensors).numpy()
lc = np.log(market.close)
# target at bar t: log return from the open of t+1 (the fill) to the close of t+H, times 0.05 * 100
lo = np.log(market.open)
T = lc.shape[0]
y = np.full(lc.shape, np.nan)
y[: T - H] = (lc[H:] - lo[1: T - H + 1]) * 5.0
def rows(a, b):
    xs, ys, ws = X[a:b].reshape(-1, X.shape[-1]), y[a:b].reshape(-1), wish_all[a:b].reshape(-1)
    ok = np.isfinite(ys); return torch.tensor(xs[ok]), torch.tensor(ys[ok], dtype=torch.float32), ws[ok]
xtr, ytr, _ = rows(t0, t1 - H)
xva, yva, wish = rows(windows.val[0], windows.val[1] - H)
net = DuelingQNet(X.shape[-1], 1, 64)
opt = torch.optim.Adam(net.parameters(), lr=lr)
g = torch.Generator().manual_seed(seed)
for s in range(steps):
    i = torch.randint(0, len(xtr), (bs,), generator=g)
    loss = torch.nn.functional.smooth_l1_loss(net(xtr[i]).squeeze(1), ytr[i])
    opt.zero_grad(); loss.backward(); opt.step()
with torch.no_grad():
    pv = net(xva).squeeze(1).numpy()
ic = np.corrcoef(pv, yva.numpy())[0, 1]
print(f"H={H} lr={lr} steps={steps} bs={bs} val IC={ic:.3f} pred sd={pv.std():.4f} pred wish-nowish={pv[wish].mean()-pv[~wish].mean():.4f} "
      f"true y wish-nowish={yva.numpy()[wish].mean()-yva.numpy()[~wish].mean():.4f} y sd={yva.numpy().std():.4f}")
print(f"forecast over its spread (wish - elsewhere) / sd: {(pv[wish].mean() - pv[~wish].mean()) / pv.std():.2f}")
with torch.no_grad():
    forecast = net(torch.tensor(X.reshape(-1, X.shape[-1]))).reshape(X.shape[:2])  # [T, P], at the close of bar t
def forecast_rule(enter, leave):
    def act(obs, mask, env, rows):
        f = forecast[env.t[rows].unsqueeze(-1), env._pair_bp[rows]]
        a = torch.where((f > enter) & mask[..., OPEN_LONG], OPEN_LONG, torch.full(mask.shape[:-1], HOLD))
        return torch.where((f < leave) & mask[..., CLOSE], CLOSE, a)
    return act
rules = {"lend": lambda obs, mask, env, rows: bl.take_lend(mask), "oracle": oracle_policy(plant, tensors)}
pairs = ((0.0, 0.0), (0.01, -0.01), (0.015, -0.015), (0.02, -0.02), (0.01, -0.02), (0.02, -0.01), (0.03, -0.03))
rules.update({f"in {a} out {b}": forecast_rule(a, b) for a, b in pairs})
env_cfg, _ = bl.with_strategy(cfg.env, "lending")
rr = evaluate_rules(tensors, windows.val, env_cfg, cfg.risk, cfg.strategy_params(), rules)
lend, orc = rr.pop("lend")["avg_return"], rr.pop("oracle")
def score(r):  # captured, or points against lending on the control
    return r["avg_return"] - lend if family == "control" else (r["avg_return"] - lend) / (orc["avg_return"] - lend)
print(f"test quarter: lending {lend:.3f} %, oracle {orc['avg_return']:.3f} % ({orc['total_trades']} trades); forecast rules "
      f"{'points against lending' if family == 'control' else 'captured'} (trades): "
      + ", ".join(f"{k}: {score(r):+.2f} ({r['total_trades']})" for k, r in rr.items()))
