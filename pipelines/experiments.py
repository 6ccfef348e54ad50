"""Research runs on a materialized data root: ``dreamgym experiment NAME ARGS...``.

These are analyses, not timings (``bench/`` keeps the timing benchmarks). Each reads the assets of
a data root (``make demo`` or the UI), writes nothing there, and prints a Markdown table:

  rl-in-mexp        RL inside M_exp from the SFT policy with ``rl.step.train_step``; real held-out
                    success before, midway and after, each against SFT on the same games (McNemar).
  compare-policies  real held-out success of several policy checkpoints on the same games.
  sim-false-wins    why M_exp grants wins: each simulated win of a fixed policy replayed in the real env.

Arguments are ``key=value`` words after the positional ones, as in each usage text below.

``dreamgym experiment TESTBED [--arms a,b] [--seeds 0,1,2]`` (TESTBED: twc, lamp, tiny) is different:
it materializes the ``experiment_arm`` partitions (arm x seed) of that testbed, each from pi0 to its
test-game score, skipping finished ones, then ``experiment_results`` (``results/<testbed>.csv``).
"""

from __future__ import annotations

import collections
import glob
import os
import time

from dreamgym_core.loop import sample_tasks

RL_IN_MEXP = """RL inside M_exp from the SFT policy, with real held-out success before, midway and after.

    dreamgym experiment rl-in-mexp DATA {grpo|ppo} ITERATIONS [lr=5e-5] [kl=0.1] [tasks=16] [group=4]
                               [epochs=2] [max_steps=12] [eval=50] [sim_eval=50] [mexp=DIR] [sft=DIR]
                               [select=uniform|variance] [recombine=0] [extra=0]

DATA is a data root where ``experience_model``, ``policy_init``, ``seed_tasks``, ``eval_tasks`` and
``offline_trajectories`` are materialized (``make demo``, or those assets from the UI). Each
iteration is the paper's step, ``rl.step.train_step``: rollouts of the current
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
alike, nothing for GRPO to learn) still meets new contexts for known objects there. The policy's
prompt format (history window, truncation) is the SFT checkpoint's ``policy_format``.
"""

COMPARE_POLICIES = """Real held-out success of several policies on the same games, each compared with the first.

    dreamgym experiment compare-policies DATA NAME=DIR [NAME=DIR ...] [eval=600] [modes=greedy,sampled]
                                     [max_steps=20]

DATA is a data root with ``seed_tasks``, ``eval_tasks`` and ``offline_trajectories`` materialized;
each DIR is a policy checkpoint (``policy_init``, a DreamGym loop ``policy`` partition, S2R, ...).
Every policy plays the same ``eval`` held-out real games (``heldout_games``: the
test games, then training-fold seeds below ``heldout_start``, never a train task) with the same
seeds, greedy and sampled. Per mode: success with its Wilson 95% interval, and against the first
policy on the same games: games only this policy won / games only the first won, exact McNemar p
(``evaluation.paired_comparison``). Nothing is written to DATA.
"""

