"""Phase 2 of the policy-learning step: per-decision rows and their advantages (paper §4.4).

Pure functions, no model: ``decision_samples`` turns rollouts into one row per policy decision
(the prompt and candidates the acting policy recorded), ``grpo_advantages`` gives GRPO's
group-normalized episode return (``core_algos.group_normalized_advantages``; GiGPO's anchor-state
step term optional), ``gae_advantages`` gives PPO's GAE over the decisions of each episode
(``core_algos.compute_gae``), ``choice_logprobs`` gives log pi(chosen) = log softmax(s / T)[chosen]
over candidate sequence scores, and ``UpdateBatch`` is what phase 2 hands to the update
(``rl.trainer.PolicyTrainer``).

Where this departs from the paper and why: the paper's policies write actions token by token; the
embedded policy chooses among candidates, so each *decision* is one "token" of ``core_algos``'s
(B, T) convention and GAE runs over turns (the paper's turn-level formulation). A constant-reward
GRPO group gets zero advantage and is counted (``grpo/zero_adv_groups``), not dropped. The full
derivation is in ``rl.trainer``'s module docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from dreamgym_core.policy import NO_CANDIDATES_FALLBACK
from dreamgym_core.rl.core_algos import compute_gae, group_normalized_advantages
from dreamgym_core.schema import Trajectory


@dataclass(frozen=True)
class Decision:
    """One policy decision of a rollout, as the trainer re-scores it."""

    prompt: str
    candidates: tuple[str, ...]
    chosen: int
    """Index of the taken action in ``candidates``."""
    old_logprob: float
    """log pi_old(chosen | prompt) recorded by the acting policy."""
    reward: float
    done: bool
    episode: int
    """Index of the trajectory in the batch."""
    group: str
    """GRPO group = task_id."""
    step: int
    """Position of the decision in its episode (0-based)."""
    traj_id: str = ""
    anchor: str = ""
    """The state the decision was taken in, without its feedback line (GiGPO's anchor state)."""


def _anchor(state: str) -> str:
    return state.split("\n", 1)[1] if "\n" in state else state


def decision_samples(trajectories: Sequence[Trajectory], progress_weight: float = 0.0) -> list[Decision]:
    """Every decision of ``trajectories`` with the prompt its policy recorded (``Transition.prompt``),
    so re-scoring with the acting weights reproduces ``Transition.logprob``; the candidates are the
    ones the policy scored (``NO_CANDIDATES_FALLBACK`` when the state listed none).

    ``progress_weight`` w: a decision's reward is ``reward + w * (score - previous score)`` (the
    episode starts at score 0; ``RLConfig.progress_reward``)."""
    out: list[Decision] = []
    for e, traj in enumerate(trajectories):
        last = 0.0
        for k, s in enumerate(traj.steps):
            reward = float(s.reward)
            if progress_weight:
                reward += progress_weight * (float(s.score) - last)
                last = float(s.score)
            cands = tuple(s.candidates) or (NO_CANDIDATES_FALLBACK,)
            if s.logprob is None or s.prompt is None:
                raise ValueError(f"transition {traj.traj_id} step {s.step_idx}: no logprob/prompt recorded; the "
                                 "trainer needs what the acting policy saw (roll out an LMPolicy)")
            if s.action not in cands:
                raise ValueError(f"transition {traj.traj_id} step {s.step_idx}: action {s.action!r} is not "
                                 "one of its candidates")
            out.append(Decision(s.prompt, cands, cands.index(s.action), float(s.logprob), reward,
                                bool(s.done), e, traj.task.task_id, k, traj.traj_id, _anchor(s.state)))
    return out


def _distinct(samples: Sequence[Decision]) -> tuple[list[int], list[int]]:
    """Distinct decision contexts: (index of the first sample of each, context index of every sample)."""
    key_of: dict[tuple[str, tuple[str, ...]], int] = {}
    first, inverse = [], []
    for i, d in enumerate(samples):
        key = (d.prompt, d.candidates)
        if key not in key_of:
            key_of[key] = len(first)
            first.append(i)
        inverse.append(key_of[key])
    return first, inverse


def _episode_rows(samples: Sequence[Decision]) -> tuple[int, int, torch.Tensor]:
    """(episodes E, max decisions T, index (E, T) of each decision in ``samples``, -1 = padding)."""
    E = max(d.episode for d in samples) + 1
    T = max(d.step for d in samples) + 1
    index = torch.full((E, T), -1, dtype=torch.long)
    for i, d in enumerate(samples):
        index[d.episode, d.step] = i
    return E, T, index


def grpo_advantages(samples: Sequence[Decision], *, step_weight: float = 0.0, gamma: float = 1.0,
                    episode_weighting: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO: A_episode = (R - mean_group R) / (std_group R + eps), broadcast to its decisions.

    samples: N decisions -> (advantages (N,), {"grpo/groups", "grpo/zero_adv_groups", ...}). R is the
    episode's return (sum of its rewards); the group is the episode's task_id within this batch.

    ``step_weight`` > 0 adds omega * A_step (GiGPO): decisions of one group taken in the same anchor
    state are compared by their discounted return-to-go gamma^(L - 1 - t) * R (L: episode length,
    t: the decision's step), normalized within the anchor group like the episode advantage (a
    singleton or constant anchor group gives 0). ``episode_weighting`` scales every advantage by
    mean_length / L, so each episode carries the same total weight whatever its length.
    """
    returns: dict[int, float] = {}
    lengths: dict[int, int] = {}
    group_of: dict[int, str] = {}
    for d in samples:
        returns[d.episode] = returns.get(d.episode, 0.0) + d.reward
        lengths[d.episode] = lengths.get(d.episode, 0) + 1
        group_of[d.episode] = d.group
    episodes = sorted(returns)
    gid = {g: i for i, g in enumerate(sorted(set(group_of.values())))}
    scores = torch.tensor([returns[e] for e in episodes], dtype=torch.float64)
    groups = torch.tensor([gid[group_of[e]] for e in episodes])
    ep_adv = dict(zip(episodes, group_normalized_advantages(scores, groups).tolist()))
    by_group: dict[int, set[float]] = {}
    for e in episodes:
        by_group.setdefault(gid[group_of[e]], set()).add(returns[e])
    zero = sum(len(v) == 1 for v in by_group.values())
    adv = torch.tensor([ep_adv[d.episode] for d in samples], dtype=torch.float64)
    metrics = {"grpo/groups": float(len(by_group)), "grpo/zero_adv_groups": float(zero)}
    if step_weight > 0:
        rtg = torch.tensor([returns[d.episode] * gamma ** (lengths[d.episode] - 1 - d.step) for d in samples],
                           dtype=torch.float64)
        aid: dict[tuple[str, str], int] = {}
        anchors = torch.tensor([aid.setdefault((d.group, d.anchor), len(aid)) for d in samples])
        step_adv = group_normalized_advantages(rtg, anchors)
        adv = adv + step_weight * step_adv
        sizes = torch.bincount(anchors)
        metrics["grpo/anchor_groups"] = float((sizes > 1).sum())
        metrics["grpo/step_adv_nonzero"] = float((step_adv != 0).double().mean())
    if episode_weighting:
        mean_len = sum(lengths.values()) / len(lengths)
        adv = adv * torch.tensor([mean_len / lengths[d.episode] for d in samples], dtype=torch.float64)
    return adv.float(), metrics


def gae_advantages(samples: Sequence[Decision], values: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO: GAE over the decisions of each episode, the end of the episode terminal.

    samples: N decisions, values: (N,) V(s) of each decision -> (advantages (N,), returns (N,)).
    """
    E, T, index = _episode_rows(samples)
    mask = index >= 0
    rewards = torch.zeros(E, T)
    vals = torch.zeros(E, T)
    take = index.clamp_min(0)
    rewards[mask] = torch.tensor([d.reward for d in samples], dtype=torch.float32)[take[mask]]
    vals[mask] = values.float().cpu()[take[mask]]
    adv_mat, ret_mat = compute_gae(rewards, vals, mask, gamma, lam)
    adv = torch.zeros(len(samples))
    ret = torch.zeros(len(samples))
    adv[index[mask]] = adv_mat[mask]
    ret[index[mask]] = ret_mat[mask]
    return adv, ret


def choice_logprobs(scores: Sequence[torch.Tensor], chosen: Sequence[int],
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(chosen) = log softmax(scores / T)[chosen] and the entropy of pi, per decision.

    scores: B tensors (n_b,) of candidate sequence log-probs -> (logprobs (B,), entropy (B,)).
    """
    lps, ents = [], []
    for s, c in zip(scores, chosen):
        logp = F.log_softmax(s / temperature, dim=0)
        lps.append(logp[c])
        ents.append(-(logp.exp() * logp).sum())
    return torch.stack(lps), torch.stack(ents)


@dataclass
class UpdateBatch:
    """What phase 2 hands to phase 3: rows plus per-decision targets (all (N,) on the CPU)."""

    samples: list[Decision]
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    old_values: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    tokens: torch.Tensor
    """Real (non-pad) tokens the policy reads per decision: prompt + every candidate."""
    metrics: dict[str, float]

