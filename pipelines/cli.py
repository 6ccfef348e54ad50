"""The `dreamgym` command line.

    dreamgym demo    [--data DIR] [--iterations N] [--env twx|alfworld|miniwob] [--game G]   the whole loop, then a results table
    dreamgym report  [--out FILE]                     HTML report with the plots
    dreamgym sql     "SELECT ..." [--format table|csv|json]   read-only SQL over every Parquet asset
    dreamgym views   [--ddl]                          list the SQL views (or their CREATE VIEW statements)
    dreamgym import  FILE [--name NAME]               import external trajectories (JSONL / Parquet)
    dreamgym experiment TESTBED [--arms a,b] [--seeds 0,1,2]   the arms of a testbed as Dagster partitions
    dreamgym experiment NAME DATA [key=value ...]     a research run on a data root (pipelines.experiments)
    dreamgym learner lamp|twc [--settings ...]        learning curves of the RL learner (results/learner.csv)
    dreamgym results [--results DIR] [--out FILE]     docs/results.md and its plots from the rows under results/

It lives in pipelines/ (not the core) because `demo` drives Dagster.
"""

from __future__ import annotations

import argparse
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


def _demo_plan(iterations: int) -> list[tuple[str, str | None]]:
    from pipelines.partitions import iteration_key

    head = ["seed_tasks", "eval_tasks", "offline_trajectories", "cot_annotations", "replay_seed", "experience_model",
            "policy_init", "experience_model_eval"]  # the eval scores the SFT policy's sim-real gap too
    return [(k, None) for k in head] + [("dreamgym_iteration", iteration_key(i)) for i in range(1, iterations + 1)] \
        + [("s2r_policy", None), ("real_rl_policy", None), ("policy_eval", None)]


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
    # a finished step is skipped on a re-run, so one data folder holds one environment's demo
    marker = os.path.join(data, "demo_env")
    if os.path.exists(marker) and open(marker).read().strip() != args.env:
        print(f"dreamgym demo: {data} holds a --env {open(marker).read().strip()} demo; pass another --data "
              f"folder for --env {args.env}", file=sys.stderr)
        return 2
    os.makedirs(data, exist_ok=True)
    with open(marker, "w") as f:
        f.write(args.env + "\n")
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
    sizes = demo_sizes(getattr(args, "env", "twx"), getattr(args, "game", None))
    resources = {**defs.resources, "rl": RLSettings(algorithm=args.algorithm),
                 "experiment": Experiment(**sizes["experiment"]), "loop": LoopSettings(**sizes["loop"])}
    started = time.perf_counter()
    if getattr(args, "iterations", None) is None:
        args.iterations = sizes["iterations"]
    plan = _demo_plan(args.iterations)
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
           "policy_eval": {"config": {**sizes["policy_eval"], "sim_eval_tasks": 0, "sampled": False}}}
    if args.tiny:
        resources = {**defs.resources, "rl": RLSettings(algorithm=args.algorithm)}
        ops = TINY_OPS
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

    print(f"\nReal held-out success ({resources['experiment'].env}/{resources['experiment'].game} test games; dreamgym sql over policy_eval):")
    print(run_query(data, "SELECT policy, iteration, mode, round(success_rate, 3) AS success, "
                          "'[' || round(ci_low, 2) || ', ' || round(ci_high, 2) || ']' AS ci95, "
                          "round(sim_success_rate, 3) AS in_m_exp, round(sim_real_gap, 3) AS sim_real_gap, "
                          "real_transitions FROM policy_eval "
                          "ORDER BY CASE policy WHEN 'random' THEN 0 WHEN 'sft' THEN 1 WHEN 'dreamgym' THEN 2 "
                          "WHEN 's2r' THEN 3 ELSE 4 END, iteration, mode"))
    if args.iterations > 0:
        print("\nThe curriculum per iteration (dreamgym sql \"select * from curriculum\"):")
        print(run_query(data, "SELECT iteration, proposals, parsed, round(parse_rate, 2) AS parse_rate, kept, "
                              "drop_parse, drop_duplicate, drop_format, drop_unknown, drop_trivial, drop_invalid, "
                              "synthetic_rolled_out, round(synthetic_success_rate, 2) AS synthetic_success "
                              "FROM curriculum ORDER BY iteration"))
    report = write_report(data, os.path.join(data, "report.html"))
    print(f"\n[dreamgym] finished in {time.perf_counter() - started:.1f}s. Report: {report}\n"
          f"  inspect: .venv/bin/dreamgym sql \"select policy, iteration, count(*) from trajectories group by all\"\n"
          f"  UI:      make ui   (then open http://127.0.0.1:3000)")
    return 0


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
    from pipelines.results_docs import write_results_doc

    try:
        print(write_results_doc(args.results, args.out))
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
    s.set_defaults(func=cmd_demo)

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
    s.set_defaults(func=cmd_results)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
