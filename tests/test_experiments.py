"""The research runs of pipelines.experiments: their task draws, the sim-win classifier, argument errors."""

from types import SimpleNamespace as NS

import pytest

from dreamgym_core.loop import sample_tasks
from dreamgym_core.schema import Task
from pipelines.experiments import classify, pick_tasks

TRAIN = [Task(f"t/{i:02d}", "countdown", "g", "train", i, "count") for i in range(40)]


def test_uniform_pick_is_the_loops_draw():
    assert pick_tasks(TRAIN, 8, 3, None) == (sample_tasks(TRAIN, 8, 3, 0), 0)


def test_variance_pick_reuses_the_most_mixed_groups_up_to_half():
    variance = {"t/05": 0.25, "t/07": 0.0, "t/11": 0.1875, "t/30": 0.1875, "t/31": 0.09, "t/32": 0.05, "gone": 0.2}
    tasks, reused = pick_tasks(TRAIN, 8, 1, variance)
    ids = [t.task_id for t in tasks]
    assert reused == 4 and ids[:4] == ["t/05", "t/11", "t/30", "t/31"]  # highest V_tau first, ties by id
    assert len(ids) == len(set(ids)) == 8 and "t/07" not in ids[:4]
    assert not set(ids[4:]) & {"t/05", "t/11", "t/30", "t/31"}
    few, n = pick_tasks(TRAIN, 8, 1, {"t/07": 0.0, "t/09": 0.1})
    assert n == 1 and few[0].task_id == "t/09" and len({t.task_id for t in few}) == 8


def test_compare_policies_needs_data_and_existing_checkpoints(tmp_path, capsys):
    from pipelines.experiments import compare_policies as main

    assert main([]) == 2 and "NAME=DIR" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"sft=.*nowhere: no such checkpoint directory"):
        main([str(tmp_path), f"sft={tmp_path / 'nowhere'}"])
    (tmp_path / "p").mkdir()
    with pytest.raises(SystemExit, match="modes='beam'"):
        main([str(tmp_path), f"sft={tmp_path / 'p'}", "modes=beam"])


class FakeEnv:
    """Real scores per action; 'put b in y' wins."""

    def __init__(self, scores, cands=("take a", "put a in x", "take b", "put b in y", "put a in y")):
        self.scores, self.cands = scores, cands

    def reset(self, task):
        return NS(candidates=self.cands)

    def step(self, action):
        s = self.last = self.scores.get(action, getattr(self, "last", 0.0))  # a rejected action changes nothing
        return NS(obs=NS(candidates=self.cands), score=s, won=s >= 1.0, done=s >= 1.0)


def _traj(*actions):
    return NS(task=None, steps=[NS(action=a, score=0.0) for a in actions])


def test_classify_tells_placement_errors_from_counting_errors():
    env = FakeEnv({"take a": 0.25, "put a in x": 0.0, "put a in y": 0.5, "take b": 0.75, "put b in y": 1.0})
    assert classify(env, _traj("take a", "put a in y", "take b", "put b in y"))[0] == "real win"
    assert classify(env, _traj("take a", "put a in x"))[0] == "last put wrong, real score 0.00"
    assert classify(env, _traj("take a", "put a in y"))[0] == "last put right, real score 0.50"
    kind, lines = classify(env, _traj("take a", "dance"))
    assert kind == "diverged" and len(lines) == 2 and "real score" in lines[0]


def test_experiment_cli_prints_usage_and_refuses_the_removed_window(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["experiment", "rl-in-mexp"]) == 2 and "ITERATIONS" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="window= is gone"):
        main(["experiment", "rl-in-mexp", str(tmp_path), "grpo", "1", "window=8"])
    capsys.readouterr()
    assert main(["experiment", "nonsense"]) == 2  # neither an experiment nor a testbed: one line naming it
    err = capsys.readouterr().err.strip()
    assert "'nonsense'" in err and "twc" in err and "rl-in-mexp" in err and "\n" not in err
