"""Multi-turn rollouts of a policy in any ``BatchEnv``: the real env or the experience model.

Paper §4.4: the policy interacts with the synthetic environment exactly as with a real one, so
this one function serves synthetic training rollouts, real-env RL, sim-to-real fine-tuning and
evaluation. GRPO needs ``group_size`` rollouts of each task (the group), PPO can use 1.

Real-env budget (paper §4.5, sim-to-real): ``budget`` caps the number of transitions taken; the
cap is exact. Episodes are started only while budget remains and an episode cut by the budget is
closed as truncated, so callers can report exactly how many real transitions a policy consumed.

Randomness: the policy receives a seed derived from (seed, task, sample index, step), so a
rollout is reproducible whatever the batch composition.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Protocol, Sequence

from dreamgym_core.envs.base import BatchEnv, Observation
from dreamgym_core.schema import Task, Trajectory, Transition
from dreamgym_core.state import AbstractState


@dataclass(frozen=True)
class PolicyContext:
    """What the policy sees at one decision."""

    instruction: str
    state: str
    candidates: tuple[str, ...]
    history: tuple[tuple[str, str], ...] = ()
    """(action, feedback) of every earlier step, oldest first; the policy's format decides how many
    of them its prompt shows (``PolicyFormat.history_window``)."""
    seed: int = 0


@dataclass(frozen=True)
class PolicyFormat:
    """How a policy's prompt is built: fixed when the policy is cloned (``PolicyInitConfig``), saved
    in its checkpoint's ``dreamgym.json`` under ``policy_format``, and read from there by everything
    that acts with or trains the policy (rollouts, the update, evaluation), so the prompt a policy
    learned on is the prompt it meets. ``LMPolicy`` refuses a format other than its model's."""

    history_window: int = 2
    """(action, feedback) pairs of earlier steps shown in the prompt, most recent last."""
    max_prompt_tokens: int = 256
    """Prompts are left-truncated to this many tokens (the state and recent history are at the end)."""

    def __post_init__(self) -> None:
        if not isinstance(self.history_window, int) or self.history_window < 0:
            raise ValueError(f"PolicyFormat.history_window={self.history_window!r} must be an integer >= 0")
        if not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 1:
            raise ValueError(f"PolicyFormat.max_prompt_tokens={self.max_prompt_tokens!r} must be an integer >= 1")

    def as_meta(self) -> dict:
        return {"policy_format": asdict(self)}

    @classmethod
    def from_meta(cls, meta: dict, where: str = "checkpoint") -> "PolicyFormat":
        if "policy_format" not in meta:
            raise ValueError(f"{where}: dreamgym.json records no policy_format (a policy saved before formats were "
                             "recorded); re-materialize policy_init")
        return cls(**meta["policy_format"])


@dataclass(frozen=True)
class ActionChoice:
    action: str
    logprob: float
    """Log-probability of ``action`` under the policy (sum over its tokens for an LM policy)."""
    prompt: str | None = None
    """The text the policy scored (``Transition.prompt``); None for a policy without a prompt."""


class Policy(Protocol):
    name: str

    def act(self, contexts: Sequence[PolicyContext]) -> list[ActionChoice]: ...


@dataclass(frozen=True)
class RolloutConfig:
    group_size: int = 1
    """Rollouts per task (the GRPO group)."""
    max_steps: int = 20
    batch_size: int = 8
    """Episodes stepped together (model batch; bounded by the env's engine count for real envs)."""
    budget: int | None = None
    """Maximum transitions in total (real-env budget); None = unlimited."""
    source: str = "real"
    iteration: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("RolloutConfig: group_size, max_steps and batch_size must be >= 1")
        if self.budget is not None and self.budget < 0:
            raise ValueError("RolloutConfig.budget must be >= 0 or None")


@dataclass
class RolloutStats:
    episodes: int = 0
    transitions: int = 0
    successes: int = 0
    invalid_actions: int = 0
    crashes: int = 0
    truncated: int = 0
    budget_exhausted: bool = False
    no_candidate_steps: int = 0
    """Steps whose state listed no candidate actions: the policy acted on the fallback "look around"."""
    per_task: dict[str, list[float]] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, float | int | bool]:
        return {"rollout/episodes": self.episodes, "rollout/transitions": self.transitions,
                "rollout/success_rate": self.successes / max(self.episodes, 1),
                "rollout/invalid_action_rate": self.invalid_actions / max(self.transitions, 1),
                "rollout/crashes": self.crashes, "rollout/truncated": self.truncated,
                "rollout/budget_exhausted": self.budget_exhausted,
                "rollout/no_candidate_steps": self.no_candidate_steps}


def _seed(seed: int, task_id: str, sample: int, step: int) -> int:
    return zlib.crc32(f"{seed}|{task_id}|{sample}|{step}".encode())


def _feedback(state: str) -> str:
    try:
        return AbstractState.parse(state).feedback
    except ValueError:
        return ""


