"""Policy assets (paper §4.4-4.5, §5): the SFT init, the real-env RL baseline, sim-to-real, evaluation."""
# No `from __future__ import annotations` in asset modules: Dagster reads the annotations at definition time.

import os
import time

import dagster as dg
import pyarrow as pa

from assets.runtime import SimulatorFactory, heldout, real_env_factory, real_start_states, scoring_env_factory
from dreamgym_core.rollout import PolicyFormat
from dreamgym_core.schema import CheckpointRef, tasks_from_arrow, trajectories_from_arrow
from pipelines import reuse
from pipelines.checks import real_budget_check
from pipelines.partitions import iteration_partitions
from pipelines.resources import Experiment
from pipelines.settings import core

GROUP = "policy"


class PolicyInitAssetConfig(dg.Config):
    """Behaviour cloning on offline won episodes (the paper's SFT baseline and every RL run's start)."""

    base_model: str = ""
    """'' = from-scratch tiny Llama; else a local causal-LM directory."""
    vocab_size: int = 2000
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    steps: int = 2000
    time_budget_s: float = 900.0
    batch_size: int = 16
    lr: float = 2e-3
    history_window: int = PolicyFormat.history_window
    """(action, feedback) pairs in the policy's prompt; recorded in its checkpoint (``PolicyFormat``),
    which every rollout, update and evaluation of the policy reads."""
    behaviours: list[str] = ["expert", "noisy"]
    """Offline behaviours whose won episodes are cloned ([] = all)."""
    clone_kinds: list[str] = ["expert"]
    """Action kinds cloned inside them ([] = every valid step)."""
    max_prompt_tokens: int = 256
    seed: int = 0


class RLSettings(dg.ConfigurableResource):
    """The PPO/GRPO trainer (one `algorithm` field, one dispatch), shared by every RL stage of a run:
    the DreamGym loop, S2R and the real-env baseline (a resource, so one Launchpad edit sets all three).

    Each field is ``dreamgym_core.rl.trainer.RLConfig``'s of the same name (documented there)."""

    algorithm: str = "grpo"
    """grpo (group-normalized advantages, no critic) | ppo (GAE + value head)."""
    lr: float = 5e-5
    """Measured on twc (README, Results): lr 2e-4 with kl_coef 0.02 drove KL to 0.45 and real success
    from 0.46 to 0.32 in 8 iterations; 5e-5 with 0.1 keeps the policy near the SFT one."""
    value_lr: float = 1e-3
    ppo_epochs: int = 2
    minibatch_size: int = 32
    grad_accum_steps: int = 1
    clip_ratio: float = 0.2
    kl_coef: float = 0.1
    kl_kind: str = "k3"
    gamma: float = 1.0
    gae_lambda: float = 0.95
    step_advantage_weight: float = 0.0
    """GRPO: weight of GiGPO's step-level advantage over anchor states (0 = plain GRPO)."""
    progress_reward: float = 0.0
    """Weight of the env's dense score increments in the reward (0 = the paper's outcome reward)."""
    episode_weighting: bool = False
    vf_coef: float = 0.5
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    share_decisions: bool = True


def rl_config(cfg: RLSettings):
    from dreamgym_core.rl.trainer import RLConfig

    return core(RLConfig, cfg)


@dg.asset(group_name=GROUP, kinds={"pytorch"}, io_manager_key="checkpoint_io_manager")
def policy_init(context: dg.AssetExecutionContext, config: PolicyInitAssetConfig,
                offline_trajectories: pa.Table) -> CheckpointRef:
    """The SFT policy: ranking behaviour cloning on every valid step of the won offline episodes."""
    from dreamgym_core.policy_init import PolicyInitConfig, init_policy, policy_dir_ok
    from dreamgym_core.models import load_checkpoint

    cfg = core(PolicyInitConfig, config)
    out = reuse.stage_dir(context, "policy_init",
                          reuse.stage_key("policy_init", config, offline_trajectories=offline_trajectories))
    if policy_dir_ok(out):
        reuse.reused(context, "policy_init", out)
        return CheckpointRef(path=out, kind="policy", metrics=load_checkpoint(out)[2].get("metrics", {}))
    trajs = trajectories_from_arrow(offline_trajectories)

    def progress(step: int, loss: float) -> None:
        if step % 50 == 0:
            context.log.info(f"BC step {step}: loss {loss:.3f}")

    metrics = init_policy(trajs, out, cfg, progress=progress)
    return CheckpointRef(path=out, kind="policy", metrics=metrics)


