"""GPU stages as ``accelerate launch`` jobs through Dagster Pipes (pipelines.accelerate_entry), run on CPU.

M_exp SFT (the experience_model asset) and the loop's policy update (assets.loop.accelerate_update),
with one process, and (``-m slow``) with two CPU ranks: ``--multi_gpu --num_processes 2`` with
``Accelerator(cpu=True)`` (gloo; ``--cpu`` always gives one process). Only rank 0 reports.
"""

import json
import math
import socket
import sys

import dagster as dg
import pyarrow as pa
import pytest
import torch

from test_experience_model import ROWS
from test_trainer import FIRST, SECOND, TASKS, _cfg, _model, _params, _state, _trajs

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
ONE_PROCESS = [*LAUNCH, "--cpu", "--num_processes", "1"]
TINY_MEXP = {"time_budget_s": 60.0, "hidden": 32, "layers": 1, "vocab_size": 400, "steps": 4, "batch_size": 4,
             "task_writing_examples": 0}


def two_ranks() -> list[str]:
    with socket.socket() as s:  # a free port: parallel test sessions must not share a rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [*LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port)]


def _messages(instance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id)]


def _experience_model(tmp_path, monkeypatch, launch: list[str]):
    """Materialize experience_model alone in accelerate mode on a hand-written cot_annotations table."""
    from dreamgym_core.io import write_parquet_atomic
    from pipelines.definitions import ALL_ASSETS, build_defs
    from pipelines.resources import Launcher

    monkeypatch.setenv("DREAMGYM_DATA", str(tmp_path))  # checkpoints go under the data root
    write_parquet_atomic(pa.Table.from_pylist(ROWS * 4), str(tmp_path / "parquet" / "cot_annotations.parquet"))
    offline = [{**r, "task_id": f"t/{r['traj_id']}", "env": "twx"} for r in ROWS]  # the replay seed's rows
    write_parquet_atomic(pa.Table.from_pylist(offline), str(tmp_path / "parquet" / "offline_trajectories.parquet"))
    resources = {**build_defs(str(tmp_path)).resources, "launcher": Launcher(mode="accelerate", launch=launch)}
    with dg.instance_for_test() as instance:
        res = dg.materialize(ALL_ASSETS, selection=["replay_seed", "experience_model"], resources=resources,
                             instance=instance,
                             run_config={"ops": {"experience_model": {"config": TINY_MEXP}}})
        return res, _messages(instance, res.run_id)


def _check_experience_model(res, world: int):
    import os

    from dreamgym_core.models import load_checkpoint

    assert res.success
    mats = res.asset_materializations_for_node("experience_model")
    assert len(mats) == 1
    meta = mats[0].metadata
    assert meta["world_size"].value == world and meta["resumed_from_step"].value == 0
    assert meta["steps"].value == TINY_MEXP["steps"] and math.isfinite(meta["loss"].value)  # rank 0's metrics
    assert meta["examples"].value == len(ROWS) * 4 and "| 4 |" in meta["loss_curve"].value
    ref = res.output_for_node("experience_model")
    assert ref.path.endswith("final") and os.path.exists(os.path.join(ref.path, "model.safetensors"))
    _, _, saved = load_checkpoint(ref.path)
    assert saved["metrics"] == ref.metrics and saved["examples"] == len(ROWS) * 4 and "prompt" in saved
    return ref


def test_experience_model_trains_under_accelerate_launch(tmp_path, monkeypatch):
    res, logs = _experience_model(tmp_path, monkeypatch, ONE_PROCESS)
    _check_experience_model(res, world=1)
    assert any("accelerate.commands.launch" in m and "pipelines.accelerate_entry sft" in m for m in logs)


# --------------------------------------------------------------------------------------------
# the loop's policy update

@pytest.fixture(scope="module")
def policy_tok(tmp_path_factory):
    from dreamgym_core.models import train_tokenizer

    lines = [f"Task: {t.instruction}\nDid: {a} -> you {a}\n{_state('you enter', ['box', 'key', 'rock'])}\nAction: {a}\n"
             for t in TASKS for a in FIRST + SECOND]
    return train_tokenizer(lines * 5, str(tmp_path_factory.mktemp("tok")), vocab_size=350, min_frequency=1)


