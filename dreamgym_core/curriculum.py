"""The curriculum (paper §4.3, Eq. 6-7): reward-variance task selection and task synthesis with M_task.

Eq. 7: V_tau = (1/n) sum_i (r_i - mean r)^2 over the n rollouts of task tau (episode returns). A
task the policy always solves or always fails (V = 0) teaches nothing; tasks near a 50/50 split
(V = 0.25 for binary rewards) are the most informative, so they seed new tasks. GRPO's group is
the task's rollout group; PPO (one rollout per task) groups similar tasks by k-means over their
embeddings and scores each cluster.

Eq. 6: M_task (the experience model's own weights) is prompted with m seed tasks and writes a
harder-but-feasible variant: an instruction and an initial abstract state. Variants pass a
feasibility filter (dedupe, format, a quick simulation in M_exp) and join the next iteration's
task pool, at most a fraction lambda of it. Each iteration's rollout batch gives synthetic tasks
the share lambda whenever the pool has some (``draw_batch``: originals and synthetic drawn apart,
the newest variants first), so a variant kept in iteration k is trained on in k + 1.

Departures from the paper, and why:
- A task here is (instruction, initial abstract state). In TextWorldExpress twc the instruction
  is one generic sentence and the content is the start state (the loose items to put away), so
  M_task writes the state; "harder" = more items to handle. Synthetic tasks are trained on only
  in M_exp (no real env can reset to them), as in the paper.
- A from-scratch M_exp has never seen a task-writing prompt, so ``task_writing_examples`` builds
  SFT examples (m sibling seed tasks -> a held-out sibling with at least as many loose items) that
  are mixed into M_exp's SFT: the same weights then serve as M_task.
- Pointer form (the default when M_exp uses pointers): the prompt lists the objects already seen
  in the seeds' location (``object_catalogue``) as @1..@n and M_task writes the new state's objects
  as pointers into that list, so a variant recombines the world's objects instead of spelling new
  ones (a from-scratch 3.4M model spelling names freely wrote "coat duvet | laundry room empty").
  The filter still drops names no existing task has (literal form).
- Feasibility also rejects variants that M_exp itself declares unplayable (every rollout ends on
  an invalid or unparseable step): the paper's "feasible" is judged by its LLM; ours is measured.
- M_task decodes inside its output grammar (``next_task_constraint`` / ``TaskConstraint``): the
  field names, pointers that exist in the catalogue (none repeated) and the end are forced, so a
  small M_task's proposals parse (free decoding: 3 of 22 in the README's demo, most pointers out of
  range); what it writes inside the grammar is still the model's.
- The paper does not say how the pool is sampled; a pool of ~300 originals sampled as one urn gave
  a synthetic task 0.1 place per iteration, so ``draw_batch`` reserves max(1, floor(lambda * n)).

Usage (one curriculum step)::

    scores = task_reward_variance(trajs)                              # Eq. 7 per task
    sel = select_seed_tasks(scores, threshold=0.0, top_m=4)
    seeds = [tasks_by_id[t] for t in sel.selected]
    cats = [catalogues[location_of(existing_states[t.task_id])] for t in seeds]   # object_catalogue(...)
    groups = seed_groups(seeds, existing_tasks, existing_states, 2, seed=k)
    prompts = [build_task_prompt(g, existing_states, 2, c) for g, c in zip(groups, cats)]
    texts = TaskWriter(m_exp_model, tokenizer, seed=k).write(prompts, cats)   # M_task, grammar-constrained
    kept, report = synthesize(texts, seeds, existing_tasks, existing_states, simulate, k, cfg, cats,
                              [existing_states[t.task_id] for t in seeds])
    rows = proposals_table(k, report["rows"])                      # every proposal and its fate
    pool = build_task_pool(original_tasks, old_synthetic + kept, cfg.lam, size, seed=k)
    batch = draw_batch(pool, n, cfg.lam, k + 1)                    # iteration k+1's rollout tasks
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from dreamgym_core.rl.core_algos import reward_variance
from dreamgym_core.schema import PROPOSAL_SCHEMA, Task, Trajectory
from dreamgym_core.state import AbstractState

TASK_OPEN, TASK_CLOSE = "## seed tasks", "## new task"
DROP_REASONS = ("parse", "duplicate", "format", "unknown", "trivial", "invalid")


@dataclass(frozen=True)
class CurriculumConfig:
    enabled: bool = True
    """Ablation switch: False = no M_task, and no synthetic task in any pool or rollout batch."""
    threshold: float = 0.0
    """Seeds need V_tau strictly above this."""
    top_m: int = 4
    """At most this many seeds (highest V_tau first)."""
    lam: float = 0.3
    """At most this share of a task pool is synthetic; each rollout batch gives synthetic tasks this
    share (at least one place) whenever the pool has some (``draw_batch``)."""
    variants_per_seed: int = 2
    seeds_per_prompt: int = 2
    """m: seed tasks shown to M_task in one prompt."""
    n_feasibility_rollouts: int = 3
    max_state_chars: int = 1200
    cluster_size: int = 4
    """PPO: about this many tasks per embedding cluster."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"CurriculumConfig.lam must be in [0, 1], got {self.lam}")
        for name in ("top_m", "variants_per_seed", "seeds_per_prompt", "n_feasibility_rollouts", "cluster_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"CurriculumConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"CurriculumConfig.threshold must be a finite value >= 0, got {self.threshold}")


