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

from dreamgym_core.schema import EVAL_SCHEMA, FIDELITY_METRICS, Task, Trajectory

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
    return paired_outcomes(won_a, won_b)


def paired_outcomes(won_a: dict[str, bool], won_b: dict[str, bool]) -> PairedComparison:
    """``paired_comparison`` on outcomes already reduced to task id -> won (e.g. stored per game)."""
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
# M_exp against held-out real experience (the experience_model_eval asset)

@dataclass(frozen=True)
class FidelityEvalConfig:
    """How much held-out real experience M_exp is scored on."""

    max_transitions: int = 300
    """Held-out transitions scored: all wins and invalid actions up to a third each, the rest ordinary."""
    drift_trajectories: int = 40
    """Held-out real trajectories replayed open-loop through M_exp (multi-step drift)."""
    drift_steps: int = 10
    gap_tasks: int = 50
    """Held-out tasks on which the fixed policies (random, behaviour-cloned) run in M_exp and in the real env."""
    gap_max_steps: int = 20
    gap_episodes: int = 4
    """Episodes per gap task for the sampled (random) policy, in each env; the greedy BC policy runs one
    (its real episodes repeat). 50 tasks x 1 episode give a random policy's success a standard error
    near 0.06, as large as the gap measured; x 4 halves it."""
    seed: int = 0


@dataclass
class FidelityReport:
    rows: list[dict]
    """``schema.FIDELITY_SCHEMA`` rows: overall, action:<verb>, drift:<t>, policy:<name>."""
    overall: dict
    drift: list[dict]


def _metric_cols(m: dict) -> dict:
    return {"transitions": int(m["transitions"]), **{k: m[k] for k in FIDELITY_METRICS},
            **{"baseline_" + k: m["baseline_" + k] for k in FIDELITY_METRICS}}


def heldout_selection(rows: Sequence[dict], max_transitions: int, rng) -> list[bool]:
    """Which of ``rows`` (held-out transitions) to score: all wins and invalid actions up to a third of
    ``max_transitions`` each, the rest ordinary ones, drawn with ``rng`` (a ``random.Random``)."""
    third = max_transitions // 3
    wins = [i for i, r in enumerate(rows) if r["won"]]
    invalid = [i for i, r in enumerate(rows) if not r["valid"]]
    other = [i for i, r in enumerate(rows) if r["valid"] and not r["won"]]
    chosen = set(rng.sample(wins, min(third, len(wins))) + rng.sample(invalid, min(third, len(invalid))))
    chosen |= set(rng.sample(other, min(max_transitions - len(chosen), len(other))))
    return [i in chosen for i in range(len(rows))]


def model_fidelity(real: Sequence[Trajectory], tasks, make_sim, make_real, start_states, policy, cfg: FidelityEvalConfig,
                   base: dict, log=print) -> FidelityReport:
    """M_exp against held-out real experience, each number beside the "nothing changes" baseline:
    1. single steps of ``real`` teacher-forced (per action verb too), 2. multi-step drift of an open-loop
    replay of real trajectories, 3. the sim-real gap of a random and the behaviour-cloned ``policy``
    ((model, tokenizer)) on the first ``cfg.gap_tasks`` of ``tasks``, paired episode by episode.
    ``make_sim(initial_state)`` -> an M_exp env; ``start_states(tasks)`` -> task_id -> real start state;
    ``make_real`` None (the offline-only path, no live env): part 3 is skipped, with a log line;
    ``base``: the columns every row carries (model, ablation)."""
    import random
    import time

    from dreamgym_core.experience_model import multi_step_drift, score_transitions, summarize_fidelity
    from dreamgym_core.loop import LoopConfig, evaluate, initial_state_fn, lm_policy_factory
    from dreamgym_core.rollout import RandomPolicy
    from dreamgym_core.schema import trajectories_to_arrow

    rows = trajectories_to_arrow(real).to_pylist()
    rng = random.Random(cfg.seed)
    select = heldout_selection(rows, cfg.max_transitions, rng)
    out: list[dict] = []

    # 1. single steps, teacher-forced (real state and history)
    started = time.perf_counter()
    records = score_transitions(make_sim(lambda t: ""), rows, select=select)
    per_s = len(records) / max(time.perf_counter() - started, 1e-9)
    overall = summarize_fidelity(records)
    out.append({**base, "scope": "overall", **_metric_cols(overall), "predictions_per_s": per_s})
    for verb in sorted({r["action_type"] for r in records}):
        out.append({**base, "scope": f"action:{verb}",
                    **_metric_cols(summarize_fidelity([r for r in records if r["action_type"] == verb]))})
    log(f"single-step fidelity on {len(records)} held-out transitions: exact match "
        f"{overall['state_exact_match']:.3f} (baseline {overall['baseline_state_exact_match']:.3f}), "
        f"win recall {overall['win_recall']:.3f}, invalid-action accuracy {overall['invalid_action_accuracy']:.3f}")

    # 2. multi-step drift: real actions replayed through M_exp's own predicted states
    replay = rng.sample(list(real), min(cfg.drift_trajectories, len(real)))
    drift = multi_step_drift(make_sim(initial_state_fn({})), replay, cfg.drift_steps)
    for d in drift:
        out.append({**base, "scope": f"drift:{d['step']}", "step": d["step"], "transitions": d["trajectories"],
                    "sim_alive": d["sim_alive"], "agree_so_far": d["agree_so_far"],
                    **{k: d[k] for k in ("state_exact_match", "content_exact_match", "state_token_f1",
                                         "baseline_state_exact_match", "baseline_content_exact_match",
                                         "baseline_state_token_f1")}})

    # 3. sim-real gap of fixed policies on the same held-out tasks and start states
    if make_real is None:
        log("sim-real gap of fixed policies: skipped, no live env (offline-only: M_exp is scored on the "
            "held-out logs above)")
        return FidelityReport(rows=out, overall=overall, drift=drift)
    gap_tasks = list(tasks)[:cfg.gap_tasks]
    loop_cfg = LoopConfig(eval_tasks=len(gap_tasks), sim_eval_tasks=len(gap_tasks), eval_max_steps=cfg.gap_max_steps,
                          seed=cfg.seed)
    run = dict(tasks=gap_tasks, make_real=make_real, make_sim=make_sim, cfg=loop_cfg, real_transitions=0,
               init_state=initial_state_fn(start_states(gap_tasks)), log=log)
    model, tok = policy
    for name, make, mode in (("random", lambda m: RandomPolicy("random"), "sampled"),
                             ("bc", lm_policy_factory(model, tok, "bc"), "greedy")):
        real_eps, sim_eps = {}, {}
        r = evaluate(make, name, 0, modes=(mode,), episodes=real_eps, sim_episodes=sim_eps,
                     group_size=cfg.gap_episodes if mode == "sampled" else 1, **run).to_pylist()[0]
        pairs = sim_real_pairs(real_eps[mode], sim_eps[mode])
        log(f"{name}: {pairs.pairs} episode pairs, won in both {pairs.both}, only in M_exp {pairs.sim_only}, "
            f"only real {pairs.real_only}; same actions throughout {pairs.same_actions:.2f}, "
            f"mean agreeing steps {pairs.mean_agree_steps:.1f}")
        out.append({**base, "scope": f"policy:{name}", "policy": name, "episodes": r["episodes"],
                    "sim_success_rate": r["sim_success_rate"], "real_success_rate": r["success_rate"],
                    "sim_real_gap": r["sim_real_gap"], "sim_only_wins": pairs.sim_only,
                    "real_only_wins": pairs.real_only, "both_won": pairs.both, "same_actions": pairs.same_actions})
    return FidelityReport(rows=out, overall=overall, drift=drift)


