"""M_task, the task writer of the curriculum (paper §4.3, Eq. 6's task generation).

Eq. 6: M_task (the experience model's own weights) is prompted with m seed tasks and writes a
harder-but-feasible variant: an instruction and an initial abstract state. This module builds that
prompt (``build_task_prompt``, ``seed_groups``, ``object_catalogue``), parses the untrusted output
(``parse_task_output`` -> ``TaskProposal`` or ``ParseFailure``, never raises), builds the SFT
examples that teach it (``task_writing_examples``) and samples it (``TaskWriter``). Selecting the
seeds (Eq. 7), the feasibility filter and the task pool are in ``dreamgym_core.curriculum``, which
re-exports every public name here.

Departures from the paper, and why:
- A task here is (instruction, initial abstract state). In TextWorldExpress twc the instruction
  is one generic sentence and the content is the start state (the loose items to put away,
  ``loose_items``), so M_task writes the state; "harder" = more items to handle.
- A from-scratch M_exp has never seen a task-writing prompt, so ``task_writing_examples`` builds
  SFT examples (m sibling seed tasks -> a held-out sibling with at least as many loose items) that
  are mixed into M_exp's SFT: the same weights then serve as M_task.
- Pointer form (the default when M_exp uses pointers): the prompt lists the objects already seen
  in the seeds' location (``object_catalogue``) as @1..@n and M_task writes the new state's objects
  as pointers into that list, so a variant recombines the world's objects instead of spelling new
  ones (a from-scratch 3.4M model spelling names freely wrote "coat duvet | laundry room empty").
  With the parent's start state as template, only the objects line is read and the rest of the
  room is the parent's (``parse_task_output``).
- Grammar-constrained decoding: M_task decodes inside its output grammar (``next_task_constraint`` /
  ``TaskConstraint``): the field names, pointers that exist in the catalogue (none repeated) and the
  end are forced, so a small M_task's proposals parse (free decoding: 3 of 22 in the README's demo,
  most pointers out of range); what it writes inside the grammar is still the model's.

Usage::

    groups = seed_groups(seeds, existing_tasks, existing_states, 2, seed=k)
    cats = [object_catalogue(existing_states.values())[location_of(existing_states[t.task_id])] for t in seeds]
    prompts = [build_task_prompt(g, existing_states, 2, c) for g, c in zip(groups, cats)]
    texts = TaskWriter(m_exp_model, tokenizer, seed=k).write(prompts, cats)   # grammar-constrained
    proposals = [parse_task_output(t, c, existing_states[s.task_id]) for t, c, s in zip(texts, cats, seeds)]
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch

from dreamgym_core.schema import Task
from dreamgym_core.state import AbstractState

TASK_OPEN, TASK_CLOSE = "## seed tasks", "## new task"


# --------------------------------------------------------------------------------------------
# M_task: prompt, parser, SFT examples, writer

def _task_block(task: Task, state: str) -> str:
    return f"instruction: {task.instruction}\n{state}"


def location_of(state: str) -> str:
    try:
        return AbstractState.parse(state).location
    except ValueError:
        return ""


def object_catalogue(states: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """location -> the sorted distinct object facts its parseable states show (what M_task recombines)."""
    out: dict[str, set[str]] = {}
    for text in states:
        try:
            st = AbstractState.parse(text)
        except ValueError:
            continue
        out.setdefault(st.location, set()).update(st.objects)
    return {loc: tuple(sorted(objs)) for loc, objs in out.items()}


def build_task_prompt(seeds: Sequence[Task], states: Mapping[str, str], m: int,
                      catalogue: Sequence[str] | None = None) -> str:
    """m seed tasks (instruction + initial state), the catalogue as @1..@n (pointer form), then the
    header M_task continues after."""
    if not seeds:
        raise ValueError("build_task_prompt: no seed tasks")
    blocks = [f"# seed {i + 1}\n" + _task_block(t, states[t.task_id]) for i, t in enumerate(seeds[:m])]
    if catalogue is not None:
        blocks.append("# objects\n" + "\n".join(f"@{i} {o}" for i, o in enumerate(catalogue, 1)))
    return f"{TASK_OPEN}\n" + "\n".join(blocks) + f"\n{TASK_CLOSE}"


def seed_groups(seeds: Sequence[Task], pool: Sequence[Task], states: Mapping[str, str], m: int,
                seed: int = 0) -> list[list[Task]]:
    """Per seed, the m tasks its prompt shows: the seed, then other tasks of the same room (other
    seeds first, then the pool, drawn with ``seed``), as ``task_writing_examples`` trained M_task on.
    ``states`` must hold every task's start state."""
    rng = random.Random(seed)
    by_room: dict[str, list[Task]] = {}
    for t in sorted({t.task_id: t for t in pool}.values(), key=lambda t: t.task_id):
        by_room.setdefault(location_of(states.get(t.task_id, "")), []).append(t)
    out = []
    for t in seeds:
        room = location_of(states[t.task_id])
        others = [o for o in seeds if o.task_id != t.task_id and location_of(states[o.task_id]) == room]
        rest = [o for o in by_room.get(room, []) if o.task_id != t.task_id and o not in others]
        rng.shuffle(rest)
        out.append([t, *(others + rest)[:m - 1]])
    return out


