"""Environment throughput: steps/s per adapter under random and expert policies, and collection.

    python -m bench.env_throughput [--episodes 20] [--repeats 3] [--only twx]

Each cell is the median over ``--repeats`` runs of the same episodes (machines are shared and
noisy); the step time includes building the abstract state. Adapters that cannot start here
(e.g. a missing engine) are reported as such instead of failing the table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from dreamgym_core.collect import CollectConfig, collect
from dreamgym_core.envs import EnvSpec, make_env

SPECS = [
    ("twx twc", EnvSpec("twx", "twc")),
    ("twx cookingworld", EnvSpec("twx", "cookingworld")),
    ("textworld tw-simple", EnvSpec("textworld", "tw-simple",
                                     json.dumps({"rewards": "dense", "goal": "detailed"}),
                                     cache_dir="data/cache")),
    ("scienceworld boil", EnvSpec("scienceworld", "boil", json.dumps({"simplification": "easy"}))),
    ("miniwob mix", EnvSpec("miniwob", "mix")),
]


def _steps_per_s(env, tasks, policy: str, max_steps: int, seed: int) -> float:
    rng = random.Random(seed)
    steps, elapsed = 0, 0.0
    for task in tasks:
        obs = env.reset(task)
        actions = env.expert_actions() if policy == "expert" else None
        for t in range(max_steps if actions is None else len(actions)):
            action = actions[t] if actions is not None else rng.choice(obs.candidates or ["look around"])
            t0 = time.perf_counter()
            res = env.step(action)
            elapsed += time.perf_counter() - t0
            steps += 1
            if res.done:
                break
            obs = res.obs
    return steps / elapsed if elapsed else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--only", default="", help="substring filter on the adapter name")
    args = ap.parse_args(argv)

    rows = []
    for name, spec in SPECS:
        if args.only and args.only not in name:
            continue
        try:
            t0 = time.perf_counter()
            env = make_env(spec)
            tasks = env.tasks("train", args.episodes)
            setup = time.perf_counter() - t0
        except Exception as exc:  # report, don't abort: one missing engine must not hide the others
            rows.append((name, "unavailable", "", "", "", f"{type(exc).__name__}: {exc}"[:60]))
            continue
        try:
            rnd = [_steps_per_s(env, tasks, "random", args.max_steps, r) for r in range(args.repeats)]
            exp = [_steps_per_s(env, tasks, "expert", args.max_steps, r) for r in range(args.repeats)]
            col = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                _, stats = collect(env, tasks, CollectConfig(max_steps=args.max_steps, seed=r))
                col.append(stats.transitions / (time.perf_counter() - t0))
            rows.append((name, f"{statistics.median(rnd):,.0f}", f"{statistics.median(exp):,.0f}",
                         f"{statistics.median(col):,.0f}", f"{setup:.1f}", ""))
        finally:
            env.close()

    header = ("adapter", "random steps/s", "expert steps/s", "collect transitions/s", "setup s", "note")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"episodes={args.episodes} repeats={args.repeats} (median) max_steps={args.max_steps}")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
