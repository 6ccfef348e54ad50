"""Iteration partitions: a bounded time-window "iteration clock" whose keys are 001, 002, ...

Dagster 1.13 accepts "an asset depends on earlier partitions of itself" only for time-window
partitions (shared/notes/dagster-idioms.md §1): static or dynamic self-dependencies are rejected when
the definitions load, and a k-1 edge between two different assets is a cycle. So iterations are days
of the year 1900 rendered with ``%j``: key "001" is iteration 1, "002" iteration 2, and the k-1 edge is
``TimeWindowPartitionMapping(-1, -1)``. Asset backfills of 001..00N then run strictly in order.
Iteration 0 (tasks, offline data, M_exp, the SFT policy) is unpartitioned.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import dagster as dg

MAX_ITERATIONS = 20
"""Keys 001..020; raise it (<= 365) for longer runs: the keys are day-of-year."""
_EPOCH = datetime(1900, 1, 1)  # strptime("%j") defaults the year to 1900, so keys round-trip

iteration_partitions = dg.TimeWindowPartitionsDefinition(
    start=_EPOCH, end=_EPOCH + timedelta(days=MAX_ITERATIONS), cron_schedule="0 0 * * *", fmt="%j")
PREVIOUS_ITERATION = dg.TimeWindowPartitionMapping(start_offset=-1, end_offset=-1)


def iteration_index(partition_key: str) -> int:
    """'001' -> 1."""
    if not (len(partition_key) == 3 and partition_key.isdigit() and 1 <= int(partition_key) <= MAX_ITERATIONS):
        raise ValueError(f"iteration partition key must be 001..{MAX_ITERATIONS:03d}, got {partition_key!r}")
    return int(partition_key)


def iteration_key(k: int) -> str:
    """1 -> '001'."""
    if not 1 <= k <= MAX_ITERATIONS:
        raise ValueError(f"iteration must be in 1..{MAX_ITERATIONS}, got {k}")
    return f"{k:03d}"
