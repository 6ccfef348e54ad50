"""Evaluation: a policy on held-out tasks in the real env (and in M_exp for the sim-real gap).

``evaluate`` is the one evaluation the project runs: every policy row it reports (random, SFT init,
DreamGym each iteration, S2R, real-RL, the experiments) comes from it, and its numbers from
``summarize``: success rate with a Wilson 95% interval, returns, lengths. Paired tests of two
policies (``paired_comparison``) and of M_exp against the real env (``sim_real_pairs``) sit beside it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import pyarrow as pa

from dreamgym_core.schema import Task, Trajectory

if TYPE_CHECKING:
    from dreamgym_core.loop import LoopConfig


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


# --------------------------------------------------------------------------------------------
# Evaluating a policy

def eval_rows(policy: str, iteration: int, real: Sequence[Trajectory], sim: Sequence[Trajectory] | None,
              real_transitions: int, mode: str) -> dict:
    """One ``policy_eval`` row: success with a Wilson interval on real held-out tasks, and in M_exp."""
    r = summarize(real)
    row = {"policy": policy, "iteration": iteration, "mode": mode, "episodes": r.episodes,
           "success_rate": r.success_rate, "ci_low": r.ci_low, "ci_high": r.ci_high,
           "mean_return": r.mean_return, "mean_steps": r.mean_steps, "invalid_action_rate": r.invalid_action_rate,
           "real_transitions": int(real_transitions), "sim_success_rate": None, "sim_real_gap": None}
    if sim is not None and len(sim):
        s = summarize(sim)
        # the gap compares the same tasks: success in M_exp minus success in the real env on those tasks
        ids = {t.task.task_id for t in sim}
        same = [t for t in real if t.task.task_id in ids]
        real_same = sum(t.won for t in same) / max(len(same), 1)
        row["sim_success_rate"] = s.success_rate
        row["sim_real_gap"] = s.success_rate - real_same
    return row


EVAL_SCHEMA = pa.schema([
    ("policy", pa.string()), ("iteration", pa.int64()), ("mode", pa.string()), ("episodes", pa.int64()),
    ("success_rate", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    ("mean_return", pa.float64()), ("mean_steps", pa.float64()), ("invalid_action_rate", pa.float64()),
    ("real_transitions", pa.int64()), ("sim_success_rate", pa.float64()), ("sim_real_gap", pa.float64()),
])
"""``policy_eval`` rows (issue 5): policy in {random, sft, dreamgym, s2r, real_rl}; mode greedy|sampled."""


def eval_table(rows: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=EVAL_SCHEMA)


def lm_policy_factory(model, tok, name: str) -> Callable[[str], object]:
    """mode ('greedy' | 'sampled') -> an LMPolicy over ``model`` (in its checkpoint's prompt format)."""
    from dreamgym_core.policy import LMPolicy

    return lambda mode: LMPolicy(model, tok, name, greedy=mode == "greedy")


def evaluate(make_policy: Callable[[str], object], name: str, k: int, tasks: Sequence[Task], make_real, make_sim,
             init_state, cfg: "LoopConfig", *, real_transitions: int, log: Callable[[str], None] = print,
             modes: Sequence[str] = ("greedy",), episodes: dict | None = None, sim_episodes: dict | None = None,
             group_size: int = 1) -> pa.Table:
    """Success on held-out real tasks per mode; success in M_exp (first mode) on the first
    ``sim_eval_tasks`` of them (the same tasks, same start states, same policy seeds) for
    ``sim_real_gap``. ``group_size`` episodes per task on both sides (a sampled policy's success on
    50 tasks has a standard error near 0.06; more episodes measure it closer). ``episodes`` /
    ``sim_episodes``, if given, receive each mode's real / M_exp trajectories (for paired comparisons:
    two policies on the same tasks, or one policy's episodes in M_exp against the real ones)."""
    from dreamgym_core.rollout import RolloutConfig, rollout

    tasks = sorted(tasks, key=lambda t: t.task_id)[:cfg.eval_tasks]
    rows = []
    for mode in modes:
        pol = make_policy(mode)
        rc = RolloutConfig(group_size=group_size, max_steps=cfg.eval_max_steps, batch_size=8, source="real",
                           iteration=k, seed=cfg.seed)
        real_env = make_real()
        try:
            real, _ = rollout(real_env, pol, tasks, rc)
        finally:
            real_env.close()
        if episodes is not None:
            episodes[mode] = real
        sim = None
        if mode == modes[0] and cfg.sim_eval_tasks and make_sim is not None:
            sim, _ = rollout(make_sim(init_state), pol, tasks[:cfg.sim_eval_tasks],
                             RolloutConfig(group_size=group_size, max_steps=cfg.eval_max_steps,
                                           batch_size=cfg.rollout_batch, source="synthetic", iteration=k,
                                           seed=cfg.seed))
            if sim_episodes is not None:
                sim_episodes[mode] = sim
        row = eval_rows(name, k, real, sim, real_transitions, mode)
        log(f"eval {name}@{k} {mode}: real success {row['success_rate']:.2f} "
            f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
            + (f", M_exp {row['sim_success_rate']:.2f} (gap {row['sim_real_gap']:+.2f})" if sim else ""))
        rows.append(row)
    return eval_table(rows)
