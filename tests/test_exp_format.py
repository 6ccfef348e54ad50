import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dreamgym_core.collect import CollectConfig, collect
from dreamgym_core.envs import EnvSpec, make_env
from dreamgym_core.exp_format import (FIELDS, action_refs, apply_object_edits, build_prompt, delex, parse_output,
                                      parse_pointer_output, relex, render_delta, render_pointer_target, render_target)
from dreamgym_core.state import AbstractState
from dreamgym_core.state_delta import Prediction, StateDelta, apply, conflicts, diff, failure_delta

# Facts from a small pool so generated state pairs overlap (the interesting diffs), plus arbitrary text.
_POOL = ["counter: apple", "counter: empty", "fridge (closed)", "fridge (open): milk", "apple", "knife",
         "east: kitchen", "west: closed wood door", "+odd", "-odd", "a: b, c", "="]
_free = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=15)
_fact = st.one_of(st.sampled_from(_POOL), _free)
_loc = st.one_of(st.sampled_from(["kitchen", "pantry", "", "=", "\\x", "\\"]), _free)
_facts = st.lists(_fact, max_size=6)
_state = st.builds(AbstractState.make, feedback=st.text(max_size=30), location=_loc, objects=_facts,
                   exits=st.lists(_fact, max_size=3), inventory=st.lists(_fact, max_size=4))
_progress = st.one_of(st.none(), st.integers(-100, 100))
_outcome = st.fixed_dictionaries({"valid": st.booleans(), "reward": st.sampled_from([0.0, 1.0]), "done": st.booleans(),
                                  "progress": _progress, "next_progress": _progress})

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(s=_state, s2=_state, out=_outcome, reasoning=st.text(max_size=60))
def test_apply_diff_law_and_text_round_trip(s, s2, out, reasoning):
    d = diff(s, s2, **out)
    assert apply(s, d) == s2
    assert conflicts(s, d) == [c for c in conflicts(s, d) if c in ("invalid-with-changes", "reward-not-done")]
    text, (r0, r1), (p0, p1) = render_target(reasoning, d)
    assert (r0, r1, p1) == (0, p0, len(text))                       # the two Eq. 5 spans partition the text
    assert text[r0:r1].startswith("<think>") and text[r0:r1].endswith("</think>\n")
    pred = parse_output(text)
    assert pred.ok and pred.error == "" and pred.delta == d, pred.error
    assert pred.reasoning == " ".join(reasoning.replace("<think>", " ").replace("</think>", " ").split())
    assert render_target(pred.reasoning, pred.delta)[0] == text     # canonical text is a fixed point


@pytest.fixture(scope="module")
def twx_transitions(twx_env):
    tasks = twx_env.tasks("train", 6)
    trajs, _ = collect(twx_env, tasks, CollectConfig(seed=3))
    return [t for tr in trajs for t in tr.steps]


def _law_on(transitions):
    """Both forms round-trip on real steps; returns the kinds of change seen and the pointer
    targets whose objects field had to stay literal."""
    kinds, literal = set(), 0
    for t in transitions:
        s, s2 = AbstractState.parse(t.state), AbstractState.parse(t.next_state)
        d = diff(s, s2, valid=t.valid, reward=t.reward, done=t.done)
        assert apply(s, d).render() == t.next_state
        assert conflicts(s, d) == []
        text, _, _ = render_target("why", d)
        assert parse_output(text).delta == d
        refs = action_refs(s, t.action)
        pt = render_pointer_target(f"why {t.action}", d, s, refs)
        back = parse_pointer_output(pt.text, s, refs)
        assert back.ok and back.delta == d and back.reasoning == f"why {t.action}", (pt.text, back.error)
        literal += pt.literal
        if not t.valid:
            assert not d.changes_state and d.reward == 0.0        # TWX rejects without side effects
        kinds.add((d.location is not None, bool(d.objects_add), bool(d.inventory_add), bool(d.exits_add), d.reward))
    return kinds, literal


def test_law_on_real_twx_transitions(twx_transitions):
    kinds, literal = _law_on(twx_transitions)
    assert len(twx_transitions) > 100
    assert (False, False, False, False, 0.0) in kinds               # look / inventory / invalid
    assert (False, False, True, False, 0.0) in kinds                # take a loose object
    assert any(k[-1] == 1.0 for k in kinds)                         # a winning step
    assert literal == 0                                             # every twc change has item-level edits


