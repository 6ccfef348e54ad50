"""The co-evolving replay buffer (paper §4.2): what each iteration adds to it and what it prunes.

The paper keeps a buffer seeded with offline real data and "continuously updated with fresh
synthetic interactions", keeping it informative; M_exp retrieves its demonstrations D_k from it
(Eq. 4). Each iteration k here, after its policy update (``loop.run_iteration`` stage 6):

1. **Informativeness filter.** Only trajectories from rollout groups with MIXED outcomes join: a
   group is the rollouts of one task in iteration k (a GRPO group); it is kept when some of its
   trajectories were won and some not (reward variance > 0, the same signal Eq. 7 selects tasks by).
   All-won or all-lost groups say nothing new about what separates success from failure, and an
   all-lost group of a weak early policy would fill the buffer with invalid-action noise.
2. **Pruning under a size cap** (synthetic rows only; the offline real seed is never pruned):
   near-duplicate (state, action) rows within a task go (``prune_near_duplicates``, cosine
   >= 0.98, real and older rows kept first); all-success groups keep 2 trajectories
   (``cap_success_groups``); then, while the synthetic rows exceed the cap, each task keeps
   only its newest trajectories (``keep_newest_per_task``, halving the window each round);
   if one trajectory per task is still too many, the oldest trajectories go (lowest iteration first).
3. **Export.** The buffer as it stands after k (without vectors) is written to Parquet, which
   ``dreamgym sql`` shows as the ``replay_buffer_rows`` view (``_partition`` = the iteration).

The pruning policies themselves (each returns the number of rows it deleted) are at the end of
this module; ``buffer`` holds the table and its search.

Reads are pinned elsewhere: iteration k retrieves from the Lance version tagged at its start
(``ReplayBuffer.tag_iteration``), so nothing done here changes what k itself saw.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dreamgym_core.buffer import ReplayBuffer
from dreamgym_core.buffer_rows import RECORD_COLUMNS, SOURCE_PRIORITY
from dreamgym_core.io import write_parquet_atomic

SYNTHETIC = "source = 'synthetic'"


def informative(rollouts: pa.Table) -> pa.Table:
    """The rows of trajectories whose task group (task_id) holds both won and not-won trajectories."""
    if rollouts.num_rows == 0:
        return rollouts
    won: dict[str, bool] = {}
    for traj, w in zip(rollouts["traj_id"].to_pylist(), rollouts["won"].to_pylist()):
        won[traj] = won.get(traj, False) or bool(w)
    outcomes: dict[str, set[bool]] = {}
    for traj, task in zip(rollouts["traj_id"].to_pylist(), rollouts["task_id"].to_pylist()):
        outcomes.setdefault(task, set()).add(won[traj])
    mixed = [t for t, o in outcomes.items() if len(o) == 2]
    return rollouts.filter(pc.is_in(rollouts["task_id"], pa.array(mixed, pa.string())))


def grow_buffer(buffer: ReplayBuffer, rollouts: pa.Table, k: int, cap: int | None = None,
                export: str | None = None) -> dict:
    """Add iteration k's informative synthetic transitions, prune, export; returns the record
    ``{added, filtered, pruned, size, synthetic_rows, version, by_source}`` (counts in rows).
    Idempotent for a re-run of k: its rows replace the ones k added before."""
    if cap is not None and cap < 1:
        raise ValueError(f"grow_buffer: cap must be >= 1 rows (or None), got {cap}")
    keep = informative(rollouts)
    added = buffer.add(keep, "synthetic", k, replace=True)
    pruned = prune_near_duplicates(buffer, where=SYNTHETIC) + cap_success_groups(buffer, 2, where=SYNTHETIC)
    synthetic = buffer.rows_by_source().get("synthetic", 0)
    if cap is not None and synthetic > cap:
        trajs = buffer.scan(["task_id", "traj_id", "iteration"], where=SYNTHETIC)
        per_task = pc.value_counts(pc.binary_join_element_wise(
            trajs["task_id"], trajs["traj_id"], trajs["iteration"].cast(pa.string()), "|")).to_pylist()
        counts: dict[str, int] = {}
        for c in per_task:
            task = c["values"].split("|", 1)[0]
            counts[task] = counts.get(task, 0) + 1
        window = max(counts.values()) if counts else 1
        while synthetic > cap and window > 1:
            window = max(1, window // 2)
            pruned += keep_newest_per_task(buffer, window, where=SYNTHETIC)
            synthetic = buffer.rows_by_source().get("synthetic", 0)
        if synthetic > cap:  # one trajectory per task is still too many: the oldest trajectories go
            pruned += _drop_oldest(buffer, synthetic - cap)
    by_source = buffer.rows_by_source()
    record = {"added": added, "filtered": rollouts.num_rows - keep.num_rows, "pruned": pruned,
              "size": sum(by_source.values()), "synthetic_rows": by_source.get("synthetic", 0),
              "version": buffer.version, "by_source": by_source}
    if export:
        rows = buffer.scan([c for c in RECORD_COLUMNS])
        write_parquet_atomic(rows.append_column("buffer_iteration", pa.array([k] * rows.num_rows, pa.int64())),
                             export)
    return record


def _drop_oldest(buffer: ReplayBuffer, rows: int) -> int:
    """Delete whole synthetic trajectories, oldest (iteration, traj_id) first, until ``rows`` rows are gone."""
    t = buffer.scan(["traj_id", "iteration"], where=SYNTHETIC, with_rowid=True)
    by_traj: dict[tuple[int, str], list[int]] = {}
    for traj, it, rid in zip(t["traj_id"].to_pylist(), t["iteration"].to_pylist(), t["_rowid"].to_pylist()):
        by_traj.setdefault((it, traj), []).append(rid)
    drop: list[int] = []
    for key in sorted(by_traj):
        if len(drop) >= rows:
            break
        drop.extend(by_traj[key])
    return buffer.delete_rowids(drop)


# ---- pruning policies: each returns the number of rows it deleted ------------------------------

def _trajectory_ids(t: pa.Table) -> list[tuple]:
    return list(zip(t["traj_id"].to_pylist(), t["source"].to_pylist(), t["iteration"].to_pylist()))


def greedy_near_duplicates(vectors: np.ndarray, threshold: float, block: int = 512) -> np.ndarray:
    """vectors: (M, dim) unit rows in priority order -> keep: (M,) bool.

    Row i is dropped when its cosine with an earlier kept row is >= threshold. Blocked so that a
    large task costs a few matrix products instead of M^2 Python steps.
    """
    m = len(vectors)
    keep = np.zeros(m, bool)
    kept = np.zeros((0, vectors.shape[1]), np.float32)
    for s in range(0, m, block):
        blk = vectors[s:s + block]
        dup = (blk @ kept.T >= threshold).any(axis=1) if len(kept) else np.zeros(len(blk), bool)
        inner = blk @ blk.T
        chosen: list[int] = []
        for i in range(len(blk)):
            if dup[i] or (chosen and (inner[i, chosen] >= threshold).any()):
                continue
            chosen.append(i)
        keep[s + np.asarray(chosen, dtype=np.int64)] = True
        kept = np.concatenate([kept, blk[chosen]])
    return keep


def prune_near_duplicates(buf: ReplayBuffer, threshold: float = 0.98, *, where: str | None = None) -> int:
    """Within each task, drop rows whose embedding has cosine >= threshold with a kept row.

    Kept first: real data before synthetic (SOURCE_PRIORITY), then older iterations, then
    (traj_id, step_idx). ``where`` (SQL) limits which rows are considered.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    t = buf.scan(["task_id", "traj_id", "step_idx", "source", "iteration", "vector"], where=where, with_rowid=True)
    if t.num_rows == 0:
        return 0
    vec = t["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, -1)
    task = t["task_id"].to_pylist()
    prio = [SOURCE_PRIORITY.get(s, len(SOURCE_PRIORITY)) for s in t["source"].to_pylist()]
    keys = list(zip(task, prio, t["iteration"].to_pylist(), t["traj_id"].to_pylist(), t["step_idx"].to_pylist()))
    order = sorted(range(t.num_rows), key=keys.__getitem__)
    rowid = t["_rowid"].to_numpy()
    drop: list[int] = []
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and task[order[end]] == task[order[start]]:
            end += 1
        idx = np.asarray(order[start:end])
        keep = greedy_near_duplicates(vec[idx], threshold)
        drop.extend(rowid[idx[~keep]].tolist())
        start = end
    return buf.delete_rowids(drop)


def cap_success_groups(buf: ReplayBuffer, max_trajectories: int = 2, *, where: str | None = None) -> int:
    """In a group (task_id, source, iteration) where every trajectory was won, keep only the first
    ``max_trajectories`` trajectories (by traj_id). Such groups have zero reward variance, so more
    copies add little for M_exp's grounding or the curriculum; mixed groups are left alone."""
    if max_trajectories < 1:
        raise ValueError(f"max_trajectories must be >= 1, got {max_trajectories}")
    t = buf.scan(["task_id", "traj_id", "source", "iteration", "won"], where=where, with_rowid=True)
    trajs = _trajectory_ids(t)
    won: dict[tuple, bool] = {}
    for tr, w in zip(trajs, t["won"].to_pylist()):
        won[tr] = won.get(tr, False) or bool(w)
    groups: dict[tuple, set[tuple]] = {}
    for task, tr in zip(t["task_id"].to_pylist(), trajs):
        groups.setdefault((task, tr[1], tr[2]), set()).add(tr)
    dropped_trajs = set()
    for members in groups.values():
        if all(won[m] for m in members) and len(members) > max_trajectories:
            dropped_trajs.update(sorted(members)[max_trajectories:])
    rowid = t["_rowid"].to_pylist()
    return buf.delete_rowids([r for r, tr in zip(rowid, trajs) if tr in dropped_trajs])


def keep_newest_per_task(buf: ReplayBuffer, n_trajectories: int, *, where: str | None = None) -> int:
    """Per task, keep the ``n_trajectories`` newest trajectories (highest iteration, then traj_id)."""
    if n_trajectories < 1:
        raise ValueError(f"n_trajectories must be >= 1, got {n_trajectories}")
    t = buf.scan(["task_id", "traj_id", "source", "iteration"], where=where, with_rowid=True)
    trajs = _trajectory_ids(t)
    per_task: dict[str, set] = {}
    for task, tr in zip(t["task_id"].to_pylist(), trajs):
        per_task.setdefault(task, set()).add(tr)
    dropped = set()
    for members in per_task.values():
        newest_first = sorted(members, key=lambda tr: (-tr[2], tr[0], tr[1]))
        dropped.update(newest_first[n_trajectories:])
    rowid = t["_rowid"].to_pylist()
    return buf.delete_rowids([r for r, tr in zip(rowid, trajs) if tr in dropped])
