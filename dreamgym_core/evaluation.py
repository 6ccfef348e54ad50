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


@dataclass(frozen=True)
class PairedComparison:
    """Two policies on the same tasks: ``better`` = tasks only B won, ``worse`` = tasks only A won."""

    tasks: int
    better: int
    worse: int
    p_value: float

    def as_dict(self) -> dict:
        return asdict(self)


def paired_comparison(a: Sequence[Trajectory], b: Sequence[Trajectory]) -> PairedComparison:
    """Exact McNemar (two-sided sign test on the discordant tasks) of policy B against policy A.

    a, b: one episode per task each, on the same task ids. Two success rates on the same held-out
    games are paired data; their Wilson intervals overlap long before a paired test stops seeing a
    difference, so this is the test for "did RL raise success over its init".
    """
    won_a = {t.task.task_id: bool(t.won) for t in a}
    won_b = {t.task.task_id: bool(t.won) for t in b}
    if len(won_a) != len(a) or len(won_b) != len(b):
        raise ValueError("paired_comparison: one episode per task on each side (a task id repeats)")
    if won_a.keys() != won_b.keys():
        raise ValueError(f"paired_comparison: the two sides cover different tasks "
                         f"({len(won_a.keys() - won_b.keys())} only in a, {len(won_b.keys() - won_a.keys())} only in b)")
    better = sum(won_b[k] and not won_a[k] for k in won_a)
    worse = sum(won_a[k] and not won_b[k] for k in won_a)
    n = better + worse
    tail = sum(math.comb(n, i) for i in range(min(better, worse) + 1)) / 2 ** n if n else 1.0
    return PairedComparison(tasks=len(won_a), better=better, worse=worse, p_value=min(1.0, 2 * tail))


@dataclass(frozen=True)
class SimRealPairs:
    """The same episodes (task, sample index, policy seeds) run in M_exp and in the real env.

    ``both`` / ``sim_only`` / ``real_only`` / ``neither`` count episode pairs by who won;
    ``sim_success - real_success = (sim_only - real_only) / pairs``. ``same_actions`` is the share
    of pairs whose actions agree over every step both ran (a seeded policy facing the same states
    takes the same actions, so this measures how long M_exp keeps the real episode);
    ``mean_agree_steps`` the mean number of leading steps with the same action."""

    pairs: int
    both: int
    sim_only: int
    real_only: int
    neither: int
    same_actions: float
    mean_agree_steps: float

    def as_dict(self) -> dict:
        return asdict(self)


def sim_real_pairs(real: Sequence[Trajectory], sim: Sequence[Trajectory]) -> SimRealPairs:
    """Pair ``real`` and ``sim`` episodes by ``traj_id`` (``task#policy#sample``; rollouts in both
    envs with the same config give the same ids) and count the outcomes of each pair."""
    by_id = {}
    for t in real:
        if t.traj_id in by_id:
            raise ValueError(f"sim_real_pairs: real episode id {t.traj_id!r} repeats")
        by_id[t.traj_id] = t
    seen: set[str] = set()
    both = sim_only = real_only = neither = same = agree_total = 0
    for s in sim:
        if s.traj_id in seen:
            raise ValueError(f"sim_real_pairs: M_exp episode id {s.traj_id!r} repeats")
        seen.add(s.traj_id)
        r = by_id.get(s.traj_id)
        if r is None:
            raise ValueError(f"sim_real_pairs: M_exp episode {s.traj_id!r} has no real episode with that id")
        both += s.won and r.won
        sim_only += s.won and not r.won
        real_only += r.won and not s.won
        neither += not s.won and not r.won
        agree = 0
        for a, b in zip(s.steps, r.steps):
            if a.action != b.action:
                break
            agree += 1
        agree_total += agree
        same += agree == min(len(s.steps), len(r.steps))
    n = len(seen)
    return SimRealPairs(pairs=n, both=both, sim_only=sim_only, real_only=real_only, neither=neither,
                        same_actions=same / n if n else 0.0, mean_agree_steps=agree_total / n if n else 0.0)
