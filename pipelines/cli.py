"""The `dreamgym` command line.

    dreamgym demo    [--data DIR] [--iterations N] [--env twx|alfworld|miniwob] [--game G]   the whole loop, then a results table
    dreamgym report  [--out FILE]                     HTML report with the plots
    dreamgym sql     "SELECT ..." [--format table|csv|json]   read-only SQL over every Parquet asset
    dreamgym views   [--ddl]                          list the SQL views (or their CREATE VIEW statements)
    dreamgym import  FILE [--name NAME]               import external trajectories (JSONL / Parquet)
    dreamgym export  --to FILE [--split S]            the offline trajectories as JSONL in import's format
    dreamgym demo --offline LOGS [--score-live]       the offline-only path: M_exp and the loop from logs alone
    dreamgym experiment TESTBED [--arms a,b] [--seeds 0,1,2]   the arms of a testbed as Dagster partitions
    dreamgym experiment NAME DATA [key=value ...]     a research run on a data root (pipelines.experiments)
    dreamgym learner lamp|twc [--settings ...]        learning curves of the RL learner (results/learner.csv)
    dreamgym results [--results DIR] [--out FILE]     docs/results.md and its plots from the rows under results/

It lives in pipelines/ (not the core) because `demo` drives Dagster.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path


def _data_dir(args) -> str:
    return os.path.abspath(getattr(args, "data", None) or os.environ.get("DREAMGYM_DATA", "data"))


def cmd_sql(args) -> int:
    from dreamgym_core.sql import run_query

    try:
        print(run_query(_data_dir(args), args.query, fmt=args.format, max_rows=args.max_rows))
    except ValueError as exc:
        print(f"dreamgym sql: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_views(args) -> int:
    import duckdb

    from dreamgym_core.sql import create_views

    con = duckdb.connect()
    ddl: list[str] = []
    views = create_views(con, _data_dir(args), ddl)
    if not views:
        print(f"dreamgym views: no Parquet assets under {_data_dir(args)}/parquet", file=sys.stderr)
        return 2
    if args.ddl:
        print(";\n".join(ddl) + ";")
        return 0
    for v in views:
        cols = ", ".join(r[0] for r in con.execute(f'DESCRIBE "{v}"').fetchall())
        n = con.execute(f'SELECT count(*) FROM "{v}"').fetchone()[0]
        print(f"{v} ({n} rows): {cols}")
    return 0


def cmd_import(args) -> int:
    from dreamgym_core.importer import TrajectoryImportError, import_file

    name = args.name or Path(args.file).stem
    dest = os.path.join(_data_dir(args), "parquet", "imported_trajectories", f"{name}.parquet")
    try:
        report = import_file(args.file, dest, env=args.env)
    except TrajectoryImportError as exc:
        print(f"dreamgym import: {exc}", file=sys.stderr)
        return 2
    print(f"imported {report.rows} transitions in {report.trajectories} trajectories "
          f"({report.successes} successful) -> {report.path}")
    return 0


def cmd_export(args) -> int:
    import pyarrow.compute as pc

    from dreamgym_core.importer import export_jsonl
    from dreamgym_core.io import read_parquet
    from pipelines.io_managers import parquet_path

    src = parquet_path(os.path.join(_data_dir(args), "parquet"), "offline_trajectories")
    if not os.path.exists(src):
        print(f"dreamgym export: no {src}: materialize offline_trajectories first (dreamgym demo)", file=sys.stderr)
        return 2
    table = read_parquet(src)
    try:
        rows = export_jsonl(table, args.to, split=args.split)
    except ValueError as exc:
        print(f"dreamgym export: {exc}", file=sys.stderr)
        return 2
    kept = table if args.split is None else table.filter(pc.equal(table["split"], args.split))
    trajs = len(set(kept.column("traj_id").to_pylist()))
    print(f"exported {rows} transitions ({trajs} trajectories{f' of split {args.split}' if args.split else ''}) "
          f"from {src} -> {args.to} (dreamgym import's format)")
    return 0


DEMO_SHOWN = ("rows", "tasks", "success_rate", "mean_length", "invalid_step_share", "env_steps_per_s", "loss", "steps",
              "tokens_per_s", "state_exact_match", "baseline_state_exact_match", "reward_accuracy", "win_recall",
              "invalid_action_accuracy", "bc/final_loss", "bc/steps", "real_transitions", "proposals", "kept",
              "synthetic_share", "sim_success_rate", "sim_real_gap", "timing/iteration_s")


def _curriculum_line(m: dict) -> str:
    """One iteration's curriculum from its metadata: M_task's parse rate and kept variants, and the
    synthetic tasks this iteration's batch rolled out (kept in earlier iterations)."""
    rate = m.get("curriculum/parse_rate")
    success = m.get("curriculum/synthetic_success_rate")
    return (f"curriculum: M_task parsed {int(m.get('curriculum/parsed', 0))}/{int(m.get('curriculum/proposals', 0))}"
            + (f" ({rate:.0%})" if rate is not None else "") + f", kept {int(m.get('curriculum/kept', 0))}; "
            f"synthetic tasks rolled out {int(m.get('curriculum/synthetic_tasks', 0))}"
            + (f" (success {success:.2f} in M_exp)" if success is not None else ""))


