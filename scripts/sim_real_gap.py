"""The sim-real gap of a finished DreamGym loop's policy: the same greedy episodes in M_exp and in the real env.

For a testbed's seed, the last policy of its DreamGym loop plays the first ``--games`` test games
twice from the same start states: in the real env and in the loop's M_exp, retrieving from the
loop's replay buffer as it stood at the last iteration (a copy: the loop's buffer is not touched).
Episodes are paired by game (``evaluation.sim_real_pairs``). A policy that wins in M_exp where it
loses in the real game was trained on wins the real game does not grant: the gap that RL inside
M_exp cannot see. One row per seed goes to ``results/sim_real_gap.csv`` (replaced per testbed, arm and
seed), and the first ``--show`` pairs whose outcomes differ are printed step by step.

    python scripts/sim_real_gap.py lamp --seed 1 --work WORK/experiments \\
        --mexp WORK/experiments/lamp/mexp-full-s1-<hash> --loop WORK/experiments/lamp/loop-full-grpo-s1-<hash>

``--mexp`` and ``--loop`` name the directories the arm used (``dreamgym experiment`` logs them; a
work dir can hold older recipes beside them, so they are not guessed). Run it with the code that
built them (``PYTHONPATH``), so that M_exp decodes and retrieves as it did in the loop.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile

COLUMNS = ("testbed", "arm", "seed", "policy", "games", "real_success", "sim_success", "both_won", "sim_only",
           "real_only", "neither", "same_actions", "mean_agree_steps", "mexp", "loop")


def last_policy(loop: str) -> tuple[int, str]:
    """(iteration, policy dir) of the loop's last finished iteration."""
    done = sorted(int(d) for d in os.listdir(loop)
                  if d.isdigit() and os.path.isdir(os.path.join(loop, d, "policy")))
    if not done:
        raise SystemExit(f"sim_real_gap: {loop} holds no finished iteration (no NNN/policy)")
    return done[-1], os.path.join(loop, f"{done[-1]:03d}", "policy")


def _step(st) -> str:
    """One step as its action, the feedback and the objects it led to ("-": the episode had ended)."""
    if st is None:
        return "-"
    lines = [ln for ln in (st.next_state or "").splitlines() if ln.startswith(("feedback:", "objects:"))]
    return f"{st.action!r} -> {' | '.join(lines)[:110]}{' WON' if st.won else ''}"


