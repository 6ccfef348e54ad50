"""Parquet IO manager: ``<base>/<asset>/<partition>.parquet`` or ``<base>/<asset>.parquet``.

Written by hand rather than taken from dagster-polars so that every write is atomic (temp file +
move, dreamgym_core.io): a killed run never leaves a half-written partition for DuckDB to read.
Assets return a ``pyarrow.Table`` or ``polars.DataFrame``; inputs load as ``polars.DataFrame``
(or ``pyarrow.Table`` when the input is annotated so). A missing upstream partition (iteration 001
has no 000) loads as ``None``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import dagster as dg
import polars as pl
import pyarrow as pa

from dreamgym_core.faults import fault
from dreamgym_core.io import exists, read_json_object, read_parquet, write_parquet_atomic
from dreamgym_core.schema import CheckpointRef


def parquet_path(base_dir: str, asset: str, partition: str | None = None) -> str:
    """Where ``ParquetIOManager(base_dir)`` keeps ``asset`` (a key's path joined by '/') and its partition."""
    return f"{base_dir}/{asset}/{partition}.parquet" if partition else f"{base_dir}/{asset}.parquet"


def missing_partitions(context: dg.InputContext, keys: list[str], present: list[str]) -> list[str]:
    """A range load (several partitions) that lacks some: the ones after the last present one were not
    run yet, which is expected and counted in a warning of the run log (Dagster 1.13 cannot attach input
    metadata to a multi-partition load); a gap before it means a result the reader would silently go without, so it is an error."""
    missing = [k for k in keys if k not in present]
    if not missing or len(keys) <= 1:
        return missing
    last = max((keys.index(k) for k in present), default=-1)
    gaps = [k for k in missing if keys.index(k) < last]
    name = context.asset_key.to_user_string()
    if gaps:
        raise FileNotFoundError(f"{name}: partitions {gaps} are missing between materialized ones (up to "
                                f"{keys[last]}); materialize them (or delete the later ones) so no result is "
                                "silently left out")
    context.log.warning(f"{name}: missing_partitions={len(missing)} of {len(keys)} not materialized yet, skipped: "
                        f"{missing[:5]}{'...' if len(missing) > 5 else ''}")
    return missing


class ParquetIOManager(dg.ConfigurableIOManager):
    """Writes a table unless the file already holds exactly that table (the loop's stages write their
    tables to these paths as they finish: one stored copy, not rewritten when the asset is output)."""

    base_dir: str
    """Local folder or URI (s3://..., gs://...) holding one folder per asset."""

    def _path(self, key: dg.AssetKey, partition: str | None) -> str:
        return parquet_path(self.base_dir, "/".join(key.path), partition)

    def handle_output(self, context: dg.OutputContext, obj: pa.Table | pl.DataFrame | None) -> None:
        if obj is None:
            return
        table = obj.to_arrow() if isinstance(obj, pl.DataFrame) else obj
        if not isinstance(table, pa.Table):
            raise TypeError(f"{context.asset_key.to_user_string()}: ParquetIOManager stores pyarrow Tables "
                            f"or polars DataFrames, got {type(obj).__name__}")
        part = context.asset_partition_key if context.has_asset_partitions else None
        path = self._path(context.asset_key, part)
        if not (exists(path) and read_parquet(path).equals(table)):
            path = write_parquet_atomic(table, path)
        context.add_output_metadata({"path": dg.MetadataValue.path(path), "rows": table.num_rows,
                                     "columns": len(table.column_names)})

    def load_input(self, context: dg.InputContext):
        key = context.asset_key
        parts = list(context.asset_partition_keys) if context.has_asset_partitions else [None]
        if not parts:
            return None
        tables = []
        if context.has_asset_partitions and len(parts) > 1:
            missing_partitions(context, parts, [p for p in parts if exists(self._path(key, p))])
        for part in parts:
            path = self._path(key, part)
            if not exists(path):
                # over many iterations, the ones not run yet (counted above): skipped
                if context.has_asset_partitions:
                    continue
                if getattr(context.dagster_type, "is_nullable", False):
                    return None
                raise FileNotFoundError(f"{key.to_user_string()}: {path} not found; materialize it first")
            tables.append(read_parquet(path))
        if not tables:
            return None
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        want = context.dagster_type.typing_type if context.dagster_type else None
        wants_arrow = want is pa.Table or pa.Table in getattr(want, "__args__", ())  # pa.Table | None
        return table if wants_arrow else pl.from_arrow(table)


class CheckpointIOManager(dg.ConfigurableIOManager):
    """Stores a ``CheckpointRef`` as ``<base>/<asset>[/<partition>]/manifest.json``.

    The weights stay where training wrote them; the manifest is written atomically, and a missing
    parent partition (iteration 001 has no 000) loads as ``None``.
    """

    base_dir: str

    def _manifest(self, key: dg.AssetKey, partition: str | None) -> str:
        parts = [self.base_dir, *key.path] + ([partition] if partition else [])
        return os.path.join(*parts, "manifest.json")

    def handle_output(self, context: dg.OutputContext, obj: CheckpointRef) -> None:
        if not isinstance(obj, CheckpointRef):
            raise TypeError(f"{context.asset_key.to_user_string()}: CheckpointIOManager stores CheckpointRef, "
                            f"got {type(obj).__name__}")
        part = context.asset_partition_key if context.has_asset_partitions else None
        path = self._manifest(context.asset_key, part)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fault("checkpoint:before_manifest")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(obj), f, indent=2)
        os.replace(tmp, path)
        context.add_output_metadata({"checkpoint_path": dg.MetadataValue.path(obj.path),
                                     "manifest": dg.MetadataValue.path(path),
                                     "parent_checkpoint": obj.parent or "<fresh>",
                                     **{k: float(v) for k, v in obj.metrics.items()}})

    def _read(self, path: str) -> CheckpointRef:
        """A manifest -> its ref; a malformed one, or one whose weights are gone, is a one-line error."""
        obj = read_json_object(path, "manifest")
        fields = set(CheckpointRef.__dataclass_fields__)
        if set(obj) - fields or not {"path", "kind"} <= set(obj):
            raise ValueError(f"{path}: manifest fields {sorted(obj)} do not match CheckpointRef "
                             f"(unknown: {sorted(set(obj) - fields)}, missing: {sorted({'path', 'kind'} - set(obj))})")
        ref = CheckpointRef(**obj)
        if not isinstance(ref.path, str):
            raise ValueError(f"{path}: field 'path' must be a string, got {type(ref.path).__name__}")
        if ref.path and "://" not in ref.path and not os.path.exists(ref.path):
            raise FileNotFoundError(f"{path}: points to {ref.path}, which does not exist; re-materialize "
                                    f"{os.path.basename(os.path.dirname(path))}")
        return ref

    def load_input(self, context: dg.InputContext) -> CheckpointRef | dict[str, CheckpointRef] | None:
        """One partition -> its ref (None if absent: iteration 001 has no 000); several partitions (an
        AllPartitionMapping) -> {key: ref} of the materialized ones; unpartitioned -> the ref, or None
        when the input is typed Optional and the asset was never materialized."""
        if context.has_asset_partitions:
            keys = list(context.asset_partition_keys)
            if len(keys) > 1:
                found = {k: self._manifest(context.asset_key, k) for k in keys}
                missing_partitions(context, keys, [k for k, p in found.items() if os.path.exists(p)])
                return {k: self._read(p) for k, p in found.items() if os.path.exists(p)}
            if not keys:
                return None
            path = self._manifest(context.asset_key, keys[0])
            return self._read(path) if os.path.exists(path) else None
        path = self._manifest(context.asset_key, None)
        if not os.path.exists(path):
            # `X | None` resolves to an OptionalType, whose kind (not an attribute) says it is nullable
            if getattr(context.dagster_type.kind, "name", "") == "NULLABLE":
                return None
            raise FileNotFoundError(f"{context.asset_key.to_user_string()}: {path} not found; materialize it first")
        return self._read(path)
