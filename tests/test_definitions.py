import dagster as dg
import pytest

from pipelines.definitions import ALL_ASSETS, build_defs
from pipelines.io_managers import ParquetIOManager
from pipelines.resources import Experiment


def _graph(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    out = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        out[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "partitioned": node.partitions_def is not None,
            "kinds": sorted(node.kinds),
        }
    return out


def test_definitions_load(tmp_path):
    defs = build_defs(str(tmp_path))
    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("bootstrap") is not None


def test_asset_graph_matches_snapshot(tmp_path, snapshot):
    assert _graph(build_defs(str(tmp_path))) == snapshot


def test_all_assets_materialize_in_a_temp_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMGYM_DATA", str(tmp_path))  # checkpoints go under the data root
    resources = {**build_defs(str(tmp_path)).resources,
                 "experiment": Experiment(n_train_tasks=4, n_dev_tasks=2, n_test_tasks=3,
                                          cache_dir=str(tmp_path / "cache"))}
    run_config = {"ops": {
        "experience_model": {"config": {"steps": 3, "time_budget_s": 60, "batch_size": 4, "hidden": 32,
                                        "layers": 1, "vocab_size": 600, "max_len": 768,
                                        "task_writing_examples": 4}},
        "experience_model_eval": {"config": {"max_transitions": 9, "drift_trajectories": 3, "drift_steps": 3,
                                             "gap_tasks": 2, "gap_max_steps": 4}},
        "policy_init": {"config": {"steps": 3, "hidden": 32, "layers": 1}}}}
    # iteration 0, the unpartitioned head of the graph; the loop, S2R, the real-RL baseline and
    # policy_eval run on top of it in tests/test_loop_assets.py
    head = ["seed_tasks", "eval_tasks", "offline_trajectories", "cot_annotations", "replay_seed", "experience_model",
            "experience_model_eval", "policy_init"]
    with dg.instance_for_test() as instance:
        res = dg.materialize(ALL_ASSETS, selection=head, resources=resources, instance=instance,
                             run_config=run_config)
    assert res.success
    meta = res.asset_materializations_for_node("offline_trajectories")[0].metadata
    assert meta["rows"].value > 20 and 0 < meta["success_rate"].value < 1
    assert meta["path"].value.endswith("offline_trajectories.parquet")
    assert res.asset_materializations_for_node("eval_tasks")[0].metadata["rows"].value == 5
    cot = res.asset_materializations_for_node("cot_annotations")[0].metadata
    assert cot["rows"].value == meta["rows"].value and cot["annotator"].value == "rule-v4"
    assert "<think>" in cot["example"].value
    mexp = res.asset_materializations_for_node("experience_model")[0].metadata
    assert mexp["steps"].value == 3 and mexp["parent_checkpoint"].value == "<fresh>"
    fid = {r["scope"]: r for r in res.output_for_node("experience_model_eval").to_pylist()}
    assert 0 < fid["overall"]["transitions"] <= 9 and 0.0 <= fid["overall"]["state_exact_match"] <= 1.0
    assert fid["overall"]["baseline_state_exact_match"] is not None
    per_verb = [r for k, r in fid.items() if k.startswith("action:")]
    assert per_verb and sum(r["transitions"] for r in per_verb) == fid["overall"]["transitions"]
    assert "drift:1" in fid and 0.0 <= fid["drift:1"]["agree_so_far"] <= 1.0
    for policy in ("random", "bc"):  # the sim-real gap: success in M_exp minus real success, same tasks
        r = fid[f"policy:{policy}"]
        assert r["sim_real_gap"] == pytest.approx(r["sim_success_rate"] - r["real_success_rate"])
        # the same episodes, paired: the discordant pairs make the gap; 4 episodes per task for random
        assert r["episodes"] == 2 * (4 if policy == "random" else 1)
        assert (r["sim_only_wins"] - r["real_only_wins"]) / r["episodes"] == pytest.approx(r["sim_real_gap"])
        assert 0.0 <= r["same_actions"] <= 1.0 and r["both_won"] >= 0
    fmeta = res.asset_materializations_for_node("experience_model_eval")[0].metadata
    assert "only M_exp" in fmeta["by_action"].value and "same_actions/random" in fmeta
    bc = res.asset_materializations_for_node("policy_init")[0].metadata
    assert bc["bc/steps"].value == 3 and bc["bc/examples"].value > 0
    # nothing half-written: no temp files remain next to the outputs
    assert not [p for p in (tmp_path / "parquet").rglob(".tmp-*")]


def test_io_manager_returns_none_for_a_missing_upstream_partition(tmp_path):
    mgr = ParquetIOManager(base_dir=str(tmp_path))
    ctx = dg.build_input_context(asset_key=dg.AssetKey("rollouts"), partition_key="001",
                                 asset_partitions_def=dg.StaticPartitionsDefinition(["001"]))
    assert mgr.load_input(ctx) is None


def test_io_manager_rejects_unknown_objects(tmp_path):
    mgr = ParquetIOManager(base_dir=str(tmp_path))
    ctx = dg.build_output_context(asset_key=dg.AssetKey("x"))
    with pytest.raises(TypeError, match="pyarrow Tables or polars DataFrames"):
        mgr.handle_output(ctx, {"a": 1})