def _launched_update(tmp_path, tok, launch: list[str]):
    """One GRPO update of a tiny SFT policy through accelerate_update, next to the same update in-process."""
    from assets.loop import accelerate_update
    from dreamgym_core.io import write_parquet_atomic
    from dreamgym_core.models import load_checkpoint, save_checkpoint
    from dreamgym_core.rl.trainer import PolicyTrainer
    from dreamgym_core.schema import trajectories_to_arrow
    from pipelines.resources import Launcher

    sft = save_checkpoint(_model(tok), tok, str(tmp_path / "sft"), {"kind": "policy"})
    trajs = _trajs(_model(tok), tok, group=4)  # 3 tasks x 4 rollouts x 2 decisions: minibatches of 8 split evenly
    rollouts = write_parquet_atomic(trajectories_to_arrow(trajs), str(tmp_path / "001" / "rollouts.parquet"))
    out = str(tmp_path / "001" / "policy")
    cfg = _cfg(kl_coef=0.05)

    @dg.asset
    def policy(context: dg.AssetExecutionContext, launcher: Launcher) -> dg.MaterializeResult:
        m = accelerate_update(context, launcher, cfg, sft, resume=False)(sft, rollouts, out)
        return dg.MaterializeResult(metadata={"update": dg.MetadataValue.json(m)})

    with dg.instance_for_test() as instance:
        res = dg.materialize([policy], resources={"launcher": Launcher(mode="accelerate", launch=launch)},
                             instance=instance)
        logs = _messages(instance, res.run_id)
    assert res.success
    metrics = res.asset_materializations_for_node("policy")[0].metadata["update"].value
    model, _, _ = load_checkpoint(sft)
    ref, _, _ = load_checkpoint(sft)
    here = PolicyTrainer(model, tok, cfg, ref_model=ref)
    expected = here.update(trajs)
    return out, metrics, logs, here, expected


def _check_update(out: str, metrics: dict, logs: list[str], here, expected: dict, world: int):
    import os

    from dreamgym_core.models import load_checkpoint

    assert metrics["world_size"] == world
    assert metrics["check/first_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["samples"] == expected["samples"] == 24 and metrics["optimizer_steps"] == expected["optimizer_steps"]
    with open(os.path.join(out, "update_metrics.json")) as f:
        assert json.load(f) == metrics
    assert os.path.exists(os.path.join(out, "trainer.json"))  # a PolicyTrainer checkpoint the next k resumes
    launched, _, _ = load_checkpoint(out)
    sft, _, _ = load_checkpoint(os.path.join(os.path.dirname(os.path.dirname(out)), "sft"))
    assert any(not torch.equal(a, b) for a, b in zip(_params(sft), launched.parameters()))
    # the launched update is the in-process update (with 2 ranks: each half a minibatch, gradients averaged)
    for a, b in zip(here.model.parameters(), launched.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert sum(f"world={world}" in m and "policy update on" in m for m in logs) == 1  # rank 0's Pipes log


def test_policy_update_under_accelerate_launch_equals_the_in_process_update(tmp_path, policy_tok):
    _check_update(*_launched_update(tmp_path, policy_tok, ONE_PROCESS), world=1)


def test_unknown_launcher_mode_is_one_clear_line():
    from pipelines.resources import Launcher

    with pytest.raises(ValueError, match="Launcher.mode='gpu': use 'inprocess' or 'accelerate'"):
        Launcher(mode="gpu")


# --------------------------------------------------------------------------------------------
# two CPU ranks: every rank trains, only rank 0 reports

@pytest.mark.slow
def test_two_ranks_report_once(tmp_path, monkeypatch, policy_tok):
    res, _ = _experience_model(tmp_path / "mexp", monkeypatch, two_ranks())
    _check_experience_model(res, world=2)  # a second report would fail the step (not one MaterializeResult)
    _check_update(*_launched_update(tmp_path / "rl", policy_tok, two_ranks()), world=2)
