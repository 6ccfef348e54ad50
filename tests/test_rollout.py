from dataclasses import replace

import pytest

from dreamgym_core.envs import EnvSpec, Observation, SerialBatchEnv, StepResult, make_env
from dreamgym_core.evaluation import paired_comparison, sim_real_pairs, summarize, wilson_interval
from dreamgym_core.rollout import ActionChoice, RandomPolicy, RolloutConfig, rollout
from dreamgym_core.schema import Task
from dreamgym_core.state import AbstractState


def _state(n):
    return AbstractState.make(f"step {n}", "room", [f"counter: {n}"]).render()


class CountdownEnv:
    """Scripted BatchEnv: an episode is won after `need` steps of 'go', 'stop' ends it lost."""

    name = "countdown"

    def __init__(self, need=3):
        self.need = need

    def reset_batch(self, tasks):
        self.t = [0] * len(tasks)
        self.live = [True] * len(tasks)
        return [Observation(_state(0), ("go", "stop")) for _ in tasks]

    def step_batch(self, actions):
        out = []
        for i, a in enumerate(actions):
            if a is None or not self.live[i]:
                out.append(None)
                continue
            self.t[i] += 1
            won = a == "go" and self.t[i] >= self.need
            lost = a == "stop"
            done = won or lost
            self.live[i] = not done
            out.append(StepResult(Observation(_state(self.t[i]), ("go", "stop")), float(won), 0.0, done, won, lost, True))
        return out

    def close(self):
        pass


class Always:
    def __init__(self, action):
        self.name, self.action = f"always-{action}", action

    def act(self, contexts):
        return [ActionChoice(self.action, -0.5) for _ in contexts]


TASKS = [Task(f"t/{i}", "countdown", "g", "train", i, "count") for i in range(3)]


def test_groups_rewards_and_history():
    trajs, stats = rollout(CountdownEnv(), Always("go"), TASKS, RolloutConfig(group_size=2, batch_size=4, max_steps=10))
    assert len(trajs) == 6 and len({t.traj_id for t in trajs}) == 6
    assert all(t.won and len(t) == 3 and t.ret == 1.0 for t in trajs)
    assert [s.reward for s in trajs[0].steps] == [0.0, 0.0, 1.0]
    assert all(s.logprob == -0.5 and s.policy == "always-go" and s.action_kind == "policy" for t in trajs for s in t.steps)
    assert stats.per_task == {f"t/{i}": [1.0, 1.0] for i in range(3)}


def test_transitions_keep_what_the_policy_saw():
    """The policy gets every earlier (action, feedback) pair; its prompt lands on the transition, and
    ``episode_contexts`` rebuilds the same contexts from the stored episode (as BC does)."""
    from dreamgym_core.rollout import episode_contexts

    seen = []

    class Prompting(Always):
        def act(self, contexts):
            seen.extend(contexts)
            return [ActionChoice(self.action, -0.5, prompt=f"p{len(c.history)}") for c in contexts]

    trajs, _ = rollout(CountdownEnv(need=4), Prompting("go"), TASKS[:1], RolloutConfig(max_steps=10))
    assert [len(c.history) for c in seen] == [0, 1, 2, 3]
    assert seen[3].history == (("go", "step 1"), ("go", "step 2"), ("go", "step 3"))
    assert [s.prompt for s in trajs[0].steps] == ["p0", "p1", "p2", "p3"]
    assert [(c.state, c.candidates, c.history) for c in episode_contexts(trajs[0])] == \
        [(c.state, c.candidates, c.history) for c in seen]
    plain, _ = rollout(CountdownEnv(), Always("go"), TASKS[:1], RolloutConfig())
    assert plain[0].steps[0].prompt is None  # a policy without a prompt records none


def test_step_cap_closes_episodes_as_truncated_failures():
    trajs, stats = rollout(CountdownEnv(need=99), Always("go"), TASKS[:1], RolloutConfig(max_steps=4))
    assert len(trajs[0]) == 4 and trajs[0].truncated and trajs[0].steps[-1].done and not trajs[0].won
    assert stats.truncated == 1


@pytest.mark.parametrize("budget", [0, 1, 5, 7, 17])
def test_budget_is_exact(budget):
    trajs, stats = rollout(CountdownEnv(need=4), Always("go"), TASKS, RolloutConfig(group_size=3, batch_size=2, budget=budget))
    assert stats.transitions == sum(len(t) for t in trajs) == min(budget, 3 * 3 * 4)
    assert stats.budget_exhausted == (budget < 36)


def test_random_policy_in_real_twx_is_reproducible_across_batch_sizes():
    env = SerialBatchEnv(lambda: make_env(EnvSpec()), max_engines=4)
    try:
        tasks = make_env(EnvSpec()).tasks("train", 3)
        a, sa = rollout(env, RandomPolicy(), tasks, RolloutConfig(group_size=2, batch_size=4, max_steps=8, seed=3))
        b, _ = rollout(env, RandomPolicy(), tasks, RolloutConfig(group_size=2, batch_size=2, max_steps=8, seed=3))
        assert [t.steps for t in a] == [t.steps for t in b]
        assert sa.episodes == 6 and all(s.source == "real" for t in a for s in t.steps)
        for t in a:  # states chain and history feedback is real
            for x, y in zip(t.steps, t.steps[1:]):
                assert x.next_state == y.state
    finally:
        env.close()