# `dreamgym demo --tiny`: a few tasks, a 1-layer M_exp and policy trained a fixed number of steps (the
# time budgets are far above what they need, so the result does not depend on the machine's speed):
# the fault-injection script (scripts/kill_anywhere.py) runs it again and again and compares results.
TINY_OPS = {
    "experience_model": {"config": {"time_budget_s": 3600.0, "hidden": 32, "layers": 1, "vocab_size": 400,
                                    "steps": 20, "batch_size": 4}},
    "experience_model_eval": {"config": {"max_transitions": 9, "drift_trajectories": 3, "drift_steps": 3,
                                         "gap_tasks": 2, "gap_max_steps": 4}},
    "policy_init": {"config": {"time_budget_s": 3600.0, "hidden": 32, "layers": 1, "steps": 20}},
    "real_rl_policy": {"config": {"budget": 24, "rounds": 2, "tasks_per_round": 2, "group_size": 2, "max_steps": 5}},
    "s2r_policy": {"config": {"budget": 12, "rounds": 1, "tasks_per_round": 2, "group_size": 2, "max_steps": 5}},
    "policy_eval": {"config": {"eval_tasks": 3, "sim_eval_tasks": 0, "sampled": False, "max_steps": 5}},
}


LIVE_TRAINING_STEPS = ("s2r_policy", "real_rl_policy")
"""Steps that train in the live env: the offline-only demo leaves them out (and they refuse to run there)."""


def _demo_plan(iterations: int, offline: bool = False) -> list[tuple[str, str | None]]:
    from pipelines.partitions import iteration_key

    head = ["seed_tasks", "eval_tasks", "offline_trajectories", "cot_annotations", "replay_seed", "experience_model",
            "policy_init", "experience_model_eval"]  # the eval scores the SFT policy's sim-real gap too
    tail = [k for k in LIVE_TRAINING_STEPS if not offline] + ["policy_eval"]
    return [(k, None) for k in head] + [("dreamgym_iteration", iteration_key(i)) for i in range(1, iterations + 1)] \
        + [(k, None) for k in tail]


def offline_sizes() -> dict:
    """The offline-only demo's sizes: twx's, with every evaluated task also run in M_exp (with no live env
    M_exp is the only place a policy can be scored; with --score-live the same tasks run in both)."""
    sizes = demo_sizes("twx")
    return {**sizes, "loop": {**sizes["loop"], "sim_eval_tasks": sizes["loop"]["eval_tasks"]},
            "policy_eval": {**sizes["policy_eval"], "sim_eval_tasks": sizes["policy_eval"]["eval_tasks"]}}


