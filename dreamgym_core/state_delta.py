"""The change M_exp predicts for one step (paper §4.1, Eq. 4: (s_{t+1}, r_t) = M_exp(...)).

Departure from the paper: M_exp does not regenerate the whole next state s_{t+1}. It writes its
reasoning and then a *structured change* (``StateDelta``) to the abstract state of
``dreamgym_core.state``; code applies it (``apply``). A 4M-parameter model trained from scratch
could not copy ~60-token states (1.3% exact match, below the 4.7% of "nothing changes"; see
shared/notes/feasibility-tiny-experience-model.md); a delta is ~10 tokens of entity choices. The
full next state is always recoverable: ``apply(s, diff(s, s2, ...)) == s2`` exactly. The reward
r_t is the outcome reward (0 or 1); the env's dense score travels beside it as ``progress``
(integer percent), which the paper does not have.

This module is the delta as data: ``diff`` / ``apply`` / ``conflicts`` over ``AbstractState``, the
parsed model output (``Prediction``) and what an unusable one does (``failure_delta``). Its text
form, the prompt and the output grammar are ``dreamgym_core.exp_format``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dreamgym_core.state import AbstractState, clean_text

LIST_FIELDS = ("objects", "exits", "inventory")
ROOM_FIELDS = ("objects", "exits")
"""Lists that a new location replaces instead of editing."""
PROGRESS_RANGE = range(-100, 101)
"""Progress values, in percent of the env's dense score (-100: ScienceWorld's failed task)."""


def progress_percent(score: float | None) -> int | None:
    """The env's dense score (0..1, -1 on a ScienceWorld failure) as the integer percent M_exp reads
    and writes; None stays None (data without a dense score)."""
    if score is None:
        return None
    if not math.isfinite(score):
        raise ValueError(f"progress: the dense score must be finite, got {score!r}")
    return max(-100, min(100, round(100 * float(score))))


def _canon(items) -> tuple[str, ...]:
    return tuple(sorted({clean_text(i) for i in items if clean_text(i)}))


@dataclass(frozen=True)
class StateDelta:
    """The change an action makes to an ``AbstractState``, plus its outcome.

    Construction canonicalizes (one-line feedback, cleaned, sorted, de-duplicated fact tuples), so
    two deltas that mean the same thing compare equal and render identically.
    """

    valid: bool
    """The environment accepts the action (False: it is rejected and, in TWX, nothing changes)."""
    feedback: str
    """The feedback line of the next state (always set, even when it repeats)."""
    location: str | None = None
    """The new location; None = unchanged."""
    objects_add: tuple[str, ...] = ()
    objects_remove: tuple[str, ...] = ()
    exits_add: tuple[str, ...] = ()
    exits_remove: tuple[str, ...] = ()
    inventory_add: tuple[str, ...] = ()
    inventory_remove: tuple[str, ...] = ()
    reward: float = 0.0
    """Outcome reward, 0.0 or 1.0 (paper §4.1)."""
    done: bool = False
    progress: int | None = None
    """The env's dense score after the step, in percent (``progress_percent``); None = unchanged."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "valid", bool(self.valid))
        set_(self, "done", bool(self.done))
        set_(self, "feedback", clean_text(self.feedback))
        if self.location is not None:
            set_(self, "location", clean_text(self.location))
        for name in LIST_FIELDS:
            for suffix in ("_add", "_remove"):
                set_(self, name + suffix, _canon(getattr(self, name + suffix)))
        if self.reward not in (0.0, 1.0):
            raise ValueError(f"StateDelta.reward must be the outcome reward 0 or 1, got {self.reward!r}; "
                             "dense scores belong in Transition.score")
        set_(self, "reward", float(self.reward))
        if self.progress is not None:
            if isinstance(self.progress, bool) or not isinstance(self.progress, int) \
                    or self.progress not in PROGRESS_RANGE:
                raise ValueError(f"StateDelta.progress must be an integer percent in -100..100 or None, "
                                 f"got {self.progress!r}")

    @property
    def changes_state(self) -> bool:
        """Anything besides the feedback line changes."""
        return self.location is not None or any(getattr(self, n + s) for n in LIST_FIELDS for s in ("_add", "_remove"))


