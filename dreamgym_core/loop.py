"""One DreamGym iteration (paper Algorithm 1) as resumable stages, and RL with a counted real budget.

Iteration k, in order (paper §4):
  1. rollouts    the policy of iteration k-1 acts in M_exp on a batch drawn from the task pool of k-1
                 (synthetic tasks at share lambda, ``curriculum.draw_batch``; GRPO: a group of n
                 rollouts per task), every transition tagged with that policy's version and the
                 prompt it saw (``rl.step.act``: the training step's first phase);
  2. policy      the step's advantages and update on those rollouts (``PolicyTrainer.update``), KL to
                 the SFT policy;
  3. task_scores reward variance V_tau per task (Eq. 7; GRPO groups, or embedding clusters for PPO);
  4. synthesized_tasks  M_task writes variants of high-variance seeds (grammar-constrained), the
                 feasibility filter keeps some (Eq. 6); every proposal and its fate: task_proposals;
  5. task_pool   original tasks plus at most a fraction lambda of synthetic ones, for iteration k+1;
  6. replay_buffer  the informative synthetic transitions join the buffer that grounds M_exp, which
                 is pruned under a cap (``replay.grow_buffer``); iteration k itself retrieved from
                 the buffer as tagged at its start;
  7. evaluation  the new policy on held-out tasks in the real env AND in M_exp (``sim_real_gap``,
                 ``evaluation.evaluate``).

Every stage writes its result atomically into ``<work>/<k>/`` before the next starts, and a stage
whose result exists is skipped: a killed iteration resumes where it stopped and never re-does or
half-writes a stage. The caller keys the work directory by the config and the inputs' content
(``pipelines.reuse``), so two configurations never share stage results.

Departure from the paper: the paper alternates many policy updates per curriculum round; here one
iteration is one rollout batch + one update (``RLConfig.ppo_epochs`` passes over it), which keeps an
iteration a small, inspectable partition.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyarrow as pa

from dreamgym_core.evaluation import evaluate, lm_policy_factory
from dreamgym_core.io import exists, file_sha256, read_parquet, write_parquet_atomic
from dreamgym_core.schema import (TASK_SCORES_SCHEMA, Task, Trajectory, tasks_from_arrow, tasks_to_arrow,
                                  trajectories_from_arrow, trajectories_to_arrow)

Log = Callable[[str], None]


class StageStore:
    """Finished stage results of one iteration: records ``<root>/<name>.json``, directories ``<root>/<name>``,
    tables ``<root>/<name>.parquet`` or, where the caller names their final home in ``tables`` (the
    pipeline's Parquet partition of that asset), there: each table is stored once. A table stored
    outside ``root`` counts as this store's only while ``<root>/<name>.sha256`` matches the file, so a
    partition that another configuration has since rewritten is recomputed, not taken for this one's."""

    def __init__(self, root: str, tables: dict[str, str] | None = None):
        self.root = root
        self.tables = dict(tables or {})
        os.makedirs(root, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def table_path(self, name: str) -> str:
        return self.tables.get(name) or self.path(name + ".parquet")

    def _table_done(self, name: str) -> bool:
        p = self.table_path(name)
        if not exists(p):
            return False
        if name not in self.tables:
            return True
        marker = self.path(name + ".sha256")
        if not os.path.exists(marker):
            return False
        with open(marker) as f:
            return f.read().strip() == file_sha256(p)

    def table(self, name: str) -> pa.Table | None:
        return read_parquet(self.table_path(name)) if self._table_done(name) else None

    def put_table(self, name: str, table: pa.Table) -> pa.Table:
        write_parquet_atomic(table, self.table_path(name))
        if name in self.tables:  # the marker last: a kill between the two leaves the stage unfinished
            marker = self.path(name + ".sha256")
            with open(marker + ".tmp", "w") as f:
                f.write(file_sha256(self.table_path(name)))
            os.replace(marker + ".tmp", marker)
        return table

    def record(self, name: str) -> dict | None:
        p = self.path(name + ".json")
        if not os.path.exists(p):
            return None
        with open(p) as f:
            return json.load(f)

    def put_record(self, name: str, record: dict) -> dict:
        p = self.path(name + ".json")
        with open(p + ".tmp", "w") as f:
            json.dump(record, f, indent=2, sort_keys=True, default=float)
        os.replace(p + ".tmp", p)
        return record

    def done(self, name: str) -> bool:
        """A stage is finished once its table or record exists (a directory result writes its record last)."""
        return self._table_done(name) or os.path.exists(self.path(name + ".json"))


def run_stage(store: StageStore, name: str, log: Log, fn: Callable[[], object], load: Callable[[], object]):
    """Run ``fn`` unless ``name`` already finished (then ``load`` its result); logs which happened."""
    if store.done(name):
        log(f"stage {name}: already finished in {store.root}, skipped")
        return load(), 0.0
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    log(f"stage {name}: done in {dt:.1f}s")
    return out, dt


def clear_partial(store: StageStore) -> None:
    """Remove temp leftovers of a killed stage (``*.tmp`` files and directories)."""
    for entry in os.listdir(store.root):
        if entry.endswith(".tmp"):
            p = store.path(entry)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)


def policy_version(k: int) -> str:
    """The name rollouts record: the policy *after* iteration k (0 = the SFT init)."""
    return f"dreamgym@{k:03d}" if k else "sft"


def trajectories_table(trajs: Sequence[Trajectory]) -> pa.Table:
    return trajectories_to_arrow(trajs)


def read_trajectories(table: pa.Table) -> list[Trajectory]:
    return trajectories_from_arrow(table)


def read_tasks(table: pa.Table) -> list[Task]:
    return tasks_from_arrow(table)


def write_tasks(tasks: Sequence[Task]) -> pa.Table:
    return tasks_to_arrow(tasks)


@dataclass
class Timer:
    """``timing/<phase>_s`` metrics for a training step that reads like the paper."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, dt: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + dt

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}_s": round(v, 3) for k, v in self.seconds.items()}


# --------------------------------------------------------------------------------------------
# The iteration

@dataclass(frozen=True)
class LoopConfig:
    """What one iteration does (all of it is part of the work-directory hash)."""

    tasks_per_iteration: int = 16
    """Tasks drawn from the pool for this iteration's synthetic rollouts."""
    group_size: int = 4
    """Rollouts per task: the GRPO group (PPO uses 1 and clusters tasks for the curriculum)."""
    max_steps: int = 10
    """Synthetic episode cap."""
    rollout_batch: int = 64
    """Episodes run side by side: M_exp decodes their steps as one batch (``SimConfig.batch_size``)."""
    eval_max_steps: int = 20
    eval_tasks: int = 50
    """Held-out real test tasks scored each iteration (greedy)."""
    sim_eval_tasks: int = 25
    """Of those, how many also run in M_exp for the sim-real gap."""
    replay_max_synthetic_rows: int = 20000
    """Size cap on the replay buffer's synthetic rows (``replay.grow_buffer``); offline rows are never pruned."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tasks_per_iteration", "group_size", "max_steps", "rollout_batch", "eval_max_steps",
                     "replay_max_synthetic_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_tasks < 0 or self.sim_eval_tasks < 0:
            raise ValueError("LoopConfig: eval_tasks and sim_eval_tasks must be >= 0")


def sample_tasks(pool: Sequence[Task], n: int, k: int, seed: int) -> list[Task]:
    """A deterministic draw of ``n`` pool tasks for iteration ``k`` (all of them when the pool is small)."""
    import random

    pool = sorted(pool, key=lambda t: t.task_id)
    if len(pool) <= n:
        return list(pool)
    return sorted(random.Random(f"{seed}|{k}").sample(pool, n), key=lambda t: t.task_id)


@dataclass
class IterationInputs:
    """Everything iteration k reads: k-1's policy and task pool, iteration-0 assets, env factories."""

    k: int
    prev_policy_dir: str
    """The trainer state after k-1 (for k = 1: the SFT policy directory)."""
    ref_policy_dir: str
    """The frozen reference for the KL term (the SFT policy)."""
    pool: list[Task]
    original: list[Task]
    start_states: dict[str, str]
    """Real start states of the original tasks (synthetic tasks carry their own)."""
    eval_tasks: list[Task]
    make_sim: Callable[[Callable[[Task], str]], object]
    """initial_state -> a fresh M_exp BatchEnv."""
    make_real: Callable[[], object]
    """-> a real-env BatchEnv (held-out evaluation)."""
    task_writer: object | None = None
    """curriculum.TaskWriter over M_exp's weights (None: the curriculum cannot synthesize)."""
    buffer: object | None = None
    """buffer.ReplayBuffer the synthetic transitions join (None: not kept). Tagged at the start of
    iteration k (``tag_iteration``): the version M_exp's retriever reads during k."""
    buffer_export: str | None = None
    """Parquet path the buffer is exported to after stage 6 (``dreamgym sql``); None = no export."""
    embed: Callable[[list[str]], object] | None = None
    """Text -> unit vectors, for PPO's task clusters."""
    update: Callable[[str, str, str], dict] | None = None
    """Stage 2 out of process: (prev_policy_dir, rollouts_parquet_path, out_dir) -> update metrics, having
    written a PolicyTrainer checkpoint to out_dir (e.g. an ``accelerate launch`` job). None: the
    trainer's ``update`` + ``save`` in this process."""


@dataclass
class IterationOutputs:
    rollouts: pa.Table
    task_scores: pa.Table
    synthesized_tasks: pa.Table
    task_pool: pa.Table
    task_proposals: pa.Table
    """Every M_task proposal of the iteration with its fate (``schema.PROPOSAL_SCHEMA``)."""
    evaluation: pa.Table
    policy_dir: str
    metrics: dict[str, float]
    records: dict[str, dict]


def initial_state_fn(start_states: dict[str, str]) -> Callable[[Task], str]:
    def initial_state(task: Task) -> str:
        if task.initial_state:
            return task.initial_state
        try:
            return start_states[task.task_id]
        except KeyError:
            raise ValueError(f"task {task.task_id!r} has no initial_state and no recorded real start state") from None
    return initial_state


def _load_trainer(inp: IterationInputs, rl_cfg):
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.rl.trainer import PolicyTrainer

    ref, _, _ = load_checkpoint(inp.ref_policy_dir, training=True)
    if inp.k == 1:  # a fresh trainer on the SFT weights
        model, tok, _ = load_checkpoint(inp.prev_policy_dir, training=True)
        return PolicyTrainer(model, tok, rl_cfg, ref_model=ref)
    return PolicyTrainer.load(inp.prev_policy_dir, rl_cfg, ref_model=ref)


def run_iteration(inp: IterationInputs, cfg: LoopConfig, rl_cfg, cur_cfg, store: StageStore,
                  log: Log = print) -> IterationOutputs:
    """Stages 1-7 of the module docstring; finished stages are loaded instead of re-run."""
    from dreamgym_core import curriculum as cur
    from dreamgym_core.rl.step import act
    from dreamgym_core.rollout import RolloutConfig, rollout

    clear_partial(store)
    k, timer, records = inp.k, Timer(), {}
    if inp.buffer is not None:  # pin what iteration k retrieves: the buffer as it stands now (a re-run keeps it)
        inp.buffer.tag_iteration(k)
    grpo = rl_cfg.algorithm == "grpo"
    init_state = initial_state_fn(inp.start_states)
    trainer = None

    def get_trainer():
        nonlocal trainer
        if trainer is None:
            trainer = _load_trainer(inp, rl_cfg)
        return trainer

    # 1. rollouts of policy k-1 in M_exp (the step's first phase, rl.step.act) ---------------------
    def do_rollouts() -> pa.Table:
        # originals and synthetic tasks drawn apart: lam of the batch is synthetic whenever the pool has
        # any; the ablation (curriculum off) never rolls one out, whatever the pool holds
        pool = inp.pool if cur_cfg.enabled else [t for t in inp.pool if t.source != "synthetic"]
        tasks = cur.draw_batch(pool, cfg.tasks_per_iteration, cur_cfg.lam if cur_cfg.enabled else 0.0, k, cfg.seed)
        trajs, stats = act(inp.make_sim(init_state), get_trainer(), tasks, RolloutConfig(
            group_size=cfg.group_size if grpo else 1, max_steps=cfg.max_steps, batch_size=cfg.rollout_batch,
            source="synthetic", iteration=k, seed=cfg.seed * 1000 + k), policy_name=policy_version(k - 1))
        syn = [t for t in trajs if t.task.source == "synthetic"]
        syn_rec = {"curriculum/synthetic_tasks": len({t.task.task_id for t in syn}),
                   "curriculum/synthetic_episodes": len(syn),
                   "curriculum/synthetic_success_rate": sum(t.won for t in syn) / len(syn) if syn else None}
        store.put_record("rollouts_stats", {**stats.as_metadata(), **syn_rec})
        log(f"iteration {k:03d}: {stats.episodes} episodes in M_exp, {stats.transitions} transitions, "
            f"success {stats.successes / max(stats.episodes, 1):.2f}; {syn_rec['curriculum/synthetic_tasks']} "
            f"synthetic tasks rolled out ({len(syn)} episodes)")
        return store.put_table("rollouts", trajectories_table(trajs))

    rollouts, dt = run_stage(store, "rollouts", log, do_rollouts, lambda: store.table("rollouts"))
    timer.add("rollout", dt)
    records["rollouts"] = store.record("rollouts_stats") or {}
    trajs = read_trajectories(rollouts)

    # 2. the step's advantages and update (PolicyTrainer.update: GRPO groups or GAE, then PPO passes) ---
    policy_dir = store.path("policy")

    def do_update() -> dict:
        if inp.update is not None:  # the directory first, then the record: a killed update is re-run
            m = inp.update(inp.prev_policy_dir, store.table_path("rollouts"), policy_dir)
        else:
            tr = get_trainer()
            m = tr.update(trajs)
            tr.save(policy_dir)
        return store.put_record("policy", {**m, "iteration": k, "parent": inp.prev_policy_dir})

    upd, dt = run_stage(store, "policy", log, do_update, lambda: store.record("policy"))
    timer.add("update", dt)
    records["policy"] = upd

    # 3. task scores: reward variance (Eq. 7) ----------------------------------------------------
    def do_scores() -> pa.Table:
        variances = cur.task_reward_variance(trajs)
        if not grpo and inp.embed is None and variances and cur_cfg.enabled:
            # one rollout per task has variance 0: without clusters no task would ever be selected
            raise ValueError("PPO's curriculum scores embedding clusters of tasks but this iteration has no "
                             "embedder (no replay buffer); give it one, use algorithm='grpo', or disable the curriculum")
        if not grpo and inp.embed is not None and variances:
            ids = sorted(variances)
            by_id = {t.task.task_id: t.task for t in trajs}
            vecs = inp.embed([init_state(by_id[i]) for i in ids])
            groups = cur.cluster_groups(ids, vecs, max(1, len(ids) // cur_cfg.cluster_size), cfg.seed)
            variances = cur.cluster_variance(trajs, dict(zip(ids, groups)))
        sel = cur.select_seed_tasks(variances, cur_cfg.threshold, cur_cfg.top_m)
        store.put_record("selection", sel.as_record())
        rows = [{"iteration": k, "task_id": t, "variance": v[0], "rollouts": v[1], "mean_return": v[2],
                 "selected": t in sel.selected} for t, v in sorted(variances.items())]
        return store.put_table("task_scores", pa.Table.from_pylist(rows, schema=TASK_SCORES_SCHEMA))

    scores, dt = run_stage(store, "task_scores", log, do_scores, lambda: store.table("task_scores"))
    timer.add("scores", dt)
    records["selection"] = store.record("selection") or {}

    # 4. synthesized tasks: M_task + feasibility filter ------------------------------------------
    def do_synth() -> pa.Table:
        selected = [r["task_id"] for r in scores.to_pylist() if r["selected"]]
        by_id = {t.task_id: t for t in list(inp.pool) + list(inp.original)}
        seeds = [by_id[i] for i in selected if i in by_id]
        kept, report = [], {"proposals": 0, "parsed": 0, "parse_rate": None, "kept": 0, "drops": {}, "rows": []}
        if cur_cfg.enabled and seeds and inp.task_writer is not None:
            existing = list(inp.pool) + list(inp.original)
            states = {t.task_id: init_state(t) for t in [*existing, *seeds]}
            # each prompt shows its seed with tasks of the same room (as M_task was trained); in pointer
            # form it lists the objects seen in that room and the variant keeps the seed's room
            groups = cur.seed_groups(seeds, existing, states, cur_cfg.seeds_per_prompt, seed=cfg.seed + k)
            known = cur.object_catalogue(list(states.values())) if inp.task_writer.pointers else {}
            cats = [known.get(cur.location_of(states[t.task_id]), ()) if inp.task_writer.pointers else None
                    for t in seeds]
            n = cur_cfg.variants_per_seed
            prompts = [cur.build_task_prompt(g, states, cur_cfg.seeds_per_prompt, c)
                       for g, c in zip(groups, cats) for _ in range(n)]
            parents = [t for t in seeds for _ in range(n)]
            prompt_cats = [c for c in cats for _ in range(n)]
            texts = inp.task_writer.write(prompts, prompt_cats)
            templates = [states[t.task_id] if c is not None else None for t, c in zip(parents, prompt_cats)]
            existing_states = {t.task_id: states[t.task_id] for t in existing}

            def simulate(tasks: list[Task]) -> list[Trajectory]:
                from dreamgym_core.rollout import RandomPolicy
                sim = inp.make_sim(init_state)
                out, _ = rollout(sim, RandomPolicy("feasibility"), tasks, RolloutConfig(
                    group_size=cur_cfg.n_feasibility_rollouts, max_steps=cfg.max_steps, batch_size=cfg.rollout_batch,
                    source="synthetic", iteration=k, seed=k))
                return out

            kept, report = cur.synthesize(texts, parents, existing, existing_states, simulate, k, cur_cfg, prompt_cats,
                                          templates)
        store.put_table("task_proposals", cur.proposals_table(k, report["rows"]))
        store.put_record("synthesis", report)
        rate = report.get("parse_rate")
        log(f"iteration {k:03d}: M_task proposals {report.get('proposals', 0)}, parsed {report.get('parsed', 0)}"
            + (f" ({rate:.0%})" if rate is not None else "") + f", kept {len(kept)}, drops {report.get('drops', {})}")
        return store.put_table("synthesized_tasks", write_tasks(kept))

    synth, dt = run_stage(store, "synthesized_tasks", log, do_synth, lambda: store.table("synthesized_tasks"))
    timer.add("synthesis", dt)
    records["synthesis"] = store.record("synthesis") or {}
    proposals = store.table("task_proposals")
    if proposals is None:  # a stage result written before proposals were kept
        proposals = cur.proposals_table(k, [])

    # 5. task pool for k+1 ------------------------------------------------------------------------
    def do_pool() -> pa.Table:
        synthetic = [t for t in inp.pool if t.source == "synthetic"] + read_tasks(synth)
        pool = cur.build_task_pool(inp.original, synthetic, cur_cfg.lam if cur_cfg.enabled else 0.0,
                                   len(inp.original) + (len(synthetic) if cur_cfg.enabled else 0), cfg.seed + k)
        return store.put_table("task_pool", write_tasks(pool))

    pool_t, dt = run_stage(store, "task_pool", log, do_pool, lambda: store.table("task_pool"))
    timer.add("pool", dt)

    # 6. replay buffer ----------------------------------------------------------------------------
    def do_buffer() -> dict:
        if inp.buffer is None:
            return store.put_record("replay_buffer", {"added": 0, "kept": False})
        from dreamgym_core.replay import grow_buffer
        rec = grow_buffer(inp.buffer, rollouts.select([c for c in rollouts.column_names if c in _TRANSITION_NAMES]),
                          k, cfg.replay_max_synthetic_rows, inp.buffer_export)
        log(f"iteration {k:03d}: replay buffer +{rec['added']} rows ({rec['filtered']} filtered as uninformative), "
            f"{rec['pruned']} pruned, {rec['size']} rows")
        return store.put_record("replay_buffer", rec)

    buf_rec, dt = run_stage(store, "replay_buffer", log, do_buffer, lambda: store.record("replay_buffer"))
    timer.add("buffer", dt)
    records["replay_buffer"] = buf_rec

    # 7. evaluation: real held-out success beside success in M_exp on the same tasks ------------
    def do_eval() -> pa.Table:
        from dreamgym_core.models import load_checkpoint
        model, tok, _ = load_checkpoint(policy_dir)
        table = evaluate(lm_policy_factory(model, tok, policy_version(k)), "dreamgym", k, inp.eval_tasks,
                         inp.make_real, inp.make_sim, init_state, cfg, real_transitions=0, log=log)
        return store.put_table("evaluation", table)

    ev, dt = run_stage(store, "evaluation", log, do_eval, lambda: store.table("evaluation"))
    timer.add("evaluation", dt)
    metrics = {**{f"update/{a}": float(b) for a, b in upd.items() if isinstance(b, (int, float))},
               **timer.metrics()}
    return IterationOutputs(rollouts=rollouts, task_scores=scores, synthesized_tasks=synth, task_pool=pool_t,
                            task_proposals=proposals, evaluation=ev, policy_dir=policy_dir, metrics=metrics,
                            records=records)


def _transition_names() -> tuple[str, ...]:
    from dreamgym_core.schema import TRANSITION_SCHEMA
    return tuple(TRANSITION_SCHEMA.names)


_TRANSITION_NAMES = _transition_names()


def rl_in_real_env(trainer, make_real, tasks: Sequence[Task], cfg: LoopConfig, *, budget: int, rounds: int,
                   name: str, log: Log = print) -> dict:
    """PPO/GRPO directly in the real env with an exact budget of real transitions (real-RL baseline, S2R).

    Each round is one ``rl.step.train_step`` whose rollouts (a GRPO group per task) are capped by what
    is left of ``budget``. Returns the exact count of real transitions consumed and per-round metrics;
    the count covers every real transition the policy was trained on (evaluation episodes are
    reported apart).
    """
    from dreamgym_core.rl.step import train_step
    from dreamgym_core.rollout import RolloutConfig

    if budget < 0 or rounds < 1:
        raise ValueError(f"{name}: budget must be >= 0 and rounds >= 1 (got {budget}, {rounds})")
    used, recorded, episodes, wins, timer, last = 0, 0, 0, 0, Timer(), {}
    grpo = trainer.cfg.algorithm == "grpo"
    for r in range(rounds):
        left = budget - used
        if left <= 0:
            break
        batch = sample_tasks(tasks, cfg.tasks_per_iteration, 10_000 + r, cfg.seed)
        env = make_real()
        try:
            step = train_step(env, trainer, batch, RolloutConfig(
                group_size=cfg.group_size if grpo else 1, max_steps=cfg.eval_max_steps, batch_size=8, budget=left,
                source="real", iteration=r, seed=cfg.seed + r), policy_name=f"{name}@{r}")
        finally:
            env.close()
        stats = step.stats
        for phase in ("rollout", "advantages", "update"):
            timer.add(phase, step.metrics.get(f"timing/{phase}_s", 0.0))
        used += stats.transitions
        recorded += sum(len(t.steps) for t in step.trajectories if all(s.source == "real" for s in t.steps))
        episodes += stats.episodes
        wins += stats.successes
        if step.trajectories:
            last = {a: b for a, b in step.metrics.items() if not a.startswith(("rollout/", "timing/"))}
        log(f"{name} round {r + 1}/{rounds}: {stats.transitions} real transitions (total {used}/{budget}), "
            f"train success {stats.successes / max(stats.episodes, 1):.2f}")
    # no raise here: the asset's blocking check real_budget_respected compares the transitions actually
    # recorded (and trained on) with the budget and with rollout()'s own counter, and fails the run
    return {"real_transitions": used, "real_transitions_recorded": recorded, "budget": budget, "episodes": episodes,
            "train_success_rate": wins / max(episodes, 1), **timer.metrics(),
            **{f"update/{a}": float(b) for a, b in last.items() if isinstance(b, (int, float))}}
