import os

import pytest

from dreamgym_core.collect import CollectConfig, collect
from dreamgym_core.models import load_checkpoint
from dreamgym_core.policy import LMPolicy, PolicyFormat
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


def test_the_cloned_window_is_recorded_and_acting_with_another_raises(tmp_path, trajs):
    """policy_init.history_window 8: the checkpoint says 8, every consumer reads 8, acting with 2 raises."""
    out = str(tmp_path / "sft8")
    init_policy(trajs, out, PolicyInitConfig(hidden=32, layers=1, heads=2, steps=2, vocab_size=400, history_window=8))
    model, tok, meta = load_checkpoint(out)
    assert meta["policy_format"]["history_window"] == 8 and LMPolicy(model, tok, "p").fmt == PolicyFormat(8)
    with pytest.raises(ValueError, match="history_window=8"):
        LMPolicy(model, tok, "p", fmt=PolicyFormat(history_window=2))


def test_a_policy_without_a_recorded_format_is_cloned_again(tmp_path):
    import json

    os.makedirs(tmp_path / "old")
    (tmp_path / "old" / "dreamgym.json").write_text(json.dumps({"kind": "policy"}))
    assert not policy_dir_ok(str(tmp_path / "old"))


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
