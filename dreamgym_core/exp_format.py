"""What the experience model M_exp reads and writes (paper §4.1, Eq. 4), as pure functions.

Eq. 4: (s_{t+1}, r_t) = M_exp(R_t | {(s_i, a_i)}_{i<t}, d_{1..k}, tau): given the task tau, a window
of history, the current state, the action and k retrieved demonstrations, M_exp first writes a
reasoning trace R_t and then the next state and reward.

Departure from the paper: M_exp does not regenerate the whole next state. It writes its reasoning
and then a *structured change* (``StateDelta``) to the abstract state of ``dreamgym_core.state``;
code applies it (``apply``). A 4M-parameter model trained from scratch could not copy ~60-token
states (1.3% exact match, below the 4.7% of "nothing changes"; see
shared/notes/feasibility-tiny-experience-model.md); a delta is ~10 tokens of entity choices. The
full next state is always recoverable: ``apply(s, diff(s, s2, ...)) == s2`` exactly.

Output format (one field per line, fixed order, reasoning first as in Eq. 5)::

    <think>The apple lies in the kitchen, so 'take apple' is valid. ...</think>
    valid: yes
    feedback: You take the apple.
    location: =
    objects: -apple
    exits:
    inventory: +apple
    reward: 0
    done: no

- ``valid`` / ``done``: ``yes`` | ``no``; ``reward``: ``0`` | ``1`` (outcome reward).
- ``feedback``: the new feedback line, always written in full.
- ``location``: ``=`` for unchanged, else the new location (``\\`` escapes a location that is
  literally ``=`` or starts with ``\\``; empty means "no location").
- ``objects`` / ``exits`` / ``inventory``: whole facts removed (``-fact``) then added (``+fact``),
  each group sorted, joined by `` | ``; empty when nothing changed. Facts are the state's own
  canonical facts (``wardrobe (open): empty`` -> ``wardrobe (open): shirt`` is ``-`` one, ``+`` the
  other), so a delta is a set difference and applying it is exact.
- A new location means a new room: its objects and exits are then listed in full (``+`` only) and
  replace the old ones, instead of ``-`` every old fact (halves the target of a move). The
  inventory is always a difference.

``parse_output`` never raises. It is strict about the format (every field present, in order,
once; yes/no and 0/1 values; items prefixed by +/- and already canonical) and tolerant of
whitespace around values, leading whitespace, and of any text after the ``done`` line (a model
that has not learned to stop still yields its prediction; the ignored length is reported). Item
order inside a field is not enforced: parsed deltas are canonical, so ``render(parse(t)) == t``
holds for canonical text and ``parse(render(d)) == d`` for every delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from dreamgym_core.state import SEP, AbstractState, clean_text

FIELDS = ("valid", "feedback", "location", "objects", "exits", "inventory", "reward", "done")
LIST_FIELDS = ("objects", "exits", "inventory")
ROOM_FIELDS = ("objects", "exits")
"""Lists that a new location replaces instead of editing."""
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
UNCHANGED = "="
_YES_NO = {"yes": True, "no": False}
_REWARDS = {"0": 0.0, "1": 1.0}


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


# --------------------------------------------------------------------------------------------
# diff / apply


def diff(state: AbstractState, next_state: AbstractState, *, valid: bool, reward: float, done: bool) -> StateDelta:
    """The delta that turns ``state`` into ``next_state`` (both canonical, as ``make``/``parse`` give)."""
    location = None if next_state.location == state.location else next_state.location
    kw = {}
    for name in LIST_FIELDS:
        before, after = set(getattr(state, name)), set(getattr(next_state, name))
        if location is not None and name in ROOM_FIELDS:
            before = set()  # a new room is listed in full
        kw[name + "_add"] = after - before
        kw[name + "_remove"] = before - after
    return StateDelta(valid=valid, feedback=next_state.feedback, location=location,
                      reward=reward, done=done, **kw)


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


# --------------------------------------------------------------------------------------------
# text


def _yes_no(b: bool) -> str:
    return "yes" if b else "no"


def _render_location(location: str | None) -> str:
    if location is None:
        return UNCHANGED
    return "\\" + location if location == UNCHANGED or location.startswith("\\") else location


def _render_list(add: Sequence[str], remove: Sequence[str]) -> str:
    return SEP.join([f"-{x}" for x in remove] + [f"+{x}" for x in add])


def _line(key: str, value: str) -> str:
    return f"{key}: {value}" if value else f"{key}:"


def render_delta(delta: StateDelta) -> str:
    """The prediction part of the output (no reasoning): what demonstrations show in prompts."""
    lines = [_line("valid", _yes_no(delta.valid)), _line("feedback", delta.feedback),
             _line("location", _render_location(delta.location))]
    lines += [_line(n, _render_list(getattr(delta, n + "_add"), getattr(delta, n + "_remove"))) for n in LIST_FIELDS]
    lines += [_line("reward", str(int(delta.reward))), _line("done", _yes_no(delta.done))]
    return "\n".join(lines)


def normalize_reasoning(reasoning: str) -> str:
    """One paragraph without think tags, as it is stored in the target and returned by parsing."""
    text = (reasoning or "").replace(THINK_OPEN, " ").replace(THINK_CLOSE, " ")
    return " ".join(text.split())


def render_target(reasoning: str, delta: StateDelta) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """The training target and the character spans of its two Eq. 5 terms.

    Returns (text, reasoning_span, prediction_span) with half-open spans that partition the text:
    the reasoning span is ``<think>...</think>\\n`` (the -log P(R*|...) term), the prediction span
    the delta lines (the -log P(s'|..., R*) term). An empty reasoning (no-CoT ablation) still
    writes ``<think></think>`` so one parser serves every variant.
    """
    head = f"{THINK_OPEN}{normalize_reasoning(reasoning)}{THINK_CLOSE}\n"
    text = head + render_delta(delta)
    return text, (0, len(head)), (len(head), len(text))


def _parse_list(value: str) -> tuple[list[str], list[str]] | None:
    add: list[str] = []
    remove: list[str] = []
    if not value:
        return add, remove
    for token in value.split(SEP):
        sign, item = token[:1], token[1:]
        if sign not in ("+", "-") or not item or clean_text(item) != item:
            return None
        (add if sign == "+" else remove).append(item)
    return add, remove


def _parse_location(value: str) -> str | None:
    if value == UNCHANGED:
        return None
    return value[1:] if value.startswith("\\") else value


def _parse_delta_lines(lines: list[str]) -> tuple[StateDelta | None, str, int]:
    """Parse the field lines; returns (delta, error, index of the first line after ``done``)."""
    values: dict[str, str] = {}
    for i, expected in enumerate(FIELDS):
        if i >= len(lines):
            return None, f"missing:{expected}", i
        key, sep, value = lines[i].partition(":")
        key = key.strip()
        if not sep or key not in FIELDS:
            return None, f"unknown_line:{i + 1}", i
        if key in values:
            return None, f"duplicate:{key}", i
        if key != expected:
            return None, f"missing:{expected}", i
        values[key] = value.strip()
    if values["valid"] not in _YES_NO:
        return None, "bad:valid", len(FIELDS)
    if values["done"] not in _YES_NO:
        return None, "bad:done", len(FIELDS)
    if values["reward"] not in _REWARDS:
        return None, "bad:reward", len(FIELDS)
    if clean_text(values["feedback"]) != values["feedback"]:
        return None, "bad:feedback", len(FIELDS)
    kw = {}
    for name in LIST_FIELDS:
        parsed = _parse_list(values[name])
        if parsed is None:
            return None, f"bad:{name}", len(FIELDS)
        kw[name + "_add"], kw[name + "_remove"] = parsed
    delta = StateDelta(valid=_YES_NO[values["valid"]], feedback=values["feedback"],
                       location=_parse_location(values["location"]), reward=_REWARDS[values["reward"]],
                       done=_YES_NO[values["done"]], **kw)
    return delta, "", len(FIELDS)


def parse_output(text: str) -> Prediction:
    """M_exp's text -> Prediction. Never raises, whatever the string (see the module docstring)."""
    try:
        return _parse_output(text)
    except Exception as exc:  # a parser bug must cost one failed step, never a crashed rollout
        return Prediction(reasoning="", delta=None, ok=False, error=f"internal:{type(exc).__name__}")


def _parse_output(text: str) -> Prediction:
    if not isinstance(text, str):
        return Prediction("", None, False, "not_text")
    body = text.lstrip()
    if not body:
        return Prediction("", None, False, "empty")
    if not body.startswith(THINK_OPEN):
        return Prediction("", None, False, "missing:think")
    end = body.find(THINK_CLOSE)
    if end < 0:
        return Prediction(normalize_reasoning(body[len(THINK_OPEN):]), None, False, "unclosed:think")
    reasoning = normalize_reasoning(body[len(THINK_OPEN):end])
    lines = body[end + len(THINK_CLOSE):].lstrip().split("\n")
    delta, error, used = _parse_delta_lines([ln.rstrip() for ln in lines])
    if delta is None:
        return Prediction(reasoning, None, False, error)
    tail = "\n".join(lines[used:])
    return Prediction(reasoning, delta, True, "", ignored_tail=len(tail.strip()))


# --------------------------------------------------------------------------------------------
# prompt


def _demo_text(demo: Mapping) -> str:
    """A demonstration's outcome as delta text: from ``delta`` (text or StateDelta) or ``next_state``."""
    given = demo.get("delta")
    if isinstance(given, StateDelta):
        return render_delta(given)
    if given:
        return str(given).strip()
    delta = diff(AbstractState.parse(demo["state"]), AbstractState.parse(demo["next_state"]),
                 valid=demo.get("valid", True), reward=demo.get("reward", 0.0), done=demo.get("done", False))
    return render_delta(delta)


def build_prompt(instruction: str, history: Sequence[tuple[str, str]], state: str, action: str,
                 demos: Sequence[Mapping], *, history_window: int = 4, max_demos: int = 4,
                 use_history: bool = True, use_demos: bool = True, demo_states: bool = False) -> str:
    """The M_exp prompt of Eq. 4: task, retrieved demos, history window, state, action.

    Pure and deterministic. Demos keep the caller's order (retrieval rank) and are shown compactly
    as their action and delta text; ``demo_states=True`` also shows each demo's state (longer).
    Ablations: ``use_history=False`` (or ``history_window=0``) drops the history, ``use_demos=False``
    (or ``max_demos=0``) drops retrieval. Empty sections are omitted. The target (``render_target``)
    follows the prompt directly.
    """
    parts = [f"## task\n{clean_text(instruction)}"]
    shown = list(demos)[:max_demos] if use_demos and max_demos > 0 else []
    if shown:
        blocks = []
        for d in shown:
            head = f"{d['state'].strip()}\n" if demo_states else ""
            blocks.append(f"{head}> {clean_text(d['action'])}\n{_demo_text(d)}")
        parts.append("## examples\n" + "\n\n".join(blocks))
    recent = list(history)[-history_window:] if use_history and history_window > 0 else []
    if recent:
        parts.append("## history\n" + "\n".join(f"> {clean_text(a)}\n{clean_text(fb)}" for a, fb in recent))
    parts.append(f"## state\n{state.strip()}")
    parts.append(f"## action\n{clean_text(action)}")
    return "\n".join(parts) + "\n## outcome\n"


__all__ = ["FIELDS", "Prediction", "StateDelta", "apply", "build_prompt", "conflicts", "diff",
           "failure_delta", "normalize_reasoning", "parse_output", "render_delta", "render_target"]
