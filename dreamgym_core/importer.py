"""Import external trajectory files: DreamGym's offline-only case.

The paper (§5) applies DreamGym to environments that are "not RL-ready" (WebArena): there is no
cheap, resettable live environment to roll out in, only logged interaction data, so the
experience model M_exp is the only simulator and those logs are all the grounding it gets. This
module turns such logs (JSONL or Parquet, one row per step) into the same Parquet trajectory
table the offline collector writes (``schema.TRAJECTORY_ROWS_SCHEMA``), so the replay buffer,
the CoT annotator and M_exp's SFT read imported and collected data alike.

Validation is strict and happens before anything is written: the first problem raises
``TrajectoryImportError``, a one-line message naming the file, the row and the field, and the
destination is left untouched. A log that is silently "fixed" would teach M_exp transitions that
never happened, so nothing is coerced: ``"1"`` is not an int, ``0`` is not a bool, ``1.0`` is not
a step index, NaN is not a reward.

Input format (one JSON object per line for ``.jsonl`` / ``.ndjson``; flat columns for ``.parquet``)

| field       | type                | required | default                  | checks                                |
|-------------|---------------------|----------|--------------------------|---------------------------------------|
| traj_id     | str                 | yes      |                          | not blank                             |
| task_id     | str                 | yes      |                          | not blank; same on every step         |
| step_idx    | int                 | yes      |                          | >= 0; a trajectory has steps 0..n-1   |
| state       | str                 | yes      |                          | may be empty                          |
| action      | str                 | yes      |                          | not blank                             |
| next_state  | str                 | yes      |                          | may be empty                          |
| reward      | number (int/float)  | yes      |                          | finite                                |
| done        | bool                | yes      |                          | true on the last step only (or none)  |
| instruction | str                 | no       | ""                       | same on every step of a trajectory    |
| env         | str                 | no       | the ``env`` argument     | not blank; same on every step         |
| game        | str                 | no       | ""                       | same on every step                    |
| params      | str                 | no       | ""                       | same on every step (the env's game parameters) |
| split       | str                 | no       | "train"                  | one of ``schema.SPLITS``; same        |
| seed        | int                 | no       | 0                        | int64; same on every step             |
| score       | number (int/float)  | no       | reward                   | finite                                |
| won         | bool                | no       | done and reward > 0      | true only with done                   |
| lost        | bool                | no       | false                    | true only with done; not with won     |
| valid       | bool                | no       | true                     |                                       |
| action_kind | str                 | no       | "expert"                 | one of ``schema.ACTION_KINDS``        |
| candidates  | list of str         | no       | []                       |                                       |
| policy      | str                 | no       | ""                       | same on every step                    |
| iteration   | int                 | no       | 0                        | >= 0                                  |

Rules beyond the table:
- Types are exact. Ints are JSON integers (Parquet: integer columns); a float is rejected even
  when integral (``1.0``), and a bool is never an int or a number. Bools are JSON ``true`` /
  ``false`` only. ``null`` is never a value: leave an optional field out to get its default.
  Numbers may be ints or floats (Parquet: integer, float32 or float64 columns).
- Unknown fields, duplicate keys in one JSON object, and duplicate (traj_id, step_idx) pairs are
  errors. Rows of a trajectory may come in any order and interleave with other trajectories.
- The task fields (task_id, env, game, split, seed, instruction) and policy must agree across the
  steps of a trajectory, and every trajectory of one task_id must agree on the task fields.
- JSONL: UTF-8 without BOM, lines separated by ``\\n`` (``\\r\\n`` is fine). Blank lines at the
  end of the file are ignored; a blank line followed by more data is an error (it usually means
  a file was cut or two files were pasted together). Row numbers are 1-based line numbers.
- Parquet: row numbers are 0-based row indices; a column of the wrong type is reported once,
  by field, before any row is read.
- A file with no rows, an extension other than .jsonl / .ndjson / .parquet, or a missing file is
  an error.
- Size limits (module constants, checked before the content is used): a file over
  ``MAX_FILE_BYTES`` (2 GiB), a string field over ``MAX_FIELD_CHARS`` (200,000 characters: a
  TextWorld state is a few hundred; a larger one is a dump, not an observation, and would blow up
  M_exp's prompts and the replay buffer), a candidates list over ``MAX_CANDIDATES`` (1,000) items,
  or more than ``MAX_ROWS`` (10 million) rows is an error.

Departures and choices, and why:
- ``source`` is always "imported" (tasks and transitions). Each task's ``initial_state`` is step
  0's state of its first trajectory in the file: with no env to reset, M_exp starts synthetic
  rollouts of the task from there (as for M_task's synthetic tasks).
- A trajectory whose last step is not done was cut short by the log; like the collector, it is
  stored closed (last step done=True) and marked ``truncated``, so no stored episode is left open.
- ``obs`` / ``next_obs`` carry only the env's score: ``next_obs.score`` is the step's ``score`` and
  ``obs.score`` the previous step's (0 at step 0), which is what M_exp's progress field reads; a log
  carries no other raw observation beyond the state text.
- ``export_jsonl`` writes a trajectory table back in this input format (the offline-only path's
  logs: ``dreamgym export``); export then import gives the same values of every field above.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dreamgym_core.io import write_parquet_atomic
from dreamgym_core.schema import ACTION_KINDS, SPLITS, RawObs, Task, Trajectory, Transition, trajectories_to_arrow

JSONL_EXTENSIONS = (".jsonl", ".ndjson")
PARQUET_EXTENSIONS = (".parquet",)

_REQUIRED = object()
_DERIVED = object()  # env: the `env` argument; score: reward; won: done and reward > 0

# name -> (kind, default). Kinds: id (non-blank str), text (any str), index (int >= 0),
# int (int64), number (finite float, int accepted), bool, split, action_kind, str_list.
FIELDS: dict[str, tuple[str, Any]] = {
    "traj_id": ("id", _REQUIRED),
    "task_id": ("id", _REQUIRED),
    "step_idx": ("index", _REQUIRED),
    "state": ("text", _REQUIRED),
    "action": ("id", _REQUIRED),
    "next_state": ("text", _REQUIRED),
    "reward": ("number", _REQUIRED),
    "done": ("bool", _REQUIRED),
    "instruction": ("text", ""),
    "env": ("id", _DERIVED),
    "game": ("text", ""),
    "params": ("text", ""),
    "split": ("split", "train"),
    "seed": ("int", 0),
    "score": ("number", _DERIVED),
    "won": ("bool", _DERIVED),
    "lost": ("bool", False),
    "valid": ("bool", True),
    "action_kind": ("action_kind", "expert"),
    "candidates": ("str_list", ()),
    "policy": ("text", ""),
    "iteration": ("index", 0),
}
REQUIRED_FIELDS = tuple(n for n, (_, d) in FIELDS.items() if d is _REQUIRED)
_TASK_FIELDS = ("env", "game", "params", "split", "seed", "instruction")
_TRAJ_FIELDS = ("task_id", *_TASK_FIELDS, "policy")
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


class TrajectoryImportError(ValueError):
    """A trajectory file failed validation; nothing was written.

    The message is one line, ``<file>: row <n>: field '<name>': <reason>`` (row and field left out
    where they do not apply); the parts are also kept as attributes.
    """

    def __init__(self, path: str, reason: str, *, row: int | None = None, field: str | None = None):
        self.path, self.reason, self.row, self.field = path, reason, row, field
        shown = path if path.isprintable() else repr(path)
        parts = [shown] + ([f"row {row}"] if row is not None else []) + ([f"field {field!r}"] if field else [])
        super().__init__(" ".join(": ".join(parts + [reason]).splitlines()))


@dataclass(frozen=True)
class ImportReport:
    """What ``import_file`` wrote."""

    rows: int
    """Transitions written (one row each)."""
    trajectories: int
    successes: int
    """Trajectories whose last step is won."""
    path: str
    """The Parquet file written."""
    truncated: int = 0
    """Trajectories whose log ended before a done step (stored closed and marked truncated)."""


MAX_FILE_BYTES = 2 * 1024 ** 3
MAX_FIELD_CHARS = 200_000
MAX_CANDIDATES = 1_000
MAX_ROWS = 10_000_000


class _Bad(Exception):
    """A field-level problem inside one row; the caller adds the file and row."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def import_file(src: str | os.PathLike, dest: str, *, env: str = "external") -> ImportReport:
    """Validate the trajectory file ``src`` and write it to ``dest`` as TRAJECTORY_ROWS_SCHEMA Parquet.

    Raises TrajectoryImportError (nothing written) on the first problem found.
    """
    trajs = read_trajectories(src, env=env)
    src = os.fspath(src)
    try:
        table = trajectories_to_arrow(trajs)
    except (ValueError, pa.ArrowException) as exc:  # validation should make this unreachable
        raise TrajectoryImportError(src, f"cannot convert to the trajectory schema: {exc}") from None
    path = write_parquet_atomic(table, dest)
    return ImportReport(rows=table.num_rows, trajectories=len(trajs), successes=sum(t.won for t in trajs),
                        path=path, truncated=sum(t.truncated for t in trajs))


