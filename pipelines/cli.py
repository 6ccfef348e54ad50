"""The `dreamgym` command line.

    dreamgym demo    [--data DIR]                     materialize the pipeline on the embedded default
    dreamgym sql     "SELECT ..." [--format table|csv|json]   read-only SQL over every Parquet asset
    dreamgym views   [--ddl]                          list the SQL views (or their CREATE VIEW statements)
    dreamgym import  FILE [--name NAME]               import external trajectories (JSONL / Parquet)

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


def cmd_demo(args) -> int:
    data = _data_dir(args)
    os.environ["DREAMGYM_DATA"] = data
    home = os.path.join(data, "dagster_home")
    os.makedirs(home, exist_ok=True)
    os.environ.setdefault("DAGSTER_HOME", home)
    cfg = os.path.join(os.environ["DAGSTER_HOME"], "dagster.yaml")
    if not os.path.exists(cfg):  # an offline machine: no telemetry attempts, no banner
        with open(cfg, "w") as f:
            f.write("telemetry:\n  enabled: false\n")

    import dagster as dg

    from pipelines.definitions import ALL_ASSETS, build_defs

    defs = build_defs(data)
    resources = defs.resources
    started = time.perf_counter()
    print(f"[dreamgym] data: {data}  (Dagster run history: {os.environ['DAGSTER_HOME']})", flush=True)
    with dg.DagsterInstance.get() as instance:
        for asset in ALL_ASSETS:
            key = asset.key.to_user_string()
            t0 = time.perf_counter()
            run_config: dict = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
            if key == "experience_model":
                print(f"[dreamgym] materializing {key} (Eq. 5 SFT, {args.mexp_budget:.0f}s budget; "
                      "a finished model with the same config is reused) ...", flush=True)
                run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}},
                              "ops": {key: {"config": {"time_budget_s": args.mexp_budget}}}}
            else:
                print(f"[dreamgym] materializing {key} ...", flush=True)
            result = dg.materialize(ALL_ASSETS, selection=[key], resources=resources, instance=instance,
                                    run_config=run_config)
            if not result.success:
                print(f"[dreamgym] {key} failed", file=sys.stderr)
                return 1
            mats = result.asset_materializations_for_node(asset.op.name)
            meta = mats[0].metadata if mats else {}
            shown = {k: round(v.value, 3) if isinstance(v.value, float) else v.value for k, v in meta.items()
                     if k in ("rows", "tasks", "success_rate", "mean_length", "invalid_step_share", "env_steps_per_s",
                              "loss", "steps", "tokens_per_s", "state_exact_match", "baseline_state_exact_match",
                              "reward_accuracy", "win_recall", "invalid_action_accuracy")}
            print(f"[dreamgym]   done in {time.perf_counter() - t0:.1f}s  {shown}", flush=True)
    from dreamgym_core.sql import run_query

    print("\nOffline data by behaviour (dreamgym sql):")
    print(run_query(data, "SELECT env, policy, count(*) AS episodes, avg(num_steps) AS mean_steps, "
                          "avg(success::int) AS success_rate, avg(valid_rate) AS valid_rate "
                          "FROM trajectories GROUP BY ALL ORDER BY policy"))
    print(f"\n[dreamgym] finished in {time.perf_counter() - started:.1f}s. Inspect with: "
          f".venv/bin/dreamgym sql \"select env, count(*), avg(reward) from transitions group by env\"")
    return 0


def main(argv: list[str] | None = None) -> int:
    # --data is accepted before or after the subcommand; SUPPRESS keeps a subparser from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=argparse.SUPPRESS, help="data folder (default $DREAMGYM_DATA or ./data)")
    p = argparse.ArgumentParser(prog="dreamgym", description="DreamGym: agent RL with synthetic experience.",
                                parents=[common])
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    s = add("demo", help="run the main job on the embedded default (TextWorldExpress twc)")
    s.add_argument("--mexp-budget", type=float, default=600.0, help="M_exp training budget in seconds (default 600)")
    s.set_defaults(func=cmd_demo)

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

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
