"""The iteration's plumbing: resumable stages, task draws, evaluation rows, the exact real budget."""

import os

import pyarrow as pa
import pytest

from dreamgym_core.evaluation import eval_rows, evaluate, wilson_interval
from dreamgym_core.loop import (LoopConfig, StageStore, clear_partial, initial_state_fn, policy_version,
                                rl_in_real_env, run_stage, sample_tasks)
from dreamgym_core.schema import Task, Trajectory, Transition
from tests.test_rollout import TASKS, CountdownEnv


def _traj(task_id: str, won: bool, n: int = 2) -> Trajectory:
    task = Task(task_id, "x", "g", "train", 0, "do")
    steps = tuple(Transition(f"{task_id}#p#0", task_id, "x", i, "s", "a", "s2", float(won and i == n - 1), 0.0,
                             i == n - 1, won and i == n - 1, not won and i == n - 1, True, "policy")
                  for i in range(n))
    return Trajectory(f"{task_id}#p#0", task, "p", steps)


def test_stage_runs_once_then_is_loaded(tmp_path):
    store, calls, logs = StageStore(str(tmp_path / "001")), [], []

    def make():
        calls.append(1)
        return store.put_table("rollouts", pa.table({"x": [1, 2]}))

    first, _ = run_stage(store, "rollouts", logs.append, make, lambda: store.table("rollouts"))
    again, dt = run_stage(store, "rollouts", logs.append, make, lambda: store.table("rollouts"))
    assert calls == [1] and dt == 0.0 and again.equals(first)
    assert "skipped" in logs[-1]


def test_a_failed_stage_leaves_nothing_and_reruns(tmp_path):
    store, calls = StageStore(str(tmp_path / "002")), []

    def boom():
        calls.append(1)
        with open(store.path("policy.json.tmp"), "w") as f:  # what a killed writer leaves
            f.write("{")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(store, "policy", print, boom, lambda: store.record("policy"))
    assert not store.done("policy")
    clear_partial(store)
    assert os.listdir(store.root) == []
    rec, _ = run_stage(store, "policy", print, lambda: store.put_record("policy", {"loss": 1.0}), lambda: None)
    assert rec == {"loss": 1.0} and store.record("policy") == {"loss": 1.0}


def test_sample_tasks_is_deterministic_and_per_iteration():
    pool = [Task(f"t/{i}", "x", "g", "train", i, "do") for i in range(40)]
    a, b = sample_tasks(pool, 8, 1, 0), sample_tasks(list(reversed(pool)), 8, 1, 0)
    assert [t.task_id for t in a] == [t.task_id for t in b] and len(a) == 8
    assert [t.task_id for t in sample_tasks(pool, 8, 2, 0)] != [t.task_id for t in a]
    assert len(sample_tasks(pool[:5], 8, 1, 0)) == 5


def test_eval_row_gap_compares_the_same_tasks():
    real = [_traj("a", True), _traj("b", False), _traj("c", False), _traj("d", True)]
    sim = [_traj("a", True), _traj("b", True)]  # sim scores 1.0 on a, b; real got 0.5 on those two
    row = eval_rows("dreamgym", 3, real, sim, 0, "greedy")
    assert row["success_rate"] == 0.5 and row["sim_success_rate"] == 1.0
    assert row["sim_real_gap"] == pytest.approx(0.5)
    assert row["ci_low"] < 0.5 < row["ci_high"] and row["iteration"] == 3
    assert eval_rows("sft", 0, real, None, 7, "sampled")["sim_real_gap"] is None