def _import_logs(path: str, data: str) -> tuple[str, str, str]:
    """``dreamgym import`` of the demo's logs into <data>/parquet/imported_trajectories -> (table, env, game)."""
    from dreamgym_core.importer import import_file
    from dreamgym_core.io import read_parquet

    dest = os.path.join(data, "parquet", "imported_trajectories", f"{Path(path).stem}.parquet")
    report = import_file(path, dest)
    first = read_parquet(dest).slice(0, 1).to_pylist()[0]
    print(f"[dreamgym] imported {report.rows} transitions in {report.trajectories} trajectories "
          f"({report.successes} successful) from {path} -> {dest}", flush=True)
    return dest, first["env"], first["game"]


def _materialized(instance, key: str, partition: str | None) -> bool:
    import dagster as dg

    if partition is None:
        return instance.get_latest_materialization_event(dg.AssetKey(key)) is not None
    return partition in instance.get_materialized_partitions(dg.AssetKey("iteration_eval"))


def demo_sizes(env: str = "twx", game: str | None = None) -> dict:
    """The demo's sizes per environment (resources and op configs that fit a 2-core CPU).

    twx: the embedded default (about 14 minutes). alfworld: its PDDL engine steps in 0.1-0.5 s and
    resets in 1-4 s (docs/environments.md), a few hundred times slower than TextWorldExpress, so the
    demo plays a few dozen games: 12 training games, 12 held-out games on unseen floor plans.
    """
    match env:
        case "twx":
            return {"experiment": {"n_train_tasks": 100, "game": game or "twc"},
                    "loop": {"tasks_per_iteration": 12, "eval_tasks": 30, "sim_eval_tasks": 15},
                    "experience_model_eval": {"max_transitions": 150, "drift_trajectories": 15, "gap_tasks": 15},
                    "real_rl_policy": {"budget": 600, "rounds": 3}, "s2r_policy": {"budget": 300, "rounds": 2},
                    "policy_eval": {"eval_tasks": 30}, "iterations": 3}
        case "alfworld":
            return {"experiment": {"env": "alfworld", "game": game or "all", "n_train_tasks": 12, "n_dev_tasks": 6,
                                   "n_test_tasks": 12, "eval_fold": "test", "episodes_expert": 1,
                                   "episodes_noisy": 1, "episodes_random": 1, "max_steps": 20},
                    "loop": {"tasks_per_iteration": 6, "eval_tasks": 6, "sim_eval_tasks": 6},
                    "experience_model_eval": {"max_transitions": 100, "drift_trajectories": 6, "gap_tasks": 6},
                    "real_rl_policy": {"budget": 120, "rounds": 2}, "s2r_policy": {"budget": 60, "rounds": 1},
                    "policy_eval": {"eval_tasks": 12}, "iterations": 2}
        case "miniwob":
            # 60 train tasks (10 per task kind, about 800 offline transitions in under a minute of
            # browser time), held-out tasks from the test seeds, 10-step offline episodes (the longest
            # expert, click-checkboxes, takes at most 7)
            return {"experiment": {"env": "miniwob", "game": game or "mix", "n_train_tasks": 60, "eval_fold": "test",
                                   "max_steps": 10},
                    "loop": {"tasks_per_iteration": 12, "eval_tasks": 30, "sim_eval_tasks": 15},
                    "experience_model_eval": {"max_transitions": 150, "drift_trajectories": 15, "gap_tasks": 15},
                    "real_rl_policy": {"budget": 600, "rounds": 3}, "s2r_policy": {"budget": 300, "rounds": 2},
                    "policy_eval": {"eval_tasks": 30}, "iterations": 3}
    raise ValueError(f"dreamgym demo: --env must be twx, alfworld or miniwob, got {env!r}")


