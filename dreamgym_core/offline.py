"""The offline-only path: logged trajectories are all the experience there is (DreamGym §5, WebArena).

The paper's headline case has no RL-ready environment: no cheap, resettable env to collect from,
roll out in or evaluate against, only interaction logs. Then the logs give everything a live env
would: the training tasks (task id, instruction, first state), the offline trajectories M_exp is
trained on (Eq. 5), and held-out trajectories M_exp's fidelity is scored against; the DreamGym loop
runs in M_exp alone, starting each task from its logged first state (as for M_task's synthetic
tasks). This module splits logs into those roles and gives the candidate actions of a synthetic
state when no adapter supplies a rule.

Departures and choices, and why:
- Held-out tasks: the logs' own ``dev`` / ``test`` splits when they have a test split; otherwise a
  share of the logged train tasks chosen by a hash of the task id (stable under row order and file
  edits elsewhere, so a task never moves between train and held-out when more logs are appended);
  when the hash holds out none of a few tasks, the one with the lowest hash.
  Held out by task, not by trajectory: a task M_exp trained on says nothing about generalisation.
- Candidate actions in states M_exp invents: ``logged_candidates``, which reads the logs: the
  candidates (or actions) logged at that exact state, else the logged actions whose argument words
  all appear in the state's text. The offline path offers M_exp no side channel
  (``envs.NO_SIDE_CHANNELS``), so no adapter's state-only rule, whatever env the logs name.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from dreamgym_core.schema import Task, Trajectory


def read_logs(path: str, *, env: str = "external") -> list[Trajectory]:
    """Logged trajectories from ``path``: a file in the importer's input format (JSONL or Parquet,
    validated strictly: ``importer.TrajectoryImportError``) or a table ``dreamgym import`` wrote."""
    from dreamgym_core.importer import TrajectoryImportError, read_trajectories

    if path.lower().endswith(".parquet") and os.path.isfile(path):
        import pyarrow.parquet as pq

        from dreamgym_core.io import read_parquet
        from dreamgym_core.schema import TRAJECTORY_ROWS_SCHEMA, trajectories_from_arrow

        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise TrajectoryImportError(path, f"not a readable Parquet file ({exc})") from None
        if "task_source" in names:  # already imported: TRAJECTORY_ROWS_SCHEMA, validated when it was written
            missing = [n for n in TRAJECTORY_ROWS_SCHEMA.names if n not in names and n != "prompt"]
            if missing:
                raise TrajectoryImportError(path, f"an imported trajectory table without columns {missing}")
            return trajectories_from_arrow(read_parquet(path))
    return read_trajectories(path, env=env)


def is_heldout(task_id: str, share: float, seed: int = 0) -> bool:
    """Whether a logged train task is held out: a hash of (seed, task_id) below ``share``."""
    h = hashlib.sha1(f"{seed}|{task_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < share


@dataclass(frozen=True)
class LogSplit:
    """Logged trajectories by role: train (M_exp, BC, the loop's seed tasks) and held out (dev, test)."""

    train: tuple[Trajectory, ...]
    dev: tuple[Trajectory, ...]
    test: tuple[Trajectory, ...]


def split_logs(trajs: Sequence[Trajectory], heldout_share: float = 0.2, seed: int = 0) -> LogSplit:
    """Train / dev / test trajectories of ``trajs`` (module docstring: how held-out tasks are chosen).

    Raises ValueError when either side would be empty: M_exp needs train logs, its fidelity held-out ones.
    """
    if not 0.0 <= heldout_share < 1.0:
        raise ValueError(f"split_logs: heldout_share must be in [0, 1), got {heldout_share}")
    has_test = any(t.task.split == "test" for t in trajs)
    held = set()
    if not has_test and heldout_share > 0:
        ids = {t.task.task_id for t in trajs if t.task.split == "train"}
        held = {i for i in ids if is_heldout(i, heldout_share, seed)}
        if not held and len(ids) > 1:  # a few tasks can all hash above the share: hold out the lowest one
            held = {min(ids, key=lambda i: hashlib.sha1(f"{seed}|{i}".encode()).digest())}
    train, dev, test = [], [], []
    for t in trajs:
        if t.task.split == "dev":
            dev.append(t)
        elif t.task.split == "test" or t.task.task_id in held:
            test.append(t)
        else:
            train.append(t)
    tasks = len({t.task.task_id for t in trajs})
    if not train:
        raise ValueError(f"the logs' {tasks} tasks leave no train task (lower heldout_share, now {heldout_share})")
    if not test:
        raise ValueError(f"the logs' {tasks} tasks leave no held-out task: give some rows split 'test', or raise "
                         f"heldout_share (now {heldout_share})")
    return LogSplit(tuple(train), tuple(dev), tuple(test))


def tasks_of(trajs: Sequence[Trajectory]) -> list[Task]:
    """The distinct tasks of ``trajs`` in task-id order, each with its logged first state."""
    first: dict[str, Task] = {}
    for t in trajs:
        task = first.setdefault(t.task.task_id, t.task)
        if not task.initial_state and t.steps:  # a task read from an older table: its first logged state
            from dataclasses import replace

            first[task.task_id] = replace(task, initial_state=t.steps[0].state)
    return [first[k] for k in sorted(first)]


_WORD = re.compile(r"[\w\[\]#@.-]+")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def logged_candidates(trajs: Sequence[Trajectory], max_candidates: int = 64) -> Callable[[str], list[str]]:
    """state -> candidate actions, read off the logs (for envs without a state rule).

    A state seen in the logs gets the candidates logged there (or, where none were logged, the actions
    taken there); an unseen one gets the logged actions whose words after the verb all appear in the
    state, most frequent first, at most ``max_candidates`` (a verb alone counts as grounded).
    """
    at_state: dict[str, set[str]] = {}
    counts: Counter[str] = Counter()
    for t in trajs:
        for s in t.steps:
            at_state.setdefault(s.state, set()).update(s.candidates or (s.action,))
            counts.update({s.action, *s.candidates})  # how often each action was taken or offered
    ranked = [(a, _words(" ".join(a.split()[1:]))) for a, _ in counts.most_common()]

    def propose(state: str) -> list[str]:
        if state in at_state:
            return sorted(at_state[state])
        present = _words(state)
        return sorted([a for a, args in ranked if args <= present][:max_candidates])

    return propose
