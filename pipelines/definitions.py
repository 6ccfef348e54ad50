"""Dagster Definitions: every DreamGym stage as an asset (served by `dagster dev -w workspace.yaml`).

Groups: bootstrap (tasks, offline data) -> experience_model (CoT annotation, M_exp SFT, fidelity) ->
policy (SFT init, S2R) -> dreamgym_loop (iteration partitions 001, 002, ...) -> evaluation; the
real-env RL baseline is its own group and job. The experiments (group experiments: one partition per
arm x seed of the testbed ``ExperimentSettings`` names, and their results) stand apart from that graph:
they build their own stages (``dreamgym_core.experiment``).
"""

from __future__ import annotations

import os

# Model loads and saves draw per-shard progress bars on stderr; in Dagster runs the asset logs
# carry progress, so the bars are only noise in the run log and the demo output.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import dagster as dg  # noqa: E402

from assets.bootstrap import eval_tasks, offline_trajectories, seed_tasks  # noqa: E402
from assets.experiments import ExperimentSettings, arm_seed_partitions, experiment_arm, experiment_results  # noqa: E402
from assets.experience import cot_annotations, experience_model, experience_model_eval, replay_seed  # noqa: E402
from assets.loop import LOOP_SPECS, LoopSettings, dreamgym_iteration  # noqa: E402
from assets.policy import RLSettings, policy_eval, policy_init, real_rl_policy, s2r_policy  # noqa: E402
from pipelines.checks import ALL_CHECKS  # noqa: E402
from pipelines.io_managers import CheckpointIOManager, ParquetIOManager  # noqa: E402
from pipelines.lance_io import LanceDBIOManager  # noqa: E402
from pipelines.partitions import iteration_partitions  # noqa: E402
from pipelines.resources import Experiment, Launcher, data_root  # noqa: E402
from pipelines.runguard import locking_executor  # noqa: E402

try:  # transformers' own bars (weights loading) ignore the hub variable
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover - transformers is a dependency
    pass

ALL_ASSETS = [seed_tasks, eval_tasks, offline_trajectories, cot_annotations, replay_seed, experience_model,
              experience_model_eval, policy_init, dreamgym_iteration, s2r_policy, real_rl_policy, policy_eval,
              experiment_arm, experiment_results]
LOOP_KEYS = [s.key for s in LOOP_SPECS]

bootstrap_job = dg.define_asset_job("bootstrap", selection=dg.AssetSelection.groups("bootstrap"),
                                    description="Tasks and offline real trajectories (iteration 0).")
iteration_job = dg.define_asset_job(
    "dreamgym_loop", selection=dg.AssetSelection.assets(*LOOP_KEYS), partitions_def=iteration_partitions,
    description="One DreamGym iteration (pick the partition). For 1..N in order, launch an asset backfill "
                "from the asset graph: `dagster job backfill` does not order partitions.")
real_rl_job = dg.define_asset_job("real_rl_baseline", selection=dg.AssetSelection.assets("real_rl_policy"),
                                  description="The real-env PPO/GRPO baseline with a counted real budget.")
experiment_job = dg.define_asset_job(
    "experiment_arms", selection=dg.AssetSelection.assets("experiment_arm"), partitions_def=arm_seed_partitions,
    description="One arm x seed of the testbed `experiments` names (pick or backfill partitions); then "
                "materialize experiment_results.")


PROFILES = {
    "default": {},
    # a few tasks and steps per stage: the browser test backfills real iterations in about a minute
    "tiny": {"experiment": dict(n_train_tasks=8, n_dev_tasks=2, n_test_tasks=4, episodes_noisy=1, episodes_random=1,
                                max_steps=15),
             "loop": dict(tasks_per_iteration=3, group_size=2, max_steps=3, eval_tasks=3, sim_eval_tasks=2,
                          eval_max_steps=5, variants_per_seed=1, n_feasibility_rollouts=2),
             "experiments": dict(testbed="tiny")},
}


def build_defs(data_dir: str | None = None, profile: str | None = None) -> dg.Definitions:
    """Definitions over ``data_dir`` (default $DREAMGYM_DATA or ./data) with a sizing ``profile``
    (default $DREAMGYM_PROFILE or "default"; "tiny" for smoke tests)."""
    root = data_dir or data_root()
    profile = profile or os.environ.get("DREAMGYM_PROFILE", "default")
    if profile not in PROFILES:
        raise ValueError(f"DREAMGYM_PROFILE must be one of {sorted(PROFILES)}, got {profile!r}")
    sizes = PROFILES[profile]
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=[bootstrap_job, iteration_job, real_rl_job, experiment_job],
        # two runs of one partition at once: the second is refused (pipelines/runguard.py)
        executor=locking_executor(root),
        resources={"io_manager": ParquetIOManager(base_dir=os.path.join(root, "parquet")),
                   "checkpoint_io_manager": CheckpointIOManager(base_dir=os.path.join(root, "checkpoints")),
                   "lance_io_manager": LanceDBIOManager(uri=os.path.join(root, "lancedb")),
                   "experiment": Experiment(**sizes.get("experiment", {})),
                   "loop": LoopSettings(**sizes.get("loop", {})), "rl": RLSettings(),
                   "experiments": ExperimentSettings(**{"testbed": os.environ.get("DREAMGYM_TESTBED", "twc"),
                                                        **sizes.get("experiments", {})}),
                   # GPU stages in-process by default; mode="accelerate" runs them under `accelerate launch`
                   "launcher": Launcher()},
    )


defs = build_defs()
