"""Experience-model assets (paper §4.1-4.2): CoT annotation, the replay buffer's offline seed, M_exp SFT
(Eq. 5, with retrieved demonstrations D_k) and its fidelity."""
# No `from __future__ import annotations` in asset modules: Dagster reads the annotations at definition time.

import time

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from dreamgym_core.annotate import annotate_table, rule_annotator
from dreamgym_core.annotate_llm import OpenAIAnnotator, TransformersAnnotator
from dreamgym_core.collect import collect
from dreamgym_core.envs import make_env
from assets.loop import LoopSettings
from dreamgym_core.schema import FIDELITY_SCHEMA, CheckpointRef
from pipelines import reuse
from pipelines.resources import Experiment, Launcher
from pipelines.settings import core

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
    max_fallback_share: float = 0.2
    """LLM annotators: above this share of transitions given the rule trace instead (the model returned
    nothing usable), the asset fails rather than train M_exp on rule traces labelled as LLM ones."""


def _annotator(cfg: AnnotationConfig, table: pa.Table, channels):
    match cfg.annotator:
        case "rule":  # its twc-made parts only where the adapter declares them
            return rule_annotator(table, channels)
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
def cot_annotations(context: dg.AssetExecutionContext, config: AnnotationConfig, experiment: Experiment,
                    offline_trajectories: pa.Table) -> pa.Table:
    """Every offline transition with a reasoning trace R* explaining why a leads to s' and r (Eq. 5 targets).

    ``done`` is set to the env's own end (won or lost) first: a collector's step cap is not an outcome
    M_exp should learn to predict. The env's dense score and the rule annotator's twc-made parts are
    used only where the env's adapter declares them (``runtime.side_channels``; offline-only: none).
    """
    from assets.runtime import side_channels

    channels = side_channels(experiment)
    where = f"{experiment.env}/{experiment.game}" + (" (offline-only logs)" if experiment.offline else "")
    context.log.info(f"side channels of {where}: {', '.join(channels.offered()) or 'none'}")
    table = offline_trajectories.set_column(
        offline_trajectories.schema.get_field_index("done"), "done",
        pc.or_(offline_trajectories["won"], offline_trajectories["lost"]))
    annotator = _annotator(config, table, channels)
    started = time.perf_counter()

    seen = {"unique": 0}

    def progress(done: int, total: int) -> None:
        seen["unique"] = total   # unique transitions: the annotator is called once per each
        if done == total or done % max(1, total // 10) < config.batch_size:
            context.log.info(f"annotated {done}/{total} unique transitions")

    out = annotate_table(table, annotator, batch_size=config.batch_size, progress=progress,
                         use_score=channels.progress)
    fallbacks = int(getattr(annotator, "fallbacks", 0))
    unique = max(seen["unique"], 1)
    if config.annotator != "rule" and fallbacks / unique > config.max_fallback_share:
        raise dg.Failure(f"cot_annotations: the {config.annotator} annotator fell back to rule traces for "
                         f"{fallbacks} of {unique} unique transitions (> max_fallback_share {config.max_fallback_share}); "
                         "check the model / endpoint, or raise max_fallback_share on purpose")
    words = pc.list_value_length(pc.utf8_split_whitespace(out["reasoning"]))
    context.add_output_metadata({
        "annotator": annotator.name, "rows": out.num_rows,
        "mean_reasoning_words": float(pc.mean(words).as_py() or 0.0),
        "fallbacks": fallbacks, "fallback_share": round(fallbacks / unique, 4),
        "timing/annotate_s": round(time.perf_counter() - started, 2),
        "example": dg.MetadataValue.md("```\n" + out["target"][0].as_py() + "\n```"),
    })
    return out


class ReplaySeedConfig(dg.Config):
    embedder: str = "hashing"
    """(state, action) embedder of the replay buffer: "hashing" (no model, fast enough for every
    simulator step on 2 cores) or "minilm" (all-MiniLM-L6-v2, semantic, about 10x slower per query)."""


@dg.asset(group_name=GROUP, kinds={"lancedb"}, io_manager_key="checkpoint_io_manager")
def replay_seed(context: dg.AssetExecutionContext, config: ReplaySeedConfig,
                offline_trajectories: pa.Table) -> dg.Output[CheckpointRef]:
    """The replay buffer (paper §4.2) seeded with the offline real transitions, each embedded by its
    (state, action): what M_exp's SFT retrieves demonstrations from, and what the loop's buffer grows
    from. The reference pins the Lance version of the seed (tag ``iteration-0000``), so SFT reads
    exactly these rows whatever the loop adds later."""
    import os

    from assets.runtime import buffer_ref_path, open_buffer
    from dreamgym_core.schema import TRANSITION_SCHEMA
    from pipelines.resources import data_root

    path = buffer_ref_path(os.path.join(data_root(), "lancedb"), config.embedder)
    buf = open_buffer(CheckpointRef(path=path, kind="replay_buffer"))
    started = time.perf_counter()
    stored = buf.rows_by_source().get("offline", 0)
    reseed = stored != offline_trajectories.num_rows
    if reseed:  # an unchanged seed keeps its rows and its version
        cols = [c for c in TRANSITION_SCHEMA.names if c in offline_trajectories.column_names]
        buf.add(offline_trajectories.select(cols), "offline", 0, replace=True)
    version = buf.tag_iteration(0, move=reseed)
    metrics = {"version": float(version), "offline_rows": float(offline_trajectories.num_rows)}
    return dg.Output(CheckpointRef(path=path, kind="replay_buffer", metrics=metrics),
                     metadata={**metrics, "embedder": buf.embedder.model_name, "reseeded": reseed,
                               "timing/seed_s": round(time.perf_counter() - started, 2)})


class ExperienceModelConfig(dg.Config):
    """M_exp SFT (Eq. 5) on the CoT-annotated offline data; a from-scratch tiny Llama on CPU."""

    base_model: str = ""
    """'' = a from-scratch tiny Llama with a BPE trained on the examples (vocab_size/hidden/layers);
    "smollm2" = the packaged SmolLM2-135M-Instruct (converted once into <data>/cache/models); else a
    local causal-LM directory. A pretrained base keeps its own tokenizer and wants a far smaller lr."""
    time_budget_s: float = 600.0
    """Training wall budget (the issue's CPU budget is 10 minutes)."""
    steps: int = 4000
    """Step cap. Training stops at this step or at ``time_budget_s``, whichever comes first, and the
    cosine schedule anneals to 0 by the same rule (on 2 CPU cores the time budget binds)."""
    batch_size: int = 16
    lr: float = 2e-3
    max_len: int = 448
    """Tokens of prompt + target; a longer prompt loses its start. With k = 2 compact demos twc prompts
    measured median 209, max 291 tokens (142 / 183 without), plus a target of up to ~120."""
    history_window: int = 2
    num_demos: int = 2
    """k of D_k: demonstrations retrieved from ``replay_seed`` (by cosine of the (state, action)
    embedding, from other tasks than the example's own) into every SFT prompt. 0, or the loop's
    ``replay_buffer: false``, trains without retrieval (the paper's "w/o experience replay")."""
    use_cot: bool = True
    """Ablation: False trains without reasoning traces."""
    use_history: bool = True
    """Ablation: False trains without the history window."""
    pointers: bool = True
    """Action arguments as @1/@2 pointers and item-level object edits (copy-free targets); False = literal."""
    progress: bool = True
    """The env's dense score as progress in the prompt and the output (the win follows when it reaches
    100); False = the model decides the win alone, counting what is left from the object list."""
    placements: bool = True
    """Show what the training data says about the (item, receptacle) pair an action puts to the test
    (``## known``); the knowledge is saved with the checkpoint for the simulator. This and ``progress`` /
    ``affordances`` are side channels: on only where the env's adapter provides them (off with a
    logged reason otherwise; ``dreamgym_core.envs.base.SideChannels``)."""
    affordances: bool = True
    """Also show, for each object the action names, what the state says it is (carried, closed / open
    container, surface, loose here, inside Y): read off the prompt's own state; False = ablation."""
    win_weight: float = 3.0
    """Sampling weight of winning transitions (about 2.5% of twc data); 1 = uniform. A bias knob on
    "this put finishes the task", measured at the demo's 300 s budget (README): 10 -> win recall 1.00
    but precision 0.84 and a random policy "wins" 96% of M_exp episodes (real 12%); 1 -> recall 0.00;
    3 -> recall 0.47, precision 0.91, random-policy sim-real gap +0.04, BC +0.24."""
    invalid_weight: float = 3.0
    length_bucketing: bool = True
    """Cut each pool of weighted draws into batches by length (``experience_model._bucketed_draw``):
    the same sampling distribution with less padding, so more steps fit in ``time_budget_s``."""
    task_writing_examples: int = 400
    """SFT examples that teach the same weights to write task variants (M_task); 0 = none."""
    task_writing_weight: float = 1.0
    vocab_size: int = 3000
    hidden: int = 256
    layers: int = 4
    seed: int = 0


@dg.asset(group_name=GROUP, kinds={"pytorch", "accelerate"}, io_manager_key="checkpoint_io_manager")
def experience_model(context: dg.AssetExecutionContext, config: ExperienceModelConfig, launcher: Launcher,
                     loop: LoopSettings, experiment: Experiment, cot_annotations: pa.Table,
                     replay_seed: CheckpointRef) -> dg.Output[CheckpointRef]:
    """M_exp trained with Eq. 5 (reasoning and next-state terms logged apart).

    Checkpoints live under <data>/checkpoints/experience_model/<key> (``pipelines.reuse``: the config and
    the content of ``cot_annotations``): a retried run resumes from its last checkpoint, a finished one
    with the same key is reused, and a changed annotator (new traces) trains a new M_exp. With
    ``launcher.mode == "accelerate"`` training runs under ``accelerate launch`` through Dagster Pipes
    and the metadata is what rank 0 reported.
    """
    import os

    from assets.runtime import side_channels
    from dreamgym_core.experience.sft_setup import SFTDataConfig, prepare_sft
    from dreamgym_core.experience_model import PromptConfig, SFTConfig
    from dreamgym_core.models import TinyLlamaConfig, load_checkpoint
    from pipelines.resources import data_root

    num_demos = config.num_demos if loop.replay_buffer else 0  # one switch for SFT and simulation
    root = reuse.stage_dir(context, "experience_model", reuse.stage_key(
        "experience_model", (config, {"num_demos": num_demos}), cot_annotations=cot_annotations,
        replay_seed=replay_seed if num_demos else None))
    final = os.path.join(root, "final")
    if os.path.exists(os.path.join(final, "dreamgym.json")):
        _, _, meta = load_checkpoint(final)
        reuse.reused(context, "experience_model", final)
        return dg.Output(CheckpointRef(path=final, kind="experience_model", metrics=meta.get("metrics", {})),
                         metadata={"reused": True})
    channels = side_channels(experiment)  # the adapter says which of twc's extra inputs exist here
    retrieve = None
    if num_demos:  # D_k from the offline seed as written, never from the example's own task
        from assets.runtime import open_buffer
        from dreamgym_core.experience.retrieval import Retriever

        retrieve = Retriever(open_buffer(replay_seed), as_of_version=int(replay_seed.metrics["version"]),
                             source="offline", exclude_own_task=True)
    setup = prepare_sft(cot_annotations, core(PromptConfig, config, num_demos=num_demos), core(SFTDataConfig, config),
                        core(TinyLlamaConfig, config), root, channels=channels, retrieve=retrieve,
                        replay=replay_seed.path if num_demos else "",
                        replay_version=int(replay_seed.metrics.get("version", 0)) if num_demos else 0,
                        cache_dir=os.path.join(data_root(), "cache", "models"), log=context.log.info)
    metrics, history, extra = _train_sft(context, launcher, root, setup, core(SFTConfig, config, checkpoint_every=100))
    # an Output, not a bare value: after a Pipes session Dagster requires a typed event stream
    return dg.Output(CheckpointRef(path=final, kind="experience_model", metrics=metrics),
                     metadata={"examples": len(setup.examples), **extra, "num_demos": num_demos,
                               "side_channels": ", ".join(channels.offered()) or "none",
                               "prompt_side_channels": ", ".join(n for n in ("progress", "placements", "affordances")
                                                                 if getattr(setup.prompt, n)) or "none",
                               "prompt_tokens_max": setup.prompt_tokens_max(),
                               "example_prompt": dg.MetadataValue.md("```\n" + setup.examples[0].prompt + "\n```"),
                               "loss_curve": dg.MetadataValue.md(_curve(history))})


def _train_sft(context: dg.AssetExecutionContext, launcher: Launcher, root: str, setup,
               sft_cfg) -> tuple[dict, list[dict], dict]:
    """``train_sft`` on ``setup`` (``experience.sft_setup.SFTSetup``), in this process or under
    ``accelerate launch``; the final checkpoint goes to ``root/final``. Returns (metrics, loss history,
    extra metadata)."""
    import os

    from dreamgym_core.experience_model import train_sft
    from dreamgym_core.models import save_checkpoint
    from pipelines.accelerate_entry import SFT_LOG_EVERY, sft_log_line, sft_metrics

    if launcher.mode == "accelerate":
        reported = _launch_sft(context, launcher, root, setup.examples, setup.weights, setup.model, setup.tokenizer,
                               sft_cfg, setup.meta)
        return reported["metrics"], reported["history"], {"resumed_from_step": reported["resumed_from_step"],
                                                          "world_size": reported["world_size"]}

    def progress(step: int, rec: dict) -> None:
        if step % SFT_LOG_EVERY == 0:
            context.log.info(sft_log_line(step, rec))

    res = train_sft(setup.model, setup.tokenizer, setup.examples, sft_cfg, checkpoint_dir=os.path.join(root, "train"),
                    progress=progress, sample_weights=setup.weights)
    metrics = sft_metrics(res)
    save_checkpoint(setup.model, setup.tokenizer, os.path.join(root, "final"), {"metrics": metrics, **setup.meta})
    return metrics, res.history, {"resumed_from_step": res.resumed_from}


def _launch_sft(context: dg.AssetExecutionContext, launcher: Launcher, root: str, examples, weights, model, tok,
                sft_cfg, meta: dict) -> dict:
    """train_sft under ``accelerate launch`` (pipelines.accelerate_entry ``sft``). The examples and the
    initial weights go to files every rank reads; returns rank 0's report as plain values."""
    import os
    from dataclasses import asdict

    from dreamgym_core.io import write_parquet_atomic
    from dreamgym_core.models import save_checkpoint

    rows = [{**asdict(e), "weight": float(w)} for e, w in zip(examples, weights)]
    init_dir = os.path.join(root, "init")
    if not os.path.exists(os.path.join(init_dir, "dreamgym.json")):
        save_checkpoint(model, tok, init_dir, {"kind": "experience_model_init"})
    spec = {"examples": write_parquet_atomic(pa.Table.from_pylist(rows), os.path.join(root, "sft_examples.parquet")),
            "init_dir": init_dir, "sft": asdict(sft_cfg), "checkpoint_dir": os.path.join(root, "train"),
            "out_dir": os.path.join(root, "final"), "metadata": meta}
    done = launcher.run(context, "sft", spec, os.path.join(root, "sft_spec.json"))
    if not os.path.exists(os.path.join(spec["out_dir"], "dreamgym.json")):
        raise dg.Failure(f"accelerate sft exited without writing {spec['out_dir']}")
    return {k: v.value for k, v in done.get_materialize_result().metadata.items()}


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
    """``dreamgym_core.evaluation.FidelityEvalConfig`` (the same fields, documented there)."""

    max_transitions: int = 300
    drift_trajectories: int = 40
    drift_steps: int = 10
    gap_tasks: int = 50
    gap_max_steps: int = 20
    gap_episodes: int = 4
    seed: int = 0


def ablation_name(prompt) -> str:
    """Which of the paper's M_exp ingredients this model drops (``full`` = none)."""
    off = [name for name, on in (("no_cot", prompt.use_cot), ("no_history", prompt.use_history and prompt.history_window > 0),
                                 ("no_retrieval", prompt.num_demos > 0), ("literal", prompt.pointers),
                                 ("no_progress", getattr(prompt, "progress", True)),
                                 ("no_placements", getattr(prompt, "placements", True)),
                                 ("no_affordances", getattr(prompt, "affordances", True))) if not on]
    return "+".join(off) or "full"


@dg.asset(group_name=GROUP, kinds={"parquet"})
def experience_model_eval(context: dg.AssetExecutionContext, config: FidelityConfig, experiment: Experiment,
                          experience_model: CheckpointRef, eval_tasks: pa.Table,
                          policy_init: CheckpointRef) -> pa.Table:
    """M_exp against held-out real experience, each number beside the "nothing changes" baseline:
    single-step fidelity (overall and per action verb), multi-step drift of an open-loop replay of
    real trajectories, and the sim-real gap of fixed policies (random, the behaviour-cloned SFT policy).

    Offline-only (``experiment.logs``): the held-out real experience is the held-out logs, and the
    sim-real gap (which needs a live env) is left out with a log line unless ``live_scoring`` names one."""
    from assets.runtime import SimulatorFactory, heldout, real_env_factory, real_start_states, scoring_env_factory
    from dreamgym_core.evaluation import FidelityEvalConfig, model_fidelity
    from dreamgym_core.models import load_checkpoint

    tasks = heldout(eval_tasks)
    if experiment.offline:
        ids = {t.task_id for t in tasks}
        trajs = [t for t in experiment.log_split().test if t.task.task_id in ids]
        context.log.info(f"scoring M_exp on {sum(len(t) for t in trajs)} held-out logged transitions of "
                         f"{len(tasks)} tasks")
        make_real = scoring_env_factory(experiment, "experience_model_eval's sim-real gap", context.log.info)
    else:
        env = make_env(experiment.env_spec())
        try:
            trajs, _ = collect(env, tasks, experiment.collect_config())
        finally:
            env.close()
        make_real = real_env_factory(experiment)
    sims = SimulatorFactory(experience_model, experiment, retrieve="seed")  # D_k as M_exp was trained with
    model, tok, _ = load_checkpoint(policy_init.path)
    rep = model_fidelity(trajs, tasks, sims, make_real, lambda ts: real_start_states(experiment, ts),
                         (model, tok), core(FidelityEvalConfig, config),
                         {"model": experience_model.path, "ablation": ablation_name(sims.prompt)}, log=context.log.info)
    gaps = {f"{k}/{r['policy']}": r[k] for r in rep.rows if r.get("policy")
            for k in ("sim_real_gap", "sim_only_wins", "real_only_wins", "both_won", "same_actions")}
    drift = rep.drift
    context.add_output_metadata({
        **{k: float(v) for k, v in rep.overall.items() if v == v}, **gaps,
        "drift/agree_at_5": float(drift[min(4, len(drift) - 1)]["agree_so_far"]) if drift else float("nan"),
        "by_action": dg.MetadataValue.md(_fidelity_md(rep.rows)),
        "drift_plot": dg.MetadataValue.md(_drift_md(drift)),
    })
    return pa.Table.from_pylist(rep.rows, schema=FIDELITY_SCHEMA)


def _fmt(v) -> str:
    return "" if v is None or v != v else f"{v:.2f}"


def _fidelity_md(rows: list[dict]) -> str:
    cols = ("state_exact_match", "reward_accuracy", "win_recall", "invalid_action_accuracy", "valid_rate")
    lines = ["| scope | n | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        if r["scope"] == "overall" or r["scope"].startswith("action:"):
            lines.append(f"| {r['scope']} | {r['transitions']} | " + " | ".join(
                f"{_fmt(r.get(c))} ({_fmt(r.get('baseline_' + c))})" for c in cols) + " |")
    lines += ["", "| policy | episodes | success in M_exp | success in the real env | sim-real gap | "
              "pairs won in both / only M_exp / only real | same actions |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['episodes']} | {_fmt(r['sim_success_rate'])} | {_fmt(r['real_success_rate'])} | "
              f"{_fmt(r['sim_real_gap'])} | {r.get('both_won')} / {r.get('sim_only_wins')} / {r.get('real_only_wins')} | "
              f"{_fmt(r.get('same_actions'))} |" for r in rows if r.get("policy")]
    return "Each cell: M_exp (baseline \"nothing changes\").\n\n" + "\n".join(lines)


def _drift_md(drift: list[dict]) -> str:
    if not drift:
        return "no trajectories"
    from pipelines.report import drift_plot, png_markdown

    return png_markdown(drift_plot(drift), "multi-step drift")
