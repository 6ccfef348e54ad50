"""Evaluation summaries: success rate with a Wilson 95% interval, returns, lengths.

Every policy row the project reports (random, SFT init, DreamGym, S2R, real-RL) goes through
``summarize`` so that the numbers are computed one way, with the same interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from dreamgym_core.schema import Trajectory


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (better than the normal one near 0 and 1)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must be within [0, n={n}]")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at p = 0 or 1 the bound equals p in exact arithmetic; clamp so rounding never leaves p outside
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


@dataclass(frozen=True)
class EvalSummary:
    episodes: int
    success_rate: float
    ci_low: float
    ci_high: float
    mean_return: float
    mean_steps: float
    invalid_action_rate: float

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(trajs: Sequence[Trajectory]) -> EvalSummary:
    n = len(trajs)
    wins = sum(t.won for t in trajs)
    lo, hi = wilson_interval(wins, n)
    steps = sum(len(t) for t in trajs)
    invalid = sum(not s.valid for t in trajs for s in t.steps)
    return EvalSummary(episodes=n, success_rate=wins / n if n else 0.0, ci_low=lo, ci_high=hi,
                       mean_return=sum(t.ret for t in trajs) / n if n else 0.0,
                       mean_steps=steps / n if n else 0.0,
                       invalid_action_rate=invalid / steps if steps else 0.0)
