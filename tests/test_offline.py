"""The offline-only path: logs in, no live env touched; export -> import round trip; the log split."""

import json
import os

import pytest

from dreamgym_core.importer import FIELDS, export_jsonl, export_rows, import_file
from dreamgym_core.io import read_parquet
from dreamgym_core.offline import is_heldout, logged_candidates, split_logs, tasks_of
from dreamgym_core.schema import RawObs, Task, Trajectory, Transition, trajectories_from_arrow, trajectories_to_arrow


def _traj(task_id: str, n: int, *, split="train", won=True, policy="expert", params="") -> Trajectory:
    task = Task(task_id=task_id, env="twx", game="twc", split=split, seed=int(task_id.rsplit("/", 1)[-1]),
                instruction=f"tidy up {task_id}", params=params)
    steps = []
    for i in range(n):
        last = i == n - 1
        steps.append(Transition(
            traj_id=f"{task_id}#{policy}#0", task_id=task_id, env="twx", step_idx=i, state=f"room {i} of {task_id}",
            action=f"take apple {i}", next_state=f"room {i + 1} of {task_id}", reward=1.0 if last and won else 0.0,
            score=(i + 1) / n, done=last, won=last and won, lost=last and not won, valid=i % 2 == 0,
            action_kind="invalid" if i % 2 else "noisy", candidates=(f"take apple {i}", "look"),
            obs=RawObs(feedback="f", look="l", score=i / n), policy=policy, iteration=0))
    return Trajectory(traj_id=f"{task_id}#{policy}#0", task=task, policy=policy, steps=tuple(steps))


def test_export_then_import_gives_the_same_rows(tmp_path):
    trajs = [_traj("twx/twc/train/1", 3, params="numLocations=1"), _traj("twx/twc/train/2", 2, won=False),
             _traj("twx/twc/test/3", 4, split="test", policy="random")]
    table = trajectories_to_arrow(trajs)
    logs = tmp_path / "logs.jsonl"
    assert export_jsonl(table, str(logs)) == 9
    report = import_file(str(logs), str(tmp_path / "back.parquet"))
    assert (report.rows, report.trajectories, report.successes, report.truncated) == (9, 3, 2, 0)
    back = read_parquet(report.path)
    assert export_rows(back) == export_rows(table)  # every field of the importer's format, row for row
    assert set(json.loads(open(logs).readline())) == set(FIELDS)
    # what import derives beyond the format: the score before each step, so M_exp's progress reads as collected
    assert ({t.traj_id: [s.obs.score for s in t.steps] for t in trajectories_from_arrow(back)}
            == {t.traj_id: [s.obs.score for s in t.steps] for t in trajs})
    assert {t.task.params for t in trajectories_from_arrow(back)} == {"numLocations=1", ""}
    # --split keeps one split's trajectories
    assert export_jsonl(table, str(tmp_path / "test.jsonl"), split="test") == 4
    with pytest.raises(ValueError, match="no transitions of split 'dev'"):
        export_jsonl(table, str(tmp_path / "dev.jsonl"), split="dev")


def test_split_holds_out_whole_tasks_by_hash_or_the_logs_own_test_split():
    trajs = [_traj(f"twx/twc/train/{i}", 2, policy=p) for i in range(40) for p in ("expert", "random")]
    split = split_logs(trajs, heldout_share=0.25)
    train_ids = {t.task.task_id for t in split.train}
    test_ids = {t.task.task_id for t in split.test}
    assert train_ids and test_ids and not train_ids & test_ids  # whole tasks, never both sides
    assert test_ids == {f"twx/twc/train/{i}" for i in range(40) if is_heldout(f"twx/twc/train/{i}", 0.25)}
    assert 4 <= len(test_ids) <= 16
    # order does not matter, and appending logs never moves a task between sides
    assert {t.task.task_id for t in split_logs(trajs[::-1] + [_traj("twx/twc/train/99", 2)], 0.25).test} - {
        "twx/twc/train/99"} == test_ids
    # logs with their own test split keep it, and hold out nothing else
    own = split_logs(trajs + [_traj("twx/twc/test/7", 2, split="test")], heldout_share=0.25)
    assert {t.task.task_id for t in own.test} == {"twx/twc/test/7"} and len(own.train) == 80
    with pytest.raises(ValueError, match="no held-out task"):
        split_logs(trajs, heldout_share=0.0)


