"""Issue 27 item 5: checks that can fail, fallbacks that are counted (or refused)."""

import dagster as dg
import pyarrow as pa
import pytest

from dreamgym_core.envs import Observation
from dreamgym_core.rollout import RandomPolicy, RolloutConfig, rollout
from pipelines.checks import real_budget_check
from pipelines.io_managers import CheckpointIOManager, ParquetIOManager
from tests.test_rollout import TASKS, CountdownEnv


@pytest.mark.parametrize("metrics,budget,passed,problem", [
    ({"real_transitions": 9, "real_transitions_recorded": 9}, 9, True, "none"),
    ({"real_transitions": 0, "real_transitions_recorded": 0}, 0, True, "none"),
    ({"real_transitions": 10, "real_transitions_recorded": 10}, 9, False, "over the budget of 9"),
    ({"real_transitions": 5, "real_transitions_recorded": 12}, 9, False, "over the budget"),   # counter lied
    ({"real_transitions": 5, "real_transitions_recorded": 6}, 9, False, "accounting is off"),
    ({"real_transitions": 5}, 9, False, "no recorded transition count"),
])
def test_real_budget_check_can_fail(metrics, budget, passed, problem):
    res = real_budget_check(metrics, budget)
    assert res.passed is passed and res.severity == dg.AssetCheckSeverity.ERROR
    assert problem in res.metadata["problems"].value


class NoCandidatesEnv(CountdownEnv):
    def reset_batch(self, tasks):
        return [Observation(o.state, ()) for o in super().reset_batch(tasks)]


def test_steps_with_no_candidates_are_counted():
    _, stats = rollout(NoCandidatesEnv(need=3), RandomPolicy(), TASKS, RolloutConfig(max_steps=1))
    assert stats.no_candidate_steps == len(TASKS) == stats.as_metadata()["rollout/no_candidate_steps"]
    _, stats = rollout(CountdownEnv(need=3), RandomPolicy(), TASKS, RolloutConfig(max_steps=1))
    assert stats.no_candidate_steps == 0


PARTS = dg.StaticPartitionsDefinition(["001", "002", "003", "004"])


@dg.asset(partitions_def=PARTS)
def evals(context: dg.AssetExecutionContext) -> pa.Table:
    return pa.table({"k": [context.partition_key]})


@dg.asset(ins={"evals": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())})
def summary(context: dg.AssetExecutionContext, evals: pa.Table) -> None:
    context.add_output_metadata({"keys": sorted(evals["k"].to_pylist())})


def _mat(tmp_path, assets, key=None, **kw):
    return dg.materialize(assets, partition_key=key, raise_on_error=False,
                          resources={"io_manager": ParquetIOManager(base_dir=str(tmp_path))}, **kw)


def test_range_load_counts_not_yet_run_partitions_and_refuses_gaps(tmp_path):
    for k in ("001", "002"):
        assert _mat(tmp_path, [evals], k).success
    with dg.instance_for_test() as instance:
        res = _mat(tmp_path, [evals, summary], selection=[summary], instance=instance)
        assert res.success
        mats = res.asset_materializations_for_node("summary")
        assert mats[0].metadata["keys"].value == ["001", "002"]
        warned = [e.user_message for e in instance.all_logs(res.run_id) if "missing_partitions=" in e.user_message]
        assert warned and "missing_partitions=2 of 4" in warned[0] and "['003', '004']" in warned[0]
    assert _mat(tmp_path, [evals], "004").success           # now 003 is a gap
    res = _mat(tmp_path, [evals, summary], selection=[summary])
    assert not res.success
    err = [e for e in res.all_events if e.is_failure][0].event_specific_data.error.to_string()
    assert "['003'] are missing between materialized ones" in err


def test_checkpoint_range_load_refuses_gaps(tmp_path):
    from dreamgym_core.schema import CheckpointRef

    @dg.asset(partitions_def=PARTS, io_manager_key="ckpt")
    def pol(context: dg.AssetExecutionContext) -> CheckpointRef:
        (tmp_path / "w" / context.partition_key).mkdir(parents=True)
        return CheckpointRef(path=str(tmp_path / "w" / context.partition_key), kind="policy")

    @dg.asset(ins={"pol": dg.AssetIn(partition_mapping=dg.AllPartitionMapping(), input_manager_key="ckpt")})
    def latest(pol: dict) -> None:
        assert sorted(pol) == ["001"]

    res = {"ckpt": CheckpointIOManager(base_dir=str(tmp_path))}
    for k in ("001", "003"):
        assert dg.materialize([pol], partition_key=k, resources=res).success
    out = dg.materialize([pol, latest], selection=[latest], resources=res, raise_on_error=False)
    assert not out.success
    (tmp_path / "pol" / "003" / "manifest.json").unlink()
    assert dg.materialize([pol, latest], selection=[latest], resources=res).success


def test_llm_annotator_falling_back_fails_cot_annotations(monkeypatch, twx_env):
    """An LLM annotator that returns nothing usable would train M_exp on rule traces labelled as LLM ones."""
    import assets.experience as ex
    from dreamgym_core.annotate import rule_trace
    from dreamgym_core.collect import CollectConfig, collect
    from dreamgym_core.schema import trajectories_to_arrow
    from pipelines.resources import Experiment

    class FallingBack:
        name, fallbacks = "fake-llm", 0

        def __init__(self, every):
            self.every = every

        def annotate(self, items):
            out = []
            for i, it in enumerate(items):
                self.fallbacks += i % self.every == 0
                out.append(rule_trace(it))
            return out

    trajs, _ = collect(twx_env, twx_env.tasks("train", 2), CollectConfig(seed=1))
    table = trajectories_to_arrow(trajs)
    for every, ok in [(1, False), (100, True)]:          # all fall back / about 1% fall back
        monkeypatch.setattr(ex, "_annotator", lambda cfg, t, channels, every=every: FallingBack(every))
        ctx = dg.build_asset_context()
        if ok:
            out = ex.cot_annotations(ctx, ex.AnnotationConfig(annotator="openai"), Experiment(), table)
            assert out.num_rows == table.num_rows
        else:
            with pytest.raises(dg.Failure, match="fell back to rule traces"):
                ex.cot_annotations(ctx, ex.AnnotationConfig(annotator="openai"), Experiment(), table)
