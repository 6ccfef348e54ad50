"""scripts/sampled_scores.py: an experiment's finished arms re-scored with the sampled policy."""

import csv
import importlib.util
import os

import pytest

from dreamgym_core.experiment import TESTBEDS, run_arm
from dreamgym_core.experiment_results import read_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("sampled_scores", os.path.join(ROOT, "scripts", "sampled_scores.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_finished_arms_get_sampled_rows_paired_on_the_same_games(tmp_path):
    work, res = str(tmp_path / "work"), str(tmp_path / "results")
    tb = TESTBEDS["tiny"]
    greedy = {arm: run_arm(tb, arm, "none" if arm == "init" else "grpo", 0, work, log=lambda _: None)
              for arm in ("init", "real_rl")}
    script = _script()
    assert script.main(["tiny", "--arms", "init,real_rl", "--seeds", "0", "--data", work, "--results", res]) == 0
    rows = {r["arm"]: r for r in read_rows(os.path.join(res, "tiny_sampled.csv"))}
    assert set(rows) == {"init", "real_rl"}
    for arm, (row, games) in greedy.items():
        got = rows[arm]
        assert got["testbed"] == "tiny_sampled" and int(got["games"]) == games.num_rows == tb.test_games
        assert int(got["real_transitions"]) == row["real_transitions"]  # the arm's cost, unchanged
    with open(os.path.join(res, "tiny_sampled_paired.csv"), newline="") as f:
        paired = list(csv.DictReader(f))
    assert {(r["arm"], r["baseline"]) for r in paired} == {("init", "real_rl"), ("real_rl", "init")}
    assert os.path.exists(os.path.join(res, "tiny_sampled_pooled.csv"))
    with pytest.raises(SystemExit, match="not finished"):
        script.main(["tiny", "--arms", "sft", "--seeds", "0", "--data", work, "--results", res])
