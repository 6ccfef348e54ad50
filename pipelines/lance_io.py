"""LanceDB IO manager: one table per asset at ``<uri>/<asset key joined by '__'>.lance``.

A partitioned asset owns the rows whose ``partition_column`` equals its partition key (as an int
when the column is an integer: key "003" -> 3). Re-materializing a partition deletes those rows,
then adds the new ones, so it is idempotent. Delete and add are two Lance commits, so the pair is
journaled (``dreamgym_core.lance_journal``): an exception between them restores the previous
version at once, a kill leaves a journal that the next open of the table (a re-run, a downstream
load) rolls back first. Readers see the old partition or the new one, never an empty one. After each write the version is tagged
``partition-<key>``: a downstream step that asks for a ``LanceTableRef`` reads the table exactly
as that materialization left it (``ReplayBuffer.search(..., as_of_version=ref.version)``), even
after later partitions were written. Tables with a ``vector`` column get their ANN index
maintained by ``dreamgym_core.buffer.ensure_vector_index`` before the tag, so the tagged version
carries it.

Outputs: ``pyarrow.Table`` or ``polars.DataFrame`` (e.g. ``ReplayBuffer.encode_rows(...)``).
Inputs: annotated ``pa.Table`` / ``pl.DataFrame`` -> the rows of the upstream partition(s);
otherwise a ``LanceTableRef``. A missing table or partition loads as ``None``.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass

import dagster as dg
import lancedb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from dreamgym_core.buffer import LANCE_FILE_VERSION, BufferConfig, ensure_vector_index
from dreamgym_core.faults import fault as _fault
from dreamgym_core.lance_journal import recover, recover_locked, replacing, table_lock


@dataclass(frozen=True)
class LanceTableRef:
    """A LanceDB table at one version: what an upstream materialization left."""

    uri: str
    table: str
    version: int
    partition: str | None = None


def _tag(partition_key: str) -> str:
    return "partition-" + re.sub(r"[^A-Za-z0-9._-]", "_", partition_key)


def _open(db, name: str):
    try:
        return db.open_table(name)
    except ValueError:       # not found
        return None


class LanceDBIOManager(dg.ConfigurableIOManager):
    """Stores asset outputs as LanceDB tables; see the module docstring."""

    uri: str
    """LanceDB database: a local folder or an object-store URI."""
    partition_column: str = "iteration"
    """Column holding a row's partition; added when the output lacks it, checked when present."""
    index_min_rows: int = 50_000
    """Tables with a ``vector`` column get an ANN index from this many rows on."""

    def _name(self, key: dg.AssetKey) -> str:
        return "__".join(key.path)

    def _value(self, schema: pa.Schema, key: str):
        col = self.partition_column
        if col in schema.names and pa.types.is_integer(schema.field(col).type):
            try:
                return int(key)
            except ValueError:
                raise ValueError(f"partition key {key!r} is not an integer but column {col!r} is "
                                 f"{schema.field(col).type}; use a string column for such keys") from None
        return key

    def _where(self, value) -> str:
        lit = str(value) if isinstance(value, int) else "'" + value.replace("'", "''") + "'"
        return f"{self.partition_column} = {lit}"

    def _write(self, context, name: str, data: pa.Table, part: str | None):
        db = lancedb.connect(self.uri)
        tbl = _open(db, name)
        tag = _tag(part) if part is not None else None
        if tbl is None:
            tbl = db.create_table(name, data=data, data_storage_version=LANCE_FILE_VERSION)
            return tbl, self._index_and_tag(tbl, data, tag), tag
        if not tbl.schema.equals(data.schema, check_metadata=True):
            raise ValueError(f"{context.asset_key.to_user_string()}: output schema differs from table {name} "
                             f"at {self.uri}:\n  table:  {tbl.schema}\n  output: {data.schema}\n"
                             "(metadata included, e.g. the embedder); write to a new table or migrate it")
        if part is None:
            tbl.add(data, mode="overwrite")   # one commit
            return tbl, self._index_and_tag(tbl, data, None), None
        with replacing(tbl, self.uri, name, tag):
            tbl.delete(self._where(self._value(data.schema, part)))
            _fault("lance:between_delete_and_add")
            tbl.add(data)
            _fault("lance:before_tag")
            index = self._index_and_tag(tbl, data, tag)
        return tbl, index, tag

    def _index_and_tag(self, tbl, data: pa.Table, tag: str | None) -> str:
        index = "none"
        if "vector" in data.column_names:
            index = ensure_vector_index(tbl, BufferConfig(index_min_rows=self.index_min_rows))
        if tag is not None:
            if tag in tbl.tags.list():
                tbl.tags.update(tag, tbl.version)
            else:
                tbl.tags.create(tag, tbl.version)
        return index

    def handle_output(self, context: dg.OutputContext, obj: pa.Table | pl.DataFrame | None) -> None:
        if obj is None:
            return
        data = obj.to_arrow() if isinstance(obj, pl.DataFrame) else obj
        if not isinstance(data, pa.Table):
            raise TypeError(f"{context.asset_key.to_user_string()}: LanceDBIOManager stores pyarrow Tables or "
                            f"polars DataFrames, got {type(obj).__name__}")
        name = self._name(context.asset_key)
        part = context.asset_partition_key if context.has_asset_partitions else None
        if part is not None:
            value = self._value(data.schema, part)
            col = self.partition_column
            if col not in data.column_names:
                typ = pa.int64() if isinstance(value, int) else pa.string()
                data = data.append_column(col, pa.array([value] * data.num_rows, typ))
            elif data.num_rows and set(data[col].to_pylist()) != {value}:
                bad = sorted(set(data[col].to_pylist()) - {value}, key=str)[:5]
                raise ValueError(f"{context.asset_key.to_user_string()}[{part}]: rows carry {col} values {bad}; "
                                 f"every row of this partition must have {col} = {value!r}")
        with table_lock(self.uri, name):
            recovered = recover_locked(lancedb.connect(self.uri), self.uri, name)
            tbl, index, tag = self._write(context, name, data, part)
        by_source = {}
        if "source" in data.column_names:
            counts = pc.value_counts(tbl.search().select(["source"]).limit(None).to_arrow()["source"])
            by_source = {c["values"]: c["counts"] for c in counts.to_pylist()}
        context.add_output_metadata({
            "path": dg.MetadataValue.path(f"{self.uri.rstrip('/')}/{name}.lance"),
            "lance_version": tbl.version, "tag": tag or "", "rows_written": data.num_rows,
            "table_rows": tbl.count_rows(), "rows_by_source": dg.MetadataValue.json(by_source),
            "vector_index": index, "rolled_back_interrupted_write": recovered,
        })

    def load_input(self, context: dg.InputContext):
        name = self._name(context.asset_key)
        recover(lancedb.connect(self.uri), self.uri, name)
        tbl = _open(lancedb.connect(self.uri), name)
        keys = list(context.asset_partition_keys) if context.has_asset_partitions else None
        if tbl is None or keys == []:     # first iteration: the k-1 mapping yields no partition
            return None
        want = context.dagster_type.typing_type if context.dagster_type else None
        args = [a for a in typing.get_args(want) if a is not type(None)]
        want = args[0] if len(args) == 1 else want
        if want in (pa.Table, pl.DataFrame):
            q = tbl.search().limit(None)
            if keys is not None:
                q = q.where(" OR ".join(self._where(self._value(tbl.schema, k)) for k in keys))
            data = q.to_arrow()
            return data if want is pa.Table else pl.from_arrow(data)
        if keys is None:
            return LanceTableRef(self.uri, name, tbl.version)
        if len(keys) != 1:
            raise ValueError(f"{context.asset_key.to_user_string()}: a LanceTableRef input covers one partition, "
                             f"got {len(keys)}; annotate the input pa.Table or pl.DataFrame to read several")
        version = tbl.tags.list().get(_tag(keys[0]), {}).get("version")
        return None if version is None else LanceTableRef(self.uri, name, version, keys[0])
