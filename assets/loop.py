"""The DreamGym training loop as iteration partitions (paper Algorithm 1).

One ``@multi_asset`` holds the per-iteration stages. Each stage is its own asset key with its own
storage (Parquet, LanceDB, checkpoint), and each has a k-1 **self** edge only: Dagster rejects k-1
edges between different keys (a cycle), and a multi-asset with sibling edges breaks the backfill
daemon (shared/notes/dagster-idioms.md §1.3.2, §1.4). The order inside an iteration is code order:
rollouts -> policy -> task_scores -> synthesized_tasks (+ task_proposals) -> task_pool -> replay_buffer ->
iteration_eval
(dreamgym_core.loop). Iteration k reads k-1's ``policy`` and ``task_pool``; iteration 1 starts from
``policy_init`` and ``seed_tasks``. Stages already finished for k are skipped on a retry.
"""
# No `from __future__ import annotations` in asset modules: Dagster reads the annotations at definition time.

import os
import time

import dagster as dg
import pyarrow as pa

from assets.policy import RLSettings, rl_config
from assets.runtime import SimulatorFactory, heldout, offline_start_states, open_buffer, real_start_states, \
    scoring_env_factory
from dreamgym_core.experience.retrieval import Retriever
from dreamgym_core.schema import CheckpointRef, tasks_from_arrow
from pipelines import reuse
from pipelines.io_managers import parquet_path
from pipelines.checks import synthetic_share
from pipelines.partitions import PREVIOUS_ITERATION, iteration_index, iteration_partitions
from pipelines.resources import Experiment, Launcher, data_root
from pipelines.settings import core

GROUP = "dreamgym_loop"
PARQUET_OUTPUTS = ("rollouts", "task_scores", "synthesized_tasks", "task_proposals", "task_pool", "iteration_eval")
STAGE_TABLES = {"rollouts": "rollouts", "task_scores": "task_scores", "synthesized_tasks": "synthesized_tasks",
                "task_proposals": "task_proposals", "task_pool": "task_pool", "evaluation": "iteration_eval"}
"""run_iteration's tables -> the asset whose Parquet partition stores each."""


class LoopSettings(dg.ConfigurableResource):
    """One iteration's sizes and the curriculum (Eq. 6-7). A resource, so a deployment profile sets it
    once (pipelines.definitions) and the Launchpad can still override it per run."""

    tasks_per_iteration: int = 16
    group_size: int = 4
    max_steps: int = 10
    eval_tasks: int = 50
    sim_eval_tasks: int = 25
    eval_max_steps: int = 20
    curriculum: bool = True
    """Ablation switch: False = no M_task and no synthetic task in any rollout batch (originals only)."""
    threshold: float = 0.0
    """Tasks with V_tau above this seed M_task (then the top_m highest)."""
    top_m: int = 4
    lam: float = 0.3
    """Share of each rollout batch given to synthetic tasks whenever the pool has some (at least one
    place), and the most the task pool may hold."""
    variants_per_seed: int = 2
    n_feasibility_rollouts: int = 3
    replay_buffer: bool = True
    """Experience replay (paper §4.2): M_exp's prompts hold k demonstrations retrieved from the LanceDB
    replay buffer, in SFT (``experience_model``) and in simulation, and each iteration adds its
    informative synthetic transitions to the buffer. False = the paper's "w/o experience replay"
    ablation: no demonstrations anywhere and nothing added."""
    mexp_sampling: bool = False
    """M_exp samples its next states (temperature 1) instead of decoding greedily. Greedy keeps the
    mode of a stochastic env's next state (lamp's hidden next colour) and a policy trained in it never
    meets the states the mode leaves out; sampling follows Eq. 4's s' ~ M_exp, at more noise per step
    in a deterministic env (twc). docs/experiments.md has the lamp measurement."""
    replay_max_synthetic_rows: int = 20000
    """Size cap on the buffer's synthetic rows; above it the oldest synthetic trajectories per task go
    (``dreamgym_core.replay.grow_buffer``). Offline real rows are never pruned."""
    seed: int = 0


def _after_previous(key: str) -> dg.AssetDep:
    return dg.AssetDep(key, partition_mapping=PREVIOUS_ITERATION)


def _spec(key: str, io: str, kinds: set, description: str, extra_deps=()) -> dg.AssetSpec:
    return dg.AssetSpec(key, deps=[_after_previous(key), *extra_deps], kinds=kinds, group_name=GROUP,
                        description=description).with_io_manager_key(io)


