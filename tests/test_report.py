import pyarrow as pa

from dreamgym_core.io import write_parquet_atomic
from dreamgym_core.evaluation import eval_table
from pipelines.report import png_markdown, success_plot, write_report


def _row(policy, it, sr, sim=None, mode="greedy", real=0):
    return {"policy": policy, "iteration": it, "mode": mode, "episodes": 50, "success_rate": sr, "ci_low": sr / 2,
            "ci_high": min(1.0, sr + 0.1), "mean_return": sr, "mean_steps": 12.0, "invalid_action_rate": 0.0,
            "real_transitions": real, "sim_success_rate": sim, "sim_real_gap": None if sim is None else sim - sr}


def test_report_has_the_results_and_the_plots(tmp_path):
    rows = [_row("random", 0, 0.12, mode="sampled"), _row("sft", 0, 0.4, 0.5), _row("dreamgym", 1, 0.44, 0.6),
            _row("dreamgym", 2, 0.5, 0.62), _row("s2r", 2, 0.56, real=500), _row("real_rl", 0, 0.52, real=2000)]
    write_parquet_atomic(eval_table(rows), str(tmp_path / "parquet" / "policy_eval.parquet"))
    out = write_report(str(tmp_path), str(tmp_path / "r" / "report.html"))
    html = open(out).read()
    assert "Held-out real success" in html and "real_rl" in html and "2000" in html
    assert html.count("data:image/png;base64,") == 1  # the success plot; fidelity not materialized
    assert "not materialized yet" in html


def test_plot_is_a_png_and_embeds_as_markdown():
    png = success_plot([_row("dreamgym", 1, 0.3, 0.4), _row("sft", 0, 0.2)])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_markdown(png, "x").startswith("![x](data:image/png;base64,")


def test_report_shows_fidelity_sections_drift_and_gap(tmp_path):
    from dreamgym_core.schema import FIDELITY_SCHEMA

    base = {"model": "m", "ablation": "full"}
    rows = [{**base, "scope": "overall", "transitions": 300, "state_exact_match": 0.9, "baseline_state_exact_match": 0.1,
             "win_recall": 0.95, "invalid_action_accuracy": 0.97},
            {**base, "scope": "action:put", "transitions": 80, "state_exact_match": 0.85},
            {**base, "scope": "drift:1", "step": 1, "transitions": 40, "content_exact_match": 0.9, "agree_so_far": 0.9,
             "baseline_content_exact_match": 0.3},
            {**base, "scope": "drift:2", "step": 2, "transitions": 38, "content_exact_match": 0.8, "agree_so_far": 0.7,
             "baseline_content_exact_match": 0.2},
            {**base, "scope": "policy:random", "policy": "random", "episodes": 50, "sim_success_rate": 0.2,
             "real_success_rate": 0.16, "sim_real_gap": 0.04}]
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=FIDELITY_SCHEMA),
                         str(tmp_path / "parquet" / "experience_model_eval.parquet"))
    html = open(write_report(str(tmp_path), str(tmp_path / "report.html"))).read()
    assert "action:put" in html and "Sim-real gap" in html and "0.040" in html
    assert html.count("data:image/png;base64,") == 2  # the fidelity bars and the drift curve
