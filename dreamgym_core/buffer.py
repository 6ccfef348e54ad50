"""The experience replay buffer on one LanceDB table (paper §4.2, "experience replay").

DreamGym seeds a replay buffer with offline real-environment transitions, adds the transitions
synthesized at every iteration, and conditions the experience model M_exp on the top-k stored
transitions most similar to the current (state, action) by cosine similarity of their embeddings
(the demonstrations D_k of Eq. 4). This module stores those transitions with their embeddings,
retrieves top-k neighbours with filters (env, task, source), deletes rows, and pins what each iteration
sees to a table version.

Where this departs from the paper, and why:
- **Versions per iteration.** The paper only says the buffer is updated as training goes. Here
  iteration k reads the buffer as it stood at the START of k (a Lance tag, ``tag_iteration``) and
  only rows added before k (``iteration < k``), so re-running iteration k retrieves exactly what
  the first run did even after later iterations were written.
- **Pruning.** The paper keeps the buffer "fresh" without a rule; we offer three explicit,
  counted policies: near-duplicate removal within a task, a cap on all-success rollout groups
  (little signal for the curriculum), and a newest-N-trajectories-per-task window. They live in
  ``dreamgym_core.replay`` (which imports this module), beside the per-iteration update that uses them.
- **Embedded text.** ``action`` goes before ``state`` in the embedded text (``buffer_rows``, which
  defines a row and embeds transitions into rows without a table).
- **Search.** Exact cosine (``buffer_exact``: numpy over the version's vectors) below ``index_min_rows``; above it
  an IVF_RQ index (RaBitQ codes, re-ranked by exact distance), chosen because on 2 cores it built
  in 3 s at 100k rows where IVF_PQ took 48 s, with the same recall after re-ranking; numbers in
  bench/replay_retrieval.py. Ties are broken by (traj_id, step_idx, source, iteration), so results
  do not depend on the physical row order, which changes when a partition is deleted and re-added.

Integrity: opening checks the schema and the embedder metadata and reads one column of every data
file (a truncated or missing file fails there); exact search checks that every vector it loads is
a finite unit vector; ``verify()`` reads everything. ANN search trusts its index and the rows it
returns; run ``verify()`` after copying or restoring a table.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dreamgym_core.buffer_exact import ExactIndex, Filters, as_tuple, sql_str
from dreamgym_core.buffer_rows import (
    BUFFER_FORMAT, META_DIM, META_FORMAT, META_MODEL, RECORD_COLUMNS, REQUIRED_INPUT, Neighbor, buffer_schema,
    buffer_text, encode_rows,
)
from dreamgym_core.embed import TextEmbedder
from dreamgym_core.faults import fault
from dreamgym_core.io import exists
from dreamgym_core.lance_journal import recover, replacing, table_lock
from dreamgym_core.schema import Transition

_TIE_KEYS = ("traj_id", "step_idx", "source", "iteration")
LANCE_FILE_VERSION = "2.1"
"""Lance data format for new tables: fetching a few rows of 16 columns took ~3 ms with 2.1 against
~6-7 ms with the lancedb 0.40 default, and every search ends with such a fetch."""


class ReplayBufferError(RuntimeError):
    """The buffer's table is missing, corrupt, or does not match this code or embedder."""


