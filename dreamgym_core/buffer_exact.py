"""Exact top-k cosine retrieval over one replay-buffer version (paper §4.2, the D_k of Eq. 4).

M_exp is conditioned on the k stored transitions most similar to the current (state, action)
(Eq. 4). Below ``BufferConfig.index_min_rows`` the buffer answers that exactly: ``ExactIndex``
holds one table version's unit vectors and key columns in memory and returns, per query, the rows
of highest cosine similarity that pass the ``Filters`` (env, task, source, ``iteration < k``),
optionally excluding each query's own task. ``Filters.where`` is the same filter as SQL for the
ANN path of ``dreamgym_core.buffer.ReplayBuffer``.

Where this departs from the paper, and why: the paper does not say how ties are broken; here they
are broken by (traj_id, step_idx, source, iteration), so results do not depend on the physical
row order, which changes when a partition is deleted and re-added. The ``iteration < k`` filter
(re-running iteration k retrieves what its first run did) is ours too; see ``buffer``'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa


def sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class Filters:
    env: tuple[str, ...] | None = None
    task_id: tuple[str, ...] | None = None
    source: tuple[str, ...] | None = None
    before_iteration: int | None = None

    def where(self) -> str | None:
        parts = []
        for col in ("env", "task_id", "source"):
            vals = getattr(self, col)
            if vals is not None:
                parts.append(f"{col} IN ({', '.join(sql_str(v) for v in vals)})")
        if self.before_iteration is not None:
            parts.append(f"iteration < {int(self.before_iteration)}")
        return " AND ".join(parts) or None


class ExactIndex:
    """One table version's vectors and key columns in memory, for exact search and its filters."""

    def __init__(self, table: pa.Table, dim: int):
        n = table.num_rows
        vec = table["vector"].combine_chunks()
        values = vec.flatten().to_numpy(zero_copy_only=False) if n else np.zeros(0, np.float32)
        self.vectors = values.reshape(n, dim)
        """(N, dim) stored unit vectors; the caller checks them (``buffer._check_unit``) before use."""
        # sorted dictionaries: codes order like the strings, so ties sort by code
        self.codes = {}
        for col in ("env", "task_id", "source", "traj_id"):
            uniq, inv = np.unique(np.asarray(table[col].to_pylist(), dtype=object).astype(str), return_inverse=True)
            self.codes[col] = (uniq, inv)
        self.step_idx = table["step_idx"].to_numpy()
        self.iteration = table["iteration"].to_numpy()

    def mask(self, f: Filters) -> np.ndarray | None:
        m = None
        for col in ("env", "task_id", "source"):
            vals = getattr(f, col)
            if vals is None:
                continue
            uniq, inv = self.codes[col]
            wanted = [int(i) for v in vals for i in [np.searchsorted(uniq, v)] if i < len(uniq) and uniq[i] == v]
            cm = np.isin(inv, wanted)
            m = cm if m is None else m & cm
        if f.before_iteration is not None:
            cm = self.iteration < f.before_iteration
            m = cm if m is None else m & cm
        return m

    def task_codes(self, task_ids: Sequence[str | None]) -> np.ndarray:
        """(Q,) codes of ``task_ids`` in this version's task dictionary; -1 for None or a task not stored."""
        if not hasattr(self, "_task_lookup"):
            self._task_lookup = {t: i for i, t in enumerate(self.codes["task_id"][0].tolist())}
        return np.asarray([self._task_lookup.get(t, -1) if t is not None else -1 for t in task_ids], np.int64)

    def topk(self, q: np.ndarray, k: int, f: Filters,
             exclude: np.ndarray | None = None) -> list[list[tuple[int, float]]]:
        """q: (Q, dim) unit rows -> per query [(row offset, similarity)] best first.
        ``exclude``: (Q,) task codes (``task_codes``) whose rows query j must not return (-1: none)."""
        mask = self.mask(f)
        out = []
        for s in range(0, len(q), 256):
            sims = self.vectors @ q[s:s + 256].T                 # (N, chunk)
            if mask is not None:
                sims[~mask] = -np.inf
            if exclude is not None:                              # per query: its own task's rows
                sims[self.codes["task_id"][1][:, None] == exclude[None, s:s + 256]] = -np.inf
            for j in range(sims.shape[1]):
                col = sims[:, j]
                valid = int(np.isfinite(col).sum())
                if valid == 0:
                    out.append([])
                    continue
                kk = min(k, valid)
                kth = np.partition(col, len(col) - kk)[len(col) - kk]
                cand = np.nonzero(col >= kth)[0]                 # all rows tied with the k-th
                order = np.lexsort((self.iteration[cand], self.codes["source"][1][cand],
                                    self.step_idx[cand], self.codes["traj_id"][1][cand], -col[cand]))[:kk]
                out.append([(int(cand[i]), float(col[cand[i]])) for i in order])
        return out