# --------------------------------------------------------------------------------------------
# Eq. 7: reward variance per task (GRPO group) or per embedding cluster (PPO)

def task_reward_variance(trajs: Sequence[Trajectory]) -> dict[str, tuple[float, int, float]]:
    """task_id -> (V_tau, n rollouts, mean return), V_tau the population variance of episode returns."""
    if not trajs:
        return {}
    ids = sorted({t.task.task_id for t in trajs})
    index = {t: i for i, t in enumerate(ids)}
    rewards = torch.tensor([t.ret for t in trajs], dtype=torch.float64)
    groups = torch.tensor([index[t.task.task_id] for t in trajs])
    uniq, var = reward_variance(rewards, groups)
    counts = torch.bincount(groups, minlength=len(ids))
    sums = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, groups, rewards)
    return {ids[int(g)]: (float(v), int(counts[g]), float(sums[g] / counts[g])) for g, v in zip(uniq, var)}


def cluster_groups(task_ids: Sequence[str], embeddings, k: int, seed: int = 0, iters: int = 25) -> list[int]:
    """k-means (cosine, k-means++ init, deterministic for a seed) over task embeddings -> cluster per task."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != len(task_ids):
        raise ValueError(f"cluster_groups: need one embedding row per task ({len(task_ids)}), got shape {x.shape}")
    n = len(task_ids)
    if n == 0:
        return []
    k = max(1, min(k, n))
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(n)]]
    for _ in range(1, k):
        d = np.min(1.0 - x @ np.stack(centers).T, axis=1).clip(min=0)
        centers.append(x[rng.choice(n, p=d / d.sum())] if d.sum() > 0 else x[rng.integers(n)])
    c = np.stack(centers)
    assign = np.zeros(n, dtype=int)
    for _ in range(iters):
        new = np.argmax(x @ c.T, axis=1)
        if _ and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                m = members.mean(0)
                c[j] = m / max(np.linalg.norm(m), 1e-12)
    return assign.tolist()


def cluster_variance(trajs: Sequence[Trajectory], cluster_of: Mapping[str, int]) -> dict[str, tuple[float, int, float]]:
    """PPO's grouping: every task gets the V_tau of its cluster (rollouts of all its tasks pooled)."""
    by_cluster: dict[int, list[float]] = {}
    for t in trajs:
        by_cluster.setdefault(cluster_of[t.task.task_id], []).append(t.ret)
    stats = {}
    for c, rs in by_cluster.items():
        mean = sum(rs) / len(rs)
        stats[c] = (sum((r - mean) ** 2 for r in rs) / len(rs), len(rs), mean)
    return {tid: stats[c] for tid, c in cluster_of.items() if c in stats}


@dataclass(frozen=True)
class Selection:
    selected: tuple[str, ...]
    threshold: float
    top_m: int
    edges: tuple[float, ...]
    counts: tuple[int, ...]

    def as_record(self) -> dict:
        return {"selected": list(self.selected), "threshold": self.threshold, "top_m": self.top_m,
                "edges": list(self.edges), "counts": list(self.counts)}