# Evaluating a policy

def eval_rows(policy: str, iteration: int, real: Sequence[Trajectory], sim: Sequence[Trajectory] | None,
              real_transitions: int, mode: str) -> dict:
    """One ``policy_eval`` row: success with a Wilson interval on real held-out tasks, and in M_exp.

    ``real`` None (the offline-only path: no live env): the real columns are null, ``episodes`` counts
    the M_exp episodes and the interval is M_exp success's."""
    if real is None:
        s = summarize(sim or [])
        return {"policy": policy, "iteration": iteration, "mode": mode, "episodes": s.episodes,
                "success_rate": None, "ci_low": s.ci_low, "ci_high": s.ci_high, "mean_return": s.mean_return,
                "mean_steps": s.mean_steps, "invalid_action_rate": s.invalid_action_rate,
                "real_transitions": int(real_transitions), "sim_success_rate": s.success_rate, "sim_real_gap": None}
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
    two policies on the same tasks, or one policy's episodes in M_exp against the real ones).
    ``make_real`` None (the offline-only path): every mode runs in M_exp only, on the first
    ``sim_eval_tasks``, and the row's real columns are null (``eval_rows``)."""
    from dreamgym_core.rollout import RolloutConfig, rollout

    tasks = sorted(tasks, key=lambda t: t.task_id)[:cfg.eval_tasks]
    rows = []
    for mode in modes:
        pol = make_policy(mode)
        real = None
        if make_real is not None:
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
        if (mode == modes[0] or make_real is None) and cfg.sim_eval_tasks and make_sim is not None:
            sim, _ = rollout(make_sim(init_state), pol, tasks[:cfg.sim_eval_tasks],
                             RolloutConfig(group_size=group_size, max_steps=cfg.eval_max_steps,
                                           batch_size=cfg.rollout_batch, source="synthetic", iteration=k,
                                           seed=cfg.seed))
            if sim_episodes is not None:
                sim_episodes[mode] = sim
        if real is None and sim is None:
            raise ValueError(f"evaluate {name}: no live env (make_real None) and nothing to run in M_exp "
                             f"(sim_eval_tasks {cfg.sim_eval_tasks}, make_sim {'set' if make_sim else 'None'})")
        row = eval_rows(name, k, real, sim, real_transitions, mode)
        if real is None:
            log(f"eval {name}@{k} {mode}: M_exp success {row['sim_success_rate']:.2f} "
                f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}] (no live env)")
        else:
            log(f"eval {name}@{k} {mode}: real success {row['success_rate']:.2f} "
                f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
                + (f", M_exp {row['sim_success_rate']:.2f} (gap {row['sim_real_gap']:+.2f})" if sim else ""))
        rows.append(row)
    return eval_table(rows)