def test_law_on_real_multi_room_twx_with_doors():
    env = make_env(EnvSpec(params="numLocations=3,numItemsToPutAway=2,includeDoors=1,limitInventorySize=0"))
    try:
        trajs, _ = collect(env, env.tasks("train", 3), CollectConfig(seed=1, episodes={"expert": 1, "random": 1}))
    finally:
        env.close()
    kinds, _ = _law_on([t for tr in trajs for t in tr.steps])
    assert any(k[0] for k in kinds)                                  # moves between rooms
    assert any(k[3] and not k[0] for k in kinds)                     # a door opens in place


def test_example_target_is_exact():
    s = AbstractState.make("You are in the kitchen.", "kitchen", ["counter: apple", "fridge (closed)"])
    s2 = AbstractState.make("You take the apple.", "kitchen", ["counter: empty", "fridge (closed)"], [], ["apple"])
    text, rspan, pspan = render_target("The apple is on the counter.", diff(s, s2, valid=True, reward=0.0, done=False))
    assert text == ("<think>The apple is on the counter.</think>\n"
                    "valid: yes\nfeedback: You take the apple.\nlocation: =\n"
                    "objects: -counter: apple | +counter: empty\nexits:\ninventory: +apple\nprogress: =\nreward: 0\ndone: no")
    assert text[slice(*rspan)] == "<think>The apple is on the counter.</think>\n"
    assert text[slice(*pspan)].startswith("valid: yes") and text[slice(*pspan)].endswith("done: no")


def test_move_lists_the_new_room_in_full():
    s = AbstractState.make("", "kitchen", ["stove", "counter: empty"], ["west: corridor"], ["apple"])
    s2 = AbstractState.make("You are in the corridor.", "corridor", ["hat rack: empty"], ["east: kitchen"], ["apple"])
    d = diff(s, s2, valid=True, reward=0.0, done=False)
    assert d.objects_remove == () and d.objects_add == ("hat rack: empty",) and d.exits_add == ("east: kitchen",)
    assert "location: corridor\nobjects: +hat rack: empty\nexits: +east: kitchen\ninventory:\n" in render_delta(d)
    assert apply(s, d) == s2


_VALID = render_target("r", StateDelta(valid=True, feedback="You take the apple.", objects_remove=["apple"],
                                       inventory_add=["apple"]))[0]


@pytest.mark.parametrize("mutate,error", [
    (lambda t: "", "empty"),
    (lambda t: "   \n ", "empty"),
    (lambda t: t.replace("<think>r</think>\n", ""), "missing:think"),
    (lambda t: t.replace("</think>", ""), "unclosed:think"),
    (lambda t: t.replace("\nreward: 0", ""), "missing:reward"),
    (lambda t: t[:t.index("\ndone:")], "missing:done"),
    (lambda t: t.replace("objects: -apple", "objects: -apple\nobjects: -apple"), "duplicate:objects"),
    (lambda t: t.replace("valid: yes", "valid: true"), "bad:valid"),
    (lambda t: t.replace("done: no", "done: maybe"), "bad:done"),
    (lambda t: t.replace("reward: 0", "reward: 0.5"), "bad:reward"),
    (lambda t: t.replace("reward: 0", "reward: 0.0"), "bad:reward"),
    (lambda t: t.replace("objects: -apple", "objects: apple"), "bad:objects"),
    (lambda t: t.replace("inventory: +apple", "inventory: +apple |"), "bad:inventory"),
    (lambda t: t.replace("inventory: +apple", "inventory: +  apple"), "bad:inventory"),
    (lambda t: t.replace("feedback: You", "feedback: You  "), "bad:feedback"),
    (lambda t: t.replace("location: =", "colour: red"), "unknown_line:3"),
    (lambda t: t.replace("valid: yes\nfeedback: You take the apple.", "feedback: You take the apple.\nvalid: yes"),
     "missing:valid"),
])
def test_parse_errors_are_short_codes(mutate, error):
    pred = parse_output(mutate(_VALID))
    assert (pred.ok, pred.delta, pred.error) == (False, None, error)