def read_trajectories(src: str | os.PathLike, *, env: str = "external") -> list[Trajectory]:
    """Validate the trajectory file ``src`` and return its trajectories (source "imported"); writes nothing.

    Raises TrajectoryImportError on the first problem found.
    """
    if not isinstance(env, str) or not env.strip():
        raise ValueError(f"import_file: env must be a non-blank string (the default env name), got {env!r}")
    src = os.fspath(src)
    ext = os.path.splitext(src)[1].lower()
    if ext not in JSONL_EXTENSIONS + PARQUET_EXTENSIONS:
        raise TrajectoryImportError(src, f"unsupported extension {ext or '(none)'!r}; use one of "
                                         f"{', '.join(JSONL_EXTENSIONS + PARQUET_EXTENSIONS)}")
    if not os.path.isfile(src):
        raise TrajectoryImportError(src, "no such file" if not os.path.exists(src) else "not a regular file")
    size = os.path.getsize(src)
    if size > MAX_FILE_BYTES:
        raise TrajectoryImportError(src, f"file is {size:,} bytes, over the limit of {MAX_FILE_BYTES:,} "
                                         "(importer.MAX_FILE_BYTES); split it and import the parts under one name each")
    raw_rows = _read_jsonl(src) if ext in JSONL_EXTENSIONS else _read_parquet(src)
    if not raw_rows:
        raise TrajectoryImportError(src, "no rows (an empty file cannot be imported)")
    if len(raw_rows) > MAX_ROWS:
        raise TrajectoryImportError(src, f"{len(raw_rows):,} rows, over the limit of {MAX_ROWS:,} (importer.MAX_ROWS)")
    rows = []
    for label, obj in raw_rows:
        try:
            rows.append((label, _check_row(obj, env)))
        except _Bad as bad:
            raise TrajectoryImportError(src, bad.reason, row=label, field=bad.field) from None
    return _build(src, rows)


