import math

import pyarrow.parquet as pq
import pytest

from dreamgym_core.io import read_parquet, write_parquet_atomic
from dreamgym_core.schema import (
    TRAJECTORY_ROWS_SCHEMA, RawObs, Task, Trajectory, Transition, tasks_from_arrow, tasks_to_arrow,
    trajectories_from_arrow, trajectories_to_arrow, transitions_from_arrow, transitions_to_arrow,
)


def _task(i=0, **kw):
    return Task(task_id=f"twx/twc/train/{i}", env="twx", game="twc", split="train", seed=i,
                instruction="put things away", params="numLocations=1", **kw)


def _step(traj_id, task_id, i, done=False, won=False, reward=0.0, policy="expert"):
    return Transition(traj_id=traj_id, task_id=task_id, env="twx", step_idx=i, state=f"s{i}",
                      action=f"a{i}", next_state=f"s{i + 1}", reward=reward, score=0.5 * i, done=done,
                      won=won, lost=False, valid=i % 2 == 0, action_kind="expert",
                      candidates=("a", "b"), obs=RawObs("fb", "look", "inv", ("a",), 0.25),
                      next_obs=RawObs("fb2", "look2", "", (), 0.5), policy=policy)


def test_tasks_round_trip_through_parquet(tmp_path):
    tasks = [_task(0), _task(1, source="synthetic", parent_task_id="twx/twc/train/0", iteration=2,
                             initial_state="feedback: \nlocation: kitchen\nobjects: \nexits: \ninventory: ")]
    path = write_parquet_atomic(tasks_to_arrow(tasks), str(tmp_path / "t.parquet"))
    assert tasks_from_arrow(read_parquet(path)) == tasks


def test_transitions_round_trip_through_parquet(tmp_path):
    steps = [_step("x", "t", i) for i in range(3)]
    path = write_parquet_atomic(transitions_to_arrow(steps), str(tmp_path / "s.parquet"))
    back = transitions_from_arrow(pq.read_table(path))
    assert back == steps
    assert back[0].obs.candidates == ("a",)


def test_trajectories_round_trip_keeps_order_and_episode_fields(tmp_path):
    t0, t1 = _task(0), _task(1)
    a = Trajectory("A", t0, "expert", tuple(_step("A", t0.task_id, i, done=i == 2, won=i == 2,
                                                  reward=float(i == 2)) for i in range(3)))
    b = Trajectory("B", t1, "random", tuple(_step("B", t1.task_id, i, done=i == 1, policy="random") for i in range(2)),
                   truncated=True)
    table = trajectories_to_arrow([a, b])
    assert table.schema == TRAJECTORY_ROWS_SCHEMA
    path = write_parquet_atomic(table.take([4, 3, 2, 1, 0]), str(tmp_path / "tr.parquet"))  # shuffled rows
    back = {t.traj_id: t for t in trajectories_from_arrow(read_parquet(path))}
    assert back["A"] == a and back["B"] == b
    assert back["A"].won and back["A"].ret == 1.0 and not back["B"].won and back["B"].truncated


def test_trajectory_rejects_foreign_steps():
    t0 = _task(0)
    bad = Trajectory("A", t0, "expert", (_step("OTHER", t0.task_id, 0),))
    with pytest.raises(ValueError, match="belongs to"):
        trajectories_to_arrow([bad])


def test_task_validates_split_and_source():
    with pytest.raises(ValueError, match="split must be one of"):
        Task("t", "e", "g", "validation", 0, "i")
    with pytest.raises(ValueError, match="source must be one of"):
        _task(0, source="web")


@pytest.mark.parametrize("reward", [math.nan, math.inf])
def test_transition_rejects_non_finite_reward(reward):
    with pytest.raises(ValueError, match="finite"):
        Transition("x", "t", "twx", 0, "s", "a", "s2", reward, 0.0, False, False, False, True, "expert")
