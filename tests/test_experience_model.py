import math

import pytest
import torch
import torch.nn.functional as F

from dreamgym_core.exp_format import action_refs, render_pointer_target, render_target
from dreamgym_core.experience_model import (
    ExperienceModel, PromptConfig, SFTConfig, SFTExample, SimConfig, action_type, collate, encode_example, eq5_loss,
    fidelity, multi_step_drift, score_transitions, sft_examples, summarize_fidelity, train_sft,
)
from dreamgym_core.schema import Task, Trajectory, Transition
from dreamgym_core.state import AbstractState
from dreamgym_core.state_delta import diff


def S(fb, objs, inv=()):
    return AbstractState.make(fb, "kitchen", objs, [], inv).render()


S0 = S("", ["counter: apple", "fridge (closed)"])
S1 = S("You take the apple.", ["counter: empty", "fridge (closed)"], ["apple"])
S2 = S("You put the apple in the fridge.", ["counter: empty", "fridge (open): apple"])


def row(traj, i, s, a, s2, reward=0.0, won=False, valid=True, reasoning="because"):
    return {"traj_id": traj, "step_idx": i, "state": s, "action": a, "next_state": s2, "reward": reward, "won": won,
            "lost": False, "valid": valid, "done": won, "instruction": "tidy up", "reasoning": reasoning}


ROWS = [row("A", 0, S0, "take apple", S1), row("A", 1, S1, "put apple in fridge", S2, 1.0, True),
        row("B", 0, S0, "take zebra", S0.replace("feedback: ", "feedback: Unknown action."), valid=False)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tok")
    ex = sft_examples(ROWS, PromptConfig())
    (d / "c.txt").write_text("\n".join(e.prompt + e.reasoning + e.prediction for e in ex) * 20)
    bpe = ByteLevelBPETokenizer()
    bpe.train(files=[str(d / "c.txt")], vocab_size=500, min_frequency=1, special_tokens=["<|pad|>", "<|eos|>"])
    bpe.save(str(d / "tok.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tok.json"), pad_token="<|pad|>", eos_token="<|eos|>")

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=512, tie_word_embeddings=True))
    return build, tok


def _scored(r, task, before, after):
    return {**r, "task_id": task, "obs": {"score": before}, "score": after}


def test_examples_show_progress_and_leave_one_task_out_placement_knowledge():
    put = row("A", 1, S1, "put apple in fridge", S2, 1.0, True)
    rows = [_scored(row("A", 0, S0, "take apple", S1), "t/a", 0.5, 0.75), _scored(put, "t/a", 0.75, 1.0),
            _scored({**row("B", 0, S0, "take apple", S1), "traj_id": "B"}, "t/b", 0.5, 0.75),
            _scored({**put, "traj_id": "B"}, "t/b", 0.75, 1.0),
            _scored({**put, "traj_id": "C", "reward": 0.0, "won": False}, "t/c", 0.75, 0.5)]
    ex = sft_examples(rows, PromptConfig())
    assert "## progress\n50\n" in ex[0].prompt and "progress: 75" in ex[0].prediction
    assert "## progress\n75\n" in ex[1].prompt and "progress: 100" in ex[1].prediction
    # task t/a's own put is not evidence for it: t/b's is. t/c's wrong put still sees the others' right ones
    assert "## known\n@1 in @2: belongs\n" in ex[1].prompt and "## known\n@1 in @2: belongs\n" in ex[4].prompt
    # then what the state shows each named object is (S1: the apple carried, the fridge closed)
    assert "@1 in @2: belongs\n@1: carried\n@2: closed container\n## refs" in ex[1].prompt
    assert "@1 in counter: never seen\n@1: inside counter\n## refs" in ex[0].prompt
    assert "progress: 50" in ex[4].prediction
    alone = sft_examples([rows[0], rows[1], rows[4]], PromptConfig())
    assert "## known\n@1 in @2: does not belong\n" in alone[1].prompt   # only t/c's wrong put remains
    assert "## known\n@1 in @2: belongs\n" in alone[2].prompt
    assert "## known\n@1 in counter: never seen\n" in ex[0].prompt      # taken out of a receptacle: a pair too
    only = sft_examples(rows, PromptConfig(placements=False))
    assert "## known\n@1: carried\n@2: closed container\n## refs" in only[1].prompt
    assert "## known" not in sft_examples([_scored(row("D", 0, S1, "look", S1), "t/d", 0.0, 0.0), rows[1]],
                                          PromptConfig())[0].prompt   # no item-receptacle pair: no line
    off = sft_examples(rows, PromptConfig(progress=False, placements=False, affordances=False))
    assert "## progress" not in off[1].prompt and "## known" not in off[1].prompt and "progress: =" in off[1].prediction
    from dreamgym_core.experience_model import knowledge_from_meta, knowledge_of, knowledge_to_meta

    know = knowledge_of(rows)
    assert know == {("apple", "fridge"): True} and knowledge_from_meta({"placements": knowledge_to_meta(know)}) == know
    assert PromptConfig.from_meta({"prompt": {"history_window": 2}}) == PromptConfig(history_window=2, progress=False,
                                                                                    placements=False, affordances=False)


