"""One policy-learning step (paper §4.4, Algorithm 1: "update pi with PPO/GRPO on the rollouts").

    rollout -> advantages -> update

``train_step`` runs the three phases, one call and one timer each (``timing/rollout_s``, then
``timing/advantages_s`` and ``timing/update_s`` from ``PolicyTrainer.update``). Every RL run goes
through it: real-env RL and sim-to-real (``loop.rl_in_real_env``) and the experiments
(``pipelines.experiments``). DreamGym's loop runs the same two calls, ``act`` and
``PolicyTrainer.update``, as two stages of an iteration, so that a killed iteration resumes between
them and the update can run out of process (``accelerate launch``).

The acting policy is the trainer's current model, sampled at ``RLConfig.temperature``, with the
prompt format its checkpoint records (``policy.PolicyFormat``); each transition stores the prompt
the policy scored, which is what the update re-scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from dreamgym_core.rollout import RolloutConfig, RolloutStats, rollout
from dreamgym_core.schema import Task, Trajectory


@dataclass
class StepResult:
    trajectories: list[Trajectory]
    stats: RolloutStats
    metrics: dict[str, float] = field(default_factory=dict)
    """``rollout/*``, the update's ``loss/*``, ``adv/*``... and ``timing/<phase>_s``."""


def act(env, trainer, tasks: Sequence[Task], cfg: RolloutConfig, *,
        policy_name: str) -> tuple[list[Trajectory], RolloutStats]:
    """Phase 1: the trainer's current policy acts in ``env`` (any BatchEnv: M_exp or the real env)."""
    from dreamgym_core.policy import LMPolicy

    policy = LMPolicy(trainer.model, trainer.tokenizer, policy_name, temperature=trainer.cfg.temperature)
    return rollout(env, policy, tasks, cfg)


def train_step(env, trainer, tasks: Sequence[Task], cfg: RolloutConfig, *, policy_name: str) -> StepResult:
    """One step: rollouts of the current policy, then its advantages and update (skipped when the
    rollout produced nothing, e.g. a spent real budget)."""
    t0 = time.perf_counter()
    trajectories, stats = act(env, trainer, tasks, cfg, policy_name=policy_name)
    metrics: dict[str, float] = {**stats.as_metadata(), "timing/rollout_s": time.perf_counter() - t0}
    if trajectories:
        metrics.update(trainer.update(trajectories))  # phase 2 (advantages) and 3 (update), each timed
    return StepResult(trajectories, stats, metrics)