class RealRLConfig(dg.Config):
    budget: int = 2000
    """Real transitions the policy may train on (every one is counted)."""
    rounds: int = 8
    tasks_per_round: int = 16
    group_size: int = 4
    max_steps: int = 20


def _loop_cfg(cfg: RealRLConfig):
    from dreamgym_core.loop import LoopConfig

    return LoopConfig(tasks_per_iteration=cfg.tasks_per_round, group_size=cfg.group_size, eval_max_steps=cfg.max_steps)


def _train_real(context, name: str, start: CheckpointRef, ref: CheckpointRef, rl: RLSettings, cfg: RealRLConfig,
                experiment: Experiment, seed_tasks: pa.Table) -> CheckpointRef:
    from dreamgym_core.loop import rl_in_real_env
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.rl.trainer import PolicyTrainer

    experiment.require_training_env(name)
    key = reuse.stage_key(name, (rl, cfg, experiment.env_spec()), start=start, ref=ref, seed_tasks=seed_tasks)
    out = reuse.stage_dir(context, name, key)
    if os.path.exists(os.path.join(out, "real_budget.json")):
        import json

        reuse.reused(context, name, out)
        with open(os.path.join(out, "real_budget.json")) as f:
            return CheckpointRef(path=out, kind="policy", parent=start.path, metrics=json.load(f))
    ref_model, _, _ = load_checkpoint(ref.path, training=True)
    if os.path.exists(os.path.join(start.path, "trainer.json")):
        trainer = PolicyTrainer.load(start.path, rl_config(rl), ref_model=ref_model)
    else:
        model, tok, _ = load_checkpoint(start.path, training=True)
        trainer = PolicyTrainer(model, tok, rl_config(rl), ref_model=ref_model)
    rec = rl_in_real_env(trainer, real_env_factory(experiment), tasks_from_arrow(seed_tasks), _loop_cfg(cfg),
                         budget=cfg.budget, rounds=cfg.rounds, name=name, log=context.log.info)
    trainer.save(out)
    import json

    with open(os.path.join(out, "real_budget.json.tmp"), "w") as f:
        json.dump(rec, f, indent=2)
    os.replace(os.path.join(out, "real_budget.json.tmp"), os.path.join(out, "real_budget.json"))
    return CheckpointRef(path=out, kind="policy", parent=start.path, metrics={k: float(v) for k, v in rec.items()})


def _budget_metadata(ref: CheckpointRef, cfg: RealRLConfig) -> dict:
    """What the UI shows for a real-env RL policy: every real transition it trained on, against its budget."""
    return {"real_transitions": int(ref.metrics["real_transitions"]), "budget": cfg.budget,
            "train_success_rate": float(ref.metrics.get("train_success_rate", 0.0))}


@dg.asset(group_name="baselines", kinds={"pytorch"}, io_manager_key="checkpoint_io_manager",
          check_specs=[dg.AssetCheckSpec("real_budget_respected", asset="real_rl_policy", blocking=True)])
def real_rl_policy(context: dg.AssetExecutionContext, rl: RLSettings, config: RealRLConfig,
                   experiment: Experiment, policy_init: CheckpointRef, seed_tasks: pa.Table):
    """The paper's real-env RL baseline: PPO/GRPO from the SFT policy directly in the real env, counted budget."""
    ref = _train_real(context, "real_rl_policy", policy_init, policy_init, rl, config, experiment, seed_tasks)
    yield dg.Output(ref, metadata=_budget_metadata(ref, config))
    yield real_budget_check(ref.metrics, config.budget)


class S2RConfig(RealRLConfig):
    budget: int = 500
    """S2R's real budget is smaller than the real-RL baseline's (paper §4.5)."""
    rounds: int = 3
    from_iteration: int = 0
    """Which iteration's policy to continue (0 = the latest materialized)."""


@dg.asset(group_name=GROUP, kinds={"pytorch"}, io_manager_key="checkpoint_io_manager",
          ins={"policy": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
          check_specs=[dg.AssetCheckSpec("real_budget_respected", asset="s2r_policy", blocking=True)])
def s2r_policy(context: dg.AssetExecutionContext, rl: RLSettings, config: S2RConfig, experiment: Experiment,
               policy: dict, policy_init: CheckpointRef, seed_tasks: pa.Table):
    """Sim-to-real: the synthetically trained policy continues in the real env with a small counted budget."""
    experiment.require_training_env("s2r_policy")
    if not policy:
        raise dg.Failure("s2r_policy needs at least one materialized iteration of `policy`")
    key = f"{config.from_iteration:03d}" if config.from_iteration else max(policy)
    if key not in policy:
        raise dg.Failure(f"s2r_policy: iteration {key} of `policy` is not materialized (have {sorted(policy)})")
    context.log.info(f"S2R from iteration {key}: {policy[key].path}")
    ref = _train_real(context, "s2r_policy", policy[key], policy_init, rl, config, experiment, seed_tasks)
    yield dg.Output(CheckpointRef(path=ref.path, kind="policy", parent=ref.parent, iteration=int(key),
                                  metrics=ref.metrics), metadata={**_budget_metadata(ref, config), "from_iteration": key})
    yield real_budget_check(ref.metrics, config.budget)


class PolicyEvalConfig(dg.Config):
    eval_tasks: int = 50
    sim_eval_tasks: int = 25
    max_steps: int = 20
    sampled: bool = True
    """Also report sampled (temperature 1) success beside greedy."""
    seed: int = 0


@dg.asset(group_name="evaluation", kinds={"parquet"},
          ins={"iteration_eval": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())})