def test_examples_carry_history_and_split_the_target():
    ex = sft_examples(ROWS, PromptConfig())
    assert "> take @1" in ex[1].prompt.split("## state")[0]       # history of step 1 holds step 0
    assert "## history" not in ex[2].prompt                       # a new trajectory starts empty
    assert ex[0].reasoning.startswith("<think>because") and ex[0].prediction.startswith("valid: yes")
    assert "reward: 1" in ex[1].prediction and "done: yes" in ex[1].prediction
    # pointer form (default): names are @1/@2 in prompt and target, bound once under "## refs"
    assert ex[1].prompt.endswith("## action\nput @1 in @2\n## known\n@1 in @2: never seen\n@1: carried\n"
                                 "@2: closed container\n## refs\n@1 apple | @2 fridge\n## outcome\n")
    assert "> take @1\nYou take the @1." in ex[1].prompt and "objects: -@1 | +@1 (open): @1" not in ex[1].prediction
    assert "objects: -@2 | +@2 (open): @1" in ex[1].prediction and "inventory: -@1" in ex[1].prediction
    assert "## action\ntake zebra\n## outcome" in ex[2].prompt                      # absent: no pointer
    literal = sft_examples(ROWS, PromptConfig(pointers=False))
    assert "apple" in literal[1].prediction and "@" not in literal[1].prompt + literal[1].prediction
    assert "valid: no" in ex[2].prediction
    nocot = sft_examples(ROWS, PromptConfig(use_cot=False))
    assert nocot[0].reasoning == "<think></think>\n" and nocot[0].prediction == ex[0].prediction


def test_encode_marks_prompt_reasoning_and_state_and_truncates_the_prompt_only(tiny):
    _, tok = tiny
    e = SFTExample("word " * 300, "<think>r</think>\n", "valid: yes")
    ids, kinds = encode_example(tok, e, 64)
    assert len(ids) == 64 and kinds[0] == 0 and kinds[-1] == 2 and ids[-1] == tok.eos_token_id
    assert 1 in kinds and kinds == sorted(kinds)                   # prompt, then reasoning, then state
    with pytest.raises(ValueError, match="no room"):
        encode_example(tok, e, 8)


def test_eq5_terms_match_a_plain_loop(tiny):
    build, tok = tiny
    model = build()
    enc = [encode_example(tok, e, 256) for e in sft_examples(ROWS, PromptConfig())]
    ids, kinds, attn = collate(enc, tok.pad_token_id)
    out = eq5_loss(model, ids, kinds, attn)
    with torch.no_grad():
        r, s = [], []
        for b, (i, k) in enumerate(enc):
            lp = F.log_softmax(model(torch.tensor([i])).logits[0].float(), -1)
            for t in range(1, len(i)):
                (r if k[t] == 1 else s if k[t] == 2 else []).append(-lp[t - 1, i[t]].item())
    assert out["loss/reasoning"].item() == pytest.approx(sum(r) / len(r), rel=1e-4)
    assert out["loss/state"].item() == pytest.approx(sum(s) / len(s), rel=1e-4)
    assert out["loss"].item() == pytest.approx((sum(r) + sum(s)) / (len(r) + len(s)), rel=1e-4)


def test_training_lowers_both_terms_and_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    build, tok = tiny
    ex = sft_examples(ROWS, PromptConfig())
    cfg = SFTConfig(steps=8, batch_size=3, lr=5e-3, warmup=1, checkpoint_every=4, max_len=256)
    full = build()
    res = train_sft(full, tok, ex, cfg, checkpoint_dir=str(tmp_path / "full"))
    h = res.history
    assert h[-1]["loss/state"] < h[0]["loss/state"] and h[-1]["loss/reasoning"] < h[0]["loss/reasoning"]
    # an interrupted run: a zero time budget stops it after one step (checkpointed); a fresh model
    # then resumes from that checkpoint to step 8 and must land on the same weights
    part = build()
    train_sft(part, tok, ex, SFTConfig(steps=8, batch_size=3, lr=5e-3, warmup=1, checkpoint_every=4, max_len=256,
                                       time_budget_s=0.0), checkpoint_dir=str(tmp_path / "part"))
    resumed = build()
    r2 = train_sft(resumed, tok, ex, cfg, checkpoint_dir=str(tmp_path / "part"))
    assert r2.resumed_from == 1 and r2.history[-1]["step"] == 8
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


