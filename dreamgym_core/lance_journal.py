"""Replacing some rows of a LanceDB table as if it were one commit (issue 27, item 3).

LanceDB's delete and add are two commits: a crash between them leaves the rows gone and nothing
in their place. ``replacing(...)`` journals the pair: before the delete, ``<uri>/.<table>.replace.json``
records the table's version (and a tag's, when the caller moves one); the journal goes once the
new rows are in. An exception in between restores that version at once; a kill in between leaves
the journal, and the next ``recover`` (called by every opener: the replay buffer, the Lance IO
manager) restores it first. Readers see the old rows or the new ones, never a half-replaced table.
A per-table ``flock`` (local URIs; the kernel drops it when its holder dies) keeps two writers
from interleaving and a recovery from racing a live writer. Object-store URIs are not journaled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os

from dreamgym_core.faults import fault


def _local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def journal_path(uri: str, name: str) -> str | None:
    return os.path.join(uri.removeprefix("file://"), f".{name}.replace.json") if _local(uri) else None


@contextlib.contextmanager
def table_lock(uri: str, name: str):
    """Exclusive lock on one table (no-op for object stores)."""
    if not _local(uri):
        yield
        return
    root = uri.removeprefix("file://")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_journal(path: str, entry: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(entry, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def roll_back(tbl, entry: dict) -> None:
    """Restore the version a journal recorded, and the tag it pointed at."""
    if tbl.version != entry["version"]:
        tbl.restore(entry["version"])
    tag, old = entry.get("tag"), entry.get("tag_version")
    if tag:
        tags = tbl.tags.list()
        if old is None and tag in tags:
            tbl.tags.delete(tag)
        elif old is not None and tag in tags:
            tbl.tags.update(tag, old)
        elif old is not None:
            tbl.tags.create(tag, old)


def recover_locked(db, uri: str, name: str) -> bool:
    """``recover`` for a caller that holds ``table_lock``."""
    path = journal_path(uri, name)
    if path is None or not os.path.exists(path):
        return False
    with open(path) as f:
        entry = json.load(f)
    try:
        tbl = db.open_table(name)
    except ValueError:   # the table itself is gone: nothing to roll back
        tbl = None
    if tbl is not None:
        roll_back(tbl, entry)
    os.remove(path)
    return True


def recover(db, uri: str, name: str) -> bool:
    """Roll back a replace that a killed writer left half done. True when it did."""
    path = journal_path(uri, name)
    if path is None or not os.path.exists(path):
        return False
    with table_lock(uri, name):
        return recover_locked(db, uri, name)


@contextlib.contextmanager
def replacing(tbl, uri: str, name: str, tag: str | None = None):
    """Journal the commits made in the block; roll them back if it raises. Call under ``table_lock``."""
    path = journal_path(uri, name)
    entry = {"version": tbl.version, "tag": tag, "pid": os.getpid(),
             "tag_version": tbl.tags.list().get(tag, {}).get("version") if tag else None}
    if path is not None:
        write_journal(path, entry)
    try:
        fault("lance:before_delete")
        yield
    except BaseException:
        roll_back(tbl, entry)
        if path is not None:
            os.remove(path)
        raise
    if path is not None:
        os.remove(path)