def cmd_demo(args) -> int:
    data = _data_dir(args)
    offline = getattr(args, "offline", None)
    label = "offline" if offline else args.env
    if getattr(args, "score_live", False) and not offline:
        print("dreamgym demo: --score-live goes with --offline LOGS", file=sys.stderr)
        return 2
    # a finished step is skipped on a re-run, so one data folder holds one environment's demo
    marker = os.path.join(data, "demo_env")
    if os.path.exists(marker) and open(marker).read().strip() != label:
        print(f"dreamgym demo: {data} holds a --env {open(marker).read().strip()} demo; pass another --data "
              f"folder for {'--offline' if offline else '--env ' + args.env}", file=sys.stderr)
        return 2
    os.makedirs(data, exist_ok=True)
    if offline:
        from dreamgym_core.importer import TrajectoryImportError

        try:
            logs, log_env, log_game = _import_logs(offline, data)
        except TrajectoryImportError as exc:
            print(f"dreamgym demo: {exc}", file=sys.stderr)
            return 2
    with open(marker, "w") as f:
        f.write(label + "\n")
    os.environ["DREAMGYM_DATA"] = data
    home = os.path.join(data, "dagster_home")
    os.makedirs(home, exist_ok=True)
    if not os.environ.get("DAGSTER_HOME"):  # unset or empty
        os.environ["DAGSTER_HOME"] = home
    from pipelines.runguard import write_instance_yaml

    write_instance_yaml(os.environ["DAGSTER_HOME"])  # offline: no telemetry; run monitoring for `make ui`

    import dagster as dg

    from assets.policy import RLSettings
    from pipelines.definitions import ALL_ASSETS, LOOP_KEYS, build_defs
    from pipelines.resources import Experiment

    defs = build_defs(data, "tiny" if args.tiny else None)
    from assets.loop import LoopSettings

    # the demo's sizes: the assets' defaults are the measured runs (README); the demo trims the
    # evaluations, the per-iteration batch and the real-env budgets so that set-up plus the whole loop
    # fit in a quarter of an hour on 2 cores. Every policy is evaluated on the same first 30 test games.
    # 100 train tasks (not the default 300): in the demo's 240 s M_exp sees under a fifth of the
    # 300-task data anyway, and the replay buffer embeds a third as many transitions (measured:
    # 300 tasks made the demo 874 s of job and M_exp's win recall 0.46; 100 tasks gave 0.60)
    sizes = offline_sizes() if offline else demo_sizes(getattr(args, "env", "twx"), getattr(args, "game", None))
    experiment = Experiment(**sizes["experiment"])
    if offline:  # env/game only name what the logs are of (the state-only candidate rule, --score-live)
        experiment = Experiment(env=log_env, game=log_game, logs=logs, live_scoring=args.score_live)
    resources = {**defs.resources, "rl": RLSettings(algorithm=args.algorithm),
                 "experiment": experiment, "loop": LoopSettings(**sizes["loop"])}
    started = time.perf_counter()
    if getattr(args, "iterations", None) is None:
        args.iterations = sizes["iterations"]
    plan = _demo_plan(args.iterations, offline=bool(offline))
    print(f"[dreamgym] data: {data}  (Dagster run history: {os.environ['DAGSTER_HOME']})", flush=True)
    print(f"[dreamgym] plan: {len(plan)} steps, {args.iterations} DreamGym iterations ({args.algorithm}); "
          "finished steps are skipped, so an interrupted demo resumes", flush=True)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    loud = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    # step counts, not wall budgets, decide the demo's models, so its results do not depend on how
    # busy the machine is (its time does); the budgets are caps
    ops = {"experience_model": {"config": {"steps": args.mexp_steps, "time_budget_s": args.mexp_budget}},
           "experience_model_eval": {"config": sizes["experience_model_eval"]},
           "policy_init": {"config": {"steps": args.policy_steps, "time_budget_s": args.policy_budget}},
           "real_rl_policy": {"config": sizes["real_rl_policy"]},
           "s2r_policy": {"config": sizes["s2r_policy"]},
           "policy_eval": {"config": {"sim_eval_tasks": 0, **sizes["policy_eval"], "sampled": False}}}
    if args.tiny:
        resources = {**defs.resources, "rl": RLSettings(algorithm=args.algorithm)}
        if offline:
            resources["experiment"] = experiment
        ops = TINY_OPS
    if offline:
        print(f"[dreamgym] offline-only: {log_env}/{log_game} logs {logs}; no live env is started"
              + (f" except to score policies in {log_env}/{log_game} (--score-live)" if args.score_live else "")
              + f". Skipped: {', '.join(LIVE_TRAINING_STEPS)} (they train in a live env)", flush=True)
    from pipelines.runguard import PartitionBusyError, mark_dead_runs_failed, partition_lock, run_tags

    with dg.DagsterInstance.get() as instance:
        for run_id in mark_dead_runs_failed(instance):
            print(f"[dreamgym] run {run_id} was killed before it finished: marked failed", flush=True)
        for n, (key, part) in enumerate(plan, 1):
            label = f"{key}[{part}]" if part else key
            if _materialized(instance, key, part):
                print(f"[dreamgym] ({n}/{len(plan)}) {label}: already materialized, skipped", flush=True)
                continue
            print(f"[dreamgym] ({n}/{len(plan)}) materializing {label} ...", flush=True)
            t0 = time.perf_counter()
            long = key in ("experience_model", "policy_init", "dreamgym_iteration", "s2r_policy", "real_rl_policy",
                           "policy_eval")
            run_config = {**(loud if long else quiet), "ops": {key: ops[key]} if key in ops else {}}
            selection = LOOP_KEYS if key == "dreamgym_iteration" else [key]
            try:
                with partition_lock(data, [key], part):  # the same lock a UI run of this step takes
                    result = dg.materialize(ALL_ASSETS, selection=selection, resources=resources, instance=instance,
                                            run_config=run_config, partition_key=part, raise_on_error=False,
                                            tags=run_tags())
            except PartitionBusyError as exc:
                print(f"[dreamgym] {exc}", file=sys.stderr)
                return 1
            if not result.success:
                print(f"[dreamgym] {label} failed; fix the cause and re-run `make demo` (finished steps are kept)",
                      file=sys.stderr)
                return 1
            shown, numbers = {}, {}
            for mat in result.get_asset_materialization_events():
                for k, v in mat.materialization.metadata.items():
                    if isinstance(v.value, (int, float)):
                        numbers[k] = v.value
                        if k in DEMO_SHOWN:
                            shown[k] = round(v.value, 3) if isinstance(v.value, float) else v.value
            print(f"[dreamgym]   done in {time.perf_counter() - t0:.1f}s  {shown}", flush=True)
            if key == "dreamgym_iteration":
                print(f"[dreamgym]   {_curriculum_line(numbers)}", flush=True)
    from dreamgym_core.sql import run_query
    from pipelines.report import write_report

    if offline:
        _print_offline_results(data, resources["experiment"])
    else:
        _print_results(data, resources["experiment"])
    if args.iterations > 0:
        print("\nThe curriculum per iteration (dreamgym sql \"select * from curriculum\"):")
        print(run_query(data, "SELECT iteration, proposals, parsed, round(parse_rate, 2) AS parse_rate, kept, "
                              "drop_parse, drop_duplicate, drop_format, drop_unknown, drop_trivial, drop_invalid, "
                              "synthetic_rolled_out, round(synthetic_success_rate, 2) AS synthetic_success "
                              "FROM curriculum ORDER BY iteration"))
    testbed = getattr(args, "testbed", "none")
    if not (offline or args.tiny or testbed == "none" or getattr(args, "env", "twx") != "twx"):
        rc = _demo_testbed(data, testbed)
        if rc:
            return rc
    report = write_report(data, os.path.join(data, "report.html"))
    print(f"\n[dreamgym] finished in {time.perf_counter() - started:.1f}s. Report: {report}\n"
          f"  inspect: .venv/bin/dreamgym sql \"select policy, iteration, count(*) from trajectories group by all\"\n"
          f"  UI:      make ui   (then open http://127.0.0.1:3000)")
    return 0


