"""CoT annotation of offline transitions (paper §4.1, "CoT annotation"; the R* of Eq. 5).

Every offline transition (s, a, s', r) gets a reasoning trace R* that explains why the action
leads to the next state and reward; M_exp's SFT learns to write R* before its prediction. The
annotator is an argument (one protocol, three implementations):

    RuleAnnotator         default: offline, deterministic, derived from the state difference and
                          the reward (``state_delta.diff``), grounded only in the state text.
    TransformersAnnotator a local causal LM (path or hub id), greedy ``generate`` in batches.
    OpenAIAnnotator       any OpenAI-compatible server (vLLM, ...): retries with backoff on
                          429/5xx/timeouts, a token-bucket rate limit, a one-line error at the end.

The two LLM clients live in ``dreamgym_core.annotate_llm``; this module holds the protocol, the
rule annotator, the placement knowledge the rule traces and M_exp's prompt share, and
``annotate_table``.

Departure from the paper: the paper annotates with a strong LLM. The rule annotator is the
offline default here; its traces are short, template-like and always consistent with the data,
which is what a small from-scratch M_exp can learn. Its twc-made parts are side channels that the
env's adapter declares (``envs.base.SideChannels``; ``rule_annotator`` builds it from them): the
env's score ("Progress a -> b", ``progress``), the placement knowledge (``placements``), and twc's task
reading ("items left to put away", "X belongs in Y": ``rule_traces``). Without them a trace holds
the validity, the state difference and the reward. The LLM annotators fall back to the rule trace
(and count it in ``fallbacks``) when a model returns nothing usable.

``annotate_table`` adds three columns to a transition table: ``reasoning`` (R*), ``annotator``
(who wrote it: ``rule-v4``, ``transformers:<path>``, ``openai:<model>``) and ``target`` (the
M_exp training text ``exp_format.render_target(reasoning, diff(s, s'))``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

import pyarrow as pa

from dreamgym_core.envs.base import SideChannels
from dreamgym_core.exp_format import render_target
from dreamgym_core.state import AbstractState
from dreamgym_core.state_delta import StateDelta, diff, progress_percent


@dataclass(frozen=True)
class AnnotationInput:
    """One transition to explain."""

    instruction: str
    state: str
    action: str
    next_state: str
    reward: float
    valid: bool
    done: bool
    progress: float | None = None
    """The env's dense task score before the step (``obs.score``), when the data has it."""
    next_progress: float | None = None
    """The dense score after the step (``score``): a rise means a sub-goal was reached."""


class Annotator(Protocol):
    name: str
    """Recorded in the ``annotator`` column: which annotator (and version / model) wrote a trace."""

    def annotate(self, items: list[AnnotationInput]) -> list[str]:
        """One reasoning trace per item, in order."""


class AnnotationError(RuntimeError):
    """An annotator could not produce traces (after its retries); the message is one line."""


# --------------------------------------------------------------------------------------------
# Rule annotator

_STATUS = re.compile(r" \((?:open|closed)\)$")


def _head(fact: str) -> str:
    return fact.partition(": ")[0]


def _name(fact: str) -> str:
    return _STATUS.sub("", _head(fact))


def _contents(fact: str) -> list[str]:
    _, sep, rest = fact.partition(": ")
    return [c for c in rest.split(", ") if c and c != "empty"] if sep else []


def _describe(fact: str) -> str:
    """'wardrobe (open): shirt' -> 'the wardrobe is open and holds shirt'."""
    head, sep, rest = fact.partition(": ")
    name = _name(fact)
    status = "open" if head.endswith("(open)") else "closed" if head.endswith("(closed)") else ""
    holds = "" if not sep else "empty" if rest == "empty" else f"holds {rest}"
    if status and holds:
        return f"the {name} is {status} and {holds}"
    if holds.startswith("holds"):
        return f"the {name} {holds}"
    if status or holds:
        return f"the {name} is {status or holds}"
    return f"the {name} is here"


def _holder(item: str, facts: Sequence[str]) -> str | None:
    """The receptacle fact whose contents list ``item``."""
    return next((f for f in facts if item in _contents(f)), None)


def _place(fact: str, into: bool = False) -> str:
    """'wardrobe (open): shirt' -> 'in the wardrobe'; 'desk: shirt' -> 'on the desk' ('onto' with into)."""
    prep = "in" if _head(fact).endswith("(open)") else "on"
    return f"{prep}{'to' if into else ''} the {_name(fact)}"


