"""The DreamGym loop as iteration partitions, end to end with tiny models (in-process, no UI).

Iteration 0 (tasks, offline data, M_exp, SFT policy) then iterations 001 and 002: lineage
(002's rollouts name 001's policy), the in-step checks, and resume after a crash mid-iteration.
"""

import os

import dagster as dg
import duckdb
import pytest

TINY_OPS = {
    "experience_model": {"config": {"time_budget_s": 4.0, "hidden": 32, "layers": 1, "vocab_size": 400, "steps": 20,
                                    "batch_size": 4}},
    "policy_init": {"config": {"time_budget_s": 3.0, "hidden": 32, "layers": 1, "steps": 20}},
}
HEAD = ["seed_tasks", "eval_tasks", "offline_trajectories", "cot_annotations", "replay_seed", "experience_model", "policy_init"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(defs, instance, data dir) with iteration 0 materialized."""
    data = tmp_path_factory.mktemp("loopdata")
    old = os.environ.get("DREAMGYM_DATA")
    os.environ["DREAMGYM_DATA"] = str(data)
    from pipelines.definitions import ALL_ASSETS, build_defs

    defs = build_defs(str(data), "tiny")
    with dg.instance_for_test() as instance:
        for key in HEAD:
            res = dg.materialize(ALL_ASSETS, selection=[key], resources=defs.resources, instance=instance,
                                 run_config={"ops": {key: TINY_OPS[key]}} if key in TINY_OPS else {})
            assert res.success, key
        yield defs, instance, data
    if old is None:
        os.environ.pop("DREAMGYM_DATA", None)
    else:
        os.environ["DREAMGYM_DATA"] = old


def _iteration(defs, instance, key: str, resources=None, **kw):
    from pipelines.definitions import ALL_ASSETS, LOOP_KEYS

    return dg.materialize(ALL_ASSETS, selection=LOOP_KEYS, resources=resources or defs.resources, instance=instance,
                          partition_key=key, **kw)


def test_two_iterations_chain_and_check(run):
    defs, instance, data = run
    r1 = _iteration(defs, instance, "001")
    assert r1.success
    r2 = _iteration(defs, instance, "002")
    assert r2.success
    pol2 = r2.output_for_node("dreamgym_iteration", "policy")
    pol1 = r1.output_for_node("dreamgym_iteration", "policy")
    assert pol2.parent == pol1.path and pol2.iteration == 2 and os.path.isdir(pol2.path)
    got = duckdb.sql(f"select distinct iteration, policy from read_parquet('{data}/parquet/rollouts/*.parquet') "
                     "order by 1").fetchall()
    assert got == [(1, "sft"), (2, "dreamgym@001")]
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed for c in r2.get_asset_check_evaluations()}
    assert checks[("task_pool", "synthetic_share_within_lambda")]
    assert all(checks[(k, "schema")] for k in ("rollouts", "task_scores", "synthesized_tasks", "task_pool",
                                               "iteration_eval"))
    ev = duckdb.sql(f"select policy, iteration, success_rate, sim_success_rate from "
                    f"read_parquet('{data}/parquet/iteration_eval/*.parquet') order by iteration").fetchall()
    assert [(p, i) for p, i, *_ in ev] == [("dreamgym", 1), ("dreamgym", 2)]
    assert all(0 <= s <= 1 for *_, s, _ in ev)
    # retrieval inside the loop: M_exp was trained with demos, and its prompts in iteration k held them
    mexp = instance.get_latest_materialization_event(dg.AssetKey("experience_model")).asset_materialization.metadata
    assert mexp["num_demos"].value == 2 and "## examples" in mexp["example_prompt"].value
    for r in (r1, r2):
        meta = r.asset_materializations_for_node("dreamgym_iteration")
        by_key = {m.asset_key.to_user_string(): m.metadata for m in meta}
        assert by_key["iteration_eval"]["replay/demo_share"].value > 0.9
        assert {"replay/added", "replay/filtered", "replay/pruned", "replay/size"} <= set(by_key["replay_buffer"])
    rows = duckdb.sql(f"select buffer_iteration, source, count(*) from "
                      f"read_parquet('{data}/parquet/replay_buffer_rows/*.parquet') group by all order by all").fetchall()
    assert {(i, s) for i, s, _ in rows} >= {(1, "offline"), (2, "offline")}


def test_iteration_out_of_order_fails_clearly(run):
    defs, instance, _ = run
    res = _iteration(defs, instance, "005", raise_on_error=False)
    assert not res.success


def test_a_crash_mid_iteration_resumes_without_redoing_stages(run, monkeypatch):
    defs, instance, data = run
    import dreamgym_core.curriculum as cur

    real = cur.build_task_pool

    def crash(*a, **k):
        raise RuntimeError("killed during task_pool")

    monkeypatch.setattr(cur, "build_task_pool", crash)
    assert not _iteration(defs, instance, "003", raise_on_error=False).success
    work = [os.path.join(r, d) for r, ds, _ in os.walk(os.path.join(data, "loop")) for d in ds if d == "003"]
    assert len(work) == 1
    done_before = {f: os.path.getmtime(os.path.join(work[0], f)) for f in os.listdir(work[0])}
    # stage tables are stored once, in their assets' Parquet partitions; the work dir holds their digests
    assert "rollouts.sha256" in done_before and "policy.json" in done_before
    assert not any(f.endswith(".parquet") for f in done_before)
    assert "task_pool.sha256" not in done_before and not any(f.endswith(".tmp") for f in done_before)
    stored = os.path.join(data, "parquet", "rollouts", "003.parquet")
    rollouts_mtime = os.path.getmtime(stored)
    monkeypatch.setattr(cur, "build_task_pool", real)
    assert _iteration(defs, instance, "003").success
    for f, t in done_before.items():  # finished stages were loaded, not recomputed
        assert os.path.getmtime(os.path.join(work[0], f)) == t, f
    assert os.path.getmtime(stored) == rollouts_mtime  # nor rewritten by the IO manager
    assert os.path.exists(os.path.join(work[0], "task_pool.sha256"))
    assert os.path.exists(os.path.join(data, "parquet", "task_pool", "003.parquet"))


def test_s2r_real_rl_and_policy_eval_count_real_transitions(run):
    """After the loop: S2R continues the latest iteration's policy in the real env, the real-RL
    baseline starts from the SFT policy, both within their exact budgets; policy_eval has a row per
    policy with the real transitions each was trained on."""
    defs, instance, data = run
    from pipelines.definitions import ALL_ASSETS

    if "001" not in instance.get_materialized_partitions(dg.AssetKey("policy")):
        assert _iteration(defs, instance, "001").success
    small = {"budget": 17, "rounds": 2, "tasks_per_round": 2, "group_size": 2, "max_steps": 4}
    res = dg.materialize(ALL_ASSETS, selection=["s2r_policy", "real_rl_policy", "policy_eval"],
                         resources=defs.resources, instance=instance,
                         run_config={"ops": {"s2r_policy": {"config": {**small, "budget": 9}},
                                             "real_rl_policy": {"config": small},
                                             "policy_eval": {"config": {"eval_tasks": 3, "sim_eval_tasks": 2,
                                                                        "max_steps": 4, "sampled": False}}}})
    assert res.success
    s2r = res.asset_materializations_for_node("s2r_policy")[0].metadata
    real = res.asset_materializations_for_node("real_rl_policy")[0].metadata
    assert 0 < s2r["real_transitions"].value <= 9 and s2r["budget"].value == 9
    assert 0 < real["real_transitions"].value <= 17
    checks = {c.asset_key.to_user_string(): c.passed for c in res.get_asset_check_evaluations()
              if c.check_name == "real_budget_respected"}
    assert checks == {"s2r_policy": True, "real_rl_policy": True}
    ev = {(r["policy"], r["iteration"], r["mode"]): r for r in res.output_for_node("policy_eval").to_pylist()}
    assert {p for p, _, _ in ev} == {"random", "sft", "dreamgym", "s2r", "real_rl"}
    assert ev[("sft", 0, "greedy")]["real_transitions"] == 0
    latest = int(max(instance.get_materialized_partitions(dg.AssetKey("policy"))))
    assert s2r["from_iteration"].value == f"{latest:03d}"  # S2R continues the newest iteration's policy
    assert ev[("s2r", latest, "greedy")]["real_transitions"] == s2r["real_transitions"].value
    assert ev[("real_rl", 0, "greedy")]["real_transitions"] == real["real_transitions"].value
    assert all(r["ci_low"] <= r["success_rate"] <= r["ci_high"] for r in ev.values())


def test_replay_buffer_false_puts_no_demos_in_m_exp_prompts(run, monkeypatch):
    """The ablation switch: SFT prompts and the loop's simulated prompts hold no demonstrations; and
    mexp_sampling reaches the simulator's decoding. Last in this module: it re-materializes
    experience_model and iteration 001 with the switches flipped."""
    defs, instance, _ = run
    import assets.loop as loop_assets
    from assets.loop import LoopSettings
    from pipelines.definitions import ALL_ASSETS, PROFILES

    made, factory = [], loop_assets.SimulatorFactory

    def spy(*a, **kw):
        made.append(factory(*a, **kw))
        return made[-1]

    monkeypatch.setattr(loop_assets, "SimulatorFactory", spy)
    resources = {**defs.resources, "loop": LoopSettings(**PROFILES["tiny"]["loop"], replay_buffer=False,
                                                         mexp_sampling=True)}
    res = dg.materialize(ALL_ASSETS, selection=["experience_model"], resources=resources, instance=instance,
                         run_config={"ops": {"experience_model": TINY_OPS["experience_model"]}})
    meta = res.asset_materializations_for_node("experience_model")[0].metadata
    assert meta["num_demos"].value == 0 and "## examples" not in meta["example_prompt"].value
    it = _iteration(defs, instance, "001", resources=resources)
    assert it.success
    by_key = {m.asset_key.to_user_string(): m.metadata for m in it.asset_materializations_for_node("dreamgym_iteration")}
    assert by_key["iteration_eval"]["replay/demo_share"].value == 0.0
    assert made and all(f.cfg.decoding.greedy is False for f in made)