LOOP_SPECS = [
    _spec("rollouts", "io_manager", {"parquet"}, "Synthetic episodes of policy k-1 in M_exp (GRPO groups), "
          "each transition naming the policy version that acted.", ["experience_model", "policy_init",
                                                                    "offline_trajectories"]),
    _spec("policy", "checkpoint_io_manager", {"pytorch", "accelerate"},
          "Policy after iteration k: one PPO/GRPO update on the rollouts, KL to the SFT policy."),
    _spec("task_scores", "io_manager", {"parquet"}, "Reward variance V_tau per task (Eq. 7) and the seeds chosen."),
    _spec("synthesized_tasks", "io_manager", {"parquet"},
          "Task variants M_task wrote from high-variance seeds that passed the feasibility filter."),
    _spec("task_proposals", "io_manager", {"parquet"},
          "Every variant M_task proposed in iteration k: parsed or not, kept or the filter's drop reason."),
    _spec("task_pool", "io_manager", {"parquet"},
          "Tasks for iteration k+1: originals plus at most a fraction lambda of synthetic ones.", ["seed_tasks"]),
    _spec("replay_buffer", "checkpoint_io_manager", {"lancedb"},
          "The LanceDB replay buffer after adding iteration k's informative synthetic transitions and pruning "
          "(offline seed included); queryable as the replay_buffer_rows view.", ["replay_seed"]),
    _spec("iteration_eval", "io_manager", {"parquet"},
          "Held-out real success of policy k beside its success in M_exp on the same tasks (sim_real_gap).",
          ["eval_tasks"]),
]
_CHECKS = [dg.AssetCheckSpec("schema", asset=k, description="columns and types match the declared schema")
           for k in PARQUET_OUTPUTS] + [
    dg.AssetCheckSpec("real_success_not_regressed", asset="iteration_eval",
                      description="WARN when real held-out success drops below iteration k-1's"),
    dg.AssetCheckSpec("synthetic_share_within_lambda", asset="task_pool",
                      description="the pool's synthetic share never exceeds lambda"),
]


@dg.multi_asset(
    specs=LOOP_SPECS, partitions_def=iteration_partitions, check_specs=_CHECKS, can_subset=False,
    ins={"prev_policy": dg.AssetIn("policy"), "prev_task_pool": dg.AssetIn("task_pool"),
         "prev_eval": dg.AssetIn("iteration_eval"),
         "experience_model": dg.AssetIn(), "policy_init": dg.AssetIn(), "seed_tasks": dg.AssetIn(),
         "eval_tasks": dg.AssetIn(), "offline_trajectories": dg.AssetIn(), "replay_seed": dg.AssetIn()},
)
def dreamgym_iteration(context: dg.AssetExecutionContext, loop: LoopSettings, experiment: Experiment,
                       rl: RLSettings, launcher: Launcher, prev_policy: CheckpointRef | None,
                       prev_task_pool: pa.Table | None, prev_eval: pa.Table | None, experience_model: CheckpointRef,
                       policy_init: CheckpointRef, seed_tasks: pa.Table, eval_tasks: pa.Table,
                       offline_trajectories: pa.Table, replay_seed: CheckpointRef):
    """Iteration k of DreamGym: rollouts in M_exp -> policy update -> curriculum -> buffer -> evaluation."""
    from dreamgym_core import curriculum as cur
    from dreamgym_core.loop import LoopConfig, run_iteration
    from pipelines.checks import loop_checks

    k = iteration_index(context.partition_key)
    if k > 1 and prev_policy is None:
        raise dg.Failure(f"iteration {k:03d} needs iteration {k - 1:03d}'s policy: materialize it first "
                         "(backfill iterations in order)")
    started = time.perf_counter()
    loop_cfg = core(LoopConfig, loop)
    cur_cfg = core(cur.CurriculumConfig, loop, enabled=loop.curriculum)
    rl_cfg = rl_config(rl)
    key = reuse.stage_key("dreamgym_loop", (loop_cfg, cur_cfg, rl_cfg, experiment.source_key(),
                                            {"k": k, "replay_buffer": loop.replay_buffer}),
                          experience_model=experience_model, policy_init=policy_init, prev_policy=prev_policy,
                          prev_task_pool=prev_task_pool, seed_tasks=seed_tasks, eval_tasks=eval_tasks,
                          offline_trajectories=offline_trajectories)
    store = _stage_store(context, key, k)
    inp, sims = _iteration_inputs(context, k, loop, experiment, launcher, rl_cfg, prev_policy, prev_task_pool,
                                  experience_model, policy_init, seed_tasks, eval_tasks, offline_trajectories,
                                  replay_seed)
    out = run_iteration(inp, loop_cfg, rl_cfg, cur_cfg, store, log=context.log.info)
    yield from _iteration_outputs(k, loop, out, inp, sims, replay_seed, started)
    yield from loop_checks(out, prev_eval, lam=loop.lam, curriculum=loop.curriculum)