class Scripted(ExperienceModel):
    """The simulator with its generator replaced by fixed texts (tests the env logic only)."""

    def __init__(self, texts, **kw):
        super().__init__(None, None, initial_state=lambda t: S0, propose_candidates=lambda s: ["look around"], **kw)
        self.texts = list(texts)

    def _generate_chunk(self, prompts):
        return [self.texts.pop(0) for _ in prompts]


def _target(s, s2, action, **kw):
    """The pointer-form target a perfect M_exp writes for ``action`` (what the simulator must relexicalize)."""
    before = AbstractState.parse(s)
    return render_pointer_target("r", diff(before, AbstractState.parse(s2), **kw), before,
                                 action_refs(before, action)).text


TASK = Task("t/0", "twx", "twc", "train", 0, "tidy up")


def test_simulator_applies_deltas_and_ends_episodes():
    sim = Scripted([_target(S0, S1, "take apple", valid=True, reward=0.0, done=False, progress=0, next_progress=50),
                    "garbage",
                    _target(S1, S2, "put apple in fridge", valid=True, reward=1.0, done=True, progress=50,
                            next_progress=100)])
    obs = sim.reset_batch([TASK, TASK])
    assert obs[0].state == S0 and obs[0].candidates == ("look around",)
    r = sim.step_batch(["take apple", "dance"])
    assert r[0].obs.state == S1 and not r[0].done and r[0].valid and r[0].reward == 0.0
    assert r[1].done and r[1].lost and not r[1].valid and sim.stats.parse_failures == 1  # unparseable -> failure
    r = sim.step_batch(["put apple in fridge", "look around"])
    assert r[1] is None and r[0].won and r[0].reward == 1.0 and r[0].done and r[0].obs.state == S2


class Recording(Scripted):
    def _generate_chunk(self, prompts):
        self.prompts = getattr(self, "prompts", []) + list(prompts)
        return super()._generate_chunk(prompts)


def test_progress_decides_the_win_and_is_carried_between_steps():
    take = _target(S0, S1, "take apple", valid=True, reward=0.0, done=False, progress=0, next_progress=50)
    # "reward 1, done" while progress stays at 50: overruled, the episode goes on
    early = _target(S1, S2, "put apple in fridge", valid=True, reward=1.0, done=True)
    # progress reaching 100 wins even where the reward field says 0
    finish = _target(S2, S2, "look around", valid=True, reward=0.0, done=False, progress=50, next_progress=100)
    sim = Recording([take, early, finish])
    sim.reset_batch([TASK])
    r = sim.step_batch(["take apple"])[0]
    assert not r.done and r.score == 0.5
    r = sim.step_batch(["put apple in fridge"])[0]
    assert not r.done and not r.won and r.reward == 0.0 and r.score == 0.5
    r = sim.step_batch(["look around"])[0]
    assert r.done and r.won and r.reward == 1.0 and r.score == 1.0
    assert [p.split("## progress\n")[1].split("\n")[0] for p in sim.prompts] == ["0", "50", "50"]
    # a predicted end without reward is a loss; the task's own start progress is used
    lost = _target(S0, S0, "look around", valid=True, reward=0.0, done=True)
    sim = Recording([lost], initial_progress=lambda t: 25)
    sim.reset_batch([TASK])
    r = sim.step_batch(["look around"])[0]
    assert r.done and r.lost and not r.won and "## progress\n25\n" in sim.prompts[0]
    # without progress (a model trained on data without a dense score) the model's reward decides
    legacy = Recording([_target(S0, S1, "take apple", valid=True, reward=1.0, done=True)],
                       cfg=SimConfig(prompt=PromptConfig(progress=False)))
    legacy.reset_batch([TASK])
    r = legacy.step_batch(["take apple"])[0]
    assert r.won and r.done and "## progress" not in legacy.prompts[0]


def test_invalid_action_keeps_state_unless_configured_to_end():
    bad = _target(S0, S0.replace("feedback: ", "feedback: Unknown action."), "take zebra", valid=False, reward=0.0,
                  done=False)
    sim = Scripted([bad])
    sim.reset_batch([TASK])
    r = sim.step_batch(["take zebra"])[0]
    assert not r.valid and not r.done and AbstractState.parse(r.obs.state).objects == AbstractState.parse(S0).objects
    strict = Scripted([bad], cfg=SimConfig(invalid_ends_episode=True))
    strict.reset_batch([TASK])
    assert strict.step_batch(["take zebra"])[0].done


