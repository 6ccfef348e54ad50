"""RL inside M_exp from the SFT policy, with real held-out success before, midway and after.

    python -m bench.rl_in_mexp DATA {grpo|ppo} ITERATIONS [lr=5e-5] [kl=0.1] [tasks=16] [group=4]
                               [epochs=2] [max_steps=12] [eval=50] [sim_eval=50] [mexp=DIR] [sft=DIR]
                               [select=uniform|variance] [recombine=0] [extra=0] [window=2]

DATA is a data root where ``experience_model``, ``policy_init``, ``seed_tasks``, ``eval_tasks`` and
``offline_trajectories`` are materialized (``make demo``, or those assets from the UI). Each
iteration is the paper's step, read as in ``rl.trainer.train_iteration``: rollouts of the current
policy in M_exp on train tasks (GRPO: groups per task) -> advantages -> one PPO/GRPO update, KL to
the SFT policy. Evaluation: greedy and sampled real success on the held-out test games with Wilson
intervals, and greedy success in M_exp on the same games (the sim-real gap). The README's policy
learning table was produced with this program. Nothing is written to DATA. With several
checkpoints under DATA (different configs), ``mexp=`` / ``sft=`` name the ones to use; otherwise
the last by name is taken. ``eval=N`` above the materialized test games adds held-out games of the
training fold from the seeds just below ``heldout_start`` (never the train tasks: checked). Each evaluated policy is
also compared with the SFT policy on the same games, per mode: games only it won, games only SFT
won, and the exact McNemar p-value (``evaluation.paired_comparison``). ``select=variance`` fills up
to half of each iteration's tasks with those whose last group disagreed (highest V_tau of Eq. 7,
``pick_tasks``), the rest drawn uniformly; ``select=uniform`` (default) draws them all uniformly.
``recombine=N`` adds N variants of the train tasks to the pool the iterations draw from
(``curriculum.recombine_tasks``: a loose item swapped for another of the same room, or ``extra=K``
more items), simulated in M_exp only; a policy that solves its train tasks in M_exp (every group
alike, nothing for GRPO to learn) still meets new contexts for known objects there. ``window=N``
is the number of (action, feedback) pairs in the policy's prompt, in rollouts, the update and the
evaluation alike; it must be the window the SFT policy was cloned with (``PolicyInitConfig.history_window``).
"""

from __future__ import annotations