def test_tasks_of_carries_the_logged_first_state(tmp_path):
    tasks = tasks_of([_traj("twx/twc/train/2", 2), _traj("twx/twc/train/1", 3), _traj("twx/twc/train/2", 4)])
    assert [t.task_id for t in tasks] == ["twx/twc/train/1", "twx/twc/train/2"]
    # hand-built tasks carry none: step 0's state; imported ones carry it from the importer
    assert [t.initial_state for t in tasks] == ["room 0 of twx/twc/train/1", "room 0 of twx/twc/train/2"]
    export_jsonl(trajectories_to_arrow([_traj("twx/twc/train/5", 2)]), str(tmp_path / "l.jsonl"))
    imported = trajectories_from_arrow(read_parquet(import_file(str(tmp_path / "l.jsonl"),
                                                                str(tmp_path / "l.parquet")).path))
    assert imported[0].task.initial_state == "room 0 of twx/twc/train/5" == tasks_of(imported)[0].initial_state


def test_logged_candidates_for_an_env_without_a_state_rule():
    trajs = [_traj("web/shop/1", 3)]
    propose = logged_candidates(trajs)
    assert propose("room 1 of web/shop/1") == ["look", "take apple 1"]  # a logged state: its logged candidates
    # an unseen state: logged actions whose words after the verb are all in it ("look" has none: always)
    assert propose("an apple 2 and a pear") == ["look", "take apple 2"]


def test_offline_experiment_refuses_live_steps_on_one_line(tmp_path):
    from pipelines.resources import Experiment, OfflineOnlyError

    logs = tmp_path / "l.jsonl"
    export_jsonl(trajectories_to_arrow([_traj("twx/twc/train/1", 2)]), str(logs))
    exp = Experiment(logs=str(logs))
    with pytest.raises(OfflineOnlyError) as err:
        exp.env_spec()
    assert "offline-only" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(OfflineOnlyError, match="real_rl_policy trains in a live env"):
        exp.require_training_env("real_rl_policy")
    assert Experiment(logs=str(logs), live_scoring=True).env_spec().env == "twx"
    with pytest.raises(OfflineOnlyError, match="no file 'nope'"):
        Experiment(logs="nope").logs_path()


@pytest.fixture(scope="module")
def twc_logs(tmp_path_factory, twx_env):
    """Logs exported from a tiny twc collection (the live env's last use in this module)."""
    from dreamgym_core.collect import CollectConfig, collect

    tasks = twx_env.tasks("train", 12)
    trajs, _ = collect(twx_env, tasks, CollectConfig(episodes={"expert": 1, "noisy": 1, "random": 1}, max_steps=12))
    path = tmp_path_factory.mktemp("logs") / "twc_logs.jsonl"
    export_jsonl(trajectories_to_arrow(trajs), str(path))
    return str(path)


def _no_live_env(*args, **kwargs):
    raise AssertionError("the offline-only path started a live env")