def measure(tb, work: str, mexp: str, loop: str, seed: int, games: int, show: int, arm: str = "dreamgym") -> dict:
    from dreamgym_core.buffer import BufferConfig, ReplayBuffer
    from dreamgym_core.embed import make_embedder
    from dreamgym_core.envs import make_env
    from dreamgym_core.evaluation import evaluate, lm_policy_factory, sim_real_pairs
    from dreamgym_core.experience.retrieval import Retriever
    from dreamgym_core.experience_model import ExperienceModel, PromptConfig, SimConfig, knowledge_from_meta
    from dreamgym_core.experiment import _real_envs, splits
    from dreamgym_core.loop import LoopConfig, initial_state_fn
    from dreamgym_core.models import load_checkpoint

    k, policy_dir = last_policy(loop)
    _, _, test = splits(tb, work)
    test = test[:games]
    model, tok, meta = load_checkpoint(os.path.join(mexp, "final"))
    prompt, knowledge = PromptConfig.from_meta(meta), knowledge_from_meta(meta)
    env = make_env(tb.env_spec(work))
    try:
        propose = env.propose_candidates
        starts = {t.task_id: env.reset(t).state for t in test}
    finally:
        env.close()
    with tempfile.TemporaryDirectory() as tmp:
        retrieve = None
        if prompt.num_demos and os.path.isdir(os.path.join(loop, "lancedb")):
            shutil.copytree(os.path.join(loop, "lancedb"), os.path.join(tmp, "lancedb"))
            buf = ReplayBuffer(os.path.join(tmp, "lancedb"), make_embedder("hashing"),
                               BufferConfig(table="replay_hashing"))
            retrieve = Retriever(buf, iteration=k)

        def make_sim(initial_state):
            return ExperienceModel(model, tok, initial_state=initial_state, propose_candidates=propose,
                                   retrieve=retrieve, cfg=SimConfig(prompt=prompt), knowledge=knowledge)

        pol, ptok, _ = load_checkpoint(policy_dir)
        real_eps, sim_eps = {}, {}
        cfg = LoopConfig(eval_tasks=len(test), sim_eval_tasks=len(test), eval_max_steps=tb.max_steps, seed=seed)
        evaluate(lm_policy_factory(pol, ptok, "loop"), "loop", k, test, _real_envs(tb, work), make_sim,
                 initial_state_fn(starts), cfg, real_transitions=0, episodes=real_eps, sim_episodes=sim_eps,
                 log=lambda _: None)
    real, sim = real_eps["greedy"], sim_eps["greedy"]
    pairs = sim_real_pairs(real, sim)
    by_id = {t.traj_id: t for t in real}
    shown = 0
    for s in sorted(sim, key=lambda t: t.traj_id):
        r = by_id[s.traj_id]
        if s.won == r.won or shown >= show:
            continue
        shown += 1
        print(f"\n--- {s.task.task_id}: M_exp {'won' if s.won else 'lost'}, real {'won' if r.won else 'lost'}")
        for i in range(max(len(s.steps), len(r.steps))):
            a = s.steps[i] if i < len(s.steps) else None
            b = r.steps[i] if i < len(r.steps) else None
            print(f"  step {i + 1}: M_exp {_step(a)}\n          real  {_step(b)}")
    n = max(pairs.pairs, 1)
    return {"testbed": tb.name, "arm": arm, "seed": seed, "policy": f"loop@{k}", "games": pairs.pairs,
            "real_success": round((pairs.both + pairs.real_only) / n, 4),
            "sim_success": round((pairs.both + pairs.sim_only) / n, 4), "both_won": pairs.both,
            "sim_only": pairs.sim_only, "real_only": pairs.real_only, "neither": pairs.neither,
            "same_actions": round(pairs.same_actions, 4), "mean_agree_steps": round(pairs.mean_agree_steps, 2),
            "mexp": os.path.basename(mexp.rstrip("/")), "loop": os.path.basename(loop.rstrip("/"))}


def write_row(path: str, row: dict) -> None:
    """Replace the (testbed, arm, seed) row of ``path`` (atomic: a temp file moved into place)."""
    from dreamgym_core.experiment_results import write_csv

    key = ("testbed", "arm", "seed")
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if tuple(r[k] for k in key) != tuple(str(row[k]) for k in key)]
    write_csv(path, COLUMNS, sorted(rows + [row], key=lambda r: (r["testbed"], r["arm"], int(r["seed"]))))


def main(argv: list[str] | None = None) -> int:
    from dreamgym_core.experiment import get_testbed

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("testbed")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--work", required=True,
                   help="the experiment work dir (the --data of `dreamgym experiment`, then /experiments)")
    p.add_argument("--mexp", required=True, help="the M_exp directory the loop used (holds final/)")
    p.add_argument("--loop", required=True, help="the loop directory (holds NNN/policy and lancedb/)")
    p.add_argument("--arm", default="dreamgym", help="the arm whose loop this is (a label in the rows)")
    p.add_argument("--games", type=int, default=100, help="the first N test games")
    p.add_argument("--show", type=int, default=2, help="print this many pairs whose outcomes differ")
    p.add_argument("--out", default="results/sim_real_gap.csv")
    a = p.parse_args(argv)
    for name in ("mexp", "loop"):
        if not os.path.isdir(getattr(a, name)):
            raise SystemExit(f"sim_real_gap: --{name} {getattr(a, name)} is not a directory")
    if not os.path.isdir(os.path.join(a.mexp, "final")):
        raise SystemExit(f"sim_real_gap: --mexp {a.mexp} has no final/ checkpoint")
    row = measure(get_testbed(a.testbed), a.work, a.mexp, a.loop, a.seed, a.games, a.show, a.arm)
    print(f"\n{row['testbed']} seed {row['seed']} ({row['policy']}, {row['games']} test games, greedy): "
          f"real {row['real_success']:.3f}, M_exp {row['sim_success']:.3f}; won in both {row['both_won']}, "
          f"only in M_exp {row['sim_only']}, only real {row['real_only']}; same actions throughout "
          f"{row['same_actions']:.2f}")
    write_row(a.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
