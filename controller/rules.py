"""The pipeline's decisions as pure functions of recorded numbers: selection and the stopping rules.

Because they depend only on scores already written to the state, a resumed pipeline makes exactly the
decisions an uninterrupted one made.

Cash plus lending first: a candidate whose validation return trails what cash plus lending earned on the
same window ranks below every candidate that does not, whatever the guide's score says (the score rewards
the win rate of trades, so a book that lost money on 24 % winners outscored one that held cash, lent, and
earned the lending rate). Between two candidates on the same side of lending the score decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

IMPROVEMENT_BELOW_THRESHOLD = "improvement_below_threshold"
PATIENCE_EXHAUSTED = "patience_exhausted"
MAX_ITERATIONS = "max_iterations"


def improvement_pct(score: float, best: float) -> float:
    """(score - best) / |best| * 100.

    With best = 0 the ratio is undefined; we then count any gain as +100 %, any loss as -100 % and
    no change as 0 %, so a positive score after a zero best is an improvement of every threshold up
    to 100 % and retraining neither divides by zero nor stops by accident.

    A NaN score (a degenerate validation) is never an improvement: it counts as -100 %, so it cannot
    become the best model; after a NaN best, any real score counts as +100 %."""
    if math.isnan(score):
        return -100.0
    if math.isnan(best):
        return 100.0
    if best == 0:
        return math.copysign(100.0, score) if score != 0 else 0.0
    return (score - best) / abs(best) * 100.0


@dataclass(frozen=True)
class Decision:
    improvement_pct: float
    new_best: bool
    patience_count: int
    stop_reason: str | None


def trails_lending(val_return: float | None, val_baselines: dict | None) -> bool:
    """Whether a validation return is below cash plus lending's on the same window (False when either is not
    recorded: results of older versions)."""
    lending = (val_baselines or {}).get("cash_plus_lending") or {}
    if val_return is None or lending.get("avg_return") is None:
        return False
    return val_return < lending["avg_return"]


def decide(score: float, best: float, patience_count: int, iteration: int, *, threshold: float, patience: int,
           max_iterations: int, trails: bool = False, best_trails: bool = False) -> Decision:
    """One retraining iteration's verdict.

    `trails` / `best_trails`: whether this iteration's / the best's validation return trails cash plus lending
    (trails_lending). When exactly one of them does, that decides: an iteration that trails where the best
    did not is no improvement; one that does not trail where the best did is a new best (and continues).
    Otherwise, by the improvement of the score:

    - improvement <= 0: no new best; the patience counter grows; stop when it reaches `patience`.
    - improvement >= threshold: new best, counter reset, continue.
    - 0 < improvement < threshold: new best, then stop (improvement_below_threshold).
    - otherwise continuing, stop anyway at `max_iterations`.
    (A non-positive improvement never counts as one, so with threshold 0 an equal score uses patience.)
    """
    imp = improvement_pct(score, best)  # recorded as it is, whatever decides
    by_lending = trails != best_trails and not math.isnan(score)
    better = (not trails) if by_lending else imp > 0
    if not better:
        count = patience_count + 1
        stop = PATIENCE_EXHAUSTED if count >= patience else None
        decision = Decision(imp, False, count, stop)
    elif imp >= threshold or by_lending:
        decision = Decision(imp, True, 0, None)
    else:
        decision = Decision(imp, True, patience_count, IMPROVEMENT_BELOW_THRESHOLD)
    if decision.stop_reason is None and iteration >= max_iterations:
        decision = Decision(decision.improvement_pct, decision.new_best, decision.patience_count, MAX_ITERATIONS)
    return decision


def describe(decision: Decision, patience: int) -> str:
    """The verdict as a person reads it in the log: "new best", "new best, stop: improvement_below_threshold",
    "patience 2/3", "patience 3/3, stop: patience_exhausted"."""
    text = "new best" if decision.new_best else f"patience {decision.patience_count}/{patience}"
    return f"{text}, stop: {decision.stop_reason}" if decision.stop_reason else text


def select_best(scores: list[tuple[int, float]], trails: dict[int, bool] | None = None) -> int:
    """The run id with the highest validation score among those that do not trail cash plus lending (`trails`:
    run id -> trails_lending; none when absent), else among all; ties go to the lower run id.

    NaN scores rank below every real score, so a degenerate run is chosen only when no run has one."""
    if not scores:
        raise ValueError("no scores to select from")
    trails = trails or {}

    def rank(item: tuple[int, float]) -> tuple[bool, bool, float, int]:
        run_id, score = item
        return (math.isnan(score), trails.get(run_id, False), 0.0 if math.isnan(score) else -score, run_id)

    return min(scores, key=rank)[0]


def initial_seed(base_seed: int, run_id: int) -> int:
    """Seeds 42, 1042, 2042, ... for run ids 1, 2, 3, ..."""
    return base_seed + 1000 * (run_id - 1)


def retrain_seed(base_seed: int, initial_runs: int, iteration: int) -> int:
    """Retraining continues the sequence after the initial runs: with 3 runs, iteration 1 uses 3042."""
    return base_seed + 1000 * (initial_runs + iteration - 1)
