"""Issue 27 items 1-2: two runs of one partition cannot overlap; a killed run is marked failed."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from pipelines.runguard import (PID_TAG, PartitionBusyError, locking_executor, mark_dead_runs_failed,
                                partition_lock, run_tags)

REPO = str(Path(__file__).parents[1])
PARTS = dg.StaticPartitionsDefinition(["001", "002"])


def _holder(root, name, part, ready):
    """A subprocess that holds the lock and sleeps (another run of the same partition)."""
    code = textwrap.dedent(f"""
        import time, pathlib
        from pipelines.runguard import partition_lock
        with partition_lock({root!r}, [{name!r}], {part!r}, "run-A"):
            pathlib.Path({ready!r}).touch()
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO})
    for _ in range(600):
        if os.path.exists(ready):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("lock holder did not start")


def test_second_holder_is_refused_and_a_killed_holder_releases(tmp_path):
    root = str(tmp_path)
    proc = _holder(root, "dreamgym_iteration", "002", str(tmp_path / "ready"))
    try:
        with pytest.raises(PartitionBusyError, match=rf"dreamgym_iteration\[002\] is being materialized by another "
                                                     rf"run \(pid {proc.pid}, run run-A"):
            with partition_lock(root, ["dreamgym_iteration"], "002"):
                pass
        with partition_lock(root, ["dreamgym_iteration"], "001"):   # another partition is free
            pass
        with partition_lock(root, ["policy_eval"], None):           # and another asset
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with partition_lock(root, ["dreamgym_iteration"], "002", "run-B"):  # the kernel dropped the dead run's lock
        pass


@dg.asset(partitions_def=PARTS)
def slow_step(context: dg.AssetExecutionContext) -> None:
    context.log.info("ran")


@dg.op
def slow_op() -> None:
    pass


def _job():
    @dg.job(executor_def=locking_executor(os.environ["RUNGUARD_ROOT"]))
    def guarded():
        slow_op()
    return guarded


def test_definitions_executor_refuses_a_second_run_of_a_partition(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNGUARD_ROOT", str(tmp_path))
    proc = _holder(str(tmp_path), "slow_op", "001", str(tmp_path / "ready"))
    try:
        with dg.instance_for_test() as instance:
            cfg = {"execution": {"config": {"in_process": {}}}}
            busy = dg.execute_job(dg.reconstructable(_job), instance=instance, run_config=cfg,
                                  tags={"dagster/partition": "001"}, raise_on_error=False)
            assert not busy.success
            err = instance.get_run_by_id(busy.run_id)
            events = [e for e in instance.all_logs(busy.run_id) if e.dagster_event and e.dagster_event.is_run_failure]
            assert events and "is being materialized by another run" in str(events[0].dagster_event.event_specific_data)
            assert err.tags[PID_TAG] == str(os.getpid())
            ok = dg.execute_job(dg.reconstructable(_job), instance=instance, run_config=cfg,
                                tags={"dagster/partition": "002"})
            assert ok.success
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


_KILLED_RUN = """
import time, dagster as dg
from pipelines.runguard import run_tags

@dg.asset
def sleeper() -> None:
    time.sleep(120)

with dg.DagsterInstance.get() as instance:
    dg.materialize([sleeper], instance=instance, tags=run_tags())
"""


def test_a_killed_run_is_marked_failed_not_left_started(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        started = []
        for _ in range(1200):
            started = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
            if started:
                break
            time.sleep(0.1)
        assert started, "the run never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert instance.get_run_by_id(started[0].run_id).status == dg.DagsterRunStatus.STARTED  # what the UI showed
        assert mark_dead_runs_failed(instance) == [started[0].run_id]
        assert instance.get_run_by_id(started[0].run_id).status == dg.DagsterRunStatus.FAILURE
        assert mark_dead_runs_failed(instance) == []


def test_live_runs_are_not_marked(tmp_path):
    with dg.instance_for_test() as instance:
        res = dg.materialize([slow_step], instance=instance, partition_key="001", tags=run_tags())
        run = instance.get_run_by_id(res.run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS and mark_dead_runs_failed(instance) == []
