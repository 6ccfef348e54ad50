"""Fault injection for the kill-anywhere tests (issue 27): named points where a run can be made
to die or fail on purpose.

``DREAMGYM_FAULT=<point>[:kill|:raise][@<n>]`` makes the n-th (default first) pass through
``fault("<point>")`` in this process SIGKILL itself (``kill``, the default) or raise
``InjectedFault`` (``raise``). Unset, ``fault`` is one dictionary lookup. Points in the code:

    parquet:before_move        dreamgym_core.io, the temp file written, not yet moved into place
    lance:before_delete        pipelines.lance_io, journal written, old rows not yet deleted
    lance:between_delete_and_add   the partition's old rows deleted, the new ones not yet added
    lance:before_tag           new rows added, version not yet tagged
    checkpoint:before_manifest pipelines.io_managers, weights saved, manifest not yet written
    checkpoint:mid_save        dreamgym_core.models.save_checkpoint, weights written to the temp folder
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def reset() -> None:
    """Forget the passes counted so far (tests arm the same point twice)."""
    _seen.clear()


class InjectedFault(RuntimeError):
    """Raised at a fault point armed with ``:raise``."""


def fault(point: str) -> None:
    spec = os.environ.get("DREAMGYM_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    name, _, mode = target.rpartition(":")
    if mode not in ("kill", "raise"):
        name, mode = target, "kill"
    if name != point:
        return
    _seen[spec] = _seen.get(spec, 0) + 1      # counted per setting: a test that re-arms it starts over
    if _seen[spec] != int(nth or 1):
        return
    if mode == "raise":
        raise InjectedFault(f"injected fault at {point}")
    os.kill(os.getpid(), signal.SIGKILL)
