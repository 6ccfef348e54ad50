import os

import pytest

from dreamgym_core.collect import CollectConfig, collect
from dreamgym_core.models import load_checkpoint
from dreamgym_core.policy import LMPolicy
from dreamgym_core.policy_init import PolicyInitConfig, init_policy, policy_dir_ok
from dreamgym_core.rollout import PolicyContext


@pytest.fixture(scope="module")
def trajs(twx_env):
    out, _ = collect(twx_env, twx_env.tasks("train", 6), CollectConfig(episodes={"expert": 1, "random": 1}))
    return out


def test_bc_init_trains_saves_and_acts(tmp_path, trajs):
    out = str(tmp_path / "sft")
    m = init_policy(trajs, out, PolicyInitConfig(hidden=32, layers=1, heads=2, steps=30, vocab_size=400))
    assert policy_dir_ok(out) and not os.path.exists(out + ".tokenizer")
    assert m["bc/steps"] == 30 and m["bc/examples"] > 0 and m["bc/final_loss"] == m["bc/final_loss"]
    model, tok, meta = load_checkpoint(out)
    assert meta["kind"] == "policy" and meta["config"]["steps"] == 30
    s = trajs[0].steps[0]
    (choice,) = LMPolicy(model, tok, "sft", greedy=True).act([PolicyContext(trajs[0].task.instruction, s.state,
                                                                             s.candidates)])
    assert choice.action in s.candidates and choice.logprob <= 0


def test_bc_init_stops_at_its_wall_budget(tmp_path, trajs):
    m = init_policy(trajs, str(tmp_path / "b"), PolicyInitConfig(hidden=32, layers=1, heads=2, steps=100_000,
                                                                 time_budget_s=1.0, vocab_size=400))
    assert 0 < m["bc/steps"] < 100_000


def test_bad_config_and_no_wins_are_clear_errors(tmp_path, trajs):
    with pytest.raises(ValueError, match="steps"):
        PolicyInitConfig(steps=0)
    lost = [t for t in trajs if not t.won]
    with pytest.raises(ValueError, match="no won episode"):
        init_policy(lost, str(tmp_path / "c"), PolicyInitConfig(hidden=32, layers=1, heads=2, steps=1))
