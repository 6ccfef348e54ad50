"""ALFWorld (locally generated games): split sizes, expert success and engine speed.

    python -m bench.alfworld_games [--games 12] [--splits train,dev,test,test_pairs] [--cache DIR]

(test_pairs: the test split of settings {"heldout": "pairs"}: seen floor plans, unseen goal pairings)

Per split: floor plans and goal pairings available, then over the first ``--games`` games (two of
each task type): the handcoded expert's success within 50 steps, the success of the cached expert
path (FastDownward's plan where the handcoded expert failed) and its mean length, reset time (the
first reset of a game also plays the expert path once and caches it) and steps/s of the expert and of a uniformly random policy (the step time
includes building the abstract state and the admissible commands).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from dreamgym_core.envs import EnvSpec, make_env
from dreamgym_core.envs.alfworld_gen import TASK_TYPES, heldout_pair, split_floor_plans


def pairings() -> tuple[int, int]:
    """(seen, held-out) (object type, receptacle type) pairs that ALFWorld's tables allow."""
    import alfworld.gen.constants as C

    pairs = {(o, r) for r, objs in C.VAL_RECEPTACLE_OBJECTS.items() for o in objs if not o.endswith("Sliced")}
    held = sum(heldout_pair(o, r) for o, r in pairs)
    return len(pairs) - held, held


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--games", type=int, default=12)
    ap.add_argument("--splits", default="train,dev,test,test_pairs")
    ap.add_argument("--random-steps", type=int, default=20)
    ap.add_argument("--cache", default="data/cache")
    args = ap.parse_args(argv)
    seen, held = pairings()
    print(f"goal pairings (object type, receptacle type): {seen} seen, {held} held out for test_pairs")
    envs = {heldout: make_env(EnvSpec("alfworld", "all", json.dumps({"heldout": heldout}), cache_dir=args.cache,
                                      step_limit=50)) for heldout in ("layouts", "pairs")}
    rng = random.Random(0)
    print("| split | floor plans | games | handcoded expert wins | expert wins (planner fallback) | expert steps "
          "| first reset s | reset s | expert steps/s | random steps/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        for split in args.splits.split(","):
            env = envs["pairs" if split.endswith("_pairs") else "layouts"]
            handcoded, wins, lengths, first, resets, t_exp, n_exp, t_rand, n_rand = [], [], [], [], [], 0.0, 0, 0.0, 0
            per_type = {t: 0 for t in TASK_TYPES}
            for task in env.tasks(split.removesuffix("_pairs"), args.games):
                t0 = time.perf_counter()
                env.reset(task)
                first.append(time.perf_counter() - t0)
                gold, res = env.expert_actions(), None
                for action in gold:
                    t0 = time.perf_counter()
                    res = env.step(action)
                    t_exp, n_exp = t_exp + time.perf_counter() - t0, n_exp + 1
                won = bool(res and res.won)
                wins.append(won)
                handcoded.append(won and env.expert_info(task)["expert"] == "handcoded")
                per_type[TASK_TYPES[task.seed % len(TASK_TYPES)]] += won
                lengths.append(len(gold))
                t0 = time.perf_counter()
                obs = env.reset(task)
                resets.append(time.perf_counter() - t0)
                for _ in range(args.random_steps):
                    t0 = time.perf_counter()
                    res = env.step(rng.choice(obs.candidates))
                    t_rand, n_rand = t_rand + time.perf_counter() - t0, n_rand + 1
                    if res.done:
                        break
                    obs = res.obs
            print(f"| {split} | {len(split_floor_plans(split))} | {len(wins)} | {sum(handcoded)}/{len(wins)} "
                  f"| {sum(wins)}/{len(wins)} "
                  f"| {statistics.mean(lengths):.1f} | {statistics.median(first):.2f} | {statistics.median(resets):.2f} "
                  f"| {n_exp / t_exp:.1f} | {n_rand / t_rand:.1f} |", flush=True)
            print(f"  wins per task type: {per_type}", flush=True)
    finally:
        for env in envs.values():
            env.close()


if __name__ == "__main__":
    main()