def _demo_testbed(data: str, testbed: str) -> int:
    """The demo's evidence row: ``init`` and ``dreamgym`` (seed 0) of an experiment testbed with room
    for RL, as ``experiment_arm`` partitions, then both on the same held-out games, paired."""
    from dreamgym_core.experiment_results import read_rows
    from pipelines.experiments import run_testbed

    results = os.path.join(data, "results")
    print(f"\n[dreamgym] DreamGym on the experiment testbed {testbed} (room for RL; `dreamgym experiment "
          f"{testbed} --arms init,dreamgym --seeds 0`): pi0, M_exp, 0 real transitions for the policy ...", flush=True)
    rc = run_testbed(testbed, ["--arms", "init,dreamgym", "--seeds", "0", "--data", data, "--results", results])
    if rc:
        return rc
    rows = {r["arm"]: r for r in read_rows(os.path.join(results, f"{testbed}.csv")) if int(r["seed"]) == 0}
    with open(os.path.join(results, f"{testbed}_paired.csv"), newline="") as f:
        paired = {r["arm"]: r for r in csv.DictReader(f) if r["baseline"] == "init" and r["seed"] == "0"}
    print(f"\nInit against DreamGym on {testbed} ({rows['init']['games']} held-out games, the same for both; "
          f"rows in {results}):")
    print("arm      | success | ci95         | real_transitions | synthetic_transitions | vs init (paired)")
    print("---------+---------+--------------+------------------+-----------------------+-----------------")
    for arm in ("init", "dreamgym"):
        r, p = rows[arm], paired.get(arm)
        pv = float(p["p_value"]) if p else 1.0
        vs = (f"+{p['only_arm']} / -{p['only_baseline']}, " + (f"p={pv:.2g}" if pv >= 1e-6 else "p<1e-6")) if p else ""
        print(f"{arm:<8} | {r['success']:<7.3f} | [{r['ci_low']:.2f}, {r['ci_high']:.2f}] | {r['real_transitions']:<16} "
              f"| {r['synthetic_transitions']:<21} | {vs}")
    p = paired.get("dreamgym")
    moved = p is not None and int(p["only_arm"]) > int(p["only_baseline"]) and float(p["p_value"]) < 0.05
    print(("DreamGym moved the policy with no real transition (paired p < 0.05). " if moved else
           "At demo scale DreamGym did not move the policy significantly (paired p >= 0.05). ")
          + "One seed of a small M_exp: the measured tables (3 seeds, every arm) are in docs/results.md.")
    return 0