def _pointer_block(task: Task, state: str, catalogue: Sequence[str]) -> str:
    """A task block whose objects are @k pointers into ``catalogue`` (every object must be in it)."""
    st = AbstractState.parse(state)
    index = {o: i for i, o in enumerate(catalogue, 1)}
    # replace, not make: make would re-sort the pointers as text
    return _task_block(task, replace(st, objects=tuple(f"@{index[o]}" for o in st.objects)).render())


@dataclass(frozen=True)
class TaskProposal:
    instruction: str
    state: str
    """The canonical rendered initial state."""
    reasoning: str = ""


@dataclass(frozen=True)
class ParseFailure:
    reason: str


def parse_task_output(text: str, catalogue: Sequence[str] | None = None,
                      template: str | None = None) -> TaskProposal | ParseFailure:
    """M_task's output -> a proposal, or a failure with a short reason. Never raises.

    With ``catalogue`` (pointer form) every object must be a pointer @k into it (1-based). With a
    ``template`` too (the parent's start state, whose room the catalogue lists), only the
    instruction and the objects line are read and only the loose items pointed at are taken: the
    room (feedback, location, furniture, exits, inventory) is the template's, so a variant is the
    parent's room holding other items of that room."""
    try:
        return _parse_task(text, catalogue, template)
    except Exception as exc:  # untrusted model text: any surprise is a parse failure, not a crash
        return ParseFailure(f"error:{type(exc).__name__}")


_POINTER = re.compile(r"@([0-9]{1,4})")


def _resolve(pointers: Sequence[str], catalogue: Sequence[str]) -> list[str] | None:
    out = []
    for o in pointers:
        m = _POINTER.fullmatch(o)
        if m is None or not 1 <= int(m.group(1)) <= len(catalogue):
            return None
        out.append(catalogue[int(m.group(1)) - 1])
    return out


def _parse_task(text: str, catalogue: Sequence[str] | None = None,
                template: str | None = None) -> TaskProposal | ParseFailure:
    if not isinstance(text, str):
        return ParseFailure("not-text")
    body, reasoning = text.strip(), ""
    if body.startswith("<think>"):
        end = body.find("</think>")
        if end < 0:
            return ParseFailure("unclosed-think")
        reasoning, body = body[len("<think>"):end].strip(), body[end + len("</think>"):].strip()
    lines = body.split("\n")
    if not lines or not lines[0].startswith("instruction:"):
        return ParseFailure("missing-instruction")
    instruction = lines[0][len("instruction:"):].strip()
    if not instruction:
        return ParseFailure("empty-instruction")
    state_lines = lines[1:6]
    if catalogue is not None and template is not None:
        objs = next((ln[len("objects:"):] for ln in state_lines if ln.startswith("objects:")), None)
        if objs is None:
            return ParseFailure("missing-objects")
        resolved = _resolve([o.strip() for o in objs.split("|") if o.strip()], catalogue)
        if resolved is None:
            return ParseFailure("bad-pointer")
        base = AbstractState.parse(template)
        furniture = [o for o in base.objects if not _is_loose(o)]
        state = AbstractState.make(base.feedback, base.location, furniture + [o for o in resolved if _is_loose(o)],
                                   base.exits, base.inventory)
        return TaskProposal(instruction, state.render(), reasoning)
    if len(state_lines) < 5:
        return ParseFailure("short-state")
    try:
        state = AbstractState.parse("\n".join(state_lines))
    except ValueError as exc:
        return ParseFailure("bad-state:" + str(exc).split(":")[0][:40])
    if catalogue is not None:
        objects = _resolve(state.objects, catalogue)
        if objects is None:
            return ParseFailure("bad-pointer")
        state = AbstractState.make(state.feedback, state.location, objects, state.exits, state.inventory)
    return TaskProposal(instruction, state.render(), reasoning)


