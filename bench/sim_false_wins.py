"""Why M_exp grants wins: fixed policies in M_exp on held-out games, each simulated win replayed in the real env.

    python -m bench.sim_false_wins DATA [tasks=50] [max_steps=20] [mexp=DIR] [sft=DIR] [show=0]

DATA is a data root with ``experience_model``, ``policy_init`` and ``eval_tasks`` materialized (``make
demo``). The random policy and the behaviour-cloned SFT policy (greedy) run in M_exp from the real
start states of the first ``tasks`` held-out test games; every episode M_exp calls a win is replayed
action by action in the real game and classified:

- ``real win``: the real game is won too;
- ``diverged``: an action of the simulated episode is not among the real game's candidates at that
  point (the simulated state had already drifted);
- ``last put wrong``: the step M_exp called the win did not raise the real score (the item does not
  belong there: a placement error);
- ``last put right``: it did, but the real score is still short of 1 (something else was not done:
  a counting error).

The real score after the replay is shown with each class. ``show=N`` prints N false wins per policy
with the simulated progress beside the real score at every step. Nothing is written to DATA.
"""

from __future__ import annotations

import collections
import glob
import os
import sys


def _one(data: str, pattern: str) -> str:
    found = sorted(p for p in glob.glob(os.path.join(data, "checkpoints", pattern)) if os.path.isdir(p))
    if not found:
        raise SystemExit(f"bench.sim_false_wins: no {pattern} under {data}/checkpoints; materialize it first")
    return found[-1]


def classify(env, traj) -> tuple[str, list[str]]:
    """Replay one simulated win in the real env -> (class, per-step lines)."""
    obs = env.reset(traj.task)
    score = prev = 0.0
    diverged, res, lines = None, None, []
    for k, step in enumerate(traj.steps):
        if step.action not in obs.candidates and diverged is None:
            diverged = k
        prev = score
        res = env.step(step.action)
        obs, score = res.obs, res.score
        lines.append(f"    {step.action:44s} M_exp progress {step.score:.2f}  real score {score:.2f}")
        if res.done and k < len(traj.steps) - 1:
            break
    if res is not None and res.won:
        return "real win", lines
    if diverged is not None:
        return "diverged", lines
    kind = "last put right" if score > prev else "last put wrong"
    return f"{kind}, real score {score:.2f}", lines


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from assets.runtime import heldout, real_start_states
    from dreamgym_core.envs import make_env
    from dreamgym_core.envs.twx import propose_candidates
    from dreamgym_core.experience_model import ExperienceModel, PromptConfig, SimConfig, knowledge_from_meta
    from dreamgym_core.io import read_parquet
    from dreamgym_core.loop import initial_state_fn
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.policy import LMPolicy
    from dreamgym_core.rollout import RandomPolicy, RolloutConfig, rollout
    from pipelines.resources import Experiment

    if not argv:
        print(__doc__)
        return 2
    data = argv[0]
    kw = dict(a.split("=", 1) for a in argv[1:])
    n, max_steps, show = int(kw.get("tasks", 50)), int(kw.get("max_steps", 20)), int(kw.get("show", 0))
    mdir = kw.get("mexp") or _one(data, "experience_model/*/final")
    mexp, mtok, meta = load_checkpoint(mdir)
    pm, ptok, _ = load_checkpoint(kw.get("sft") or _one(data, "policy_init/*"))
    exp = Experiment()
    test = heldout(read_parquet(os.path.join(data, "parquet", "eval_tasks.parquet")))[:n]
    init = initial_state_fn(real_start_states(exp, test))
    print(f"M_exp {mdir}, {len(test)} held-out games, max {max_steps} steps")
    print("\n| policy | M_exp wins | real win | diverged | false: last put wrong | false: last put right |")
    print("|---|---|---|---|---|---|")
    env = make_env(exp.env_spec())
    try:
        for name, policy in (("random", RandomPolicy()), ("bc", LMPolicy(pm, ptok, "bc", greedy=True,
                                                                        max_prompt_tokens=256))):
            sim = ExperienceModel(mexp, mtok, initial_state=init, propose_candidates=propose_candidates,
                                  cfg=SimConfig(prompt=PromptConfig.from_meta(meta)), knowledge=knowledge_from_meta(meta))
            trajs, _ = rollout(sim, policy, test, RolloutConfig(max_steps=max_steps, batch_size=32, history_window=2,
                                                                seed=0))
            kinds: collections.Counter = collections.Counter()
            shown = 0
            for traj in (t for t in trajs if t.won):
                kind, lines = classify(env, traj)
                kinds[kind] += 1
                if kind.startswith("last") and shown < show:
                    shown += 1
                    print(f"\n{name} {traj.task.task_id}: {kind}\n{traj.steps[0].state}\n" + "\n".join(lines) + "\n")

            def count(prefix: str) -> str:
                hits = {k: v for k, v in kinds.items() if k.startswith(prefix)}
                return ", ".join(f"{v} ({k.split('score ')[1]})" if "score" in k else str(v)
                                 for k, v in sorted(hits.items())) or "0"

            print(f"| {name} | {sum(t.won for t in trajs)}/{len(trajs)} | {count('real win')} | {count('diverged')} | "
                  f"{count('last put wrong')} | {count('last put right')} |", flush=True)
    finally:
        env.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
