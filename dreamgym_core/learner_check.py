"""The learner check: does the RL update push success towards 1 where it can?

No paper equation of its own. DreamGym's claims compare RL arms (in M_exp, in the real env, S2R);
none of them means anything unless the learner, fed rollouts it can learn from, learns. This
module measures that through the same code path every arm uses (``loop.rl_in_real_env``: rollout
-> advantages -> ``PolicyTrainer.update``), on two testbeds:

* ``lamp`` (``envs.lamp``): a tiny text task with a known optimum, a from-scratch policy (no BC),
  the paper's sparse outcome reward. A learner that works takes greedy success from near the
  random rate to near 1.
* a fixed batch of real train tasks replayed every round (TWX twc by default) from a weak
  behaviour-cloned policy: the trainer should push those tasks' success towards 1; success on dev
  games (never trained on) says whether anything transfers. ``--pool N`` draws each round's tasks
  afresh from N train games instead (the ``real_rl`` arm's regime).
* any other testbed of ``experiment.TESTBEDS`` (e.g. ``mapreader``): its env, its pi0 (the experiment's
  own ``bc_policy`` stage for that seed, so the curve starts where the ``real_rl`` arm starts), its
  train tasks and its **dev** games (never its test games); setting ``testbed`` is its ``rl``.

Each round writes one row (the learning curve); dev success is measured greedy every
``eval_every`` rounds and at the end. Rows are plain dicts, written to ``results/learner.csv`` by
``main`` (``python -m dreamgym_core.learner_check``), which the docs are generated from.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from dreamgym_core.schema import Task

Log = Callable[[str], None]


@dataclass(frozen=True)
class LearnerRun:
    """One learning curve: a testbed, an RL setting, a seed."""

    testbed: str
    """'lamp' | 'twc' (any ``EnvSpec`` env/game via ``env``/``game``/``params``)."""
    setting: str
    rl: dict = field(default_factory=dict)
    """``RLConfig`` fields that differ from its defaults."""
    rounds: int = 20
    tasks: int = 16
    """Train tasks per round: the same ones every round (a fixed batch) unless ``pool`` is set."""
    pool: int = 0
    """0: a fixed batch. N > 0: each round draws ``tasks`` tasks afresh from the first N train
    games (the ``real_rl`` arm's regime: many games, each seen a few times)."""
    group_size: int = 4
    max_steps: int = 20
    dev_tasks: int = 100
    eval_every: int = 5
    seed: int = 0


SETTINGS: dict[str, dict] = {
    # The RLConfig defaults (lr 1e-4, KL 0.02 to the start policy, 2 epochs of minibatches of 32).
    "default": {},
    # What the lamp and twc curves chose: no KL pull on every decision, one epoch of bigger
    # minibatches, and GiGPO's step-level credit over anchor states (gamma 0.95).
    "gigpo": {"kl_coef": 0.0, "ppo_epochs": 1, "minibatch_size": 64, "step_advantage_weight": 1.0, "gamma": 0.95},
    # The same with a faster learning rate (the from-scratch lamp policy needs it).
    "gigpo_lr1e-3": {"kl_coef": 0.0, "ppo_epochs": 1, "minibatch_size": 64, "step_advantage_weight": 1.0,
                     "gamma": 0.95, "lr": 1e-3},
    "plain_lr1e-3": {"kl_coef": 0.0, "ppo_epochs": 1, "minibatch_size": 64, "lr": 1e-3},
    # More optimizer steps per round: two epochs of minibatches of 16 (about 4x the Adam steps).
    "fast": {"kl_coef": 0.0, "ppo_epochs": 2, "minibatch_size": 16, "lr": 1e-3},
    # gigpo at a learning rate between the defaults' 1e-4 and the collapsing 1e-3
    "gigpo_lr3e-4": {"kl_coef": 0.0, "ppo_epochs": 1, "minibatch_size": 64, "step_advantage_weight": 1.0,
                     "gamma": 0.95, "lr": 3e-4},
    # gigpo with the env's dense score in the reward (twc: partial credit per object placed)
    "gigpo_progress": {"kl_coef": 0.0, "ppo_epochs": 1, "minibatch_size": 64, "step_advantage_weight": 1.0,
                       "gamma": 0.95, "progress_reward": 1.0},
    "gigpo_progress_lr3e-4": {"kl_coef": 0.0, "ppo_epochs": 1, "minibatch_size": 64, "step_advantage_weight": 1.0,
                              "gamma": 0.95, "progress_reward": 1.0, "lr": 3e-4},
    # gigpo with the dense score at lamp's learning rate (TWX games with sub-goals: coin, peckingorder)
    "gigpo_progress_lr1e-3": {"kl_coef": 0.0, "ppo_epochs": 1, "minibatch_size": 64, "step_advantage_weight": 1.0,
                              "gamma": 0.95, "progress_reward": 1.0, "lr": 1e-3},
    "fast_gigpo": {"kl_coef": 0.0, "ppo_epochs": 2, "minibatch_size": 16, "lr": 1e-3,
                   "step_advantage_weight": 1.0, "gamma": 0.95},
    # PPO (GAE, value head) at gigpo_lr1e-3's sizes: PPO rolls one episode per task, so give it
    # --tasks = GRPO's tasks x group size for the same episodes per round
    "ppo_lr1e-3": {"algorithm": "ppo", "kl_coef": 0.0, "ppo_epochs": 1, "minibatch_size": 64, "gamma": 0.95,
                   "lr": 1e-3},
    "ppo_lr3e-4": {"algorithm": "ppo", "kl_coef": 0.0, "ppo_epochs": 1, "minibatch_size": 64, "gamma": 0.95,
                   "lr": 3e-4},
    "ppo_2ep_lr1e-3": {"algorithm": "ppo", "kl_coef": 0.0, "ppo_epochs": 2, "minibatch_size": 32, "gamma": 0.95,
                       "lr": 1e-3},
}


LEGACY = ("lamp", "twc")
"""The learner's own testbeds (their pi0 built by ``start_policy``); other names come from TESTBEDS."""


def registry_testbed(name: str):
    """The ``experiment.TESTBEDS`` entry the learner runs on, or None for its own lamp / twc."""
    from dreamgym_core.experiment import TESTBEDS, get_testbed

    if name in LEGACY:
        return None
    if name not in TESTBEDS:
        raise ValueError(f"learner_check: unknown testbed {name!r}; known: {', '.join(dict.fromkeys([*LEGACY, *TESTBEDS]))}")
    return get_testbed(name)


def _spec(testbed: str, cache_dir: str, params: str = ""):
    from dreamgym_core.envs import EnvSpec

    if (tb := registry_testbed(testbed)) is not None:
        return EnvSpec(tb.env, tb.game, params=tb.params, cache_dir=cache_dir)
    if testbed == "lamp":
        return EnvSpec("lamp", "lamp", params=params)
    if testbed == "twc":
        return EnvSpec("twx", "twc", cache_dir=cache_dir)
    raise ValueError(f"learner_check: testbed must be 'lamp' or 'twc', got {testbed!r}")


def _splits(testbed: str, env, run: LearnerRun) -> tuple[list[Task], list[Task]]:
    """(train games, dev games): twc's dev games are held-out seeds of the train fold (the
    pipeline's ``eval_fold='train'``: same objects, unseen games), its last ones (from 900 for 100)."""
    train = env.tasks("train", run.pool or run.tasks)
    if (tb := registry_testbed(testbed)) is not None:
        if run.pool > tb.offline.train_tasks or run.dev_tasks > tb.dev_games:
            raise ValueError(f"learner_check: testbed {testbed} has {tb.offline.train_tasks} train tasks and "
                             f"{tb.dev_games} dev games; asked for a pool of {run.pool} and {run.dev_tasks} dev games")
        return train, env.tasks(tb.eval_split, run.dev_tasks, start=tb.dev_start)
    if testbed != "twc":
        return train, env.tasks("dev", run.dev_tasks)
    start = 1000 - max(run.dev_tasks, 100)  # the last seeds of twc's 1000-seed train fold (900 for 100 games)
    if start < len(train):
        raise ValueError(f"learner_check: {len(train)} train games and {run.dev_tasks} dev games overlap in twc's "
                         "1000-seed train fold")
    return train, env.tasks("train", run.dev_tasks, start=start)


def start_policy(testbed: str, spec, out_dir: str, *, bc_steps: int = 300, seed: int = 0, log: Log = print) -> str:
    """The start policy pi0, trained once and reused: lamp -> a from-scratch tiny Llama (no BC: its
    tokenizer is fitted to random-walk prompts); twc -> behaviour cloning for ``bc_steps`` steps on
    the pipeline's default offline data mix of 300 train games (300 steps: the weak pi0 of the
    experiments issue, about 0.40 on dev games)."""
    from dreamgym_core.collect import CollectConfig, collect
    from dreamgym_core.envs import make_env
    from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, save_checkpoint, train_tokenizer
    from dreamgym_core.policy import PolicyFormat, set_policy_format
    from dreamgym_core.policy_init import PolicyInitConfig, init_policy, policy_corpus, policy_dir_ok

    if policy_dir_ok(out_dir):
        return out_dir
    env = make_env(spec)
    try:
        if testbed == "lamp":
            trajs, _ = collect(env, env.tasks("train", 200), CollectConfig(episodes={"random": 2}, seed=seed))
        else:
            trajs, _ = collect(env, env.tasks("train", 300),
                               CollectConfig(episodes={"expert": 1, "noisy": 2, "random": 2}, epsilon=0.3,
                                             invalid_rate=0.25, max_steps=30, seed=seed))
    finally:
        env.close()
    tmp = out_dir.rstrip("/") + ".partial"
    if testbed == "lamp":
        fmt = PolicyFormat()
        tok = train_tokenizer(policy_corpus(trajs, fmt), tmp + ".tokenizer", vocab_size=500)
        model = build_tiny_llama(tok, TinyLlamaConfig(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=192),
                                 seed=seed)
        set_policy_format(model, fmt)  # recorded in the checkpoint, read by every rollout and update
        save_checkpoint(model, tok, tmp, {"kind": "policy", "config": {"from_scratch": True}})
    else:
        log(f"pi0: behaviour cloning {bc_steps} steps on {len(trajs)} offline episodes")
        init_policy(trajs, tmp, PolicyInitConfig(steps=bc_steps, seed=seed, time_budget_s=3600.0))
    import shutil

    shutil.rmtree(tmp + ".tokenizer", ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def _dev_success(trainer, make_real, dev: Sequence[Task], run: LearnerRun, k: int) -> dict:
    from dreamgym_core.evaluation import evaluate, lm_policy_factory
    from dreamgym_core.loop import LoopConfig

    cfg = LoopConfig(eval_tasks=len(dev), sim_eval_tasks=0, eval_max_steps=run.max_steps, seed=run.seed)
    table = evaluate(lm_policy_factory(trainer.model, trainer.tokenizer, f"{run.setting}@{k}"), run.setting, k,
                     dev, make_real, None, None, cfg, real_transitions=0, log=lambda _: None)
    row = table.to_pylist()[0]
    return {"dev_success": row["success_rate"], "dev_ci_low": row["ci_low"], "dev_ci_high": row["ci_high"]}


def run_curve(run: LearnerRun, pi0_dir: str, spec, *, log: Log = print) -> list[dict]:
    """Train from ``pi0_dir`` for ``run.rounds`` rounds on a fixed batch of train tasks; one row a round."""
    from dreamgym_core.envs import SerialBatchEnv, make_env
    from dreamgym_core.loop import LoopConfig, rl_in_real_env
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.rl.trainer import PolicyTrainer, RLConfig

    import torch

    torch.manual_seed(run.seed)
    rl = RLConfig(**{**run.rl, "seed": run.seed})
    model, tok, _ = load_checkpoint(pi0_dir)
    trainer = PolicyTrainer(model, tok, rl)
    env = make_env(spec)
    try:
        train, dev = _splits(run.testbed, env, run)
    finally:
        env.close()

    def make_real():
        return SerialBatchEnv(lambda: make_env(spec), 8)

    import random

    draw = random.Random(run.seed)
    rows, used, started = [], 0, time.perf_counter()
    base = {"testbed": run.testbed, "setting": run.setting, "seed": run.seed, "tasks": run.tasks, "pool": run.pool,
            "group_size": run.group_size if rl.algorithm == "grpo" else 1,  # PPO rolls one episode per task
            "lr": rl.lr, "kl_coef": rl.kl_coef, "step_advantage_weight":
            rl.step_advantage_weight, "ppo_epochs": rl.ppo_epochs, "minibatch_size": rl.minibatch_size}
    first = {"round": 0, "transitions": 0, "train_success": None, **_dev_success(trainer, make_real, dev, run, 0)}
    rows.append({**base, **first, "wall_s": round(time.perf_counter() - started, 1)})
    log(f"{run.testbed}/{run.setting}/seed {run.seed}: round 0 dev {first['dev_success']:.3f}")
    for r in range(1, run.rounds + 1):
        cfg = LoopConfig(tasks_per_iteration=len(train), group_size=run.group_size, eval_max_steps=run.max_steps,
                         seed=run.seed * 100_003 + r)
        batch = draw.sample(train, run.tasks) if run.pool else train
        m = rl_in_real_env(trainer, make_real, batch, cfg, budget=10 ** 9, rounds=1, name=run.setting,
                           log=lambda _: None)
        used += m["real_transitions"]
        row = {**base, "round": r, "transitions": used, "train_success": round(m["train_success_rate"], 4),
               "dev_success": None, "dev_ci_low": None, "dev_ci_high": None}
        if r % run.eval_every == 0 or r == run.rounds:
            row.update(_dev_success(trainer, make_real, dev, run, r))
        row["wall_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        log(f"{run.testbed}/{run.setting}/seed {run.seed}: round {r}/{run.rounds} train {row['train_success']:.2f}"
            + (f" dev {row['dev_success']:.3f}" if row["dev_success"] is not None else "")
            + f" ({used} transitions, {row['wall_s']:.0f} s)")
    return rows


COLUMNS = ("testbed", "setting", "seed", "round", "transitions", "train_success", "dev_success", "dev_ci_low",
           "dev_ci_high", "tasks", "pool", "group_size", "lr", "kl_coef", "step_advantage_weight", "ppo_epochs",
           "minibatch_size", "wall_s")


def append_rows(path: str, rows: Sequence[dict]) -> None:
    """Append whole curves to a CSV (header once); the file is replaced atomically."""
    old: list[dict] = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise")
        w.writeheader()
        for row in [*old, *rows]:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None, prog: str = "python -m dreamgym_core.learner_check") -> int:
    p = argparse.ArgumentParser(prog=prog,
                                description="Learning curves of the RL learner on a fixed batch of train tasks.")
    from dreamgym_core.experiment import TESTBEDS

    p.add_argument("testbed", choices=tuple(dict.fromkeys([*LEGACY, *TESTBEDS])),
                   help="lamp | twc: the learner's own pi0; any other: an experiment testbed (its pi0, train "
                        "tasks and dev games)")
    p.add_argument("--settings", default="default,gigpo",
                   help=f"comma list of {sorted(SETTINGS)}, or 'testbed' (a registry testbed's rl)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--tasks", type=int, default=16, help="train tasks per round")
    p.add_argument("--pool", type=int, default=0,
                   help="draw each round's tasks from the first N train games (default 0: one fixed batch)")
    p.add_argument("--dev-tasks", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=None, help="episode cap (default: the testbed's, else 20)")
    p.add_argument("--params", default="", help="lamp game params, e.g. colours=3,length=2,slack=1")
    p.add_argument("--bc-steps", type=int, default=300)
    p.add_argument("--work", default="data/learner", help="where pi0 is kept")
    p.add_argument("--out", default="results/learner.csv")
    a = p.parse_args(argv)
    tb = registry_testbed(a.testbed)
    settings = {**SETTINGS, **({"testbed": dict(tb.rl)} if tb is not None else {})}
    unknown = [s for s in a.settings.split(",") if s not in settings]
    if unknown:
        p.error(f"--settings: unknown {unknown}; known: {sorted(settings)}")
    if tb is not None and a.params:
        p.error(f"--params: testbed {a.testbed} fixes its own ({tb.params!r})")
    max_steps = a.max_steps or (tb.max_steps if tb is not None else 20)
    spec = _spec(a.testbed, os.path.join(a.work, "cache"), a.params)
    for seed in (int(s) for s in a.seeds.split(",")):
        if tb is not None:  # the experiment's own pi0 stage (cached under --work like the arms' stages)
            from dreamgym_core.experiment_stages import bc_policy

            pi0 = os.path.join(bc_policy(tb, a.work, tb.pi0, seed, "pi0"), "policy")
        else:
            pi0 = start_policy(a.testbed, spec, os.path.join(a.work, f"{a.testbed}{a.params}_pi0_s{seed}"),
                               bc_steps=a.bc_steps, seed=seed)
        for name in a.settings.split(","):
            run = LearnerRun(a.testbed, name, settings[name], rounds=a.rounds, tasks=a.tasks, pool=a.pool,
                             dev_tasks=a.dev_tasks, eval_every=a.eval_every, max_steps=max_steps, seed=seed)
            append_rows(a.out, run_curve(run, pi0, spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
