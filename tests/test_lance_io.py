import os

import dagster as dg
import lancedb
import polars as pl
import pyarrow as pa
import pytest

from dreamgym_core.buffer import BufferConfig, ReplayBuffer
from dreamgym_core.buffer_rows import encode_rows
from dreamgym_core.embed import HashingEmbedder
from pipelines.lance_io import LanceDBIOManager, LanceTableRef

EMB = HashingEmbedder(32)
PARTS = dg.StaticPartitionsDefinition(["001", "002"])


def transitions(key: str, n: int = 6) -> pa.Table:
    return pa.Table.from_pylist([
        dict(traj_id=f"{key}-{i // 3}", task_id=f"task/{i % 2}", env="twx", step_idx=i % 3,
             state=f"room {key} item {i}", action=f"take item {i}", next_state=f"holding {i}",
             reward=0.0, done=False, won=False, valid=True) for i in range(n)])


@dg.asset(partitions_def=PARTS, io_manager_key="lance_io_manager")
def replay_buffer(context: dg.AssetExecutionContext) -> pa.Table:
    key = context.partition_key
    return encode_rows(EMB, transitions(key), "synthetic", iteration=int(key))


@dg.asset(partitions_def=PARTS, ins={"replay_buffer": dg.AssetIn(input_manager_key="lance_io_manager")})
def retrieved(context: dg.AssetExecutionContext, replay_buffer: LanceTableRef) -> None:
    buf = ReplayBuffer(replay_buffer.uri, EMB, BufferConfig(table=replay_buffer.table))
    hits = buf.search("room 002 item 1", "take item 1", k=20, as_of_version=replay_buffer.version)
    context.add_output_metadata({"iterations": sorted({h.iteration for h in hits})})


@dg.asset(partitions_def=PARTS, ins={"replay_buffer": dg.AssetIn(input_manager_key="lance_io_manager")})
def as_frame(replay_buffer: pl.DataFrame) -> None:
    assert replay_buffer["iteration"].unique().to_list() in ([1], [2])


def _run(uri, key, selection=None):
    res = dg.materialize([replay_buffer, retrieved, as_frame], partition_key=key,
                         selection=selection or [replay_buffer],
                         resources={"lance_io_manager": LanceDBIOManager(uri=uri)})
    assert res.success
    return res


def _meta(res, asset="replay_buffer"):
    mats = [e for e in res.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)]
    return {k: v.value for k, v in mats[0].materialization.metadata.items()}


def _sorted_rows(uri):
    t = lancedb.connect(uri).open_table("replay_buffer").to_arrow().drop_columns(["vector"])
    return sorted(t.to_pylist(), key=lambda r: (r["iteration"], r["traj_id"], r["step_idx"]))


def test_rematerializing_a_partition_is_idempotent(tmp_path):
    uri = str(tmp_path / "lancedb")
    m1 = _meta(_run(uri, "001"))
    assert (m1["rows_written"], m1["table_rows"], m1["rows_by_source"], m1["tag"]) == \
        (6, 6, {"synthetic": 6}, "partition-001")
    assert m1["path"].endswith("replay_buffer.lance")
    m2 = _meta(_run(uri, "002"))
    assert m2["table_rows"] == 12 and m2["lance_version"] > m1["lance_version"]
    rows_before = _sorted_rows(uri)
    buf = ReplayBuffer(uri, EMB)
    hits_before = buf.search("room 001 item 2", "take item 2", k=5)

    m3 = _meta(_run(uri, "001"))                       # again: delete partition 001's rows, then add
    assert (m3["rows_written"], m3["table_rows"], m3["rows_by_source"]) == (6, 12, {"synthetic": 12})
    assert _sorted_rows(uri) == rows_before
    buf.refresh()
    assert buf.search("room 001 item 2", "take item 2", k=5) == hits_before
    tags = lancedb.connect(uri).open_table("replay_buffer").tags.list()
    assert tags["partition-001"]["version"] == m3["lance_version"]
    assert tags["partition-002"]["version"] == m2["lance_version"]


def test_downstream_reads_the_version_its_partition_left(tmp_path):
    uri = str(tmp_path / "lancedb")
    _run(uri, "001")
    _run(uri, "002")
    # partition 001's ref is the table before 002 was written: 002's rows are invisible to it
    assert _meta(_run(uri, "001", [retrieved, as_frame]), "retrieved")["iterations"] == [1]
    assert _meta(_run(uri, "002", [retrieved, as_frame]), "retrieved")["iterations"] == [1, 2]


def test_rows_labelled_with_another_partition_are_refused(tmp_path):
    @dg.asset(name="replay_buffer", partitions_def=PARTS, io_manager_key="lance_io_manager")
    def mislabelled(context: dg.AssetExecutionContext) -> pa.Table:
        return encode_rows(EMB, transitions("x"), "synthetic", iteration=7)

    with pytest.raises(ValueError, match="must have iteration = 1"):
        dg.materialize([mislabelled], partition_key="001",
                       resources={"lance_io_manager": LanceDBIOManager(uri=str(tmp_path / "db"))})


# --- issue 27: replacing a partition is delete + add (two commits), journaled and rolled back ---