def select_seed_tasks(scores: Mapping[str, tuple[float, int, float]], threshold: float, top_m: int,
                      bins: int = 10) -> Selection:
    """Tasks with V_tau > threshold, the top_m highest (ties by task id); with the V histogram on [0, 0.25]."""
    vs = [v[0] for v in scores.values()]
    counts, edges = np.histogram(vs, bins=bins, range=(0.0, max(0.25, max(vs, default=0.0))))
    above = sorted((tid for tid, v in scores.items() if v[0] > threshold), key=lambda t: (-scores[t][0], t))
    return Selection(tuple(above[:top_m]), float(threshold), int(top_m), tuple(float(e) for e in edges),
                     tuple(int(c) for c in counts))


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


def recombine_tasks(tasks: Sequence[Task], states: Mapping[str, str], n: int, iteration: int, *, extra: int = 0,
                    seed: int = 0) -> list[Task]:
    """A rule-based task writer beside M_task: ``n`` variants that recombine the loose items of
    same-room tasks. Each variant is a task's start state with one of its loose items swapped for
    (``extra=0``: same item count, a pair no task has) or joined by ``extra`` more (harder: more
    items) loose items of other tasks of the same room. Only objects some task already shows, in a
    room that shows them, so M_exp's placement rewards are grounded in its data; a state equal to an
    existing task's (or an earlier variant's) is not written. Departure: the paper's M_task is an
    LLM; a from-scratch M_exp writes few usable variants (README, the curriculum), so this writer
    gives the loop new contexts for known objects, which is where a converged BC policy still fails
    on unseen games. Returns at most ``n`` tasks (fewer when the rooms run out of new pairs)."""
    if n < 0 or extra < 0:
        raise ValueError(f"recombine_tasks: n and extra must be >= 0 (got {n}, {extra})")
    rng = random.Random(f"{seed}|{iteration}|recombine")
    by_room: dict[str, list[Task]] = {}
    parsed: dict[str, AbstractState] = {}
    for t in sorted(tasks, key=lambda t: t.task_id):
        try:
            st = parsed[t.task_id] = AbstractState.parse(states[t.task_id])
        except (KeyError, ValueError):
            continue
        if any(_is_loose(o) for o in st.objects):
            by_room.setdefault(st.location, []).append(t)
    seen = {_norm(st.render()) for st in parsed.values()}
    rooms = sorted(r for r, ts in by_room.items() if len(ts) > 1)
    out: list[Task] = []
    for _ in range(20 * max(n, 1)):
        if len(out) >= n or not rooms:
            break
        room = rng.choice(rooms)
        base = rng.choice(by_room[room])
        st = parsed[base.task_id]
        mine = [o for o in st.objects if _is_loose(o)]
        pool = sorted({o for t in by_room[room] for o in parsed[t.task_id].objects if _is_loose(o)} - set(mine))
        k = extra or 1  # swap one item, or add ``extra``
        if len(pool) < k:
            continue
        new = rng.sample(pool, k)
        drop = rng.choice(mine) if extra == 0 else None
        objects = [o for o in st.objects if o != drop] + new
        variant = AbstractState.make(st.feedback, st.location, objects, st.exits, st.inventory)
        text = variant.render()
        if _norm(text) in seen:
            continue
        seen.add(_norm(text))
        h = hashlib.sha256(text.encode()).hexdigest()[:10]
        out.append(replace(base, task_id=f"syn/{iteration:03d}/r{h}", source="synthetic",
                           parent_task_id=base.task_id, iteration=iteration, initial_state=text))
    return out


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


# --------------------------------------------------------------------------------------------
# Feasibility filter and the task pool

def _norm(state: str) -> str:
    try:
        s = AbstractState.parse(state)
        return "\n".join([s.location, " | ".join(s.objects), " | ".join(s.exits), " | ".join(s.inventory)])
    except ValueError:
        return state.strip().lower()


def _vocabulary(states: Sequence[str]) -> tuple[set[str], set[str]]:
    """Locations and entity names (objects, contents, inventory) of parseable states."""
    places, names = set(), set()
    for text in states:
        try:
            st = AbstractState.parse(text)
        except ValueError:
            continue
        places.add(st.location)
        names.update(st.entities())
    return places, names


def _unknown(state: str, places: set[str], names: set[str]) -> list[str]:
    """What ``state`` names that the vocabulary does not (empty = all known)."""
    st = AbstractState.parse(state)
    return ([st.location] if st.location not in places else []) + [e for e in st.entities() if e not in names]


