"""Atomic Parquet I/O on local paths or URIs (pyarrow filesystems: file, s3, gcs...).

Writers put the whole file under a temporary name in the destination folder and move it into
place, so a crash or a validation error never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dreamgym_core.faults import fault


def _fs_path(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def write_parquet_atomic(table: pa.Table, uri: str) -> str:
    """Write ``table`` to ``uri`` atomically (temp file + move). Returns the final path."""
    fs, path = _fs_path(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
    try:
        with fs.open_output_stream(tmp) as f:
            pq.write_table(table, f, compression="zstd")
        fault("parquet:before_move")
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise
    return path


def read_parquet(uri: str) -> pa.Table:
    fs, path = _fs_path(uri)
    return pq.read_table(path, filesystem=fs)


def exists(uri: str) -> bool:
    fs, path = _fs_path(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def file_sha256(uri: str) -> str:
    """sha256 of a file's bytes (local path or URI)."""
    import hashlib

    fs, path = _fs_path(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: str, what: str = "") -> dict:
    """A JSON object from ``path``; malformed JSON or another JSON type is a one-line ValueError naming
    the file (``what``, e.g. "manifest", prefixes the complaint)."""
    import json

    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {what + ' is ' if what else ''}not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {what + ' must be' if what else 'expected'} a JSON object, "
                         f"got {type(obj).__name__}")
    return obj
