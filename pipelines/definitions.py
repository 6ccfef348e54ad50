"""Dagster Definitions: every DreamGym stage as an asset (served by `dagster dev -w workspace.yaml`)."""

from __future__ import annotations

import os

import dagster as dg

from assets.bootstrap import eval_tasks, offline_trajectories, seed_tasks
from assets.experience import cot_annotations, experience_model, experience_model_eval
from pipelines.io_managers import CheckpointIOManager, ParquetIOManager
from pipelines.lance_io import LanceDBIOManager
from pipelines.resources import Experiment, data_root

ALL_ASSETS = [seed_tasks, eval_tasks, offline_trajectories, cot_annotations, experience_model,
              experience_model_eval]

bootstrap_job = dg.define_asset_job("bootstrap", selection=dg.AssetSelection.groups("bootstrap"),
                                    description="Tasks and offline real trajectories (iteration 0).")


def build_defs(data_dir: str | None = None) -> dg.Definitions:
    root = data_dir or data_root()
    return dg.Definitions(
        assets=ALL_ASSETS,
        jobs=[bootstrap_job],
        resources={"io_manager": ParquetIOManager(base_dir=os.path.join(root, "parquet")),
                   "checkpoint_io_manager": CheckpointIOManager(base_dir=os.path.join(root, "checkpoints")),
                   "lance_io_manager": LanceDBIOManager(uri=os.path.join(root, "lancedb")),
                   "experiment": Experiment()},
    )


defs = build_defs()