def test_fidelity_of_a_perfect_predictor_and_the_identity_baseline():
    truth = [_target(r["state"], r["next_state"], r["action"], valid=r["valid"], reward=r["reward"], done=r["won"])
             for r in ROWS]
    m = fidelity(Scripted(truth), ROWS)
    for k in ("state_exact_match", "reward_accuracy", "valid_rate", "win_recall", "win_precision", "invalid_action_accuracy"):
        assert m[k] == 1.0, k
    assert m["baseline_win_recall"] == 0.0 and m["baseline_reward_accuracy"] == pytest.approx(2 / 3)
    assert m["baseline_state_exact_match"] == 0.0 and m["wins"] == 1 and m["invalid_actions"] == 1
    only_win = fidelity(Scripted(truth[1:2]), ROWS, select=[False, True, False])
    assert only_win["transitions"] == 1 and only_win["win_recall"] == 1.0
    literal = [render_target("r", diff(AbstractState.parse(r["state"]), AbstractState.parse(r["next_state"]),
                                       valid=r["valid"], reward=r["reward"], done=r["won"]))[0] for r in ROWS]
    lit_cfg = SimConfig(prompt=PromptConfig(pointers=False))
    assert fidelity(Scripted(literal, cfg=lit_cfg), ROWS)["state_exact_match"] == 1.0     # the literal ablation
    assert fidelity(Scripted(literal), ROWS)["state_exact_match"] == 1.0   # literal facts are valid pointer edits
    assert fidelity(Scripted(truth, cfg=lit_cfg), ROWS)["state_exact_match"] < 1.0  # edits are not literal facts
    wrong = fidelity(Scripted(["nonsense"] * 3), ROWS)
    assert wrong["valid_rate"] == 0.0 and wrong["win_recall"] == 0.0 and math.isclose(wrong["state_exact_match"], 0.0)


def test_sample_weights_are_validated_and_drive_sampling(tiny):
    build, tok = tiny
    ex = sft_examples(ROWS, PromptConfig())
    cfg = SFTConfig(steps=12, batch_size=2, lr=1e-2, warmup=1, max_len=256)
    for bad in ([1.0], [0.0, 0.0, 0.0], [1.0, -1.0, 1.0]):
        with pytest.raises(ValueError, match="sample_weights"):
            train_sft(build(), tok, ex, cfg, sample_weights=bad)
    # two models, each trained only on one example: each must fit its own example better
    enc = [encode_example(tok, e, 256) for e in ex]

    def loss(model, i):
        return eq5_loss(model, *collate([enc[i]], tok.pad_token_id))["loss"].item()

    on_win, on_invalid = build(), build()
    train_sft(on_win, tok, ex, cfg, sample_weights=[0.0, 1.0, 0.0])
    train_sft(on_invalid, tok, ex, cfg, sample_weights=[0.0, 0.0, 1.0])
    assert loss(on_win, 1) < loss(on_invalid, 1) and loss(on_invalid, 2) < loss(on_win, 2)


def test_fidelity_by_action_type_splits_the_same_records():
    truth = [_target(r["state"], r["next_state"], r["action"], valid=r["valid"], reward=r["reward"], done=r["won"])
             for r in ROWS]
    truth[0] = _target(S0, S0, "take apple", valid=True, reward=0.0, done=False)  # "take apple" predicted wrong
    recs = score_transitions(Scripted(truth), ROWS)
    assert [r["action_type"] for r in recs] == ["take", "put", "take"]
    by = {k: summarize_fidelity([r for r in recs if r["action_type"] == k]) for k in ("take", "put")}
    assert by["put"]["state_exact_match"] == 1.0 and by["put"]["win_recall"] == 1.0
    assert by["take"]["state_exact_match"] == 0.5 and by["take"]["invalid_action_accuracy"] == 1.0
    assert math.isnan(by["take"]["win_recall"])  # no win among the take steps: undefined, not 0
    overall = summarize_fidelity(recs)
    assert overall["state_exact_match"] == pytest.approx(2 / 3) and overall["transitions"] == 3
    assert action_type("Look around") == "look" and action_type("") == ""


def _traj(traj_id, rows):
    steps = tuple(Transition(traj_id, "t/0", "twx", r["step_idx"], r["state"], r["action"], r["next_state"],
                             r["reward"], r["reward"], r["won"], r["won"], False, r["valid"], "expert")
                  for r in rows)
    return Trajectory(traj_id, TASK, "expert", steps)


