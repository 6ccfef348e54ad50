"""The curriculum reaches the policy, through ``loop.run_iteration`` with a tiny real policy.

Iteration 1 rolls out the original tasks, M_task (a scripted writer: what it writes is not under
test here) proposes variants and the filter keeps some; iteration 2 must roll the kept variants out
at share lambda, must not with the curriculum switched off, and each iteration's update must change
the policy's weights.
"""

import pytest
import torch

from dreamgym_core.curriculum import CurriculumConfig, object_catalogue
from dreamgym_core.envs import Observation, StepResult
from dreamgym_core.loop import IterationInputs, LoopConfig, StageStore, read_tasks, read_trajectories, run_iteration
from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, load_checkpoint, save_checkpoint, train_tokenizer
from dreamgym_core.policy import PolicyFormat, set_policy_format
from dreamgym_core.rl.trainer import RLConfig
from dreamgym_core.schema import Task
from dreamgym_core.state import AbstractState

FURNITURE = ["bed: empty", "wardrobe (closed)"]
ITEMS = ["red hat", "long coat", "wool sock", "silk scarf", "blue shirt", "grey glove"]


def _room(items):
    return AbstractState.make("You are in the bedroom.", "bedroom", FURNITURE + list(items)).render()


# more originals than a batch holds: drawn as one urn, a variant would reach the batch 1 time in 5
ORIGINAL = [Task(f"t/{i:02d}", "twx", "twc", "train", i, "Put things away.") for i in range(30)]
STARTS = {t.task_id: _room([ITEMS[i % len(ITEMS)]]) for i, t in enumerate(ORIGINAL)}
EVAL = [Task(f"e/{i}", "twx", "twc", "test", 100 + i, "Put things away.") for i in range(2)]
STARTS.update({t.task_id: _room([ITEMS[0], ITEMS[1]]) for t in EVAL})


class GoEnv:
    """BatchEnv over any start state: two "x" win, "y" loses (a sampled policy gets mixed outcomes)."""

    name = "go"

    def __init__(self, initial_state):
        self.initial_state = initial_state

    def reset_batch(self, tasks):
        self.t, self.live = [0] * len(tasks), [True] * len(tasks)
        self.states = [self.initial_state(t) for t in tasks]
        return [Observation(s, ("x", "y")) for s in self.states]

    def step_batch(self, actions):
        out = []
        for i, a in enumerate(actions):
            if a is None or not self.live[i]:
                out.append(None)
                continue
            self.t[i] += 1
            won, lost = a == "x" and self.t[i] >= 2, a == "y"
            self.live[i] = not (won or lost)
            out.append(StepResult(Observation(self.states[i], ("x", "y")), float(won), 0.0, won or lost, won,
                                  lost, True))
        return out

    def close(self):
        pass


class ScriptedWriter:
    """M_task stand-in: every proposal points at all loose items of its prompt's catalogue."""

    pointers = True

    def __init__(self):
        self.calls = []

    def write(self, prompts, catalogues):
        self.calls.append(len(prompts))
        out = []
        for cat in catalogues:
            ptrs = " | ".join(f"@{i}" for i, o in enumerate(cat, 1) if o in ITEMS)
            out.append(f"<think>more items</think>\ninstruction: Put things away.\nfeedback: x\nlocation: bedroom\n"
                       f"objects: {ptrs}\n")
        return out


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    lines = [f"Task: Put things away.\n{s}\nAction: {a}\n" for s in STARTS.values() for a in ("x", "y")]
    tok = train_tokenizer(lines * 5, str(root / "tok"), vocab_size=300, min_frequency=1)
    model = build_tiny_llama(tok, TinyLlamaConfig(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64,
                                                  max_positions=512), seed=0)
    set_policy_format(model, PolicyFormat(history_window=2, max_prompt_tokens=256))
    return save_checkpoint(model, tok, str(root / "policy"), {"kind": "policy"})


CFG = LoopConfig(tasks_per_iteration=6, group_size=4, max_steps=4, rollout_batch=16, eval_tasks=2,
                 sim_eval_tasks=0, eval_max_steps=4, seed=0)
RL = RLConfig(algorithm="grpo", lr=1e-2, minibatch_size=16, ppo_epochs=1)