@dataclass(frozen=True)
class BufferConfig:
    """Where the buffer lives inside its LanceDB database and how it is searched."""

    table: str = "replay_buffer"
    """Table name inside the LanceDB database at ``uri``."""
    index_min_rows: int = 50_000
    """Build the ANN index once the table holds this many rows; smaller tables are searched exactly."""
    index_partitions: int | None = None
    """IVF partitions; None = sqrt(rows), clamped to [16, 4096] (1000 at 1M rows)."""
    nprobes: int = 20
    """IVF partitions probed per query (a filtered query probes more until it has k rows)."""
    refine_factor: int = 5
    """Re-rank refine_factor * k candidates by exact distance (recall@4 0.99 at 1M in the bench)."""
    reindex_fraction: float = 0.1
    """Fold appended rows into the index once they exceed this fraction of the indexed rows."""
    auto_index: bool = True
    """Maintain the index after every ``add``; turn off to batch many adds, then ``ensure_index``."""
    index_sample_rate: int = 64
    """k-means training rows per IVF partition (Lance's default 256 is ~4x slower to build)."""
    index_max_iterations: int = 20

    def __post_init__(self) -> None:
        if self.index_min_rows < 256:
            raise ValueError(f"BufferConfig.index_min_rows={self.index_min_rows}: IVF training needs at "
                             "least 256 rows; use a larger value (exact search is fast below 50k rows)")
        if self.nprobes < 1 or self.refine_factor < 1:
            raise ValueError("BufferConfig: nprobes and refine_factor must be >= 1")
        if not 0 < self.reindex_fraction <= 1:
            raise ValueError(f"BufferConfig.reindex_fraction must be in (0, 1], got {self.reindex_fraction}")