def synthetic_task_id(iteration: int, proposal: TaskProposal) -> str:
    h = hashlib.sha256((proposal.instruction + "\n" + proposal.state).encode()).hexdigest()[:10]
    return f"syn/{iteration:03d}/{h}"


def feasibility_filter(proposals: Sequence[TaskProposal | ParseFailure], parents: Sequence[Task],
                       existing_tasks: Sequence[Task], existing_states: Mapping[str, str],
                       simulate: Callable[[list[Task]], list[Trajectory]], iteration: int,
                       cfg: CurriculumConfig = CurriculumConfig()) -> tuple[list[Task], list[dict]]:
    """Keep feasible variants; every proposal gets a row (kept or the drop reason).

    Drops: ``parse`` (did not parse), ``duplicate`` (same state as an existing task or an earlier
    proposal), ``format`` (no item to act on, or too long), ``unknown`` (a location or object that no
    existing task's state names: M_task may recombine the world's objects, not invent them; M_exp
    knows nothing of an invented one), ``trivial`` (every simulated rollout won), ``invalid`` (every
    rollout ended on an invalid or unparseable M_exp step). Rows carry the proposed state.
    """
    if len(proposals) != len(parents):
        raise ValueError(f"feasibility_filter: {len(proposals)} proposals but {len(parents)} parents")
    rows: list[dict] = []
    seen = {_norm(existing_states[t.task_id]) for t in existing_tasks if t.task_id in existing_states}
    seen |= {_norm(t.initial_state) for t in existing_tasks if t.initial_state}
    places, names = _vocabulary(list(existing_states.values()) + [t.initial_state for t in existing_tasks
                                                                  if t.initial_state])
    candidates: list[tuple[int, Task]] = []
    for i, (p, parent) in enumerate(zip(proposals, parents)):
        row = {"index": i, "parent_task_id": parent.task_id, "task_id": None, "kept": False, "reason": ""}
        rows.append(row)
        if isinstance(p, ParseFailure):
            row["reason"] = "parse"
            continue
        key = _norm(p.state)
        if key in seen:
            row["reason"] = "duplicate"
            continue
        seen.add(key)
        row["state"] = p.state
        if not loose_items(p.state) or len(p.state) > cfg.max_state_chars:
            row["reason"] = "format"
            continue
        if names and _unknown(p.state, places, names):
            row["reason"] = "unknown"
            continue
        task = Task(task_id=synthetic_task_id(iteration, p), env=parent.env, game=parent.game, split="train",
                    seed=parent.seed, instruction=p.instruction, params=parent.params, source="synthetic",
                    parent_task_id=parent.task_id, iteration=iteration, initial_state=p.state)
        row["task_id"] = task.task_id
        candidates.append((i, task))
    kept: list[Task] = []
    if candidates:
        trajs = simulate([t for _, t in candidates])
        by_task: dict[str, list[Trajectory]] = {}
        for tr in trajs:
            by_task.setdefault(tr.task.task_id, []).append(tr)
        for i, task in candidates:
            runs = by_task.get(task.task_id, [])
            if runs and all(t.won for t in runs):
                rows[i]["reason"] = "trivial"
            elif runs and all(t.steps and not t.steps[-1].valid and not t.won for t in runs):
                rows[i]["reason"] = "invalid"
            else:
                rows[i]["kept"] = True
                kept.append(task)
    return kept, rows


def synthesize(texts: Sequence[str], parents: Sequence[Task], existing_tasks: Sequence[Task],
               existing_states: Mapping[str, str], simulate, iteration: int,
               cfg: CurriculumConfig = CurriculumConfig(),
               catalogues: Sequence[Sequence[str] | None] | None = None,
               templates: Sequence[str | None] | None = None) -> tuple[list[Task], dict]:
    """Parse M_task's texts and filter them -> (kept tasks, report with counts per drop reason).

    ``catalogues`` / ``templates``: per text, the object catalogue its prompt carried and the
    parent's start state (pointer form; see ``parse_task_output``), or None."""
    for name, seq in (("catalogues", catalogues), ("templates", templates)):
        if seq is not None and len(seq) != len(texts):
            raise ValueError(f"synthesize: {len(seq)} {name} for {len(texts)} texts")
    cats = catalogues if catalogues is not None else [None] * len(texts)
    temps = templates if templates is not None else [None] * len(texts)
    proposals = [parse_task_output(t, c, tp) for t, c, tp in zip(texts, cats, temps)]
    kept, rows = feasibility_filter(proposals, parents, existing_tasks, existing_states, simulate, iteration, cfg)
    for row, p, text in zip(rows, proposals, texts):
        row["parse_error"] = p.reason if isinstance(p, ParseFailure) else ""
        row["text"] = text
    drops = Counter(r["reason"] for r in rows if not r["kept"])
    parse_reasons = Counter(p.reason for p in proposals if isinstance(p, ParseFailure))
    parsed = sum(not isinstance(p, ParseFailure) for p in proposals)
    return kept, {"proposals": len(texts), "parsed": parsed, "parse_rate": parsed / len(texts) if texts else None,
                  "kept": len(kept), "drops": {r: drops.get(r, 0) for r in DROP_REASONS},
                  "parse_failures": dict(parse_reasons), "rows": rows}


