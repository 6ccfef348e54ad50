"""Typed records shared by every stage, with one Arrow schema beside each.

The same column names are used in Python, Polars, DuckDB, LanceDB and torch batches.

Glossary
--------
task_id      stable id of a task: ``"<env>/<game>/<split>/<seed>"`` for env tasks,
             ``"syn/<iteration>/<hash>"`` for tasks written by M_task.
traj_id      id of one episode: ``"<task_id>#<policy>#<episode>"``.
step_idx     0-based index of a transition inside its trajectory.
state        the abstract text state s_t (see ``dreamgym_core.state``): compact, canonical,
             deterministic; the mapping shared by real and synthetic steps (paper §4.5).
action       the action text a_t.
next_state   the abstract text state s_{t+1} after the action.
reward       outcome reward r_t: 1.0 on the step that completes the task, else 0.0 (paper §4.1).
score        the environment's own dense score after the step (kept, never used as reward
             unless a config asks for it).
done         the episode ended at this step (won, lost, step limit or crash).
won / lost   the environment's success / failure flags after the step.
valid        the environment accepted the action (False: "that did nothing").
action_kind  how the offline collector chose the action: expert | noisy | random | invalid,
             or ``policy`` for rollouts of a learned policy.
obs / next_obs  the environment's raw observation parts (feedback, look, inventory,
             candidates, score) before and after the step, so a new abstraction can be derived
             later without re-collecting.
source       where a record came from: offline | synthetic | real | imported.
policy       the name/version of the policy that acted (``expert``, ``random``, ``iter-003``...).
iteration    training iteration (0 = bootstrap / offline).
*_mask (B,T) token masks; *_logprobs (B,T) token log-probabilities (RL modules).

Metric keys are namespaced: rollout/, exp_model/, replay/, curriculum/, loss/, timing/, eval/.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable

import pyarrow as pa

SPLITS = ("train", "dev", "test")
ACTION_KINDS = ("expert", "noisy", "random", "invalid", "policy")
SOURCES = ("offline", "synthetic", "real", "imported")


@dataclass(frozen=True)
class RawObs:
    """The environment's raw observation parts at one moment."""

    feedback: str = ""
    look: str = ""
    inventory: str = ""
    candidates: tuple[str, ...] = ()
    score: float = 0.0