def _stage_store(context: dg.AssetExecutionContext, key: str, k: int):
    """Where iteration k's stages are recorded: the stage tables in their assets' Parquet partitions
    (one copy), records and the policy in the loop's ``work`` area under ``key``."""
    from dreamgym_core.loop import StageStore

    tables = {stage: parquet_path(os.path.join(data_root(), "parquet"), asset, context.partition_key)
              for stage, asset in STAGE_TABLES.items()}
    return StageStore(os.path.join(reuse.stage_dir(context, "dreamgym_loop", key, area="loop"), f"{k:03d}"), tables)


def _iteration_inputs(context: dg.AssetExecutionContext, k: int, config: LoopSettings, experiment: Experiment,
                      launcher: Launcher, rl_cfg, prev_policy: CheckpointRef | None, prev_task_pool: pa.Table | None,
                      experience_model: CheckpointRef, policy_init: CheckpointRef, seed_tasks: pa.Table,
                      eval_tasks: pa.Table, offline_trajectories: pa.Table, replay_seed: CheckpointRef):
    """``run_iteration``'s inputs from the asset's: tasks, start states, M_exp as a simulator (retrieving
    from the buffer as it stood at the start of k), M_task, the buffer and the policy update. Returns
    (IterationInputs, the SimulatorFactory, whose totals go into the metadata)."""
    from dreamgym_core import curriculum as cur
    from dreamgym_core.loop import IterationInputs

    original = tasks_from_arrow(seed_tasks)
    test = heldout(eval_tasks)
    starts = {**offline_start_states(offline_trajectories), **real_start_states(experiment, test[:config.eval_tasks])}
    buffer = open_buffer(replay_seed) if config.replay_buffer else None
    # iteration k simulates with the buffer as it stood at its start (the tag run_iteration writes)
    sims = SimulatorFactory(experience_model, experiment,
                            retrieve=Retriever(buffer, iteration=k) if buffer is not None else None,
                            greedy=not config.mexp_sampling)
    writer = cur.TaskWriter(sims.model, sims.tokenizer, seed=config.seed + k, pointers=sims.prompt.pointers) \
        if config.curriculum else None
    inp = IterationInputs(
        k=k, prev_policy_dir=prev_policy.path if prev_policy else policy_init.path, ref_policy_dir=policy_init.path,
        pool=tasks_from_arrow(prev_task_pool) if prev_task_pool is not None else original, original=original,
        start_states=starts, eval_tasks=test, make_sim=sims,
        make_real=scoring_env_factory(experiment, f"iteration_eval[{context.partition_key}]", context.log.info),
        task_writer=writer, buffer=buffer, embed=buffer.embedder.encode if buffer is not None else None,
        buffer_export=os.path.join(data_root(), "parquet", "replay_buffer_rows", f"{k:03d}.parquet"),
        update=accelerate_update(context, launcher, rl_cfg, policy_init.path, resume=k > 1)
        if launcher.mode == "accelerate" else None)
    return inp, sims


