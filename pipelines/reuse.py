"""Reuse of finished work, in one place: a stage's result is keyed by its config AND its inputs' content.

``stage_key(stage, config, **inputs)`` = sha256 of the stage name, its format version (``FORMATS``),
its config (a dataclass, a Dagster ``Config`` or a dict) and the fingerprint of every upstream input:

- a ``pyarrow.Table`` (or polars DataFrame): sha256 of its Arrow IPC stream (schema and data), so a
  re-materialized upstream with different rows (a changed annotator rewriting ``cot_annotations``)
  gives a new key, and one with the same rows keeps it;
- a ``CheckpointRef``: sha256 of the files of its directory (weights, tokenizer, ``dreamgym.json``),
  so a retrained upstream model invalidates what was built on it even where its path stays the same;
  a replay buffer's ref (a LanceDB table that grows under one path): its path, iteration and metrics
  (which carry the table version);
- a dict of refs (an ``AllPartitionMapping`` input), a list, a string or a number: hashed structurally.

The key names the directory where a stage writes (``<data>/checkpoints/<stage>/<key>``): a finished
result there is reused, a retried run resumes inside it, and two configurations never share one.
Dagster's own data versions are not used for this: they are per materialization, while a key must
also hold across runs, instances and a wiped event log (the data folder alone decides).

Re-running on purpose recomputes: the run tag ``dreamgym/force`` (``true`` / ``all``, or a comma
list of asset names) removes the stage's finished directory before the stage runs (docs/reuse.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import pyarrow as pa

from dreamgym_core.schema import CheckpointRef

FORCE_TAG = "dreamgym/force"
"""Run tag: ``true`` or ``all`` recomputes every stage of the run; ``experience_model,policy_init``
only those; absent or ``false``: finished results with the same key are reused."""

FORMATS = {"experience_model": 4, "policy_init": 1, "real_rl_policy": 1, "s2r_policy": 1, "dreamgym_loop": 1}
"""Bumped when a stage's output changes shape for the same config and inputs (a stale result would
otherwise be reused). experience_model: v2 = M_task examples in pointer form, v3 = the progress
field and the placement knowledge, v4 = retrieved demonstrations D_k in the prompts."""

_CKPT_CACHE: dict[tuple, str] = {}


def _table_fingerprint(table: pa.Table) -> str:
    h = hashlib.sha256()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def _dir_fingerprint(path: str) -> str:
    """sha256 over the relative names and contents of every file under ``path`` (temp files skipped),
    cached per (file, size, mtime) so that a large checkpoint is read once per process."""
    if not os.path.exists(path):
        return "missing:" + path
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
                   if not f.endswith(".tmp") and not f.startswith(".tmp"))
    stats = tuple((f, os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns)
                  for f in files)
    key = (os.path.abspath(path), stats)
    if key not in _CKPT_CACHE:
        h = hashlib.sha256()
        for f in files:
            h.update(f.encode() + b"\0")
            with open(os.path.join(path, f), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        _CKPT_CACHE[key] = h.hexdigest()
    return _CKPT_CACHE[key]


def fingerprint(obj: Any) -> str:
    """A content fingerprint of one upstream input (see the module docstring)."""
    if obj is None:
        return "none"
    if isinstance(obj, pa.Table):
        return _table_fingerprint(obj)
    if hasattr(obj, "to_arrow") and not isinstance(obj, (str, bytes)):  # polars.DataFrame
        return _table_fingerprint(obj.to_arrow())
    if isinstance(obj, CheckpointRef):
        if obj.kind == "replay_buffer":  # a LanceDB table grows under one path: its version names the content
            return _digest({"path": obj.path, "iteration": obj.iteration, "metrics": obj.metrics})
        return _dir_fingerprint(obj.path) if obj.path else "empty"
    if isinstance(obj, dict):
        return _digest({str(k): fingerprint(v) for k, v in sorted(obj.items())})
    if isinstance(obj, (list, tuple)):
        return _digest([fingerprint(v) for v in obj])
    return _digest(_plain(obj))


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "model_dump"):  # dg.Config / ConfigurableResource (pydantic)
        return obj.model_dump()
    return obj


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def stage_key(stage: str, config: Any, **inputs: Any) -> str:
    """The reuse key of ``stage`` for ``config`` (one object or a tuple of them) and its upstream ``inputs``."""
    configs = [_plain(c) for c in config] if isinstance(config, (list, tuple)) else _plain(config)
    return _digest({"stage": stage, "format": FORMATS.get(stage, 1), "config": configs,
                    "inputs": {name: fingerprint(v) for name, v in sorted(inputs.items())}})[:16]


def forced(tags: dict[str, str], stage: str) -> bool:
    """Whether the run's tags ask ``stage`` to recompute (``FORCE_TAG``)."""
    value = (tags.get(FORCE_TAG) or "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes", "all"):
        return True
    return stage.lower() in {s.strip() for s in value.split(",")}


def stage_dir(context, stage: str, key: str, area: str = "checkpoints") -> str:
    """``<data>/<area>/<stage>/<key>``; emptied first when the run forces ``stage`` to recompute."""
    from pipelines.resources import data_root

    path = os.path.join(data_root(), area, stage, key)
    if os.path.exists(path) and forced(dict(context.run.tags), stage):
        context.log.info(f"{FORCE_TAG}: recomputing {stage}, removing {path}")
        shutil.rmtree(path)
    return path


def reused(context, stage: str, path: str) -> None:
    context.log.info(f"reusing finished {stage} at {path} (same config and inputs; tag {FORCE_TAG}=true recomputes)")
