from bench.rl_in_mexp import pick_tasks
from dreamgym_core.loop import sample_tasks
from dreamgym_core.schema import Task

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
    import pytest

    from bench.compare_policies import main

    assert main([]) == 2 and "NAME=DIR" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"sft=.*nowhere: no such checkpoint directory"):
        main([str(tmp_path), f"sft={tmp_path / 'nowhere'}"])
    (tmp_path / "p").mkdir()
    with pytest.raises(SystemExit, match="modes='beam'"):
        main([str(tmp_path), f"sft={tmp_path / 'p'}", "modes=beam"])