def test_parse_tolerates_whitespace_and_trailing_text():
    base = parse_output(_VALID)
    assert base.ok and base.ignored_tail == 0
    for variant in ["  \n" + _VALID, _VALID.replace("\n", "  \r\n"), _VALID + "\n\n<think>next example",
                    _VALID.replace("</think>\n", "</think>")]:
        pred = parse_output(variant)
        assert pred.ok and pred.delta == base.delta, (variant, pred.error)
    assert parse_output(_VALID + "\nmore text").ignored_tail == len("more text")


def test_unusable_prediction_ends_the_episode_as_failure():
    pred = parse_output("I think the apple goes in the fridge")
    assert not pred.ok
    d = pred.effective_delta()
    assert (d.valid, d.reward, d.done) == (False, 0.0, True) and not d.changes_state
    assert "missing:think" in d.feedback
    ok = parse_output(_VALID)
    assert ok.effective_delta() is ok.delta


def test_apply_is_lenient_and_conflicts_report_it():
    s = AbstractState.make("", "kitchen", ["counter: empty"], [], ["apple"])
    d = StateDelta(valid=False, feedback="x", objects_remove=["zebra"], objects_add=["counter: empty"],
                   inventory_add=["apple"], inventory_remove=["apple"], reward=1.0, done=False)
    assert apply(s, d) == AbstractState.make("x", "kitchen", ["counter: empty"], [], ["apple"])
    assert conflicts(s, d) == ["objects:remove-missing:zebra", "objects:add-present:counter: empty",
                               "inventory:add-and-remove:apple", "invalid-with-changes", "reward-not-done"]
    same = StateDelta(valid=True, feedback="", location="kitchen", objects_add=["stove"])
    assert "location:same" in conflicts(s, same) and apply(s, same).objects == ("stove",)


def test_state_delta_canonicalizes_and_checks_reward():
    d = StateDelta(valid=1, feedback=" You\ntake  it ", objects_add=["b", "a", "b", " "], inventory_remove=["x|y"])
    assert (d.valid, d.feedback, d.objects_add, d.inventory_remove) == (True, "You take it", ("a", "b"), ("x/y",))
    with pytest.raises(ValueError, match="reward must be the outcome reward 0 or 1"):
        StateDelta(valid=True, feedback="", reward=0.5)
    assert failure_delta("bad:valid").done


@settings(max_examples=1200, deadline=None)
@given(text=st.text(max_size=300))
def test_parser_never_raises_on_arbitrary_strings(text):
    pred = parse_output(text)
    assert isinstance(pred, Prediction) and (pred.delta is not None) == pred.ok
    assert pred.ok or pred.error


@st.composite
def _mutated(draw):
    out = draw(_outcome)
    d = diff(draw(_state), draw(_state), **out)
    text = render_target(draw(st.text(max_size=20)), d)[0]
    kind = draw(st.sampled_from(["truncate", "swap", "insert", "delete"]))
    lines = text.split("\n")
    if kind == "truncate":
        cut = draw(st.integers(0, len(text) - 1))
        return kind, text[:cut], text
    if kind == "swap":
        i, j = draw(st.lists(st.integers(1, len(lines) - 1), min_size=2, max_size=2, unique=True))
        lines[i], lines[j] = lines[j], lines[i]
        return kind, "\n".join(lines), text
    if kind == "delete":
        del lines[draw(st.integers(1, len(lines) - 1))]
        return kind, "\n".join(lines), text
    pos = draw(st.integers(0, len(text)))
    return kind, text[:pos] + draw(st.text(min_size=1, max_size=10)) + text[pos:], text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_mutated())
def test_parser_never_raises_on_mutated_outputs(case):
    kind, text, original = case
    pred = parse_output(text)
    assert isinstance(pred, Prediction) and (pred.delta is not None) == pred.ok
    if kind in ("swap", "delete"):
        assert not pred.ok                     # every field is required, in order, once
    if kind == "truncate" and not original[:len(text)].rstrip().endswith(("done: yes", "done: no")):
        assert not pred.ok


# --------------------------------------------------------------------------------------------
# prompt

_S = AbstractState.make("You are in the kitchen.", "kitchen", ["counter: apple"]).render()
_S2 = AbstractState.make("You take the apple.", "kitchen", ["counter: empty"], [], ["apple"]).render()


