"""A tiny text environment with a known optimum, for checking that the RL learner learns.

Not a benchmark: a learner check. A panel has a lamp that shows one of ``colours`` colours; the
candidates are "press <colour>" for every colour, in a per-step shuffled order. Pressing the lit
colour counts (the lamp then shows the next colour of the task's sequence); any other press does
nothing but costs a step. The task is won after ``length`` correct presses; the episode ends
(lost) after ``length + slack`` steps. The optimal policy (press the lit colour) wins every task
in ``length`` steps; a uniform policy wins with the binomial probability of ``length`` hits in
``length + slack`` tries at 1/``colours`` each (0.21 for the default 3 colours, length 3, slack
2). The reward is the paper's outcome reward (1 on the winning step), so the learner sees the
same sparse, delayed signal as in the text games, and the policy must read its state to act:
what a learner needs to show before any DreamGym comparison means anything (EXPERIMENTS.md).

Game parameters (``EnvSpec.params``, "k=v,..."): ``colours`` (2-8), ``length`` (>= 1),
``slack`` (>= 0), ``redraw`` (0 or 1: with 1, only the first colour is the task's; the colours
behind it are drawn afresh at every reset, so two episodes of one task face different sequences, as
they do in an M_exp that invents them). Tasks are seeds; train / dev / test use disjoint seed ranges.
"""

from __future__ import annotations

import random

from dreamgym_core.envs.base import Observation, SideChannels, StepResult
from dreamgym_core.schema import RawObs, Task
from dreamgym_core.state import AbstractState

COLOURS = ("red", "green", "blue", "yellow", "white", "purple", "orange", "black")
_SPLIT_BASE = {"train": 0, "dev": 1_000_000, "test": 2_000_000}
INSTRUCTION = "Press the button of the colour the lamp shows, until the panel opens."


def parse_params(params: str) -> dict[str, int]:
    """'colours=3,length=3,slack=2' -> dict; unknown keys and bad values give a one-line error."""
    out = {"colours": 3, "length": 3, "slack": 2, "redraw": 0}
    for part in filter(None, (p.strip() for p in (params or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in out:
            raise ValueError(f"lamp params: expected colours=N, length=N, slack=N or redraw=0|1, got {part!r}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"lamp params: {key} must be an integer, got {value!r}") from None
    if not 2 <= out["colours"] <= len(COLOURS) or out["length"] < 1 or out["slack"] < 0 or out["redraw"] not in (0, 1):
        raise ValueError(f"lamp params: need 2 <= colours <= {len(COLOURS)}, length >= 1, slack >= 0, redraw 0 or 1; "
                         f"got {out}")
    return out


def _state(feedback: str, lit: str | None, done: int, length: int) -> str:
    objects = [f"lamp ({lit})" if lit else "lamp (off)", f"panel ({done} of {length} lit)"]
    return AbstractState.make(feedback, "control room", objects).render()


def _lit(state: str) -> str | None:
    for fact in AbstractState.parse(state).objects:
        if fact.startswith("lamp (") and fact != "lamp (off)":
            return fact[len("lamp ("):-1]
    return None


class LampEnv:
    """One episode at a time (the ``Env`` protocol); ``SerialBatchEnv`` batches it."""

    name = "lamp"

    @classmethod
    def side_channels(cls, game: str) -> SideChannels:
        """Its score (lit presses / length) is task progress; its candidates ("press <colour>") need
        the params, not the state, so ``state_candidate_rule`` has none and the live adapter's own
        ``propose_candidates`` serves. No items, receptacles or containers: nothing else applies."""
        return SideChannels(progress=True, candidate_rule=True)

    def __init__(self, params: str = ""):
        p = parse_params(params)
        self.params = params
        self.colours, self.length, self.slack = COLOURS[:p["colours"]], p["length"], p["slack"]
        self.redraw = bool(p["redraw"])
        self._resets = 0
        self._seq: list[str] = []
        self._t = self._hits = 0
        self._rng = random.Random(0)
        self._over = True

    def tasks(self, split: str, n: int, start: int = 0) -> list[Task]:
        base = _SPLIT_BASE[split]
        return [Task(task_id=f"lamp/{self.length}x{len(self.colours)}/{split}/{base + s}", env=self.name,
                     game="lamp", split=split, seed=base + s, instruction=INSTRUCTION, params=self.params)
                for s in range(start, start + n)]

    def _observation(self, feedback: str) -> Observation:
        lit = None if self._over else self._seq[self._hits]
        cands = list(self.colours)
        self._rng.shuffle(cands)
        cands = tuple(f"press {c}" for c in cands)
        state = _state(feedback, lit, self._hits, self.length)
        return Observation(state=state, candidates=cands, raw=RawObs(feedback=feedback, candidates=cands,
                                                                     score=self._hits / self.length))

    def reset(self, task: Task) -> Observation:
        rng = random.Random(task.seed)
        self._seq = [rng.choice(self.colours) for _ in range(self.length)]
        if self.redraw:  # the task fixes the first colour only; the rest is this episode's draw
            fresh = random.Random(f"{task.seed}|{self._resets}")
            self._seq[1:] = [fresh.choice(self.colours) for _ in range(self.length - 1)]
        self._resets += 1
        self._rng = random.Random(task.seed + 7)
        self._t = self._hits = 0
        self._over = False
        return self._observation("The lamp turns on.")

    def step(self, action: str) -> StepResult:
        if self._over:
            raise RuntimeError("LampEnv.step after the episode ended")
        self._t += 1
        colour = action.removeprefix("press ").strip()
        valid = action.startswith("press ") and colour in self.colours
        hit = valid and colour == self._seq[self._hits]
        self._hits += int(hit)
        won = self._hits == self.length
        lost = not won and self._t >= self.length + self.slack
        self._over = won or lost
        feedback = ("The panel opens." if won else "Click. The lamp changes." if hit
                    else "Nothing happens." if valid else "There is no such button.")
        return StepResult(obs=self._observation(feedback), reward=float(won), score=self._hits / self.length,
                          done=self._over, won=won, lost=lost, valid=valid)

    def expert_actions(self) -> list[str]:
        return [f"press {c}" for c in self._seq[self._hits:]]

    def propose_candidates(self, state: str) -> list[str]:
        return [f"press {c}" for c in self.colours]

    def close(self) -> None:
        pass


def optimal_action(state: str) -> str | None:
    """The optimal policy's action in a lamp state (for tests and analyses)."""
    lit = _lit(state)
    return f"press {lit}" if lit else None