def test_multi_step_drift_feeds_back_the_simulators_own_states():
    a = _traj("A", ROWS[:2])
    right = [_target(S0, S1, "take apple", valid=True, reward=0.0, done=False),
             _target(S1, S2, "put apple in fridge", valid=True, reward=1.0, done=True)]
    sim = Scripted(right)
    sim.initial_state = lambda task: task.initial_state
    d = multi_step_drift(sim, [a], max_steps=5)
    assert [r["step"] for r in d] == [1, 2] and all(r["trajectories"] == 1 for r in d)
    assert [r["state_exact_match"] for r in d] == [1.0, 1.0] and d[1]["agree_so_far"] == 1.0
    assert d[0]["baseline_content_exact_match"] == 0.0 and d[0]["sim_alive"] == 1.0
    # a wrong first step: the second prediction is applied to the simulator's own (wrong) state
    wrong = Scripted([_target(S0, S0, "take apple", valid=True, reward=0.0, done=False), right[1]])
    wrong.initial_state = lambda task: task.initial_state
    d = multi_step_drift(wrong, [a], max_steps=5)
    assert d[0]["state_exact_match"] == 0.0 and d[1]["agree_so_far"] == 0.0
    # a simulator that ends the episode at step 1 misses every later step
    early = Scripted(["garbage"])
    early.initial_state = lambda task: task.initial_state
    d = multi_step_drift(early, [a], max_steps=5)
    assert d[1]["sim_alive"] == 0.0 and d[1]["state_exact_match"] == 0.0 and d[1]["state_token_f1"] == 0.0


