"""MiniWoB++ adapter: expert and random success per task and split, step and reset rates, collection.

    python -m bench.miniwob_env [--seeds 20] [--collect-tasks 60]

For every task of ``miniwob_state.TASKS`` and every split, ``--seeds`` tasks (seeds) are played by
the scripted expert and by a uniform random policy over the candidates (``--max-steps`` cap).
Step rates time ``env.step`` alone (abstract state included); reset rates include loading a task's
page when the previous episode was on another one. Then ``collect`` (the offline data of the
assets, default behaviours) runs on ``--collect-tasks`` training tasks of the mix. One shared
headless Chromium serves everything. Prints a Markdown table (docs/environments.md).
"""

from __future__ import annotations

import argparse
import random
import time

from dreamgym_core.collect import CollectConfig, collect
from dreamgym_core.envs import EnvSpec, make_env
from dreamgym_core.envs.miniwob_state import TASKS


def _play(env, tasks, policy: str, max_steps: int, seed: int) -> dict:
    rng = random.Random(seed)
    wins = steps = 0
    step_s = reset_s = 0.0
    for task in tasks:
        t0 = time.perf_counter()
        obs = env.reset(task)
        reset_s += time.perf_counter() - t0
        plan = env.expert_actions()
        for t in range(max_steps):
            if policy == "expert":
                if t >= len(plan):
                    break
                action = plan[t]
            else:
                action = rng.choice(obs.candidates)
            t0 = time.perf_counter()
            res = env.step(action)
            step_s += time.perf_counter() - t0
            steps += 1
            if res.done:
                wins += int(res.won)
                break
            obs = res.obs
    return {"success": wins / len(tasks), "steps": steps, "step_s": step_s, "reset_s": reset_s,
            "mean_length": steps / len(tasks)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="tasks (seeds) per task kind and split")
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--collect-tasks", type=int, default=60)
    args = ap.parse_args(argv)

    rows = []
    totals = {"steps": 0, "step_s": 0.0, "resets": 0, "reset_s": 0.0}
    t0 = time.perf_counter()
    env = make_env(EnvSpec("miniwob", "mix"))
    try:
        env.tasks("train", 1)
        print(f"browser start + first page: {time.perf_counter() - t0:.2f} s")
        for name in TASKS:
            one = make_env(EnvSpec("miniwob", name))  # one task kind: seeds 0.. of each split; a tab of the same browser
            row = [name]
            try:
                for split in ("train", "dev", "test"):
                    tasks = one.tasks(split, args.seeds)
                    exp = _play(one, tasks, "expert", args.max_steps, 0)
                    rnd = _play(one, tasks, "random", args.max_steps, 1)
                    for r in (exp, rnd):
                        totals["steps"] += r["steps"]
                        totals["step_s"] += r["step_s"]
                        totals["resets"] += len(tasks)
                        totals["reset_s"] += r["reset_s"]
                    row += [f"{exp['success']:.2f}", f"{rnd['success']:.2f}"]
            finally:
                one.close()
            row.append(f"{exp['mean_length']:.1f}")
            rows.append(row)
        t0 = time.perf_counter()
        tasks = env.tasks("train", args.collect_tasks)
        task_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, stats = collect(env, tasks, CollectConfig(max_steps=args.max_steps, invalid_rate=0.25))
        collect_s = time.perf_counter() - t0
    finally:
        env.close()

    header = ["task", "expert train", "random train", "expert dev", "random dev", "expert test", "random test",
              "expert steps"]
    print(f"\n{args.seeds} seeds per task and split; random = uniform over the candidates, "
          f"at most {args.max_steps} steps")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\nenv.step: {totals['steps'] / totals['step_s']:.1f} steps/s over {totals['steps']} steps; "
          f"env.reset: {totals['resets'] / totals['reset_s']:.1f} resets/s over {totals['resets']} resets "
          f"(same page as the previous episode)")
    print(f"tasks('train', {args.collect_tasks}) (one reset each, round robin over pages): {task_s:.1f} s")
    print(f"collect on {args.collect_tasks} tasks: {stats.episodes} episodes, {stats.transitions} transitions in "
          f"{collect_s:.1f} s = {stats.transitions / collect_s:.1f} transitions/s; success "
          f"{stats.successes / stats.episodes:.2f}; crashes {stats.crashes}; truncated {stats.truncated}; "
          f"kinds {dict(sorted(stats.action_kinds.items()))}")


if __name__ == "__main__":
    main()
