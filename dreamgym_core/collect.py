"""Offline trajectory collection: the seed data of the replay buffer and of M_exp's SFT (paper §4.1-4.2).

The paper starts from offline interaction data of the real environment. We collect it with a mix
of behaviours so that it holds successes, failures and rejected moves:

    expert   the env's gold path;
    noisy    the gold path where each step is replaced, with probability ``epsilon``, by a random
             candidate action (the gold pointer advances only on gold steps);
    random   uniformly random candidate actions;
    invalid  on noisy and random episodes, with probability ``invalid_rate`` a step is replaced by
             an action built from verbs x entities that the env does *not* list, so a learned
             simulator sees "that did nothing" (the feasibility study's tiny model accepted every
             invalid action because its data had none). An adapter whose actions are not verbs x
             entities (MiniWoB's clicks on element ids) offers its own ``invalid_action(state,
             candidates, rng)``.

Randomness is seeded from (config seed, task seed, episode index), so a collection is reproducible
whatever order tasks are processed in. Env crashes end the episode as failed and are counted.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from dreamgym_core.envs.base import Env, EnvCrash, Observation, safe_step
from dreamgym_core.schema import Task, Trajectory, Transition
from dreamgym_core.state import AbstractState

POLICIES = ("expert", "noisy", "random")


@dataclass(frozen=True)
class CollectConfig:
    """How many episodes of which behaviour to collect per task."""

    episodes: dict[str, int] = field(default_factory=lambda: {"expert": 1, "noisy": 2, "random": 2})
    """Episodes per task for each behaviour (keys from POLICIES)."""
    epsilon: float = 0.3
    """Noisy expert: probability that a step is a random candidate instead of the gold action."""
    invalid_rate: float = 0.15
    """Probability that a non-expert step is replaced by an action the env rejects."""
    max_steps: int = 30
    """Episode length cap (the episode is then marked truncated)."""
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.episodes) - set(POLICIES)
        if unknown:
            raise ValueError(f"CollectConfig.episodes: unknown behaviour(s) {sorted(unknown)}; use {POLICIES}")
        if any(v < 0 for v in self.episodes.values()) or sum(self.episodes.values()) == 0:
            raise ValueError("CollectConfig.episodes: counts must be >= 0 and not all zero")
        for name in ("epsilon", "invalid_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"CollectConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_steps < 1:
            raise ValueError("CollectConfig.max_steps must be >= 1")


@dataclass
class CollectStats:
    episodes: int = 0
    transitions: int = 0
    successes: int = 0
    crashes: int = 0
    truncated: int = 0
    action_kinds: Counter = field(default_factory=Counter)

    def as_metadata(self) -> dict[str, float | int]:
        return {"rollout/episodes": self.episodes, "rollout/transitions": self.transitions,
                "rollout/success_rate": self.successes / max(self.episodes, 1),
                "rollout/crashes": self.crashes, "rollout/truncated": self.truncated,
                **{f"rollout/steps_{k}": v for k, v in sorted(self.action_kinds.items())}}


_VERBS = ("take", "open", "close", "eat", "examine", "move")
_DIRECTIONS = ("north", "south", "east", "west")


def invalid_action(state: str, candidates: Sequence[str], vocabulary: Sequence[str], rng: random.Random) -> str | None:
    """An action from verbs x entities that is not among ``candidates`` (None if none found).

    Entities come from the state (wrong verb for a present object) and from ``vocabulary``
    (objects seen elsewhere, absent here) so both kinds of rejection appear in the data.
    """
    try:
        present = AbstractState.parse(state).entities()
    except ValueError:
        present = []
    pool = list(present) + list(vocabulary)
    allowed = set(candidates)
    for _ in range(20):
        verb = rng.choice(_VERBS)
        if verb == "move":
            action = f"move {rng.choice(_DIRECTIONS)}"
        elif pool and rng.random() < 0.3 and len(pool) > 1:
            action = f"put {rng.choice(pool)} in {rng.choice(pool)}"
        elif pool:
            action = f"{verb} {rng.choice(pool)}"
        else:
            continue
        if action not in allowed:
            return action
    return None


def episode_rng(seed: int, task: Task, policy: str, episode: int) -> random.Random:
    key = f"{seed}|{task.task_id}|{policy}|{episode}".encode()
    return random.Random(zlib.crc32(key))


def run_episode(env: Env, task: Task, policy: str, episode: int, cfg: CollectConfig,
                vocabulary: list[str]) -> tuple[Trajectory, bool]:
    """Play one episode; returns (trajectory, crashed)."""
    rng = episode_rng(cfg.seed, task, policy, episode)
    traj_id = f"{task.task_id}#{policy}#{episode}"
    try:
        obs: Observation = env.reset(task)
        gold = env.expert_actions()
    except EnvCrash:
        return Trajectory(traj_id=traj_id, task=task, policy=policy, steps=(), crashed=True), True
    steps: list[Transition] = []
    g = 0
    crashed = truncated = False
    for t in range(cfg.max_steps):
        kind = "expert"
        if policy == "expert" or (policy == "noisy" and rng.random() >= cfg.epsilon):
            if g >= len(gold):
                break  # gold path exhausted without the env ending the episode
            action, g = gold[g], g + 1
        else:
            kind = "noisy" if policy == "noisy" else "random"
            action = rng.choice(obs.candidates) if obs.candidates else "look around"
        if policy != "expert" and rng.random() < cfg.invalid_rate:
            own = getattr(env, "invalid_action", None)
            bad = own(obs.state, obs.candidates, rng) if own else invalid_action(obs.state, obs.candidates,
                                                                                  vocabulary, rng)
            if bad is not None:
                action, kind = bad, "invalid"
        res = safe_step(env, action)
        crashed = res.crashed
        steps.append(Transition(
            traj_id=traj_id, task_id=task.task_id, env=task.env, step_idx=t, state=obs.state,
            action=action, next_state=res.obs.state, reward=res.reward, score=res.score,
            done=res.done, won=res.won, lost=res.lost, valid=res.valid,
            action_kind=kind, candidates=obs.candidates, obs=obs.raw, next_obs=res.obs.raw,
            source="offline", policy=policy))
        if res.done:
            break
        obs = res.obs
    if steps and not steps[-1].done:
        # Step cap reached, or the gold path ran out: close the episode as failed, never leave it open.
        steps[-1] = replace(steps[-1], done=True)
        truncated = True
    return Trajectory(traj_id=traj_id, task=task, policy=policy, steps=tuple(steps),
                      crashed=crashed, truncated=truncated), crashed


def collect(env: Env, tasks: Sequence[Task], cfg: CollectConfig,
            progress: Callable[[int, int], None] | None = None) -> tuple[list[Trajectory], CollectStats]:
    """Collect ``cfg.episodes`` episodes of each behaviour for every task."""
    # an adapter with its own invalid actions needs no vocabulary (and no extra reset per task)
    vocabulary = [] if hasattr(env, "invalid_action") else task_vocabulary(env, tasks)
    stats = CollectStats()
    trajs: list[Trajectory] = []
    for i, task in enumerate(tasks):
        for policy in POLICIES:
            for ep in range(cfg.episodes.get(policy, 0)):
                traj, crashed = run_episode(env, task, policy, ep, cfg, vocabulary)
                stats.episodes += 1
                stats.crashes += int(crashed)
                stats.truncated += int(traj.truncated)
                if not traj.steps:
                    continue
                trajs.append(traj)
                stats.transitions += len(traj.steps)
                stats.successes += int(traj.won)
                stats.action_kinds.update(t.action_kind for t in traj.steps)
        if progress:
            progress(i + 1, len(tasks))
    return trajs, stats


def task_vocabulary(env: Env, tasks: Sequence[Task]) -> list[str]:
    """Sorted entities of the tasks' first states: absent objects for invalid actions.

    Built from a pass over all tasks (one reset each, about a millisecond) so that an episode's
    invalid actions do not depend on which tasks were collected before it.
    """
    names: set[str] = set()
    for task in tasks:
        try:
            names.update(_entities_of(env.reset(task).state))
        except EnvCrash:
            continue
    return sorted(names)


def _entities_of(state: str) -> list[str]:
    try:
        return AbstractState.parse(state).entities()
    except ValueError:
        return []
