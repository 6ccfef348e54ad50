"""Runs that cannot collide and cannot be left STARTED (issue 27, items 1 and 2).

Two materializations of one partition at once (a double click in the UI, the CLI beside the UI)
would write the same files and Lance rows from two processes. ``partition_lock`` takes one
exclusive ``flock`` per (step, partition) under ``<data>/locks/`` for the length of a run; the
second run is refused with a one-line message naming the holder (pid, run id). The kernel drops
a ``flock`` when its holder dies, so a killed run never blocks the next one: no stale lock files
to clean, no pid guessing.

Every run also carries its worker's pid and host as tags (``dreamgym/pid``, ``dreamgym/host``).
A SIGKILLed run cannot report its own failure, so ``mark_dead_runs_failed`` (called by
``dreamgym demo`` on start and by the Definitions' executor before each run) marks the STARTED
or STARTING runs of this host whose pid is gone as FAILURE. ``dagster dev`` additionally runs
Dagster's own run monitoring (``run_monitoring`` in the dagster.yaml written by ``write_instance_yaml``).

Used twice: ``locking_executor`` (the Definitions' executor, so every run launched from the UI
or a schedule holds its locks in its run worker) and ``dreamgym demo`` around each
``dg.materialize`` (which always runs in process, with its own executor).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator

import dagster as dg

PID_TAG, HOST_TAG = "dreamgym/pid", "dreamgym/host"


class PartitionBusyError(RuntimeError):
    """Another live run holds this (step, partition)."""


def _lock_path(root: str, name: str, partition: str | None) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name) + (f"[{re.sub(r'[^A-Za-z0-9._-]', '_', partition)}]" if partition else "")
    return os.path.join(root, "locks", stem + ".lock")


@contextlib.contextmanager
def partition_lock(root: str, names: list[str], partition: str | None, run_id: str = "") -> Iterator[None]:
    """Hold an exclusive lock on each (name, partition) or raise ``PartitionBusyError`` at once."""
    os.makedirs(os.path.join(root, "locks"), exist_ok=True)
    held = []
    try:
        for name in sorted(set(names)):
            path = _lock_path(root, name, partition)
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                try:
                    holder = json.loads(f.read() or "{}")
                except json.JSONDecodeError:
                    holder = {}
                f.close()
                label = f"{name}[{partition}]" if partition else name
                raise PartitionBusyError(
                    f"{label} is being materialized by another run (pid {holder.get('pid', '?')}, run "
                    f"{holder.get('run_id') or '?'}, since {holder.get('since', '?')}); wait for it or cancel it "
                    f"(lock: {path})") from None
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
            f.flush()
            held.append(f)
        yield
    finally:
        for f in held:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead_runs_failed(instance: dg.DagsterInstance) -> list[str]:
    """Mark STARTED / STARTING runs of this host whose worker pid is gone as FAILURE; returns their ids."""
    host = socket.gethostname()
    marked = []
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED,
                                                              dg.DagsterRunStatus.STARTING]))
    for run in runs:
        pid = run.tags.get(PID_TAG)
        if pid is None or run.tags.get(HOST_TAG) != host or not pid.isdigit() or _alive(int(pid)):
            continue
        instance.report_run_failed(run, f"run worker (pid {pid}) is gone: killed or crashed; marked failed "
                                        "on the next start. Re-run the partition: finished outputs are kept.")
        marked.append(run.run_id)
    return marked


def run_tags() -> dict[str, str]:
    """The tags that let a later process tell this run's worker is dead."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


class _LockingExecutor(dg.Executor):
    def __init__(self, inner: dg.Executor, root: str):
        self.inner, self.root = inner, root

    @property
    def retries(self):
        return self.inner.retries

    @property
    def step_dependency_config(self):
        return self.inner.step_dependency_config

    def execute(self, plan_context, execution_plan):
        run = plan_context.dagster_run
        instance = plan_context.instance
        instance.add_run_tags(run.run_id, run_tags())
        mark_dead_runs_failed(instance)
        steps = [s.key for s in execution_plan.get_steps_to_execute_in_topo_order()]
        with partition_lock(self.root, steps, run.tags.get("dagster/partition"), run.run_id):
            yield from self.inner.execute(plan_context, execution_plan)


def locking_executor(root: str) -> dg.ExecutorDefinition:
    """Dagster's default executor (multiprocess, or in process when so configured) holding
    ``partition_lock`` on every step of the run for the run's length."""
    base = dg.multi_or_in_process_executor

    @dg.executor(name="dreamgym_locking", config_schema=base.config_schema.as_field(),  # keeps the default
                 requirements=lambda cfg: base.get_requirements(cfg))
    def _executor(init_context):
        return _LockingExecutor(base.executor_creation_fn(init_context), root)

    return _executor


def write_instance_yaml(home: str) -> str:
    """A dagster.yaml for ``home`` (kept if present): no telemetry (offline machines) and run monitoring,
    so that ``dagster dev``'s daemon marks runs whose worker died as failed."""
    cfg = os.path.join(home, "dagster.yaml")
    if not os.path.exists(cfg):
        os.makedirs(home, exist_ok=True)
        with open(cfg, "w") as f:
            f.write("telemetry:\n  enabled: false\nrun_monitoring:\n  enabled: true\n  start_timeout_seconds: 180\n"
                    "  max_resume_run_attempts: 0\n  poll_interval_seconds: 30\n")
    return cfg
