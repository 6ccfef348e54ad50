"""TextWorld adapter against the real engine: three small generated games (cached in a temp dir),
plus pure checks of the description parser on hand-written text."""

from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict

import pytest

pytest.importorskip("textworld")

from dreamgym_core.envs import EnvCrash, EnvSpec, make_env  # noqa: E402
from dreamgym_core.envs.textworld_env import (  # noqa: E402
    TextWorldEnv,
    challenge_settings,
    game_dir,
    propose_candidates,
    split_option,
    split_seeds,
)
from dreamgym_core.envs.textworld_state import (  # noqa: E402
    Lexicon,
    abstract_state,
    canonical_feedback,
    parse_description,
    parse_inventory,
)
from dreamgym_core.state import AbstractState  # noqa: E402

# Floors for the candidate rule, measured on 3,800 states of 45 generated games (all four
# challenges, walkthroughs plus random walks): recall 1.000, precision 0.87-1.00 per challenge.
RECALL_FLOOR = 0.97
PRECISION_FLOOR = 0.80


@pytest.fixture(scope="session")
def tw_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("textworld-cache")


@pytest.fixture(scope="session")
def cooking(tw_cache):
    env = TextWorldEnv("tw-cooking", {}, cache_dir=str(tw_cache))
    tasks = env.tasks("train", 2)
    yield env, tasks
    env.close()


@pytest.fixture(scope="session")
def simple(tw_cache):
    env = make_env(EnvSpec("textworld", "tw-simple", json.dumps({"rewards": "dense", "goal": "detailed"}),
                           cache_dir=str(tw_cache)))
    tasks = env.tasks("train", 1)
    yield env, tasks
    env.close()


def _walk(env, task, n_random: int, seed: int):
    """Expert path, then a random walk over the env's candidates: [(obs, action, result)]."""
    out = []
    obs = env.reset(task)
    for action in env.expert_actions():
        res = env.step(action)
        out.append((obs, action, res))
        obs = res.obs
        if res.done:
            break
    rng = random.Random(seed)
    obs = env.reset(task)
    for _ in range(n_random):
        action = rng.choice(obs.candidates)
        res = env.step(action)
        out.append((obs, action, res))
        if res.done:
            obs = env.reset(task)
        else:
            obs = res.obs
    return out


# ---- tasks, splits, cache ------------------------------------------------------------------


def test_tasks_carry_objective_params_and_split_seeds(cooking):
    env, tasks = cooking
    assert [t.task_id for t in tasks] == ["textworld/tw-cooking/train/0", "textworld/tw-cooking/train/1"]
    assert all(t.instruction.startswith("You are hungry!") for t in tasks)
    assert json.loads(tasks[0].params) == challenge_settings("tw-cooking", {})
    assert tasks[0].params == json.dumps(json.loads(tasks[0].params), sort_keys=True)
    assert [t.seed for t in tasks] == list(split_seeds("train", 2))


def test_splits_are_disjoint_and_use_the_challenge_split():
    ranges = {s: set(split_seeds(s, 10_000)) for s in ("train", "dev", "test")}
    assert not ranges["train"] & ranges["dev"] and not ranges["train"] & ranges["test"]
    assert not ranges["dev"] & ranges["test"]
    with pytest.raises(ValueError):
        split_seeds("train", 2, start=9_999)
    assert [split_option("tw-cooking", s)["split"] for s in ("train", "dev", "test")] == ["train", "valid", "test"]
    assert split_option("tw-simple", "test") == {"test": True}
    base = challenge_settings("tw-cooking", {})
    dirs = {game_dir("c", "tw-cooking", {**base, **split_option("tw-cooking", s)}, 5) for s in ("train", "dev")}
    assert len(dirs) == 2  # the same seed in two splits is two different cached games


def test_settings_are_validated():
    with pytest.raises(ValueError, match="unknown setting"):
        challenge_settings("tw-cooking", {"recipes": 2})
    with pytest.raises(ValueError, match="set from each task's split"):
        challenge_settings("tw-cooking", {"split": "train"})
    with pytest.raises(ValueError, match="unknown TextWorld challenge"):
        TextWorldEnv("tw-nope", {}, cache_dir="unused")


