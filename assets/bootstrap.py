"""Bootstrap assets (iteration 0): tasks and the offline real trajectories (paper §4.1-4.2)."""
# No `from __future__ import annotations` in asset modules: Dagster reads the annotations at definition time.


import time

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from dreamgym_core.collect import collect
from dreamgym_core.envs import make_env
from dreamgym_core.offline import tasks_of
from dreamgym_core.schema import tasks_from_arrow, tasks_to_arrow, trajectories_to_arrow
from pipelines.resources import Experiment

GROUP = "bootstrap"


def _preview(table: pa.Table, columns: list[str], n: int = 5) -> dg.MetadataValue:
    rows = table.select(columns).slice(0, n).to_pylist()
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(str(r[c]).replace("|", "/").replace("\n", " ")[:80] for c in columns) + " |\n"
                   for r in rows)
    return dg.MetadataValue.md(head + body)


@dg.asset(group_name=GROUP, kinds={"parquet"})
def seed_tasks(context: dg.AssetExecutionContext, experiment: Experiment) -> pa.Table:
    """Training tasks (train split): the seeds of offline collection and of the curriculum.

    Offline-only (``experiment.logs``): the tasks of the logged train trajectories, each with its
    logged first state (the loop starts M_exp there)."""
    if experiment.offline:
        tasks = tasks_of(experiment.log_split().train)
        table = tasks_to_arrow(tasks)
        context.add_output_metadata({"env": f"{experiment.env}/{experiment.game}", "source": "logs",
                                     "logs": experiment.logs_path(), "tasks": len(tasks),
                                     "preview": _preview(table, ["task_id", "split", "instruction"])})
        return table
    env = make_env(experiment.env_spec())
    try:
        tasks = env.tasks("train", experiment.n_train_tasks)
    finally:
        env.close()
    table = tasks_to_arrow(tasks)
    context.add_output_metadata({"env": f"{experiment.env}/{experiment.game}", "tasks": len(tasks),
                                 "preview": _preview(table, ["task_id", "split", "instruction"])})
    return table


@dg.asset(group_name=GROUP, kinds={"parquet"})
def eval_tasks(context: dg.AssetExecutionContext, experiment: Experiment) -> pa.Table:
    """Held-out tasks, never trained on: ``role`` dev (model selection) and test (reported success).

    ``experiment.eval_fold``: "train" = held-out games of the training fold (seeds from
    ``heldout_start`` on, disjoint from the seed tasks; same object vocabulary); "test" = the env's
    own dev/test folds (TWX twc: objects never seen in training, 45 of 49 test objects are new).
    Offline-only (``experiment.logs``): the held-out logged tasks (``dreamgym_core.offline.split_logs``).
    """
    if experiment.offline:
        split = experiment.log_split()
        dev, test = tasks_of(split.dev), tasks_of(split.test)
        table = tasks_to_arrow(dev + test).append_column("role", pa.array(["dev"] * len(dev) + ["test"] * len(test)))
        context.add_output_metadata({"env": f"{experiment.env}/{experiment.game}", "source": "logs",
                                     "dev_tasks": len(dev), "test_tasks": len(test)})
        return table
    env = make_env(experiment.env_spec())
    try:
        if experiment.eval_fold == "train":
            if experiment.heldout_start < experiment.n_train_tasks:
                raise dg.Failure(f"experiment.heldout_start={experiment.heldout_start} overlaps the "
                                 f"{experiment.n_train_tasks} seed tasks; raise it")
            dev = env.tasks("train", experiment.n_dev_tasks, start=experiment.heldout_start)
            test = env.tasks("train", experiment.n_test_tasks, start=experiment.heldout_start + experiment.n_dev_tasks)
        elif experiment.eval_fold == "test":
            dev = env.tasks("dev", experiment.n_dev_tasks)
            test = env.tasks("test", experiment.n_test_tasks)
        else:
            raise dg.Failure(f"experiment.eval_fold must be 'train' or 'test', got {experiment.eval_fold!r}")
    finally:
        env.close()
    table = tasks_to_arrow(dev + test).append_column("role", pa.array(["dev"] * len(dev) + ["test"] * len(test)))
    context.add_output_metadata({"env": f"{experiment.env}/{experiment.game}", "eval_fold": experiment.eval_fold,
                                 "dev_tasks": len(dev), "test_tasks": len(test)})
    return table


@dg.asset(group_name=GROUP, kinds={"parquet"})
def offline_trajectories(context: dg.AssetExecutionContext, experiment: Experiment,
                         seed_tasks: pa.Table) -> pa.Table:
    """Real-env episodes on the seed tasks: expert, noisy expert, random, with invalid moves mixed in.

    Offline-only (``experiment.logs``): the logged trajectories of the seed tasks, as imported."""
    tasks = tasks_from_arrow(seed_tasks)
    if experiment.offline:
        ids = {t.task_id for t in tasks}
        trajs = [t for t in experiment.log_split().train if t.task.task_id in ids]
        table = trajectories_to_arrow(trajs)
        if table.num_rows == 0:
            raise dg.Failure(f"experiment.logs {experiment.logs_path()}: no logged transitions of the "
                             f"{len(tasks)} seed tasks")
        context.add_output_metadata({
            "env": f"{experiment.env}/{experiment.game}", "source": "logs", "episodes": len(trajs),
            "rows": table.num_rows, "success_rate": sum(t.won for t in trajs) / len(trajs),
            "mean_length": table.num_rows / len(trajs),
            "invalid_step_share": pc.sum(pc.invert(table["valid"])).as_py() / table.num_rows,
            "preview": _preview(table, ["traj_id", "action", "action_kind", "valid", "reward"]),
        })
        return table
    env = make_env(experiment.env_spec())
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % max(1, total // 10) == 0 or done == total:
            context.log.info(f"collected {done}/{total} tasks")

    try:
        trajs, stats = collect(env, tasks, experiment.collect_config(), progress=progress)
    finally:
        env.close()
    elapsed = time.perf_counter() - started
    table = trajectories_to_arrow(trajs)
    if table.num_rows == 0:
        raise dg.Failure(f"offline collection produced no transitions ({stats.crashes} crashed episodes)")
    invalid = pc.sum(pc.invert(table["valid"])).as_py()
    context.add_output_metadata({
        **stats.as_metadata(),
        "env": f"{experiment.env}/{experiment.game}",
        "success_rate": stats.successes / max(stats.episodes, 1),
        "mean_length": stats.transitions / max(len(trajs), 1),
        "invalid_step_share": invalid / table.num_rows,
        "timing/collect_s": round(elapsed, 2),
        "env_steps_per_s": round(stats.transitions / max(elapsed, 1e-9), 1),
        "preview": _preview(table, ["traj_id", "action", "action_kind", "valid", "reward"]),
    })
    return table