def policy_eval(context: dg.AssetExecutionContext, config: PolicyEvalConfig, experiment: Experiment,
                eval_tasks: pa.Table, experience_model: CheckpointRef, policy_init: CheckpointRef,
                iteration_eval: pa.Table | None, s2r_policy: CheckpointRef | None,
                real_rl_policy: CheckpointRef | None) -> pa.Table:
    """Real held-out success of every policy: random, SFT, DreamGym (each iteration), S2R, real-RL.
    Offline-only without a live env to score in: success in M_exp on the held-out logged tasks' first
    states (``success_rate`` null, the interval M_exp success's).

    One row per (policy, iteration, mode) with a Wilson 95% interval and ``real_transitions`` (real
    transitions used to TRAIN the policy). ``sim_real_gap`` = success in M_exp minus real success on
    the same tasks, for the policies evaluated in both.
    """
    from dreamgym_core.evaluation import evaluate, lm_policy_factory
    from dreamgym_core.loop import LoopConfig, initial_state_fn
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.rollout import RandomPolicy

    test = heldout(eval_tasks)[:config.eval_tasks]
    make_real = scoring_env_factory(experiment, "policy_eval", context.log.info)
    # with no live env, M_exp is the only place to score in: every eval task runs there
    cfg = LoopConfig(eval_tasks=config.eval_tasks,
                     sim_eval_tasks=config.sim_eval_tasks if make_real is not None else config.eval_tasks,
                     eval_max_steps=config.max_steps, seed=config.seed)
    sims = SimulatorFactory(experience_model, experiment, retrieve="seed")  # M_exp's D_k as it was trained
    init_state = initial_state_fn(real_start_states(experiment, test))
    modes = ("greedy", "sampled") if config.sampled else ("greedy",)
    run = dict(tasks=test, make_real=make_real, make_sim=sims, init_state=init_state, cfg=cfg, log=context.log.info)
    tables = [evaluate(lambda mode: RandomPolicy("random"), "random", 0, real_transitions=0, modes=("sampled",), **run)]
    model, tok, _ = load_checkpoint(policy_init.path)
    tables.append(evaluate(lm_policy_factory(model, tok, "sft"), "sft", 0, real_transitions=0, modes=modes, **run))
    if iteration_eval is not None:
        tables.append(iteration_eval.select(tables[0].column_names).cast(tables[0].schema))
    for name, ref in (("s2r", s2r_policy), ("real_rl", real_rl_policy)):
        if ref is None:
            context.log.info(f"{name}: not materialized, no row")
            continue
        model, tok, _ = load_checkpoint(ref.path)
        tables.append(evaluate(lm_policy_factory(model, tok, name), name, ref.iteration, modes=modes,
                               real_transitions=int(ref.metrics.get("real_transitions", 0)), **run))
    table = pa.concat_tables(tables).sort_by([("policy", "ascending"), ("iteration", "ascending")])
    context.add_output_metadata({"results": dg.MetadataValue.md(results_markdown(table))})
    return table


def results_markdown(table: pa.Table) -> str:
    lines = ["| policy | iteration | mode | real success [95% CI] | M_exp success | sim-real gap | real transitions |",
             "|---|---|---|---|---|---|---|"]
    for r in table.to_pylist():
        sim = "" if r["sim_success_rate"] is None else f"{r['sim_success_rate']:.2f}"
        gap = "" if r["sim_real_gap"] is None else f"{r['sim_real_gap']:+.2f}"
        real = "no live env" if r["success_rate"] is None else \
            f"{r['success_rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        lines.append(f"| {r['policy']} | {r['iteration']} | {r['mode']} | {real} | {sim} | {gap} | "
                     f"{r['real_transitions']} |")
    return "\n".join(lines)
