import math

import pytest
import torch

from dreamgym_core.envs import Observation, StepResult
from dreamgym_core.evaluation import wilson_interval
from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, train_tokenizer
from dreamgym_core.policy import LMPolicy, PolicyFormat, build_policy_prompt, score_candidates, set_policy_format
from dreamgym_core.rl.step import train_step
from dreamgym_core.rl.advantages import (
    Decision, choice_logprobs, decision_samples, gae_advantages, grpo_advantages,
)
from dreamgym_core.rl.trainer import PolicyTrainer, RLConfig
from dreamgym_core.rollout import RolloutConfig, rollout
from dreamgym_core.schema import Task
from dreamgym_core.state import AbstractState

FIRST = ("open box", "look around", "go north")
SECOND = ("take key", "take rock", "take box")  # equal token lengths: no candidate starts far ahead


def _state(feedback, objects):
    return AbstractState.make(feedback, "hall", objects).render()


class KeyEnv:
    """Two decisions per episode: anything at step 0, then 'take key' wins (reward 1), else lost.

    ``reward=False`` never pays (every episode lost): a constant-reward group."""

    name = "keyenv"

    def __init__(self, reward=True):
        self.reward = reward

    def reset_batch(self, tasks):
        self.t = [0] * len(tasks)
        self.live = [True] * len(tasks)
        return [Observation(_state("you enter", ["box"]), FIRST) for _ in tasks]

    def step_batch(self, actions):
        out = []
        for i, a in enumerate(actions):
            if a is None or not self.live[i]:
                out.append(None)
                continue
            self.t[i] += 1
            if self.t[i] == 1:
                out.append(StepResult(Observation(_state(f"you {a}", ["key", "rock"]), SECOND), 0.0, 0.0,
                                      False, False, False, True))
                continue
            won = self.reward and a == "take key"
            self.live[i] = False
            out.append(StepResult(Observation(_state(f"you {a}", []), ()), float(won), 0.0, True, won, not won, True))
        return out

    def close(self):
        pass