SIM_FALSE_WINS = """Why M_exp grants wins: fixed policies in M_exp on held-out games, each simulated win replayed in the real env.

    dreamgym experiment sim-false-wins DATA [tasks=50] [max_steps=20] [mexp=DIR] [sft=DIR] [show=0]

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


def rl_in_mexp(argv: list[str]) -> int:
    """RL inside M_exp from the SFT policy (usage: ``RL_IN_MEXP``)."""
    import torch

    from assets.runtime import offline_start_states, real_env_factory, real_start_states
    from dreamgym_core.envs.twx import propose_candidates
    from dreamgym_core.curriculum import task_reward_variance
    from dreamgym_core.evaluation import paired_comparison
    from dreamgym_core.experience_model import ExperienceModel, PromptConfig, SimConfig, knowledge_from_meta
    from dreamgym_core.io import read_parquet
    from dreamgym_core.evaluation import evaluate, lm_policy_factory
    from dreamgym_core.loop import LoopConfig, initial_state_fn
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.rl.step import train_step
    from dreamgym_core.rl.trainer import PolicyTrainer, RLConfig
    from dreamgym_core.rollout import RolloutConfig
    from dreamgym_core.schema import tasks_from_arrow
    from pipelines.resources import Experiment

    if len(argv) < 3 or argv[1] not in ("grpo", "ppo"):
        print(RL_IN_MEXP)
        return 2
    data, algo, iters = argv[0], argv[1], int(argv[2])
    kw = dict(a.split("=", 1) for a in argv[3:])
    lr, kl = float(kw.get("lr", 5e-5)), float(kw.get("kl", 0.1))
    ntasks, group, epochs = int(kw.get("tasks", 16)), int(kw.get("group", 4)), int(kw.get("epochs", 2))
    max_steps, neval = int(kw.get("max_steps", 12)), int(kw.get("eval", 50))
    select = kw.get("select", "uniform")
    if select not in ("uniform", "variance"):
        raise SystemExit(f"rl-in-mexp: select={select!r}; use uniform or variance")
    nsim = int(kw.get("sim_eval", min(neval, 50)))
    if "window" in kw:
        raise SystemExit("rl-in-mexp: window= is gone; the history window is the SFT checkpoint's "
                         "(policy_init.history_window, recorded in its policy_format)")
    torch.set_num_threads(int(kw.get("threads", os.cpu_count() or 2)))

    def one(pattern: str) -> str:
        found = sorted(p for p in glob.glob(os.path.join(data, "checkpoints", pattern)) if os.path.isdir(p))
        if not found:
            raise SystemExit(f"rl-in-mexp: no {pattern} under {data}/checkpoints; materialize it first")
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

    lc = LoopConfig(eval_tasks=len(test), sim_eval_tasks=nsim, eval_max_steps=20)
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
    trainer = PolicyTrainer(model, tok, RLConfig(algorithm=algo, lr=lr, ppo_epochs=epochs, kl_coef=kl), ref_model=ref)
    report(model, tok, "sft", 0)
    started = time.perf_counter()
    variance: dict[str, float] = {}  # task id -> V_tau of its latest group (Eq. 7), for select=variance
    for k in range(1, iters + 1):
        tasks, reused = pick_tasks(pool, ntasks, k, variance if select == "variance" else None)
        step = train_step(make_sim(), trainer, tasks, RolloutConfig(
            group_size=group if algo == "grpo" else 1, max_steps=max_steps, batch_size=32, source="synthetic",
            iteration=k, seed=k), policy_name=f"{algo}@{k}")
        trajs, stats, m = step.trajectories, step.stats, step.metrics
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

    if variance is None:
        return sample_tasks(train, n, k, 0), 0
    by_id = {t.task_id: t for t in train}
    mixed = sorted((tid for tid, v in variance.items() if v > 0 and tid in by_id),
                   key=lambda tid: (-variance[tid], tid))[:n // 2]
    taken = set(mixed)
    rest = [t for t in train if t.task_id not in taken]
    fresh = sorted(random.Random(f"0|{k}").sample(rest, min(n - len(mixed), len(rest))), key=lambda t: t.task_id)
    return [by_id[tid] for tid in mixed] + fresh, len(mixed)


def compare_policies(argv: list[str]) -> int:
    """Real held-out success of several policies on the same games (usage: ``COMPARE_POLICIES``)."""
    from assets.runtime import real_env_factory
    from dreamgym_core.evaluation import paired_comparison
    from dreamgym_core.io import read_parquet
    from dreamgym_core.evaluation import evaluate, lm_policy_factory
    from dreamgym_core.loop import LoopConfig
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.schema import tasks_from_arrow
    from pipelines.resources import Experiment

    data = argv[0] if argv else ""
    kw = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    options = {"eval", "modes", "max_steps"}
    policies = [(k, v) for k, v in kw.items() if k not in options]
    if not data or not policies:
        print(COMPARE_POLICIES)
        return 2
    for name, path in policies:
        if not os.path.isdir(path):
            raise SystemExit(f"compare-policies: {name}={path}: no such checkpoint directory")
    modes = tuple(kw.get("modes", "greedy,sampled").split(","))
    if not set(modes) <= {"greedy", "sampled"}:
        raise SystemExit(f"compare-policies: modes={kw['modes']!r}; use greedy and/or sampled")
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


def _one(data: str, pattern: str) -> str:
    found = sorted(p for p in glob.glob(os.path.join(data, "checkpoints", pattern)) if os.path.isdir(p))
    if not found:
        raise SystemExit(f"sim-false-wins: no {pattern} under {data}/checkpoints; materialize it first")
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


def sim_false_wins(argv: list[str]) -> int:
    """Classify M_exp's wins by replaying them in the real env (usage: ``SIM_FALSE_WINS``)."""
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
        print(SIM_FALSE_WINS)
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
        for name, policy in (("random", RandomPolicy()), ("bc", LMPolicy(pm, ptok, "bc", greedy=True))):
            sim = ExperienceModel(mexp, mtok, initial_state=init, propose_candidates=propose_candidates,
                                  cfg=SimConfig(prompt=PromptConfig.from_meta(meta)), knowledge=knowledge_from_meta(meta))
            trajs, _ = rollout(sim, policy, test, RolloutConfig(max_steps=max_steps, batch_size=32, seed=0))
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