def _demos(n):
    return [{"state": _S, "action": f"take thing{i}", "next_state": _S2, "reward": 0.0} for i in range(n)]


def test_prompt_sections_order_and_windows():
    hist = [(f"act{i}", f"fb{i}") for i in range(6)]
    p = build_prompt("Tidy   up.", hist, _S, "take apple", _demos(6))
    assert p == build_prompt("Tidy   up.", hist, _S, "take apple", _demos(6))
    heads = [ln for ln in p.split("\n") if ln.startswith("## ")]
    assert heads == ["## task", "## examples", "## history", "## state", "## action", "## outcome"]
    assert p.endswith("## action\ntake apple\n## outcome\n") and "\nTidy up.\n" in p
    assert "> act1\n" not in p and "> act2\nfb2\n" in p and "> act5\nfb5\n" in p      # last 4 steps
    assert p.count("> take thing") == 4 and "> take thing3" in p and "take thing4" not in p
    assert "objects: -counter: apple | +counter: empty" in p and "location: kitchen" not in p.split("## state")[0]


def test_prompt_ablations_and_demo_sources():
    d = _demos(1)
    no_hist = build_prompt("t", [("a", "b")], _S, "x", d, use_history=False)
    assert "## history" not in no_hist and no_hist == build_prompt("t", [("a", "b")], _S, "x", d, history_window=0)
    no_demo = build_prompt("t", [("a", "b")], _S, "x", d, use_demos=False)
    assert "## examples" not in no_demo and no_demo == build_prompt("t", [("a", "b")], _S, "x", d, max_demos=0)
    delta = diff(AbstractState.parse(_S), AbstractState.parse(_S2), valid=True, reward=0.0, done=False)
    as_text = [{"state": _S, "action": "take thing0", "delta": render_delta(delta)}]
    as_obj = [{"state": _S, "action": "take thing0", "delta": delta}]
    assert build_prompt("t", [], _S, "x", d) == build_prompt("t", [], _S, "x", as_text) \
        == build_prompt("t", [], _S, "x", as_obj)
    assert build_prompt("t", [], _S, "x", d, demo_states=True).count("location: kitchen") == 2
    assert FIELDS[0] == "valid" and FIELDS[-1] == "done"


# --------------------------------------------------------------------------------------------
# pointer form

_ROOM = AbstractState.make("", "laundry room", ["laundry basket: dirty jeans", "washing machine (open): empty",
                                                "dirty polo shirt", "dirty jeans jacket"], [], ["dirty hoodie"])


def test_action_refs_match_longest_names_in_action_order():
    assert action_refs(_ROOM, "put dirty hoodie in laundry basket") == ("dirty hoodie", "laundry basket")
    assert action_refs(_ROOM, "take dirty jeans jacket") == ("dirty jeans jacket",)     # not "dirty jeans"
    assert action_refs(_ROOM, "take dirty jeans") == ("dirty jeans",)                   # inside a receptacle
    assert action_refs(_ROOM, "put wet scarf in washing machine") == ("washing machine",)  # absent stays literal
    assert action_refs(_ROOM, "look around") == ()


def test_item_level_edits_are_short_and_exact():
    def target(action, after):
        refs = action_refs(_ROOM, action)
        d = diff(_ROOM, after, valid=True, reward=0.0, done=False)
        pt = render_pointer_target(f"r {refs[0]}", d, _ROOM, refs)
        assert parse_pointer_output(pt.text, _ROOM, refs).delta == d and not pt.literal
        return pt.text.split("\n")

    put = target("put dirty hoodie in laundry basket", AbstractState.make(
        "You put the dirty hoodie in the laundry basket.", "laundry room",
        ["laundry basket: dirty hoodie, dirty jeans", "washing machine (open): empty", "dirty polo shirt",
         "dirty jeans jacket"]))
    assert put == ["<think>r @1</think>", "valid: yes", "feedback: You put the @1 in the @2.", "location: =",
                   "objects: @2 += @1", "exits:", "inventory: -@1", "progress: =", "reward: 0", "done: no"]
    took = target("take dirty jeans", AbstractState.make(
        "You take the dirty jeans.", "laundry room", ["laundry basket: empty", "washing machine (open): empty",
                                                      "dirty polo shirt", "dirty jeans jacket"], [], ["dirty hoodie", "dirty jeans"]))
    assert took[4:7] == ["objects: -@1", "exits:", "inventory: +@1"]
    closed = target("close washing machine", AbstractState.make(
        "You close the washing machine.", "laundry room", ["laundry basket: dirty jeans", "washing machine (closed)",
                                                           "dirty polo shirt", "dirty jeans jacket"], [], ["dirty hoodie"]))
    assert closed[4] == "objects: -@1 | +@1 (closed)"


