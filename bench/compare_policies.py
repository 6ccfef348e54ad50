"""Real held-out success of several policies on the same games, each compared with the first.

    python -m bench.compare_policies DATA NAME=DIR [NAME=DIR ...] [eval=600] [modes=greedy,sampled]
                                     [max_steps=20]

DATA is a data root with ``seed_tasks``, ``eval_tasks`` and ``offline_trajectories`` materialized;
each DIR is a policy checkpoint (``policy_init``, a DreamGym loop ``policy`` partition, S2R, ...).
Every policy plays the same ``eval`` held-out real games (``bench.rl_in_mexp.heldout_games``: the
test games, then training-fold seeds below ``heldout_start``, never a train task) with the same
seeds, greedy and sampled. Per mode: success with its Wilson 95% interval, and against the first
policy on the same games: games only this policy won / games only the first won, exact McNemar p
(``evaluation.paired_comparison``). Nothing is written to DATA.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from assets.runtime import real_env_factory
    from bench.rl_in_mexp import heldout_games
    from dreamgym_core.evaluation import paired_comparison
    from dreamgym_core.io import read_parquet
    from dreamgym_core.loop import LoopConfig, evaluate, lm_policy_factory
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.schema import tasks_from_arrow
    from pipelines.resources import Experiment

    data = argv[0] if argv else ""
    kw = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    options = {"eval", "modes", "max_steps"}
    policies = [(k, v) for k, v in kw.items() if k not in options]
    if not data or not policies:
        print(__doc__)
        return 2
    for name, path in policies:
        if not os.path.isdir(path):
            raise SystemExit(f"bench.compare_policies: {name}={path}: no such checkpoint directory")
    modes = tuple(kw.get("modes", "greedy,sampled").split(","))
    if not set(modes) <= {"greedy", "sampled"}:
        raise SystemExit(f"bench.compare_policies: modes={kw['modes']!r}; use greedy and/or sampled")
    exp = Experiment()
    train = tasks_from_arrow(read_parquet(os.path.join(data, "parquet", "seed_tasks.parquet")))
    test = heldout_games(data, exp, train, int(kw.get("eval", 600)))
    lc = LoopConfig(eval_tasks=len(test), sim_eval_tasks=0, eval_max_steps=int(kw.get("max_steps", 20)))
    base: dict = {}
    rows = []
    for name, path in policies:
        model, tok, _ = load_checkpoint(path)
        episodes: dict = {}
        table = evaluate(lm_policy_factory(model, tok, name), name, 0, test, real_env_factory(exp), None, None, lc,
                         real_transitions=0, modes=modes, log=lambda s: None, episodes=episodes)
        for r in table.to_pylist():
            vs = ""
            if r["mode"] in base:
                c = paired_comparison(base[r["mode"]], episodes[r["mode"]])
                vs = f"+{c.better} / -{c.worse}, p={c.p_value:.3f}"
            else:
                base[r["mode"]] = episodes[r["mode"]]
            rows.append((name, r["mode"], r["success_rate"], r["ci_low"], r["ci_high"], vs))
            print(f"{name} {r['mode']}: real {r['success_rate']:.3f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                  + (f"  vs {policies[0][0]} {vs}" if vs else ""), flush=True)
    print(f"\n{len(test)} held-out games; vs {policies[0][0]}: games only this policy won / games only "
          f"{policies[0][0]} won, exact McNemar p\n| policy | mode | real success [95% CI] | vs {policies[0][0]} |\n"
          "|---|---|---|---|")
    for name, mode, rate, lo, hi, vs in rows:
        print(f"| {name} | {mode} | {rate:.3f} [{lo:.2f}, {hi:.2f}] | {vs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
