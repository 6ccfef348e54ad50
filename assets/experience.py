"""Experience-model assets (paper §4.1): CoT annotation, M_exp SFT (Eq. 5) and its fidelity."""
# No `from __future__ import annotations` in asset modules: Dagster reads the annotations at definition time.

import time

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from dreamgym_core.annotate import OpenAIAnnotator, RuleAnnotator, TransformersAnnotator, annotate_table
from dreamgym_core.collect import collect
from dreamgym_core.envs import make_env
from dreamgym_core.schema import CheckpointRef, tasks_from_arrow, trajectories_to_arrow
from pipelines.resources import Experiment

GROUP = "experience_model"


class AnnotationConfig(dg.Config):
    """Which annotator writes the reasoning traces R* (run-level, editable in the Launchpad)."""

    annotator: str = "rule"
    """rule (offline, deterministic) | transformers (local model path) | openai (any compatible endpoint)."""
    model: str = ""
    """transformers: local model path; openai: model name."""
    base_url: str = ""
    """openai: server URL, e.g. http://127.0.0.1:8000 for vLLM."""
    requests_per_second: float = 0.0
    """openai: rate limit (0 = none)."""
    batch_size: int = 64


def _annotator(cfg: AnnotationConfig):
    match cfg.annotator:
        case "rule":
            return RuleAnnotator()
        case "transformers":
            if not cfg.model:
                raise dg.Failure("annotator=transformers needs `model` (a local model directory)")
            return TransformersAnnotator(cfg.model)
        case "openai":
            if not (cfg.model and cfg.base_url):
                raise dg.Failure("annotator=openai needs `model` and `base_url`")
            return OpenAIAnnotator(cfg.base_url, cfg.model, requests_per_second=cfg.requests_per_second or None)
    raise dg.Failure(f"unknown annotator {cfg.annotator!r}; use rule, transformers or openai")


@dg.asset(group_name=GROUP, kinds={"parquet"})
def cot_annotations(context: dg.AssetExecutionContext, config: AnnotationConfig,
                    offline_trajectories: pa.Table) -> pa.Table:
    """Every offline transition with a reasoning trace R* explaining why a leads to s' and r (Eq. 5 targets).

    ``done`` is set to the env's own end (won or lost) first: a collector's step cap is not an outcome
    M_exp should learn to predict.
    """
    table = offline_trajectories.set_column(
        offline_trajectories.schema.get_field_index("done"), "done",
        pc.or_(offline_trajectories["won"], offline_trajectories["lost"]))
    annotator = _annotator(config)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) < config.batch_size:
            context.log.info(f"annotated {done}/{total} unique transitions")

    out = annotate_table(table, annotator, batch_size=config.batch_size, progress=progress)
    words = pc.list_value_length(pc.utf8_split_whitespace(out["reasoning"]))
    context.add_output_metadata({
        "annotator": annotator.name, "rows": out.num_rows,
        "mean_reasoning_words": float(pc.mean(words).as_py() or 0.0),
        "fallbacks": int(getattr(annotator, "fallbacks", 0)),
        "timing/annotate_s": round(time.perf_counter() - started, 2),
        "example": dg.MetadataValue.md("```\n" + out["target"][0].as_py() + "\n```"),
    })
    return out


class ExperienceModelConfig(dg.Config):
    """M_exp SFT (Eq. 5) on the CoT-annotated offline data; a from-scratch tiny Llama on CPU."""

    time_budget_s: float = 600.0
    """Training wall budget (the issue's CPU budget is 10 minutes)."""
    steps: int = 760
    """The cosine schedule decays to 0 at this step (about 600 s on 2 cores); the time budget also stops it."""
    batch_size: int = 16
    lr: float = 2e-3
    max_len: int = 384
    history_window: int = 2
    use_cot: bool = True
    """Ablation: False trains without reasoning traces."""
    use_history: bool = True
    """Ablation: False trains without the history window."""
    pointers: bool = True
    """Action arguments as @1/@2 pointers and item-level object edits (copy-free targets); False = literal."""
    win_weight: float = 10.0
    """Sampling weight of winning transitions (about 2% of twc data); 1 = uniform."""
    invalid_weight: float = 3.0
    task_writing_examples: int = 400
    """SFT examples that teach the same weights to write task variants (M_task); 0 = none."""
    task_writing_weight: float = 1.0
    vocab_size: int = 3000
    hidden: int = 256
    layers: int = 4
    seed: int = 0


