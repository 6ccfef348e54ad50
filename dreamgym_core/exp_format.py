"""What the experience model M_exp reads and writes (paper §4.1, Eq. 4), as pure functions.

Eq. 4: (s_{t+1}, r_t) = M_exp(R_t | {(s_i, a_i)}_{i<t}, d_{1..k}, tau): given the task tau, a window
of history, the current state, the action and k retrieved demonstrations, M_exp first writes a
reasoning trace R_t and then the next state and reward.

Departure from the paper: M_exp does not regenerate the whole next state. It writes its reasoning
and then a *structured change* (``state_delta.StateDelta``, which says why) that code applies to
the abstract state; this module is that change's text form, the prompt around it and its grammar.

Output format (one field per line, fixed order, reasoning first as in Eq. 5)::

    <think>The apple lies in the kitchen, so 'take apple' is valid. ...</think>
    valid: yes
    feedback: You take the apple.
    location: =
    objects: -apple
    exits:
    inventory: +apple
    progress: 25
    reward: 0
    done: no

- ``valid`` / ``done``: ``yes`` | ``no``; ``reward``: ``0`` | ``1`` (outcome reward).
- ``progress``: the env's dense score after the step in integer percent (twc: +25 for taking an
  item that is out of place, +25 / -25 for putting it where it belongs / elsewhere), ``=`` when
  unchanged. The prompt shows the score before the step (``## progress``), so M_exp predicts a
  change and never has to count what is still out of place; the simulator carries the value from
  step to step and the task is won when it reaches 100 (``ExperienceModel``). Data without a dense
  score has no progress section and always writes ``=``.
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

Pointer form (copy-free targets; ``PromptConfig.pointers``). A from-scratch model trained for
minutes cannot copy multi-token names it has never seen (held-out games use unseen items), so it
wrote memorised names instead. In the pointer form the action's arguments, resolved against the
names in the state (``action_refs``, longest match first), become ``@1``, ``@2`` in the prompt and
the target (``delex``; a literal ``@`` is written ``@@``), and the objects field is written as
item-level edits that code resolves against the current state (``render_pointer_delta``)::

    objects: -@1                take @1: its loose fact, or @1 out of whatever holds it
    objects: @2 += @1           put @1 into @2 (contents re-sorted, "empty" replaced)
    objects: -@1 | +@1 (closed) close @1 without restating its contents

``+fact`` / ``-fact`` stay available, so any delta has a pointer form: the encoder checks that
the edits reproduce the delta exactly and falls back to literal facts otherwise
(``PointerTarget.literal``). ``parse_pointer_output(render_pointer_target(R, d, s, refs), s,
refs).delta == d`` for every transition (tested over collected data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from dreamgym_core.state import SEP, AbstractState, clean_text
from dreamgym_core.state_delta import LIST_FIELDS, PROGRESS_RANGE, Prediction, StateDelta, diff

FIELDS = ("valid", "feedback", "location", "objects", "exits", "inventory", "progress", "reward", "done")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
UNCHANGED = "="
_YES_NO = {"yes": True, "no": False}
_REWARDS = {"0": 0.0, "1": 1.0}


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
    lines += [_line("progress", UNCHANGED if delta.progress is None else str(delta.progress)),
              _line("reward", str(int(delta.reward))), _line("done", _yes_no(delta.done))]
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
    progress = None
    if values["progress"] != UNCHANGED:
        if not re.fullmatch(r"0|-?[1-9][0-9]{0,2}", values["progress"]) \
                or int(values["progress"]) not in PROGRESS_RANGE:
            return None, "bad:progress", len(FIELDS)
        progress = int(values["progress"])
    kw = {}
    for name in LIST_FIELDS:
        parsed = _parse_list(values[name])
        if parsed is None:
            return None, f"bad:{name}", len(FIELDS)
        kw[name + "_add"], kw[name + "_remove"] = parsed
    delta = StateDelta(valid=_YES_NO[values["valid"]], feedback=values["feedback"],
                       location=_parse_location(values["location"]), reward=_REWARDS[values["reward"]],
                       done=_YES_NO[values["done"]], progress=progress, **kw)
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
# pointers: copy-free targets (module docstring, "Pointer form")

MAX_REFS = 9
"""Pointers are ``@1`` .. ``@9`` (one character after ``@`` keeps ``relex`` unambiguous)."""
_STATUS = re.compile(r" \((?:open|closed)\)$")
_EDIT = " += "


def _fact_name(fact: str) -> str:
    return _STATUS.sub("", fact.partition(": ")[0])


def _contents(fact: str) -> list[str]:
    _, sep, rest = fact.partition(": ")
    return [c for c in rest.split(", ") if c and c != "empty"] if sep else []


def _with_contents(fact: str, items: Sequence[str]) -> str:
    return f"{fact.partition(': ')[0]}: {', '.join(sorted(items)) if items else 'empty'}"


def action_refs(state: AbstractState, action: str) -> tuple[str, ...]:
    """The names in ``action`` that the state mentions, in the order the action names them.

    Names are matched whole-word, longest first and without overlap ("put dirty jeans in laundry
    basket" -> ("dirty jeans", "laundry basket")); a name the state does not mention (an action on
    an absent object) gets no pointer and stays literal, which is itself evidence of an invalid action.
    """
    text = clean_text(action)
    taken: list[tuple[int, int, str]] = []
    for name in sorted(set(state.entities()), key=lambda n: (-len(n), n)):
        if not name or "@" in name:
            continue
        for m in re.finditer(rf"(?<![\w@]){re.escape(name)}(?![\w])", text):
            if all(m.end() <= a or m.start() >= b for a, b, _ in taken):
                taken.append((m.start(), m.end(), name))
    ordered = [n for _, _, n in sorted(taken)]
    return tuple(dict.fromkeys(ordered))[:MAX_REFS]


def delex(text: str, refs: Sequence[str]) -> str:
    """Names in ``refs`` -> ``@1``.., ``@`` -> ``@@``; ``relex(delex(t, refs), refs) == t`` always."""
    names = sorted((n for n in refs if n), key=len, reverse=True)
    index = {n: i + 1 for i, n in enumerate(refs)}
    alts = [rf"(?<![\w@]){re.escape(n)}(?![\w])" for n in names] + ["@"]
    return re.sub("|".join(f"({a})" for a in alts),
                  lambda m: "@@" if m.group(0) == "@" else f"@{index[m.group(0)]}", text)


def relex(text: str, refs: Sequence[str]) -> str | None:
    """Inverse of ``delex``; None when the text uses a pointer ``refs`` does not define."""
    out, i = [], 0
    while True:
        j = text.find("@", i)
        if j < 0:
            return "".join(out) + text[i:]
        out.append(text[i:j])
        nxt = text[j + 1:j + 2]
        if nxt == "@":
            out.append("@")
        elif nxt.isdigit() and 1 <= int(nxt) <= len(refs):
            out.append(refs[int(nxt) - 1])
        else:
            return None
        i = j + 2


def apply_object_edits(objects: Sequence[str], edits: Sequence[str]) -> set[str] | None:
    """Apply pointer-form object edits (already relexicalized) in order; None if one is malformed.

    ``-X``: remove the fact X, else the fact named X, else X from every receptacle listing it.
    ``C += X``: add X to the contents of the fact named C. ``+F``: add the fact F. An edit that
    finds nothing to act on is a no-op (as in ``apply``): a model's output always yields a state.
    """
    facts = set(objects)
    for edit in edits:
        sign, body = edit[:1], edit[1:]
        if sign in ("+", "-"):
            if not body or clean_text(body) != body:
                return None
            if sign == "+":
                facts.add(body)
                continue
            named = [f for f in facts if f == body] or [f for f in facts if _fact_name(f) == body]
            if named:
                facts -= set(named)
                continue
            for f in [f for f in facts if body in _contents(f)]:
                facts.discard(f)
                facts.add(_with_contents(f, [c for c in _contents(f) if c != body]))
            continue
        holder, sep, item = edit.partition(_EDIT)
        if not sep or not holder or not item or clean_text(holder) != holder or clean_text(item) != item:
            return None
        for f in [f for f in facts if _fact_name(f) == holder and ": " in f]:
            facts.discard(f)
            facts.add(_with_contents(f, set(_contents(f)) | {item}))
    return facts


def _object_edits(before: set[str], delta: StateDelta) -> list[str]:
    """Item-level edits for the objects change of ``delta`` (see ``apply_object_edits``)."""
    removed = {_fact_name(f): f for f in delta.objects_remove}
    added = {_fact_name(f): f for f in delta.objects_add}
    minus, into, plus = [], [], []
    for name, old in removed.items():
        new = added.get(name)
        if new is not None and old.partition(": ")[0] == new.partition(": ")[0] and ": " in old and ": " in new:
            gone, come = set(_contents(old)) - set(_contents(new)), set(_contents(new)) - set(_contents(old))
            minus += [f"-{x}" for x in sorted(gone)]
            into += [f"{name}{_EDIT}{x}" for x in sorted(come)]
            continue
        minus.append(f"-{name}")
        if new is not None:
            plus.append(f"+{new}")
    plus += [f"+{f}" for n, f in added.items() if n not in removed]
    return minus + into + plus


@dataclass(frozen=True)
class PointerTarget:
    text: str
    reasoning_span: tuple[int, int]
    prediction_span: tuple[int, int]
    literal: bool
    """The objects field fell back to literal facts (the item-level edits did not reproduce it)."""


def render_pointer_delta(state: AbstractState, delta: StateDelta, refs: Sequence[str]) -> tuple[str, bool]:
    """The prediction lines in pointer form, and whether the objects field had to stay literal."""
    literal = _render_list(delta.objects_add, delta.objects_remove)
    objects, fell_back = literal, True
    if delta.location is None and len(set(map(_fact_name, delta.objects_remove))) == len(delta.objects_remove) \
            and len(set(map(_fact_name, delta.objects_add))) == len(delta.objects_add):
        edits = _object_edits(set(state.objects), delta)
        expected = (set(state.objects) - set(delta.objects_remove)) | set(delta.objects_add)
        if apply_object_edits(state.objects, edits) == expected and not any(SEP.strip() in e for e in edits):
            objects, fell_back = SEP.join(edits), False
    lines = render_delta(delta).split("\n")
    lines[FIELDS.index("objects")] = _line("objects", objects)
    return delex("\n".join(lines), refs), fell_back


def render_pointer_target(reasoning: str, delta: StateDelta, state: AbstractState,
                          refs: Sequence[str]) -> PointerTarget:
    """``render_target`` in pointer form: reasoning and prediction delexicalized with ``refs``."""
    head = f"{THINK_OPEN}{delex(normalize_reasoning(reasoning), refs)}{THINK_CLOSE}\n"
    body, literal = render_pointer_delta(state, delta, refs)
    return PointerTarget(head + body, (0, len(head)), (len(head), len(head) + len(body)), literal)


def parse_pointer_output(text: str, state: AbstractState, refs: Sequence[str]) -> Prediction:
    """Pointer-form text -> Prediction with a real (relexicalized) delta for ``state``. Never raises."""
    try:
        return _parse_pointer_output(text, state, refs)
    except Exception as exc:  # as parse_output: a bug costs one failed step
        return Prediction(reasoning="", delta=None, ok=False, error=f"internal:{type(exc).__name__}")


def _parse_pointer_output(text: str, state: AbstractState, refs: Sequence[str]) -> Prediction:
    if not isinstance(text, str):
        return Prediction("", None, False, "not_text")
    head, sep, rest = text.partition(THINK_CLOSE)
    if not sep:
        return _parse_output(text)
    head = relex(head, refs) or head  # the reasoning is not applied: keep it even with a stray pointer
    body = relex(rest, refs)
    if body is None:
        return Prediction(normalize_reasoning(head.lstrip()[len(THINK_OPEN):]), None, False, "bad:pointer")
    lines = body.lstrip().split("\n")
    i = FIELDS.index("objects")
    edits = None
    if len(lines) > i and lines[i].partition(":")[0].strip() == "objects":
        value = lines[i].partition(":")[2].strip()
        edits = value.split(SEP) if value else []
        lines[i] = "objects:"  # parsed as "no literal change"; the edits' result replaces it below
    pred = _parse_output(head + THINK_CLOSE + "\n" + "\n".join(lines))
    if not pred.ok or pred.delta is None:
        return pred
    if edits is None:
        return Prediction(pred.reasoning, None, False, "missing:objects")
    before = set() if pred.delta.location is not None else set(state.objects)
    after = apply_object_edits(before, edits)
    if after is None:
        return Prediction(pred.reasoning, None, False, "bad:objects")
    d = pred.delta
    delta = StateDelta(valid=d.valid, feedback=d.feedback, location=d.location, objects_add=after - before,
                       objects_remove=before - after, exits_add=d.exits_add, exits_remove=d.exits_remove,
                       inventory_add=d.inventory_add, inventory_remove=d.inventory_remove, reward=d.reward,
                       done=d.done, progress=d.progress)
    return Prediction(pred.reasoning, delta, True, "", pred.ignored_tail)


# --------------------------------------------------------------------------------------------
# the output grammar, for constrained decoding (``experience_model.FormatConstraint``)

END = "<end>"
"""``next_constraint`` result: the output is complete, only the end-of-sequence token may follow."""
_CHOICES = {"valid": (" yes\n", " no\n"), "reward": (" 0\n", " 1\n"), "done": (" yes", " no"),  # done ends the text
            "progress": (f" {UNCHANGED}\n",) + tuple(f" {k}\n" for k in PROGRESS_RANGE)}


def next_constraint(text: str) -> tuple[str, ...] | None:
    """What the output format requires right after ``text`` (M_exp's output so far), or None (free text).

    Returns the strings one of which must follow: ``("<think>",)`` at the start, ``("\\n",)``
    after ``</think>``, the next field's name (``("objects:",)``) at the start of each line,
    ``(" yes\\n", " no\\n")`` after ``valid:``, ``(" 0\\n", " 1\\n")`` after ``reward:``,
    ``(" yes", " no")`` after ``done:`` and then ``(END,)``. The reasoning and the field values
    are free: those are the model's prediction; the grammar only removes the ways to be unparseable
    that have nothing to do with the prediction (a missing, repeated or misspelt field, a value that
    is not yes/no/0/1, text after ``done``). Output that leaves the grammar (an empty line) is left to fail parsing.
    """
    if not text.strip():
        return (THINK_OPEN,)
    head, sep, after = text.partition(THINK_CLOSE)
    if not sep:
        return None
    if after == "":
        return ("\n",)
    lines = after.split("\n")
    if lines[0] != "":
        return None
    written, current = lines[1:-1], lines[-1]
    i = len(written)
    if any(not ln.startswith(f"{FIELDS[j]}:") for j, ln in enumerate(written) if j < len(FIELDS)):
        return None
    if current == "":
        return (FIELDS[i] + ":",) if i < len(FIELDS) else (END,)
    if i < len(FIELDS) and current == f"{FIELDS[i]}:" and FIELDS[i] in _CHOICES:
        return _CHOICES[FIELDS[i]]
    if i == len(FIELDS) - 1 and current in ("done: yes", "done: no"):
        return (END,)
    return None


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


def _compact(delta_text: str) -> str:
    """A demonstration's delta without its empty and unchanged fields ("exits:", "location: ="): the
    same facts in about half the tokens (k = 2 demos add ~50 tokens instead of ~90 on twc prompts)."""
    return "\n".join(ln for ln in delta_text.split("\n")
                     if ln.partition(":")[2].strip() not in ("", UNCHANGED) or ln.startswith("feedback:"))


def build_prompt(instruction: str, history: Sequence[tuple[str, str]], state: str, action: str,
                 demos: Sequence[Mapping], *, history_window: int = 4, max_demos: int = 4,
                 use_history: bool = True, use_demos: bool = True, demo_states: bool = False,
                 refs: Sequence[str] | None = None, progress: int | None = None,
                 hints: Sequence[str] = ()) -> str:
    """The M_exp prompt of Eq. 4: task, retrieved demos, history window, state, action.

    ``refs`` (pointer form, see the module docstring): the history, state and action are
    delexicalized with them and a ``## refs`` section binds each pointer to its name, so the
    model still reads the names (an item's kind hints where it belongs) but never has to copy one.
    Demos stay literal (their own states bind other names).

    Pure and deterministic. Demos keep the caller's order (retrieval rank) and are shown compactly
    as their action and delta text without empty or unchanged fields; ``demo_states=True`` also shows each demo's state (longer).
    ``progress``: the env's dense score before the step in percent (``## progress``); ``hints``: lines
    of what the training data knows about the action (``## known``, e.g. whether the item was ever
    seen to belong where it is put), delexicalized like the state.
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
            blocks.append(f"{head}> {clean_text(d['action'])}\n{_compact(_demo_text(d))}")
        parts.append("## examples\n" + "\n\n".join(blocks))
    recent = list(history)[-history_window:] if use_history and history_window > 0 else []

    def lex(text: str) -> str:
        return text if refs is None else delex(text, refs)

    if recent:
        parts.append("## history\n" + "\n".join(f"> {lex(clean_text(a))}\n{lex(clean_text(fb))}" for a, fb in recent))
    parts.append(f"## state\n{lex(state.strip())}")
    if progress is not None:
        parts.append(f"## progress\n{progress}")
    parts.append(f"## action\n{lex(clean_text(action))}")
    if hints:
        parts.append("## known\n" + "\n".join(lex(clean_text(h)) for h in hints))
    if refs:
        parts.append("## refs\n" + SEP.join(f"@{i} {n}" for i, n in enumerate(refs, 1)))
    return "\n".join(parts) + "\n## outcome\n"


__all__ = ["END", "FIELDS", "PointerTarget", "action_refs", "apply_object_edits", "build_prompt", "delex",
           "next_constraint", "normalize_reasoning", "parse_output", "parse_pointer_output", "relex", "render_delta",
           "render_pointer_delta", "render_pointer_target", "render_target"]