def _print_results(data: str, experiment) -> None:
    from dreamgym_core.sql import run_query

    print(f"\nReal held-out success ({experiment.env}/{experiment.game} test games; dreamgym sql over policy_eval):")
    print(run_query(data, "SELECT policy, iteration, mode, round(success_rate, 3) AS success, "
                          "'[' || round(ci_low, 2) || ', ' || round(ci_high, 2) || ']' AS ci95, "
                          "round(sim_success_rate, 3) AS in_m_exp, round(sim_real_gap, 3) AS sim_real_gap, "
                          "real_transitions FROM policy_eval "
                          "ORDER BY CASE policy WHEN 'random' THEN 0 WHEN 'sft' THEN 1 WHEN 'dreamgym' THEN 2 "
                          "WHEN 's2r' THEN 3 ELSE 4 END, iteration, mode"))


def _print_offline_results(data: str, experiment) -> None:
    """The offline-only results: M_exp's fidelity on the held-out logs, then every policy's success in M_exp
    (and in the live env with --score-live)."""
    from dreamgym_core.sql import run_query

    print(f"\nM_exp fidelity on held-out logs ({experiment.env}/{experiment.game}, tasks never trained on; "
          "dreamgym sql over experience_model_eval; each metric beside the 'nothing changes' baseline):")
    print(run_query(data, "SELECT scope, transitions, round(state_exact_match, 3) AS exact_match, "
                          "round(baseline_state_exact_match, 3) AS baseline, round(state_token_f1, 3) AS token_f1, "
                          "round(reward_accuracy, 3) AS reward_acc, round(win_recall, 3) AS win_recall, "
                          "round(win_precision, 3) AS win_precision, "
                          "round(invalid_action_accuracy, 3) AS invalid_acc FROM experience_model_eval "
                          "WHERE scope = 'overall' OR scope LIKE 'action:%' ORDER BY scope != 'overall', scope"))
    print("\nMulti-step drift (held-out logged actions replayed open-loop through M_exp):")
    print(run_query(data, "SELECT step, transitions AS trajectories, round(state_exact_match, 3) AS exact_match, "
                          "round(agree_so_far, 3) AS agree_so_far FROM experience_model_eval "
                          "WHERE scope LIKE 'drift:%' ORDER BY step"))
    live = experiment.live_scoring
    print(f"\nPolicies on the held-out tasks' logged first states: success in M_exp"
          + (f" and in the live {experiment.env}/{experiment.game} env (--score-live)" if live else
             " (no live env: real success is not measured)") + ":")
    print(run_query(data, "SELECT policy, iteration, mode, episodes, round(sim_success_rate, 3) AS in_m_exp, "
                          + ("round(success_rate, 3) AS real_success, round(sim_real_gap, 3) AS sim_real_gap, "
                             if live else "'[' || round(ci_low, 2) || ', ' || round(ci_high, 2) || ']' AS ci95, ")
                          + "real_transitions FROM policy_eval ORDER BY CASE policy WHEN 'random' THEN 0 "
                            "WHEN 'sft' THEN 1 ELSE 2 END, iteration, mode"))