def _is_loose(fact: str) -> bool:
    return ":" not in fact and not fact.endswith(("(open)", "(closed)"))


def loose_items(state: str) -> list[str]:
    """Objects lying free (no contents, no open/closed status): what twc tasks ask to put away."""
    try:
        s = AbstractState.parse(state)
    except ValueError:
        return []
    return [o for o in s.objects if _is_loose(o)] + list(s.inventory)


def task_writing_examples(tasks: Sequence[Task], states: Mapping[str, str], m: int, n: int, seed: int = 0,
                          pointers: bool = True):
    """SFT examples that teach M_exp's weights to write tasks (then they serve as M_task).

    Prompt: m seed tasks of one location; target: a short rationale + another task of the same
    location with at least as many loose items as the hardest seed (a harder-or-equal sibling).
    ``pointers``: the prompt carries the location's ``object_catalogue`` of ``states`` and the
    target's objects are pointers into it.
    """
    from dreamgym_core.experience_model import SFTExample

    rng = random.Random(seed)
    by_loc: dict[str, list[Task]] = {}
    for t in sorted(tasks, key=lambda t: t.task_id):
        try:
            loc = AbstractState.parse(states[t.task_id]).location
        except (KeyError, ValueError):
            continue
        by_loc.setdefault(loc, []).append(t)
    pools = [ts for ts in by_loc.values() if len(ts) > m]
    catalogues = object_catalogue([states[t.task_id] for ts in pools for t in ts]) if pointers else {}
    out = []
    for _ in range(n if pools else 0):
        group = rng.choice(pools)
        picked = rng.sample(group, m + 1)
        seeds, target = picked[:m], picked[m]
        hardest = max(len(loose_items(states[s.task_id])) for s in seeds)
        items = loose_items(states[target.task_id])
        if len(items) < hardest:
            continue
        loc = AbstractState.parse(states[target.task_id]).location
        if pointers:
            cat = catalogues[loc]
            reasoning = (f"<think>The seeds are in the {loc} with at most {hardest} items to put away; "
                         f"the new task has {len(items)}.</think>\n")
            out.append(SFTExample(build_task_prompt(seeds, states, m, cat), reasoning,
                                  _pointer_block(target, states[target.task_id], cat)))
        else:
            reasoning = (f"<think>The seeds are in the {loc} with at most {hardest} items to put away; "
                         f"the new task has {len(items)}: {', '.join(items)}.</think>\n")
            out.append(SFTExample(build_task_prompt(seeds, states, m), reasoning,
                                  _task_block(target, states[target.task_id])))
    return out


TASK_FIELDS = ("instruction", "feedback", "location", "objects", "exits", "inventory")
"""The lines of M_task's output after its reasoning, in order (``_task_block``)."""
END = "<end>"
"""``next_task_constraint`` choice: the output is complete, only the end-of-sequence token may follow."""
MAX_THINK_CHARS = 400
"""The reasoning is closed after this many characters (the trained one is about 100)."""
MAX_LINE_CHARS = 400
"""A free line value is ended after this many characters."""


@dataclass(frozen=True)
class GrammarStep:
    """What may follow M_task's output so far: one of ``allowed`` (forced), or free text when None."""

    allowed: tuple[str, ...] | None = None
    newline_ok: bool = True
    """Free text may end its line here (False while a required value is still blank)."""
    end_ok: bool = False
    """Free text may end the output here (the last field's value)."""


_FREE = GrammarStep()
_POINTERS = re.compile(r"( @[0-9]+)( \| @[0-9]+)*")


def _pointer_step(value: str, n: int, tight: bool) -> GrammarStep:
    """The objects line in pointer form: " @a | @b ..." with 1 <= a, b <= n, none repeated."""
    if value == "":
        return GrammarStep(tuple(f" @{k}" for k in range(1, n + 1)) or ("\n",))
    if _POINTERS.fullmatch(value) is None:
        return _FREE  # off the grammar (cannot happen under the constraint): leave it to the parser
    nums = re.findall(r"@([0-9]+)", value)
    last, used = nums[-1], {int(x) for x in nums[:-1]}
    # a digit may extend the last pointer while the number stays in range (@1 -> @12 when n >= 12)
    choices = [d for d in "0123456789" if int(last + d) <= n] if not tight and last[0] != "0" else []
    if 1 <= int(last) <= n and int(last) not in used and last[0] != "0":
        used.add(int(last))
        choices = ["\n"] + ([] if tight else [f" | @{k}" for k in range(1, n + 1) if k not in used]) + choices
    return GrammarStep(tuple(choices)) if choices else _FREE