TASKS = [Task(f"k/{i}", "keyenv", "g", "train", i, f"find the key {i}") for i in range(3)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    lines = []
    for t in TASKS:
        for a in FIRST + SECOND:
            lines.append(f"Task: {t.instruction}\nDid: {a} -> you {a}\n{_state('you enter', ['box', 'key', 'rock'])}"
                         f"\nAction: {a}\n")
    return train_tokenizer(lines * 5, str(tmp_path_factory.mktemp("tok")), vocab_size=350, min_frequency=1)


def _model(tok, seed=0, hw=2):
    model = build_tiny_llama(tok, TinyLlamaConfig(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64,
                                                  max_positions=256), seed=seed)
    set_policy_format(model, PolicyFormat(history_window=hw, max_prompt_tokens=256))
    return model


def _trajs(model, tok, reward=True, group=2, seed=0):
    pol = LMPolicy(model, tok, "p")
    return rollout(KeyEnv(reward), pol, TASKS, RolloutConfig(group_size=group, max_steps=4, batch_size=8,
                                                            seed=seed))[0]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _cfg(**kw):
    base = dict(lr=1e-2, ppo_epochs=1, minibatch_size=8, kl_coef=0.0)
    return RLConfig(**{**base, **kw})


@pytest.mark.parametrize("field, value", [
    ("algorithm", "dpo"), ("kl_kind", "k4"), ("ppo_epochs", 0), ("minibatch_size", 0), ("lr", 0.0),
    ("lr", float("nan")), ("clip_ratio", -0.1), ("kl_coef", -1.0), ("gamma", 1.5), ("gae_lambda", -0.1),
    ("temperature", 0.0), ("max_grad_norm", 0.0), ("grad_accum_steps", 64),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field) as err:
        RLConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_samples_carry_the_acting_prompts_exactly(tok):
    model = _model(tok, hw=1)
    seen = []

    class Recording(LMPolicy):
        def act(self, contexts):
            seen.extend(build_policy_prompt(c, self.fmt) for c in contexts)
            return super().act(contexts)

    pol = Recording(model, tok, "p")
    trajs, _ = rollout(KeyEnv(), pol, TASKS[:2], RolloutConfig(group_size=1, max_steps=4, batch_size=1))
    assert [s.prompt for t in trajs for s in t.steps] == seen  # the transition records what the policy saw
    samples = decision_samples(trajs)
    assert [s.prompt for s in samples] == seen
    assert "Did: " in samples[1].prompt and "Did: " not in samples[0].prompt  # history is there from step 1
    assert [(s.episode, s.step, s.group) for s in samples] == [(0, 0, "k/0"), (0, 1, "k/0"), (1, 0, "k/1"),
                                                               (1, 1, "k/1")]
    # re-scoring with the acting weights reproduces the stored log-prob: ratio 1
    lp, _ = choice_logprobs(score_candidates(model, tok, [s.prompt for s in samples], [s.candidates for s in samples]),
                            [s.chosen for s in samples], 1.0)
    assert torch.allclose(lp, torch.tensor([s.old_logprob for s in samples]), atol=1e-5)


@pytest.mark.parametrize("field", ["logprob", "prompt"])
def test_samples_reject_transitions_without_what_the_policy_saw(tok, field):
    from dataclasses import replace

    traj = _trajs(_model(tok), tok, group=1)[0]
    bad = replace(traj, steps=(replace(traj.steps[0], **{field: None}),) + traj.steps[1:])
    with pytest.raises(ValueError, match="logprob/prompt"):
        decision_samples([bad])


def _d(episode, step, group, reward):
    return Decision("p", ("a", "b"), 0, -0.7, reward, False, episode, group, step)


def test_grpo_advantages_by_hand():
    # task A: returns 1, 0, 0, 1 (two decisions each, reward on the last); task B: both 0 (constant)
    samples = []
    for e, (g, r) in enumerate([("A", 1.0), ("A", 0.0), ("A", 0.0), ("A", 1.0), ("B", 0.0), ("B", 0.0)]):
        samples += [_d(e, 0, g, 0.0), _d(e, 1, g, r)]
    adv, m = grpo_advantages(samples)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel: sum (r - 0.5)^2 / (n - 1)
    want_ep = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0.0, 0.0]
    want = torch.tensor([a for a in want_ep for _ in range(2)])  # broadcast to both decisions
    assert torch.allclose(adv, want, atol=1e-5)
    assert m == {"grpo/groups": 2.0, "grpo/zero_adv_groups": 1.0}


def _gigpo_by_loop(samples, omega, gamma):
    """Plain-loop reference of GRPO + GiGPO step advantages (episode, then anchor groups)."""
    ret, length, group = {}, {}, {}
    for d in samples:
        ret[d.episode] = ret.get(d.episode, 0.0) + d.reward
        length[d.episode] = length.get(d.episode, 0) + 1
        group[d.episode] = d.group

    def norm(value, values):
        if len(values) < 2 or min(values) == max(values):
            return 0.0
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return (value - mean) / (std + 1e-6)

    out = []
    for d in samples:
        peers = [ret[e] for e in ret if group[e] == d.group]
        a = norm(ret[d.episode], peers)
        rtg = lambda x: ret[x.episode] * gamma ** (length[x.episode] - 1 - x.step)  # noqa: E731
        anchor_peers = [rtg(x) for x in samples if x.group == d.group and x.anchor == d.anchor]
        out.append(a + omega * norm(rtg(d), anchor_peers))
    return torch.tensor(out)


def test_grpo_step_advantages_match_a_plain_loop():
    from dataclasses import replace

    # task A: episode 0 wins in 2 steps, 1 loses in 3 revisiting anchor "s1", 2 wins in 3; task B constant
    plan = [("A", ["s0", "s1"], 1.0), ("A", ["s0", "s1", "s1"], 0.0), ("A", ["s0", "s2", "s1"], 1.0),
            ("B", ["s0", "s1"], 0.0), ("B", ["s0"], 0.0)]
    samples = []
    for e, (g, anchors, r) in enumerate(plan):
        for k, a in enumerate(anchors):
            samples.append(replace(_d(e, k, g, r if k == len(anchors) - 1 else 0.0), anchor=a))
    for omega, gamma in ((0.0, 1.0), (1.0, 1.0), (0.5, 0.9)):
        adv, m = grpo_advantages(samples, step_weight=omega, gamma=gamma)
        assert torch.allclose(adv, _gigpo_by_loop(samples, omega, gamma).float(), atol=1e-5), (omega, gamma)
    # same anchor, same task: the step advantage separates the won episodes' s1 from the lost one's
    adv, m = grpo_advantages(samples, step_weight=1.0, gamma=0.9)
    assert m["grpo/anchor_groups"] >= 2 and 0 < m["grpo/step_adv_nonzero"] < 1
    # anchors of task B never mix with task A's
    b_rows = [i for i, d in enumerate(samples) if d.group == "B"]
    assert all(adv[i] == 0 for i in b_rows)


def test_episode_weighting_gives_every_episode_the_same_total_weight():
    samples = []
    for e, (n, r) in enumerate([(2, 1.0), (6, 0.0), (2, 1.0), (6, 0.0)]):
        samples += [_d(e, k, "A", r if k == n - 1 else 0.0) for k in range(n)]
    plain, _ = grpo_advantages(samples)
    weighted, _ = grpo_advantages(samples, episode_weighting=True)
    per_episode = {}
    for d, a in zip(samples, weighted.tolist()):
        per_episode[d.episode] = per_episode.get(d.episode, 0.0) + a
    # unweighted, the long lost episodes outweigh the won ones 3:1; weighted, they balance
    assert sum(plain.tolist()) < -1.0
    assert abs(sum(per_episode.values())) < 1e-5
    assert abs(per_episode[0]) == pytest.approx(abs(per_episode[1]), rel=1e-5)


def test_gae_advantages_match_a_plain_loop():
    rewards = [[0.0, 0.0, 1.0], [0.0, 0.5]]
    values = [[0.5, 0.2, 0.1], [0.3, -0.2]]
    gamma, lam = 0.9, 0.8
    samples, flat_v = [], []
    for e in (1, 0):  # rows out of episode order: the mapping back must follow (episode, step)
        for k, r in enumerate(rewards[e]):
            samples.append(_d(e, k, "g", r))
            flat_v.append(values[e][k])
    adv, ret = gae_advantages(samples, torch.tensor(flat_v), gamma, lam)
    for i, s in enumerate(samples):
        r, v = rewards[s.episode], values[s.episode]
        a, nxt = 0.0, 0.0
        for t in reversed(range(s.step, len(r))):
            v_next = v[t + 1] if t + 1 < len(r) else 0.0
            a = r[t] + gamma * v_next - v[t] + gamma * lam * nxt
            nxt = a
        assert adv[i].item() == pytest.approx(a, abs=1e-6)
        assert ret[i].item() == pytest.approx(a + v[s.step], abs=1e-6)
    # by hand, episode 1: delta_1 = 0.5 - (-0.2) = 0.7; delta_0 = 0 + 0.9 * -0.2 - 0.3 = -0.48
    # A_0 = -0.48 + 0.72 * 0.7 = 0.024
    assert adv[0].item() == pytest.approx(0.024, abs=1e-6)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_one_update_changes_parameters_and_starts_at_ratio_one(tok, algorithm):
    model = _model(tok)
    trajs = _trajs(model, tok, group=4)
    trainer = PolicyTrainer(model, tok, _cfg(algorithm=algorithm, kl_coef=0.05))
    before = _params(trainer.model)
    m = trainer.update(trajs)
    assert m["adv/std"] > 0  # some task had both a win and a loss
    assert m["check/first_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["check/first_logprob_err"] < 1e-5
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    for key in ("loss/policy", "loss/value", "kl", "clip_frac", "entropy", "adv/mean", "adv/std", "tokens",
                "timing/advantages_s", "timing/update_s"):
        assert key in m and math.isfinite(m[key])
    assert m["tokens"] > 0 and m["samples"] == sum(len(t) for t in trajs)
    if algorithm == "ppo":
        assert m["check/old_logprob_err"] < 1e-5
        assert trainer.value_head.proj.bias.item() != 0.0  # the critic moved towards the returns
        assert m["loss/value"] > 0


def test_constant_reward_groups_give_zero_advantage_and_no_change(tok):
    model = _model(tok)
    trajs = _trajs(model, tok, reward=False)
    trainer = PolicyTrainer(model, tok, _cfg(algorithm="grpo", kl_coef=0.0, ppo_epochs=2))
    assert trainer.ref_model is None
    before = _params(trainer.model)
    m = trainer.update(trajs)
    assert m["grpo/zero_adv_groups"] == m["grpo/groups"] == len(TASKS)
    assert m["adv/mean"] == 0.0 and m["adv/std"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_gradient_accumulation_gives_the_full_minibatch_step(tok):
    trajs = _trajs(_model(tok), tok)
    out = []
    for accum in (1, 3):
        trainer = PolicyTrainer(_model(tok), tok, _cfg(algorithm="ppo", kl_coef=0.1, grad_accum_steps=accum,
                                                       minibatch_size=12, lr=1e-3))
        trainer.update(trajs)
        out.append(_params(trainer.model) + _params(trainer.value_head))
    # equal up to float rounding (micro-batches pad and block their matmuls differently): 1e-5 is a
    # hundredth of one AdamW step at lr 1e-3, where a wrongly accumulated gradient moves a whole step
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*out))


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_shared_decisions_give_the_same_update_with_fewer_tokens(tok, algorithm):
    """A GRPO group's rollouts all start from the task's initial state: their first decisions are
    copies. Scoring each distinct decision once must give the very same step (one minibatch, so the
    order does not matter) while running fewer tokens through the model."""
    trajs = _trajs(_model(tok), tok, group=4)
    samples = decision_samples(trajs)
    assert len({(d.prompt, d.candidates) for d in samples}) < len(samples)  # the workload has copies
    grads, metrics = [], []
    for share in (False, True):
        trainer = PolicyTrainer(_model(tok), tok, _cfg(algorithm=algorithm, kl_coef=0.1, minibatch_size=64,
                                                       lr=1e-3, share_decisions=share))
        batch = trainer.prepare(trajs)
        trainer.model.train()
        loss, _ = trainer._loss(batch, list(range(len(samples))), denom=len(samples))
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in trainer._params()]))
        trainer.optimizer.zero_grad()
        metrics.append(trainer.optimize(batch))
    # (Adam's first step is about lr * sign(grad), so compare the gradients, not the stepped weights)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    plain, shared = metrics
    assert plain["tokens"] == shared["tokens"] == plain["tokens_computed"]
    assert shared["tokens_computed"] < plain["tokens"]
    assert shared["loss/policy"] == pytest.approx(plain["loss/policy"], abs=1e-6)
    assert shared["kl"] == pytest.approx(plain["kl"], abs=1e-6)