def test_object_edits_semantics():
    objs = ["shelf: a, b", "c", "box (open): empty", "bin (closed)"]
    assert apply_object_edits(objs, ["-b"]) == {"shelf: a", "c", "box (open): empty", "bin (closed)"}
    assert apply_object_edits(objs, ["-c", "box += c"]) == {"shelf: a, b", "box (open): c", "bin (closed)"}
    assert apply_object_edits(objs, ["shelf += 0"]) == {"shelf: 0, a, b", "c", "box (open): empty", "bin (closed)"}
    assert apply_object_edits(objs, ["-bin", "+bin (open): z"]) == {"shelf: a, b", "c", "box (open): empty",
                                                                  "bin (open): z"}
    assert apply_object_edits(objs, ["-zebra", "bin += c"]) == set(objs)   # nothing to act on: a no-op
    assert apply_object_edits(objs, ["shelf"]) is None and apply_object_edits(objs, ["+ c"]) is None


def test_pointer_parse_errors():
    refs = ("dirty hoodie",)
    ok = ("<think>r</think>\nvalid: yes\nfeedback: x\nlocation: =\nobjects: -@1\nexits:\ninventory: +@1\n"
          "progress: 25\nreward: 0\ndone: no")
    assert parse_pointer_output(ok, _ROOM, ("dirty polo shirt",)).delta.inventory_add == ("dirty polo shirt",)
    assert parse_pointer_output(ok, _ROOM, refs).delta.progress == 25
    assert parse_pointer_output(ok.replace("-@1", "-@2"), _ROOM, refs).error == "bad:pointer"
    assert parse_pointer_output(ok.replace("-@1", "@1"), _ROOM, refs).error == "bad:objects"
    assert parse_pointer_output(ok.replace("objects: -@1\n", ""), _ROOM, refs).error == "missing:objects"
    assert parse_pointer_output(ok.replace("<think>r @3", ""), _ROOM, refs).ok       # a stray pointer in R is kept
    assert parse_pointer_output(ok.replace("valid: yes", "valid: ok"), _ROOM, refs).error == "bad:valid"


@FAST
@given(text=st.text(max_size=40), refs=st.lists(st.sampled_from(["a", "ab", "b c", "@", "x@1", "1"]), max_size=3,
                                                unique=True))
def test_relex_inverts_delex(text, refs):
    assert relex(delex(text, refs), refs) == text


@FAST
@given(s=_state, s2=_state, out=_outcome, action=st.text(max_size=30), reasoning=st.text(max_size=30))
def test_pointer_round_trip_on_generated_states(s, s2, out, action, reasoning):
    d = diff(s, s2, **out)
    refs = action_refs(s, " ".join(s.entities()[:2]) + action)
    pt = render_pointer_target(reasoning, d, s, refs)
    pred = parse_pointer_output(pt.text, s, refs)
    assert pred.ok and pred.delta == d, (pt.text, pred.error)


@settings(max_examples=1200, deadline=None)
@given(text=st.text(max_size=300))
def test_pointer_parser_never_raises_on_arbitrary_strings(text):
    pred = parse_pointer_output(text, _ROOM, ("dirty hoodie", "laundry basket"))
    assert isinstance(pred, Prediction) and (pred.delta is not None) == pred.ok


def test_prompt_in_pointer_form_binds_names():
    state = _ROOM.render()
    refs = action_refs(_ROOM, "put dirty hoodie in laundry basket")
    p = build_prompt("t", [("take dirty hoodie", "You take the dirty hoodie.")], state,
                     "put dirty hoodie in laundry basket", [], refs=refs)
    assert "> take @1\nYou take the @1.\n" in p and "## action\nput @1 in @2\n## refs\n@1 dirty hoodie | @2 laundry basket\n" in p
    assert "| @2: dirty jeans | " in p and "inventory: @1" in p and "dirty hoodie" not in p.split("## refs")[0]
    assert build_prompt("t", [], state, "look", [], refs=()) == build_prompt("t", [], state, "look", [])