def next_task_constraint(text: str, n_objects: int | None = None, *, template: bool = False,
                         tokens_left: int | None = None, reserve: int = 40) -> GrammarStep:
    """M_task's output grammar: what must or may follow ``text`` (the output so far).

    ``<think>`` opens the output and the reasoning is free until ``</think>``; then one line per
    field of ``TASK_FIELDS``, each opened by its forced name; values are free text except, in
    pointer form (``n_objects`` = the prompt's catalogue size), the objects line, which is only
    pointers @1..@n into the catalogue, none repeated, joined by " | ". With ``template`` the output
    ends after the objects line (``parse_task_output`` takes the rest of the room from the parent).
    Free text may not end the output before the last field, nor leave the instruction or the
    location blank. ``tokens_left`` <= ``reserve`` (the generation budget runs out): the reasoning
    is closed and each non-blank free line ended at once, so the objects line is written before
    the budget ends. Pure; off-grammar text (impossible under the constraint) gives free text."""
    tight = tokens_left is not None and tokens_left <= reserve
    if not text.strip():
        return GrammarStep(("<think>",))
    head, sep, after = text.partition("</think>")
    if not sep:
        return GrammarStep(("</think>",)) if tight or len(head) > MAX_THINK_CHARS else _FREE
    if after == "":
        return GrammarStep(("\n",))
    if not after.startswith("\n"):
        return _FREE
    fields = TASK_FIELDS[:4] if template else TASK_FIELDS
    *written, current = after[1:].split("\n")
    if len(written) > len(fields) or any(not ln.startswith(f + ":") for ln, f in zip(written, fields)):
        return _FREE
    if len(written) == len(fields):
        return GrammarStep((END,))
    field_name = fields[len(written)]
    if current == "":
        return GrammarStep((field_name + ":",))
    if not current.startswith(field_name + ":"):
        return _FREE
    value = current[len(field_name) + 1:]
    if field_name == "objects" and n_objects is not None:
        return _pointer_step(value, n_objects, tight)
    blank = not value.strip()
    if not blank and (tight or len(value) > MAX_LINE_CHARS):
        return GrammarStep(("\n",))
    return GrammarStep(None, newline_ok=not (blank and field_name in ("instruction", "location")),
                       end_ok=field_name == fields[-1] and not template)


class TaskConstraint:
    """A transformers ``LogitsProcessor`` that keeps each row of M_task's generation inside
    ``next_task_constraint``: where the grammar forces a choice of strings, every token that does not
    continue one of them gets -inf; in free text the end-of-sequence token (unless ``end_ok``) and
    tokens holding a newline other than a lone one (which would skip a field) are masked. Like
    ``experience_model.FormatConstraint`` this removes format failures, not content: the
    reasoning, the instruction and which objects are pointed at stay the model's.

    ``n_objects``: per row, the size of its prompt's catalogue (None: literal form);
    ``prompt_len``: columns of ``input_ids`` that are the (left-padded) prompt."""

    _vocab_cache: dict[int, tuple[frozenset[int], frozenset[int]]] = {}

    def __init__(self, tokenizer, prompt_len: int, n_objects: Sequence[int | None], *, template: bool,
                 max_new_tokens: int, reserve: int = 40):
        self.tok, self.prompt_len, self.n_objects = tokenizer, prompt_len, list(n_objects)
        self.template, self.max_new_tokens, self.reserve = template, max_new_tokens, reserve
        self._enc: dict[str, list[int]] = {}
        self._pending: dict[int, tuple[list[list[int]], int]] = {}
        self.multiline, self.newline = self._newline_ids(tokenizer)

    @classmethod
    def _newline_ids(cls, tok) -> tuple[frozenset[int], frozenset[int]]:
        """(ids whose text holds a newline but is not one lone newline, ids whose text holds one)."""
        key = hash((id(tok), len(tok)))
        if key not in cls._vocab_cache:
            texts = [tok.decode([i]) for i in range(len(tok))]
            nl = frozenset(i for i, t in enumerate(texts) if "\n" in t)
            cls._vocab_cache[key] = (frozenset(i for i in nl if texts[i] != "\n"), nl)
        return cls._vocab_cache[key]

    def _ids(self, text: str) -> list[int]:
        if text not in self._enc:
            self._enc[text] = [self.tok.eos_token_id] if text == END else \
                self.tok(text, add_special_tokens=False)["input_ids"]
        return self._enc[text]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n_gen = input_ids.shape[1] - self.prompt_len
        eos = self.tok.eos_token_id
        for b in range(input_ids.shape[0]):
            row = input_ids[b, self.prompt_len:].tolist()
            if eos in row:
                continue  # finished: generate pads it, whatever the scores
            pending = self._pending.pop(b, None)
            if pending is not None:  # advance along the allowed sequences by the token just chosen
                seqs, pos = pending
                seqs = [q for q in seqs if q[pos] == row[-1]]
                if seqs and all(len(q) > pos + 1 for q in seqs):
                    self._pending[b] = (seqs, pos + 1)
            if b not in self._pending:
                step = next_task_constraint(self.tok.decode(row, skip_special_tokens=True), self.n_objects[b],
                                            template=self.template, tokens_left=self.max_new_tokens - n_gen,
                                            reserve=self.reserve)
                if step.allowed is None:
                    ban = set(self.newline if not step.newline_ok else self.multiline)
                    if not step.end_ok:
                        ban.add(eos)
                    ban = sorted(i for i in ban if i < scores.shape[-1])
                    if ban:
                        scores[b, ban] = float("-inf")
                    continue
                self._pending[b] = ([self._ids(a) for a in step.allowed], 0)
            seqs, pos = self._pending[b]
            keep = torch.tensor(sorted({q[pos] for q in seqs}), device=scores.device)
            masked = torch.full_like(scores[b], float("-inf"))
            masked[keep] = scores[b, keep]
            scores[b] = masked
        return scores


