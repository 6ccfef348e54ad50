"""Read-only SQL over every Parquet asset, with DuckDB.

Each asset lives at ``<data>/parquet/<asset>/<partition>.parquet`` (partitioned) or
``<data>/parquet/<asset>.parquet``; each becomes a view named after the asset, across all its
partitions (a ``_partition`` column holds the partition key). Three views are derived:

    transitions   every transition-level asset (offline, imported, rollouts...), with ``asset``;
                  derived tables (e.g. cot_annotations, which has ``reasoning``) stay out so no
                  step is counted twice
    trajectories  one row per episode of those assets (success, return, length, policy...)
    tasks         every task-level asset (seed, eval, synthesized...), with ``asset``
    curriculum    one row per iteration: M_task's proposals, parsed, parse_rate, kept, drop_<reason>
                  (task_proposals), and the synthetic tasks that iteration's batch rolled out with
                  their episodes and success rate (rollouts)

The same views can be created in any DuckDB session with ``create_views(con, data_dir)``.
Only SELECT / EXPLAIN statements are run: inspection never writes. That check is the first of
two: the connection that runs user SQL (``sandboxed_connection``) is also locked down by DuckDB
itself (``enable_external_access=false`` with ``allowed_paths`` = the Parquet files the views
read, no extension auto-install or auto-load, then ``lock_configuration``), so even a statement
that got past the check could not create a file, ATTACH a database, read any other file or switch
the settings back (it could overwrite one of the allowed Parquet files: only the first layer stops
that, and DuckDB runs no SELECT that writes). Files under the root that resolve (symlinks) outside it are skipped.
"""

from __future__ import annotations

import decimal
import io
import json
import os
import re
from pathlib import Path

import duckdb

from dreamgym_core.schema import TASK_SCHEMA, TRAJECTORY_ROWS_SCHEMA, TRANSITION_SCHEMA

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRANSITION_COLS = TRANSITION_SCHEMA.names
_TASK_COLS = TASK_SCHEMA.names
# Columns that mark a table as derived from another transition asset (cot_annotations).
_DERIVED_MARKERS = {"reasoning", "target"}