import glob
import os
import sys
import time


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from assets.runtime import offline_start_states, real_env_factory, real_start_states
    from dreamgym_core.envs.twx import propose_candidates
    from dreamgym_core.curriculum import task_reward_variance
    from dreamgym_core.evaluation import paired_comparison
    from dreamgym_core.experience_model import ExperienceModel, PromptConfig, SimConfig, knowledge_from_meta
    from dreamgym_core.io import read_parquet
    from dreamgym_core.loop import LoopConfig, evaluate, initial_state_fn, lm_policy_factory, sample_tasks
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.rl.trainer import PolicyTrainer, RLConfig, train_iteration
    from dreamgym_core.rollout import RolloutConfig
    from dreamgym_core.schema import tasks_from_arrow
    from pipelines.resources import Experiment

    if len(argv) < 3 or argv[1] not in ("grpo", "ppo"):
        print(__doc__)
        return 2
    data, algo, iters = argv[0], argv[1], int(argv[2])
    kw = dict(a.split("=", 1) for a in argv[3:])
    lr, kl = float(kw.get("lr", 5e-5)), float(kw.get("kl", 0.1))
    ntasks, group, epochs = int(kw.get("tasks", 16)), int(kw.get("group", 4)), int(kw.get("epochs", 2))
    max_steps, neval = int(kw.get("max_steps", 12)), int(kw.get("eval", 50))
    select = kw.get("select", "uniform")
    if select not in ("uniform", "variance"):
        raise SystemExit(f"bench.rl_in_mexp: select={select!r}; use uniform or variance")
    nsim = int(kw.get("sim_eval", min(neval, 50)))
    window = int(kw.get("window", 2))
    if window < 0:
        raise SystemExit(f"bench.rl_in_mexp: window={window}; use a history window >= 0")
    torch.set_num_threads(int(kw.get("threads", os.cpu_count() or 2)))

    def one(pattern: str) -> str:
        found = sorted(p for p in glob.glob(os.path.join(data, "checkpoints", pattern)) if os.path.isdir(p))
        if not found:
            raise SystemExit(f"bench.rl_in_mexp: no {pattern} under {data}/checkpoints; materialize it first")
        return found[-1]

    exp = Experiment()
    mexp, mtok, meta = load_checkpoint(kw.get("mexp") or one("experience_model/*/final"))
    prompt = PromptConfig.from_meta(meta)
    sft_dir = kw.get("sft") or one("policy_init/*")
    train = tasks_from_arrow(read_parquet(os.path.join(data, "parquet", "seed_tasks.parquet")))
    test = heldout_games(data, exp, train, neval)
    nrec, extra = int(kw.get("recombine", 0)), int(kw.get("extra", 0))
    starts = {**offline_start_states(read_parquet(os.path.join(data, "parquet", "offline_trajectories.parquet"))),
              **real_start_states(exp, test)}
    init = initial_state_fn(starts)
    pool = train
    if nrec:
        from dreamgym_core.curriculum import recombine_tasks

        pool = train + recombine_tasks(train, starts, nrec, 0, extra=extra)
        print(f"task pool: {len(train)} train tasks + {len(pool) - len(train)} recombined variants", flush=True)

    def make_sim(initial_state=init):
        return ExperienceModel(mexp, mtok, initial_state=initial_state, propose_candidates=propose_candidates,
                               cfg=SimConfig(prompt=prompt), knowledge=knowledge_from_meta(meta))

    lc = LoopConfig(eval_tasks=len(test), sim_eval_tasks=nsim, eval_max_steps=20, history_window=window)
    rows, base = [], {}

    def report(model, tok, name: str, k: int) -> None:
        episodes: dict = {}
        table = evaluate(lm_policy_factory(model, tok, name), name, k, test, real_env_factory(exp), make_sim, init,
                         lc, real_transitions=0, modes=("greedy", "sampled"), log=lambda s: None, episodes=episodes)
        for r in table.to_pylist():
            if not base.get(r["mode"]):
                base[r["mode"]] = episodes[r["mode"]]
                r["vs_sft"] = ""
            else:
                c = paired_comparison(base[r["mode"]], episodes[r["mode"]])
                r["vs_sft"] = f"+{c.better} / -{c.worse}, p={c.p_value:.3f}"
            rows.append(r)
            print(f"{r['policy']}@{k} {r['mode']}: real {r['success_rate']:.2f} [{r['ci_low']:.2f}, "
                  f"{r['ci_high']:.2f}]" + (f" M_exp {r['sim_success_rate']:.2f}" if r["sim_success_rate"]
                                            is not None else "") + (f"  vs SFT {r['vs_sft']}" if r["vs_sft"] else ""),
                  flush=True)

    ref, _, _ = load_checkpoint(sft_dir)
    model, tok, _ = load_checkpoint(sft_dir)
    trainer = PolicyTrainer(model, tok, RLConfig(algorithm=algo, lr=lr, ppo_epochs=epochs, kl_coef=kl,
                                                 history_window=window), ref_model=ref)
    report(model, tok, "sft", 0)
    started = time.perf_counter()
    variance: dict[str, float] = {}  # task id -> V_tau of its latest group (Eq. 7), for select=variance
    for k in range(1, iters + 1):
        tasks, reused = pick_tasks(pool, ntasks, k, variance if select == "variance" else None)
        trajs, stats, m = train_iteration(make_sim(), trainer, tasks, RolloutConfig(
            group_size=group if algo == "grpo" else 1, max_steps=max_steps, batch_size=32, history_window=window,
            source="synthetic", iteration=k, seed=k), policy_name=f"{algo}@{k}")
        variance.update({tid: v for tid, (v, _, _) in task_reward_variance(trajs).items()})
        reuse = f"{reused} of {len(tasks)} tasks reused for their mixed groups, " if select == "variance" else ""
        print(f"iteration {k}: {time.perf_counter() - started:.0f}s, {reuse}M_exp success "
              f"{stats.successes / max(stats.episodes, 1):.2f} over {stats.episodes} episodes, zero-advantage "
              f"groups {m.get('grpo/zero_adv_groups', '-')}/{m.get('grpo/groups', '-')}, kl {m.get('kl', 0):.4f}",
              flush=True)
        if k % max(1, iters // 2) == 0:
            report(trainer.model, tok, algo, k)
    print(f"\n{len(test)} held-out games, M_exp success on the first {nsim}; vs SFT: games only this policy won /"
          " games only SFT won, exact McNemar p\n"
          "| policy | iteration | mode | real success [95% CI] | vs SFT (same games) | M_exp success |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        sim = "" if r["sim_success_rate"] is None else f"{r['sim_success_rate']:.2f}"
        print(f"| {r['policy']} | {r['iteration']} | {r['mode']} | {r['success_rate']:.2f} "
              f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] | {r['vs_sft']} | {sim} |")
    return 0


def heldout_games(data: str, exp, train, n: int):
    """The first ``n`` held-out test games: the materialized ``eval_tasks`` test games, then (above
    their count, with ``eval_fold=train``) games of the training fold from the seeds just below
    ``heldout_start``; never one of the ``train`` tasks (checked)."""
    from assets.runtime import heldout
    from dreamgym_core.envs import make_env
    from dreamgym_core.io import read_parquet

    test = heldout(read_parquet(os.path.join(data, "parquet", "eval_tasks.parquet")))[:n]
    if len(test) < n:  # more held-out games of the training fold: the seeds just below the dev games
        if exp.eval_fold != "train":
            raise SystemExit(f"eval={n} needs eval_fold=train (the test fold is materialized)")
        more = n - len(test)
        env = make_env(exp.env_spec())
        try:
            extra = env.tasks("train", more, start=exp.heldout_start - more)
        finally:
            env.close()
        used = {t.task_id for t in train} | {t.task_id for t in test}
        if any(t.task_id in used for t in extra):
            raise SystemExit(f"eval={n} would reach into the {len(train)} train tasks; lower it")
        test = test + extra
    return test


def pick_tasks(train, n: int, k: int, variance: dict[str, float] | None):
    """Iteration ``k``'s tasks: a uniform draw (``variance`` None), or up to half of them the tasks
    whose latest group had the highest reward variance (Eq. 7's V_tau > 0: rollouts that disagree,
    the only groups GRPO learns from) and the rest a uniform draw of the others. Returns (tasks, reused)."""
    import random

    from dreamgym_core.loop import sample_tasks

    if variance is None:
        return sample_tasks(train, n, k, 0), 0
    by_id = {t.task_id: t for t in train}
    mixed = sorted((tid for tid, v in variance.items() if v > 0 and tid in by_id),
                   key=lambda tid: (-variance[tid], tid))[:n // 2]
    taken = set(mixed)
    rest = [t for t in train if t.task_id not in taken]
    fresh = sorted(random.Random(f"0|{k}").sample(rest, min(n - len(mixed), len(rest))), key=lambda t: t.task_id)
    return [by_id[tid] for tid in mixed] + fresh, len(mixed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