def proposals_table(iteration: int, rows: Sequence[Mapping]) -> pa.Table:
    """``synthesize``'s per-proposal rows (its report's ``rows``) as ``PROPOSAL_SCHEMA``."""
    return pa.Table.from_pylist([{
        "iteration": iteration, "index": r["index"], "parent_task_id": r["parent_task_id"], "task_id": r.get("task_id"),
        "parsed": r["reason"] != "parse", "kept": bool(r["kept"]), "reason": r["reason"],
        "parse_error": r.get("parse_error", ""), "state": r.get("state"), "text": r.get("text")} for r in rows],
        schema=PROPOSAL_SCHEMA)


def build_task_pool(original: Sequence[Task], synthetic: Sequence[Task], lam: float, size: int,
                    seed: int = 0) -> list[Task]:
    """A pool of ``size`` tasks with at most floor(lam * size) synthetic ones (the newest first), the
    rest original tasks (all of them while they last). Provenance fields are kept as they are."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"build_task_pool: lam must be in [0, 1], got {lam}")
    if size < 0:
        raise ValueError(f"build_task_pool: size must be >= 0, got {size}")
    orig_sorted = sorted(original, key=lambda t: t.task_id)
    syn_sorted = sorted(synthetic, key=lambda t: (-t.iteration, t.task_id))
    # the largest synthetic count s whose share of the pool that results is still <= lam
    for s in range(min(len(syn_sorted), size), -1, -1):
        n_orig = min(len(orig_sorted), size - s)
        if s <= math.floor(lam * (n_orig + s) + 1e-9):
            break
    orig = orig_sorted
    if len(orig) > n_orig:
        orig = sorted(random.Random(seed).sample(orig_sorted, n_orig), key=lambda t: t.task_id)
    return orig + syn_sorted[:s]


def draw_batch(pool: Sequence[Task], n: int, lam: float, iteration: int, seed: int = 0) -> list[Task]:
    """Iteration ``iteration``'s rollout batch of up to ``n`` tasks, originals and synthetic drawn apart.

    Synthetic tasks (``source == "synthetic"``) fill max(1, floor(lam * n)) places whenever the pool
    has any and lam > 0 (fewer if it has fewer), the newest first (a variant kept in iteration k is
    rolled out in k + 1 unless k kept more than there are places), ties drawn at random; originals,
    drawn at random, fill the rest. Drawing the pool as one urn gave a synthetic task about n / |pool|
    of its lam share (0.1 task per iteration in the demo). Deterministic in (seed, iteration); the
    batch is sorted by task id within each part. lam = 0 draws originals only."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"draw_batch: lam must be in [0, 1], got {lam}")
    if n < 0:
        raise ValueError(f"draw_batch: n must be >= 0, got {n}")
    rng = random.Random(f"{seed}|{iteration}|batch")
    original = sorted((t for t in pool if t.source != "synthetic"), key=lambda t: t.task_id)
    synthetic = sorted((t for t in pool if t.source == "synthetic"), key=lambda t: t.task_id)
    n_syn = min(len(synthetic), n, max(1, math.floor(lam * n + 1e-9))) if lam > 0 and synthetic else 0
    order = {t.task_id: rng.random() for t in synthetic}
    syn = sorted(synthetic, key=lambda t: (-t.iteration, order[t.task_id]))[:n_syn]
    n_orig = min(len(original), n - n_syn)
    orig = original if n_orig == len(original) else rng.sample(original, n_orig)
    return sorted(orig, key=lambda t: t.task_id) + sorted(syn, key=lambda t: t.task_id)
