"""Pure RL maths: hand-worked numbers, plain-loop references, invariants, gradients."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dreamgym_core.rl.core_algos import (
    aggregate_loss,
    compute_gae,
    group_normalized_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_clip_loss,
    reward_variance,
    value_loss,
)

D = torch.float64


# ---------------------------------------------------------------- plain-loop references

def gae_reference(rewards, values, mask, gamma, lam):
    """Scalar GAE per row over the list of masked-in positions; everything else 0."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b][t]]
        a_next, v_next = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b][t] + gamma * v_next - values[b][t]
            a_next = delta + gamma * lam * a_next
            v_next = values[b][t]
            adv[b][t] = a_next
            ret[b][t] = a_next + values[b][t]
    return adv, ret


def groups_of(scores, ids):
    groups = {}
    for s, g in zip(scores, ids):
        groups.setdefault(g, []).append(s)
    return groups


def grpo_reference(scores, ids, eps, normalize_std):
    groups = groups_of(scores, ids)
    out = []
    for s, g in zip(scores, ids):
        rs = groups[g]
        if len(rs) == 1 or max(rs) == min(rs):
            out.append(0.0)
            continue
        a = s - statistics.fmean(rs)
        out.append(a / (statistics.stdev(rs) + eps) if normalize_std else a)
    return out


def variance_reference(rewards, ids):
    groups = groups_of(rewards, ids)
    keys = sorted(groups)
    return keys, [statistics.pvariance(groups[k]) for k in keys]


def random_batch(seed, B=5, T=12):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g, dtype=D)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0] = False  # an all-padding row
    rewards = torch.where(mask, torch.randn(B, T, generator=g, dtype=D), torch.zeros(B, T, dtype=D))
    return rewards, values, mask


# ---------------------------------------------------------------- GAE

def test_gae_hand_worked_example():
    # T=3, gamma=0.9, lam=0.8, outcome reward 1 on the last token, V = [0.5, 0.6, 0.7]:
    #   delta2 = 1 + 0         - 0.7 = 0.30   A2 = 0.30
    #   delta1 = 0 + 0.9 * 0.7 - 0.6 = 0.03   A1 = 0.03 + 0.72 * 0.30  = 0.246
    #   delta0 = 0 + 0.9 * 0.6 - 0.5 = 0.04   A0 = 0.04 + 0.72 * 0.246 = 0.21712
    #   returns = A + V = [0.71712, 0.846, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=D)
    values = torch.tensor([[0.5, 0.6, 0.7]], dtype=D)
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.21712, 0.246, 0.3]], dtype=D))
    assert torch.allclose(ret, torch.tensor([[0.71712, 0.846, 1.0]], dtype=D))


def test_gae_multi_turn_skips_environment_tokens():
    # Turn 1 = tokens 0,1 (reward 0 on token 1, its last action token); tokens 2,3 are the
    # environment's observation (mask 0, garbage values); turn 2 = token 4 with the outcome reward;
    # token 5 is padding. Same numbers as the hand example over the masked-in tokens [0, 1, 4].
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]], dtype=D)
    values = torch.tensor([[0.5, 0.6, 9.0, -9.0, 0.7, 5.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.21712, 0.246, 0, 0, 0.3, 0]], dtype=D))
    assert torch.allclose(ret, torch.tensor([[0.71712, 0.846, 0, 0, 1.0, 0]], dtype=D))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_loop_reference(seed, gamma, lam):
    rewards, values, mask = random_batch(seed)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert torch.allclose(adv, torch.tensor(ref_adv, dtype=D))
    assert torch.allclose(ret, torch.tensor(ref_ret, dtype=D))


def test_gae_values_at_masked_positions_do_not_matter():
    rewards, values, mask = random_batch(7)
    noisy = torch.where(mask, values, values + 100 * torch.randn_like(values))
    for a, b in zip(compute_gae(rewards, values, mask, 0.9, 0.95),
                    compute_gae(rewards, noisy, mask, 0.9, 0.95)):
        assert torch.equal(a, b)


def test_gae_gamma_lam_one_gives_monte_carlo_returns():
    rewards, values, mask = random_batch(3)
    _, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    # return_t = sum of rewards from t to the end of the row, on policy tokens
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(ret, torch.where(mask, reward_to_go, torch.zeros_like(ret)))


def test_gae_rejects_reward_on_environment_token():
    mask = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="last policy token"):
        compute_gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.zeros(1, 3), mask)


# ---------------------------------------------------------------- GRPO advantages

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_normalized_matches_loop_reference(seed, normalize_std):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (40,), generator=g) * 7 + 3  # sparse, non-contiguous ids
    scores = torch.randint(0, 4, (40,), generator=g).to(D) / 3  # ties and constant groups happen
    out = group_normalized_advantages(scores, ids, eps=1e-6, normalize_std=normalize_std)
    ref = grpo_reference(scores.tolist(), ids.tolist(), 1e-6, normalize_std)
    assert torch.allclose(out, torch.tensor(ref, dtype=D))