def test_next_constraint_walks_the_output_grammar():
    from dreamgym_core.exp_format import END, next_constraint

    assert next_constraint("") == ("<think>",)
    assert next_constraint("<think>The apple is") is None  # the reasoning is free
    assert next_constraint("<think>ok</think>") == ("\n",)
    assert next_constraint("<think>ok</think>\n") == ("valid:",)
    assert next_constraint("<think>ok</think>\nvalid:") == (" yes\n", " no\n")
    assert next_constraint("<think>ok</think>\nvalid: yes\n") == ("feedback:",)
    assert next_constraint("<think>ok</think>\nvalid: yes\nfeedback: You take") is None
    text = "<think>ok</think>\nvalid: yes\nfeedback: x\nlocation: =\nobjects: -@1\nexits:\ninventory: +@1\n"
    assert next_constraint(text) == ("progress:",)
    choices = next_constraint(text + "progress:")
    assert choices[0] == " =\n" and " 25\n" in choices and " -100\n" in choices and " 101\n" not in choices
    text += "progress: 50\n"
    assert next_constraint(text) == ("reward:",)
    assert next_constraint(text + "reward:") == (" 0\n", " 1\n")
    assert next_constraint(text + "reward: 0\ndone:") == (" yes", " no")
    assert next_constraint(text + "reward: 0\ndone: no") == (END,)  # as trained: the target ends there
    assert next_constraint("<think>ok</think>\nvalid: yes\n\n") is None  # off the grammar: left to fail parsing
    # every target the annotator writes is inside the grammar: forcing never contradicts training
    target = render_target("r", StateDelta(valid=True, feedback="You take the apple.", inventory_add=("apple",),
                                           objects_remove=("apple",)))[0]
    for cut in range(len(target) + 1):
        allowed = next_constraint(target[:cut])
        if allowed is not None and allowed[0] != END:
            assert any(target[cut:].startswith(a) or a.startswith(target[cut:]) for a in allowed), (cut, allowed)


def test_progress_field_round_trips_and_rejects_bad_values():
    s = AbstractState.make("You see a sock.", "laundry room", ["sock", "basket: empty"])
    s2 = AbstractState.make("You take the sock.", "laundry room", ["basket: empty"], [], ["sock"])
    d = diff(s, s2, valid=True, reward=0.0, done=False, progress=25, next_progress=50)
    assert d.progress == 50
    assert diff(s, s2, valid=True, reward=0.0, done=False, progress=50, next_progress=50).progress is None
    assert diff(s, s2, valid=True, reward=0.0, done=False).progress is None  # data without a dense score
    text = render_target("r", d)[0]
    assert "\nprogress: 50\nreward: 0\n" in text
    assert parse_output(text).delta == d
    for bad in ("progress: 101", "progress: 5.5", "progress: -0", "progress: 050", "progress: +25", "progress: half"):
        p = parse_output(text.replace("progress: 50", bad))
        assert not p.ok and p.error == "bad:progress", bad
    assert parse_output(text.replace("progress: 50", "progress: -100")).delta.progress == -100
    with pytest.raises(ValueError, match="progress"):
        StateDelta(valid=True, feedback="x", progress=150)
    with pytest.raises(ValueError, match="progress"):
        StateDelta(valid=True, feedback="x", progress=0.5)


def test_progress_percent_and_prompt_section():
    from dreamgym_core.state_delta import progress_percent

    assert [progress_percent(x) for x in (0.0, 0.25, 0.5, 1.0, -1.0, 1 / 3, None)] == [0, 25, 50, 100, -100, 33, None]
    with pytest.raises(ValueError, match="finite"):
        progress_percent(float("nan"))
    state = AbstractState.make("x", "kitchen", ["apple"]).render()
    with_p = build_prompt("t", [], state, "take apple", [], progress=25)
    assert "## state\n" in with_p and "\n## progress\n25\n## action\ntake apple\n" in with_p
    assert "## progress" not in build_prompt("t", [], state, "take apple", [])
