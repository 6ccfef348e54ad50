"""Retrieval of D_k (Eq. 4-5) from the replay buffer into M_exp's prompts, the switches, and the
co-evolving buffer (informativeness filter, pruning under a cap, SQL export)."""

import numpy as np
import pyarrow as pa
import pytest

from dreamgym_core.buffer import ReplayBuffer
from dreamgym_core.buffer_rows import buffer_text
from dreamgym_core.embed import HashingEmbedder
from dreamgym_core.experience.prompt import PromptConfig, Query
from dreamgym_core.experience.retrieval import Retriever
from dreamgym_core.experience.sft import sft_examples
from dreamgym_core.experience.simulator import SimConfig
from dreamgym_core.schema import Task
from tests.test_experience_model import ROWS, S0, S1, S2, Scripted, _target, row


def _rows(task: str, traj: str, won: bool = False):
    """Two steps of one trajectory of ``task`` (the same states in every task: only task ids differ)."""
    return [{**r, "task_id": task, "env": "twx", "traj_id": traj} for r in
            [row(traj, 0, S0, "take apple", S1), row(traj, 1, S1, "put apple in fridge", S2, 1.0 if won else 0.0, won)]]


class CountingEmbedder(HashingEmbedder):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        return super().encode(texts)


@pytest.fixture
def buf(tmp_path):
    b = ReplayBuffer(str(tmp_path / "db"), CountingEmbedder())
    b.add(pa.Table.from_pylist(_rows("t/a", "a1") + _rows("t/b", "b1") + _rows("t/c", "c1")), "offline", 0)
    return b


def _plain_top_k(b: ReplayBuffer, state: str, action: str, k: int, exclude: str | None):
    """Reference: a plain loop over every stored row, cosine by hand, the excluded task skipped."""
    q = b.embedder.encode([buffer_text(state, action)])[0]
    scored = []
    for r in b.scan(["task_id", "traj_id", "step_idx", "source", "iteration", "vector"]).to_pylist():
        if r["task_id"] != exclude:
            scored.append((-float(np.dot(q, np.asarray(r["vector"]))), r["traj_id"], r["step_idx"]))
    return [(t, s) for _, t, s in sorted(scored)[:k]]


def test_retrieval_is_batched_and_excludes_the_queries_own_task(buf, monkeypatch):
    searches = []
    real = buf.search_vectors
    monkeypatch.setattr(buf, "search_vectors", lambda *a, **k: searches.append(1) or real(*a, **k))
    r = Retriever(buf, exclude_own_task=True)
    queries = [Query("t/a", S0, "take apple"), Query("t/b", S1, "put apple in fridge"), Query("t/x", S0, "take apple")]
    before = buf.embedder.calls
    got = r(queries, 2)
    assert buf.embedder.calls - before == 1 and len(searches) == 1  # one embedding call, one vector query
    assert [d["task_id"] for d in got[0]] and all(d["task_id"] != "t/a" for d in got[0])
    assert all(d["task_id"] != "t/b" for d in got[1])
    for q, demos in zip(queries, got):
        want = _plain_top_k(buf, q.state, q.action, 2, q.task_id)
        assert [(d["state"], d["action"]) for d in demos] == [
            (S0 if s == 0 else S1, "take apple" if s == 0 else "put apple in fridge") for _, s in want]
    # without the exclusion the own task's identical step is among the best (similarity 1)
    own = Retriever(buf)([Query("t/a", S0, "take apple")], 3)[0]
    assert "t/a" in {d["task_id"] for d in own} and own[0]["similarity"] == pytest.approx(1.0)


def test_iteration_k_retrieves_the_buffer_as_it_stood_at_its_start(buf):
    buf.tag_iteration(1)
    r = Retriever(buf, iteration=1)
    before = r([Query("q", S0, "take apple")], 10)[0]
    buf.add(pa.Table.from_pylist(_rows("t/d", "d1")), "synthetic", 1)  # written during iteration 1
    after = r([Query("q", S0, "take apple")], 10)[0]
    assert before == after and "t/d" not in {d["task_id"] for d in after}
    buf.tag_iteration(2)
    assert "t/d" in {d["task_id"] for d in Retriever(buf, iteration=2)([Query("q", S0, "take apple")], 10)[0]}


def _sft_rows():
    return [{**r, "task_id": f"t/{r['traj_id']}", "env": "twx"} for r in ROWS]


def test_sft_prompts_hold_demos_from_other_tasks_and_none_with_replay_off(tmp_path):
    b = ReplayBuffer(str(tmp_path / "db"), HashingEmbedder())
    rows = _sft_rows()
    b.add(pa.Table.from_pylist(rows), "offline", 0)
    seen = []

    class Spy(Retriever):
        def __call__(self, queries, k):
            out = super().__call__(queries, k)
            seen.append((list(queries), out))
            return out

    on = sft_examples(rows, PromptConfig(num_demos=2), Spy(b, exclude_own_task=True))
    assert len(seen) == 1  # one retrieval call for the whole pass
    assert any("## examples" in e.prompt for e in on)
    for q, demos in zip(*seen[0]):
        assert all(d["task_id"] != q.task_id for d in demos)  # never the example's own task
    a_take = on[0].prompt  # trajectory A's first step: only B is another task, so its demo is "take zebra"
    assert "> take zebra" in a_take and "> take apple\n" not in a_take.split("## history")[0].split("## state")[0]
    off = sft_examples(rows, PromptConfig(num_demos=0), Spy(b, exclude_own_task=True))
    assert not any("## examples" in e.prompt for e in off) and len(seen) == 1  # replay off: not even asked
    none = sft_examples(rows, PromptConfig(num_demos=2), None)
    assert not any("## examples" in e.prompt for e in none)
    # a retriever filtered to nothing (iteration=0 reads rows of iterations before 0) is an error, not an
    # M_exp silently trained without the D_k it will meet in simulation
    b.tag_iteration(0)
    with pytest.raises(ValueError, match="no demonstration for any of"):
        sft_examples(rows, PromptConfig(num_demos=2), Retriever(b, iteration=0, exclude_own_task=True))