def _split_action(action: str) -> tuple[str, str, str]:
    """'put apple in fridge' -> ('put', 'apple', 'fridge'); 'take apple' -> ('take', 'apple', '')."""
    verb, _, rest = action.strip().partition(" ")
    verb = verb.lower()
    if verb == "put":
        for prep in (" in ", " on "):
            if prep in rest:
                x, _, y = rest.partition(prep)
                return verb, x.strip(), y.strip()
    return verb, rest.strip(), ""


def _why_valid(s: AbstractState, verb: str, x: str, y: str) -> str:
    names = {_name(f): f for f in s.objects}
    if verb == "take":
        if x in names:
            return f"the {x} lies in the room"
        if holder := _holder(x, s.objects):
            return f"the {x} is {_place(holder)}"
    if verb == "put" and x in s.inventory:
        where = "is open" if y in names and _head(names[y]).endswith("(open)") else "is here"
        return f"you carry the {x} and the {y} {where}"
    if verb in ("open", "close") and x in names:
        return f"the {x} is {'closed' if verb == 'open' else 'open'}"
    if verb == "move" and any(e.startswith(f"{x}: ") for e in s.exits):
        return f"there is an exit to the {x}"
    return ""


def _why_invalid(s: AbstractState, verb: str, x: str, y: str) -> str:
    names = {_name(f): f for f in s.objects}
    present = set(s.entities())
    if verb == "move" and x and not any(e.startswith(f"{x}: ") for e in s.exits):
        return f"there is no exit to the {x}"
    if any(n and n not in present for n in (x, y)):
        return "something it names is not here"  # naming the absent thing would mean copying it
    if verb == "take" and x in s.inventory:
        return f"you already carry the {x}"
    if verb == "put" and x not in s.inventory:
        return f"you do not carry the {x}"
    if verb == "put" and y in names and _head(names[y]).endswith("(closed)"):
        return f"the {y} is closed"
    if verb == "open" and x in names and not _head(names[x]).endswith("(closed)"):
        return f"the {x} is not closed"
    if verb == "close" and x in names and not _head(names[x]).endswith("(open)"):
        return f"the {x} is not open"
    return "the game does not support it"


def _changes(s: AbstractState, d: StateDelta) -> list[str]:
    """One sentence per change; fact edits that an item move already explains are not repeated."""
    if d.location is not None:
        return [f"You go from the {s.location or 'start'} to the {d.location or 'unknown place'} "
                "and now see what is there."]
    out, moved = [], set()
    for item in d.inventory_add:
        holder = None if item in d.objects_remove else _holder(item, s.objects)
        out.append(f"The {item} moves from {f'the {_name(holder)}' if holder else 'the room'} to your inventory.")
        moved.add(item)
    for item in d.inventory_remove:
        holder = _holder(item, d.objects_add)
        out.append(f"The {item} moves from your inventory {_place(holder, into=True)}." if holder
                   else f"The {item} leaves your inventory.")
        moved.add(item)
    removed = {_name(f): f for f in d.objects_remove}
    for fact in d.objects_add:
        old = removed.get(_name(fact))
        if old is not None and _head(old) == _head(fact) and set(_contents(fact)) ^ set(_contents(old)) <= moved:
            continue  # only an item move already described changed this receptacle's contents
        out.append(f"Now {_describe(fact)}.")
    added = {_name(f) for f in d.objects_add}
    out += [f"The {_name(f)} is no longer here." for f in d.objects_remove
            if _name(f) not in added and _name(f) not in moved]
    if d.exits_add or d.exits_remove:
        out.append("The exits change.")
    return out or ["Nothing in the room or your inventory changes."]


def _reward_sentence(reward: float, done: bool) -> str:
    if reward > 0:
        return "Every item is now in place: reward 1, the episode ends."
    if done:
        return "The episode ends without success: reward 0."
    return "The task is not complete: reward 0."


def _progress(s: AbstractState, portable: frozenset[str] | None,
              placements: dict[tuple[str, str], bool] | None = None) -> str:
    """What is left to put away after the action: the decision behind the reward (twc wins when
    every item is in its place). Counted: loose items (a bare fact: no contents, no open/closed
    status; with ``portable``, names ever carried in the data, fixtures such as a toilet are not),
    carried items, and, with ``placements``, items lying in a receptacle they are known not to
    belong in. So "0 left" means the task is done, and a model learns to count misplaced items."""
    loose = [f for f in s.objects if ": " not in f and not _STATUS.search(f)]
    if portable is not None:
        loose = [f for f in loose if f in portable]
    wrong = 0
    if placements:
        wrong = sum(placements.get((item, _name(f))) is False for f in s.objects for item in _contents(f))
    left = len(loose) + len(s.inventory) + wrong
    return f"Items left to put away: {left}."