def test_group_normalized_hand_example():
    # group 0: [1, 0] -> mean 0.5, stdev (Bessel) sqrt(0.5); group 1: constant; group 2: singleton
    scores = torch.tensor([1.0, 0.0, 0.1, 0.1, 0.1, 5.0], dtype=D)
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    out = group_normalized_advantages(scores, ids, eps=0.0)
    s = 0.5 / math.sqrt(0.5)
    assert torch.allclose(out, torch.tensor([s, -s, 0, 0, 0, 0], dtype=D))
    assert torch.equal(out[2:], torch.zeros(4, dtype=D))  # exactly zero, not ~1e-17


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 4), st.floats(-10, 10, allow_nan=False)),
                     min_size=1, max_size=30))
def test_group_advantages_sum_to_zero_per_group(data):
    ids = torch.tensor([g for g, _ in data])
    scores = torch.tensor([s for _, s in data], dtype=D)
    for normalize_std in (True, False):
        adv = group_normalized_advantages(scores, ids, normalize_std=normalize_std)
        for gid in ids.unique():
            assert abs(adv[ids == gid].sum().item()) < 1e-8


# ---------------------------------------------------------------- reward variance (Eq. 7)

def test_reward_variance_constant_and_binary_split():
    # 3 x 0.1 in float64: the naive mean is 0.10000000000000002, so only an exact constant check
    # gives 0.0 (not ~1e-34) for group 5.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=D)
    ids = torch.tensor([5, 5, 5, 9, 9, 9, 9, 2, 2, 2, 2])
    uniq, var = reward_variance(rewards, ids)
    assert uniq.tolist() == [2, 5, 9]
    assert var.tolist() == [0.0, 0.0, 0.25]


@pytest.mark.parametrize("seed", range(5))
def test_reward_variance_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, (50,), generator=g)
    rewards = torch.rand(50, generator=g, dtype=D)
    uniq, var = reward_variance(rewards, ids)
    keys, ref = variance_reference(rewards.tolist(), ids.tolist())
    assert uniq.tolist() == keys
    assert torch.allclose(var, torch.tensor(ref, dtype=D))


@settings(max_examples=60, deadline=None)
@given(rs=st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=20))
def test_binary_reward_variance_is_p_times_one_minus_p(rs):
    _, var = reward_variance(torch.tensor(rs, dtype=D), torch.zeros(len(rs), dtype=torch.long))
    p = sum(rs) / len(rs)
    assert var.item() == pytest.approx(p * (1 - p), abs=1e-12)
    assert 0.0 <= var.item() <= 0.25


# ---------------------------------------------------------------- PPO losses

def test_ppo_loss_masked_tokens_get_no_gradient():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    logprobs = torch.randn(2, 6, generator=g, dtype=D).requires_grad_()
    old = logprobs.detach() + 0.1 * torch.randn(2, 6, generator=g, dtype=D)
    adv = torch.randn(2, 6, generator=g, dtype=D)
    # garbage at padding / environment tokens must not leak inf/NaN into the gradient
    old[0, 2], old[1, 5], adv[0, 3] = -1e4, float("nan"), float("nan")
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        logprobs.grad = None
        loss, _ = ppo_clip_loss(logprobs, old, adv, mask, agg=agg)
        loss.backward()
        assert torch.all(logprobs.grad[~mask] == 0)
        assert torch.all(torch.isfinite(logprobs.grad))
        assert torch.any(logprobs.grad[mask] != 0)


def test_ppo_loss_on_policy_is_minus_mean_advantage():
    # ratio = 1: loss = -token-mean(A), d loss / d logprob_t = -A_t / n_tokens
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0]], dtype=D)
    lp = torch.zeros(2, 3, dtype=D, requires_grad=True)
    loss, metrics = ppo_clip_loss(lp, lp.detach(), adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)
    assert torch.allclose(lp.grad, torch.tensor([[-1 / 3, -2 / 3, 0], [-1.0, 0, 0]], dtype=D))
    assert metrics["clipfrac"].item() == 0.0 and metrics["approx_kl"].item() == 0.0


