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
   near-duplicate (state, action) rows within a task go (``buffer.prune_near_duplicates``, cosine
   >= 0.98, real and older rows kept first); all-success groups keep 2 trajectories
   (``buffer.cap_success_groups``); then, while the synthetic rows exceed the cap, each task keeps
   only its newest trajectories (``buffer.keep_newest_per_task``, halving the window each round);
   if one trajectory per task is still too many, the oldest trajectories go (lowest iteration first).
3. **Export.** The buffer as it stands after k (without vectors) is written to Parquet, which
   ``dreamgym sql`` shows as the ``replay_buffer_rows`` view (``_partition`` = the iteration).

Reads are pinned elsewhere: iteration k retrieves from the Lance version tagged at its start
(``ReplayBuffer.tag_iteration``), so nothing done here changes what k itself saw.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from dreamgym_core.buffer import (RECORD_COLUMNS, ReplayBuffer, cap_success_groups, keep_newest_per_task,
                                  prune_near_duplicates)
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
