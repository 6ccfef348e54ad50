"""The environment protocol shared by real adapters and the learned experience model.

DreamGym's policy interacts with M_exp exactly as with a real environment (paper §4.1): the
rollout code takes any ``BatchEnv`` and never knows which one it has. Real adapters implement the
single-episode ``Env``; ``SerialBatchEnv`` turns one into a ``BatchEnv``. The experience model
implements ``BatchEnv`` natively (batched generation).

Failure policy: an env crash or timeout ends that episode as failed (``StepResult.crashed``) and
is counted by the caller; it never takes the whole collection down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from dreamgym_core.schema import RawObs, Task


@dataclass(frozen=True)
class Observation:
    """What the agent sees: the abstract state, the candidate actions, and the raw parts."""

    state: str
    candidates: tuple[str, ...]
    raw: RawObs = field(default_factory=RawObs)


@dataclass(frozen=True)
class StepResult:
    obs: Observation
    reward: float
    """Outcome reward: 1.0 on the step that completes the task, else 0.0."""
    score: float
    """The env's dense score after the step (0 for envs without one)."""
    done: bool
    won: bool
    lost: bool
    valid: bool
    crashed: bool = False


class EnvCrash(RuntimeError):
    """Raised by adapters when the underlying engine fails; callers end the episode as failed."""


@runtime_checkable
class Env(Protocol):
    """One episode at a time. Adapters keep one engine process and reuse it across resets."""

    name: str

    def tasks(self, split: str, n: int, start: int = 0) -> list[Task]:
        """``n`` tasks of a split; train/dev/test never overlap."""

    def reset(self, task: Task) -> Observation:
        """Start ``task``; the same task (seed) always gives the same first observation."""

    def step(self, action: str) -> StepResult: ...

    def expert_actions(self) -> list[str]:
        """The gold path from the state right after ``reset``."""

    def propose_candidates(self, state: str) -> list[str]:
        """Candidate actions from an abstract state alone (for synthetic states)."""

    def close(self) -> None: ...


@runtime_checkable
class BatchEnv(Protocol):
    """Many episodes at once: what rollouts and the experience model use."""

    name: str

    def reset_batch(self, tasks: Sequence[Task]) -> list[Observation]: ...

    def step_batch(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        """Step every live episode; ``None`` for an episode that has already ended."""

    def close(self) -> None: ...


class SerialBatchEnv:
    """A BatchEnv over real single-episode envs made by ``factory``, one engine per slot.

    Real text envs step in about a millisecond, so running the slots one after another costs little
    next to model inference; ``max_engines`` bounds how many engine processes (JVMs) are alive.
    """

    def __init__(self, factory, max_engines: int = 8):
        self.factory = factory
        self.max_engines = max_engines
        self._envs: list[Env] = []
        self.name = ""
        self.crashes = 0

    def reset_batch(self, tasks: Sequence[Task]) -> list[Observation]:
        if len(tasks) > self.max_engines:
            raise ValueError(f"batch of {len(tasks)} episodes exceeds max_engines={self.max_engines}; "
                             "raise max_engines or roll out in chunks")
        while len(self._envs) < len(tasks):
            self._envs.append(self.factory())
        self.name = self._envs[0].name if self._envs else ""
        self._live = [True] * len(tasks)
        return [env.reset(task) for env, task in zip(self._envs, tasks)]

    def step_batch(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        out: list[StepResult | None] = []
        for i, action in enumerate(actions):
            if action is None or not self._live[i]:
                out.append(None)
                continue
            res = safe_step(self._envs[i], action)
            self.crashes += int(res.crashed)
            if res.done:
                self._live[i] = False
            out.append(res)
        return out

    def close(self) -> None:
        for env in self._envs:
            env.close()
        self._envs = []


def safe_step(env: Env, action: str) -> StepResult:
    """Step, turning an engine failure into a failed terminal step instead of an exception."""
    try:
        return env.step(action)
    except Exception as exc:  # engines (py4j/JVM, z-machine) raise many types; all end the episode
        obs = Observation(state="", candidates=(), raw=RawObs(feedback=f"[env crash] {type(exc).__name__}: {exc}"[:500]))
        return StepResult(obs=obs, reward=0.0, score=0.0, done=True, won=False, lost=True,
                          valid=False, crashed=True)
