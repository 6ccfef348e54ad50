from dreamgym_core.experience_model import PromptConfig, SimConfig
from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, train_tokenizer
from dreamgym_core.schema import Task, Trajectory, Transition
from dreamgym_core.state import AbstractState

from bench.mexp_generation import ABLATIONS, compare, simulator_prompts


def S(fb, objs, inv=()):
    return AbstractState.make(fb, "kitchen", objs, [], inv).render()


S0 = S("", ["counter: apple", "fridge (closed)"])
S1 = S("You take the apple.", ["counter: empty", "fridge (closed)"], ["apple"])
S2 = S("You open the fridge.", ["counter: empty", "fridge (open)"], ["apple"])
S3 = S("You put the apple in the fridge.", ["counter: empty", "fridge (open): apple"])


def step(i, s, a, s2, won=False):
    return Transition(traj_id="t#0", task_id="t", env="twx", step_idx=i, state=s, action=a, next_state=s2,
                      reward=float(won), score=0.0, done=won, won=won, lost=False, valid=True, action_kind="expert")


TRAJ = Trajectory("t#0", Task("t", "twx", "twc", "train", 0, "put the apple in the fridge"), "expert",
                  (step(0, S0, "take apple", S1), step(1, S1, "open fridge", S2),
                   step(2, S2, "put apple in fridge", S3, won=True), step(3, S0, "open fridge", S0)))


def test_prompts_carry_history_and_pointer_contexts():
    prompts, contexts = simulator_prompts([TRAJ], PromptConfig())
    assert len(prompts) == len(contexts) == 4
    assert "## history" not in prompts[0] and "> take apple" in prompts[1]  # history of the same trajectory
    assert contexts[2] == (S2, ("apple", "fridge"))
    assert "> take @1\nYou take the @1." in prompts[2]  # delexicalized with this step's refs


def test_both_methods_predict_every_prompt_with_positive_timings(tmp_path):
    prompts, contexts = simulator_prompts([TRAJ], PromptConfig())
    tok = train_tokenizer([p * 5 for p in prompts], str(tmp_path / "tok"), vocab_size=400, min_frequency=1)
    model = build_tiny_llama(tok, TinyLlamaConfig(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64))
    res = compare(model, tok, prompts, contexts, SimConfig(max_new_tokens=8, prefill_rows=2), batch_sizes=[1, 4],
                  repeats=1, variants=ABLATIONS[:2])
    assert set(res) == {"one_at_a_time", "batched_1", "batched_4", "batched_1 one-forward prefill",
                        "batched_4 one-forward prefill", "batched_1 transformers forward",
                        "batched_4 transformers forward"}
    assert {r["predictions"] for r in res.values()} == {4.0}
    for r in res.values():
        assert r["seconds"] > 0 and r["steps_per_s"] > 0 and r["tokens_per_s"] > 0
    assert res["batched_1"]["same_text"] == 1.0  # batch 1 has no padding: greedy must match token for token


def test_retrieval_cost_times_the_simulator_with_and_without_demos(tmp_path):
    from bench.mexp_generation import retrieval_cost

    prompts, _ = simulator_prompts([TRAJ], PromptConfig())
    tok = train_tokenizer([p * 5 for p in prompts], str(tmp_path / "tok"), vocab_size=400, min_frequency=1)
    model = build_tiny_llama(tok, TinyLlamaConfig(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64))
    other = Trajectory("u#0", Task("u", "twx", "twc", "train", 1, "put the apple in the fridge"), "expert",
                       tuple(Transition(**{**t.__dict__, "traj_id": "u#0", "task_id": "u"}) for t in TRAJ.steps))
    res = retrieval_cost(model, tok, [TRAJ, other], SimConfig(max_new_tokens=4), 2, 1, str(tmp_path))
    assert res["retrieval on"]["demo_share"] == 1.0 and res["retrieval off"]["demo_share"] == 0.0
    assert res["retrieval on"]["prompt_tokens"] > res["retrieval off"]["prompt_tokens"]
    assert all(r["steps_per_s"] > 0 for r in res.values())