def test_shared_decisions_shuffle_keeps_copies_together(tok):
    trajs = _trajs(_model(tok), tok, group=4)
    trainer = PolicyTrainer(_model(tok), tok, _cfg())
    samples = decision_samples(trajs)
    order = trainer._order(samples)
    assert sorted(order) == list(range(len(samples)))
    keys = [(samples[i].prompt, samples[i].candidates) for i in order]
    runs = [k for j, k in enumerate(keys) if j == 0 or k != keys[j - 1]]
    assert len(runs) == len(set(keys))  # each distinct decision appears as one contiguous run


def test_save_load_resumes_exactly(tok, tmp_path):
    trajs = _trajs(_model(tok), tok, group=1)
    cfg = _cfg(algorithm="ppo", kl_coef=0.05, ppo_epochs=2, minibatch_size=4, lr=3e-3)
    ref = _model(tok)
    straight = PolicyTrainer(_model(tok), tok, cfg, ref_model=ref)
    for _ in range(4):
        straight.update(trajs)
    first = PolicyTrainer(_model(tok), tok, cfg, ref_model=ref)
    for _ in range(2):
        first.update(trajs)
    first.save(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "model.safetensors").exists() and (tmp_path / "ckpt" / "trainer.json").exists()
    with pytest.raises(ValueError, match="ref_model"):
        PolicyTrainer.load(str(tmp_path / "ckpt"), cfg)
    resumed = PolicyTrainer.load(str(tmp_path / "ckpt"), cfg, ref_model=ref)
    assert resumed.updates == 2 and resumed.optimizer_steps == first.optimizer_steps
    for _ in range(2):
        resumed.update(trajs)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(straight.value_head.proj.weight, resumed.value_head.proj.weight)


