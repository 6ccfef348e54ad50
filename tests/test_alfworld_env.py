"""ALFWorld: the local game generator, the abstract state, candidates and the expert (envs.alfworld_env).

Fast tests play a few small generated games (each reset costs 1-4 s in the PDDL engine); the
expert's success over every task type is a slow test.
"""

import json

import pytest

pytest.importorskip("alfworld")

from textworld.logic import Proposition, Variable  # noqa: E402

from dreamgym_core.envs import EnvSpec, make_env  # noqa: E402
from dreamgym_core.envs.alfworld_env import CENTER, abstract_state, propose_candidates  # noqa: E402
from dreamgym_core.envs.alfworld_gen import (ROOM_GROUPS, SPLITS, TASK_TYPES, heldout_pair, sample_game,  # noqa: E402
                                             split_floor_plans)
from dreamgym_core.state import AbstractState  # noqa: E402


def test_splits_use_disjoint_floor_plans_and_cover_every_room_type():
    train, dev, test = (set(split_floor_plans(s)) for s in ("train", "dev", "test"))
    assert not (train & dev) and not (train & test) and not (dev & test)
    assert set(split_floor_plans("test_pairs")) == train
    assert len(train | dev | test) == 120
    for group in ROOM_GROUPS:
        assert all(set(group) & s for s in (train, dev, test))
    with pytest.raises(ValueError, match="split must be one of"):
        split_floor_plans("valid")


def test_generator_is_deterministic_balanced_and_respects_the_pairing_split():
    specs = {}
    for split in SPLITS:
        for i in range(6):
            spec, problem = sample_game(split, i)
            again, problem2 = sample_game(split, i)
            assert (spec, problem) == (again, problem2)
            assert spec.task_type == TASK_TYPES[i]
            assert spec.floor_plan in split_floor_plans(split)
            if spec.parent_target:  # look_at_obj_in_light has no receptacle target
                assert heldout_pair(spec.object_target, spec.parent_target) == split.endswith("_pairs")
            else:
                assert spec.toggle_target in ("DeskLamp", "FloorLamp")
            assert "(:goal" in problem and f"{spec.object_target}Type" in problem
            specs[split, i] = spec
    assert specs["train", 0] != specs["dev", 0]


def test_heldout_pairs_setting_maps_dev_and_test_to_unseen_pairings(tmp_path):
    env = make_env(EnvSpec(env="alfworld", game="pick_and_place_simple", params=json.dumps({"heldout": "pairs"}),
                           cache_dir=str(tmp_path)))
    tasks = env.tasks("test", 3)
    assert [t.task_id for t in tasks] == ["alfworld/test_pairs/0", "alfworld/test_pairs/6", "alfworld/test_pairs/12"]
    assert all(t.split == "test" for t in tasks)
    for t in tasks:
        spec, _ = sample_game("test_pairs", t.seed)
        assert spec.task_type == "pick_and_place_simple" and spec.instruction == t.instruction
        assert heldout_pair(spec.object_target, spec.parent_target)
        assert spec.floor_plan in split_floor_plans("train")
    with pytest.raises(ValueError, match="heldout must be"):
        make_env(EnvSpec(env="alfworld", params=json.dumps({"heldout": "rooms"})))
    with pytest.raises(ValueError, match="unknown key"):
        make_env(EnvSpec(env="alfworld", params=json.dumps({"objects": 3})))
    with pytest.raises(ValueError, match="unknown ALFWorld game"):
        make_env(EnvSpec(env="alfworld", game="pick_and_place"))
    assert make_env(EnvSpec(env="alfworld")).game == "all"  # EnvSpec's default game is TWX's


def _facts(*items):
    kinds = {"agent1": "agent"}
    return [Proposition(name, [Variable(a, kinds.get(a, "t")) for a in args]) for name, *args in items]


def test_abstract_state_shows_only_what_the_agent_sees():
    facts = _facts(("atlocation", "agent1", "loc_1"), ("receptacleatlocation", "fridge 1", "loc_1"),
                   ("receptacleatlocation", "countertop 1", "loc_2"), ("openable", "fridge 1"),
                   ("inreceptacle", "apple 1", "fridge 1"), ("inreceptacle", "mug 1", "countertop 1"),
                   ("holds", "agent1", "potato 1"), ("iscool", "potato 1"))
    closed = AbstractState.parse(abstract_state("You arrive at fridge 1. The fridge 1 is closed.", facts))
    assert closed.location == "fridge 1"
    assert closed.objects == ("fridge 1 (closed)",)  # the apple inside is not visible
    assert closed.exits == ("countertop 1", "fridge 1")
    assert closed.inventory == ("potato 1 (cool)",)
    opened = AbstractState.parse(abstract_state("You open the fridge 1.", facts + _facts(("opened", "fridge 1"))))
    assert opened.objects == ("fridge 1 (open): apple 1",)
    start = AbstractState.parse(abstract_state("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle...",
                                               _facts(("atlocation", "agent1", "locCenter"))))
    assert start.location == CENTER and start.objects == () and start.feedback == "You are in the middle of a room."


