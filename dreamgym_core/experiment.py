"""The experiment arms: one row of the paper's Table 1 / Table 2 per (testbed, arm, seed).

Reproduces the comparison of DreamGym Table 1 (SFT, GRPO/PPO in the real env, DreamGym,
DreamGym-S2R, each with its real-transition count) and the ablations of Table 2 (without experience
replay, without reasoning, without task generation), under the protocol of ``shared/EXPERIMENTS.md``:
every RL arm starts from the same pi0, is scored greedy on the same held-out test games, and carries
its cost. ``run_arm(testbed, arm, algorithm, seed, work) -> (row, per_game)``; the Dagster assets
(``assets/experiments.py``) make each (arm, seed) a partition.

Arms (``ARMS``; ``*_ppo`` = the same arm with algorithm ppo):
  init          pi0 itself (behaviour cloning for a few steps on a share of the demonstrations);
  sft           behaviour cloning from scratch on all offline demonstrations (the paper's SFT row);
  real_rl       GRPO in the real env from pi0, ``budget`` B real transitions (``loop.rl_in_real_env``;
                tasks drawn each round from the train pool);
  dreamgym      ``loop.run_iteration`` (M_exp with retrieval, replay buffer, curriculum) for the same
                number of updates x episodes per update as real_rl, 0 real transitions for the policy;
  s2r           dreamgym, then real-env RL with at most ``s2r_share`` x B real transitions;
  no_replay     dreamgym with an M_exp trained and run without retrieved demonstrations and no buffer;
  no_cot        dreamgym with an M_exp trained without reasoning traces in its targets;
  no_curriculum dreamgym with the curriculum off (no M_task, no synthetic task);
  s2r_explore   s2r whose real rounds act at temperature 2 (not a paper row; the loop is dreamgym's);
  shared_mexp   sampled_mexp with the sampling noise shared per task and step (``DecodeConfig.shared_noise``):
                a GRPO group meets one world, as a real task's hidden draws are fixed (not a paper row);
  sampled_mexp  dreamgym with M_exp sampling its next states (temperature 1) instead of greedy
                decoding: not a paper row; the paper's M_exp draws s', r ~ M_exp (Eq. 4), and
                greedy decoding keeps only the mode of a stochastic env's next state.
PPO arms draw group-size times GRPO's tasks per round (one episode each): the same episodes per update.

Cost columns. ``real_transitions``: real transitions the policy trained on (sft: the offline
transitions it cloned from, as the paper's SFT row counts them; pi0's own demonstrations and M_exp's
offline data are not counted, as in the paper's 0 for DreamGym). ``synthetic_transitions``: M_exp
transitions of the policy's training rollouts (the curriculum's feasibility rollouts are not trained
on and not counted). ``flops``: counted, not estimated from sizes: every forward of a Llama-type model
while the arm trains passes its rotary-embedding module once (transformers' forward and
``lean_llama`` alike), where ``FlopCounter`` reads the tokens computed (batch x positions, padding
included) and charges 6 N per token when gradients are on (forward + backward) and 2 N otherwise, N
the parameters in the model's matmuls (``matmul_params``: embedding lookup excluded, LM head
included; attention's T^2 term and the PPO value head are left out). It covers the arm's own
training (BC, rollouts, advantages, updates, M_task) and the M_exp SFT the arm uses (recorded with
that checkpoint); pi0 (shared by all) and the final evaluation are not in it. ``wall_s`` is counted
the same way (the arm's training plus its M_exp's SFT; evaluation excluded).

Departures: one M_exp per (variant, seed), trained from scratch on this testbed's offline data (the
paper fine-tunes an LLM once); the SFT arm clones from scratch rather than from an instruct model;
each DreamGym iteration is one rollout batch and one update (``loop`` docstring).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import pyarrow as pa

from dreamgym_core.experiment_stages import (MEXP_REVISION, MEXP_VARIANTS, FlopCounter, _key, _read_json, _stage_dir,
                                             _write_json, bc_policy, experience_model, locked, replay_seed)

Log = Callable[[str], None]

ARMS = ("init", "sft", "real_rl", "dreamgym", "s2r", "no_replay", "no_cot", "no_curriculum", "real_rl_ppo",
        "dreamgym_ppo", "sampled_mexp", "s2r_explore", "shared_mexp")
ROW_COLUMNS = ("testbed", "arm", "algorithm", "seed", "games", "success", "ci_low", "ci_high", "real_transitions",
               "synthetic_transitions", "wall_s", "flops", "commit")
GAME_SCHEMA = pa.schema([("game", pa.string()), ("won", pa.bool_()), ("steps", pa.int32()), ("ret", pa.float64())])


@dataclass(frozen=True)
class OfflineMix:
    """The offline real data M_exp and the SFT arm learn from (``collect.CollectConfig``)."""

    train_tasks: int = 300
    expert: int = 1
    noisy: int = 2
    random: int = 2
    epsilon: float = 0.3
    invalid_rate: float = 0.25
    max_steps: int = 30


@dataclass(frozen=True)
class PolicyRecipe:
    """A behaviour-cloned policy (``policy_init.PolicyInitConfig``): pi0, or the SFT arm."""

    bc_steps: int = 300
    demo_share: float = 1.0
    """Share of the train tasks (the first ones) whose offline episodes are cloned."""
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    vocab_size: int = 2000
    batch_size: int = 16
    lr: float = 2e-3


@dataclass(frozen=True)
class MexpRecipe:
    """M_exp SFT (Eq. 5), the same for every variant but for the switches the variant turns off."""

    steps: int = 4000
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    vocab_size: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    max_len: int = 448
    history_window: int = 2
    num_demos: int = 2
    """k of D_k for the full model (``no_replay``: 0)."""
    win_weight: float = 3.0
    invalid_weight: float = 3.0
    task_writing_examples: int = 400


@dataclass(frozen=True)
class Testbed:
    """Everything an experiment fixes: env, splits, offline data, pi0, budget, RL and loop sizes."""

    name: str
    env: str
    game: str
    params: str = ""
    offline: OfflineMix = OfflineMix()
    pi0: PolicyRecipe = PolicyRecipe()
    sft: PolicyRecipe = PolicyRecipe(bc_steps=2000)
    mexp: MexpRecipe = MexpRecipe()
    eval_split: str = "train"
    """Split of the held-out games: "train" = unseen seeds of the train fold (twc: the same objects)."""
    dev_start: int = 900
    dev_games: int = 50
    """Dev games (seeds ``dev_start``...): for choices, never for reported numbers."""
    test_start: int = 300
    test_games: int = 200
    """Test games (seeds ``test_start``...): the reported numbers only."""
    loop_dev_games: int = 0
    """Dev games the DreamGym loop scores after every iteration (a learning curve for choices; its
    real episodes and FLOPs count in the arm's cost, which real_rl does not pay: 0 = none)."""
    budget: int = 20000
    """B: real transitions of real_rl (s2r: at most ``s2r_share`` x B)."""
    s2r_share: float = 0.1
    rounds: int = 25
    """Policy updates of real_rl and of the DreamGym loop (iterations): the same for both."""
    tasks_per_round: int = 16
    group_size: int = 4
    max_steps: int = 20
    """Real episode cap (training and evaluation)."""
    sim_max_steps: int = 20
    rl: dict = field(default_factory=dict)
    """``RLConfig`` fields that differ from its defaults (``algorithm`` is the arm's)."""
    curriculum: dict = field(default_factory=dict)
    """``CurriculumConfig`` fields that differ from its defaults (``enabled`` is the arm's)."""
    smoke: bool = False
    """A test testbed: fewer held-out games are allowed."""

    def __post_init__(self) -> None:
        if not self.smoke and self.test_games < 200:
            raise ValueError(f"testbed {self.name}: test_games={self.test_games}; the protocol needs >= 200")
        dev, test = range(self.dev_start, self.dev_start + self.dev_games), \
            range(self.test_start, self.test_start + self.test_games)
        if set(dev) & set(test) or (self.eval_split == "train" and min(dev.start, test.start) < self.offline.train_tasks):
            raise ValueError(f"testbed {self.name}: dev seeds {dev.start}-{dev.stop - 1}, test seeds {test.start}-"
                             f"{test.stop - 1} and the {self.offline.train_tasks} train tasks must not overlap")
        if not 0 < self.pi0.demo_share <= 1 or not 0 <= self.s2r_share <= 1:
            raise ValueError(f"testbed {self.name}: pi0.demo_share must be in (0, 1], s2r_share in [0, 1]")
        if "algorithm" in self.rl or "enabled" in self.curriculum:
            raise ValueError(f"testbed {self.name}: the arm sets rl.algorithm and curriculum.enabled")

    def env_spec(self, work: str):
        from dreamgym_core.envs import EnvSpec

        return EnvSpec(self.env, self.game, params=self.params, cache_dir=os.path.join(work, "cache"))


_GIGPO = {"kl_coef": 0.0, "ppo_epochs": 1, "minibatch_size": 64, "step_advantage_weight": 1.0, "gamma": 0.95}
TESTBEDS = {
    # twc: held-out games are unseen seeds of the train fold (1,000 seeds; train 0-299). Dev 900-949
    # are the learner check's dev games, on which its RL settings (GiGPO weights, no KL) were
    # chosen; test 300-499 are the seeds farthest from them (`compare-policies eval=600` reached
    # down to 350: measured there, never chosen on, as far as the results log says)
    "twc": Testbed("twc", "twx", "twc", rl=_GIGPO),
    "lamp": Testbed("lamp", "lamp", "lamp", params="colours=4,length=3,slack=2", eval_split="test", dev_start=0,
                    test_start=50, offline=OfflineMix(train_tasks=200, max_steps=10), pi0=PolicyRecipe(bc_steps=10, demo_share=0.25,
                    hidden=64, vocab_size=500), sft=PolicyRecipe(bc_steps=500, hidden=64, vocab_size=500),
                    mexp=MexpRecipe(steps=4000, hidden=128, layers=2, heads=4, vocab_size=800),
                    budget=8000, max_steps=10, sim_max_steps=10, rl={**_GIGPO, "lr": 1e-3}),
    # lamp8: a harder lamp, fixed before any run (not tuned): 8 colours, 4 presses, 2 spare steps (a
    # uniform policy wins 0.0007), so M_exp must invent 3 hidden colours of 8 per episode; the rest is
    # lamp's recipe, with B sized to 25 rounds x 64 episodes of at most 6 steps. Not a second domain:
    # a second point on lamp's difficulty axis, where greedy decoding has more colours to drop
    "lamp8": Testbed("lamp8", "lamp", "lamp", params="colours=8,length=4,slack=2", eval_split="test", dev_start=0,
                     test_start=50, offline=OfflineMix(train_tasks=200, max_steps=10),
                     pi0=PolicyRecipe(bc_steps=10, demo_share=0.25, hidden=64, vocab_size=500),
                     sft=PolicyRecipe(bc_steps=500, hidden=64, vocab_size=500),
                     mexp=MexpRecipe(steps=4000, hidden=128, layers=2, heads=4, vocab_size=800),
                     budget=10000, max_steps=10, sim_max_steps=10, rl={**_GIGPO, "lr": 1e-3}),
    # mapreader: TextWorldExpress "mapreader" (take the coin from the room the task names, put it in the
    # box of the room it names; a map is in the inventory), 5 rooms at most 2 apart, no doors. Held-out
    # games are TWX's test fold (dev seeds 0-99, test 100-299); pi0 clones 100 steps on a quarter of
    # the demos; real_rl is GiGPO at lamp's lr 1e-3. Chosen on dev games with `dreamgym learner`
    # (results/learner.csv; the probes ran under the names coin, coin_ms12, map5, peck): from this pi0
    # (greedy dev 0.14, sampled train 0.59) 15 rounds x 64 episodes (13.8K real transitions) took
    # sampled train success to 0.70-0.77 and greedy dev to 0.27 (0.18 at round 5, 0.04 at round 10:
    # one seed, noisy). Measured and not chosen: coin (6 rooms with doors) greedy dev 0.34 -> 0.27
    # at lr 1e-3 (12.9K transitions) and 0.40 -> 0.39 at lr 3e-4 with 12 steps (7.7K); peckingorder
    # pi0 0.00, RL with or without the dense score stayed at 0 (the greedy policies loop on no-op
    # actions: look around, open an open door, read the book).
    # Measured on test games (results/mapreader*.csv): NO headroom greedy (init 0.180/0.195/0.350,
    # real_rl 0.145/0.180/0.155 at B = 20K); sampled (scripts/sampled_scores.py) init 0.660/0.635/0.530,
    # real_rl 0.780/0.770/0.495 (p = 0.004, 0.001, 0.51): real RL sharpens the sampled policy, not its
    # argmax. Kept as a measured negative testbed for greedy scoring, not as the second headroom testbed.
    "mapreader": Testbed("mapreader", "twx", "mapreader",
                         params="numLocations=5,maxDistanceApart=2,includeDoors=0,maxDistractorItemsPerLocation=0",
                         eval_split="test", dev_start=0, dev_games=100, test_start=100,
                         pi0=PolicyRecipe(bc_steps=100, demo_share=0.25), budget=20000, rl={**_GIGPO, "lr": 1e-3}),
    # tiny: the tests' testbed (seconds per arm on a CPU); its numbers mean nothing
    "tiny": Testbed("tiny", "lamp", "lamp", params="colours=3,length=2,slack=1", eval_split="test", test_start=2,
                    offline=OfflineMix(train_tasks=8, noisy=1, random=1, max_steps=6),
                    pi0=PolicyRecipe(bc_steps=5, demo_share=0.5, hidden=32, layers=1, vocab_size=300),
                    sft=PolicyRecipe(bc_steps=10, hidden=32, layers=1, vocab_size=300),
                    mexp=MexpRecipe(steps=10, hidden=32, layers=1, heads=4, vocab_size=400, batch_size=4,
                                    task_writing_examples=8),
                    dev_start=0, dev_games=2, test_games=8, budget=40, rounds=2, tasks_per_round=3, group_size=2, max_steps=4,
                    sim_max_steps=3, rl={"lr": 1e-3, "kl_coef": 0.0, "minibatch_size": 16},
                    curriculum={"variants_per_seed": 1, "n_feasibility_rollouts": 2}, smoke=True),
}


# lamp8b: lamp8 with 3 presses and 4 spare steps (a uniform policy wins about 0.04); measured on dev
# games with `dreamgym learner lamp8b`: real RL did not learn it either (docs/experiments.md)
TESTBEDS["lamp8b"] = replace(TESTBEDS["lamp8"], name="lamp8b", params="colours=8,length=3,slack=4")
# lamp_long: lamp with 50 updates instead of 25 (twice the synthetic experience; real_rl's budget B
# is spent by round 25 either way): does a longer DreamGym loop learn the colour the short one missed?
# Its stage dirs are lamp's (the same offline data, M_exp and pi0 keys) when linked, as in
# docs/experiments.md
TESTBEDS["lamp_long"] = replace(TESTBEDS["lamp"], name="lamp_long", rounds=50)
# twc1: twc with one room and two items, pi0 100 BC steps on a quarter of the demos (dev 0.33); on dev
# games (`dreamgym learner twc1 --settings testbed,gigpo_lr3e-4 --pool 300`) real RL did not lift it
# (0.33 -> 0.32 at lr 1e-4, -> 0.14 at lr 3e-4): not a headroom testbed
TESTBEDS["twc1"] = Testbed("twc1", "twx", "twc", params="numLocations=1,numItemsToPutAway=2,includeDoors=0",
                           dev_games=100, max_steps=15, sim_max_steps=15,
                           pi0=PolicyRecipe(bc_steps=100, demo_share=0.25), budget=20000, rl=dict(_GIGPO))
# lamp_redraw: lamp whose colours behind the first are drawn afresh at every reset, as M_exp invents
# them: real-env RL on it tests whether a GRPO group that does not share its task's sequence learns
# lamp as reliably (docs/experiments.md); a learner-check testbed, dev games only
TESTBEDS["lamp_redraw"] = replace(TESTBEDS["lamp"], name="lamp_redraw", params="colours=4,length=3,slack=2,redraw=1")
# lamp_demo: lamp with a shorter M_exp SFT, the evidence row of `make demo` (init and dreamgym, one
# seed, in a few minutes); its numbers are a demo's, the lamp rows are the measurement
TESTBEDS["lamp_demo"] = replace(TESTBEDS["lamp"], name="lamp_demo", mexp=replace(TESTBEDS["lamp"].mexp, steps=1500))


def get_testbed(name: str) -> Testbed:
    if name not in TESTBEDS:
        raise ValueError(f"unknown testbed {name!r}; known: {', '.join(TESTBEDS)}")
    return TESTBEDS[name]


def split_arm(name: str) -> tuple[str, str]:
    """A partition's arm name -> (arm, algorithm): "real_rl_ppo" -> ("real_rl", "ppo")."""
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; known: {', '.join(ARMS)}")
    if name.endswith("_ppo"):
        return name.removesuffix("_ppo"), "ppo"
    return name, "none" if name in ("init", "sft") else "grpo"


@dataclass(frozen=True)
class ArmPlan:
    """What one arm passes to the core: the configs of its training (None where it has none)."""

    arm: str
    algorithm: str
    kind: str
    """init | bc | real | dreamgym."""
    rl: object = None
    """``RLConfig``."""
    loop: object = None
    """``loop.LoopConfig`` of the DreamGym iterations (real-env RL uses its sizes too)."""
    curriculum: object = None
    """``CurriculumConfig``."""
    mexp_variant: str = ""
    """full | no_replay | no_cot: which M_exp (``MEXP_VARIANTS``; its no_side_channels is for measurements)."""
    replay: bool = False
    """The loop grows a replay buffer and M_exp retrieves from it."""
    real_temperature: float = 0.0
    """Acting temperature of s2r's real rounds (0: the RL config's). ``s2r_explore`` 2.0: a policy that
    leaves M_exp nearly deterministic makes groups of real episodes that end alike (no advantage)."""
    sim_decoding: tuple = ()
    """(field, value) pairs of M_exp's ``DecodeConfig`` in the loop that differ from its default
    (greedy): ``sampled_mexp`` samples M_exp's next states at temperature 1. Greedy decoding turns a
    stochastic env's next-state distribution into its mode (lamp's hidden next colour), and a
    policy trained in it never meets the states the mode leaves out."""
    real_budget: int = 0
    rounds: int = 0


def plan(tb: Testbed, arm: str, algorithm: str, seed: int = 0) -> ArmPlan:
    """The configs of ``arm`` on ``tb``; a bad name raises a one-line error naming it."""
    from dreamgym_core.curriculum import CurriculumConfig
    from dreamgym_core.loop import LoopConfig
    from dreamgym_core.rl.trainer import RLConfig

    name = arm if algorithm in ("none", "grpo") else f"{arm}_{algorithm}"
    if split_arm(name) != (arm, algorithm):
        raise ValueError(f"unknown arm/algorithm {arm!r}/{algorithm!r}; known arms: {', '.join(ARMS)}")
    if arm == "init":
        return ArmPlan(arm, algorithm, "init")
    if arm == "sft":
        return ArmPlan(arm, algorithm, "bc")
    overrides = dict(tb.rl)
    if algorithm == "ppo":
        overrides.pop("step_advantage_weight", None)  # GiGPO's step-level credit is a GRPO term
    rl = RLConfig(**{**overrides, "algorithm": algorithm, "seed": seed})
    # PPO rolls one episode per task (no group): it draws tasks x group size tasks, so that PPO and
    # GRPO train on the same number of episodes per update (with tasks alone PPO saw a quarter of
    # GRPO's data, and on lamp stayed at init within 25 rounds where it reaches 1.0 with as many)
    tasks = tb.tasks_per_round * (tb.group_size if algorithm == "ppo" else 1)
    loop = LoopConfig(tasks_per_iteration=tasks, group_size=tb.group_size, max_steps=tb.sim_max_steps,
                      eval_max_steps=tb.max_steps, eval_tasks=tb.loop_dev_games,
                      sim_eval_tasks=min(tb.loop_dev_games, 25),
                      seed=seed)
    if arm == "real_rl":
        return ArmPlan(arm, algorithm, "real", rl=rl, loop=loop, real_budget=tb.budget, rounds=tb.rounds)
    cur = CurriculumConfig(**{**tb.curriculum, "enabled": arm != "no_curriculum", "seed": seed})
    variant = arm if arm in MEXP_VARIANTS else "full"
    return ArmPlan(arm, algorithm, "dreamgym", rl=rl, loop=loop, curriculum=cur, mexp_variant=variant,
                   replay=arm != "no_replay",
                   real_budget=int(tb.s2r_share * tb.budget) if arm in ("s2r", "s2r_explore") else 0,
                   rounds=tb.rounds, sim_decoding={"sampled_mexp": (("greedy", False),),
                                 "shared_mexp": (("greedy", False), ("shared_noise", True))}.get(arm, ()),
                   real_temperature=2.0 if arm == "s2r_explore" else 0.0)


# --------------------------------------------------------------------------------------------
# The arms

def splits(tb: Testbed, work: str):
    """(train tasks, dev games, test games), disjoint (checked)."""
    from dreamgym_core.envs import make_env

    env = make_env(tb.env_spec(work))
    try:
        train = env.tasks("train", tb.offline.train_tasks)
        dev = env.tasks(tb.eval_split, tb.dev_games, start=tb.dev_start)
        test = env.tasks(tb.eval_split, tb.test_games, start=tb.test_start)
    finally:
        env.close()
    if {t.task_id for t in train} & {t.task_id for t in dev + test}:
        raise ValueError(f"testbed {tb.name}: held-out games overlap the train tasks")
    return train, dev, test


def _real_envs(tb: Testbed, work: str):
    from dreamgym_core.envs import SerialBatchEnv, make_env

    spec = tb.env_spec(work)
    return lambda: SerialBatchEnv(lambda: make_env(spec), max_engines=8)


def _trainer(start_dir: str, ref_dir: str, rl):
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.rl.trainer import PolicyTrainer

    ref = load_checkpoint(ref_dir, training=True)[0] if rl.kl_coef > 0 else None
    if os.path.exists(os.path.join(start_dir, "trainer.json")):
        return PolicyTrainer.load(start_dir, rl, ref_model=ref)
    model, tok, _ = load_checkpoint(start_dir, training=True)
    return PolicyTrainer(model, tok, rl, ref_model=ref)


def real_rl(tb: Testbed, work: str, p: ArmPlan, start_dir: str, ref_dir: str, out_dir: str, budget: int, train,
            log: Log) -> dict:
    """``loop.rl_in_real_env`` from ``start_dir`` with an exact real budget; the trainer saved at ``out_dir``
    with ``real.json``: the budget record and its counted FLOPs and wall seconds."""
    from dreamgym_core.loop import rl_in_real_env

    if os.path.exists(os.path.join(out_dir, "real.json")):
        return _read_json(os.path.join(out_dir, "real.json"))
    counter, started = FlopCounter(), time.perf_counter()
    with counter:
        trainer = _trainer(start_dir, ref_dir, p.rl)
        rec = rl_in_real_env(trainer, _real_envs(tb, work), train, p.loop, budget=budget, rounds=p.rounds,
                             name=f"{p.arm}-{p.algorithm}", log=log)
    rec = {**rec, "flops": counter.flops, "wall_s": time.perf_counter() - started}
    if rec["real_transitions"] > budget:  # rollout() caps episodes by what is left: this never happens
        raise RuntimeError(f"{p.arm}: {rec['real_transitions']} real transitions over the budget {budget}")
    trainer.save(out_dir)
    _write_json(os.path.join(out_dir, "real.json"), rec)
    return rec


def dreamgym_loop(tb: Testbed, work: str, p: ArmPlan, mexp_dir: str, pi0_dir: str, root: str, train, dev,
                  log: Log) -> tuple[str, dict]:
    """``p.rounds`` DreamGym iterations (``loop.run_iteration``, each resumable stage by stage) from pi0
    in the M_exp at ``mexp_dir`` -> (last policy directory, cost: synthetic transitions trained on,
    FLOPs, wall seconds). Each iteration's cost is kept beside its stages, so a loop that s2r shares
    with dreamgym is charged to both; an iteration killed midway counts only its re-run stages."""
    from dreamgym_core.curriculum import TaskWriter
    from dreamgym_core.envs import make_env
    from dreamgym_core.experience.retrieval import Retriever
    from dreamgym_core.experience_model import ExperienceModel, PromptConfig, SimConfig, knowledge_from_meta
    from dreamgym_core.loop import IterationInputs, StageStore, run_iteration
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.schema import tasks_from_arrow

    model, tok, meta = load_checkpoint(os.path.join(mexp_dir, "final"))
    prompt, knowledge = PromptConfig.from_meta(meta), knowledge_from_meta(meta)
    env = make_env(tb.env_spec(work))
    try:
        propose = env.propose_candidates
        starts = {t.task_id: env.reset(t).state for t in train + dev}  # a reset is not a transition
    finally:
        env.close()
    buffer = replay_seed(tb, os.path.join(root, "lancedb"), work, log) if p.replay else None
    pool, prev, cost = list(train), pi0_dir, {"synthetic": 0, "flops": 0, "wall_s": 0.0}
    for k in range(1, p.rounds + 1):
        retrieve = Retriever(buffer, iteration=k) if buffer is not None and prompt.num_demos else None

        def make_sim(initial_state, retrieve=retrieve):
            return ExperienceModel(model, tok, initial_state=initial_state, propose_candidates=propose,
                                   retrieve=retrieve, cfg=SimConfig(prompt=prompt, **dict(p.sim_decoding)),
                                   knowledge=knowledge)

        writer = TaskWriter(model, tok, seed=p.loop.seed * 1000 + k, pointers=prompt.pointers) \
            if p.curriculum.enabled else None
        inp = IterationInputs(k=k, prev_policy_dir=prev, ref_policy_dir=pi0_dir, pool=pool, original=list(train),
                              start_states=starts, eval_tasks=dev, make_sim=make_sim, make_real=_real_envs(tb, work),
                              task_writer=writer, buffer=buffer,
                              embed=buffer.embedder.encode if buffer is not None else None)
        store, counter, started = StageStore(os.path.join(root, f"{k:03d}")), FlopCounter(), time.perf_counter()
        with counter:
            out = run_iteration(inp, p.loop, p.rl, p.curriculum, store, log=log)
        pool, prev = tasks_from_arrow(out.task_pool), out.policy_dir
        done = store.record("cost") or store.put_record("cost", {
            "synthetic": out.rollouts.num_rows, "flops": counter.flops, "wall_s": time.perf_counter() - started})
        cost = {name: cost[name] + done[name] for name in cost}
    return prev, cost


def evaluate_games(tb: Testbed, work: str, policy_dir: str, test, name: str, seed: int) -> pa.Table:
    """Greedy episodes on the test games -> one row per game (``GAME_SCHEMA``)."""
    from dreamgym_core.evaluation import evaluate, lm_policy_factory
    from dreamgym_core.loop import LoopConfig
    from dreamgym_core.models import load_checkpoint

    model, tok, _ = load_checkpoint(policy_dir)
    episodes: dict = {}
    cfg = LoopConfig(eval_tasks=len(test), sim_eval_tasks=0, eval_max_steps=tb.max_steps, seed=seed)
    evaluate(lm_policy_factory(model, tok, name), name, 0, test, _real_envs(tb, work), None, None, cfg,
             real_transitions=0, episodes=episodes, log=lambda _: None)
    games = sorted(episodes["greedy"], key=lambda t: t.task.task_id)
    return pa.Table.from_pylist([{"game": t.task.task_id, "won": bool(t.won), "steps": len(t.steps),
                                  "ret": float(t.ret)} for t in games], schema=GAME_SCHEMA)


def code_commit() -> str:
    """``git rev-parse HEAD`` of this code (``+dirty`` with uncommitted changes; "" outside git)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def arm_dir(tb: Testbed, arm: str, algorithm: str, seed: int, work: str) -> str:
    p = plan(tb, arm, algorithm, seed)
    # keyed by the plan too (the configs the arm hands the core): a changed rule in ``plan`` (PPO's
    # tasks per round) must not find the arm of the old rule finished
    return _stage_dir(work, tb, f"arm-{arm}-{algorithm}-s{seed}",
                      _key(tb, arm, algorithm, seed, p, *([MEXP_REVISION] if p.kind == "dreamgym" else [])))


def arm_done(tb: Testbed, arm: str, algorithm: str, seed: int, work: str) -> bool:
    return os.path.exists(os.path.join(arm_dir(tb, arm, algorithm, seed, work), "row.json"))


def load_arm(out: str) -> tuple[dict, pa.Table]:
    from dreamgym_core.io import read_parquet

    return _read_json(os.path.join(out, "row.json")), read_parquet(os.path.join(out, "per_game.parquet"))


def run_arm(tb: Testbed, arm: str, algorithm: str, seed: int, work: str,
            log: Log = print) -> tuple[dict, pa.Table]:
    """One partition: train ``arm`` from pi0 (seed ``seed``), score it greedy on the test games.
    Returns (row with ``ROW_COLUMNS``, per-game outcomes); a finished partition is loaded, not re-run,
    and an unfinished one resumes from its last finished stage."""
    import torch

    from dreamgym_core.evaluation import wilson_interval
    from dreamgym_core.io import write_parquet_atomic

    p = plan(tb, arm, algorithm, seed)
    out = arm_dir(tb, arm, algorithm, seed, work)
    if os.path.exists(os.path.join(out, "row.json")):
        log(f"{tb.name}/{arm}/{algorithm}/seed {seed}: finished in {out}, skipped")
        return load_arm(out)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    train, dev, test = splits(tb, work)
    pi0 = bc_policy(tb, work, tb.pi0, seed, "pi0", log)
    pi0_dir = os.path.join(pi0, "policy")
    # every training stage records its own cost (FLOPs, wall seconds) beside its result, so a
    # partition resumed after a kill, or one reusing a stage another partition built, still counts it
    costs, real, synthetic = [], 0, 0
    match p.kind:
        case "init":
            policy_dir = pi0_dir
        case "bc":
            sft = bc_policy(tb, work, tb.sft, seed, "sft", log)
            policy_dir, cost = os.path.join(sft, "policy"), _read_json(os.path.join(sft, "cost.json"))
            costs.append(cost)
            real = cost["real_transitions"]
        case "real":
            rec = real_rl(tb, work, p, pi0_dir, pi0_dir, os.path.join(out, "policy"), p.real_budget, train, log)
            policy_dir, real = os.path.join(out, "policy"), rec["real_transitions"]
            costs.append(rec)
        case "dreamgym":
            mexp = experience_model(tb, work, p.mexp_variant, seed, log)
            costs.append(_read_json(os.path.join(mexp, "cost.json")))
            # the loop is shared by the arms that configure it alike (dreamgym and s2r)
            root = _stage_dir(work, tb, f"loop-{p.mexp_variant}-{algorithm}-s{seed}",
                              _key(tb, p.rl, p.loop, p.curriculum, p.mexp_variant, p.replay, seed,
                                   MEXP_REVISION, *([p.sim_decoding] if p.sim_decoding else [])))
            with locked(root):  # one process at a time grows a loop's stages and buffer
                policy_dir, loop = dreamgym_loop(tb, work, p, mexp, pi0_dir, root, train, dev, log)
            costs.append(loop)
            synthetic = loop["synthetic"]
            if p.real_budget:
                if p.real_temperature:  # the loop above kept the RL config's; only the real rounds change
                    p = replace(p, rl=replace(p.rl, temperature=p.real_temperature))
                rec = real_rl(tb, work, p, policy_dir, pi0_dir, os.path.join(out, "policy"), p.real_budget, train,
                              log)
                policy_dir, real = os.path.join(out, "policy"), rec["real_transitions"]
                costs.append(rec)
    flops, wall = sum(c["flops"] for c in costs), sum(c["wall_s"] for c in costs)
    games = evaluate_games(tb, work, policy_dir, test, f"{arm}-{algorithm}", seed)
    wins = sum(games["won"].to_pylist())
    lo, hi = wilson_interval(wins, games.num_rows)
    row = {"testbed": tb.name, "arm": arm, "algorithm": algorithm, "seed": seed, "games": games.num_rows,
           "success": round(wins / max(games.num_rows, 1), 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
           "real_transitions": int(real), "synthetic_transitions": int(synthetic), "wall_s": round(wall, 1),
           "flops": int(flops), "commit": code_commit()}
    write_parquet_atomic(games, os.path.join(out, "per_game.parquet"))
    _write_json(os.path.join(out, "row.json"), row)  # last: the partition is finished once this exists
    log(f"{tb.name}/{arm}/{algorithm}/seed {seed}: success {row['success']:.3f} [{lo:.2f}, {hi:.2f}] on "
        f"{row['games']} test games, {real} real + {synthetic} synthetic transitions, {row['wall_s']:.0f} s, "
        f"{row['flops']:.3g} FLOPs")
    return row, games
