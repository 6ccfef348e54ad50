"""Score an experiment's finished arms with the *sampled* policy on the same test games.

No paper equation. ``shared/EXPERIMENTS.md`` asks for greedy (and sampled) scores; the arms
(``experiment.run_arm``) report greedy only. This re-scores the finished partitions of the arms
given (their saved policies, the same test games, one sampled episode per game with the
evaluation's per-game seeds, so a pair of policies meets the same draws where they act alike) and
writes them as their own experiment ``<testbed>_sampled`` (rows, per-game files, paired and pooled
tables: ``experiment_results.write_results``), with the arms' cost columns unchanged.

    python scripts/sampled_scores.py mapreader --arms init,real_rl --seeds 0,1,2 \\
        --data data/experiments --results results
"""

from __future__ import annotations

import argparse
import os
import sys

import pyarrow as pa


def sampled_games(tb, work: str, policy_dir: str, test, name: str, seed: int) -> pa.Table:
    from dreamgym_core.evaluation import evaluate, lm_policy_factory
    from dreamgym_core.experiment import GAME_SCHEMA, _real_envs
    from dreamgym_core.loop import LoopConfig
    from dreamgym_core.models import load_checkpoint

    model, tok, _ = load_checkpoint(policy_dir)
    episodes: dict = {}
    cfg = LoopConfig(eval_tasks=len(test), sim_eval_tasks=0, eval_max_steps=tb.max_steps, seed=seed)
    evaluate(lm_policy_factory(model, tok, name), name, 0, test, _real_envs(tb, work), None, None, cfg,
             real_transitions=0, modes=("sampled",), episodes=episodes, log=lambda _: None)
    games = sorted(episodes["sampled"], key=lambda t: t.task.task_id)
    return pa.Table.from_pylist([{"game": t.task.task_id, "won": bool(t.won), "steps": len(t.steps),
                                  "ret": float(t.ret)} for t in games], schema=GAME_SCHEMA)


def main(argv=None) -> int:
    from dreamgym_core.evaluation import wilson_interval
    from dreamgym_core.experiment import arm_dir, get_testbed, load_arm, plan, split_arm, splits
    from dreamgym_core.experiment_results import write_results
    from dreamgym_core.experiment_stages import bc_policy

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("testbed")
    p.add_argument("--arms", default="init,real_rl")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data", required=True, help="the experiment's work folder (where its stages are cached)")
    p.add_argument("--results", default="results")
    a = p.parse_args(argv)
    tb = get_testbed(a.testbed)
    _, _, test = splits(tb, a.data)
    finished = []
    for name in a.arms.split(","):
        arm, algorithm = split_arm(name)
        for seed in (int(s) for s in a.seeds.split(",")):
            out = arm_dir(tb, arm, algorithm, seed, a.data)
            if not os.path.exists(os.path.join(out, "row.json")):
                sys.exit(f"{a.testbed}/{name}/seed {seed}: not finished in {out}; run `dreamgym experiment` first")
            row, _ = load_arm(out)
            kind = plan(tb, arm, algorithm, seed).kind
            if kind == "init":
                policy = os.path.join(bc_policy(tb, a.data, tb.pi0, seed, "pi0"), "policy")
            elif kind == "bc":
                policy = os.path.join(bc_policy(tb, a.data, tb.sft, seed, "sft"), "policy")
            else:
                policy = os.path.join(out, "policy")
            games = sampled_games(tb, a.data, policy, test, f"{name}-sampled", seed)
            wins = sum(games["won"].to_pylist())
            lo, hi = wilson_interval(wins, games.num_rows)
            row = {**row, "testbed": f"{tb.name}_sampled", "success": round(wins / games.num_rows, 4),
                   "ci_low": round(lo, 4), "ci_high": round(hi, 4)}
            print(f"{tb.name}/{name}/seed {seed}: sampled success {row['success']:.3f} [{lo:.2f}, {hi:.2f}] "
                  f"(greedy {load_arm(out)[0]['success']:.3f})", flush=True)
            finished.append((row, games))
    paths = write_results(a.results, f"{tb.name}_sampled", finished)
    print(paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
