import pyarrow as pa

from dreamgym_core.io import write_parquet_atomic
from dreamgym_core.loop import eval_table
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