def run_testbed(testbed: str, argv: list[str]) -> int:
    """``dreamgym experiment TESTBED [--arms a,b] [--seeds 0,1,2]``: the arm x seed partitions of the
    testbed through the Dagster assets (a finished partition is skipped), then its results."""
    import argparse
    import sys

    from dreamgym_core.experiment import ARMS, arm_done, get_testbed, split_arm

    p = argparse.ArgumentParser(prog=f"dreamgym experiment {testbed}",
                                description="Run the arms of a testbed (one Dagster partition per arm x seed).")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)} (default all)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    p.add_argument("--data", default=os.environ.get("DREAMGYM_DATA", "data"), help="data folder (default ./data)")
    p.add_argument("--work", default=None, help="shared stages and partitions (default <data>/experiments)")
    p.add_argument("--results", default="results", help="results folder (default results)")
    a = p.parse_args(argv)
    try:
        tb = get_testbed(testbed)
        arms = [x for x in a.arms.split(",") if x]
        for arm in arms:
            split_arm(arm)
        seeds = [int(x) for x in a.seeds.split(",") if x]
        from assets.experiments import arm_partition_key, parse_partition_key

        keys = [arm_partition_key(tb.name, arm, seed) for arm in arms for seed in seeds]
    except ValueError as exc:
        print(f"dreamgym experiment {testbed}: {exc}", file=sys.stderr)
        return 2
    import dagster as dg

    from assets.experiments import ExperimentSettings, experiment_arm, experiment_results
    from pipelines.runguard import PartitionBusyError, partition_lock, run_tags, write_instance_yaml

    data = os.path.abspath(a.data)
    work = os.path.abspath(a.work or os.path.join(data, "experiments"))
    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = os.path.join(data, "dagster_home")
    write_instance_yaml(os.environ["DAGSTER_HOME"])
    resources = {"experiments": ExperimentSettings(testbed=tb.name, work_dir=work, results_dir=a.results)}
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    started = time.perf_counter()
    print(f"[experiment {tb.name}] {len(keys)} partitions ({len(arms)} arms x {len(seeds)} seeds); work {work}",
          flush=True)
    with dg.DagsterInstance.get() as instance:
        for n, key in enumerate(keys, 1):
            _, arm, algorithm, seed = parse_partition_key(key)
            label = f"({n}/{len(keys)}) {key.keys_by_dimension['run'].partition('.')[2]} seed {seed}"
            if arm_done(tb, arm, algorithm, seed, work):
                print(f"[experiment {tb.name}] {label}: finished, skipped", flush=True)
                continue
            print(f"[experiment {tb.name}] {label}: running ...", flush=True)
            t0 = time.perf_counter()
            try:
                with partition_lock(data, ["experiment_arm"], str(key)):
                    res = dg.materialize([experiment_arm, experiment_results], selection=["experiment_arm"],
                                         partition_key=key, resources=resources, instance=instance,
                                         run_config=quiet, raise_on_error=False, tags=run_tags())
            except PartitionBusyError as exc:
                print(f"[experiment {tb.name}] {exc}", file=sys.stderr)
                return 1
            if not res.success:
                print(f"[experiment {tb.name}] {label} failed; fix the cause and re-run (finished partitions are "
                      "kept)", file=sys.stderr)
                return 1
            m = {k: v.value for k, v in res.asset_materializations_for_node("experiment_arm")[0].metadata.items()}
            print(f"[experiment {tb.name}] {label}: done in {time.perf_counter() - t0:.1f}s: success "
                  f"{m['success']:.3f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}] on {m['games']} games, "
                  f"{m['real_transitions']} real / {m['synthetic_transitions']} synthetic transitions", flush=True)
        res = dg.materialize([experiment_arm, experiment_results], selection=["experiment_results"],
                             resources=resources, instance=instance, run_config=quiet, raise_on_error=False)
    if not res.success:
        print(f"[experiment {tb.name}] experiment_results failed", file=sys.stderr)
        return 1
    meta = res.asset_materializations_for_node("experiment_results")[0].metadata
    print(f"[experiment {tb.name}] {meta['partitions'].value} partitions in {meta['rows'].value} "
          f"(paired: {meta['paired'].value}); {time.perf_counter() - started:.0f}s. "
          "Render them with `dreamgym results`.", flush=True)
    return 0


EXPERIMENTS = {"rl-in-mexp": rl_in_mexp, "compare-policies": compare_policies, "sim-false-wins": sim_false_wins}


def main(argv: list[str]) -> int:
    """``dreamgym experiment NAME ARGS...`` -> the named experiment's (or testbed's) exit status."""
    import sys

    from dreamgym_core.experiment import TESTBEDS

    if not argv:
        print(__doc__)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv[0] in TESTBEDS:
        return run_testbed(argv[0], argv[1:])
    if argv[0] not in EXPERIMENTS:
        print(f"dreamgym experiment: unknown experiment or testbed {argv[0]!r} (experiments: "
              f"{', '.join(EXPERIMENTS)}; testbeds: {', '.join(TESTBEDS)})", file=sys.stderr)
        return 2
    return EXPERIMENTS[argv[0]](argv[1:])