def test_second_env_reuses_cached_games(cooking, tw_cache, monkeypatch):
    env, tasks = cooking
    folder = game_dir(tw_cache, "tw-cooking", {**json.loads(tasks[0].params), "split": "train"}, tasks[0].seed)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    import textworld.generator

    def no_generation(*args, **kwargs):
        raise AssertionError("game regenerated despite the cache")

    monkeypatch.setattr(textworld.generator, "compile_game", no_generation)
    again = TextWorldEnv("tw-cooking", {}, cache_dir=str(tw_cache))
    try:
        assert again.tasks("train", 2) == tasks
        again.reset(tasks[0])
    finally:
        again.close()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp")]


# ---- episodes --------------------------------------------------------------------------------


def test_reset_is_deterministic(cooking, simple):
    for env, tasks in (cooking, simple):
        first = env.reset(tasks[0])
        env.step(first.candidates[0])
        again = env.reset(tasks[0])
        assert again == first
        assert AbstractState.parse(first.state).feedback.startswith("You are in the ")


@pytest.mark.parametrize("which", ["cooking", "simple"])
def test_expert_wins_with_reward_once_on_the_last_step(which, request):
    env, tasks = request.getfixturevalue(which)
    for task in tasks:
        env.reset(task)
        gold = env.expert_actions()
        results = [env.step(a) for a in gold]
        assert [r.reward for r in results] == [0.0] * (len(gold) - 1) + [1.0]
        assert [r.done for r in results] == [False] * (len(gold) - 1) + [True]
        assert results[-1].won and not results[-1].lost and results[-1].score == 1.0
        assert all(r.valid for r in results)
        assert "*** The End ***" in AbstractState.parse(results[-1].obs.state).feedback


def test_invalid_action_is_flagged_and_changes_nothing(cooking):
    env, tasks = cooking
    obs = env.reset(tasks[0])
    bad = env.step("take the moon")
    assert not bad.valid and bad.reward == 0.0 and not bad.done
    assert AbstractState.parse(bad.obs.state).with_feedback("") == AbstractState.parse(obs.state).with_feedback("")
    good = env.step(bad.obs.candidates[0])
    assert good.valid


def test_step_limit_ends_the_episode(tw_cache, cooking):
    _, tasks = cooking
    env = TextWorldEnv("tw-cooking", {}, cache_dir=str(tw_cache), step_limit=3)
    try:
        env.reset(tasks[0])
        assert [env.step("look").done for _ in range(3)] == [False, False, True]
    finally:
        env.close()


def test_hung_step_becomes_envcrash_and_the_next_reset_recovers(cooking, monkeypatch):
    env, tasks = cooking
    env.reset(tasks[0])
    monkeypatch.setattr(env._env, "step", lambda action: time.sleep(5))
    monkeypatch.setattr(env, "step_timeout_s", 0.2)
    t0 = time.perf_counter()
    with pytest.raises(EnvCrash, match="tw-cooking/train/0"):
        env.step("look")
    assert time.perf_counter() - t0 < 2.0
    monkeypatch.setattr(env, "step_timeout_s", 30.0)
    assert env.reset(tasks[0]).candidates


# ---- abstract state --------------------------------------------------------------------------


def test_states_round_trip_and_rederive_from_raw_parts(cooking, simple):
    """parse/render is exact, and the stored raw parts plus the cached game rebuild each state."""
    from textworld.generator.game import Game

    for env, tasks in (cooking, simple):
        lexicon = Lexicon.from_game(Game.load(str(env.game_folder(tasks[0]) / "game.json")))
        for obs, _, res in _walk(env, tasks[0], n_random=25, seed=1):
            for o in (obs, res.obs):
                assert AbstractState.parse(o.state).render() == o.state
                assert list(o.candidates) == sorted(o.candidates)
                visible = {c[len("examine "):] for c in o.raw.candidates if c.startswith("examine ")}
                assert abstract_state(o.raw.feedback, o.raw.look, o.raw.inventory, lexicon, visible) == o.state