def parquet_root(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "parquet"


def discover_assets(data_dir: str | os.PathLike) -> dict[str, tuple[list[str], bool]]:
    """asset name -> (parquet files, partitioned?). Hidden temp files are ignored."""
    root = parquet_root(data_dir)
    found: dict[str, tuple[list[str], bool]] = {}
    if not root.is_dir():
        return found
    real_root = root.resolve()

    def inside(p: Path) -> bool:
        return p.resolve().is_relative_to(real_root)

    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not inside(entry):
            continue
        if entry.is_dir() and _NAME.match(entry.name):
            files = sorted(str(p) for p in entry.glob("*.parquet") if not p.name.startswith(".") and inside(p))
            if files:
                found[entry.name] = (files, True)
        elif entry.suffix == ".parquet" and _NAME.match(entry.stem):
            found[entry.stem] = ([str(entry)], False)
    return found


def _quote_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def create_views(con: duckdb.DuckDBPyConnection, data_dir: str | os.PathLike,
                 ddl: list[str] | None = None) -> list[str]:
    """Create one view per asset plus transitions / trajectories / tasks. Returns view names.

    Every statement executed is appended to ``ddl`` when given (``dreamgym views --ddl`` prints
    them for the duckdb CLI).
    """
    views = []
    ddl = [] if ddl is None else ddl

    def execute(sql: str) -> None:
        con.execute(sql)
        ddl.append(" ".join(sql.split()))

    transition_assets, trajectory_assets, task_assets = [], [], []
    for name, (files, partitioned) in discover_assets(data_dir).items():
        part = ", parse_filename(filename, true) AS _partition" if partitioned else ""
        src = f"read_parquet({_quote_list(files)}, union_by_name=true{', filename=true' if partitioned else ''})"
        select = f"SELECT * EXCLUDE (filename){part} FROM {src}" if partitioned else f"SELECT * FROM {src}"
        execute(f'CREATE OR REPLACE VIEW "{name}" AS {select}')
        views.append(name)
        cols = {r[0] for r in con.execute(f'DESCRIBE "{name}"').fetchall()}
        if _DERIVED_MARKERS & cols:
            continue  # annotations of another asset's transitions: counting them would double every step
        if set(_TRANSITION_COLS) <= cols:
            transition_assets.append(name)
            if set(TRAJECTORY_ROWS_SCHEMA.names) <= cols:
                trajectory_assets.append(name)
        elif set(_TASK_COLS) <= cols:
            task_assets.append(name)

    def union(names: list[str], cols: list[str]) -> str:
        col_sql = ", ".join(f'"{c}"' for c in cols)
        return " UNION ALL ".join(f"SELECT '{n}' AS asset, {col_sql} FROM \"{n}\"" for n in names)

    if transition_assets:
        execute(f"CREATE OR REPLACE VIEW transitions AS {union(transition_assets, _TRANSITION_COLS)}")
        views.append("transitions")
    if trajectory_assets:
        cols = _TRANSITION_COLS + ["game", "split", "num_steps", "success", "crashed", "truncated"]
        execute(f"""CREATE OR REPLACE VIEW trajectories AS
            SELECT asset, traj_id, any_value(task_id) AS task_id, any_value(env) AS env,
                   any_value(game) AS game, any_value(split) AS split, any_value(policy) AS policy,
                   any_value(source) AS source, any_value(iteration) AS iteration,
                   count(*) AS num_steps, bool_or(won) AS success, sum(reward) AS return,
                   avg(CASE WHEN valid THEN 1.0 ELSE 0.0 END) AS valid_rate,
                   bool_or(crashed) AS crashed, bool_or(truncated) AS truncated
            FROM ({union(trajectory_assets, cols)}) GROUP BY asset, traj_id""")
        views.append("trajectories")
    if task_assets:
        execute(f"CREATE OR REPLACE VIEW tasks AS {union(task_assets, _TASK_COLS)}")
        views.append("tasks")
    if "task_proposals" in views:
        execute(_curriculum_view("rollouts" in trajectory_assets))
        views.append("curriculum")
    return views


def _curriculum_view(with_rollouts: bool) -> str:
    """The ``curriculum`` view: per iteration k, what M_task proposed in k and its fate, beside the
    synthetic tasks k's batch rolled out (kept in earlier iterations) and how they fared."""
    from dreamgym_core.curriculum import DROP_REASONS

    drops = ", ".join(f"count(*) FILTER (WHERE reason = '{r}') AS drop_{r}" for r in DROP_REASONS)
    p = f"""SELECT iteration, count(*) AS proposals, count(*) FILTER (WHERE parsed) AS parsed,
                   count(*) FILTER (WHERE kept) AS kept, {drops}
            FROM task_proposals GROUP BY iteration"""
    r = """SELECT iteration, count(DISTINCT task_id) AS synthetic_rolled_out, count(*) AS synthetic_episodes,
                  avg(CASE WHEN success THEN 1.0 ELSE 0.0 END) AS synthetic_success_rate
           FROM (SELECT iteration, traj_id, any_value(task_id) AS task_id, bool_or(success) AS success
                 FROM rollouts WHERE task_source = 'synthetic' GROUP BY iteration, traj_id)
           GROUP BY iteration""" if with_rollouts else \
        "SELECT NULL::BIGINT AS iteration, 0 AS synthetic_rolled_out, 0 AS synthetic_episodes, " \
        "NULL::DOUBLE AS synthetic_success_rate WHERE false"
    zero = ", ".join(f"coalesce(drop_{x}, 0) AS drop_{x}" for x in DROP_REASONS)
    return f"""CREATE OR REPLACE VIEW curriculum AS
        SELECT iteration, coalesce(proposals, 0) AS proposals, coalesce(parsed, 0) AS parsed,
               parsed / nullif(proposals, 0) AS parse_rate, coalesce(kept, 0) AS kept, {zero},
               coalesce(synthetic_rolled_out, 0) AS synthetic_rolled_out,
               coalesce(synthetic_episodes, 0) AS synthetic_episodes, synthetic_success_rate
        FROM ({p}) FULL OUTER JOIN ({r}) USING (iteration) ORDER BY iteration"""


def _check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise ValueError(f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise ValueError("SQL is empty")
    for st in statements:
        if st.type not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
            raise ValueError(f"only SELECT queries are allowed (read-only inspection); got {st.type.name}")


def sandboxed_connection(data_dir: str | os.PathLike) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory DuckDB with the asset views that can read only ``<data>/parquet`` and nothing
    else: no writes, no ATTACH, no extensions, settings locked. Returns (connection, view names)."""
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    views = create_views(con, data_dir)
    # the exact files the views read, not their folder: a folder would let COPY create files in it
    files = [f for fs, _ in discover_assets(data_dir).values() for f in fs]
    con.execute(f"SET allowed_paths = {_quote_list(files)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con, views


def query(data_dir: str | os.PathLike, sql: str) -> duckdb.DuckDBPyRelation | None:
    con, views = sandboxed_connection(data_dir)
    if not views:
        raise ValueError(f"no Parquet assets under {parquet_root(data_dir)}; run `make demo` first")
    _check_read_only(con, sql)
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        msg = str(exc).splitlines()[0]
        raise ValueError(f"{msg} (views: {', '.join(views)})") from None


def run_query(data_dir: str | os.PathLike, sql: str, fmt: str = "table", max_rows: int = 100) -> str:
    """Run ``sql`` and format the result: table (readable), csv, or json (array of objects)."""
    if fmt not in ("table", "csv", "json"):
        raise ValueError(f"format must be table, csv or json, got {fmt!r}")
    rel = query(data_dir, sql)
    if rel is None:
        return ""
    tbl = rel.to_arrow_table()
    if fmt == "json":
        return json.dumps(tbl.to_pylist(), default=_json_default, ensure_ascii=False)
    if fmt == "csv":
        import pyarrow.csv as pacsv

        buf = io.BytesIO()
        pacsv.write_csv(tbl, buf)
        return buf.getvalue().decode()
    return _render_table(tbl, max_rows)


def _json_default(v):
    # DuckDB sums are HUGEINT/DECIMAL, which arrive as Decimal: keep them numbers in JSON.
    if isinstance(v, decimal.Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return str(v)


def _render_table(tbl, max_rows: int) -> str:
    cols = tbl.column_names
    rows = tbl.slice(0, max_rows).to_pylist()

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        s = "" if v is None else str(v)
        s = s.replace("\n", " ")
        return s if len(s) <= 60 else s[:57] + "..."

    grid = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(g[i]) for g in grid]) for i, c in enumerate(cols)]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), line]
    out += [" | ".join(v.ljust(w) for v, w in zip(g, widths)) for g in grid]
    more = tbl.num_rows - len(rows)
    out.append(f"({tbl.num_rows} rows" + (f", {more} not shown; use --format csv for all)" if more > 0 else ")"))
    return "\n".join(out)
