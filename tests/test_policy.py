import math

import pytest
import torch
import torch.nn.functional as F

from dreamgym_core.policy import (
    BCExample, LMPolicy, PolicyFormat, ValueHead, _ids, bc_examples, build_policy_prompt, score_candidates,
    set_policy_format, train_bc,
)
from dreamgym_core.rollout import PolicyContext


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_models import tiny_llama

    lines = [f"Task: tidy\nobjects: counter: apple{i} | fridge (closed)\nAction: take apple{i}\nopen fridge" for i in range(200)]
    return tiny_llama(tmp_path_factory.mktemp("tok"), lines, 400, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _naive(model, tok, prompt, cand):
    p, c = _ids(tok, prompt), _ids(tok, " " + cand + "\n")
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
    return sum(lp[len(p) - 1 + k, c[k]].item() for k in range(len(c)))


def test_cached_scoring_equals_naive_scoring(tiny):
    model, tok = tiny
    prompts = ["Task: tidy\nobjects: counter: apple3\nAction:", "Action:"]
    cands = [["take apple3", "open fridge", "look around"], ["inventory", "put apple1 in fridge"]]
    scores = score_candidates(model, tok, prompts, cands)
    for b in range(2):
        for j, c in enumerate(cands[b]):
            assert scores[b][j].item() == pytest.approx(_naive(model, tok, prompts[b], c), abs=1e-4)


def test_scores_are_differentiable_and_value_head_reads_hidden(tiny):
    model, tok = tiny
    scores, hidden = score_candidates(model, tok, ["Action:"], [["take apple1", "open fridge"]], grad=True,
                                      return_hidden=True)
    head = ValueHead(hidden.shape[-1])
    (scores[0].sum() + head(hidden).sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert head(hidden).shape == (1,)
    model.zero_grad(set_to_none=True)


def test_act_returns_normalized_choice_logprobs_and_is_seeded(tiny):
    model, tok = tiny
    ctx = [PolicyContext("tidy", "objects: counter: apple1", ("take apple1", "open fridge", "look around"), seed=s)
           for s in range(6)]
    set_policy_format(model, PolicyFormat())
    pol = LMPolicy(model, tok, "p")
    a, b = pol.act(ctx), pol.act(ctx)
    assert a == b
    assert all(c.action in ctx[0].candidates and c.logprob <= 0 for c in a)
    assert a[0].prompt == build_policy_prompt(ctx[0], PolicyFormat())  # each choice says what it scored
    greedy = LMPolicy(model, tok, "g", greedy=True).act(ctx[:1])[0]
    scores = score_candidates(model, tok, [build_policy_prompt(ctx[0], PolicyFormat())], [list(ctx[0].candidates)])[0]
    assert greedy.action == ctx[0].candidates[int(scores.argmax())]
    assert math.isclose(math.exp(greedy.logprob), F.softmax(scores, 0).max().item(), rel_tol=1e-5)


def test_the_prompt_shows_the_formats_history_window():
    ctx = PolicyContext("tidy", "objects: apple1", ("take apple1",), history=(("a1", "f1"), ("a2", "f2"), ("a3", "f3")))
    assert build_policy_prompt(ctx, PolicyFormat(history_window=0)) == "Task: tidy\nobjects: apple1\nAction:"
    two = build_policy_prompt(ctx, PolicyFormat(history_window=2))
    assert two == "Task: tidy\nDid: a2 -> f2\nDid: a3 -> f3\nobjects: apple1\nAction:"
    assert build_policy_prompt(ctx, PolicyFormat(history_window=8)).count("Did: ") == 3
    with pytest.raises(ValueError, match="history_window"):
        PolicyFormat(history_window=-1)
    with pytest.raises(ValueError, match="policy_format"):
        PolicyFormat.from_meta({"kind": "policy"}, "ckpt")


def test_bc_examples_rebuild_the_prompt_a_rollout_shows():
    """BC clones from stored episodes: its prompts are the ones ``rollout`` + ``LMPolicy`` would build."""
    from dreamgym_core.schema import Task, Trajectory, Transition
    from dreamgym_core.state import AbstractState

    task = Task("t/0", "x", "g", "train", 0, "tidy")
    states = [AbstractState.make(f"you did {i}", "room", [f"apple{i}"]).render() for i in range(4)]
    steps = tuple(Transition("t/0#e#0", "t/0", "x", i, states[i], f"take apple{i}", states[i + 1], float(i == 2), 0.0,
                             i == 2, i == 2, False, True, "expert", (f"take apple{i}",)) for i in range(3))
    traj = Trajectory("t/0#e#0", task, "e", steps)
    ex = bc_examples([traj], PolicyFormat(history_window=1))
    assert [e.action for e in ex] == ["take apple0", "take apple1", "take apple2"]
    assert ex[2].prompt == f"Task: tidy\nDid: take apple1 -> you did 2\n{states[2]}\nAction:"


def test_bc_raises_the_expert_choice_probability(tiny):
    model, tok = tiny
    ex = [BCExample(f"Task: tidy\nobjects: counter: apple{i}\nAction:", f"take apple{i}",
                    (f"take apple{i}", "open fridge", "look around")) for i in range(8)]

    def p_expert():
        s = score_candidates(model, tok, [e.prompt for e in ex], [list(e.candidates) for e in ex])
        return sum(F.softmax(x, 0)[0].item() for x in s) / len(ex)

    before = p_expert()
    losses = train_bc(model, tok, ex, steps=30, batch_size=8, lr=5e-3)
    assert p_expert() > before + 0.2 and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="no examples"):
        train_bc(model, tok, [], steps=1)



def test_bc_wall_budget_plans_a_shorter_schedule_and_an_unbound_budget_changes_nothing(tmp_path, monkeypatch):
    """On a fake clock (1 s per reading): a budget too small for ``steps`` fixes, after _PLAN_AFTER timed
    steps, a plan that fits it, and the cosine reaches its end inside the budget; a budget that does not
    bind leaves the run identical, loss for loss, to one without a budget."""
    import itertools

    from dreamgym_core import policy as pol
    from tests.tiny_models import tiny_llama

    ex = [BCExample(f"Task: tidy\nobjects: counter: apple{i}\nAction:", f"take apple{i}",
                    (f"take apple{i}", "open fridge", "look around")) for i in range(8)]
    lines = [e.prompt + " " + " | ".join(e.candidates) for e in ex]

    def run(budget):
        model, tok = tiny_llama(tmp_path, lines, 300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
        clock = itertools.count()
        monkeypatch.setattr(pol, "_clock", lambda: float(next(clock)))
        info = {}
        return train_bc(model, tok, ex, steps=40, batch_size=4, lr=5e-3, time_budget_s=budget, info=info), info

    free, free_info = run(None)
    loose, loose_info = run(3600.0)
    assert loose == free and loose_info["planned_steps"] == free_info["planned_steps"] == 40
    assert free_info["last_lr"] < 1e-6  # the cosine ran to its end
    # reading k is taken before step k-1; at step 10 the clock says 11 s: 40 steps would need 44 s > 20.5
    short, info = run(20.5)
    assert info["planned_steps"] == int(20.5 * 10 / 11) == len(short) and info["last_lr"] < 1e-6
    cut, info = run(0.5)
    assert len(cut) == 1 and info["planned_steps"] == 40  # hard stop after one step, before any plan
