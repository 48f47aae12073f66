"""The ensemble question, after the fact: for each fold of a walk-forward output, ensembles of the
models its pipeline tried, greedy on the fold's test window in the same environment (nexlify.evaluation),
beside the selected model. Variants: the mean Q of the k best by the guide's score (k = 3, 5, all), greedy
with the models' hold margin (agent.hold_margin; 0 for models made before it), and a vote of the five best (an
action when at least 3 choose it, else hold). Prints one JSON object per fold.

Usage (from the repository root; a study, it reads ../shared/data):
    PYTHONPATH=. python tools/fold-ensembles.py OUTPUT [--data-dir ../shared/data] [--sweep]
--sweep tests models trained before the cash sweep existed with it switched on (LEND / WITHDRAW are then
masked, so their Q-values are never used).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from controller.backtest_run import candidate_models
from nexlify import checkpoint
from nexlify.env.layout import HOLD, N_ACTIONS
from nexlify.evaluate_cmd import _greedy_model, _market_window
from nexlify.evaluation import AGENT, Group, _simulate, evaluate_policy


class MeanQ(torch.nn.Module):
    """The members' Q-values averaged: the greedy policy of the ensemble."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(obs) for m in self.members]).mean(0)


def vote(members: list[torch.nn.Module], need: int):
    """Each member's greedy valid action; the most chosen one when at least `need` members chose it, else hold."""

    def act(obs, mask, env, rows):
        picks = torch.stack([torch.where(mask, m(obs), -1e9).argmax(-1) for m in members])
        counts = torch.nn.functional.one_hot(picks, N_ACTIONS).sum(0)
        best = counts.argmax(-1)
        agreed = counts.gather(-1, best[:, None])[:, 0] >= need
        return torch.where(agreed, best, torch.full_like(best, HOLD))

    return act


def fold_models(fold_dir: str, summary: dict, sweep: bool):
    keys = candidate_models(summary)
    ranked = sorted(summary["candidates"], key=lambda c: -c["val_score"])
    out = []
    for c in ranked:
        path = os.path.join(fold_dir, keys[c["source"]])
        ckpt = checkpoint.load(path)
        cfg = checkpoint.train_config(ckpt, path)
        cfg.lending.sweep = cfg.lending.sweep or sweep
        out.append((c["source"], ckpt, cfg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("output")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    k = 1
    while os.path.exists(fold_dir := os.path.join(args.output, f"fold_{k}")):
        with open(os.path.join(fold_dir, "test_result.json")) as f:
            window = json.load(f)["window"]
        with open(os.path.join(fold_dir, "complete_training_summary.json")) as f:
            summary = json.load(f)
        models = fold_models(fold_dir, summary, args.sweep)
        _, ckpt0, cfg = models[0]
        market, span, raw = _market_window(cfg, None, cfg.data.exchange, args.data_dir, window["test_start"],
                                           window["test_end"])
        if any(ckpt["normalizer"] != ckpt0["normalizer"] for _, ckpt, _ in models):
            raise SystemExit(f"{fold_dir}: its models were normalised differently; one pipeline's share one")
        nets = {}
        for source, ckpt, mcfg in models:
            tensors, net = _greedy_model(ckpt, mcfg, market, torch.device("cpu"), raw)
            nets[source] = net.eval()
        ranked = list(nets)
        selected = next(c["source"] for c in summary["candidates"] if c["selected"])
        row = {"fold": k, "test": [window["test_start"], window["test_end"]]}
        with torch.no_grad():
            params = cfg.strategy_params()
            row["selected"] = evaluate_policy(nets[selected], tensors, span, cfg.env, cfg.risk, params,
                                              margin=cfg.agent.hold_margin)["avg_return"]
            for top in (3, 5, len(ranked)):
                ens = MeanQ([nets[s] for s in ranked[:top]])
                row[f"mean_q_top{top}"] = evaluate_policy(ens, tensors, span, cfg.env, cfg.risk, params,
                                                          margin=cfg.agent.hold_margin)["avg_return"]
            five = [nets[s] for s in ranked[:5]]
            out = _simulate(tensors, span, cfg.env, cfg.risk, params, [Group(AGENT, vote(five, 3))], False)
            row["vote_top5_need3"] = out["results"][AGENT]["avg_return"]
        print(json.dumps(row), flush=True)
        k += 1


if __name__ == "__main__":
    main()
