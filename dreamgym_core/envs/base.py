"""The environment protocol shared by real adapters and the learned experience model.

DreamGym's policy interacts with M_exp exactly as with a real environment (paper §4.1): the
rollout code takes any ``BatchEnv`` and never knows which one it has. Real adapters implement the
single-episode ``Env``; ``SerialBatchEnv`` turns one into a ``BatchEnv``. The experience model
implements ``BatchEnv`` natively (batched generation).

Failure policy: an env crash or timeout ends that episode as failed (``StepResult.crashed``) and
is counted by the caller; it never takes the whole collection down.

Side channels (``SideChannels``): inputs to M_exp beyond the paper's (s, a, H, D_k) that only some
adapters can give (a dense score, placement knowledge, affordance hints, a state-only candidate
rule, the rule annotator's task-specific reading). Every adapter declares which it offers
(``Env.side_channels(game)``); the offline/imported path offers none (``NO_SIDE_CHANNELS``). M_exp's
prompt switches a channel off, with a logged reason, where the adapter does not offer it
(``experience.prompt.provided``); retrieval of D_k from the replay buffer is the generic grounding.
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


@dataclass(frozen=True)
class SideChannels:
    """Which of M_exp's inputs beyond the paper's an adapter can provide (all off = the paper's inputs).

    Each was made for TextWorldExpress twc and measured there (``docs/environments.md``, "M_exp with
    and without side channels"); an adapter sets a field only where the channel means something for
    its game."""

    progress: bool = False
    """The env's dense score is task progress (``StepResult.score`` rises with sub-goals): M_exp sees it
    as ``## progress`` and predicts it (``PromptConfig.progress``); the rule traces say "Progress a -> b"."""
    placements: bool = False
    """Where an item belongs is a fixed fact of the game that a put's score reveals, so a lookup of the
    training data's (item, receptacle) evidence is knowledge (``PromptConfig.placements``; the rule
    traces also count items known to lie in the wrong place as left to put away)."""
    affordances: bool = False
    """The state's facts use twc's vocabulary (carried, open / closed container, surface, loose), so
    ``annotate.affordance_hints`` reads true affordances off them (``PromptConfig.affordances``)."""
    candidate_rule: bool = False
    """The adapter proposes candidate actions from an abstract state alone (``Env.propose_candidates``),
    for synthetic states; without it the simulator proposes what the logs did (``offline.logged_candidates``)."""
    rule_traces: bool = False
    """The rule annotator's task reading fits (twc wins when every item is in place): a put item
    "belongs" / "does not belong" where it went (read off the score), and without a score the count of
    "items left to put away", fixtures skipped; off, the rule traces hold the validity, the state
    difference and the reward only (``annotate.RuleAnnotator(task_reading=False)``)."""

    def offered(self) -> tuple[str, ...]:
        return tuple(name for name, on in self.__dict__.items() if on)


NO_SIDE_CHANNELS = SideChannels()
"""The offline/imported path (``offline``, ``importer``): logs of an unknown provenance give M_exp the
paper's inputs only, whatever env their rows name."""


class EnvCrash(RuntimeError):
    """Raised by adapters when the underlying engine fails; callers end the episode as failed."""


@runtime_checkable
class Env(Protocol):
    """One episode at a time. Adapters keep one engine process and reuse it across resets."""

    name: str

    @classmethod
    def side_channels(cls, game: str) -> SideChannels:
        """What this adapter offers M_exp for ``game`` beyond the paper's inputs (no engine started)."""

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
