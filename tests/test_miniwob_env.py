"""The MiniWoB++ adapter: page -> abstract state, candidates, experts; live pages in headless Chromium.

The pure tests build MiniWoB DOM trees by hand. The live tests need the miniwob package, chromium
and chromedriver (the Makefile installs them) and skip with the reason when one is missing.
"""

import random

import pytest

from dreamgym_core.envs import EnvSpec, SerialBatchEnv, make_env
from dreamgym_core.envs import miniwob_env as mw
from dreamgym_core.envs import miniwob_state as ms
from dreamgym_core.state import AbstractState

live = pytest.mark.skipif(mw.unavailable_reason() is not None, reason=f"MiniWoB++: {mw.unavailable_reason()}")


def _node(tag, ref, text=None, children=(), value=None, id="", classes=""):
    d = {"tag": tag, "ref": ref, "left": 0, "top": 0, "width": 10, "height": 10, "children": list(children),
         "id": id, "classes": classes}
    if text is not None:
        d["text"] = text
    if value is not None:
        d["value"] = value
    return d


def _login_page():
    from miniwob.dom import DOMElement

    form = _node("DIV", 4, children=[
        _node("P", 5, children=[_node("LABEL", 6, "Username"), _node("INPUT_text", 7, "", value="", id="username")]),
        _node("P", 8, children=[_node("LABEL", 9, "Password"), _node("INPUT_password", 10, "", value="ab", id="password")]),
        _node("BUTTON", 11, "Login", id="subbtn")])
    boxes = _node("DIV", 12, children=[
        _node("LABEL", 13, children=[_node("INPUT_checkbox", 14, "", value=True, id="ch0"), _node("t", -1, "Xy: z")]),
        _node("LABEL", 15, children=[_node("INPUT_checkbox", 16, "", value=False, id="ch1"), _node("t", -2, "Q\"q")]),
    ])
    area = _node("DIV", 3, children=[form, boxes, _node("t", -3, "filler"), _node("SPAN", 17, "go", classes="alink"),
                                      _node("DIV", 18, "some static words")])
    return DOMElement(_node("BODY", 1, children=[_node("DIV", 2, children=[area], id="wrap")]))


def test_page_elements_are_cleaned_facts_and_candidates_follow_from_the_state_alone():
    pytest.importorskip("miniwob")
    elements = ms.page_elements(_login_page())
    state = ms.abstract_state("The page loads.", "login-user", elements, ("bob", "ab"))
    s = AbstractState.parse(state)
    assert s.render() == state and s.location == "login-user" and s.inventory == ("ab", "bob")
    # containers gone; labels folded into their fields and checkboxes; inline filler dropped; quotes and
    # ': ' (the contents separator) made safe; document order is not kept (facts are sorted)
    assert s.objects == ('[07] textbox "Username": empty', '[10] password "Password": ab', '[11] button "Login"',
                         '[14] checkbox "Xy - z" (checked)', "[16] checkbox \"Q'q\"", '[17] link "go"',
                         'text "some static words"')
    cands = ms.propose_candidates(state)
    assert cands == sorted(cands) and len(cands) == 6 + 2 * 2
    assert 'click [14] checkbox "Xy - z"' in cands and 'type "bob" into [10] password "Password"' in cands
    assert ms.parse_action('type "bob" into [10] password "Password"') == ("type", 10, "bob")
    assert ms.parse_action('click [17] link "go"') == ("click", 17, None)
    assert ms.parse_action("take apple") is None and ms.propose_candidates("not a state") == []
    rng = random.Random(0)
    bad = {ms.invalid_action(state, cands, rng) for _ in range(200)}
    assert None not in bad and not bad & set(cands)  # what offline data uses as rejected moves
    assert any(b.startswith("click text") for b in bad) and any(b.startswith('type "') for b in bad)
    plan = ms.expert_plan("login-user", [("username", "bob"), ("password", "ab")], elements)
    assert plan == ['type "bob" into [07] textbox "Username"', 'type "ab" into [10] password "Password"',
                    'click [11] button "Login"'] and set(plan) <= set(cands)
    assert ms.expert_plan("click-checkboxes", [("target 0", "Xy: z"), ("button", "submit")],
                          [e for e in elements if e.kind != "button"] + [ms.Element(20, "button", "Submit")]) \
        == ['click [14] checkbox "Xy - z"', 'click [20] button "Submit"']
    with pytest.raises(ValueError, match="no button 'Submit'"):
        ms.expert_plan("enter-text", [("target", "x")], elements)