def placement_knowledge(table: pa.Table) -> dict[tuple[str, str], bool]:
    """(item, receptacle) -> whether the item belongs there, read off the env's dense score in the
    data: a valid put that raised the score is a right place, one that did not a wrong one (a pair
    ever seen right stays right). Pairs never put are unknown (absent). Empty without a dense score."""
    cols = [c for c in ("action", "valid", "score", "obs") if c in table.column_names]
    if len(cols) < 4:
        return {}
    return {pair: bool(right) for pair, (right, _) in placement_evidence(table.select(cols).to_pylist()).items()}


def placement_evidence(rows: Iterable[dict]) -> dict[tuple[str, str], tuple[frozenset[str], frozenset[str]]]:
    """(item, receptacle) -> (tasks where putting it there raised the env's score, tasks where it did
    not): ``placement_knowledge`` by task, so a lookup can leave one task out (``placement_known``).
    Rows need action, valid, score, obs (with its score) and task_id; empty without a dense score."""
    rows = list(rows)
    if not any(r.get("score") for r in rows):
        return {}
    right: dict[tuple[str, str], set[str]] = {}
    wrong: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        verb, x, y = _split_action(r["action"])
        before = _score_before(r)
        if verb != "put" or not r["valid"] or not x or not y or before is None:
            continue
        (right if float(r["score"]) > before else wrong).setdefault((x, y), set()).add(r.get("task_id") or "")
    return {k: (frozenset(right.get(k, ())), frozenset(wrong.get(k, ()))) for k in set(right) | set(wrong)}


def placement_known(evidence: dict, pair: tuple[str, str], exclude_task: str | None = None) -> bool | None:
    """What the evidence says about ``pair`` without ``exclude_task``'s own episodes: True (it belongs
    there: seen right in some task), False (seen there, never right), None (never seen)."""
    right, wrong = evidence.get(pair, (frozenset(), frozenset()))
    right, wrong = right - {exclude_task}, wrong - {exclude_task}
    return True if right else False if wrong else None


def placement_pair(state: AbstractState, action: str) -> tuple[str, str] | None:
    """The (item, receptacle) an action puts to the test: ``put X in Y`` -> (X, Y); ``take X`` with X
    inside a receptacle Y -> (X, Y) (taking it from where it belongs lowers the score); else None."""
    verb, x, y = _split_action(action)
    if verb == "put" and x and y:
        return x, y
    if verb == "take" and x and (holder := _holder(x, state.objects)):
        return x, _name(holder)
    return None


def affordance_hints(state: AbstractState, names: Sequence[str]) -> tuple[str, ...]:
    """What the state says about each object an action names, one line each: ``X: carried``,
    ``X: closed container``, ``X: open container``, ``X: surface`` (a receptacle with no lid),
    ``X: loose here``, ``X: inside Y`` (Y's own line says whether Y is open). A pure reading of the
    state's own text (nothing the state does not show): the state already holds it, spread over a list
    of a dozen facts; one line per named object makes "open an onion", "take what you carry" or "close
    a shelf" as easy to reject as it is for the env. Names the state does not mention get no line."""
    out = []
    for n in names:
        if n in state.inventory:
            out.append(f"{n}: carried")
            continue
        fact = next((f for f in state.objects if _name(f) == n), None)
        if fact is not None:
            status = _STATUS.search(_head(fact))
            kind = ("closed container" if "closed" in status.group(0) else "open container") if status else \
                "surface" if ": " in fact else "loose here"
            out.append(f"{n}: {kind}")
        elif (holder := _holder(n, state.objects)) is not None:
            out.append(f"{n}: inside {_name(holder)}")
    return tuple(out)


def placement_hint(pair: tuple[str, str] | None, known: bool | None) -> str | None:
    """The prompt line for a pair: what the training data says about it (None: no pair)."""
    if pair is None:
        return None
    verdict = {True: "belongs", False: "does not belong", None: "never seen"}[known]
    return f"{pair[0]} in {pair[1]}: {verdict}"