def _truth(facts, game, lexicon):
    """What the engine's own facts say the agent sees: (location, holders, exits, inventory).

    A locked door or container reads "closed" in the text; items are compared by base name.
    """
    name = {k: v.name for k, v in game.infos.items()}
    room = next(f.arguments[1].name for f in facts if f.name == "at" and f.arguments[0].name == "P")
    props = defaultdict(set)
    for f in facts:
        if len(f.arguments) == 1:
            props[f.arguments[0].name].add(f.name)
    objects, exits = set(), set()
    for f in facts:
        if f.name == "at" and f.arguments[1].name == room and f.arguments[0].name != "P":
            x = f.arguments[0].name
            kind = lexicon.kinds.get(name[x])
            if kind == "container":
                state = "open" if "open" in props[x] else "closed"
                inside = sorted(name[g.arguments[0].name] for g in facts if g.name == "in" and g.arguments[1].name == x)
                objects.add((name[x], state, tuple(inside) if state == "open" else ()))
            elif kind == "supporter":
                on = sorted(name[g.arguments[0].name] for g in facts if g.name == "on" and g.arguments[1].name == x)
                objects.add((name[x], "", tuple(on)))
            elif kind == "thing":
                objects.add((name[x], "", ()))
        direction = {"north_of": "north", "south_of": "south", "east_of": "east", "west_of": "west"}.get(f.name)
        if direction and f.arguments[1].name == room:
            door = [g.arguments[1].name for g in facts if g.name == "link" and g.arguments[0].name == room
                    and g.arguments[2].name == f.arguments[0].name]
            exits.add(f"{direction}: {name[door[0]]} ({'open' if 'open' in props[door[0]] else 'closed'})"
                      if door else direction)
    inventory = sorted(name[f.arguments[0].name] for f in facts if f.name == "in" and f.arguments[1].name == "I")
    return name[room], objects, exits, inventory


def _base(printed: str, lexicon: Lexicon) -> str:
    return next((n for n in sorted(lexicon.kinds, key=len, reverse=True)
                 if printed == n or printed.endswith(" " + n)), printed)


def _parsed(state: str, lexicon: Lexicon):
    s = AbstractState.parse(state)
    objects = set()
    for fact in s.objects:
        head, _, items = fact.partition(": ")
        nm, _, st = head.partition(" (")
        st = st.rstrip(")").replace("locked", "closed")
        inside = () if items in ("", "empty") else tuple(sorted(_base(i, lexicon) for i in items.split(", ")))
        objects.add((_base(nm, lexicon), st, inside))
    exits = {e.replace("(locked)", "(closed)") for e in s.exits}
    return s.location, objects, exits, sorted(_base(i, lexicon) for i in s.inventory)


def test_parsed_state_matches_the_engine_facts(cooking, simple):
    """The text parse (filler dropped) agrees with TextWorld's own state tracker on every state.

    A second engine with facts switched on plays the same actions beside the adapter.
    """
    import textworld

    from dreamgym_core.envs.textworld_env import _request_infos

    infos = _request_infos()
    infos.facts = True
    checked = 0
    for env, tasks in (cooking, simple):
        engine = textworld.start(str(env.game_folder(tasks[0]) / "game.z8"), infos)
        try:
            st, obs = engine.reset(), env.reset(tasks[0])
            lexicon = Lexicon.from_game(st["game"])
            walk, rng = list(st["extra.walkthrough"])[:-1], random.Random(3)
            for t in range(40):
                assert _parsed(obs.state, lexicon) == _truth(st["_facts"], st["game"], lexicon)
                checked += 1
                action = walk[t] if t < len(walk) else rng.choice(sorted(st["admissible_commands"]))
                st, _, _ = engine.step(action)
                obs = env.step(action).obs
                if st["won"] or st["lost"]:
                    break  # once the game is over its description is no longer updated
        finally:
            engine.close()
    assert checked >= 40


def test_parser_drops_filler_and_keeps_state():
    lexicon = Lexicon(kinds={"chest drawer": "container", "antique trunk": "container", "king-size bed": "supporter",
                             "old key": "thing", "note": "thing", "stand": "thing", "carrot": "thing",
                             "wooden door": "door"},
                      nouns={"antique trunk": "trunk"})
    description = (
        "-= Bedroom =-\nYou are in a bedroom. A normal kind of place.\n\n"
        "You can make out an opened chest drawer in the corner. The chest drawer contains an old key and a "
        "sliced raw carrot. Classic TextWorld. You bend down to tie your shoe. When you stand up, you notice a "
        "trunk. You can see a king-size bed. You make a mental note to not get your hopes up. But oh no! "
        "there's nothing on this piece of junk.\n\n"
        "There is a closed wooden door leading east. You need an unblocked exit? You should try going south.")
    location, objects, exits = parse_description(description, lexicon)
    assert location == "bedroom"
    assert sorted(objects) == ["antique trunk (closed)", "chest drawer (open): old key, sliced raw carrot",
                               "king-size bed: empty"]
    assert sorted(exits) == ["east: wooden door (closed)", "south"]
    assert parse_inventory("You are carrying: an old key and a diced carrot.", lexicon) == ["old key", "diced carrot"]
    assert parse_inventory("You are carrying nothing.", lexicon) == []
    empty_open = "-= Den =-\nIntro.\n\nYou see a chest drawer. Empty! What kind of nightmare TextWorld is this?"
    assert parse_description(empty_open, lexicon)[1] == ["chest drawer (open): empty"]