def test_games_are_checked():
    assert mw.parse_game("mix") == ms.TASKS and mw.parse_game("enter-text, focus-text") == ("enter-text", "focus-text")
    with pytest.raises(ValueError, match="unknown: book-flight"):
        mw.parse_game("click-button,book-flight")


@live
def test_live_experts_win_wrong_moves_lose_invalid_moves_do_nothing_and_the_browser_quits():
    env = make_env(EnvSpec("miniwob", "mix", step_limit=4))
    try:
        tasks = env.tasks("train", len(ms.TASKS)) + env.tasks("test", len(ms.TASKS))
        assert [t.game for t in tasks[:6]] == list(ms.TASKS) and tasks[0].task_id == "miniwob/click-button/train/0"
        assert len({t.seed for t in tasks}) == len(tasks) and all(t.instruction for t in tasks)
        for task in tasks:  # every expert wins its task, on train and on held-out seeds
            obs = env.reset(task)
            plan = env.expert_actions()
            assert plan and set(plan) <= set(obs.candidates), task.task_id
            assert sorted(obs.candidates) == sorted(env.propose_candidates(obs.state))
            results = [env.step(a) for a in plan]
            assert [r.done for r in results] == [False] * (len(plan) - 1) + [True], task.task_id
            assert results[-1].won and results[-1].reward == 1.0 and all(r.valid for r in results)
        first = env.reset(tasks[0]).state
        refs = [ms.parse_fact(f)[1] for f in AbstractState.parse(first).objects if ms.parse_fact(f)]
        assert len(refs) == len(set(refs)) >= 2
        env.step(env.expert_actions()[0])
        assert env.reset(tasks[0]).state == first  # the same seed gives the same page, refs included,
        env.reset(tasks[2])                          # after a finished episode or another page
        assert env.reset(tasks[0]).state == first
        res = env.step("click [99] button 'nope'")
        assert not res.valid and not res.done and res.obs.state.startswith("feedback: Nothing happens.")
        assert res.obs.state.split("\n")[1:] == first.split("\n")[1:]
        wrong = next(c for c in res.obs.candidates if c.startswith("click") and "button" in c
                     and c not in env.expert_actions() and c.split('"')[1] != env.expert_actions()[0].split('"')[1])
        lost = env.step(wrong)
        assert lost.done and lost.lost and not lost.won and lost.reward == 0.0 and lost.valid
        env.reset(tasks[3])  # focus-text: clicking nothing useful runs out of steps
        outs = [env.step("click nowhere") for _ in range(4)]
        assert [o.done for o in outs] == [False, False, False, True] and outs[-1].lost
        browser = mw._Browser.shared
        assert browser is not None and not browser.dead
    finally:
        env.close()
    assert browser.dead and mw._Browser.shared is None and browser.driver.service.process.poll() is not None


@live
def test_live_batch_envs_share_one_browser_in_tabs():
    spec = EnvSpec("miniwob", "click-button,enter-text")
    env = make_env(spec)
    tasks = env.tasks("dev", 4)
    env.close()
    batch = SerialBatchEnv(lambda: make_env(spec), max_engines=4)
    try:
        obs = batch.reset_batch(tasks)
        assert len(mw._Browser.shared.tabs) == 4
        rng = random.Random(0)
        res = batch.step_batch([rng.choice(o.candidates) for o in obs])
        assert all(r is not None and r.valid for r in res)
        batch._envs.pop().close()  # a closed tab leaves the others working, and new tabs open
        late = make_env(spec)
        assert late.reset(tasks[3]).state == obs[3].state and len(mw._Browser.shared.tabs) == 4
        late.close()
        focus = make_env(EnvSpec("miniwob", "focus-text"))  # focus events fire in a tab that is not in front
        focus.reset(focus.tasks("test", 1)[0])
        assert focus.step(focus.expert_actions()[0]).won
        focus.close()
        assert all(e.step(e.reset(t).candidates[0]).valid for e, t in zip(batch._envs, tasks))
    finally:
        batch.close()
    assert mw._Browser.shared is None


