"""Experiments as assets (EXPERIMENTS.md; paper Tables 1-2): one partition per (arm, seed).

``experiment_arm`` is partitioned by (testbed, arm) x seed (``dg.MultiPartitionsDefinition``: the
first dimension's keys read ``lamp.dreamgym``, so the UI's partition status says which testbed a
finished partition belongs to); a partition trains one arm of that testbed from pi0 and scores it on
the test games (``dreamgym_core.experiment.run_arm``): a resumable unit, skipped once finished,
resumed stage by stage after a kill. ``experiment_results`` aggregates every finished partition of
the testbed the ``ExperimentSettings`` resource names into ``results/<testbed>.csv``, its per-game
files and the paired and pooled tables (``dreamgym_core.experiment_results``).
"""
# No `from __future__ import annotations` in asset modules: Dagster reads the annotations at definition time.

import os

import dagster as dg

from dreamgym_core.experiment import ARMS, TESTBEDS, arm_dir, arm_done, get_testbed, load_arm, split_arm
from pipelines.resources import data_root

GROUP = "experiments"
SEEDS = tuple(str(s) for s in range(10))
RUNS = tuple(f"{tb}.{arm}" for tb in TESTBEDS for arm in ARMS)
"""The first partition dimension: ``<testbed>.<arm>``."""
arm_seed_partitions = dg.MultiPartitionsDefinition({"run": dg.StaticPartitionsDefinition(list(RUNS)),
                                                    "seed": dg.StaticPartitionsDefinition(list(SEEDS))})


class ExperimentSettings(dg.ConfigurableResource):
    """Which testbed the experiment assets run, and where they keep their work and results."""

    testbed: str = "twc"
    """A name of ``dreamgym_core.experiment.TESTBEDS``: the testbed ``experiment_results`` aggregates
    (each ``experiment_arm`` partition names its own)."""
    work_dir: str = ""
    """Shared stages and partitions ('' = <data>/experiments)."""
    results_dir: str = "results"
    """Where ``<testbed>.csv`` and its tables go (committed)."""

    def work(self) -> str:
        return self.work_dir or os.path.join(data_root(), "experiments")

    def resolve(self):
        try:
            return get_testbed(self.testbed)
        except ValueError as exc:
            raise dg.Failure(str(exc)) from None


def arm_partition_key(testbed: str, arm: str, seed: int) -> dg.MultiPartitionKey:
    get_testbed(testbed)  # one-line errors for an unknown testbed or arm
    split_arm(arm)
    if str(seed) not in SEEDS:
        raise ValueError(f"seed {seed} is not a partition; seeds are {SEEDS[0]}..{SEEDS[-1]}")
    return dg.MultiPartitionKey({"run": f"{testbed}.{arm}", "seed": str(seed)})


def parse_partition_key(key: dg.MultiPartitionKey) -> tuple[str, str, str, int]:
    """(testbed, arm, algorithm, seed) of an ``experiment_arm`` partition."""
    keys = key.keys_by_dimension
    testbed, _, name = keys["run"].partition(".")
    return (testbed, *split_arm(name), int(keys["seed"]))


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dg.asset(group_name=GROUP, partitions_def=arm_seed_partitions, kinds={"pytorch", "parquet"})
def experiment_arm(context: dg.AssetExecutionContext, experiments: ExperimentSettings) -> dg.MaterializeResult:
    """One arm of the testbed, one seed: trained from pi0, scored greedy on the test games."""
    from dreamgym_core.experiment import run_arm

    name, arm, algorithm, seed = parse_partition_key(context.partition_key)
    try:
        tb = get_testbed(name)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from None
    row, games = run_arm(tb, arm, algorithm, seed, experiments.work(), log=context.log.info)
    return dg.MaterializeResult(metadata={
        **_numbers(row), "testbed": tb.name, "algorithm": algorithm, "commit": row["commit"],
        "path": dg.MetadataValue.path(arm_dir(tb, arm, algorithm, seed, experiments.work()))})


@dg.asset(group_name=GROUP, kinds={"csv"},
          deps=[dg.AssetDep("experiment_arm", partition_mapping=dg.AllPartitionMapping())])
def experiment_results(context: dg.AssetExecutionContext, experiments: ExperimentSettings) -> dg.MaterializeResult:
    """Every finished partition of the testbed -> ``results/<testbed>.csv`` (one row per arm x seed),
    per-game outcomes, paired tests against init and real_rl, success pooled over seeds."""
    from dreamgym_core.experiment_results import write_results

    tb = experiments.resolve()
    finished = []
    for name in ARMS:
        arm, algorithm = split_arm(name)
        for seed in SEEDS:
            if arm_done(tb, arm, algorithm, int(seed), experiments.work()):
                finished.append(load_arm(arm_dir(tb, arm, algorithm, int(seed), experiments.work())))
    if not finished:
        raise dg.Failure(f"experiment_results: no finished partition of testbed {tb.name} under {experiments.work()}; "
                         "materialize experiment_arm partitions first")
    paths = write_results(experiments.results_dir, tb.name, finished)
    lines = ["| arm | algorithm | seed | success [95% CI] | real | synthetic |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['algorithm']} | {r['seed']} | {r['success']:.3f} [{r['ci_low']:.2f}, "
              f"{r['ci_high']:.2f}] | {r['real_transitions']} | {r['synthetic_transitions']} |" for r, _ in finished]
    context.log.info(f"{len(finished)} partitions of {tb.name} -> {paths['rows']}")
    return dg.MaterializeResult(metadata={"testbed": tb.name, "partitions": len(finished),
                                          "rows": dg.MetadataValue.path(paths["rows"]),
                                          "paired": dg.MetadataValue.path(paths["paired"]),
                                          "table": dg.MetadataValue.md("\n".join(lines))})