@pytest.mark.parametrize("added_tokens", [False, True])
def test_format_constraint_allows_every_target_and_forces_the_fixed_parts(tiny, tmp_path, added_tokens):
    from dreamgym_core.experience_model import FormatConstraint
    from dreamgym_core.models import train_tokenizer

    _, tok = tiny
    ex = sft_examples(ROWS, PromptConfig())
    if added_tokens:  # the embedded default: field names are single added tokens
        tok = train_tokenizer([e.prompt + e.reasoning + e.prediction for e in ex] * 20, str(tmp_path / "t"),
                              vocab_size=400, min_frequency=1)
    g = torch.Generator().manual_seed(0)
    for e in ex:
        prompt = tok(e.prompt + "\n", add_special_tokens=False)["input_ids"]
        target = tok(e.reasoning + e.prediction, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        proc, ids, forced_steps = FormatConstraint(tok, len(prompt)), list(prompt), 0
        for nxt in target:
            scores = proc(torch.tensor([ids]), torch.randn(1, len(tok), generator=g))
            allowed = torch.isfinite(scores[0]).nonzero().flatten().tolist()
            assert nxt in allowed, (tok.decode(ids[len(prompt):]), tok.decode([nxt]))
            forced_steps += len(allowed) < len(tok)
            ids.append(nxt)
        assert forced_steps >= 9  # at least one forced step per field, plus the end


def test_format_constraint_makes_a_random_model_write_the_fields_in_order(tiny):
    from dreamgym_core.exp_format import FIELDS
    from dreamgym_core.experience_model import FormatConstraint

    build, tok = tiny
    model = build().eval()
    prompt = tok("## outcome\n", add_special_tokens=False)["input_ids"]
    think = tok("<think>x</think>", add_special_tokens=False)["input_ids"]
    ids, proc = list(prompt) + think, FormatConstraint(tok, len(prompt))
    free = 0
    with torch.no_grad():
        for _ in range(400):  # greedy decoding of an untrained model, one token at a time
            scores = proc(torch.tensor([ids]), model(torch.tensor([ids])).logits[:, -1].float())
            nxt = int(scores[0].argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
            free += bool(torch.isfinite(scores[0]).all())
            if free > 60:  # a free field that never ends: close it as a trained model would
                ids += tok("\n", add_special_tokens=False)["input_ids"]
                free = 0
    text = tok.decode(ids[len(prompt):], skip_special_tokens=True)
    body = text.split("</think>", 1)[1].split("\n")[1:]
    assert [ln.split(":")[0] for ln in body[:len(FIELDS)]] == list(FIELDS), text
    assert body[0] in ("valid: yes", "valid: no") and body[-1] in ("done: yes", "done: no")


class _RowCache:
    """Stands in for a KV cache: remembers which original row each batch row is."""

    def __init__(self, rows):
        self.rows = rows

    def reorder_cache(self, keep):
        self.rows = self.rows[keep]


class _CountingModel:
    """Row r (its id is the prompt's last token) writes token 10 + r, r + 1 times, then EOS (0)."""

    vocab, eos = 40, 0

    def __init__(self, prompt_len):
        self.P, self.batch_sizes = prompt_len, []

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True,
                 logits_to_keep=0):
        import types

        cache = past_key_values if isinstance(past_key_values, _RowCache) else _RowCache(input_ids[:, -1].clone())
        self.batch_sizes.append(input_ids.shape[0])
        step = position_ids[:, -1] - (self.P - 1)  # tokens generated before the one predicted now
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        for j, (r, t) in enumerate(zip(cache.rows.tolist(), step.tolist())):
            logits[j, -1, self.eos if t == r + 1 else 10 + r] = 1.0
        return types.SimpleNamespace(logits=logits, past_key_values=cache)


def test_decoding_drops_finished_rows_and_keeps_each_row_its_own():
    import types

    P = 3
    model = _CountingModel(P)
    sim = ExperienceModel(model, types.SimpleNamespace(eos_token_id=0), initial_state=lambda t: S0,
                          propose_candidates=lambda s: [], cfg=SimConfig(max_new_tokens=10))
    inp = torch.tensor([[5, 5, 2], [5, 5, 0 + 1], [5, 5, 0]])  # row ids 2, 1, 0 (last prompt token)
    seqs = sim.decoder.decode(inp, torch.ones_like(inp), P, None)
    assert seqs == [[12, 12, 12, 0], [11, 11, 0], [10, 0]]
    assert model.batch_sizes == [3, 3, 2, 1]  # prefill, then each row leaves after its EOS
    capped = ExperienceModel(_CountingModel(P), types.SimpleNamespace(eos_token_id=0), initial_state=lambda t: S0,
                             propose_candidates=lambda s: [], cfg=SimConfig(max_new_tokens=2))
    assert capped.decoder.decode(inp, torch.ones_like(inp), P, None) == [[12, 12], [11, 11], [10, 0]]


@pytest.mark.parametrize("capacity", [64, 9])  # 9: smaller than the prompt, so the buffer has to grow
def test_growing_kv_cache_gives_the_dynamic_caches_logits_through_drops_and_reorders(tiny, capacity):
    from transformers import DynamicCache

    from dreamgym_core.experience_model import GrowingCache

    build, tok = tiny
    model = build().eval()
    torch.manual_seed(1)
    inp = torch.randint(2, len(tok), (4, 12))
    attn = torch.ones_like(inp)
    attn[1, :5] = 0  # left padding
    attn[3, :2] = 0

    def decode(cache):
        a, out_logits = attn.clone(), []
        pos = (a.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(input_ids=inp, attention_mask=a, position_ids=pos, past_key_values=cache, use_cache=True)
            nxt, npos = out.logits[:, -1].argmax(-1), a.sum(-1, keepdim=True)
            out_logits.append(out.logits[:, -1])
            for t in range(6):
                keep = {2: torch.tensor([0, 2, 3]), 4: torch.tensor([2, 0, 1])}.get(t)  # a drop, then a permutation
                if keep is not None:
                    cache.reorder_cache(keep)
                    nxt, a, npos = nxt[keep], a[keep], npos[keep]
                a = torch.cat([a, a.new_ones((a.shape[0], 1))], 1)
                out = model(input_ids=nxt.unsqueeze(1), attention_mask=a, position_ids=npos, past_key_values=cache,
                            use_cache=True)
                nxt, npos = out.logits[:, -1].argmax(-1), npos + 1
                out_logits.append(out.logits[:, -1])
        return out_logits, cache

    want, dyn = decode(DynamicCache())
    got, grown = decode(GrowingCache(capacity))
    assert len(got) == len(want) == 7
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert grown.get_seq_length() == dyn.get_seq_length() == 12 + 6
    torch.testing.assert_close(grown.layers[0].keys, dyn.layers[0].keys)


def test_has_progress_needs_a_score_and_every_rows_observation():
    from dreamgym_core.experience_model import has_progress

    scored = [_scored(r, "t", 0.0, 0.5) for r in ROWS]
    assert has_progress(scored)
    assert not has_progress([{**r, "score": 0.0} for r in scored])  # zeros only: an unscored import
    assert not has_progress(scored[:2] + [{k: v for k, v in scored[2].items() if k != "obs"}])  # a later row lacks it


def test_weighted_length_bucketing_keeps_the_weights_and_cuts_each_pool_by_length():
    import itertools
    import random

    from dreamgym_core.experience_model import BUCKET_POOL, _bucketed_draw

    rnd = random.Random(0)
    lengths = [rnd.randrange(20, 300) for _ in range(60)]
    weights = [0.0 if i % 10 == 0 else (3.0 if i % 2 else 1.0) for i in range(60)]
    cum = list(itertools.accumulate(weights))
    pool = [_bucketed_draw(cum, lengths, 4, s, (0, 0)) for s in range(BUCKET_POOL)]
    assert all(len(b) == 4 for b in pool)
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in pool)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # batches are length slices of one draw
    assert [min(lengths[i] for i in b) for b in pool] != sorted(min(lengths[i] for i in b) for b in pool)  # shuffled
    assert _bucketed_draw(cum, lengths, 4, 3, (0, 0)) == pool[3]  # a resumed run draws the same batch
    assert _bucketed_draw(cum, lengths, 4, 3, (0, 1)) != pool[3]  # another rank does not
    counts = [0] * 60
    for s in range(4000):
        for i in _bucketed_draw(cum, lengths, 4, s, (0, 0)):
            counts[i] += 1
    heavy = sum(c for i, c in enumerate(counts) if weights[i] == 3.0)
    light = sum(c for i, c in enumerate(counts) if weights[i] == 1.0)
    assert sum(counts[i] for i in range(60) if weights[i] == 0.0) == 0
    # 30 examples of weight 3 (odd i), 24 of weight 1: an expected ratio of 90 / 24 over 16,000 draws
    assert heavy / light == pytest.approx(90 / 24, rel=0.08)


def test_lean_and_transformers_forwards_and_both_kv_caches_write_the_same_text(tiny):
    from dreamgym_core.lean_llama import supports

    build, tok = tiny
    model = build().eval()
    assert supports(model)
    prompts = [e.prompt for e in sft_examples(ROWS, PromptConfig())] * 2
    outs = {}
    for fwd in ("lean", "transformers"):
        for kv in ("growing", "dynamic"):
            sim = ExperienceModel(model, tok, initial_state=lambda t: S0, propose_candidates=lambda s: [],
                                  cfg=SimConfig(max_new_tokens=40, forward=fwd, kv_cache=kv))
            outs[(fwd, kv)] = tuple(sim._generate_chunk(prompts))
    assert len(set(outs.values())) == 1, outs
    assert all(outs[("lean", "growing")])  # something was written
    sim_lean = ExperienceModel(model, tok, initial_state=lambda t: S0, propose_candidates=lambda s: [])
    first = sim_lean.decoder.lean()
    assert sim_lean.decoder.lean() is first  # built once
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.5)  # weights changed in place (an optimizer step)
    rebuilt = sim_lean.decoder.lean()
    assert rebuilt is not first
    torch.testing.assert_close(rebuilt.layers[0]["qkv"][:32], model.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="forward"):
        SimConfig(forward="fast")


