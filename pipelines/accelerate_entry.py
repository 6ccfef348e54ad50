"""The GPU stages as an ``accelerate launch`` program: ``python -m pipelines.accelerate_entry <stage> <spec.json>``.

Stages:
  sft            M_exp SFT (DreamGym Eq. 5, ``experience_model.train_sft``) on an examples Parquet
                 (prompt, reasoning, prediction, weight), from an init directory (tokenizer + initial
                 weights), resuming from ``checkpoint_dir``; writes ``out_dir`` and reports one
                 materialization (the ``experience_model`` asset).
  policy_update  one PPO/GRPO update (``PolicyTrainer.update``) of the policy in ``prev_policy_dir`` on a
                 rollouts Parquet, KL to ``ref_policy_dir`` (``resume``: ``prev_policy_dir`` is a trainer
                 checkpoint, else a fresh trainer starts on its weights); writes ``out_dir`` (+ update_metrics.json)
                 and reports the metrics as one custom message (the stage is one output of the loop's
                 multi-asset, so it must not report a materialization of its own).

Every rank reads the spec; only rank 0 opens Dagster Pipes, logs and reports (each rank reporting
fails the step with duplicate outputs: shared/notes/dagster-idioms.md §3). The asset side is
``pipelines.resources.Launcher``; this module imports ``dagster_pipes`` only, never ``dagster``.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import nullcontext

SFT_LOG_EVERY = 50


def sft_metrics(res) -> dict[str, float]:
    """The M_exp checkpoint's metrics from an ``SFTResult`` (in-process and launched runs alike)."""
    last = res.history[-1]
    return {"loss": last["loss"], "loss/reasoning": last["loss/reasoning"], "loss/state": last["loss/state"],
            "steps": float(last["step"]), "timing/train_s": round(res.seconds, 1),
            "tokens_per_s": round(res.tokens / max(res.seconds, 1e-9), 1)}


def sft_log_line(step: int, rec: dict) -> str:
    return (f"step {step}: loss {rec['loss']:.3f} (reasoning {rec['loss/reasoning']:.3f}, "
            f"state {rec['loss/state']:.3f}) {rec['seconds']:.0f}s")


def _sft(spec: dict, acc, pipes) -> None:
    from dreamgym_core.experience_model import SFTConfig, SFTExample, train_sft
    from dreamgym_core.io import read_parquet
    from dreamgym_core.models import load_checkpoint, save_checkpoint

    table = read_parquet(spec["examples"])
    examples = [SFTExample(p, r, q) for p, r, q in zip(table["prompt"].to_pylist(), table["reasoning"].to_pylist(),
                                                        table["prediction"].to_pylist())]
    model, tok, _ = load_checkpoint(spec["init_dir"], training=True)

    def progress(step: int, rec: dict) -> None:  # train_sft calls it on the main process only
        if step % SFT_LOG_EVERY == 0:
            pipes.log.info(sft_log_line(step, rec) + f" world={acc.num_processes}")

    res = train_sft(model, tok, examples, SFTConfig(**spec["sft"]), checkpoint_dir=spec["checkpoint_dir"],
                    progress=progress, sample_weights=table["weight"].to_pylist())
    acc.wait_for_everyone()
    if acc.is_main_process:
        metrics = sft_metrics(res)
        save_checkpoint(model, tok, spec["out_dir"], {"metrics": metrics, **spec.get("metadata", {})})
        pipes.report_asset_materialization(metadata={
            "metrics": {"raw_value": metrics, "type": "json"},
            "history": {"raw_value": res.history, "type": "json"},
            "examples": len(examples), "resumed_from_step": res.resumed_from, "world_size": acc.num_processes})
    acc.wait_for_everyone()  # the other ranks exit only after the final checkpoint is written


def _policy_update(spec: dict, acc, pipes) -> None:
    from dreamgym_core.io import read_parquet
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.rl.trainer import PolicyTrainer, RLConfig
    from dreamgym_core.schema import trajectories_from_arrow

    cfg = RLConfig(**spec["rl"])
    prev, out = spec["prev_policy_dir"], spec["out_dir"]
    ref, _, _ = load_checkpoint(spec["ref_policy_dir"], training=True)
    if spec["resume"]:  # k > 1: the previous iteration's trainer checkpoint, optimizer state included
        trainer = PolicyTrainer.load(prev, cfg, ref_model=ref, accelerator=acc)
    else:  # k = 1: a fresh trainer on the SFT policy's weights
        model, tok, _ = load_checkpoint(prev, training=True)
        trainer = PolicyTrainer(model, tok, cfg, ref_model=ref, accelerator=acc)
    trajs = trajectories_from_arrow(read_parquet(spec["rollouts"]))
    if pipes:
        pipes.log.info(f"policy update on {len(trajs)} trajectories from {prev} world={acc.num_processes}")
    metrics = {**trainer.update(trajs), "world_size": float(acc.num_processes)}
    acc.wait_for_everyone()
    if acc.is_main_process:
        trainer.save(out)
        with open(os.path.join(out, "update_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        pipes.report_custom_message({"stage": "policy_update", "metrics": metrics})
    acc.wait_for_everyone()


STAGES = {"sft": _sft, "policy_update": _policy_update}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in STAGES:
        raise SystemExit(f"usage: python -m pipelines.accelerate_entry {{{'|'.join(STAGES)}}} <spec.json>")
    stage, spec_path = argv
    with open(spec_path) as f:
        spec = json.load(f)  # every rank needs the spec

    from dagster_pipes import open_dagster_pipes

    from dreamgym_core.device import accelerator

    acc = accelerator()
    with (open_dagster_pipes() if acc.is_main_process else nullcontext()) as pipes:
        STAGES[stage](spec, acc, pipes)


if __name__ == "__main__":
    main(sys.argv[1:])