def test_evaluate_scores_real_and_sim_on_the_same_tasks():
    """The one evaluation: real success per mode with its Wilson interval, M_exp success on the first
    ``sim_eval_tasks`` of the same tasks (here the 'sim' env never lets 'go' win: gap = -real)."""
    from tests.test_rollout import Always

    cfg = LoopConfig(eval_tasks=2, sim_eval_tasks=1, eval_max_steps=5)
    episodes, sims = {}, {}
    table = evaluate(lambda mode: Always("go"), "go", 4, TASKS, lambda: CountdownEnv(need=3),
                     lambda init: CountdownEnv(need=99), None, cfg, real_transitions=11, log=lambda s: None,
                     modes=("greedy", "sampled"), episodes=episodes, sim_episodes=sims)
    rows = table.to_pylist()
    assert [r["mode"] for r in rows] == ["greedy", "sampled"] and all(r["episodes"] == 2 for r in rows)
    assert rows[0]["success_rate"] == 1.0 and (rows[0]["ci_low"], rows[0]["ci_high"]) == wilson_interval(2, 2)
    assert rows[0]["sim_success_rate"] == 0.0 and rows[0]["sim_real_gap"] == -1.0
    assert rows[1]["sim_real_gap"] is None and rows[0]["real_transitions"] == 11
    assert [t.task.task_id for t in episodes["greedy"]] == ["t/0", "t/1"] and len(sims["greedy"]) == 1


def test_policy_version_names():
    assert policy_version(0) == "sft" and policy_version(2) == "dreamgym@002"


def test_initial_state_fn_prefers_the_tasks_own_state():
    f = initial_state_fn({"t/1": "real start"})
    assert f(Task("t/1", "x", "g", "train", 1, "do")) == "real start"
    assert f(Task("s/1", "x", "g", "train", 1, "do", source="synthetic", initial_state="written")) == "written"
    with pytest.raises(ValueError, match="t/9"):
        f(Task("t/9", "x", "g", "train", 9, "do"))


class _FakeTrainer:
    """Records what it was trained on; the policy always says 'go'."""

    def __init__(self, algorithm="grpo"):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(algorithm=algorithm, temperature=1.0)
        self.seen = []
        self.model = self.tokenizer = None

    def update(self, trajs):
        self.seen.append(sum(len(t) for t in trajs))
        return {"loss/policy": 0.0}


@pytest.mark.parametrize("budget", [0, 1, 7, 20, 1000])
def test_real_rl_budget_is_exact(monkeypatch, budget):
    import dreamgym_core.policy as policy_mod

    class GoPolicy:
        def __init__(self, *a, **k):
            self.name = "go"

        def act(self, contexts):
            from dreamgym_core.rollout import ActionChoice
            return [ActionChoice("go", 0.0) for _ in contexts]

    monkeypatch.setattr(policy_mod, "LMPolicy", GoPolicy)
    tr = _FakeTrainer()
    cfg = LoopConfig(tasks_per_iteration=3, group_size=2, eval_max_steps=10)
    rec = rl_in_real_env(tr, lambda: CountdownEnv(need=3), TASKS, cfg, budget=budget, rounds=4, name="real_rl")
    full = 4 * 3 * 2 * 3  # rounds x tasks x group x steps per episode
    assert rec["real_transitions"] == min(budget, full) == sum(tr.seen)
    assert rec["real_transitions_recorded"] == rec["real_transitions"]  # the check compares the two
    with pytest.raises(ValueError):
        rl_in_real_env(tr, lambda: CountdownEnv(), TASKS, cfg, budget=-1, rounds=1, name="x")


def test_stage_store_keeps_mapped_tables_in_their_home_once_and_checks_them(tmp_path):
    """A table whose final home is given (the asset's Parquet partition) is written there only, and
    counts as finished only while the file is the one this store wrote."""
    from dreamgym_core.io import write_parquet_atomic

    home = str(tmp_path / "parquet" / "task_pool" / "001.parquet")
    store = StageStore(str(tmp_path / "work" / "001"), tables={"task_pool": home})
    assert not store.done("task_pool") and store.table("task_pool") is None
    t = pa.table({"task_id": ["a", "b"]})
    store.put_table("task_pool", t)
    assert os.listdir(store.root) == ["task_pool.sha256"]  # no second copy in the work dir
    assert store.done("task_pool") and store.table("task_pool").equals(t)
    assert StageStore(store.root, tables={"task_pool": home}).done("task_pool")  # a retry sees it
    write_parquet_atomic(pa.table({"task_id": ["other"]}), home)  # another configuration's run rewrote it
    assert not store.done("task_pool") and store.table("task_pool") is None