@dataclass(frozen=True)
class Prediction:
    """M_exp's parsed output. ``ok=False`` means unusable: the simulator ends the episode as failed."""

    reasoning: str
    delta: StateDelta | None
    ok: bool
    error: str = ""
    """Short code when not ok: ``missing:reward``, ``bad:valid``, ``duplicate:objects``..."""
    ignored_tail: int = 0
    """Characters after the ``done`` line that were ignored."""

    def effective_delta(self) -> StateDelta:
        """The delta to apply: the parsed one, or a terminal failure (reward 0, done) when not ok."""
        return self.delta if self.ok and self.delta is not None else failure_delta(self.error)


def failure_delta(error: str = "") -> StateDelta:
    """What an unparseable prediction does to an episode: nothing changes, reward 0, it ends."""
    return StateDelta(valid=False, feedback=f"[experience model output unusable: {error or 'unknown'}]",
                      reward=0.0, done=True)


def diff(state: AbstractState, next_state: AbstractState, *, valid: bool, reward: float, done: bool,
         progress: int | None = None, next_progress: int | None = None) -> StateDelta:
    """The delta that turns ``state`` into ``next_state`` (both canonical, as ``make``/``parse`` give).

    ``progress`` / ``next_progress``: the dense score before and after, in percent (None when the
    data has none); the delta carries the new value only when it changed."""
    location = None if next_state.location == state.location else next_state.location
    kw = {}
    for name in LIST_FIELDS:
        before, after = set(getattr(state, name)), set(getattr(next_state, name))
        if location is not None and name in ROOM_FIELDS:
            before = set()  # a new room is listed in full
        kw[name + "_add"] = after - before
        kw[name + "_remove"] = before - after
    changed = next_progress is not None and next_progress != progress
    return StateDelta(valid=valid, feedback=next_state.feedback, location=location,
                      reward=reward, done=done, progress=next_progress if changed else None, **kw)


def apply(state: AbstractState, delta: StateDelta) -> AbstractState:
    """Apply ``delta`` with set semantics: (facts - removed) | added, then canonicalize.

    With a new location, the objects and exits are the delta's added facts alone (a new room).
    Lenient on purpose: removing an absent fact or adding a present one is a no-op, not an error,
    because a model's delta must always yield *some* next state. Use ``conflicts`` to count such
    predictions (a fidelity metric) or to reject them in a stricter simulator.
    """
    moved = delta.location is not None
    lists = {}
    for name in LIST_FIELDS:
        before = set() if moved and name in ROOM_FIELDS else set(getattr(state, name))
        lists[name] = (before - set(getattr(delta, name + "_remove"))) | set(getattr(delta, name + "_add"))
    location = state.location if delta.location is None else delta.location
    return AbstractState.make(delta.feedback, location, **lists)


def conflicts(state: AbstractState, delta: StateDelta) -> list[str]:
    """Ways ``delta`` does not fit ``state``, as short codes (empty list: it fits).

    ``objects:remove-missing:<fact>``, ``objects:add-present:<fact>``, ``objects:add-and-remove:<fact>``
    (same for exits/inventory; on a move the room lists start empty, so any ``-`` there is
    missing), ``location:same`` (a "new" location equal to the current one, which would wipe the
    room), ``invalid-with-changes`` (a rejected action that changes the state) and
    ``reward-not-done`` (an outcome reward on a step that does not end the episode).
    """
    out = []
    moved = delta.location is not None
    if moved and delta.location == state.location:
        out.append("location:same")
    for name in LIST_FIELDS:
        have = set() if moved and name in ROOM_FIELDS else set(getattr(state, name))
        add, remove = getattr(delta, name + "_add"), getattr(delta, name + "_remove")
        out += [f"{name}:remove-missing:{f}" for f in remove if f not in have]
        out += [f"{name}:add-present:{f}" for f in add if f in have and f not in remove]
        out += [f"{name}:add-and-remove:{f}" for f in add if f in remove]
    if not delta.valid and delta.changes_state:
        out.append("invalid-with-changes")
    if delta.reward > 0 and not delta.done:
        out.append("reward-not-done")
    return out


__all__ = ["LIST_FIELDS", "PROGRESS_RANGE", "ROOM_FIELDS", "Prediction", "StateDelta", "apply", "conflicts", "diff",
           "failure_delta", "progress_percent"]