def cmd_experiment(args) -> int:
    from dreamgym_core.experiment import TESTBEDS
    from pipelines.experiments import main as run_experiment

    data = ["--data", args.data] if args.name in TESTBEDS and getattr(args, "data", None) else []
    return run_experiment([args.name, *data, *args.args])


def cmd_report(args) -> int:
    from pipelines.report import write_report

    data = _data_dir(args)
    out = args.out or os.path.join(data, "report.html")
    print(write_report(data, out))
    return 0


def cmd_results(args) -> int:
    from pipelines.results_docs import update_readme, write_results_doc

    try:
        print(write_results_doc(args.results, args.out))
        if args.readme and update_readme(args.readme, args.results):
            print(f"{args.readme}: results block regenerated")
    except (OSError, ValueError, KeyError) as exc:
        print(f"dreamgym results: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["learner"]:  # its own argparse (python -m dreamgym_core.learner_check)
        from dreamgym_core.learner_check import main as learner_main

        return learner_main(argv[1:], prog="dreamgym learner")
    # --data is accepted before or after the subcommand; SUPPRESS keeps a subparser from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=argparse.SUPPRESS, help="data folder (default $DREAMGYM_DATA or ./data)")
    p = argparse.ArgumentParser(prog="dreamgym", description="DreamGym: agent RL with synthetic experience.",
                                parents=[common])
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    s = add("demo", help="run the main job on the embedded default (TextWorldExpress twc)")
    s.add_argument("--mexp-steps", type=int, default=320, help="M_exp SFT steps (default 320)")
    s.add_argument("--mexp-budget", type=float, default=1200.0,
                   help="M_exp training wall cap in seconds (default 1200; the steps decide on a 2-core CPU)")
    s.add_argument("--policy-steps", type=int, default=600, help="SFT policy steps (default 600)")
    s.add_argument("--policy-budget", type=float, default=1200.0, help="SFT policy training wall cap in seconds (default 1200)")
    s.add_argument("--iterations", type=int, default=None,
                   help="DreamGym iterations (partitions 001..N; default 3, alfworld 2)")
    s.add_argument("--env", choices=("twx", "alfworld", "miniwob"), default="twx",
                   help="environment (default twx: TextWorldExpress; alfworld: locally generated ALFWorld games; "
                        "miniwob: MiniWoB++ web tasks in headless chromium)")
    s.add_argument("--game", default=None,
                   help="game within the env (twx: twc, cookingworld...; alfworld: all or one task type; "
                        "miniwob: mix or comma-separated task names)")
    s.add_argument("--algorithm", choices=("grpo", "ppo"), default="grpo")
    s.add_argument("--tiny", action="store_true",
                   help="tiny sizes (a minute or two on CPU): smoke tests and scripts/kill_anywhere.py")
    s.add_argument("--offline", metavar="LOGS", default=None,
                   help="the offline-only path: tasks, M_exp's data and the held-out logs from LOGS (dreamgym "
                        "import's format, e.g. written by dreamgym export); no live env, the loop runs in M_exp")
    s.add_argument("--score-live", action="store_true",
                   help="with --offline: also score the policies in the live env the logs came from")
    s.add_argument("--testbed", default="lamp_demo",
                   help="after the main job (default env only): init and dreamgym on this experiment testbed, "
                        "one seed, paired on its held-out games (default lamp_demo; 'none' skips it)")
    s.set_defaults(func=cmd_demo)

    s = add("export", help="write the data root's offline trajectories as JSONL in dreamgym import's format")
    s.add_argument("--to", required=True, help="JSONL file to write")
    s.add_argument("--split", choices=("train", "dev", "test"), default=None,
                   help="only the trajectories of tasks of this split (default: all)")
    s.set_defaults(func=cmd_export)

    s = add("report", help="write an HTML report (tables and plots) of the run")
    s.add_argument("--out", default=None, help="output file (default <data>/report.html)")
    s.set_defaults(func=cmd_report)

    s = add("sql", help="read-only SQL over every Parquet asset (views: transitions, trajectories, tasks, <asset>)")
    s.add_argument("query")
    s.add_argument("--format", choices=("table", "csv", "json"), default="table")
    s.add_argument("--max-rows", type=int, default=100, help="rows shown in table format")
    s.set_defaults(func=cmd_sql)

    s = add("views", help="list the SQL views with their columns and row counts")
    s.add_argument("--ddl", action="store_true", help="print the CREATE VIEW statements (for the duckdb CLI)")
    s.set_defaults(func=cmd_views)

    s = add("import", help="import external trajectories (JSONL or Parquet, one row per step)")
    s.add_argument("file")
    s.add_argument("--name", default=None, help="partition name (default: the file's stem)")
    s.add_argument("--env", default="external", help="env name for rows that do not give one")
    s.set_defaults(func=cmd_import)

    s = add("experiment", help="the arms of a testbed (twc, lamp, tiny: one Dagster partition per arm x seed; "
                               "--arms, --seeds), or a research run on a materialized data root: rl-in-mexp, "
                               "compare-policies, sim-false-wins (pipelines.experiments; NAME alone prints its usage)")
    s.add_argument("name", help="a testbed (twc, lamp, tiny) or rl-in-mexp, compare-policies, sim-false-wins")
    s.add_argument("args", nargs=argparse.REMAINDER,
                   help="testbed: [--arms a,b] [--seeds 0,1,2] [--results DIR]; else DATA and key=value options")
    s.set_defaults(func=cmd_experiment)

    s = add("learner", help="learning curves of the RL learner on a fixed task batch (see --help of it)",
            add_help=False)
    s = add("results", help="generate docs/results.md and its plots from the rows under results/")
    s.add_argument("--results", default="results", help="folder of result CSVs (default results)")
    s.add_argument("--out", default="docs/results.md", help="Markdown file to write (default docs/results.md)")
    s.add_argument("--readme", default="README.md",
                   help="README whose generated results block is rewritten too (default README.md; '' skips it)")
    s.set_defaults(func=cmd_results)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
