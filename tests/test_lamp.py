"""The lamp env: a tiny text task with a known optimum (the learner check's testbed)."""

import math

import pytest

from dreamgym_core.envs import EnvSpec, SerialBatchEnv, make_env
from dreamgym_core.envs.lamp import LampEnv, optimal_action, parse_params
from dreamgym_core.rollout import RandomPolicy, RolloutConfig, rollout
from dreamgym_core.state import AbstractState


def test_expert_and_optimal_policy_win_every_task_in_length_steps():
    env = LampEnv("colours=4,length=3,slack=1")
    for task in env.tasks("train", 20):
        obs = env.reset(task)
        for step in range(3):
            action = optimal_action(obs.state)
            assert action == env.expert_actions()[0] and action in obs.candidates
            res = env.step(action)
            obs = res.obs
        assert res.won and res.done and res.reward == 1.0 and not res.lost


def test_wrong_presses_waste_steps_and_the_episode_is_lost_after_length_plus_slack():
    env = LampEnv("colours=3,length=2,slack=1")
    obs = env.reset(env.tasks("dev", 1)[0])
    wrong = next(c for c in obs.candidates if c != optimal_action(obs.state))
    results = [env.step(wrong) for _ in range(3)]
    assert [r.done for r in results] == [False, False, True] and results[-1].lost and not results[-1].won
    assert all(r.valid and r.reward == 0.0 for r in results)
    assert results[0].obs.state.split("\n")[0] == "feedback: Nothing happens."


def test_states_round_trip_and_candidates_are_the_state_rule():
    env = LampEnv()
    obs = env.reset(env.tasks("test", 1)[0])
    assert AbstractState.parse(obs.state).render() == obs.state
    assert sorted(obs.candidates) == sorted(env.propose_candidates(obs.state))
    assert env.step("dance").valid is False


def test_random_policy_wins_at_the_binomial_rate():
    spec = EnvSpec("lamp", "lamp", params="colours=3,length=3,slack=2")
    tasks = make_env(spec).tasks("train", 400)
    trajs, stats = rollout(SerialBatchEnv(lambda: make_env(spec), 64), RandomPolicy(), tasks,
                           RolloutConfig(max_steps=10, batch_size=64))
    p = 1 / 3
    want = sum(math.comb(5, k) * p ** k * (1 - p) ** (5 - k) for k in range(3, 6))
    assert stats.successes / stats.episodes == pytest.approx(want, abs=0.06)


def test_splits_are_disjoint_and_params_are_checked():
    env = LampEnv()
    ids = [{t.task_id for t in env.tasks(s, 50)} for s in ("train", "dev", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    with pytest.raises(ValueError, match="colours"):
        parse_params("colours=1")
    with pytest.raises(ValueError, match="lamp params"):
        parse_params("size=3")


def test_redraw_keeps_the_task_s_first_colour_and_draws_the_rest_per_episode():
    fixed, fresh = LampEnv("colours=4,length=4,slack=2"), LampEnv("colours=4,length=4,slack=2,redraw=1")
    task = fixed.tasks("train", 1, start=7)[0]
    seqs = {}
    for name, env in (("fixed", fixed), ("fresh", fresh)):
        seqs[name] = []
        for _ in range(12):
            env.reset(task)
            seqs[name].append(tuple(env.expert_actions()))
    assert len(set(seqs["fixed"])) == 1                      # the task fixes its whole sequence
    assert {s[0] for s in seqs["fresh"]} == {seqs["fixed"][0][0]}  # redraw: the first colour is the task's
    assert len(set(seqs["fresh"])) > 1                       # ... and the rest differs between episodes
    with pytest.raises(ValueError, match="redraw"):
        parse_params("redraw=2")