@pytest.mark.slow
@live
def test_live_expert_success_over_many_seeds_and_offline_collection():
    from dreamgym_core.collect import CollectConfig, collect

    env = make_env(EnvSpec("miniwob", "mix"))
    try:
        for split in ("train", "dev", "test"):
            for task in env.tasks(split, 5 * len(ms.TASKS), start=6):
                env.reset(task)
                *_, last = [env.step(a) for a in env.expert_actions()]
                assert last.won, task.task_id
        tasks = env.tasks("train", 12)
        trajs, stats = collect(env, tasks, CollectConfig(max_steps=10, invalid_rate=0.25))
    finally:
        env.close()
    assert stats.episodes == 60 and stats.crashes == 0
    experts = [t for t in trajs if t.policy == "expert"]
    assert len(experts) == 12 and all(t.won for t in experts)
    steps = [s for t in trajs for s in t.steps]
    assert any(not s.valid for s in steps) and any(s.valid and not s.done for s in steps)
    assert 0 < stats.successes < stats.episodes


@pytest.mark.slow
@live
def test_live_the_bootstrap_assets_run_on_miniwob(tmp_path, monkeypatch):
    """Experiment(env='miniwob') through the head of the graph: tasks, offline data, CoT, M_exp, its eval, SFT."""
    import dagster as dg

    from pipelines.definitions import ALL_ASSETS, build_defs
    from pipelines.resources import Experiment

    monkeypatch.setenv("DREAMGYM_DATA", str(tmp_path))
    resources = {**build_defs(str(tmp_path)).resources,
                 "experiment": Experiment(env="miniwob", game="mix", n_train_tasks=12, n_dev_tasks=2, n_test_tasks=6,
                                          eval_fold="test", max_steps=10)}
    run_config = {"ops": {
        "experience_model": {"config": {"steps": 2, "time_budget_s": 60, "batch_size": 4, "hidden": 32, "layers": 1,
                                        "vocab_size": 600, "max_len": 768, "task_writing_examples": 4}},
        "experience_model_eval": {"config": {"max_transitions": 9, "drift_trajectories": 3, "drift_steps": 3,
                                             "gap_tasks": 2, "gap_max_steps": 4}},
        "policy_init": {"config": {"steps": 2, "hidden": 32, "layers": 1}}}}
    head = ["seed_tasks", "eval_tasks", "offline_trajectories", "cot_annotations", "replay_seed", "experience_model",
            "experience_model_eval", "policy_init"]
    with dg.instance_for_test() as instance:
        res = dg.materialize(ALL_ASSETS, selection=head, resources=resources, instance=instance, run_config=run_config)
    assert res.success and mw._Browser.shared is None  # every env the assets made was closed
    meta = res.asset_materializations_for_node("offline_trajectories")[0].metadata
    assert meta["rollout/episodes"].value == 60 and meta["rollout/crashes"].value == 0
    assert meta["rollout/steps_expert"].value > 0 and meta["rollout/steps_invalid"].value > 0
    assert 0 < meta["success_rate"].value < 1
    evals = res.output_for_node("eval_tasks").to_pylist()
    assert {r["split"] for r in evals} == {"dev", "test"} and all(r["task_id"].startswith("miniwob/") for r in evals)
    fid = {r["scope"]: r for r in res.output_for_node("experience_model_eval").to_pylist()}
    assert fid["overall"]["transitions"] > 0 and "policy:random" in fid
