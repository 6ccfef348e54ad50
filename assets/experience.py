"""Experience-model assets (paper §4.1): CoT annotation of the offline data.

The SFT (`experience_model`) and fidelity (`experience_model_eval`) assets build on this table.
"""
# No `from __future__ import annotations` in asset modules: Dagster reads the annotations at definition time.

import time

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from dreamgym_core.annotate import OpenAIAnnotator, RuleAnnotator, TransformersAnnotator, annotate_table

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