def test_use_cot_false_leaves_no_reasoning_in_targets():
    rows = _sft_rows()
    with_cot = sft_examples(rows, PromptConfig())
    without = sft_examples(rows, PromptConfig(use_cot=False))
    assert all("because" in e.reasoning for e in with_cot)
    assert all(e.reasoning in ("", "<think></think>\n") for e in without)
    assert all("because" not in e.reasoning + e.prediction for e in without)
    assert [e.prediction for e in with_cot] == [e.prediction for e in without]


def test_simulation_prompts_hold_demos_with_one_retrieval_per_batch_step(buf):
    calls = []

    class Spy(Retriever):
        def __call__(self, queries, k):
            calls.append(len(queries))
            return super().__call__(queries, k)

    take = _target(S0, S1, "take apple", valid=True, reward=0.0, done=False, progress=0, next_progress=50)

    class Recording(Scripted):
        def _generate_chunk(self, prompts):
            self.prompts = list(prompts)
            return super()._generate_chunk(prompts)

    tasks = [Task("t/a", "twx", "twc", "train", 0, "tidy up"), Task("t/z", "twx", "twc", "train", 1, "tidy up")]
    sim = Recording([take, take], retrieve=Spy(buf), cfg=SimConfig(prompt=PromptConfig(num_demos=2)))
    sim.reset_batch(tasks)
    sim.step_batch(["take apple", "take apple"])
    assert calls == [2] and all("## examples" in p for p in sim.prompts) and sim.stats.prompts_with_demos == 2
    for retrieve, k in ((None, 2), (Spy(buf), 0)):  # replay off: no retriever, or no demos in the prompt config
        off = Recording([take, take], retrieve=retrieve, cfg=SimConfig(prompt=PromptConfig(num_demos=k)))
        off.reset_batch(tasks)
        off.step_batch(["take apple", "take apple"])
        assert not any("## examples" in p for p in off.prompts) and off.stats.prompts_with_demos == 0
    assert calls == [2]


def _rollouts(groups: dict[str, list[bool]], k: int = 1) -> pa.Table:
    rows = []
    for task, outcomes in groups.items():
        for j, won in enumerate(outcomes):
            rows += [{**r, "source": "synthetic", "iteration": k}
                     for r in _rows(task, f"{task}-{k}-{j}", won)]
    return pa.Table.from_pylist(rows)


def test_informative_keeps_only_groups_with_mixed_outcomes():
    from dreamgym_core.replay import informative

    t = _rollouts({"mixed": [True, False], "all_won": [True, True], "all_lost": [False, False, False]})
    kept = informative(t)
    assert set(kept["task_id"].to_pylist()) == {"mixed"} and kept.num_rows == 4
    # reference: a plain loop over trajectories
    by_task = {}
    for r in t.to_pylist():
        by_task.setdefault(r["task_id"], {}).setdefault(r["traj_id"], False)
        by_task[r["task_id"]][r["traj_id"]] |= r["won"]
    assert {task for task, trajs in by_task.items() if len(set(trajs.values())) == 2} == {"mixed"}


def test_grow_buffer_filters_prunes_under_the_cap_and_exports_for_sql(buf, tmp_path):
    from dreamgym_core.replay import grow_buffer
    from dreamgym_core.sql import query

    offline = buf.rows_by_source()["offline"]
    rec = grow_buffer(buf, _rollouts({"m": [True, False], "w": [True, True]}, 1), 1, cap=100)
    assert rec["added"] == 4 and rec["filtered"] == 4 and rec["size"] == offline + rec["synthetic_rows"]
    # every (state, action) of m's second trajectory duplicates its first: near-duplicate pruning drops it
    assert rec["pruned"] == 2 and rec["synthetic_rows"] == 2
    groups = {f"t{i}": [True, False] for i in range(6)}
    rollouts = _rollouts(groups, 2)
    rollouts = rollouts.set_column(rollouts.schema.get_field_index("state"), "state",  # distinct states per task
                                   pa.array([f"{s}\n{t}" for s, t in zip(rollouts["state"].to_pylist(),
                                                                        rollouts["traj_id"].to_pylist())]))
    export = str(tmp_path / "data" / "parquet" / "replay_buffer_rows" / "002.parquet")
    rec = grow_buffer(buf, rollouts, 2, cap=12, export=export)
    assert rec["synthetic_rows"] <= 12 and rec["pruned"] > 0
    assert buf.rows_by_source()["offline"] == offline  # real rows are never pruned
    got = query(str(tmp_path / "data"), "select source, count(*) from replay_buffer_rows group by 1 order by 1")
    assert got.fetchall() == [("offline", offline), ("synthetic", rec["synthetic_rows"])]