def _iteration(k, prev_dir, sft_dir, pool, root, cur_cfg, writer=None):
    make_sim = lambda init: GoEnv(init)  # noqa: E731
    inp = IterationInputs(k=k, prev_policy_dir=prev_dir, ref_policy_dir=sft_dir, pool=pool, original=ORIGINAL,
                          start_states=STARTS, eval_tasks=EVAL, make_sim=make_sim,
                          make_real=lambda: GoEnv(lambda t: STARTS[t.task_id]), task_writer=writer)
    return run_iteration(inp, CFG, RL, cur_cfg, StageStore(str(root / f"{k:03d}")), log=lambda m: None)


@pytest.fixture(scope="module")
def two_iterations(sft_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    cur_cfg = CurriculumConfig(lam=0.3, top_m=4, variants_per_seed=1, n_feasibility_rollouts=3)
    writer = ScriptedWriter()
    out1 = _iteration(1, sft_dir, sft_dir, ORIGINAL, root, cur_cfg, writer)
    out2 = _iteration(2, out1.policy_dir, sft_dir, read_tasks(out1.task_pool), root, cur_cfg, writer)
    return out1, out2, writer


def test_a_variant_kept_in_iteration_k_is_rolled_out_in_k_plus_1(two_iterations):
    out1, out2, writer = two_iterations
    assert writer.calls and writer.calls[0] >= 1                 # the seeds reached M_task
    kept = read_tasks(out1.synthesized_tasks)
    # every proposal names the same state (all the room's items): one kept, the others duplicates
    assert len(kept) == 1 and kept[0].source == "synthetic" and kept[0].iteration == 1
    rolled1 = {t.task.task_id for t in read_trajectories(out1.rollouts)}
    rolled2 = {t.task.task_id for t in read_trajectories(out2.rollouts)}
    assert not any(i.startswith("syn/") for i in rolled1)            # nothing synthetic existed yet
    assert kept[0].task_id in rolled2                                 # the kept variant, the next iteration
    syn2 = [t for t in read_trajectories(out2.rollouts) if t.task.source == "synthetic"]
    assert all(t.steps[0].state == t.task.initial_state for t in syn2)  # from the variant's own start state
    # lambda = 0.3 of 6 tasks: floor(1.8) = 1 place, the other 5 originals
    assert len({t.task.task_id for t in syn2}) == 1 and len(rolled2) == 6
    stats = out2.records["rollouts"]
    assert stats["curriculum/synthetic_tasks"] == len({t.task.task_id for t in syn2})
    assert stats["curriculum/synthetic_episodes"] == len(syn2)
    # every proposal has a row with its fate; the kept ones name their task
    props = out1.task_proposals.to_pylist()
    assert len(props) == out1.records["synthesis"]["proposals"] and props
    assert {r["task_id"] for r in props if r["kept"]} == {t.task_id for t in kept}
    assert all(r["reason"] == "" if r["kept"] else r["reason"] for r in props)


def _weights(path):
    model, _, _ = load_checkpoint(path)
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_policy_k_differs_from_k_minus_1(two_iterations, sft_dir):
    out1, out2, _ = two_iterations
    w0, w1, w2 = _weights(sft_dir), _weights(out1.policy_dir), _weights(out2.policy_dir)
    for before, after in [(w0, w1), (w1, w2)]:
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[n], after[n]) for n in before)
    assert out2.records["policy"]["parent"] == out1.policy_dir


def test_curriculum_off_rolls_out_no_synthetic_task(two_iterations, sft_dir, tmp_path):
    out1, _, _ = two_iterations
    pool = read_tasks(out1.task_pool)
    assert any(t.source == "synthetic" for t in pool)        # the pool offers some: the switch must refuse them
    writer = ScriptedWriter()
    off = _iteration(2, out1.policy_dir, sft_dir, pool, tmp_path, CurriculumConfig(enabled=False), writer)
    rolled = read_trajectories(off.rollouts)
    assert rolled and not any(t.task.source == "synthetic" for t in rolled)
    assert writer.calls == [] and off.synthesized_tasks.num_rows == 0 and off.task_proposals.num_rows == 0
    assert not any(t.source == "synthetic" for t in read_tasks(off.task_pool))
    assert off.records["rollouts"]["curriculum/synthetic_tasks"] == 0