@dataclass(frozen=True)
class Task:
    """A task the policy must solve: an env task (game + seed) or a synthetic variant."""

    task_id: str
    env: str
    game: str
    split: str
    seed: int
    instruction: str
    params: str = ""
    """Game parameters as the env takes them (TWX: ``"numLocations=2,..."``; JSON for others)."""
    source: str = "offline"
    parent_task_id: str | None = None
    """For a synthetic variant: the seed task it was written from (curriculum lineage)."""
    iteration: int = 0
    initial_state: str | None = None
    """Abstract start state, required for synthetic tasks (no real env can reset to them)."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"Task {self.task_id!r}: split must be one of {SPLITS}, got {self.split!r}")
        if self.source not in SOURCES:
            raise ValueError(f"Task {self.task_id!r}: source must be one of {SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class Transition:
    """One step (s_t, a_t, s_{t+1}, r_t) with everything needed to re-derive it."""

    traj_id: str
    task_id: str
    env: str
    step_idx: int
    state: str
    action: str
    next_state: str
    reward: float
    score: float
    done: bool
    won: bool
    lost: bool
    valid: bool
    action_kind: str
    candidates: tuple[str, ...] = ()
    """Candidate actions offered at s_t (from the env, or from the state rule for synthetic states)."""
    obs: RawObs = field(default_factory=RawObs)
    next_obs: RawObs = field(default_factory=RawObs)
    source: str = "offline"
    policy: str = ""
    iteration: int = 0
    logprob: float | None = None
    """Log-probability of the action under the acting policy (None for offline/imported data)."""
    prompt: str | None = None
    """The exact text the acting policy scored (its checkpoint's ``PolicyFormat``); the update trains
    on it as recorded. None for data without a prompted policy (offline, random, imported)."""

    def __post_init__(self) -> None:
        if self.action_kind not in ACTION_KINDS:
            raise ValueError(f"Transition {self.traj_id!r}[{self.step_idx}]: action_kind must be one of "
                             f"{ACTION_KINDS}, got {self.action_kind!r}")
        if not math.isfinite(self.reward) or not math.isfinite(self.score):
            raise ValueError(f"Transition {self.traj_id!r}[{self.step_idx}]: reward and score must be finite")


@dataclass(frozen=True)
class Trajectory:
    """One episode of one task: its transitions in order plus how it ended."""

    traj_id: str
    task: Task
    policy: str
    steps: tuple[Transition, ...]
    crashed: bool = False
    """The env raised or timed out; the episode was ended as failed and counted."""
    truncated: bool = False
    """The episode hit the step limit without the env ending it."""

    @property
    def won(self) -> bool:
        return bool(self.steps) and self.steps[-1].won

    @property
    def ret(self) -> float:
        return float(sum(t.reward for t in self.steps))

    def __len__(self) -> int:
        return len(self.steps)


# --------------------------------------------------------------------------------------------
# Arrow schemas. Trajectories are stored one row per transition (TRANSITION_SCHEMA) with the
# trajectory-level fields repeated, which is what DuckDB users want to query; the `trajectories`
# view aggregates them back.

RAW_OBS_TYPE = pa.struct([
    ("feedback", pa.string()), ("look", pa.string()), ("inventory", pa.string()),
    ("candidates", pa.list_(pa.string())), ("score", pa.float64()),
])

TASK_SCHEMA = pa.schema([
    ("task_id", pa.string()), ("env", pa.string()), ("game", pa.string()), ("split", pa.string()),
    ("seed", pa.int64()), ("instruction", pa.string()), ("params", pa.string()),
    ("source", pa.string()), ("parent_task_id", pa.string()), ("iteration", pa.int64()),
    ("initial_state", pa.string()),
])

TRANSITION_SCHEMA = pa.schema([
    ("traj_id", pa.string()), ("task_id", pa.string()), ("env", pa.string()),
    ("step_idx", pa.int64()), ("state", pa.string()), ("action", pa.string()),
    ("next_state", pa.string()), ("reward", pa.float64()), ("score", pa.float64()),
    ("done", pa.bool_()), ("won", pa.bool_()), ("lost", pa.bool_()), ("valid", pa.bool_()),
    ("action_kind", pa.string()), ("candidates", pa.list_(pa.string())),
    ("obs", RAW_OBS_TYPE), ("next_obs", RAW_OBS_TYPE),
    ("source", pa.string()), ("policy", pa.string()), ("iteration", pa.int64()),
    ("logprob", pa.float64()), ("prompt", pa.string()),
])

# Trajectory-level columns stored on every transition row of TRAJECTORY_ROWS_SCHEMA.
_TRAJ_COLUMNS = [
    ("game", pa.string()), ("split", pa.string()), ("seed", pa.int64()),
    ("instruction", pa.string()), ("params", pa.string()),
    ("task_source", pa.string()), ("parent_task_id", pa.string()), ("task_iteration", pa.int64()),
    ("initial_state", pa.string()),
    ("num_steps", pa.int64()), ("success", pa.bool_()), ("crashed", pa.bool_()), ("truncated", pa.bool_()),
]
TRAJECTORY_ROWS_SCHEMA = pa.schema(list(TRANSITION_SCHEMA) + [pa.field(n, t) for n, t in _TRAJ_COLUMNS])

TASK_SCORES_SCHEMA = pa.schema([
    ("iteration", pa.int64()), ("task_id", pa.string()), ("variance", pa.float64()), ("rollouts", pa.int64()),
    ("mean_return", pa.float64()), ("selected", pa.bool_()),
])
"""``task_scores`` rows: reward variance V_tau per task of an iteration (Eq. 7) and whether it seeds M_task."""

EVAL_SCHEMA = pa.schema([
    ("policy", pa.string()), ("iteration", pa.int64()), ("mode", pa.string()), ("episodes", pa.int64()),
    ("success_rate", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
    ("mean_return", pa.float64()), ("mean_steps", pa.float64()), ("invalid_action_rate", pa.float64()),
    ("real_transitions", pa.int64()), ("sim_success_rate", pa.float64()), ("sim_real_gap", pa.float64()),
])
"""``policy_eval`` rows (issue 5): policy in {random, sft, dreamgym, s2r, real_rl}; mode greedy|sampled."""

FIDELITY_METRICS = ("state_exact_match", "content_exact_match", "state_token_f1", "reward_accuracy", "valid_rate",
                    "win_recall", "win_precision", "invalid_action_accuracy", "valid_action_accuracy")
FIDELITY_SCHEMA = pa.schema(
    [("model", pa.string()), ("ablation", pa.string()), ("scope", pa.string()), ("transitions", pa.int64())]
    + [(m, pa.float64()) for m in FIDELITY_METRICS] + [("baseline_" + m, pa.float64()) for m in FIDELITY_METRICS]
    + [("step", pa.int64()), ("sim_alive", pa.float64()), ("agree_so_far", pa.float64()),
       ("policy", pa.string()), ("episodes", pa.int64()), ("sim_success_rate", pa.float64()),
       ("real_success_rate", pa.float64()), ("sim_real_gap", pa.float64()), ("sim_only_wins", pa.int64()),
       ("real_only_wins", pa.int64()), ("both_won", pa.int64()), ("same_actions", pa.float64()),
       ("predictions_per_s", pa.float64())])
"""``experience_model_eval`` rows, one per ``scope``:
``overall`` and ``action:<verb>`` (teacher-forced single steps), ``drift:<t>`` (step t of an
open-loop replay; ``transitions`` = trajectories still that long), ``policy:<name>`` (success of a
fixed policy in M_exp vs the real env on the same held-out tasks: ``sim_real_gap`` = sim - real;
the same episodes paired by id: ``sim_only_wins`` / ``real_only_wins`` / ``both_won`` and
``same_actions``, the share of pairs that took the same actions throughout)."""

PROPOSAL_SCHEMA = pa.schema([
    ("iteration", pa.int64()), ("index", pa.int64()), ("parent_task_id", pa.string()), ("task_id", pa.string()),
    ("parsed", pa.bool_()), ("kept", pa.bool_()), ("reason", pa.string()), ("parse_error", pa.string()),
    ("state", pa.string()), ("text", pa.string()),
])
"""``task_proposals``: one row per M_task proposal of an iteration. ``reason``: the drop reason
(``curriculum.DROP_REASONS``), "" when kept; ``parse_error``: the parser's reason when ``reason`` is "parse";
``task_id``: the synthetic task id once the proposal passed format and vocabulary; ``state``: the
proposed start state (null when it did not parse); ``text``: M_task's raw output."""

SCHEMAS: dict[str, pa.Schema] = {
    "seed_tasks": TASK_SCHEMA, "eval_tasks": TASK_SCHEMA, "synthesized_tasks": TASK_SCHEMA, "task_pool": TASK_SCHEMA,
    "offline_trajectories": TRAJECTORY_ROWS_SCHEMA, "rollouts": TRAJECTORY_ROWS_SCHEMA,
    "task_scores": TASK_SCORES_SCHEMA, "iteration_eval": EVAL_SCHEMA, "policy_eval": EVAL_SCHEMA,
    "experience_model_eval": FIDELITY_SCHEMA, "task_proposals": PROPOSAL_SCHEMA,
}
"""The declared schema of every Parquet asset, by asset name (the schema checks read it; extra columns,
such as ``cot_annotations``' reasoning, ride on top of ``offline_trajectories``')."""


def _raw_to_dict(o: RawObs) -> dict:
    d = asdict(o)
    d["candidates"] = list(o.candidates)
    return d


def _raw_from_dict(d: dict | None) -> RawObs:
    if d is None:
        return RawObs()
    return RawObs(feedback=d["feedback"] or "", look=d["look"] or "", inventory=d["inventory"] or "",
                  candidates=tuple(d["candidates"] or ()), score=float(d["score"] or 0.0))


def transition_to_row(t: Transition) -> dict:
    row = {f.name: getattr(t, f.name) for f in fields(Transition)}
    row["candidates"] = list(t.candidates)
    row["obs"] = _raw_to_dict(t.obs)
    row["next_obs"] = _raw_to_dict(t.next_obs)
    return row


def transition_from_row(row: dict) -> Transition:
    kw = {f.name: row[f.name] for f in fields(Transition)}
    kw["candidates"] = tuple(row["candidates"] or ())
    kw["obs"] = _raw_from_dict(row["obs"])
    kw["next_obs"] = _raw_from_dict(row["next_obs"])
    return Transition(**kw)


def tasks_to_arrow(tasks: Iterable[Task]) -> pa.Table:
    return pa.Table.from_pylist([asdict(t) for t in tasks], schema=TASK_SCHEMA)


def tasks_from_arrow(table: pa.Table) -> list[Task]:
    return [Task(**{k: row[k] for k in TASK_SCHEMA.names}) for row in table.select(TASK_SCHEMA.names).to_pylist()]


def transitions_to_arrow(transitions: Iterable[Transition]) -> pa.Table:
    return pa.Table.from_pylist([transition_to_row(t) for t in transitions], schema=TRANSITION_SCHEMA)


def _with_prompt(table: pa.Table) -> pa.Table:
    """Tables written before transitions recorded their prompt read as prompt = None."""
    if "prompt" in table.column_names:
        return table
    return table.append_column(TRANSITION_SCHEMA.field("prompt"), pa.nulls(table.num_rows, pa.string()))


def transitions_from_arrow(table: pa.Table) -> list[Transition]:
    return [transition_from_row(r) for r in _with_prompt(table).select(TRANSITION_SCHEMA.names).to_pylist()]


def trajectories_to_arrow(trajs: Iterable[Trajectory]) -> pa.Table:
    """One row per transition, trajectory fields repeated (TRAJECTORY_ROWS_SCHEMA).

    A trajectory with no steps (the env crashed on reset) has no rows: it is counted by the
    collector, not stored.
    """
    rows = []
    for tr in trajs:
        task = tr.task
        extra = {"game": task.game, "split": task.split, "seed": task.seed,
                 "instruction": task.instruction, "params": task.params,
                 "task_source": task.source, "parent_task_id": task.parent_task_id,
                 "task_iteration": task.iteration, "initial_state": task.initial_state,
                 "num_steps": len(tr.steps), "success": tr.won,
                 "crashed": tr.crashed, "truncated": tr.truncated}
        for t in tr.steps:
            if (t.traj_id, t.task_id, t.policy) != (tr.traj_id, task.task_id, tr.policy):
                raise ValueError(f"trajectory {tr.traj_id!r}: step {t.step_idx} belongs to "
                                 f"{t.traj_id!r}/{t.task_id!r}/policy {t.policy!r}")
            rows.append(transition_to_row(t) | extra)
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_ROWS_SCHEMA)