def _placement(item: AnnotationInput, verb: str, x: str, y: str) -> str:
    """For a valid put, whether the item went where it belongs, read off the env's dense score: a
    rise is a sub-goal reached (twc scores each item put in its place). Empty when unknown."""
    if verb != "put" or not item.valid or item.progress is None or item.next_progress is None:
        return ""
    if item.next_progress > item.progress:
        return f"The {x} belongs in the {y}."
    return f"The {x} does not belong in the {y}."


def rule_trace(item: AnnotationInput, max_words: int = 60, portable: frozenset[str] | None = None,
               placements: dict[tuple[str, str], bool] | None = None, task_reading: bool = True) -> str:
    """The deterministic trace of ``RuleAnnotator``; also the LLM annotators' fallback.

    Short and decision-first: why the action is valid or rejected (whether its objects are here,
    carried, open), what moves where, whether a put item belongs there (from the env's score, when
    known), the env's progress when the data has a dense score ("Progress 25 -> 50."; without one, how
    many items are left to put away, counted from the next state), then the reward. Names come from the action and
    the state only, so the pointer form (``exp_format.delex``) turns them into ``@1``/``@2`` and a
    model never has to copy a name it has not seen. ``task_reading`` False drops twc's reading of
    the task (the items-left count and whether a put item belongs).
    """
    try:
        s, s2 = AbstractState.parse(item.state), AbstractState.parse(item.next_state)
    except ValueError:
        verdict = "is accepted" if item.valid else "is rejected"
        return f"The action '{item.action}' {verdict}. {_reward_sentence(item.reward, item.done)}"
    d = diff(s, s2, valid=item.valid, reward=item.reward, done=item.done)
    verb, x, y = _split_action(item.action)
    if not item.valid and not d.changes_state:
        end = " The episode ends." if item.done else ""
        return f"Rejected: {_why_invalid(s, verb, x, y)}. Nothing changes: reward 0.{end}"
    why = _why_valid(s, verb, x, y) if item.valid else ""
    head = (f"Valid: {why}." if why else "Valid.") if item.valid \
        else "Not a listed action, yet it changes the state."
    placed = _placement(item, verb, x, y) if task_reading else ""
    if item.progress is not None and item.next_progress is not None:  # the env's score: no counting needed
        a, b = progress_percent(item.progress), progress_percent(item.next_progress)
        left = f"Progress {a} -> {b}. " if a != b else ""
    else:
        left = _progress(s2, portable, placements) + " " if (d.changes_state and task_reading) else ""
    tail = (placed + " " if placed else "") + left + _reward_sentence(item.reward, item.done)
    budget = max_words - len(head.split()) - len(tail.split()) - 4  # room for "Other facts change too."
    kept: list[str] = []
    for sentence in _changes(s, d):
        if kept and sum(len(k.split()) for k in kept) + len(sentence.split()) > budget:
            kept.append("Other facts change too.")
            break
        kept.append(sentence)
    return " ".join([head, *kept, tail])


class RuleAnnotator:
    """Deterministic traces from the state difference, the env's score and the reward (the offline
    default). ``portable``: object names that can be carried (``portable_items`` of the data), so
    the count of items left to put away skips fixtures; ``placements``: which receptacle items
    belong in (``placement_knowledge`` of the data), so misplaced items count as left too;
    ``task_reading`` False: no twc reading at all (``rule_trace``), for envs whose adapter does not
    declare ``SideChannels.rule_traces``."""

    name = "rule-v4"

    def __init__(self, portable: Iterable[str] | None = None,
                 placements: dict[tuple[str, str], bool] | None = None, task_reading: bool = True):
        self.portable = frozenset(portable) if portable is not None else None
        self.placements = dict(placements) if placements else None
        self.task_reading = task_reading
        if not task_reading:
            self.name = "rule-v4-generic"

    def annotate(self, items: list[AnnotationInput]) -> list[str]:
        return [rule_trace(it, portable=self.portable, placements=self.placements, task_reading=self.task_reading)
                for it in items]


def rule_annotator(table: pa.Table, channels: SideChannels) -> RuleAnnotator:
    """The rule annotator for ``table`` with the side channels the env's adapter provides: the
    portable items and the placement knowledge of the data only where it declares them."""
    return RuleAnnotator(portable=portable_items(table) if channels.rule_traces else None,
                         placements=placement_knowledge(table) if channels.placements else None,
                         task_reading=channels.rule_traces)


