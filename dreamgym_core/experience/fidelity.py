"""Fidelity of M_exp against held-out real experience: single steps (teacher-forced) and drift.

No paper equation: the paper measures M_exp only through the agents trained in it. These metrics
ask Eq. 4 directly: given the real (s_t, a_t, H_t, D_k), does M_exp predict the real s_{t+1} and
r_{t+1}? Every number has a "nothing changes" baseline beside it (``summarize_fidelity``), and
``multi_step_drift`` replays real actions open loop so errors compound as in a rollout. Prompts
come from the same ``prompt.step_prompt`` as SFT and simulation.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from dreamgym_core.experience.prompt import Query, Retrieve, _feedback, demos_for, has_progress, row_progress, \
    step_prompt
from dreamgym_core.experience.simulator import ExperienceModel, outcome
from dreamgym_core.state import AbstractState
from dreamgym_core.state_delta import apply


def _token_f1(a: str, b: str) -> float:
    ta, tb = a.split(), b.split()
    if not ta and not tb:
        return 1.0
    common = sum(min(ta.count(w), tb.count(w)) for w in set(ta))
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def _content(state: str) -> str:
    """The state without its feedback line (what the identity baseline can get right)."""
    return "\n".join(state.split("\n")[1:])


def action_type(action: str) -> str:
    """The verb of an action, for per-type fidelity: "put dirty jeans in basket" -> "put"."""
    words = action.split()
    return words[0].lower() if words else ""


def score_transitions(sim: ExperienceModel, rows: Sequence[Mapping], retrieve: Retrieve | None = None,
                      select: Sequence[bool] | None = None) -> list[dict]:
    """Teacher-forced predictions on real transitions: one record per selected row.

    rows: real transitions in trajectory order (TRAJECTORY rows); every row feeds the histories,
    only rows with ``select`` True (default all) are predicted. ``retrieve`` gives D_k in one call
    (default: the simulator's own retriever). A record holds the real row's
    outcome, M_exp's prediction (next state after applying its delta, win, valid, parse ok) and the
    "nothing changes" baseline's; ``summarize_fidelity`` turns records into metrics.
    """
    cfg = sim.cfg.prompt
    retrieve = sim.retrieve if retrieve is None else retrieve
    select = [True] * len(rows) if select is None else list(select)
    scored = cfg.progress and has_progress(rows)
    demos = demos_for(retrieve, [Query(r.get("task_id") or "", r["state"], r["action"])
                                 for r, keep in zip(rows, select) if keep], cfg)
    prompts, contexts, history, prev, chosen, before = [], [], [], None, [], []
    for r, keep in zip(rows, select):
        if r["traj_id"] != prev:
            history, prev = [], r["traj_id"]
        if keep:
            p0 = row_progress(r, scored)[0]
            prompt, refs = step_prompt(r.get("instruction") or "", history, r["state"], r["action"], cfg,
                                       demos=demos[len(prompts)], progress=p0, known=sim.known)
            prompts.append(prompt)
            contexts.append((r["state"], refs))
            chosen.append(r)
            before.append(p0)
        history.append((r["action"], _feedback(r["next_state"])))
    preds = sim.predict(prompts, contexts)
    out = []
    for r, p, p0 in zip(chosen, preds, before):
        d = p.effective_delta()
        _, pred_win, _ = outcome(p, p0)
        out.append({"action_type": action_type(r["action"]), "state": r["state"], "next_state": r["next_state"],
                    "pred_state": apply(AbstractState.parse(r["state"]), d).render(),
                    "real_win": bool(r["won"]) and float(r["reward"]) > 0, "real_reward": float(r["reward"]),
                    "real_valid": bool(r["valid"]), "pred_win": pred_win,
                    "pred_valid": bool(p.ok and d.valid), "parsed": bool(p.ok)})
    return out


def summarize_fidelity(records: Sequence[Mapping]) -> dict[str, float]:
    """Metrics over ``score_transitions`` records (all in [0, 1]; NaN where undefined).

    state_exact_match (whole next state incl. feedback), content_exact_match (without feedback),
    state_token_f1, reward_accuracy, valid_rate (parseable outputs), win_recall, win_precision,
    invalid_action_accuracy (real-invalid actions predicted invalid), valid_action_accuracy, and
    ``baseline_*`` for the prediction "next state = current state, reward 0, valid, not done".
    """
    n = len(records)
    nan = float("nan")

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values) if values else nan

    wins = [r for r in records if r["real_win"]]
    pred_wins = [r for r in records if r["pred_win"]]
    invalid = [r for r in records if not r["real_valid"]]
    valid = [r for r in records if r["real_valid"]]
    return {
        "state_exact_match": mean(r["pred_state"] == r["next_state"] for r in records),
        "content_exact_match": mean(_content(r["pred_state"]) == _content(r["next_state"]) for r in records),
        "state_token_f1": mean(_token_f1(r["pred_state"], r["next_state"]) for r in records),
        "reward_accuracy": mean((1.0 if r["pred_win"] else 0.0) == r["real_reward"] for r in records),
        "valid_rate": mean(r["parsed"] for r in records),
        "win_recall": mean(r["pred_win"] for r in wins),
        "win_precision": mean(r["real_win"] for r in pred_wins),
        "invalid_action_accuracy": mean(r["parsed"] and not r["pred_valid"] for r in invalid),
        "valid_action_accuracy": mean(r["pred_valid"] for r in valid),
        "baseline_state_exact_match": mean(r["state"] == r["next_state"] for r in records),
        "baseline_content_exact_match": mean(_content(r["state"]) == _content(r["next_state"]) for r in records),
        "baseline_state_token_f1": mean(_token_f1(r["state"], r["next_state"]) for r in records),
        "baseline_reward_accuracy": mean(r["real_reward"] == 0.0 for r in records),
        "baseline_valid_rate": 1.0 if n else nan,
        "baseline_win_recall": 0.0 if wins else nan,
        "baseline_win_precision": nan,
        "baseline_invalid_action_accuracy": 0.0 if invalid else nan,
        "baseline_valid_action_accuracy": 1.0 if valid else nan,
        "transitions": float(n), "wins": float(len(wins)), "invalid_actions": float(len(invalid)),
    }


def fidelity(sim: ExperienceModel, rows: Sequence[Mapping], retrieve: Retrieve | None = None,
             select: Sequence[bool] | None = None) -> dict[str, float]:
    """Single-step fidelity of M_exp on real transitions, beside the "nothing changes" baseline
    (``score_transitions`` then ``summarize_fidelity``)."""
    return summarize_fidelity(score_transitions(sim, rows, retrieve, select))


def multi_step_drift(sim: ExperienceModel, trajectories: Sequence, max_steps: int = 10) -> list[dict]:
    """Replay real trajectories' actions through M_exp from their real start states, open loop.

    At step t the simulator sees only its own earlier predictions (its state and history), never
    the real ones, so errors compound. ``sim`` must take its start state from ``Task.initial_state``
    (``SimulatorFactory`` / ``initial_state_fn`` do); each trajectory is replayed as its own task.
    Returns one dict per step t = 1..max_steps with ``trajectories`` (real ones at least t long),
    ``state_exact_match`` / ``content_exact_match`` / ``state_token_f1`` of the simulated state
    after t actions against the real one (a simulated episode that already ended counts as a miss),
    ``sim_alive`` (still running), ``agree_so_far`` (exact match at every step up to t), and the
    same for the baseline "the start state never changes".
    """
    from dataclasses import replace as _replace

    trajs = [t for t in trajectories if t.steps]
    if not trajs:
        return []
    tasks = [_replace(t.task, task_id=f"{t.task.task_id}#{t.traj_id}", initial_state=t.steps[0].state)
             for t in trajs]
    obs = sim.reset_batch(tasks)
    states = [o.state for o in obs]
    alive = [True] * len(trajs)
    agree = [True] * len(trajs)
    out = []
    for t in range(1, max_steps + 1):
        acts = [tr.steps[t - 1].action if (alive[i] and len(tr.steps) >= t) else None
                for i, tr in enumerate(trajs)]
        res = sim.step_batch(acts) if any(a is not None for a in acts) else [None] * len(trajs)
        rec = {"step": t, "trajectories": 0, "state_exact_match": 0.0, "content_exact_match": 0.0,
               "state_token_f1": 0.0, "sim_alive": 0.0, "agree_so_far": 0.0, "baseline_state_exact_match": 0.0,
               "baseline_content_exact_match": 0.0, "baseline_state_token_f1": 0.0}
        for i, tr in enumerate(trajs):
            if len(tr.steps) < t:
                continue
            real = tr.steps[t - 1].next_state
            was_alive = alive[i]
            if res[i] is not None:
                states[i] = res[i].obs.state
                alive[i] = not res[i].done
            match = was_alive and res[i] is not None and states[i] == real
            agree[i] = agree[i] and match
            start = tr.steps[0].state
            rec["trajectories"] += 1
            rec["state_exact_match"] += match
            rec["content_exact_match"] += was_alive and res[i] is not None and _content(states[i]) == _content(real)
            rec["state_token_f1"] += _token_f1(states[i], real) if (was_alive and res[i] is not None) else 0.0
            rec["sim_alive"] += was_alive
            rec["agree_so_far"] += agree[i]
            rec["baseline_state_exact_match"] += start == real
            rec["baseline_content_exact_match"] += _content(start) == _content(real)
            rec["baseline_state_token_f1"] += _token_f1(start, real)
        if not rec["trajectories"]:
            break
        for k in rec:
            if k not in ("step", "trajectories"):
                rec[k] /= rec["trajectories"]
        out.append(rec)
    return out