def _p_key(model, tok):
    """pi(take key) at the second decision of every task, after 'open box'."""
    samples = [s for s in decision_samples(_trajs(model, tok, group=1, seed=99)) if s.step == 1]
    prompts = [s.prompt.replace(s.prompt.split("Did: ")[1].split(" ->")[0], "open box") for s in samples]
    scores = score_candidates(model, tok, prompts, [SECOND] * len(prompts))
    return torch.stack([torch.softmax(s, 0)[0] for s in scores]).mean().item()


def test_grpo_raises_the_probability_of_the_rewarded_action(tok):
    trainer = PolicyTrainer(_model(tok), tok, _cfg(algorithm="grpo", lr=3e-3, kl_coef=0.01, ppo_epochs=2,
                                                   minibatch_size=12))
    p0 = _p_key(trainer.model, tok)
    successes = []
    for it in range(6):
        m = train_step(KeyEnv(), trainer, TASKS, RolloutConfig(group_size=4, max_steps=4, batch_size=12, seed=it),
                       policy_name=f"p{it}").metrics
        successes.append(m["rollout/success_rate"])
        assert {"timing/rollout_s", "timing/advantages_s", "timing/update_s"} <= set(m)
    p1 = _p_key(trainer.model, tok)
    assert p0 < 0.5 and p1 > p0 + 0.3, (p0, p1)
    assert successes[-1] > successes[0]


