"""`dreamgym report`: one self-contained HTML page with the run's tables and plots.

Everything is read back from the Parquet assets with DuckDB (the same views as `dreamgym sql`), so
the report shows exactly what a user can query. Plots are PNGs embedded as base64; the same PNGs
go into asset metadata (Markdown) where the UI shows them.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time

import duckdb


def png_markdown(png: bytes, alt: str) -> str:
    """A PNG as a Markdown image (Dagster renders it in asset metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def success_plot(rows: list[dict]) -> bytes:
    """Real held-out success per iteration (with 95% CI) and success in M_exp on the same tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    it = [r for r in rows if r["policy"] == "dreamgym" and r["mode"] == "greedy"]
    it.sort(key=lambda r: r["iteration"])
    real = [r for r in it if r["success_rate"] is not None]  # none on the offline-only path (no live env)
    if real:
        xs = [r["iteration"] for r in real]
        ax.plot(xs, [r["success_rate"] for r in real], "o-", label="DreamGym, real env")
        ax.fill_between(xs, [r["ci_low"] for r in real], [r["ci_high"] for r in real], alpha=0.2)
    if it:
        sim = [(r["iteration"], r["sim_success_rate"]) for r in it if r["sim_success_rate"] is not None]
        if sim:
            ax.plot([a for a, _ in sim], [b for _, b in sim], "s--", label="DreamGym, in M_exp")
    for name, style in (("random", ":"), ("sft", "-."), ("s2r", "--"), ("real_rl", "-")):
        base = [r for r in rows if r["policy"] == name and r["mode"] in ("greedy", "sampled")]
        if base:
            r = next((b for b in base if b["mode"] == "greedy"), base[0])
            value, where = (r["success_rate"], "") if r["success_rate"] is not None else \
                (r["sim_success_rate"], " in M_exp")
            if value is None:
                continue
            # in the legend, not as text on the lines: baselines often sit within a point of each other
            ax.axhline(value, linestyle=style, color="gray", linewidth=1, label=f"{name}{where} {value:.2f}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # iterations are whole numbers
    ax.set_xlabel("iteration")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the axes, off the lines
    ax.set_title("Held-out success (greedy)")
    return _fig_png(fig)


def variance_plot(variances: list[float], threshold: float | None = None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(variances, bins=10, range=(0, 0.25))
    if threshold is not None:
        ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.2f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("reward variance V_tau (Eq. 7)")
    ax.set_ylabel("tasks")
    return _fig_png(fig)


def fidelity_plot(row: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["state_exact_match", "state_token_f1", "reward_accuracy", "win_recall", "invalid_action_accuracy"]
    names = [n for n in names if n in row]
    fig, ax = plt.subplots(figsize=(6.5, 3))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [row[n] or 0 for n in names], width=0.4, label="M_exp")
    ax.bar([x + 0.2 for x in xs], [row.get("baseline_" + n) or 0 for n in names], width=0.4,
           label="'nothing changes' baseline")
    ax.set_xticks(list(xs), [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("M_exp single-step fidelity on held-out real transitions")
    return _fig_png(fig)


def drift_plot(drift: list[dict]) -> bytes:
    """Open-loop replay: how often M_exp's state still equals the real one after t real actions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    xs = [d["step"] for d in drift]
    ax.plot(xs, [d["content_exact_match"] for d in drift], "o-", label="M_exp: state matches at step t")
    ax.plot(xs, [d["agree_so_far"] for d in drift], "s-", label="M_exp: matched at every step up to t")
    ax.plot(xs, [d["baseline_content_exact_match"] for d in drift], ":", color="gray",
            label="baseline: the start state never changes")
    ax.set_xlabel("replay step t (real actions, M_exp's own states)")
    ax.set_ylabel("share of trajectories")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Multi-step drift on held-out real trajectories")
    return _fig_png(fig)


def _table_html(rel: duckdb.DuckDBPyRelation | None) -> str:
    if rel is None:
        return "<p><em>not materialized yet</em></p>"
    cols, rows = rel.columns, rel.fetchall()

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(data_dir: str, out_path: str) -> str:
    """Write the HTML report; returns its path. Sections whose assets are missing say so."""
    from dreamgym_core.sql import create_views

    con = duckdb.connect()
    views = set(create_views(con, data_dir))

    def q(sql: str, *needs: str):
        return con.sql(sql) if all(n in views for n in needs) else None

    parts = [f"<h1>DreamGym run report</h1><p>data: <code>{html.escape(os.path.abspath(data_dir))}</code>, "
             f"written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    parts.append("<h2>Held-out real success</h2>")
    ev = q("SELECT policy, iteration, mode, episodes, success_rate, ci_low, ci_high, sim_success_rate, sim_real_gap, "
           "real_transitions, mean_steps FROM policy_eval ORDER BY policy, iteration, mode", "policy_eval")
    if ev is None:
        ev = q("SELECT policy, iteration, mode, episodes, success_rate, ci_low, ci_high, sim_success_rate, "
               "sim_real_gap, real_transitions, mean_steps FROM iteration_eval ORDER BY iteration", "iteration_eval")
    parts.append(_table_html(ev))
    if ev is not None:
        rows = [dict(zip(ev.columns, r)) for r in ev.fetchall()]
        parts.append(f'<img alt="success" src="data:image/png;base64,{base64.b64encode(success_plot(rows)).decode()}">')
    parts.append("<h2>Experience model M_exp</h2>")
    metrics = ("state_exact_match, baseline_state_exact_match, content_exact_match, baseline_content_exact_match, "
               "reward_accuracy, win_recall, win_precision, invalid_action_accuracy, valid_rate")
    fid = q(f"SELECT scope, transitions, {metrics} FROM experience_model_eval "
            "WHERE scope = 'overall' OR scope LIKE 'action:%' ORDER BY scope <> 'overall', scope", "experience_model_eval")
    parts.append("<h3>Single steps (teacher-forced), overall and per action verb</h3>" + _table_html(fid))
    if fid is not None:
        one = con.sql("SELECT * FROM experience_model_eval WHERE scope = 'overall'")
        rec = one.fetchone()
        if rec is not None:
            row = dict(zip(one.columns, rec))
            parts.append(f'<img alt="fidelity" src="data:image/png;base64,'
                         f'{base64.b64encode(fidelity_plot(row)).decode()}">')
        gap = con.sql("SELECT policy, episodes, sim_success_rate, real_success_rate, sim_real_gap "
                      "FROM experience_model_eval WHERE scope LIKE 'policy:%' ORDER BY policy")
        parts.append("<h3>Sim-real gap of fixed policies (same held-out tasks)</h3>" + _table_html(gap))
        drift_rel = con.sql("SELECT step, transitions AS trajectories, content_exact_match, agree_so_far, sim_alive, "
                            "baseline_content_exact_match FROM experience_model_eval WHERE scope LIKE 'drift:%' "
                            "ORDER BY step")
        drift = [dict(zip(drift_rel.columns, r)) for r in drift_rel.fetchall()]
        parts.append("<h3>Multi-step drift (open-loop replay of real trajectories)</h3>")
        if drift:
            parts.append(f'<img alt="drift" src="data:image/png;base64,{base64.b64encode(drift_plot(drift)).decode()}">')
    parts.append("<h2>Synthetic rollouts per iteration</h2>")
    parts.append(_table_html(q(
        "SELECT iteration, policy, count(*) AS episodes, avg(success::int) AS success_rate, avg(num_steps) AS mean_steps, "
        "avg(valid_rate) AS valid_rate FROM trajectories WHERE asset = 'rollouts' GROUP BY ALL ORDER BY iteration",
        "trajectories", "rollouts")))
    parts.append("<h2>Curriculum</h2>")
    ts = q("SELECT iteration, count(*) AS tasks, avg(variance) AS mean_variance, sum(selected::int) AS seeds "
           "FROM task_scores GROUP BY ALL ORDER BY iteration", "task_scores")
    parts.append(_table_html(ts))
    var = q("SELECT variance FROM task_scores", "task_scores")
    if var is not None:
        vs = [r[0] for r in var.fetchall()]
        if vs:
            parts.append(f'<img alt="variance" src="data:image/png;base64,'
                         f'{base64.b64encode(variance_plot(vs)).decode()}">')
    parts.append(_table_html(q("SELECT iteration, task_id, parent_task_id, source, left(initial_state, 120) AS initial_state "
                               "FROM tasks WHERE asset = 'synthesized_tasks' ORDER BY iteration, task_id LIMIT 30",
                               "tasks", "synthesized_tasks")))
    css = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px}"
           "th{background:#f3f3f3}img{max-width:100%;margin:0.5em 0}")
    doc = f"<!doctype html><html><head><meta charset='utf-8'><title>DreamGym report</title><style>{css}</style></head>" \
          f"<body>{''.join(parts)}</body></html>"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, out_path)
    return out_path