class TaskWriter:
    """M_task: M_exp's weights prompted to write task variants (batched, left-padded, seeded sampling),
    decoded inside its output grammar (``TaskConstraint``) unless ``constrained`` is False."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 160, temperature: float = 1.0,
                 batch_size: int = 16, seed: int = 0, pointers: bool = True, constrained: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.pointers = pointers
        """Pointer form: prompts carry an object catalogue and outputs point into it (as trained)."""
        self.constrained = constrained
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.batch_size, self.seed = batch_size, seed

    def write(self, prompts: Sequence[str], catalogues: Sequence[Sequence[str] | None] | None = None,
              template: bool = True) -> list[str]:
        """One text per prompt. ``catalogues``: per prompt, the catalogue it lists (pointer form; the
        constraint keeps pointers inside it); ``template``: the output stops after the objects line
        (the parent's room supplies the rest, ``parse_task_output`` with a template)."""
        if catalogues is not None and len(catalogues) != len(prompts):
            raise ValueError(f"TaskWriter.write: {len(catalogues)} catalogues for {len(prompts)} prompts")
        from transformers import LogitsProcessorList

        tok, out = self.tokenizer, []
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(self.model.parameters()).device
        self.model.eval()
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            ids = [tok(p + "\n", add_special_tokens=False)["input_ids"][-448:] for p in chunk]
            P = max(len(x) for x in ids)
            inp = torch.full((len(ids), P), pad, dtype=torch.long)
            attn = torch.zeros((len(ids), P), dtype=torch.long)
            for b, x in enumerate(ids):
                inp[b, P - len(x):] = torch.tensor(x)
                attn[b, P - len(x):] = 1
            processors = None
            if self.constrained:
                cats = catalogues[start:start + len(chunk)] if catalogues is not None else [None] * len(chunk)
                n_objects = [len(c) if c is not None and self.pointers else None for c in cats]
                processors = LogitsProcessorList([TaskConstraint(
                    tok, P, n_objects, template=template and catalogues is not None and self.pointers,
                    max_new_tokens=self.max_new_tokens)])
            torch.manual_seed(self.seed * 100_003 + start)
            with torch.no_grad():
                gen = self.model.generate(input_ids=inp.to(device), attention_mask=attn.to(device),
                                          max_new_tokens=self.max_new_tokens, do_sample=True,
                                          temperature=self.temperature, top_p=None, top_k=None,
                                          logits_processor=processors, pad_token_id=pad,
                                          eos_token_id=tok.eos_token_id)
            for row in gen[:, P:].tolist():
                if tok.eos_token_id in row:
                    row = row[:row.index(tok.eos_token_id)]
                out.append(tok.decode(row, skip_special_tokens=True))
        return out