def test_candidate_rule_from_state_alone():
    state = AbstractState.make("", "fridge 1", ["fridge 1 (closed)"], ["countertop 1", "fridge 1"],
                               ["potato 1"]).render()
    cands = propose_candidates(state)
    assert {"open fridge 1", "cool potato 1 with fridge 1", "go to countertop 1", "examine potato 1"} <= set(cands)
    assert "go to fridge 1" not in cands and "move potato 1 to fridge 1" not in cands  # closed: cannot put
    assert propose_candidates("not a state") == ["look", "inventory"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = make_env(EnvSpec(env="alfworld", game="all", cache_dir=str(tmp_path_factory.mktemp("alf")), step_limit=50))
    yield e
    e.close()


def test_tasks_expert_wins_and_candidates_are_the_admissible_commands(env):
    tasks = env.tasks("train", 2)
    assert [t.task_id for t in tasks] == ["alfworld/train/0", "alfworld/train/1"]
    assert all(t.instruction and t.env == "alfworld" for t in tasks)
    assert env.tasks("train", 2) == tasks  # cached, same games
    recall = []
    for task in tasks:
        obs = env.reset(task)
        first = obs.state
        gold = env.expert_actions()
        assert gold and "help" not in obs.candidates
        res = None
        for action in gold:
            assert action in obs.candidates
            proposed = set(propose_candidates(obs.state))
            recall.append(len(proposed & set(obs.candidates)) / len(obs.candidates))
            res = env.step(action)
            assert res.valid
            obs = res.obs
        assert res.won and res.done and res.reward == 1.0
        assert env.reset(task).state == first  # same task, same first observation
    assert sum(recall) / len(recall) >= 0.9


def test_invalid_action_is_rejected_and_changes_nothing(env):
    task = env.tasks("train", 1)[0]
    obs = env.reset(task)
    res = env.step("fly to the moon")
    assert not res.valid and not res.won and res.reward == 0.0
    assert res.obs.raw.feedback == "Nothing happens."
    assert AbstractState.parse(res.obs.state).location == AbstractState.parse(obs.state).location


@pytest.mark.slow
def test_expert_succeeds_on_every_task_type_and_split(tmp_path):
    envs = {heldout: make_env(EnvSpec(env="alfworld", game="all", params=json.dumps({"heldout": heldout}),
                                      cache_dir=str(tmp_path), step_limit=50)) for heldout in ("layouts", "pairs")}
    try:
        wins = {}
        for heldout, split in (("layouts", "train"), ("layouts", "test"), ("pairs", "test")):
            env = envs[heldout]
            for task in env.tasks(split, 6):
                env.reset(task)
                res = None
                for action in env.expert_actions():
                    res = env.step(action)
                wins[task.task_id] = bool(res and res.won)
        assert len(wins) == 18
        assert all(wins.values()), wins  # the cached path: handcoded expert, else FastDownward's plan
    finally:
        for env in envs.values():
            env.close()


_TRACE = """
import json, random, sys
import dreamgym_core.envs.alfworld_env as A
from dreamgym_core.envs import EnvSpec, make_env
if sys.argv[1] == "unpatched":
    A.memoize_text_parsers = lambda: None
env = make_env(EnvSpec(env="alfworld", game="all", cache_dir=sys.argv[2], step_limit=50))
rng, out = random.Random(0), []
for task in env.tasks("train", 1) * 2:  # the second reset reuses the memoized translation
    obs = env.reset(task)
    out.append([obs.state, list(obs.candidates), obs.raw.feedback])
    for _ in range(6):
        obs = env.step(rng.choice(obs.candidates)).obs
        out.append([obs.state, list(obs.candidates), obs.raw.feedback])
print(json.dumps(out))
"""


def test_speed_patches_leave_the_engine_outputs_unchanged(tmp_path):
    import subprocess
    import sys

    def trace(mode):
        res = subprocess.run([sys.executable, "-c", _TRACE, mode, str(tmp_path)], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout.strip().splitlines()[-1]

    patched = trace("patched")
    assert len(json.loads(patched)) == 14
    assert trace("unpatched") == patched