def trajectories_from_arrow(table: pa.Table) -> list[Trajectory]:
    """Inverse of ``trajectories_to_arrow``; steps are ordered by step_idx, episodes by first row."""
    by_traj: dict[str, list[dict]] = {}
    for row in _with_prompt(table).select(TRAJECTORY_ROWS_SCHEMA.names).to_pylist():
        by_traj.setdefault(row["traj_id"], []).append(row)
    out = []
    for traj_id, rows in by_traj.items():
        rows.sort(key=lambda r: r["step_idx"])
        r0 = rows[0]
        task = Task(task_id=r0["task_id"], env=r0["env"], game=r0["game"], split=r0["split"],
                    seed=r0["seed"], instruction=r0["instruction"], params=r0["params"],
                    source=r0["task_source"], parent_task_id=r0["parent_task_id"],
                    iteration=r0["task_iteration"], initial_state=r0["initial_state"])
        out.append(Trajectory(traj_id=traj_id, task=task, policy=r0["policy"],
                              steps=tuple(transition_from_row(r) for r in rows),
                              crashed=r0["crashed"], truncated=r0["truncated"]))
    return out


@dataclass(frozen=True)
class CheckpointRef:
    """A model checkpoint on disk (save_pretrained/safetensors), passed between stages by reference.

    Assets exchange this small record, never the weights: training writes the directory, the
    reference says where it is, what it came from and how it scored.
    """

    path: str
    kind: str
    """experience_model | policy | tokenizer."""
    parent: str | None = None
    """The checkpoint this one was trained from (None for a fresh model)."""
    iteration: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
