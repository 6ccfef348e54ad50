"""The curriculum (paper §4.3, Eq. 6-7): reward-variance task selection and task synthesis with M_task.

Eq. 7: V_tau = (1/n) sum_i (r_i - mean r)^2 over the n rollouts of task tau (episode returns). A
task the policy always solves or always fails (V = 0) teaches nothing; tasks near a 50/50 split
(V = 0.25 for binary rewards) are the most informative, so they seed new tasks. GRPO's group is
the task's rollout group; PPO (one rollout per task) groups similar tasks by k-means over their
embeddings and scores each cluster.

Eq. 6: M_task (the experience model's own weights) is prompted with m seed tasks and writes a
harder-but-feasible variant: an instruction and an initial abstract state. M_task itself (prompt,
parser, SFT examples, grammar-constrained writer) is ``dreamgym_core.task_writer``; its names are
re-exported here. Variants pass a feasibility filter (dedupe, format, a quick simulation in M_exp)
and join the next iteration's task pool, at most a fraction lambda of it. Each iteration's rollout
batch gives synthetic tasks the share lambda whenever the pool has some (``draw_batch``: originals
and synthetic drawn apart, the newest variants first), so a variant kept in iteration k is trained
on in k + 1.

Departures from the paper, and why (M_task's own, pointer form and grammar-constrained decoding,
are in ``dreamgym_core.task_writer``):
- A task here is (instruction, initial abstract state); M_task writes the state, "harder" = more
  items to handle. Synthetic tasks are trained on only in M_exp (no real env can reset to them), as
  in the paper.
- The filter drops names no existing task has (literal form; pointer form cannot invent them).
- Feasibility also rejects variants that M_exp itself declares unplayable (every rollout ends on
  an invalid or unparseable step): the paper's "feasible" is judged by its LLM; ours is measured.
- ``recombine_tasks``: a rule-based task writer beside M_task (new contexts for known objects).
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
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from dreamgym_core.rl.core_algos import reward_variance
from dreamgym_core.schema import PROPOSAL_SCHEMA, Task, Trajectory
from dreamgym_core.state import AbstractState
# M_task moved to task_writer (issue 24); re-exported so ``from dreamgym_core.curriculum import X`` keeps working
from dreamgym_core.task_writer import (END, MAX_LINE_CHARS, MAX_THINK_CHARS, TASK_CLOSE, TASK_FIELDS,  # noqa: F401
                                       TASK_OPEN, GrammarStep, ParseFailure, TaskConstraint, TaskProposal,
                                       TaskWriter, _is_loose, build_task_prompt, location_of, loose_items,
                                       next_task_constraint, object_catalogue, parse_task_output, seed_groups,
                                       task_writing_examples)

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
# A rule-based task writer beside M_task

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
