"""pipelines.reuse: finished work is reused only for the same config AND the same upstream content.

Unit tier: fingerprints of tables and checkpoint directories, keys, the force tag. Asset tier: a
changed annotator (new cot_annotations traces) retrains M_exp, an unchanged re-run reuses it, and
the ``dreamgym/force`` run tag recomputes it.
"""

import os

import dagster as dg
import pyarrow as pa
import pytest

from dreamgym_core.schema import CheckpointRef
from pipelines import reuse


def test_table_fingerprint_follows_content_not_chunking():
    t = pa.table({"a": [1, 2, 3], "s": ["x", "y", "z"]})
    chunked = pa.concat_tables([t.slice(0, 1), t.slice(1)])
    assert reuse.fingerprint(t) == reuse.fingerprint(chunked)
    assert reuse.fingerprint(t) != reuse.fingerprint(pa.table({"a": [1, 2, 4], "s": ["x", "y", "z"]}))
    assert reuse.fingerprint(t) != reuse.fingerprint(t.cast(pa.schema([("a", pa.int32()), ("s", pa.string())])))


def test_checkpoint_fingerprint_follows_file_content(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights-1")
    (d / "dreamgym.json").write_text("{}")
    ref = CheckpointRef(path=str(d), kind="policy")
    first = reuse.fingerprint(ref)
    assert reuse.fingerprint(CheckpointRef(path=str(d), kind="policy", metrics={"x": 1.0})) == first
    (d / "model.safetensors").write_bytes(b"weights-2")  # retrained in place: same path, new weights
    os.utime(d / "model.safetensors", ns=(1, 1))
    assert reuse.fingerprint(ref) != first
    (d / "model.safetensors.tmp").write_bytes(b"half")  # temp leftovers do not count
    second = reuse.fingerprint(ref)
    os.remove(d / "model.safetensors.tmp")
    assert reuse.fingerprint(ref) == second


def test_replay_buffer_ref_is_keyed_by_its_version_not_its_growing_directory(tmp_path):
    (tmp_path / "data.lance").write_bytes(b"v1")
    ref = CheckpointRef(path=str(tmp_path), kind="replay_buffer", iteration=1, metrics={"version": 3.0})
    first = reuse.fingerprint(ref)
    (tmp_path / "data.lance").write_bytes(b"v1 + later iterations")
    assert reuse.fingerprint(ref) == first
    assert reuse.fingerprint(CheckpointRef(path=str(tmp_path), kind="replay_buffer", iteration=1,
                                           metrics={"version": 4.0})) != first


def test_stage_key_changes_with_config_inputs_and_stage():
    t = pa.table({"a": [1]})
    base = reuse.stage_key("policy_init", {"lr": 1.0}, data=t)
    assert base == reuse.stage_key("policy_init", {"lr": 1.0}, data=pa.table({"a": [1]}))
    assert base != reuse.stage_key("policy_init", {"lr": 2.0}, data=t)
    assert base != reuse.stage_key("policy_init", {"lr": 1.0}, data=pa.table({"a": [2]}))
    assert base != reuse.stage_key("real_rl_policy", {"lr": 1.0}, data=t)
    assert base != reuse.stage_key("policy_init", {"lr": 1.0}, data=t, other=None)


@pytest.mark.parametrize("value,stage,want", [
    (None, "experience_model", False), ("false", "experience_model", False), ("true", "policy_init", True),
    ("all", "experience_model", True), ("experience_model, policy_init", "policy_init", True),
    ("experience_model", "policy_init", False)])
def test_force_tag(value, stage, want):
    tags = {} if value is None else {reuse.FORCE_TAG: value}
    assert reuse.forced(tags, stage) is want


TINY_MEXP = {"time_budget_s": 3.0, "hidden": 32, "layers": 1, "vocab_size": 400, "steps": 2, "batch_size": 4,
             "task_writing_examples": 0}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """(defs, instance, data dir) with seed_tasks, offline_trajectories and replay_seed materialized (tiny profile)."""
    data = tmp_path_factory.mktemp("reusedata")
    mp = pytest.MonkeyPatch()
    mp.setenv("DREAMGYM_DATA", str(data))
    from pipelines.definitions import ALL_ASSETS, build_defs

    defs = build_defs(str(data), "tiny")
    with dg.instance_for_test() as instance:
        res = dg.materialize(ALL_ASSETS, selection=["seed_tasks", "offline_trajectories", "replay_seed"],
                             resources=defs.resources,
                             instance=instance)
        assert res.success
        yield defs, instance, data
    mp.undo()


def _mexp(defs, instance, tags=None):
    from pipelines.definitions import ALL_ASSETS

    res = dg.materialize(ALL_ASSETS, selection=["experience_model"], resources=defs.resources, instance=instance,
                         run_config={"ops": {"experience_model": {"config": TINY_MEXP}}}, tags=tags)
    assert res.success
    ref = res.output_for_node("experience_model")
    return ref.path, res.asset_materializations_for_node("experience_model")[0].metadata


def _annotate(defs, instance):
    from pipelines.definitions import ALL_ASSETS

    assert dg.materialize(ALL_ASSETS, selection=["cot_annotations"], resources=defs.resources,
                          instance=instance).success


def test_changed_annotator_retrains_mexp_and_force_recomputes(head, monkeypatch):
    defs, instance, _ = head
    _annotate(defs, instance)
    first, meta = _mexp(defs, instance)
    assert "reused" not in meta
    again, meta = _mexp(defs, instance)  # same config, same traces: the finished M_exp is reused
    assert again == first and meta["reused"].value is True

    import assets.experience as ax
    from dreamgym_core.annotate import RuleAnnotator

    class OtherAnnotator(RuleAnnotator):  # a different annotator: other traces for the same transitions
        name = "other"

        def annotate(self, items):
            return ["Other: " + t for t in super().annotate(items)]

    monkeypatch.setattr(ax, "_annotator", lambda cfg, table, channels: OtherAnnotator())
    _annotate(defs, instance)
    retrained, meta = _mexp(defs, instance)
    assert retrained != first and "reused" not in meta
    assert os.path.exists(os.path.join(first, "dreamgym.json"))  # the old one stays for its own key

    stamp = os.path.getmtime(os.path.join(retrained, "dreamgym.json"))
    forced, meta = _mexp(defs, instance, tags={reuse.FORCE_TAG: "experience_model"})
    assert forced == retrained and "reused" not in meta
    assert os.path.getmtime(os.path.join(forced, "dreamgym.json")) > stamp
