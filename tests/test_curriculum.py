"""Curriculum (Eq. 6-7): reward variance by hand and by loop, selection, M_task parsing, the filter, lambda."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamgym_core.curriculum import (END, CurriculumConfig, ParseFailure, TaskProposal, TaskWriter, build_task_pool,
                                      build_task_prompt, cluster_groups, cluster_variance, draw_batch,
                                      feasibility_filter, next_task_constraint,
                                      loose_items, object_catalogue, parse_task_output, recombine_tasks, seed_groups,
                                      select_seed_tasks, synthesize,
                                      task_reward_variance, task_writing_examples)
from dreamgym_core.schema import Task, Trajectory, Transition
from dreamgym_core.state import AbstractState

STATE = AbstractState.make("You are in the bedroom.", "bedroom",
                           ["bed: empty", "wardrobe (closed)", "clean blue T-shirt", "long coat"]).render()


def _task(i, source="offline", iteration=0, state=None):
    return Task(f"t/{i}", "twx", "twc", "train", i, "Put things away.", source=source, iteration=iteration,
                initial_state=state)


def _traj(task, ret, j=0, valid=True):
    step = Transition(f"{task.task_id}#p#{j}", task.task_id, "twx", 0, "s", "a", "s2", float(ret), 0.0, True,
                      bool(ret), not ret, valid, "policy")
    return Trajectory(f"{task.task_id}#p#{j}", task, "p", (step,))


def _loop_variance(trajs):
    by = {}
    for t in trajs:
        by.setdefault(t.task.task_id, []).append(t.ret)
    out = {}
    for k, rs in by.items():
        m = sum(rs) / len(rs)
        out[k] = sum((r - m) ** 2 for r in rs) / len(rs)
    return out


def test_variance_by_hand():
    a, b, c = _task(1), _task(2), _task(3)
    trajs = [_traj(a, 1, 0), _traj(a, 1, 1), _traj(b, 1, 0), _traj(b, 0, 1), _traj(c, 1, 0), _traj(c, 0, 1),
             _traj(c, 0, 2), _traj(c, 0, 3)]
    v = task_reward_variance(trajs)
    assert v["t/1"] == (0.0, 2, 1.0)
    assert v["t/2"][0] == pytest.approx(0.25)
    assert v["t/3"][0] == pytest.approx(0.1875) and v["t/3"][2] == pytest.approx(0.25)


@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0.0, 1.0])), min_size=1, max_size=40))
@settings(max_examples=100, deadline=None)
def test_variance_matches_a_plain_loop(pairs):
    trajs = [_traj(_task(i), r, j) for j, (i, r) in enumerate(pairs)]
    fast, slow = task_reward_variance(trajs), _loop_variance(trajs)
    assert set(fast) == set(slow)
    for k in slow:
        assert fast[k][0] == pytest.approx(slow[k], abs=1e-12)


def test_selection_threshold_top_m_and_histogram():
    scores = {"a": (0.25, 4, 0.5), "b": (0.0, 4, 1.0), "c": (0.1875, 4, 0.25), "d": (0.25, 4, 0.5)}
    sel = select_seed_tasks(scores, threshold=0.1, top_m=2)
    assert sel.selected == ("a", "d") and sum(sel.counts) == 4 and len(sel.edges) == 11
    assert select_seed_tasks(scores, threshold=0.25, top_m=5).selected == ()


def test_clusters_group_similar_tasks_and_pool_their_rollouts():
    vecs = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99]])
    g = cluster_groups(["a", "b", "c", "d"], vecs, 2, seed=0)
    assert g[0] == g[1] and g[2] == g[3] and g[0] != g[2]
    assert g == cluster_groups(["a", "b", "c", "d"], vecs, 2, seed=0)
    ta, tb = _task(1), _task(2)
    v = cluster_variance([_traj(ta, 1), _traj(tb, 0, 1)], {"t/1": 0, "t/2": 0})
    assert v["t/1"][0] == pytest.approx(0.25) == v["t/2"][0]
    with pytest.raises(ValueError, match="one embedding row per task"):
        cluster_groups(["a"], vecs, 2)


def test_prompt_and_parser_round_trip():
    seeds = [_task(1), _task(2)]
    prompt = build_task_prompt(seeds, {"t/1": STATE, "t/2": STATE}, 2)
    assert prompt.startswith("## seed tasks") and prompt.endswith("## new task") and prompt.count("# seed") == 3
    p = parse_task_output("<think>one more item</think>\ninstruction: Put things away.\n" + STATE + "\ntrailing")
    assert isinstance(p, TaskProposal) and p.state == STATE and p.reasoning == "one more item"
    for bad, reason in [("", "missing-instruction"), ("<think>x", "unclosed-think"),
                        ("instruction: \n" + STATE, "empty-instruction"), ("instruction: x\nfeedback: y", "short-state")]:
        out = parse_task_output(bad)
        assert isinstance(out, ParseFailure) and out.reason == reason


@given(st.text(max_size=300))
@settings(max_examples=1000, deadline=None)
def test_parser_never_raises(text):
    out = parse_task_output(text)
    assert isinstance(out, (TaskProposal, ParseFailure))


def test_pointer_form_prompt_and_parser():
    cat = ("bed: empty", "blue hat", "red hat", "wardrobe (closed)")
    prompt = build_task_prompt([_task(1)], {"t/1": STATE}, 2, cat)
    assert "# objects\n@1 bed: empty\n@2 blue hat\n@3 red hat\n@4 wardrobe (closed)\n## new task" in prompt
    head = "instruction: Put.\nfeedback: x\nlocation: bedroom\n"
    p = parse_task_output(head + "objects: @3 | @1 | @2\nexits: \ninventory: ", cat)
    assert isinstance(p, TaskProposal)
    assert p.state == AbstractState.make("x", "bedroom", ["bed: empty", "red hat", "blue hat"]).render()
    for objs, reason in [("@5", "bad-pointer"), ("@0", "bad-pointer"), ("red hat", "bad-pointer"), ("@2 x", "bad-pointer")]:
        out = parse_task_output(head + f"objects: {objs}\nexits: \ninventory: ", cat)
        assert isinstance(out, ParseFailure) and out.reason == reason, objs
    assert object_catalogue([STATE, "junk", AbstractState.make("y", "kitchen", ["sink: empty"]).render()]) == {
        "bedroom": ("bed: empty", "clean blue T-shirt", "long coat", "wardrobe (closed)"), "kitchen": ("sink: empty",)}


def test_pointer_form_with_a_template_keeps_the_parents_room():
    cat = ("bed: empty", "blue hat", "red hat", "wardrobe (open): empty")
    # the model's feedback/location lines are ignored; only loose items come from its pointers
    text = "instruction: Put.\nfeedback: You are in the moon.\nlocation: moon\nobjects: @4 | @2 | @3\n"
    p = parse_task_output(text, cat, template=STATE)
    assert isinstance(p, TaskProposal)
    assert p.state == AbstractState.make("You are in the bedroom.", "bedroom",
                                         ["bed: empty", "wardrobe (closed)", "blue hat", "red hat"]).render()
    for bad, reason in [("instruction: Put.\nlocation: x\n", "missing-objects"),
                        ("instruction: Put.\nobjects: @9\n", "bad-pointer")]:
        out = parse_task_output(bad, cat, template=STATE)
        assert isinstance(out, ParseFailure) and out.reason == reason


def test_seed_groups_pair_each_seed_with_its_room():
    kitchen = AbstractState.make("x", "kitchen", ["sink: empty", "fork"]).render()
    tasks = [_task(i) for i in range(6)]
    states = {t.task_id: (kitchen if i % 2 else STATE) for i, t in enumerate(tasks)}
    groups = seed_groups([tasks[0], tasks[1], tasks[2]], tasks, states, 2, seed=0)
    assert [g[0].task_id for g in groups] == ["t/0", "t/1", "t/2"] and all(len(g) == 2 for g in groups)
    assert groups[0][1].task_id == "t/2" and groups[2][1].task_id == "t/0"   # other seeds of the room first
    assert groups[1][1].task_id in ("t/3", "t/5")                           # then the pool's same-room tasks
    assert seed_groups([tasks[0]], [tasks[0]], states, 2) == [[tasks[0]]]   # alone in its room


@given(st.text(max_size=300))
@settings(max_examples=500, deadline=None)
def test_pointer_parser_never_raises(text):
    for template in (None, STATE):
        out = parse_task_output(text, ("bed: empty", "red hat"), template)
        assert isinstance(out, (TaskProposal, ParseFailure))


@pytest.mark.parametrize("pointers", [False, True])
def test_task_writing_examples_teach_harder_siblings(pointers):
    tasks = [_task(i) for i in range(6)]
    states = {t.task_id: AbstractState.make("x", "bedroom", ["bed: empty"] + [f"item {j}" for j in range(1 + i % 3)]).render()
              for i, t in enumerate(tasks)}
    ex = task_writing_examples(tasks, states, m=2, n=20, seed=0, pointers=pointers)
    assert ex and all(e.prompt.endswith("## new task") and e.reasoning.startswith("<think>") for e in ex)
    for e in ex:
        cat = object_catalogue(list(states.values()))["bedroom"] if pointers else None
        assert ("# objects\n@1 bed: empty" in e.prompt) == pointers and ("@" in e.prediction) == pointers
        target = parse_task_output(e.reasoning + e.prediction, cat)
        seeds_max = max(len(loose_items(b.split("\n# objects")[0].split("\n", 1)[1]))
                        for b in e.prompt.split("# seed ")[1:])
        assert isinstance(target, TaskProposal) and len(loose_items(target.state)) >= seeds_max
        assert target.state in states.values()           # the sibling, resolved back from its pointers


def test_feasibility_filter_reasons():
    parent = _task(1)
    hats = AbstractState.make("x", "bedroom", ["bed: empty", "red hat", "blue hat: green hat, grey hat"]).render()
    existing = {"t/1": STATE, "t/9": hats}         # t/9: a known state that names the hats
    new = AbstractState.make("x", "bedroom", ["bed: empty", "red hat", "blue hat"]).render()
    trivial = AbstractState.make("x", "bedroom", ["bed: empty", "green hat"]).render()
    broken = AbstractState.make("x", "bedroom", ["bed: empty", "grey hat"]).render()
    no_items = AbstractState.make("x", "bedroom", ["bed: empty"]).render()
    invented = AbstractState.make("x", "bedroom", ["bed: empty", "coat duvet"]).render()
    elsewhere = AbstractState.make("x", "moon base", ["bed: empty", "red hat"]).render()
    props = [ParseFailure("missing-instruction"), TaskProposal("Put.", STATE), TaskProposal("Put.", new),
             TaskProposal("Put.", new), TaskProposal("Put.", no_items), TaskProposal("Put.", trivial),
             TaskProposal("Put.", broken), TaskProposal("Put.", invented), TaskProposal("Put.", elsewhere)]

    def simulate(tasks):
        out = []
        for t in tasks:
            for j in range(3):
                if "green" in t.initial_state:
                    out.append(_traj(t, 1, j))
                elif "grey" in t.initial_state:
                    out.append(_traj(t, 0, j, valid=False))
                else:
                    out.append(_traj(t, j == 0, j))
        return out

    kept, rows = feasibility_filter(props, [parent] * len(props), [parent], existing, simulate, 2)
    assert [r["reason"] for r in rows] == ["parse", "duplicate", "", "duplicate", "format", "trivial", "invalid",
                                           "unknown", "unknown"]
    assert rows[7]["state"] == invented and "state" not in rows[0]
    assert len(kept) == 1 and kept[0].parent_task_id == "t/1" and kept[0].iteration == 2
    assert kept[0].source == "synthetic" and kept[0].initial_state == new and kept[0].task_id.startswith("syn/002/")
    kept2, report = synthesize(["junk", "instruction: Put.\n" + new], [parent, parent], [parent], existing, simulate, 2)
    assert report["proposals"] == 2 and report["kept"] == 1 and report["drops"]["parse"] == 1


@given(n_orig=st.integers(0, 30), n_syn=st.integers(0, 30), lam=st.floats(0, 1), size=st.integers(0, 60))
@settings(max_examples=300, deadline=None)
def test_synthetic_share_never_exceeds_lambda(n_orig, n_syn, lam, size):
    orig = [_task(i) for i in range(n_orig)]
    syn = [_task(100 + i, source="synthetic", iteration=1 + i % 3, state=STATE) for i in range(n_syn)]
    pool = build_task_pool(orig, syn, lam, size, seed=1)
    n = sum(t.source == "synthetic" for t in pool)
    assert len(pool) <= size and len({t.task_id for t in pool}) == len(pool)
    assert n <= math.floor(lam * len(pool) + 1e-9)


def test_pool_keeps_newest_synthetic_and_provenance():
    orig = [_task(i) for i in range(7)]
    syn = [_task(100 + i, source="synthetic", iteration=i, state=STATE) for i in range(1, 5)]
    pool = build_task_pool(orig, syn, 0.3, 10, seed=0)
    assert [t.iteration for t in pool if t.source == "synthetic"] == [4, 3, 2]
    assert build_task_pool(orig, syn, 0.0, 10) == orig
    with pytest.raises(ValueError, match="lam"):
        CurriculumConfig(lam=1.5)


def test_recombined_tasks_swap_or_add_known_items_of_the_same_room():
    def room(loc, items, fixed):
        return AbstractState.make(f"You are in the {loc}.", loc, fixed + items).render()

    bed = ["bed: empty", "wardrobe (closed)"]
    states = {"t/0": room("bedroom", ["long coat", "sock"], bed), "t/1": room("bedroom", ["scarf", "sock"], bed),
              "t/2": room("bedroom", ["hat", "long coat"], bed),
              "t/3": room("kitchen", ["apple", "spoon"], ["fridge (closed)"]),  # alone in its room: never used
              "t/4": room("bathroom", [], ["sink: empty"])}  # nothing loose
    tasks = [_task(i) for i in range(5)]
    items = {"long coat", "sock", "scarf", "hat"}
    out = recombine_tasks(tasks, states, 6, 3, seed=1)
    assert out and len(out) <= 6 and len({t.task_id for t in out}) == len(out)
    existing = {frozenset(loose_items(s)) for s in states.values()}
    for t in out:
        assert t.source == "synthetic" and t.iteration == 3 and t.task_id.startswith("syn/003/")
        st, parent = AbstractState.parse(t.initial_state), AbstractState.parse(states[t.parent_task_id])
        loose = loose_items(t.initial_state)
        assert st.location == parent.location == "bedroom" and set(loose) <= items and len(loose) == 2
        assert frozenset(loose) not in existing  # a pair no task has
        assert [o for o in st.objects if o in bed] == bed  # the room's furniture kept as it was
    harder = recombine_tasks(tasks, states, 4, 3, extra=1, seed=1)
    assert harder and all(len(loose_items(t.initial_state)) == 3 for t in harder)
    assert recombine_tasks(tasks, states, 4, 3, seed=1) == recombine_tasks(tasks, states, 4, 3, seed=1)
    assert recombine_tasks(tasks, states, 0, 3) == []
    with pytest.raises(ValueError, match="n and extra"):
        recombine_tasks(tasks, states, 2, 1, extra=-1)


# --------------------------------------------------------------------------------------------
# The rollout batch: originals and synthetic tasks drawn apart

def _pool(n_orig, n_syn, newest=1):
    return [_task(i) for i in range(n_orig)] + [
        _task(1000 + j, source="synthetic", iteration=newest if j % 2 else newest - 1) for j in range(n_syn)]


@pytest.mark.parametrize("n_orig,n_syn,n,lam,want_syn,want_orig", [
    (300, 1, 12, 0.3, 1, 11),     # the demo's case: one variant among 300 originals is always drawn
    (300, 10, 12, 0.3, 3, 9),     # floor(0.3 * 12) places
    (300, 10, 12, 0.05, 1, 11),   # a small lambda still gives the pool's variants one place
    (300, 10, 12, 0.0, 0, 12),    # lambda 0: originals only
    (300, 0, 12, 0.3, 0, 12),     # no variants yet: a full batch of originals
    (5, 10, 12, 0.5, 6, 5),       # originals run out: the batch is smaller, never more synthetic
    (2, 2, 12, 1.0, 2, 2),
])
def test_draw_batch_exact_counts(n_orig, n_syn, n, lam, want_syn, want_orig):
    batch = draw_batch(_pool(n_orig, n_syn), n, lam, iteration=3, seed=0)
    assert sum(t.source == "synthetic" for t in batch) == want_syn
    assert sum(t.source != "synthetic" for t in batch) == want_orig
    assert len({t.task_id for t in batch}) == len(batch)


def test_draw_batch_takes_the_newest_variants_first_and_is_seeded():
    pool = _pool(50, 8, newest=4)   # 4 variants of iteration 4, 4 of iteration 3
    batch = draw_batch(pool, 10, 0.3, iteration=5, seed=0)
    syn = [t for t in batch if t.source == "synthetic"]
    assert len(syn) == 3 and all(t.iteration == 4 for t in syn)
    assert batch == draw_batch(list(reversed(pool)), 10, 0.3, iteration=5, seed=0)   # order-free, deterministic
    assert batch != draw_batch(pool, 10, 0.3, iteration=6, seed=0)
    with pytest.raises(ValueError, match="lam"):
        draw_batch(pool, 10, 1.5, 1)


# --------------------------------------------------------------------------------------------
# M_task's grammar and its constrained decoding

def test_task_grammar_forces_fields_and_in_range_pointers():
    head = "<think>more</think>\ninstruction: Put.\nfeedback: x\nlocation: bedroom\nobjects:"
    assert next_task_constraint("").allowed == ("<think>",)
    assert next_task_constraint("<think>why").allowed is None                       # reasoning is free
    assert next_task_constraint("<think>" + "w" * 500).allowed == ("</think>",)     # ...up to a length
    assert next_task_constraint("<think>why", tokens_left=10).allowed == ("</think>",)  # or the budget
    assert next_task_constraint("<think>a</think>").allowed == ("\n",)
    assert next_task_constraint("<think>a</think>\n").allowed == ("instruction:",)
    blank = next_task_constraint("<think>a</think>\ninstruction:")
    assert blank.allowed is None and not blank.newline_ok and not blank.end_ok
    assert next_task_constraint("<think>a</think>\ninstruction: Put.\n").allowed == ("feedback:",)
    assert next_task_constraint(head, 3, template=True).allowed == (" @1", " @2", " @3")
    after = next_task_constraint(head + " @2", 3, template=True).allowed
    assert set(after) == {"\n", " | @1", " | @3"}                                     # no repeat, none past @3
    assert set(next_task_constraint(head + " @1", 12, template=True).allowed) >= {"0", "1", "2", " | @12"}
    assert "3" not in next_task_constraint(head + " @1", 12, template=True).allowed   # @13 > 12
    assert next_task_constraint(head + " @2", 3, template=True, tokens_left=5).allowed == ("\n",)
    assert next_task_constraint(head + " @2\n", 3, template=True).allowed == (END,)   # the room is the parent's
    assert next_task_constraint(head + " @2\n", 3).allowed == ("exits:",)
    assert next_task_constraint(head + " @2\nexits: \ninventory: a", 3).end_ok


@pytest.fixture(scope="module")
def writer_model(tmp_path_factory):
    """A tiny untrained Llama over a BPE of task-writing texts: it writes noise unless constrained."""
    from tests.tiny_models import tiny_llama

    tasks = [_task(i) for i in range(8)]
    states = {t.task_id: AbstractState.make("x", "bedroom", ["bed: empty"] + [f"item {j}" for j in range(1 + i % 4)])
              .render() for i, t in enumerate(tasks)}
    ex = task_writing_examples(tasks, states, m=2, n=30, seed=0)
    model, tok = tiny_llama(tmp_path_factory.mktemp("mtask"), [e.prompt + "\n" + e.reasoning + e.prediction
                                                               for e in ex], 400, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, max_position_embeddings=1024)
    return model, tok, tasks, states


def test_constrained_task_writer_parses_where_free_decoding_does_not(writer_model):
    """The grammar, not the weights, makes proposals parse: an untrained model's free samples fail,
    its constrained samples (same seed) all parse, with every pointer inside its catalogue."""
    model, tok, tasks, states = writer_model
    cat = object_catalogue(list(states.values()))["bedroom"]
    seeds = tasks[:6]
    groups = seed_groups(seeds, tasks, states, 2, seed=0)
    prompts = [build_task_prompt(g, states, 2, cat) for g in groups]
    cats = [cat] * len(prompts)
    rates = {}
    for constrained in (False, True):
        texts = TaskWriter(model, tok, seed=0, max_new_tokens=96, constrained=constrained).write(prompts, cats)
        parsed = [parse_task_output(t, cat, states[s.task_id]) for t, s in zip(texts, seeds)]
        rates[constrained] = sum(isinstance(p, TaskProposal) for p in parsed) / len(parsed)
        if constrained:
            assert all(t.startswith("<think>") and "\ninstruction:" in t for t in texts), texts
            assert all(p.state.startswith("feedback: x\nlocation: bedroom") for p in parsed)  # the parent's room
    assert rates == {False: 0.0, True: 1.0}