class ReversedCountdown(CountdownEnv):
    """The same game, candidates listed in the other order (as M_exp and the real twx engine do)."""

    def reset_batch(self, tasks):
        return [Observation(o.state, o.candidates[::-1]) for o in super().reset_batch(tasks)]

    def step_batch(self, actions):
        return [r if r is None else replace(r, obs=Observation(r.obs.state, r.obs.candidates[::-1]))
                for r in super().step_batch(actions)]


def test_random_policy_draw_ignores_candidate_order():
    from dreamgym_core.rollout import PolicyContext

    cands = tuple(f"a{i}" for i in range(7))
    pol = RandomPolicy()
    for seed in range(50):
        ctx = [PolicyContext("g", "s", cands, seed=seed), PolicyContext("g", "s", cands[::-1], seed=seed)]
        a, b = pol.act(ctx)
        assert a.action == b.action
    assert len({pol.act([PolicyContext("g", "s", cands, seed=k)])[0].action for k in range(50)}) == 7


def test_sim_real_pairs_pair_the_same_episodes():
    cfg = RolloutConfig(group_size=20, batch_size=8, max_steps=6, seed=1)
    real, _ = rollout(CountdownEnv(need=3), RandomPolicy(), TASKS, cfg)
    same, _ = rollout(ReversedCountdown(need=3), RandomPolicy(), TASKS, cfg)
    p = sim_real_pairs(real, same)  # same game, other candidate order: every pair identical
    assert p.pairs == 60 and p.same_actions == 1.0 and p.sim_only == p.real_only == 0
    assert p.both == sum(t.won for t in real) and p.both + p.neither == 60
    assert p.mean_agree_steps == pytest.approx(sum(len(t) for t in real) / 60)
    easier, _ = rollout(ReversedCountdown(need=2), RandomPolicy(), TASKS, cfg)
    q = sim_real_pairs(real, easier)  # a simulator that hands out wins one step early
    by_id = {t.traj_id: t.won for t in real}
    want = {"both": 0, "sim_only": 0, "real_only": 0, "neither": 0}
    for t in easier:  # plain-loop reference
        key = ("both" if by_id[t.traj_id] else "sim_only") if t.won else ("real_only" if by_id[t.traj_id] else "neither")
        want[key] += 1
    assert {k: getattr(q, k) for k in want} == want and q.real_only == 0 and q.sim_only > 0
    gap = summarize(easier).success_rate - summarize(real).success_rate
    assert (q.sim_only - q.real_only) / q.pairs == pytest.approx(gap)
    with pytest.raises(ValueError, match="no real episode"):
        sim_real_pairs(real[1:], easier)
    with pytest.raises(ValueError, match="repeats"):
        sim_real_pairs(real + real[:1], easier)


def test_wilson_interval_matches_published_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    for n in range(1, 60):  # the interval always contains the observed rate (rounding at 0 and n)
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def _episodes(wins):
    from types import SimpleNamespace

    return [SimpleNamespace(task=SimpleNamespace(task_id=f"t{i}"), won=w) for i, w in enumerate(wins)]


def test_paired_comparison_is_the_exact_mcnemar_test():
    # 9 tasks only B won, 1 only A won, 5 both, 5 neither: p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = _episodes([1] + [0] * 9 + [1] * 5 + [0] * 5)
    b = _episodes([0] + [1] * 9 + [1] * 5 + [0] * 5)
    c = paired_comparison(a, b)
    assert (c.tasks, c.better, c.worse) == (20, 9, 1) and c.p_value == pytest.approx(22 / 1024)
    assert paired_comparison(b, a).p_value == pytest.approx(22 / 1024)
    assert paired_comparison(a, a).p_value == 1.0  # no discordant task
    even = paired_comparison(_episodes([1, 0]), _episodes([0, 1]))
    assert (even.better, even.worse, even.p_value) == (1, 1, 1.0)
    with pytest.raises(ValueError, match="different tasks"):
        paired_comparison(a, b[:-1])
    with pytest.raises(ValueError, match="repeats"):
        paired_comparison(a + a[:1], b + b[:1])


def test_summarize():
    trajs, _ = rollout(CountdownEnv(need=2), Always("go"), TASKS, RolloutConfig(max_steps=5))
    lost, _ = rollout(CountdownEnv(need=2), Always("stop"), TASKS[:1], RolloutConfig(max_steps=5))
    s = summarize(trajs + lost)
    assert s.episodes == 4 and s.success_rate == 0.75 and s.mean_steps == (2 * 3 + 1) / 4
    assert s.ci_low < 0.75 < s.ci_high