# --------------------------------------------------------------------------------------------
# Reading: each reader returns [(row label, dict)] or raises a file/row-level error.

class _DuplicateKey(Exception):
    pass


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _read_jsonl(src: str) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    blank_at = None
    try:
        with open(src, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip(b" \t\r\n"):
                    blank_at = blank_at or lineno
                    continue
                if blank_at is not None:
                    raise TrajectoryImportError(src, "blank line followed by more data (only trailing "
                                                     "blank lines are allowed)", row=blank_at)
                rows.append((lineno, _parse_line(src, lineno, raw)))
    except OSError as exc:
        raise TrajectoryImportError(src, f"cannot read: {exc.strerror or exc}") from None
    return rows


def _parse_line(src: str, lineno: int, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrajectoryImportError(src, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                         f"{exc.start + 1})", row=lineno) from None
    try:
        obj = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except _DuplicateKey as exc:
        raise TrajectoryImportError(src, "duplicate key in one JSON object", row=lineno,
                                    field=str(exc.args[0])) from None
    except json.JSONDecodeError as exc:
        raise TrajectoryImportError(src, f"invalid JSON: {exc.msg} at column {exc.colno}", row=lineno) from None
    except (ValueError, RecursionError) as exc:  # e.g. an int literal over Python's digit limit
        raise TrajectoryImportError(src, f"invalid JSON: {exc}", row=lineno) from None
    if not isinstance(obj, dict):
        raise TrajectoryImportError(src, f"expected a JSON object, got {_json_kind(obj)}", row=lineno)
    return obj


def _read_parquet(src: str) -> list[tuple[int, dict]]:
    try:
        with open(src, "rb") as f:
            table = pq.ParquetFile(f).read()
    except (pa.ArrowException, OSError) as exc:
        raise TrajectoryImportError(src, f"not a readable Parquet file ({exc})") from None
    names = table.schema.names
    for name in names:
        if names.count(name) > 1:
            raise TrajectoryImportError(src, "column appears twice", field=name)
        if name not in FIELDS:
            raise TrajectoryImportError(src, f"unknown field (allowed: {', '.join(FIELDS)})", field=name)
    for name in REQUIRED_FIELDS:
        if name not in names:
            raise TrajectoryImportError(src, "required column is missing", field=name)
    for name in names:
        kind = FIELDS[name][0]
        if not _arrow_type_ok(kind, table.schema.field(name).type):
            raise TrajectoryImportError(src, f"column has Arrow type {table.schema.field(name).type}, "
                                             f"expected {_KIND_TEXT[kind]}", field=name)
    columns = {}
    for name in names:
        try:
            columns[name] = table.column(name).to_pylist()
        except (pa.ArrowException, UnicodeDecodeError) as exc:
            raise TrajectoryImportError(src, f"cannot decode column ({exc})", field=name) from None
    return [(i, {n: columns[n][i] for n in names}) for i in range(table.num_rows)]


_KIND_TEXT = {
    "id": "a string", "text": "a string", "split": "a string", "action_kind": "a string",
    "index": "an int", "int": "an int", "number": "a number (int or float)", "bool": "a bool",
    "str_list": "a list of strings",
}


def _arrow_str(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _arrow_type_ok(kind: str, t: pa.DataType) -> bool:
    match kind:
        case "index" | "int":
            return pa.types.is_integer(t)
        case "number":
            return pa.types.is_integer(t) or pa.types.is_float32(t) or pa.types.is_float64(t)
        case "bool":
            return pa.types.is_boolean(t)
        case "str_list":
            return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _arrow_str(t.value_type)
        case _:
            return _arrow_str(t)


# --------------------------------------------------------------------------------------------
# Row checks: exact types, defaults filled in. Raise _Bad(field, reason).

def _check_row(obj: dict, env: str) -> dict:
    for name in obj:
        if name not in FIELDS:
            raise _Bad(name, f"unknown field (allowed: {', '.join(FIELDS)})")
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise _Bad(name, "required field is missing")
    row = {}
    for name, (kind, default) in FIELDS.items():
        if name in obj:
            row[name] = _check_value(name, kind, obj[name])
        elif default is not _DERIVED:
            row[name] = default
    row.setdefault("env", env)
    row.setdefault("score", row["reward"])
    row.setdefault("won", row["done"] and row["reward"] > 0)
    for flag in ("won", "lost"):
        if row[flag] and not row["done"]:
            raise _Bad(flag, f"{flag} is true but done is false (a {flag} step ends the episode)")
    if row["won"] and row["lost"]:
        raise _Bad("lost", "won and lost are both true")
    return row


def _check_value(name: str, kind: str, v: Any) -> Any:
    match kind:
        case "id" | "text" | "split" | "action_kind":
            s = _as_str(name, v)
            if kind == "id" and not s.strip():
                raise _Bad(name, f"must not be blank, got {_show(v)}")
            if kind == "split" and s not in SPLITS:
                raise _Bad(name, f"must be one of {', '.join(SPLITS)}, got {_show(v)}")
            if kind == "action_kind" and s not in ACTION_KINDS:
                raise _Bad(name, f"must be one of {', '.join(ACTION_KINDS)}, got {_show(v)}")
            return s
        case "index" | "int":
            if type(v) is not int:
                raise _Bad(name, f"expected an int, got {_show(v)}")
            low = 0 if kind == "index" else _INT64[0]
            if not low <= v <= _INT64[1]:
                raise _Bad(name, f"expected an int in [{low}, 2**63 - 1], got {_show(v)}")
            return v
        case "number":
            if type(v) not in (int, float):
                raise _Bad(name, f"expected a finite number, got {_show(v)}")
            try:
                x = float(v)
            except OverflowError:
                x = math.inf
            if not math.isfinite(x):
                raise _Bad(name, f"expected a finite number, got {_show(v)}")
            return x
        case "bool":
            if type(v) is not bool:
                raise _Bad(name, f"expected a bool (true/false), got {_show(v)}")
            return v
        case "str_list":
            if type(v) is not list:
                raise _Bad(name, f"expected a list of strings, got {_show(v)}")
            if len(v) > MAX_CANDIDATES:
                raise _Bad(name, f"{len(v):,} items, over the limit of {MAX_CANDIDATES:,} (importer.MAX_CANDIDATES)")
            for i, item in enumerate(v):
                if type(item) is not str:
                    raise _Bad(name, f"expected a list of strings, item {i} is {_show(item)}")
                _as_str(name, item)
            return tuple(v)
    raise AssertionError(kind)


def _as_str(name: str, v: Any) -> str:
    if type(v) is not str:
        raise _Bad(name, f"expected a string, got {_show(v)}")
    if len(v) > MAX_FIELD_CHARS:
        raise _Bad(name, f"{len(v):,} characters, over the limit of {MAX_FIELD_CHARS:,} (importer.MAX_FIELD_CHARS)")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:  # JSON "\ud800" escapes decode to lone surrogates Arrow cannot store
        raise _Bad(name, f"string is not valid Unicode (lone surrogate): {_short(v)}") from None
    return v


def _json_kind(v: Any) -> str:
    return {list: "an array", str: "a string", bool: "a bool", int: "a number", float: "a number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _short(v: Any, width: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= width else text[: width - 3] + "..."


def _show(v: Any) -> str:
    """A one-line description of a bad value, in JSON's words where they differ from Python's."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"bool {str(v).lower()}"
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if type(v) is int and abs(v) > 10 ** 30:
        return f"int with {len(str(abs(v)))} digits"
    kind = {str: "str", int: "int", float: "float", list: "list", dict: "object"}.get(type(v), type(v).__name__)
    return f"{kind} {_short(v)}"


# --------------------------------------------------------------------------------------------
# Cross-row checks and assembly.

def _build(src: str, rows: list[tuple[int, dict]]) -> list[Trajectory]:
    def fail(label: int, field: str, reason: str) -> TrajectoryImportError:
        return TrajectoryImportError(src, reason, row=label, field=field)

    seen: dict[tuple[str, int], int] = {}
    by_traj: dict[str, list[tuple[int, dict]]] = {}
    task_first: dict[str, tuple[int, dict]] = {}
    for label, r in rows:
        key = (r["traj_id"], r["step_idx"])
        if key in seen:
            raise fail(label, "step_idx", f"duplicate step {key[1]} of trajectory {_short(key[0])} "
                                          f"(rows {seen[key]} and {label})")
        seen[key] = label
        steps = by_traj.setdefault(r["traj_id"], [])
        if steps:
            first_label, first = steps[0]
            for name in _TRAJ_FIELDS:
                if r[name] != first[name]:
                    raise fail(label, name, f"trajectory {_short(r['traj_id'])} has {_short(first[name])} on "
                                            f"row {first_label} but {_short(r[name])} here")
        steps.append((label, r))
        first_label, first = task_first.setdefault(r["task_id"], (label, r))
        for name in _TASK_FIELDS:
            if r[name] != first[name]:
                raise fail(label, name, f"task {_short(r['task_id'])} has {_short(first[name])} on "
                                        f"row {first_label} but {_short(r[name])} here")

    tasks: dict[str, Task] = {}
    trajs = []
    for traj_id, steps in by_traj.items():
        steps.sort(key=lambda lr: lr[1]["step_idx"])
        for i, (label, r) in enumerate(steps):
            if r["step_idx"] != i:
                where = "starts at" if i == 0 else f"jumps from step {i - 1} to"
                raise fail(label, "step_idx", f"trajectory {_short(traj_id)} {where} step {r['step_idx']} "
                                              f"(steps must be 0..n-1)")
        for label, r in steps[:-1]:
            if r["done"]:
                raise fail(label, "done", f"done is true at step {r['step_idx']} but trajectory "
                                          f"{_short(traj_id)} goes on to step {len(steps) - 1} "
                                          f"(only the last step may be done)")
        r0 = steps[0][1]
        task = tasks.setdefault(r0["task_id"], Task(
            task_id=r0["task_id"], env=r0["env"], game=r0["game"], split=r0["split"], seed=r0["seed"],
            instruction=r0["instruction"], params=r0["params"], source="imported", initial_state=r0["state"]))
        transitions = []
        before = 0.0  # the score before the step: the previous step's (M_exp's progress reads it)
        for label, r in steps:
            try:
                transitions.append(Transition(
                    traj_id=traj_id, task_id=r["task_id"], env=r["env"], step_idx=r["step_idx"],
                    state=r["state"], action=r["action"], next_state=r["next_state"], reward=r["reward"],
                    score=r["score"], done=r["done"], won=r["won"], lost=r["lost"], valid=r["valid"],
                    action_kind=r["action_kind"], candidates=r["candidates"], obs=RawObs(score=before),
                    next_obs=RawObs(score=r["score"]), source="imported", policy=r["policy"],
                    iteration=r["iteration"]))
                before = r["score"]
            except ValueError as exc:  # the dataclass's own checks; the row checks should catch these first
                raise TrajectoryImportError(src, str(exc), row=label) from None
        truncated = not transitions[-1].done
        if truncated:
            transitions[-1] = replace(transitions[-1], done=True)
        trajs.append(Trajectory(traj_id=traj_id, task=task, policy=r0["policy"], steps=tuple(transitions),
                                truncated=truncated))
    return trajs


# --------------------------------------------------------------------------------------------
# Export: a trajectory table back to the input format (the offline-only path's logs).

def export_rows(table: pa.Table, split: str | None = None) -> list[dict]:
    """TRAJECTORY_ROWS_SCHEMA rows -> input-format rows (every field of ``FIELDS``), ordered by
    trajectory then step; ``split`` keeps the trajectories of that task split only."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"export: split must be one of {', '.join(SPLITS)}, got {split!r}")
    out = []
    for row in table.select(list(FIELDS)).to_pylist():
        if split is not None and row["split"] != split:
            continue
        row["candidates"] = list(row["candidates"] or [])
        out.append({name: row[name] for name in FIELDS})
    out.sort(key=lambda r: (r["traj_id"], r["step_idx"]))
    return out


def export_jsonl(table: pa.Table, dest: str, split: str | None = None) -> int:
    """Write ``table``'s trajectories to ``dest`` as importer-format JSONL (atomically); returns the rows."""
    rows = export_rows(table, split)
    if not rows:
        raise ValueError(f"export: no transitions{f' of split {split!r}' if split else ''} to write to {dest}")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(tmp, dest)
    return len(rows)
