"""The learner check: RL through the arms' code path pushes a known-optimum task's success to 1."""

import csv

from dreamgym_core.envs import EnvSpec
from dreamgym_core.learner_check import COLUMNS, SETTINGS, LearnerRun, append_rows, main, run_curve, start_policy
from pipelines.results_docs import write_results_doc


def test_grpo_takes_an_untrained_policy_to_the_optimum_on_lamp(tmp_path):
    # 3 colours, 2 presses to win, 1 spare step: a uniform policy wins 7/27 of episodes. Measured:
    # greedy dev success 0.125 -> 1.0 after 5 rounds of 16 tasks x 4 with the `fast` setting (the
    # RLConfig defaults, lr 1e-4 with a KL pull, stay near the random rate for 12 rounds).
    spec = EnvSpec("lamp", "lamp", params="colours=3,length=2,slack=1")
    pi0 = start_policy("lamp", spec, str(tmp_path / "pi0"))
    rows = run_curve(LearnerRun("lamp", "fast", SETTINGS["fast"], rounds=6, tasks=16, dev_tasks=32, eval_every=6,
                                max_steps=3), pi0, spec, log=lambda _: None)
    assert [r["round"] for r in rows] == list(range(7))
    assert rows[0]["dev_success"] <= 0.5
    assert rows[-1]["dev_success"] >= 0.9
    assert rows[-1]["transitions"] > rows[1]["transitions"] > 0


def test_rows_append_atomically_and_render_into_the_results_page(tmp_path):
    out = tmp_path / "results" / "learner.csv"
    base = {"testbed": "lamp", "setting": "fast", "seed": 0, "tasks": 16, "group_size": 4, "lr": 1e-3, "kl_coef": 0.0,
            "step_advantage_weight": 0.0, "ppo_epochs": 2, "minibatch_size": 16}
    curve = [{**base, "round": 0, "transitions": 0, "train_success": None, "dev_success": 0.125, "dev_ci_low": 0.05,
              "dev_ci_high": 0.28, "wall_s": 1.0}]
    curve += [{**base, "round": r, "transitions": 180 * r, "train_success": 0.2 + 0.1 * r, "dev_success": None,
               "dev_ci_low": None, "dev_ci_high": None, "wall_s": 1.0 + r} for r in (1, 2, 3)]
    curve[-1].update(dev_success=0.969, dev_ci_low=0.84, dev_ci_high=0.99)
    append_rows(str(out), curve)
    append_rows(str(out), [{**curve[0], "seed": 1, "pool": 300}, {**curve[-1], "seed": 1, "pool": 300}])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0]) == list(COLUMNS)
    assert not (tmp_path / "results" / "learner.csv.tmp").exists()
    doc = write_results_doc(str(tmp_path / "results"), str(tmp_path / "docs" / "results.md"))
    text = open(doc).read()
    assert "| lamp | fast | 0 | 16 fixed | 3 | 540 | 0.40 -> 0.40 | 0.125 | 0.969 [0.84, 0.99] | 4 |" in text
    assert "| lamp | fast | 1 | 16 of 300 | 3 |" in text  # tasks drawn afresh from a pool each round
    assert (tmp_path / "docs" / "results_png" / "learner_curves.png").stat().st_size > 1000


def test_a_registry_testbed_runs_from_the_experiments_pi0_on_its_dev_games(tmp_path, capsys):
    # "tiny" stands in for any experiment testbed (coin, ...): the curve starts from the pi0 stage
    # the experiment arms use and scores the testbed's dev games, with the testbed's rl as setting
    import pytest

    from dreamgym_core.experiment import TESTBEDS

    out, work = tmp_path / "learner.csv", tmp_path / "work"
    assert main(["tiny", "--settings", "testbed", "--pool", "8", "--tasks", "3", "--rounds", "2", "--dev-tasks", "2",
                 "--eval-every", "2", "--work", str(work), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["testbed"], r["setting"], r["round"]) for r in rows] == [("tiny", "testbed", str(k)) for k in range(3)]
    assert float(rows[0]["lr"]) == TESTBEDS["tiny"].rl["lr"] and rows[0]["pool"] == "8"
    assert int(rows[-1]["transitions"]) > 0 and rows[-1]["dev_success"] != ""
    assert len(list((work / "tiny").glob("pi0-s0-*/policy"))) == 1  # the experiment's own pi0 stage
    with pytest.raises(ValueError, match="8 train tasks and 2 dev games; asked for a pool of 9"):
        main(["tiny", "--settings", "testbed", "--pool", "9", "--rounds", "1", "--dev-tasks", "2", "--work", str(work),
              "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["tiny", "--params", "colours=2", "--work", str(work)])
    assert "fixes its own" in capsys.readouterr().err


def test_unknown_setting_is_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["lamp", "--settings", "fastest"])
    assert "unknown ['fastest']" in capsys.readouterr().err


def test_mexp_retrieval_rows_render_one_line_per_variant(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    cols = ["variant", "budget_s", "sft_steps", "scope", "transitions", "state_exact_match", "reward_accuracy",
            "win_recall", "invalid_action_accuracy", "episodes", "sim_success_rate", "real_success_rate",
            "sim_real_gap"]
    rows = [["retrieval_k2", 300, 250, "overall", 150, 0.6, 0.9, 0.5, 0.95, "", "", "", ""],
            ["retrieval_k2", 300, 250, "policy:random", "", "", "", "", "", 60, 0.2, 0.1, 0.1],
            ["no_retrieval", 300, 280, "overall", 150, 0.55, 0.88, 0.4, 0.9, "", "", "", ""]]
    with open(res / "mexp_retrieval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    text = open(write_results_doc(str(res), str(tmp_path / "results.md"))).read()
    assert "| retrieval_k2 | 250 | 0.600 | 0.900 | 0.500 | 0.950 | 0.20 / 0.10 (+0.10) |  |" in text
    assert "| no_retrieval | 280 | 0.550 | 0.880 | 0.400 | 0.900 |  |  |" in text