@pytest.mark.parametrize("fwd", ["lean", "transformers"])
def test_prefill_grouped_by_length_gives_the_one_forward_prefill_logits_cache_and_text(tiny, fwd):
    from transformers import DynamicCache

    from dreamgym_core.experience_model import GrowingCache, _ids

    build, tok = tiny
    model = build().eval()
    prompts = [e.prompt for e in sft_examples(ROWS, PromptConfig())]
    prompts = [p[:n] for p in prompts for n in (len(p), len(p) // 2, len(p) // 3)]  # mixed lengths
    ids = [_ids(tok, p) for p in prompts]
    P = max(len(x) for x in ids)
    assert len({len(x) for x in ids}) > 3
    inp = torch.zeros(len(ids), P, dtype=torch.long)
    attn = torch.zeros(len(ids), P, dtype=torch.long)
    for b, x in enumerate(ids):
        inp[b, P - len(x):], attn[b, P - len(x):] = torch.tensor(x), 1
    sim = ExperienceModel(model, tok, initial_state=lambda t: S0, propose_candidates=lambda s: [],
                          cfg=SimConfig(max_new_tokens=40, forward=fwd, prefill_rows=2))
    lean = sim.decoder.lean()
    assert (lean is None) == (fwd == "transformers")
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        if lean is not None:
            whole = GrowingCache(P)
            want = lean.forward(inp, pos, attn.bool(), whole)
        else:
            whole = DynamicCache()
            want = model(input_ids=inp, attention_mask=attn, position_ids=pos, past_key_values=whole,
                         use_cache=True).logits[:, -1]
        def step(x, p, a, c):  # _decode's step: the lean forward or transformers', into cache c
            if lean is not None:
                return lean.forward(x, p, a.bool(), c), c
            out = model(input_ids=x, attention_mask=a, position_ids=p, past_key_values=c, use_cache=True,
                        logits_to_keep=1)
            return out.logits[:, -1, :], out.past_key_values

        grouped = GrowingCache(P) if lean is not None else DynamicCache()
        got = sim.decoder.grouped_prefill(inp, attn, grouped, step, lean is not None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    real = attn.bool()
    for a, b in zip(grouped.layers, whole.layers):  # every row's real keys and values where they belong
        torch.testing.assert_close(a.keys.transpose(1, 2)[real], b.keys.transpose(1, 2)[real], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.values.transpose(1, 2)[real], b.values.transpose(1, 2)[real],
                                   rtol=1e-4, atol=1e-4)
    texts = {(rows, kv): tuple(ExperienceModel(model, tok, initial_state=lambda t: S0, propose_candidates=lambda s: [],
                                               cfg=SimConfig(max_new_tokens=40, forward=fwd, prefill_rows=rows,
                                                             kv_cache=kv))._generate_chunk(prompts))
             for rows in (0, 2, 4) for kv in ("growing", "dynamic")}
    assert len(set(texts.values())) == 1 and all(texts[(0, "growing")])
    same = torch.stack([inp[0]] * 3), torch.ones(3, P, dtype=torch.long)
    assert sim.decoder.grouped_prefill(*same, GrowingCache(P), step, lean is not None) is None  # equal lengths: one forward instead
    with pytest.raises(ValueError, match="prefill_rows"):
        SimConfig(prefill_rows=-1)


def _sft_setup(tmp_path, rows, channels, prompt=PromptConfig()):
    import pyarrow as pa

    from dreamgym_core.experience.sft_setup import SFTDataConfig, prepare_sft
    from dreamgym_core.models import TinyLlamaConfig

    said: list[str] = []
    setup = prepare_sft(pa.Table.from_pylist(rows), prompt, SFTDataConfig(vocab_size=300, task_writing_examples=0),
                        TinyLlamaConfig(hidden=32, layers=1, heads=4, kv_heads=4, intermediate=64), str(tmp_path),
                        channels=channels, log=said.append)
    return setup, said


def test_side_channels_the_adapter_lacks_are_off_in_sft_prompts_and_the_log_says_why(tmp_path):
    from dreamgym_core.envs import NO_SIDE_CHANNELS, side_channels
    from dreamgym_core.envs.lamp import LampEnv

    rows = [_scored(row("A", 0, S0, "take apple", S1), "t/a", 0.5, 0.75),
            _scored(row("A", 1, S1, "put apple in fridge", S2, 1.0, True), "t/a", 0.75, 1.0),
            _scored({**row("B", 1, S1, "put apple in fridge", S2, 1.0, True), "traj_id": "B"}, "t/b", 0.75, 1.0)]
    twc, said = _sft_setup(tmp_path / "twc", rows, side_channels("twx", "twc"))
    assert twc.prompt == PromptConfig() and not said   # twc provides them all: nothing turned off
    assert "## progress\n75\n" in twc.examples[1].prompt and "@1 in @2: belongs" in twc.examples[1].prompt
    assert "@1: carried" in twc.examples[1].prompt and twc.meta["prompt"]["progress"] is True

    none, said = _sft_setup(tmp_path / "none", rows, NO_SIDE_CHANNELS)  # the config still asks for all three
    assert not (none.prompt.progress or none.prompt.placements or none.prompt.affordances)
    assert all("## progress" not in e.prompt and "## known" not in e.prompt for e in none.examples)
    assert all("progress: =" in e.prediction for e in none.examples)   # the format's "unchanged": none predicted
    assert PromptConfig.from_meta(none.meta) == none.prompt and none.meta["placements"] == []
    assert sorted(said) == [f"M_exp prompt: {n} off: the env's adapter does not provide it (SideChannels.{n} is off)"
                            for n in ("affordances", "placements", "progress")]

    lamp, said = _sft_setup(tmp_path / "lamp", rows, LampEnv.side_channels("lamp"))  # a score, nothing of twc's
    assert lamp.prompt.progress and not (lamp.prompt.placements or lamp.prompt.affordances)
    assert "## progress\n75\n" in lamp.examples[1].prompt and "## known" not in lamp.examples[1].prompt
    assert len(said) == 2 and all("does not provide it" in s for s in said)
    unscored = [{**r, "score": 0.0} for r in rows]   # the adapter offers a score the data lacks: also said
    _, said = _sft_setup(tmp_path / "unscored", unscored, side_channels("twx", "twc"))
    assert sorted(said) == [f"M_exp prompt: {n} off: the training data carries no dense score (has_progress)"
                            for n in ("placements", "progress")]


def test_every_adapter_declares_its_side_channels_and_the_offline_path_has_none():
    import importlib

    from dreamgym_core.envs import ENV_NAMES, NO_SIDE_CHANNELS, SideChannels, side_channels

    classes = {"twx": "twx.TWXEnv", "textworld": "textworld_env.TextWorldEnv", "lamp": "lamp.LampEnv",
               "scienceworld": "scienceworld_env.ScienceWorldEnv", "alfworld": "alfworld_env.ALFWorldEnv",
               "miniwob": "miniwob_env.MiniWoBEnv"}
    assert set(classes) == set(ENV_NAMES)
    for env, where in classes.items():
        module, name = where.split(".")
        cls = getattr(importlib.import_module(f"dreamgym_core.envs.{module}"), name)
        assert "side_channels" in cls.__dict__, f"{name} must state its side channels itself"
        assert isinstance(side_channels(env), SideChannels) and side_channels(env).candidate_rule
    assert side_channels("twx", "twc") == SideChannels(True, True, True, True, True)
    assert side_channels("twx", "cookingworld").offered() == ("progress", "candidate_rule")
    assert not side_channels("alfworld").progress and not side_channels("miniwob").progress
    assert side_channels("twx", "twc", offline=True) == NO_SIDE_CHANNELS and NO_SIDE_CHANNELS.offered() == ()
    with pytest.raises(ValueError, match="unknown env 'webshop'"):
        side_channels("webshop")