def test_the_checkpoint_records_the_prompt_format_and_acting_with_another_raises(tok, tmp_path):
    """policy_init.history_window 8 travels in the checkpoint; acting with 2 is an error, not a drift."""
    from dreamgym_core.models import load_checkpoint, save_checkpoint

    save_checkpoint(_model(tok, hw=8), tok, str(tmp_path / "sft"), {"kind": "policy"})
    model, _, meta = load_checkpoint(str(tmp_path / "sft"))
    assert meta["policy_format"] == {"history_window": 8, "max_prompt_tokens": 256}
    assert LMPolicy(model, tok, "p").fmt.history_window == 8
    with pytest.raises(ValueError, match="history_window=8"):
        LMPolicy(model, tok, "p", fmt=PolicyFormat(history_window=2))
    trainer = PolicyTrainer(model, tok, _cfg())
    trainer.save(str(tmp_path / "k1"))  # the trainer's checkpoint keeps the format it was given
    assert PolicyTrainer.load(str(tmp_path / "k1"), _cfg()).fmt == PolicyFormat(history_window=8)
    step = train_step(KeyEnv(), trainer, TASKS[:1], RolloutConfig(max_steps=4), policy_name="p")
    assert step.trajectories[0].steps[1].prompt.count("Did: ") == 1  # one earlier step: all of it is shown


def test_a_model_without_a_format_cannot_act(tok):
    model = build_tiny_llama(tok, TinyLlamaConfig(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64))
    with pytest.raises(ValueError, match="PolicyFormat"):
        LMPolicy(model, tok, "p")


def test_progress_reward_adds_the_score_increments(tok):
    """r_t + w * (score_t - score_{t-1}) from score 0, against a plain loop; a score that falls costs."""
    from dataclasses import replace

    traj = _trajs(_model(tok), tok, group=1)[0]
    scores = [0.5, 0.25, 1.0, 1.0][:len(traj.steps)]
    traj = replace(traj, steps=tuple(replace(s, score=sc) for s, sc in zip(traj.steps, scores)))
    plain = decision_samples([traj])
    shaped = decision_samples([traj], progress_weight=2.0)
    expected, last = [], 0.0
    for s in traj.steps:
        expected.append(s.reward + 2.0 * (s.score - last))
        last = s.score
    assert [d.reward for d in shaped] == pytest.approx(expected)
    assert [d.reward for d in plain] == [s.reward for s in traj.steps]
    assert shaped[1].reward < plain[1].reward  # 0.5 -> 0.25: the step that lowered the score is charged
    with pytest.raises(ValueError, match="progress_reward"):
        RLConfig(progress_reward=-1.0)
