"""The replay buffer's rows: what one stored transition holds and how it is embedded (paper §4.2).

DreamGym retrieves the top-k stored transitions most similar to the current (state, action) by
cosine similarity of their embeddings (the demonstrations D_k of Eq. 4). This module defines a
buffer row (the transition fields of ``RECORD_COLUMNS``, its ``text`` and unit ``vector``), the
Arrow schema with the embedder's name and dimension in its metadata (``buffer_schema``), the
retrieved record (``Neighbor``) and ``encode_rows``, which embeds transitions into rows without
touching a table, so a Dagster asset can return them for the LanceDB IO manager to write. The
table itself (storage, versions, search) is ``dreamgym_core.buffer.ReplayBuffer``.

Where this departs from the paper, and why: ``action`` goes before ``state`` in the embedded text
(``buffer_text``), so that a long state truncated at the encoder's token limit (256 for MiniLM)
never loses the action; every row is labelled with its ``source`` and ``iteration``, which the
paper does not need but per-iteration versioning and de-duplication do (``SOURCE_PRIORITY``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from dreamgym_core.embed import TextEmbedder
from dreamgym_core.schema import SOURCES, TRANSITION_SCHEMA, Transition, transitions_to_arrow

BUFFER_FORMAT = "1"
META_FORMAT = "dreamgym.buffer.format"
META_MODEL = "dreamgym.embedder.model"
META_DIM = "dreamgym.embedder.dim"

RECORD_COLUMNS = ("traj_id", "task_id", "env", "step_idx", "state", "action", "next_state", "reward",
                  "done", "won", "lost", "valid", "action_kind", "policy", "source", "iteration")
"""Transition fields kept in the buffer (names and types from schema.TRANSITION_SCHEMA)."""
REQUIRED_INPUT = ("traj_id", "task_id", "env", "step_idx", "state", "action", "next_state", "reward",
                  "done", "won", "valid")
_DEFAULTS = {"lost": False, "action_kind": "", "policy": ""}
SOURCE_PRIORITY = {"offline": 0, "real": 1, "imported": 2, "synthetic": 3}
"""Which copy survives de-duplication: real data before synthetic, then the older one."""


def buffer_text(state: str, action: str) -> str:
    """The text whose embedding keys retrieval."""
    return f"action: {action}\nstate: {state}"


def buffer_schema(model_name: str, dim: int) -> pa.Schema:
    fields = [TRANSITION_SCHEMA.field(n) for n in RECORD_COLUMNS]
    fields += [pa.field("text", pa.string()), pa.field("vector", pa.list_(pa.float32(), dim))]
    return pa.schema(fields, metadata={META_FORMAT: BUFFER_FORMAT, META_MODEL: model_name, META_DIM: str(dim)})


@dataclass(frozen=True)
class Neighbor:
    """One retrieved transition and its cosine similarity to the query."""

    similarity: float
    traj_id: str
    task_id: str
    env: str
    step_idx: int
    state: str
    action: str
    next_state: str
    reward: float
    done: bool
    won: bool
    lost: bool
    valid: bool
    action_kind: str
    policy: str
    source: str
    iteration: int


def encode_rows(embedder: TextEmbedder, data: Iterable[Transition] | pa.Table, source: str, iteration: int,
                vectors: np.ndarray | None = None) -> pa.Table:
    """Buffer rows (``buffer_schema`` of ``embedder``) for ``data``, embedding ``buffer_text(state, action)``.

    ``source`` and ``iteration`` label every row and replace any such columns in ``data``.
    ``vectors`` (N, dim) skips the embedder (vectors computed elsewhere); they are normalized.
    Needs no table, so a Dagster asset can return its rows for the LanceDB IO manager to write.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    schema = buffer_schema(embedder.model_name, embedder.dim)
    table = _to_arrow(data)
    missing = [c for c in REQUIRED_INPUT if c not in table.column_names]
    if missing:
        raise ValueError(f"transitions lack required columns {missing} (see schema.TRANSITION_SCHEMA)")
    n = table.num_rows
    cols = {}
    for name in RECORD_COLUMNS:
        typ = schema.field(name).type
        if name == "source":
            cols[name] = pa.array([source] * n, typ)
        elif name == "iteration":
            cols[name] = pa.array([int(iteration)] * n, typ)
        elif name in table.column_names:
            col = table[name]
            if name in REQUIRED_INPUT and col.null_count:
                raise ValueError(f"column {name!r} has {col.null_count} nulls; replay rows need it filled")
            cols[name] = col.cast(typ)
        else:
            cols[name] = pa.array([_DEFAULTS[name]] * n, typ)
    texts = [buffer_text(s, a) for s, a in zip(cols["state"].to_pylist(), cols["action"].to_pylist())]
    vecs = embedder.encode(texts) if vectors is None else np.asarray(vectors, np.float32)
    dim = embedder.dim
    if vecs.shape != (n, dim):
        raise ValueError(f"vectors have shape {vecs.shape}, expected {(n, dim)}")
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    if n and (not np.isfinite(vecs).all() or (norms == 0).any()):
        raise ValueError("vectors must be finite and non-zero")
    vecs = (vecs / norms).astype(np.float32) if n else vecs
    cols["text"] = pa.array(texts, pa.string())
    cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), dim)
    return pa.table(cols, schema=schema)


def _to_arrow(data) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "to_arrow"):            # polars DataFrame, without importing polars here
        return data.to_arrow()
    return transitions_to_arrow(data)