def _config_key(cfg: dg.Config, rows: int) -> str:
    import hashlib
    import json

    blob = json.dumps({**cfg.model_dump(), "rows": rows}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dg.asset(group_name=GROUP, kinds={"pytorch", "accelerate"}, io_manager_key="checkpoint_io_manager")
def experience_model(context: dg.AssetExecutionContext, config: ExperienceModelConfig,
                     cot_annotations: pa.Table) -> CheckpointRef:
    """M_exp trained with Eq. 5 (reasoning and next-state terms logged apart).

    Checkpoints live under <data>/checkpoints/experience_model/<config hash>: a retried run resumes
    from its last checkpoint, and a finished one with the same config and data is reused.
    """
    import os

    from dreamgym_core.experience_model import PromptConfig, SFTConfig, sft_examples, train_sft
    from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, load_checkpoint, save_checkpoint, train_tokenizer
    from pipelines.resources import data_root

    root = os.path.join(data_root(), "checkpoints", "experience_model", _config_key(config, cot_annotations.num_rows))
    final = os.path.join(root, "final")
    if os.path.exists(os.path.join(final, "dreamgym.json")):
        _, _, meta = load_checkpoint(final)
        context.log.info(f"reusing finished M_exp at {final}")
        return CheckpointRef(path=final, kind="experience_model", metrics=meta.get("metrics", {}))
    rows = cot_annotations.to_pylist()
    pc_ = PromptConfig(history_window=config.history_window, use_cot=config.use_cot, use_history=config.use_history,
                       pointers=config.pointers)
    examples = sft_examples(rows, pc_)
    weights = [config.win_weight if r["won"] else config.invalid_weight if not r["valid"] else 1.0 for r in rows]
    if config.task_writing_examples:  # the same weights also learn to be M_task (curriculum, Eq. 6)
        from dreamgym_core.curriculum import task_writing_examples
        from dreamgym_core.schema import TRAJECTORY_ROWS_SCHEMA, trajectories_from_arrow

        trajs = trajectories_from_arrow(cot_annotations.select(TRAJECTORY_ROWS_SCHEMA.names))
        tasks = list({t.task.task_id: t.task for t in trajs}.values())
        starts = {t.task.task_id: t.steps[0].state for t in trajs if t.steps and t.steps[0].step_idx == 0}
        task_ex = task_writing_examples(tasks, starts, m=2, n=config.task_writing_examples, seed=config.seed)
        examples += task_ex
        weights += [config.task_writing_weight] * len(task_ex)
        context.log.info(f"{len(task_ex)} task-writing examples mixed in (M_task)")
    tok_dir = os.path.join(root, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tok = train_tokenizer((e.prompt + "\n" + e.reasoning + e.prediction for e in examples[:30000]), tok_dir,
                              vocab_size=config.vocab_size)
    model = build_tiny_llama(tok, TinyLlamaConfig(hidden=config.hidden, layers=config.layers), seed=config.seed)

    def progress(step: int, rec: dict) -> None:
        if step % 50 == 0:
            context.log.info(f"step {step}: loss {rec['loss']:.3f} (reasoning {rec['loss/reasoning']:.3f}, "
                             f"state {rec['loss/state']:.3f}) {rec['seconds']:.0f}s")

    res = train_sft(model, tok, examples,
                    SFTConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr, max_len=config.max_len,
                              time_budget_s=config.time_budget_s, seed=config.seed, checkpoint_every=100),
                    checkpoint_dir=os.path.join(root, "train"), progress=progress, sample_weights=weights)
    last = res.history[-1]
    metrics = {"loss": last["loss"], "loss/reasoning": last["loss/reasoning"], "loss/state": last["loss/state"],
               "steps": float(last["step"]), "timing/train_s": round(res.seconds, 1),
               "tokens_per_s": round(res.tokens / max(res.seconds, 1e-9), 1)}
    save_checkpoint(model, tok, final, {"metrics": metrics, "prompt": pc_.__dict__, "examples": len(examples)})
    context.add_output_metadata({"examples": len(examples), "resumed_from_step": res.resumed_from,
                                 "loss_curve": dg.MetadataValue.md(_curve(res.history))})
    return CheckpointRef(path=final, kind="experience_model", metrics=metrics)


def _curve(history: list[dict]) -> str:
    """A small Markdown table of the loss every ~10% of training (the UI has no chart for metadata)."""
    if not history:
        return ""
    stride = max(1, len(history) // 10)
    rows = history[::stride] + ([history[-1]] if (len(history) - 1) % stride else [])
    lines = ["| step | loss | reasoning | state |", "|---|---|---|---|"]
    lines += [f"| {h['step']} | {h['loss']:.3f} | {h['loss/reasoning']:.3f} | {h['loss/state']:.3f} |" for h in rows]
    return "\n".join(lines)


class FidelityConfig(dg.Config):
    max_transitions: int = 300
    """Held-out transitions scored: all wins and invalid actions up to a third each, the rest ordinary."""
    seed: int = 0


@dg.asset(group_name=GROUP, kinds={"parquet"})
def experience_model_eval(context: dg.AssetExecutionContext, config: FidelityConfig, experiment: Experiment,
                          experience_model: CheckpointRef, eval_tasks: pa.Table) -> pa.Table:
    """Single-step fidelity of M_exp on held-out real test transitions, beside the identity baseline."""
    import random

    from dreamgym_core.envs.twx import propose_candidates
    from dreamgym_core.experience_model import ExperienceModel, PromptConfig, SimConfig, fidelity
    from dreamgym_core.models import load_checkpoint

    from assets.runtime import heldout

    tasks = heldout(eval_tasks)
    env = make_env(experiment.env_spec())
    try:
        trajs, _ = collect(env, tasks, experiment.collect_config())
    finally:
        env.close()
    rows = trajectories_to_arrow(trajs).to_pylist()
    rng = random.Random(config.seed)
    third = config.max_transitions // 3
    wins = [i for i, r in enumerate(rows) if r["won"]]
    invalid = [i for i, r in enumerate(rows) if not r["valid"]]
    other = [i for i, r in enumerate(rows) if r["valid"] and not r["won"]]
    chosen = set(rng.sample(wins, min(third, len(wins))) + rng.sample(invalid, min(third, len(invalid))))
    chosen |= set(rng.sample(other, min(config.max_transitions - len(chosen), len(other))))
    model, tok, meta = load_checkpoint(experience_model.path)
    prompt = PromptConfig(**meta.get("prompt", {}))
    sim = ExperienceModel(model, tok, initial_state=lambda t: "", propose_candidates=propose_candidates,
                          cfg=SimConfig(prompt=prompt))
    started = time.perf_counter()
    metrics = fidelity(sim, rows, select=[i in chosen for i in range(len(rows))])
    elapsed = time.perf_counter() - started
    table = pa.Table.from_pylist([{"model": experience_model.path, "ablation": "full" if prompt.use_cot else "no_cot",
                                   **{k: float(v) for k, v in metrics.items()},
                                   "predictions_per_s": metrics["transitions"] / max(elapsed, 1e-9)}])
    context.add_output_metadata({k: float(v) for k, v in metrics.items() if v == v})
    return table