@pytest.mark.parametrize("log_ratio,adv,clip_eps_high,zero_grad", [
    (math.log(1.5), 1.0, None, True),    # above 1+eps, A > 0: clipped, no push further up
    (math.log(0.5), -1.0, None, True),   # below 1-eps, A < 0: clipped, no push further down
    (math.log(0.5), 1.0, None, False),   # below range, A > 0: pessimistic bound keeps gradient
    (math.log(1.5), -1.0, None, False),  # above range, A < 0: pessimistic bound keeps gradient
    (math.log(1.1), 1.0, None, False),   # inside the range
    (math.log(1.25), 1.0, None, True),   # 1.25 > 1.2 ...
    (math.log(1.25), 1.0, 0.28, False),  # ... but inside a clip-higher range of 1.28
])
def test_ppo_clipping_gradient(log_ratio, adv, clip_eps_high, zero_grad):
    lp = torch.tensor([[log_ratio]], dtype=D, requires_grad=True)
    loss, metrics = ppo_clip_loss(lp, torch.zeros(1, 1, dtype=D), torch.tensor([[adv]], dtype=D),
                                  torch.ones(1, 1, dtype=torch.bool), clip_eps=0.2,
                                  clip_eps_high=clip_eps_high)
    loss.backward()
    assert (lp.grad.item() == 0.0) is zero_grad
    assert metrics["clipfrac"].item() == (1.0 if zero_grad else 0.0)
    # approx_kl is k3 of KL(old || new): r - 1 - log r
    assert metrics["approx_kl"].item() == pytest.approx(math.exp(log_ratio) - 1 - log_ratio)


def test_value_loss_hand_example():
    # v=1, old=0, R=1, clip 0.2: unclipped error 0, clipped v=0.2 -> error 0.64; max -> 0.5*0.64
    # second token: v=0.1, old=0, R=1: both errors 0.81 -> 0.405. Third token masked out.
    v = torch.tensor([[1.0, 0.1, 7.0]], dtype=D, requires_grad=True)
    old = torch.zeros(1, 3, dtype=D)
    ret = torch.tensor([[1.0, 1.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, metrics = value_loss(v, old, ret, mask, clip=0.2)
    assert loss.item() == pytest.approx((0.32 + 0.405) / 2)
    assert metrics["clipfrac"].item() == 0.5
    loss.backward()
    assert v.grad[0, 0].item() == 0.0 and v.grad[0, 2].item() == 0.0 and v.grad[0, 1].item() != 0
    unclipped, _ = value_loss(v, old, ret, mask, clip=None)
    assert unclipped.item() == pytest.approx((0.0 + 0.405) / 2)


# ---------------------------------------------------------------- KL estimators

def test_kl_estimators_hand_values():
    lp = torch.tensor([[-1.0, -2.0]], dtype=D)
    ref = torch.tensor([[-2.0, -1.0]], dtype=D)  # d = ref - lp = [-1, 1]
    assert torch.allclose(kl_penalty(lp, ref, "k1"), torch.tensor([[1.0, -1.0]], dtype=D))
    assert torch.allclose(kl_penalty(lp, ref, "k2"), torch.tensor([[0.5, 0.5]], dtype=D))
    assert torch.allclose(kl_penalty(lp, ref, "k3"),
                          torch.tensor([[math.exp(-1) + 1 - 1, math.e - 1 - 1]], dtype=D))
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "k4")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-30, 0), st.floats(-30, 0)), min_size=1, max_size=16))
def test_k3_nonnegative_and_zero_when_equal(pairs):
    lp = torch.tensor([[a for a, _ in pairs]], dtype=D)
    ref = torch.tensor([[b for _, b in pairs]], dtype=D)
    assert torch.all(kl_penalty(lp, ref, "k3") >= 0)
    assert torch.equal(kl_penalty(lp, lp.clone(), "k3"), torch.zeros_like(lp))


def test_k1_and_k3_are_unbiased_kl_estimates():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=D)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=D)
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, ref = p.log()[x][None], q.log()[x][None]
    for kind in ("k1", "k3"):
        assert kl_penalty(lp, ref, kind).mean().item() == pytest.approx(true_kl, abs=5e-3)


# ---------------------------------------------------------------- reductions

def test_aggregate_loss_modes_on_unequal_lengths():
    # row 0 has 1 token (loss 4), row 1 has 3 tokens (loss 1 each), row 2 is all padding
    loss_mat = torch.tensor([[4.0, 99, 99], [1, 1, 1], [99, 99, 99]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert aggregate_loss(loss_mat, mask, "token-mean").item() == pytest.approx(7 / 4)
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-sum").item() == pytest.approx(7 / 2)
    assert aggregate_loss(loss_mat, mask, "seq-mean-token-mean").item() == pytest.approx(5 / 2)
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate_loss(loss_mat, mask, "sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_aggregate_loss_global_denominator_makes_micro_batches_add_up(mode):
    g = torch.Generator().manual_seed(1)
    loss_mat = torch.randn(6, 5, generator=g, dtype=D)
    mask = torch.rand(6, 5, generator=g) < 0.5
    mask[:, 0] = True
    full = aggregate_loss(loss_mat, mask, mode)
    denom = mask.sum() if mode == "token-mean" else mask.any(-1).sum()
    parts = sum(aggregate_loss(loss_mat[i:i + 2], mask[i:i + 2], mode, denom=denom) for i in (0, 2, 4))
    assert torch.allclose(parts, full)


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 3.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # empty selection: 0, not NaN
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(w ** 2, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(w[~mask] == 0)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