class ReplayBuffer:
    """Transitions + (state, action) embeddings in one LanceDB table, with versioned top-k retrieval.

    ``uri`` is a LanceDB database (a local folder or an object-store URI). The table is created on
    first open, with the embedder's model name and dimension in its schema metadata; opening it with
    another embedder, or finding a table that does not have this schema, raises ReplayBufferError.
    """

    def __init__(self, uri: str, embedder: TextEmbedder, config: BufferConfig = BufferConfig()):
        self.uri = uri
        self.embedder = embedder
        self.config = config
        self.path = f"{uri.rstrip('/')}/{config.table}.lance"
        self.schema = buffer_schema(embedder.model_name, embedder.dim)
        self._db = lancedb.connect(uri)
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._exact: OrderedDict[int, ExactIndex] = OrderedDict()
        self._has_index: dict[int, bool] = {}
        self._tag_versions: dict[int, int] = {}
        self._tbl = self._open_or_create()

    # ---- opening and checking ----------------------------------------------------------------

    def _open_or_create(self):
        try:
            recover(self._db, self.uri, self.config.table)   # a replace that a killed run left half done
            tbl = self._db.open_table(self.config.table)
        except ValueError:
            # "not found" also happens when the manifest was lost: never start a fresh buffer over it
            if exists(self.path):
                raise ReplayBufferError(f"replay buffer {self.path} exists but LanceDB cannot open it "
                                        "(missing or unreadable manifest); restore or delete it") from None
            return self._db.create_table(self.config.table, schema=self.schema,
                                         data_storage_version=LANCE_FILE_VERSION)
        except (RuntimeError, OSError) as e:
            raise ReplayBufferError(f"replay buffer {self.path}: cannot open ({_first_line(e)})") from e
        self._check_schema(tbl.schema)
        with self._lance_errors("reading the iteration column"):
            # touches every data file's footer: truncated or missing files fail here, not mid-run
            tbl.search().select(["iteration"]).limit(None).to_arrow()
        return tbl

    def _check_schema(self, schema: pa.Schema) -> None:
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        if META_MODEL not in meta or META_DIM not in meta:
            raise ReplayBufferError(f"{self.path} is not a replay buffer table (no embedder metadata in its schema)")
        if meta.get(META_FORMAT) != BUFFER_FORMAT:
            raise ReplayBufferError(f"{self.path} has buffer format {meta.get(META_FORMAT)!r}; this code reads "
                                    f"format {BUFFER_FORMAT!r}")
        want_model, want_dim = self.embedder.model_name, self.embedder.dim
        if meta[META_MODEL] != want_model or meta[META_DIM] != str(want_dim):
            raise ReplayBufferError(
                f"embedder mismatch: replay buffer {self.path} was built with {meta[META_MODEL]!r} (dim "
                f"{meta[META_DIM]}), this run uses {want_model!r} (dim {want_dim})")
        for field in self.schema:
            if field.name not in schema.names:
                raise ReplayBufferError(f"replay buffer {self.path}: schema mismatch, column {field.name!r} missing")
            got = schema.field(field.name).type
            if got != field.type:
                raise ReplayBufferError(f"replay buffer {self.path}: schema mismatch, column {field.name!r} is "
                                        f"{got}, expected {field.type}")
        extra = [n for n in schema.names if n not in self.schema.names]
        if extra:
            raise ReplayBufferError(f"replay buffer {self.path}: schema mismatch, unexpected columns {extra}")

    @contextmanager
    def _lance_errors(self, what: str):
        try:
            yield
        except ReplayBufferError:
            raise
        except (RuntimeError, OSError, ValueError) as e:
            raise ReplayBufferError(f"replay buffer {self.path}: {what} failed; the table is corrupt or "
                                    f"incomplete ({_first_line(e)})") from e

    # ---- sizes and versions ------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The latest table version (every add, delete and index update makes a new one)."""
        return self._tbl.version

    def __len__(self) -> int:
        return self._tbl.count_rows()

    def refresh(self) -> None:
        """See writes (and tags) made by other processes since this buffer was opened."""
        self._tbl.checkout_latest()
        self._tag_versions.clear()

    def _table_at(self, version: int | None):
        if version is None or version == self._tbl.version:
            return self._tbl
        if version not in self._handles:
            with self._lance_errors(f"opening version {version}"):
                self._handles[version] = self._db.open_table(self.config.table, version=version)
            while len(self._handles) > 8:
                self._handles.popitem(last=False)
        return self._handles[version]

    @staticmethod
    def _tag(k: int) -> str:
        return f"iteration-{int(k):04d}"

    def tag_iteration(self, k: int, version: int | None = None, *, move: bool = False) -> int:
        """Record ``version`` (default: latest) as the buffer at the start of iteration k; returns it.

        Idempotent: a re-run of iteration k finds its tag and keeps it, so it retrieves what the
        first run did. Re-pointing an existing tag needs ``move=True``.
        """
        name = self._tag(k)
        self._tag_versions.pop(k, None)
        target = self._tbl.version if version is None else int(version)
        old = self._tbl.tags.list().get(name, {}).get("version")
        with self._lance_errors(f"tagging iteration {k}"):
            if old is None:
                self._tbl.tags.create(name, target)
                return target
            if old == target or (version is None and not move):
                return old
            if not move:
                raise ReplayBufferError(f"iteration {k} is already tagged at version {old} of {self.path}; "
                                        f"pass move=True to re-point it to version {target}")
            self._tbl.tags.update(name, target)
            return target

    def version_for_iteration(self, k: int) -> int:
        if k not in self._tag_versions:       # every query of an iteration asks: list the tags once
            version = self._tbl.tags.list().get(self._tag(k), {}).get("version")
            if version is None:
                raise ReplayBufferError(f"replay buffer {self.path} has no version tagged for iteration {k}; "
                                        f"call tag_iteration({k}) when iteration {k} starts")
            self._tag_versions[k] = version
        return self._tag_versions[k]

    def rows_by_source(self, as_of_version: int | None = None) -> dict[str, int]:
        tbl = self._table_at(as_of_version)
        with self._lance_errors("counting rows"):
            col = tbl.search().select(["source"]).limit(None).to_arrow()["source"]
        counts = pc.value_counts(col).to_pylist()
        return {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}

    # ---- writing -----------------------------------------------------------------------------

    def encode_rows(self, data: Iterable[Transition] | pa.Table, source: str, iteration: int,
                    vectors: np.ndarray | None = None) -> pa.Table:
        """``encode_rows`` with this buffer's embedder."""
        return encode_rows(self.embedder, data, source, iteration, vectors)

    def add(self, data: Iterable[Transition] | pa.Table, source: str, iteration: int, *, replace: bool = False,
            vectors: np.ndarray | None = None) -> int:
        """Append transitions labelled (source, iteration); returns the number of rows added.

        ``replace=True`` first deletes the rows already stored for (source, iteration), which makes
        re-running an iteration idempotent.
        """
        rows = encode_rows(self.embedder, data, source, iteration, vectors)
        with self._lance_errors("writing"):
            if replace:   # delete + add are two commits: journaled, rolled back on a failure or after a kill
                with table_lock(self.uri, self.config.table), replacing(self._tbl, self.uri, self.config.table):
                    self._tbl.delete(f"source = {sql_str(source)} AND iteration = {int(iteration)}")
                    fault("lance:between_delete_and_add")
                    if rows.num_rows:
                        self._tbl.add(rows)
            elif rows.num_rows:
                self._tbl.add(rows)
        if self.config.auto_index:
            self.ensure_index()
        return rows.num_rows

    def delete_rowids(self, rowids: Sequence[int]) -> int:
        """Delete rows by Lance ``_rowid`` (from ``scan(..., with_rowid=True)``) in one commit."""
        if len(rowids) == 0:
            return 0
        ids = ", ".join(str(int(r)) for r in rowids)
        with self._lance_errors("deleting"):
            return int(self._tbl.delete(f"_rowid IN ({ids})").num_deleted_rows)

    def scan(self, columns: Sequence[str], *, where: str | None = None, as_of_version: int | None = None,
             with_rowid: bool = False) -> pa.Table:
        """Columns of every row (optionally filtered by a SQL ``where``) as one Arrow table."""
        tbl = self._table_at(as_of_version)
        with self._lance_errors("scanning"):
            q = tbl.search().select(list(columns)).limit(None)
            if where:
                q = q.where(where)
            if with_rowid:
                q = q.with_row_id(True)
            return q.to_arrow()

    # ---- the ANN index -------------------------------------------------------------------------

    def ensure_index(self) -> str:
        """Build or update the ANN index as ``config`` says; returns "built", "updated" or "none"."""
        with self._lance_errors("maintaining the vector index"):
            return ensure_vector_index(self._tbl, self.config)

    def _indexed(self, tbl, v: int) -> bool:
        if v not in self._has_index:
            with self._lance_errors("listing indices"):
                self._has_index[v] = _vector_index(tbl) is not None
        return self._has_index[v]

    # ---- retrieval ---------------------------------------------------------------------------

    def search(self, state: str, action: str, k: int = 4, *, env: str | Sequence[str] | None = None,
               task_id: str | Sequence[str] | None = None, source: str | Sequence[str] | None = None,
               iteration: int | None = None, as_of_version: int | None = None) -> list[Neighbor]:
        """Top-k stored transitions most similar to (state, action), best first.

        ``iteration=k`` reads the version tagged at the start of iteration k and only rows with
        ``iteration < k``; ``as_of_version`` reads a given version; neither reads the latest.
        """
        q = self.embedder.encode([buffer_text(state, action)])
        return self.search_vectors(q, k, env=env, task_id=task_id, source=source, iteration=iteration,
                                   as_of_version=as_of_version)[0]

    def search_vectors(self, vectors: np.ndarray, k: int = 4, *, env: str | Sequence[str] | None = None,
                       task_id: str | Sequence[str] | None = None, source: str | Sequence[str] | None = None,
                       iteration: int | None = None, as_of_version: int | None = None,
                       exclude_task_id: Sequence[str | None] | None = None) -> list[list[Neighbor]]:
        """vectors: (Q, dim) queries (normalized here) -> Q lists of up to k neighbours, best first.

        ``exclude_task_id``: one task id per query (or None) whose rows that query must not return,
        e.g. an SFT example's own task, so its demonstrations never hold its own answer.
        """
        if iteration is not None and as_of_version is not None:
            raise ValueError("pass iteration or as_of_version, not both")
        if exclude_task_id is not None and len(exclude_task_id) != len(np.atleast_2d(vectors)):
            raise ValueError(f"exclude_task_id has {len(exclude_task_id)} entries for {len(np.atleast_2d(vectors))} "
                             "queries; give one task id (or None) per query")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.atleast_2d(np.asarray(vectors, np.float32))
        if q.shape[1] != self.embedder.dim:
            raise ValueError(f"query vectors have dim {q.shape[1]}, the buffer stores dim {self.embedder.dim}")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        q = q / np.where(norms > 0, norms, 1.0)
        version = self.version_for_iteration(iteration) if iteration is not None else as_of_version
        f = Filters(as_tuple(env), as_tuple(task_id), as_tuple(source), iteration)
        latest = self._tbl.version
        v = latest if version is None else int(version)
        tbl = self._tbl if v == latest else self._table_at(v)
        if self._indexed(tbl, v):
            if exclude_task_id is None or all(t is None for t in exclude_task_id):
                return self._search_ann(tbl, q, k, f)
            return [self._search_ann(tbl, q[j:j + 1], k, f, exclude=t)[0] for j, t in enumerate(exclude_task_id)]
        return self._search_exact(tbl, v, q, k, f, exclude_task_id)

    def _search_exact(self, tbl, v: int, q: np.ndarray, k: int, f: Filters,
                      exclude_task_id: Sequence[str | None] | None = None) -> list[list[Neighbor]]:
        if v not in self._exact:
            with self._lance_errors(f"loading version {v}"):
                cols = ["vector", "env", "task_id", "source", "traj_id", "step_idx", "iteration"]
                data = tbl.search().select(cols).limit(None).to_arrow()
            ex = ExactIndex(data, self.embedder.dim)
            # every search loads the vectors anyway, so it checks them: a flipped byte in a data file
            # shows up here as a non-unit or non-finite row instead of as a silently wrong neighbour
            _check_unit(ex.vectors, self.path)
            self._exact[v] = ex
            while len(self._exact) > 2:      # each holds N x dim floats
                self._exact.popitem(last=False)
        ex = self._exact[v]
        hits = ex.topk(q, k, f, ex.task_codes(exclude_task_id) if exclude_task_id is not None else None)
        offsets = np.unique([o for h in hits for o, _ in h]).astype(np.int64)
        if len(offsets) == 0:
            return [[] for _ in hits]
        with self._lance_errors(f"reading rows of version {v}"):
            rows = tbl.take_offsets(offsets.tolist()).select(list(RECORD_COLUMNS)).to_arrow().to_pylist()
        by_offset = dict(zip(offsets.tolist(), rows))   # take_offsets returns rows in offset order
        for o, r in by_offset.items():
            # the snapshot and the row fetch must agree on what row o is, or the answer is wrong
            if (r["traj_id"], r["step_idx"]) != (ex.codes["traj_id"][0][ex.codes["traj_id"][1][o]], ex.step_idx[o]):
                raise ReplayBufferError(f"replay buffer {self.path}: row {o} of version {v} changed between "
                                        "reads; the table is inconsistent")
        return [[Neighbor(similarity=s, **by_offset[o]) for o, s in h] for h in hits]

    def _search_ann(self, tbl, q: np.ndarray, k: int, f: Filters, exclude: str | None = None) -> list[list[Neighbor]]:
        where = f.where()
        if exclude is not None:
            where = f"task_id != {sql_str(exclude)}" + (f" AND {where}" if where else "")
        limit = k + 1                      # one extra row shows whether a tie runs past the k-th place
        res = self._ann_query(tbl, q, limit, where)
        out = []
        for j, rows in enumerate(res):
            while len(rows) == limit and rows[k - 1][0] == rows[-1][0]:
                limit *= 4                 # the tie runs past what we fetched: fetch more
                rows = self._ann_query(tbl, q[j:j + 1], limit, where)[0]
            out.append([Neighbor(similarity=1.0 - d, **r) for d, r in rows[:k]])
        return out

    def _ann_query(self, tbl, q: np.ndarray, limit: int, where: str | None) -> list[list[tuple[float, dict]]]:
        cfg = self.config
        with self._lance_errors("vector search"):
            b = (tbl.search(q, vector_column_name="vector").distance_type("cosine")
                 .select(list(RECORD_COLUMNS) + ["_distance"]).limit(limit)
                 .minimum_nprobes(cfg.nprobes).refine_factor(cfg.refine_factor))
            # a narrow filter may leave the first probes empty: keep probing until k rows are found
            b = b.maximum_nprobes(0) if where else b.maximum_nprobes(cfg.nprobes)
            if where:
                b = b.where(where, prefilter=True)
            res = b.to_arrow()
        qi = res["query_index"].to_pylist() if "query_index" in res.column_names else [0] * res.num_rows
        dist = res["_distance"].to_pylist()
        recs = res.select(list(RECORD_COLUMNS)).to_pylist()
        out: list[list[tuple[float, dict]]] = [[] for _ in range(len(q))]
        for i, d, r in zip(qi, dist, recs):
            out[i].append((d, r))
        for rows in out:
            rows.sort(key=lambda dr: (dr[0],) + tuple(dr[1][c] for c in _TIE_KEYS))
        return out

    # ---- integrity ---------------------------------------------------------------------------

    def verify(self, as_of_version: int | None = None) -> int:
        """Read every row of a version: required fields non-null, vectors finite and unit norm.

        Returns the number of rows checked; raises ReplayBufferError on the first problem. Costs a
        full scan (about 1.5 GB at 1M rows), so it is explicit, not part of opening.
        """
        tbl = self._table_at(as_of_version)
        dim, n = self.embedder.dim, 0
        with self._lance_errors("scanning for verification"):
            reader = tbl.search().select(list(REQUIRED_INPUT) + ["source", "iteration", "vector"]).limit(None) \
                .to_batches(65_536)
            for batch in reader:
                for name in REQUIRED_INPUT + ("source", "iteration", "vector"):
                    if batch[name].null_count:
                        raise ReplayBufferError(f"replay buffer {self.path}: null {name!r} values (corrupt table)")
                _check_unit(batch["vector"].flatten().to_numpy(zero_copy_only=False).reshape(-1, dim), self.path)
                n += batch.num_rows
        if n != tbl.count_rows():
            raise ReplayBufferError(f"replay buffer {self.path}: scanned {n} rows, the manifest says "
                                    f"{tbl.count_rows()}")
        return n