def test_canonical_feedback_removes_prompt_and_boilerplate():
    desc = "-= Kitchen =-\nYou are in a kitchen.\n\nYou see a stove."
    fb = "\n" + desc + "\n\nYour score has just gone up by one point.\n\n>      -= Kitchen =-1/2"
    assert canonical_feedback(fb, desc, "kitchen") == ("You are in the kitchen. "
                                                       "Your score has just gone up by one point.")
    end = ("You eat the meal. Not bad.\n\n*** The End ***\n\nYou scored 3 out of a possible 3, in 7 turns.\n\n"
           "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?\n> ")
    assert canonical_feedback(end) == "You eat the meal. Not bad. *** The End ***"
    assert canonical_feedback("You are carrying: a key.\n\n> -= Den =-0/1") == "You check your inventory."


# ---- candidate rule --------------------------------------------------------------------------


def test_candidate_rule_recall_and_precision(cooking, simple):
    hits = admissible = proposed = 0
    for env, tasks in (cooking, simple):
        for task in tasks:
            for obs, _, _ in _walk(env, task, n_random=30, seed=7):
                truth, guess = set(obs.candidates), set(env.propose_candidates(obs.state))
                hits, admissible, proposed = hits + len(truth & guess), admissible + len(truth), proposed + len(guess)
    assert admissible > 500
    assert hits / admissible >= RECALL_FLOOR
    assert hits / proposed >= PRECISION_FLOOR
    assert propose_candidates("not a state") == ["look", "inventory"]


def test_cache_folder_layout_is_keyed_by_settings(tw_cache):
    a = game_dir(tw_cache, "tw-cooking", {"recipe": 1}, 3)
    b = game_dir(tw_cache, "tw-cooking", {"recipe": 2}, 3)
    assert a != b and a.name == b.name == "3" and os.path.commonpath([a, b]).endswith("tw-cooking")


@pytest.mark.slow
@pytest.mark.parametrize("challenge,settings", [
    ("tw-coin_collector", {"level": 60}),
    ("tw-treasure_hunter", {"level": 18}),
    ("tw-cooking", {"recipe": 2, "take": 2, "go": 6, "open": True, "cook": True, "cut": True}),
])
def test_every_challenge_wins_parses_and_proposes(challenge, settings, tw_cache):
    """Bigger games of the other challenges: expert wins, parse == facts, candidate rule floors."""
    import textworld

    from dreamgym_core.envs.textworld_env import _request_infos

    env = TextWorldEnv(challenge, settings, cache_dir=str(tw_cache))
    try:
        task = env.tasks("dev", 1)[0]
        env.reset(task)
        results = [env.step(a) for a in env.expert_actions()]
        assert results[-1].won and [r.reward for r in results].count(1.0) == 1
        hits = admissible = proposed = 0
        for obs, _, _ in _walk(env, task, n_random=60, seed=11):
            truth, guess = set(obs.candidates), set(env.propose_candidates(obs.state))
            hits, admissible, proposed = hits + len(truth & guess), admissible + len(truth), proposed + len(guess)
        assert hits / admissible >= RECALL_FLOOR and hits / proposed >= PRECISION_FLOOR
        infos = _request_infos()
        infos.facts = True
        engine = textworld.start(str(env.game_folder(task) / "game.z8"), infos)
        st, obs = engine.reset(), env.reset(task)
        lexicon, rng = Lexicon.from_game(st["game"]), random.Random(5)
        for _ in range(60):
            assert _parsed(obs.state, lexicon) == _truth(st["_facts"], st["game"], lexicon)
            action = rng.choice(sorted(st["admissible_commands"]))
            st, _, _ = engine.step(action)
            obs = env.step(action).obs
            if st["won"] or st["lost"]:
                st, obs = engine.reset(), env.reset(task)
        engine.close()
    finally:
        env.close()