def episode_contexts(traj: Trajectory) -> list[PolicyContext]:
    """What the policy saw at each step of a stored episode (as ``rollout`` builds it): the task's
    instruction, the state, the candidates and every earlier (action, feedback) pair."""
    out, history = [], []
    for s in traj.steps:
        out.append(PolicyContext(traj.task.instruction, s.state, tuple(s.candidates), tuple(history)))
        history.append((s.action, _feedback(s.next_state)))
    return out


def rollout(env: BatchEnv, policy: Policy, tasks: Sequence[Task], cfg: RolloutConfig) -> tuple[list[Trajectory], RolloutStats]:
    """Run ``cfg.group_size`` episodes of ``policy`` on every task; returns trajectories in task order."""
    jobs = [(task, g) for task in tasks for g in range(cfg.group_size)]
    stats = RolloutStats()
    trajs: list[Trajectory] = []
    remaining = cfg.budget
    for start in range(0, len(jobs), cfg.batch_size):
        if remaining is not None and remaining <= 0:
            stats.budget_exhausted = True
            break
        chunk = jobs[start:start + cfg.batch_size]
        observations: list[Observation | None] = list(env.reset_batch([t for t, _ in chunk]))
        steps: list[list[Transition]] = [[] for _ in chunk]
        history: list[list[tuple[str, str]]] = [[] for _ in chunk]
        crashed = [False] * len(chunk)
        for t in range(cfg.max_steps):
            live = [i for i, o in enumerate(observations) if o is not None]
            if remaining is not None:
                live = live[:max(remaining, 0)]  # exact budget: step only as many as remain
                if not live:
                    stats.budget_exhausted = True
                    break
            if not live:
                break
            contexts = [PolicyContext(chunk[i][0].instruction, observations[i].state, observations[i].candidates,
                                      tuple(history[i]),
                                      _seed(cfg.seed, chunk[i][0].task_id, chunk[i][1], t)) for i in live]
            choices = policy.act(contexts)
            stats.no_candidate_steps += sum(not c.candidates for c in contexts)
            actions: list[str | None] = [None] * len(chunk)
            for i, c in zip(live, choices):
                actions[i] = c.action
            results = env.step_batch(actions)
            for i, c in zip(live, choices):
                res, obs, (task, g) = results[i], observations[i], chunk[i]
                if res is None:  # the env says this episode already ended
                    observations[i] = None
                    continue
                steps[i].append(Transition(
                    traj_id=f"{task.task_id}#{policy.name}#{g}", task_id=task.task_id, env=task.env, step_idx=t,
                    state=obs.state, action=c.action, next_state=res.obs.state, reward=res.reward, score=res.score,
                    done=res.done, won=res.won, lost=res.lost, valid=res.valid, action_kind="policy",
                    candidates=obs.candidates, obs=obs.raw, next_obs=res.obs.raw, source=cfg.source,
                    policy=policy.name, iteration=cfg.iteration, logprob=float(c.logprob), prompt=c.prompt))
                history[i].append((c.action, _feedback(res.obs.state)))
                crashed[i] = crashed[i] or res.crashed
                observations[i] = None if res.done else res.obs
                if remaining is not None:
                    remaining -= 1
        for i, (task, g) in enumerate(chunk):
            if not steps[i]:
                continue
            truncated = not steps[i][-1].done
            if truncated:  # step cap or budget: close the episode as failed
                steps[i][-1] = replace(steps[i][-1], done=True)
            traj = Trajectory(traj_id=f"{task.task_id}#{policy.name}#{g}", task=task, policy=policy.name,
                              steps=tuple(steps[i]), crashed=crashed[i], truncated=truncated)
            trajs.append(traj)
            stats.episodes += 1
            stats.transitions += len(traj.steps)
            stats.successes += int(traj.won)
            stats.invalid_actions += sum(not s.valid for s in traj.steps)
            stats.crashes += int(crashed[i])
            stats.truncated += int(truncated)
            stats.per_task.setdefault(task.task_id, []).append(traj.ret)
    return trajs, stats


class RandomPolicy:
    """Uniform over the candidate actions: the floor every learned policy must beat.

    The draw is over the candidates in sorted order, so it depends on the seed and the candidate
    *set*, not on the order an env lists them in: in M_exp and in the real env (whose candidate lists
    hold the same actions in different orders) the same seeds take the same actions for as long as
    the two states agree. The sim-real gap of a random policy then compares paired episodes (common
    random numbers) instead of independent ones.
    """

    def __init__(self, name: str = "random"):
        self.name = name

    def act(self, contexts: Sequence[PolicyContext]) -> list[ActionChoice]:
        import math
        import random

        out = []
        for c in contexts:
            cands = sorted(c.candidates) or ["look around"]
            out.append(ActionChoice(random.Random(c.seed).choice(cands), -math.log(len(cands))))
        return out