def _vector_index(tbl):
    return next((i for i in tbl.list_indices() if list(i.columns) == ["vector"]), None)


def ensure_vector_index(tbl, config: BufferConfig = BufferConfig()) -> str:
    """On a LanceDB table with a unit-vector ``vector`` column: build the IVF_RQ cosine index once
    rows >= config.index_min_rows; once appended rows exceed config.reindex_fraction of the indexed
    ones, fold them in (``optimize``: incremental, no retraining). Returns "built", "updated" or "none".
    """
    from lancedb.index import IvfRq

    idx = _vector_index(tbl)
    n = tbl.count_rows()
    if idx is None:
        if n < config.index_min_rows:
            return "none"
        parts = config.index_partitions or min(4096, max(16, round(math.sqrt(n))))
        # lancedb 0.40: with config=, the first positional argument is the column name
        tbl.create_index("vector", replace=True,
                         config=IvfRq(distance_type="cosine", num_partitions=parts,
                                      sample_rate=config.index_sample_rate,
                                      max_iterations=config.index_max_iterations))
        return "built"
    stats = tbl.index_stats(idx.name)
    if stats.num_unindexed_rows > config.reindex_fraction * max(1, stats.num_indexed_rows):
        tbl.optimize()
        return "updated"
    return "none"


def _check_unit(vectors: np.ndarray, path: str) -> None:
    norms = np.linalg.norm(vectors, axis=1)
    bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > 1e-3)
    if bad.any():
        raise ReplayBufferError(f"replay buffer {path}: {int(bad.sum())} of {len(vectors)} stored vectors are "
                                "not finite unit vectors; the table is corrupt (rebuild it from its sources)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