def _latest_rows(uri):
    t = lancedb.connect(uri).open_table("replay_buffer").to_arrow().drop_columns(["vector"])
    return sorted(t.to_pylist(), key=lambda r: (r["iteration"], r["traj_id"], r["step_idx"]))


@pytest.mark.parametrize("point", ["lance:before_delete", "lance:between_delete_and_add", "lance:before_tag"])
def test_an_exception_mid_replace_rolls_back(tmp_path, monkeypatch, point):
    uri = str(tmp_path / "lancedb")
    _run(uri, "001")
    m2 = _meta(_run(uri, "002"))
    before = _latest_rows(uri)
    monkeypatch.setenv("DREAMGYM_FAULT", point + ":raise")
    res = dg.materialize([replay_buffer], partition_key="001", raise_on_error=False,
                         resources={"lance_io_manager": LanceDBIOManager(uri=uri)})
    assert not res.success
    assert _latest_rows(uri) == before                      # partition 001 still there, nothing doubled
    tags = lancedb.connect(uri).open_table("replay_buffer").tags.list()
    assert tags["partition-002"]["version"] == m2["lance_version"]
    assert not list(tmp_path.glob("lancedb/.*.replace.json"))


_KILL_SCRIPT = """
import sys
import os

import dagster as dg
sys.path.insert(0, {tests!r})
from test_lance_io import replay_buffer
from pipelines.lance_io import LanceDBIOManager
dg.materialize([replay_buffer], partition_key="001", resources={{"lance_io_manager": LanceDBIOManager(uri={uri!r})}})
"""


def test_a_kill_between_delete_and_add_is_rolled_back_on_next_open(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    uri = str(tmp_path / "lancedb")
    _run(uri, "001")
    _run(uri, "002")
    before = _latest_rows(uri)
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent), uri=uri)
    env = {**os.environ, "DREAMGYM_FAULT": "lance:between_delete_and_add:kill",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "lancedb" / ".replay_buffer.replace.json").exists()
    # the raw table as the killed writer left it: partition 001 deleted, nothing added (what the journal repairs)
    assert {r["iteration"] for r in _latest_rows(uri)} == {2}
    # a downstream load (not a re-run) repairs it first and sees the old partition
    _run(uri, "001", [as_frame])
    assert _latest_rows(uri) == before
    assert not (tmp_path / "lancedb" / ".replay_buffer.replace.json").exists()
    m3 = _meta(_run(uri, "001"))                             # and the re-run completes
    assert m3["rolled_back_interrupted_write"] is False and m3["table_rows"] == 12
    assert _latest_rows(uri) == before


def test_recovery_at_handle_output_is_reported(tmp_path):
    from dreamgym_core.lance_journal import journal_path as _journal, write_journal as _write_journal

    uri = str(tmp_path / "lancedb")
    _run(uri, "001")
    tbl = lancedb.connect(uri).open_table("replay_buffer")
    v = tbl.version
    _write_journal(_journal(uri, "replay_buffer"), {"version": v, "tag": "partition-001",
                                                     "tag_version": tbl.tags.list()["partition-001"]["version"]})
    tbl.delete("iteration = 1")                               # a writer that died after its delete
    m = _meta(_run(uri, "002"))
    assert m["rolled_back_interrupted_write"] is True
    assert {r["iteration"] for r in _latest_rows(uri)} == {1, 2} and m["table_rows"] == 12


def test_replay_buffer_replace_is_rolled_back_too(tmp_path, monkeypatch):
    """The loop writes its buffer with ReplayBuffer.add(replace=True): the same delete + add."""
    from dreamgym_core import faults
    from dreamgym_core.buffer import ReplayBufferError
    from dreamgym_core.lance_journal import journal_path, write_journal

    uri = str(tmp_path / "buf")
    buf = ReplayBuffer(uri, EMB)
    buf.add(transitions("001"), "synthetic", 1)
    buf.add(transitions("002"), "synthetic", 2)
    rows = lambda: sorted(lancedb.connect(uri).open_table("replay_buffer").to_arrow()  # noqa: E731
                          .drop_columns(["vector"]).to_pylist(), key=lambda r: (r["iteration"], r["traj_id"],
                                                                                 r["step_idx"]))
    snapshot = rows()
    faults.reset()
    monkeypatch.setenv("DREAMGYM_FAULT", "lance:between_delete_and_add:raise")
    with pytest.raises((ReplayBufferError, faults.InjectedFault)):
        buf.add(transitions("001", n=3), "synthetic", 1, replace=True)
    monkeypatch.delenv("DREAMGYM_FAULT")
    assert rows() == snapshot and not os.path.exists(journal_path(uri, "replay_buffer"))
    # a writer killed after its delete: the next open rolls it back
    tbl = lancedb.connect(uri).open_table("replay_buffer")
    write_journal(journal_path(uri, "replay_buffer"), {"version": tbl.version, "tag": None, "tag_version": None})
    tbl.delete("iteration = 1")
    assert {r["iteration"] for r in rows()} == {2}
    ReplayBuffer(uri, EMB)
    assert rows() == snapshot
