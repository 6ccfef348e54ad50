"""The RL maths of DreamGym's policy learning, as pure tensor functions.

What this implements
--------------------
- ``compute_gae``: generalized advantage estimation (Schulman et al. 2016, "High-Dimensional
  Continuous Control Using Generalized Advantage Estimation") for PPO, paper §4.4.
- ``group_normalized_advantages``: GRPO's critic-free advantage (Shao et al. 2024,
  "DeepSeekMath"), (r_i - mean_group) / (std_group + eps), paper §4.4.
- ``ppo_clip_loss`` / ``value_loss``: the clipped surrogate and the clipped value loss of PPO
  (Schulman et al. 2017, "Proximal Policy Optimization Algorithms").
- ``kl_penalty``: Schulman's k1 / k2 / k3 estimators of KL(pi || pi_ref) from samples of pi
  ("Approximating KL Divergence", 2020); GRPO adds k3 to the loss.
- ``reward_variance``: the curriculum's task score, paper Eq. 7,
  V_tau = (1/n) sum_i (r_i - mean r)^2 over the n rollouts of task tau (the GRPO group).
- ``masked_mean`` / ``masked_whiten`` / ``aggregate_loss``: reductions over policy tokens.

Conventions
-----------
Every function takes and returns tensors; none reads a config or touches I/O. ``B`` is the number
of trajectories, ``T`` their padded token length, ``N`` a flat number of scored rollouts. A
``mask (B, T)`` (bool or 0/1) marks the tokens the policy generated; everything else (prompt,
environment-written observations, padding) is mask 0 and never receives gradient. Losses are to
be *minimised*; advantages are "higher is better". Metrics come back as detached 0-dim tensors so
nothing here forces a device sync; the caller calls ``.item()`` when it logs.

Where this departs from the paper and why
-----------------------------------------
- Token level, multi-turn. The paper writes PPO/GRPO over turns (one action per step). We
  train a causal LM, so advantages and ratios are per token. A turn's reward sits on the *last
  action token of that turn*, and GAE runs over the masked-in tokens only, skipping
  environment-written tokens (see ``compute_gae``). With gamma = lam = 1 (the usual LLM
  setting) this equals the turn-level return; with gamma < 1 the discount is per policy token,
  not per turn.
- GRPO std uses Bessel's correction (like TRL and verl, so our numbers compare with them), but a
  constant-reward group gets exactly 0 advantage and a singleton group gets 0 (no signal) rather
  than its raw score. Eq. 7's variance stays the population variance, as the paper writes it.
- Log-ratios are clamped to [-20, 20] before ``exp`` (as verl does): a ratio of e^20 is already
  absurd, and an overflow would turn a masked-out token's zero gradient into NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
KLKind = Literal["k1", "k2", "k3"]

_LOG_RATIO_CLAMP = 20.0


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch, all must be equal: {shapes}")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set.

    x: (...), mask: same shape as x (bool or 0/1). ``dim=None`` reduces everything to a 0-dim
    tensor, otherwise that dimension is reduced. An empty selection gives 0, not NaN, so a
    minibatch with no policy tokens contributes nothing instead of poisoning the update.
    """
    m = mask.bool()
    masked = torch.where(m, x, torch.zeros_like(x))
    if dim is None:
        return masked.sum() / m.sum().clamp_min(1).to(x.dtype)
    return masked.sum(dim) / m.sum(dim).clamp_min(1).to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) over the masked positions; masked-out positions become 0.

    x: (B, T), mask: (B, T) -> (B, T). Population statistics over all masked tokens of the batch
    (PPO's usual advantage normalization).
    """
    _check_shapes(x=x, mask=mask)
    m = mask.bool()
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    return torch.where(m, (x - mean) / (var.sqrt() + eps), torch.zeros_like(x))


def aggregate_loss(loss_mat: Tensor, mask: Tensor, mode: AggMode = "token-mean",
                   denom: float | Tensor | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar.

    loss_mat: (B, T), mask: (B, T) -> 0-dim tensor. Modes:

    - ``token-mean``: sum over all masked tokens / number of masked tokens. Every token weighs
      the same, so long trajectories weigh more (DAPO's choice).
    - ``seq-mean-token-sum``: sum over each sequence's masked tokens, mean over sequences.
    - ``seq-mean-token-mean``: mean over each sequence's masked tokens, mean over sequences
      (the original GRPO). Sequences with no masked token are left out of the sequence mean.

    ``denom`` replaces the count in the final division (tokens for ``token-mean``, sequences
    otherwise). Pass the *global* count when a batch is split into micro-batches for gradient
    accumulation: summing the micro-batch losses then gives exactly the full-batch loss.
    """
    _check_shapes(loss_mat=loss_mat, mask=mask)
    m = mask.bool()
    masked = torch.where(m, loss_mat, torch.zeros_like(loss_mat))
    match mode:
        case "token-mean":
            total, count = masked.sum(), m.sum()
        case "seq-mean-token-sum":
            total, count = masked.sum(), m.any(dim=-1).sum()
        case "seq-mean-token-mean":
            per_seq = masked.sum(dim=-1) / m.sum(dim=-1).clamp_min(1).to(loss_mat.dtype)
            total, count = per_seq.sum(), m.any(dim=-1).sum()
        case _:
            raise ValueError(f"unknown loss aggregation mode {mode!r}; use one of "
                             "'token-mean', 'seq-mean-token-sum', 'seq-mean-token-mean'")
    if denom is None:
        denom = count.clamp_min(1).to(loss_mat.dtype)
    return total / denom


@torch.no_grad()
def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
                lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """GAE advantages and value targets over the policy tokens of multi-turn trajectories.

    rewards: (B, T), values: (B, T), mask: (B, T) -> (advantages (B, T), returns (B, T)).

    One trajectory per row; ``mask`` marks the tokens the policy generated. GAE runs over the
    subsequence of masked-in tokens only, as if the environment-written tokens (and padding, left
    or right) were not there:

        for consecutive masked-in positions t < t' (t' = next masked-in position after t)
            delta_t = r_t + gamma * V_t' - V_t          (V_t' = 0 after the last one: terminal)
            A_t     = delta_t + gamma * lam * A_t'
        returns_t = A_t + V_t

    So a turn's value bootstraps from the first action token of the next turn, never from an
    observation token or padding; values at mask-0 positions are ignored. The trajectory's end is
    terminal (no bootstrap past the last policy token), which fits outcome rewards; a truncated
    episode is treated as ended.

    Reward placement: put each turn's reward on the *last action token of that turn* (the outcome
    reward on the last action token of the episode). A nonzero reward at a mask-0 position would be
    silently lost, so it raises ``ValueError``. Advantages and returns are 0 where mask is 0.
    Inputs are constants here (no autograd through the targets).
    """
    _check_shapes(rewards=rewards, values=values, mask=mask)
    m = mask.bool()
    if torch.any((rewards != 0) & ~m):
        raise ValueError("compute_gae: nonzero reward at a mask-0 position; put each turn's reward "
                         "on the last policy token of that turn")
    B, T = rewards.shape
    next_value = values.new_zeros(B)
    next_adv = values.new_zeros(B)
    advantages = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # A mask-0 token passes the running (value, advantage) through unchanged: it is skipped.
        next_adv = torch.where(m[:, t], adv_t, next_adv)
        next_value = torch.where(m[:, t], values[:, t], next_value)
        advantages.append(torch.where(m[:, t], adv_t, torch.zeros_like(adv_t)))
    adv = torch.stack(advantages[::-1], dim=1)
    returns = torch.where(m, adv + values, torch.zeros_like(adv))
    return adv, returns


def _group_stats(x: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(unique_ids (G,), inverse (N,), counts (G,), means (G,), constant (G,) bool) of x (N,)."""
    if x.dim() != 1 or group_ids.shape != x.shape:
        raise ValueError(f"expected 1-D scores and group_ids of equal length, got "
                         f"{tuple(x.shape)} and {tuple(group_ids.shape)}")
    uniq, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    G = uniq.numel()
    sums = x.new_zeros(G).index_add_(0, inverse, x)
    means = sums / counts.to(x.dtype)
    # min == max detects a constant group exactly; (r - mean) alone can leave rounding residue.
    gmin = x.new_full((G,), float("inf")).scatter_reduce(0, inverse, x, "amin")
    gmax = x.new_full((G,), float("-inf")).scatter_reduce(0, inverse, x, "amax")
    return uniq, inverse, counts, means, gmin == gmax


def group_normalized_advantages(scores: Tensor, group_ids: Tensor, eps: float = 1e-6,
                                normalize_std: bool = True) -> Tensor:
    """GRPO advantages: each rollout's score against its group's.

    scores: (N,) float, group_ids: (N,) long (any ids; rollouts of one task share one) -> (N,).

        A_i = (r_i - mean_g) / (std_g + eps)    (std with Bessel's correction; off: no division)

    A constant-reward group (including a singleton) gets exactly 0: no rollout is better than
    another, so it carries no signal. Broadcast A_i over the tokens of rollout i (times its mask)
    for the token-level loss.
    """
    _, inverse, counts, means, constant = _group_stats(scores, group_ids)
    centered = scores - means[inverse]
    if normalize_std:
        sq = scores.new_zeros(counts.shape).index_add_(0, inverse, centered ** 2)
        std = (sq / (counts - 1).clamp_min(1).to(scores.dtype)).sqrt()
        centered = centered / (std[inverse] + eps)
    return torch.where(constant[inverse], torch.zeros_like(centered), centered)


def reward_variance(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group population reward variance, paper Eq. 7: V_tau = (1/n) sum_i (r_i - mean r)^2.

    rewards: (N,), group_ids: (N,) long -> (unique_group_ids (G,) sorted, variances (G,)).
    A constant group gives exactly 0; binary rewards split 50/50 give 0.25 (the maximum).
    """
    uniq, inverse, counts, means, constant = _group_stats(rewards, group_ids)
    sq = rewards.new_zeros(counts.shape).index_add_(0, inverse, (rewards - means[inverse]) ** 2)
    var = sq / counts.to(rewards.dtype)
    return uniq, torch.where(constant, torch.zeros_like(var), var)


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                  clip_eps: float = 0.2, clip_eps_high: float | None = None,
                  agg: AggMode = "token-mean", denom: float | Tensor | None = None,
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, per token, to minimise.

    logprobs: (B, T) (with grad), old_logprobs: (B, T), advantages: (B, T), mask: (B, T)
    -> (loss 0-dim, {"clipfrac", "approx_kl"} detached 0-dim).

        ratio = exp(logprobs - old_logprobs)
        loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))

    ``clip_eps_high`` (default: ``clip_eps``) allows an asymmetric "clip-higher" range (DAPO).
    A token whose ratio already left the range in the advantage's direction gets zero gradient.
    ``agg`` / ``denom``: see ``aggregate_loss``. ``clipfrac`` is the share of policy tokens where
    the clipped term is active; ``approx_kl`` is the k3 estimate of KL(old || new).
    """
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    m = mask.bool()
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    # Zero the log-ratio off-mask *before* exp so no inf/NaN can reach masked tokens' gradient.
    log_ratio = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + hi)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), m, agg, denom)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), m),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, m),
        }
    return loss, metrics


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: float | None = 0.2, agg: AggMode = "token-mean",
               denom: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss, to minimise.

    values: (B, T) (with grad), old_values: (B, T), returns: (B, T), mask: (B, T)
    -> (loss 0-dim, {"clipfrac"} detached 0-dim).

        v_clip = old_values + clip(values - old_values, -clip, clip)
        loss_t = 0.5 * max((values - returns)^2, (v_clip - returns)^2)

    The max is pessimistic, as in the PPO2 reference code. ``clip=None``: plain 0.5 * MSE.
    """
    _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    m = mask.bool()
    err = (values - returns) ** 2
    if clip is None:
        loss_mat, clipfrac = 0.5 * err, values.new_zeros(())
    else:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        err_clip = (v_clip - returns) ** 2
        loss_mat = 0.5 * torch.maximum(err, err_clip)
        clipfrac = masked_mean((err_clip > err).to(values.dtype), m).detach()
    return aggregate_loss(loss_mat, m, agg, denom), {"clipfrac": clipfrac}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi.

    logprobs: (B, T), ref_logprobs: (B, T) -> (B, T). With d = ref_logprobs - logprobs:

    - ``k1`` = -d: unbiased, high variance, can be negative (the classic PPO-RLHF reward penalty).
    - ``k2`` = d^2 / 2: biased, low variance, >= 0.
    - ``k3`` = exp(d) - d - 1: unbiased, low variance, >= 0, exactly 0 when the policies agree
      (GRPO's loss term).

    Unmasked: reduce with ``aggregate_loss`` / ``masked_mean``.
    """
    _check_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = ref_logprobs - logprobs
    match kind:
        case "k1":
            return -d
        case "k2":
            return 0.5 * d ** 2
        case "k3":
            d = d.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
            return d.exp() - d - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; use 'k1', 'k2' or 'k3'")