def test_offline_demo_runs_end_to_end_without_a_live_env(twc_logs, tmp_path, monkeypatch, capsys):
    import assets.bootstrap
    import assets.experience
    import assets.runtime
    import dreamgym_core.envs
    import dreamgym_core.envs.twx
    from dreamgym_core.offline import read_logs
    from pipelines.cli import main

    assert split_logs(read_logs(twc_logs)).test  # the tiny logs hold some tasks out
    for mod in (dreamgym_core.envs, assets.bootstrap, assets.experience, assets.runtime):
        monkeypatch.setattr(mod, "make_env", _no_live_env)
    monkeypatch.setattr(dreamgym_core.envs.twx.TWXEnv, "__init__", _no_live_env)
    data = tmp_path / "data"
    monkeypatch.setenv("DREAMGYM_DATA", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    rc = main(["demo", "--tiny", "--offline", twc_logs, "--data", str(data), "--iterations", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    with pytest.raises(AssertionError, match="started a live env"):  # the live path is really switched off
        assets.runtime.candidate_rule(__import__("pipelines.resources").resources.Experiment())
    assert "Skipped: s2r_policy, real_rl_policy" in out
    assert "M_exp fidelity on held-out logs" in out and "no live env: real success is not measured" in out

    from dreamgym_core.sql import run_query

    fid = json.loads(run_query(str(data), "SELECT scope, transitions, state_exact_match FROM experience_model_eval "
                                          "WHERE scope = 'overall'", fmt="json"))
    held = split_logs(read_logs(twc_logs)).test
    assert fid[0]["transitions"] == min(9, sum(len(t) for t in held))  # tiny max_transitions: 9
    ev = json.loads(run_query(str(data), "SELECT policy, success_rate, sim_success_rate, episodes FROM policy_eval",
                              fmt="json"))
    assert {r["policy"] for r in ev} == {"random", "sft", "dreamgym"}
    assert all(r["success_rate"] is None and r["sim_success_rate"] is not None and r["episodes"] > 0 for r in ev)
    seeds = json.loads(run_query(str(data), "SELECT count(*) n, count(initial_state) s FROM seed_tasks", fmt="json"))
    assert seeds[0]["n"] == len({t.task.task_id for t in split_logs(read_logs(twc_logs)).train}) == seeds[0]["s"]
    rollouts = json.loads(run_query(str(data), "SELECT count(*) n FROM rollouts", fmt="json"))
    assert rollouts[0]["n"] > 0
    # the logs name twx/twc, yet the offline path gives M_exp none of twc's side channels
    [meta] = [json.loads(p.read_text()) for p in data.glob("checkpoints/experience_model/*/final/dreamgym.json")]
    assert meta["side_channels"] == [] and meta["placements"] == []
    assert not (meta["prompt"]["progress"] or meta["prompt"]["placements"] or meta["prompt"]["affordances"])


def test_export_command_writes_what_import_reads(tmp_path, capsys):
    from dreamgym_core.io import write_parquet_atomic
    from pipelines.cli import main

    table = trajectories_to_arrow([_traj("twx/twc/train/1", 3), _traj("twx/twc/dev/2", 2, split="dev")])
    write_parquet_atomic(table, str(tmp_path / "parquet" / "offline_trajectories.parquet"))
    assert main(["export", "--data", str(tmp_path), "--to", str(tmp_path / "x.jsonl"), "--split", "train"]) == 0
    assert "exported 3 transitions" in capsys.readouterr().out
    assert import_file(str(tmp_path / "x.jsonl"), str(tmp_path / "x.parquet")).trajectories == 1
    assert main(["export", "--data", str(tmp_path / "empty"), "--to", str(tmp_path / "y.jsonl")]) == 2
    assert "materialize offline_trajectories first" in capsys.readouterr().err


def test_live_training_steps_refuse_an_offline_run(twc_logs, tmp_path, monkeypatch):
    """real_rl_policy on an offline-only experiment: a failed step whose error is one line saying why."""
    import dagster as dg

    from pipelines.definitions import ALL_ASSETS, build_defs
    from pipelines.resources import Experiment

    from dreamgym_core.io import write_parquet_atomic
    from dreamgym_core.schema import tasks_to_arrow

    monkeypatch.setenv("DREAMGYM_DATA", str(tmp_path))
    # its inputs as the offline run leaves them: seed tasks and a policy_init checkpoint reference
    write_parquet_atomic(tasks_to_arrow([_traj("twx/twc/train/1", 2).task]),
                         str(tmp_path / "parquet" / "seed_tasks.parquet"))
    os.makedirs(tmp_path / "checkpoints" / "policy_init")
    (tmp_path / "checkpoints" / "policy_init" / "manifest.json").write_text(
        json.dumps({"path": str(tmp_path), "kind": "policy"}))
    defs = build_defs(str(tmp_path), "tiny")
    res = dg.materialize(ALL_ASSETS, selection=["real_rl_policy"], raise_on_error=False,
                         resources={**defs.resources, "experiment": Experiment(logs=twc_logs)})
    assert not res.success
    errors = [e.step_failure_data.error for e in res.all_events if e.is_step_failure]
    assert errors and "real_rl_policy trains in a live env" in str(errors[0].message)