def portable_items(table: pa.Table) -> frozenset[str]:
    """Every object name that is carried at some point in ``table`` (state or next_state inventory)."""
    names: set[str] = set()
    for col in ("state", "next_state"):
        for text in dict.fromkeys(table[col].to_pylist()):
            try:
                names.update(AbstractState.parse(text).inventory)
            except ValueError:
                continue
    return frozenset(names)


# --------------------------------------------------------------------------------------------
# Tables

ANNOTATION_COLUMNS = ("reasoning", "annotator", "target")
_NEEDED = ("state", "action", "next_state", "reward", "valid", "done")


def _target_for(row: dict, reasoning: str, scored: bool = False) -> str:
    before = _score_before(row) if scored else None
    after = row.get("score") if scored else None
    delta = diff(AbstractState.parse(row["state"]), AbstractState.parse(row["next_state"]),
                 valid=row["valid"], reward=row["reward"], done=row["done"],
                 progress=progress_percent(0.0 if before is None and scored else before),
                 next_progress=progress_percent(None if after is None else float(after)))
    return render_target(reasoning, delta)[0]


def _score_before(row: dict) -> float | None:
    obs = row.get("obs") or {}
    return float(obs["score"]) if isinstance(obs, dict) and obs.get("score") is not None else None


def annotate_table(table: pa.Table, annotator: Annotator, batch_size: int = 64,
                   progress: Callable[[int, int], None] | None = None, use_score: bool = True) -> pa.Table:
    """Add ``reasoning``, ``annotator`` and ``target`` columns to a table of transitions.

    ``table`` needs the columns state, action, next_state, reward, valid, done (TRANSITION_SCHEMA
    or TRAJECTORY_ROWS_SCHEMA); ``instruction`` is used when present. States must be abstract
    states (``AbstractState.render``): a row that is not raises ValueError naming the row, before
    any annotator call. Identical transitions are annotated once. Existing annotation columns are
    replaced. ``progress(done, total)`` is called after each batch of unique transitions.
    ``use_score`` False: the env's dense score is ignored (an adapter without ``SideChannels.progress``),
    so neither the traces nor the targets carry progress.
    """
    missing = [c for c in _NEEDED if c not in table.column_names]
    if missing:
        raise ValueError(f"annotate_table: missing column(s) {', '.join(missing)}; expected TRANSITION_SCHEMA rows")
    if batch_size < 1:
        raise ValueError("annotate_table: batch_size must be >= 1")
    extra = [c for c in ("instruction", "obs", "score") if c in table.column_names]
    rows = table.select([*_NEEDED, *extra]).to_pylist()
    for i, row in enumerate(rows):
        try:
            _target_for(row, "")
        except ValueError as exc:
            raise ValueError(f"annotate_table: row {i} (action {row['action']!r}): {exc}") from None
    # the env's dense score, when the data has one (imported logs may carry zeros only)
    scored = use_score and any(r.get("score") for r in rows)
    inputs = [AnnotationInput(instruction=r.get("instruction") or "", state=r["state"], action=r["action"],
                              next_state=r["next_state"], reward=float(r["reward"]), valid=bool(r["valid"]),
                              done=bool(r["done"]), progress=_score_before(r) if scored else None,
                              next_progress=float(r["score"]) if scored and r.get("score") is not None else None)
              for r in rows]
    unique = list(dict.fromkeys(inputs))
    traces: dict[AnnotationInput, str] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i:i + batch_size]
        out = annotator.annotate(chunk)
        if len(out) != len(chunk):
            raise AnnotationError(f"annotate_table: annotator {annotator.name!r} returned {len(out)} traces "
                                  f"for {len(chunk)} transitions")
        traces.update(zip(chunk, out))
        if progress:
            progress(min(i + batch_size, len(unique)), len(unique))
    reasoning = [traces[x] for x in inputs]
    targets = [_target_for(r, t, scored) for r, t in zip(rows, reasoning)]
    keep = [c for c in table.column_names if c not in ANNOTATION_COLUMNS]
    out_table = table.select(keep)
    out_table = out_table.append_column("reasoning", pa.array(reasoning, pa.string()))
    out_table = out_table.append_column("annotator", pa.array([annotator.name] * len(rows), pa.string()))
    return out_table.append_column("target", pa.array(targets, pa.string()))


__all__ = ["AnnotationError", "AnnotationInput", "Annotator", "RuleAnnotator", "annotate_table",
           "placement_knowledge", "portable_items", "rule_annotator", "rule_trace"]