def _iteration_outputs(k: int, config: LoopSettings, out, inp, sims, replay_seed: CheckpointRef, started: float):
    """One ``dg.Output`` per stage asset of iteration k, each with its metadata."""
    prev_key = f"{k - 1:03d}" if k > 1 else "sft"
    yield dg.Output(out.rollouts, output_name="rollouts",
                    metadata={"policy_version": prev_key, **_num(out.records.get("rollouts", {}))})
    yield dg.Output(CheckpointRef(path=out.policy_dir, kind="policy", parent=inp.prev_policy_dir, iteration=k,
                                  metrics={a: b for a, b in out.metrics.items()}),
                    output_name="policy", metadata={"parent_policy": prev_key})
    sel = out.records.get("selection", {})
    yield dg.Output(out.task_scores, output_name="task_scores",
                    metadata={"threshold": float(sel.get("threshold", config.threshold)),
                              "selected": int(len(sel.get("selected", []))),
                              "variance_histogram": dg.MetadataValue.md(_histogram_md(sel))})
    syn = out.records.get("synthesis", {})
    yield dg.Output(out.synthesized_tasks, output_name="synthesized_tasks",
                    metadata={"proposals": int(syn.get("proposals", 0)), "kept": out.synthesized_tasks.num_rows,
                              "drops": dg.MetadataValue.json(syn.get("drops", {}))})
    yield dg.Output(out.task_proposals, output_name="task_proposals", metadata=_proposal_metadata(syn, out))
    yield dg.Output(out.task_pool, output_name="task_pool",
                    metadata={"tasks": out.task_pool.num_rows, "synthetic_share": synthetic_share(out.task_pool)})
    buf = out.records.get("replay_buffer", {})
    yield dg.Output(CheckpointRef(path=replay_seed.path if inp.buffer is not None else "", kind="replay_buffer",
                                  iteration=k, metrics=_num(buf)), output_name="replay_buffer",
                    metadata={**{f"replay/{a}": b for a, b in _num(buf).items()},
                              "by_source": dg.MetadataValue.json(buf.get("by_source", {}))})
    yield dg.Output(out.evaluation, output_name="iteration_eval",
                    metadata={**_num(out.evaluation.to_pylist()[0]), **sims.totals(),
                              "timing/iteration_s": round(time.perf_counter() - started, 1)})


def accelerate_update(context: dg.AssetExecutionContext, launcher: Launcher, rl_cfg, ref_policy_dir: str, *,
                      resume: bool):
    """The loop's stage 2 as ``accelerate launch`` (pipelines.accelerate_entry ``policy_update``):
    (prev_policy_dir, rollouts_parquet, out_dir) -> the metrics rank 0 reported. ``resume``: the previous
    directory is a trainer checkpoint (k > 1); otherwise a fresh trainer starts on the SFT weights."""
    from dataclasses import asdict

    def update(prev_policy_dir: str, rollouts_path: str, out_dir: str) -> dict:
        spec = {"prev_policy_dir": prev_policy_dir, "ref_policy_dir": ref_policy_dir, "rollouts": rollouts_path,
                "out_dir": out_dir, "resume": resume, "rl": asdict(rl_cfg)}
        done = launcher.run(context, "policy_update", spec, out_dir.rstrip("/") + "_update_spec.json")
        reports = [m for m in done.get_custom_messages() if isinstance(m, dict) and m.get("stage") == "policy_update"]
        if len(reports) != 1 or not os.path.exists(os.path.join(out_dir, "trainer.json")):
            raise dg.Failure(f"policy_update: expected one report from rank 0 and a trainer checkpoint in {out_dir}, "
                             f"got {len(reports)} report(s)")
        return reports[0]["metrics"]
    return update


def _num(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def _proposal_metadata(syn: dict, out) -> dict:
    """The curriculum's iteration at a glance: M_task's proposals, how many parsed and were kept,
    each proposal's fate, and how the synthetic tasks of this iteration's batch fared."""
    rolled = out.records.get("rollouts", {})
    rows = out.task_proposals.to_pylist()
    table = ["| # | parent | fate | task |", "|---|---|---|---|"] + [
        f"| {r['index']} | {r['parent_task_id']} | "
        + ("kept" if r["kept"] else r["reason"] + (f" ({r['parse_error']})" if r["parse_error"] else ""))
        + f" | {r['task_id'] or ''} |" for r in rows]
    meta = {"curriculum/proposals": int(syn.get("proposals", 0)), "curriculum/parsed": int(syn.get("parsed", 0)),
            "curriculum/kept": out.synthesized_tasks.num_rows,
            "curriculum/synthetic_tasks": int(rolled.get("curriculum/synthetic_tasks", 0)),
            "curriculum/synthetic_episodes": int(rolled.get("curriculum/synthetic_episodes", 0)),
            "drops": dg.MetadataValue.json(syn.get("drops", {})),
            "proposals_table": dg.MetadataValue.md("\n".join(table) if rows else "no proposals")}
    for key, value in (("curriculum/parse_rate", syn.get("parse_rate")),
                       ("curriculum/synthetic_success_rate", rolled.get("curriculum/synthetic_success_rate"))):
        if value is not None:  # no proposals / no synthetic episode: no rate to show
            meta[key] = float(value)
    return meta


def _histogram_md(sel: dict) -> str:
    edges, counts = sel.get("edges", []), sel.get("counts", [])
    if not counts:
        return "no rollouts"
    lines = ["| V_tau bin | tasks |", "|---|---|"]
    lines += [f"| [{edges[i]:.3f}, {edges[i + 1]:.3f}) | {c} |" for i, c in enumerate(counts)]
    return "\n".join(lines)
