"""docs/results.md and its plots, generated from the rows committed under results/ (never typed by hand).

    dreamgym results [--results results] [--out docs/results.md]

Each ``results/<name>.csv`` that this module knows becomes one section (an experiment's
``<testbed>.csv``, recognized by its columns, is rendered with its ``_pooled`` and ``_paired`` tables);
an unknown CSV is listed with its row count so nothing committed is silently left out. Plots are PNG files beside the Markdown.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Sequence

from dreamgym_core.experiment import ROW_COLUMNS, TESTBEDS
from dreamgym_core.experiment_results import claims_table


def _rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _num(v: str) -> float | None:
    return None if v in ("", None) else float(v)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "" if v is None else "–" if v != v else f"{v:.{digits}f}"  # nan: undefined (no positive prediction)


def learner_section(rows: Sequence[dict], png_dir: str, rel_dir: str) -> str:
    """One line per curve (testbed, setting, seed): dev success before and after, train success over
    the first and last rounds, transitions, wall time; plus a plot of the curves."""
    curves: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        curves[(r["testbed"], r["setting"], r["seed"])].append(r)
    out = ["## The learner check", "",
           "RL (GRPO, `dreamgym_core.learner_check`) on train tasks, a fixed batch replayed every round or",
           "(column `train games`, N of M) drawn afresh each round from M train games, through the code",
           "path every arm uses (`loop.rl_in_real_env`). `lamp` starts from an untrained",
           "policy on a task with a known optimum (1.0); `twc` from a weak behaviour-cloned policy (300 BC",
           "steps). Dev success is greedy on games never trained on, with its 95% Wilson interval;",
           "train success is the sampled success of the round's rollouts (mean of the first / last 3 rounds).",
           "", "| testbed | setting | seed | train games | rounds | real transitions | train success (first -> last) | "
           "dev success before | dev success after [95% CI] | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (testbed, setting, seed), rs in sorted(curves.items()):
        rs = sorted(rs, key=lambda r: int(r["round"]))
        train = [_num(r["train_success"]) for r in rs if _num(r["train_success"]) is not None]
        dev = [(int(r["round"]), _num(r["dev_success"]), _num(r["dev_ci_low"]), _num(r["dev_ci_high"]))
               for r in rs if _num(r["dev_success"]) is not None]
        first, last = (sum(train[:3]) / len(train[:3]), sum(train[-3:]) / len(train[-3:])) if train else (None, None)
        d0 = dev[0] if dev and dev[0][0] == 0 else None
        d1 = dev[-1] if dev and dev[-1][0] > 0 else None
        pool = int(float(rs[-1].get("pool") or 0))
        games = f"{rs[-1]['tasks']} of {pool}" if pool else f"{rs[-1]['tasks']} fixed"
        out.append(f"| {testbed} | {setting} | {seed} | {games} | {rs[-1]['round']} | {int(float(rs[-1]['transitions'])):,} | "
                   f"{_fmt(first, 2)} -> {_fmt(last, 2)} | {_fmt(d0[1]) if d0 else ''} | "
                   + (f"{_fmt(d1[1])} [{_fmt(d1[2], 2)}, {_fmt(d1[3], 2)}]" if d1 else "")
                   + f" | {float(rs[-1]['wall_s']):.0f} |")
    png = _learner_plot(curves)
    if png:
        name = "learner_curves.png"
        with open(os.path.join(png_dir, name), "wb") as f:
            f.write(png)
        out += ["", f"![learning curves]({rel_dir}/{name})"]
    settings = sorted({r["setting"] for r in rows})
    out += ["", "Settings (RLConfig fields that differ from the defaults): " + "; ".join(
        f"`{s}`: " + _setting_text(next(r for r in rows if r["setting"] == s)) for s in settings), ""]
    return "\n".join(out)


def _setting_text(r: dict) -> str:
    return (f"lr {r['lr']}, KL {r['kl_coef']}, GiGPO weight {r['step_advantage_weight']}, "
            f"{r['ppo_epochs']} epoch(s) of minibatches of {r['minibatch_size']}, {r['tasks']} tasks x {r['group_size']}")


def _learner_plot(curves: dict) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    testbeds = sorted({k[0] for k in curves})
    cols = min(3, len(testbeds))
    rows_ = -(-len(testbeds) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(6 * cols, 4 * rows_), squeeze=False)
    for ax in axes.flat[len(testbeds):]:
        ax.axis("off")
    for ax, tb in zip(axes.flat, testbeds):
        for (t, setting, seed), rs in sorted(curves.items()):
            if t != tb:
                continue
            rs = sorted(rs, key=lambda r: int(r["round"]))
            xs = [float(r["transitions"]) for r in rs if r["train_success"] != ""]
            ys = [float(r["train_success"]) for r in rs if r["train_success"] != ""]
            line, = ax.plot(xs, ys, label=f"{setting} s{seed} train")
            dev = [(float(r["transitions"]), float(r["dev_success"])) for r in rs if r["dev_success"] != ""]
            if dev:
                ax.plot(*zip(*dev), "o--", color=line.get_color(), label=f"{setting} s{seed} dev")
        ax.set_title(tb)
        ax.set_xlabel("real transitions")
        ax.set_ylabel("success")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def mexp_retrieval_section(rows: Sequence[dict], png_dir: str, rel_dir: str) -> str:
    """M_exp with and without retrieved demonstrations (and without the twc placement lookup): one line
    per variant, single-step fidelity on held-out transitions and the sim-real gap of two policies."""
    by: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by[r["variant"]][r["scope"]] = r
    out = ["## What retrieval buys M_exp", "",
           "Each variant is the demo's M_exp trained on the same data for the same wall budget, one after",
           "the other on the same machine, then scored by `experience_model_eval` (150 held-out transitions;",
           "the random and behaviour-cloned policies on the same 15 held-out games in M_exp and the real env).",
           "", "| variant | SFT steps | exact match | reward accuracy | win recall | invalid-action accuracy | "
           "random: M_exp / real (gap) | BC: M_exp / real (gap) |", "|---|---|---|---|---|---|---|---|"]

    def gap(r: dict | None) -> str:
        if not r:
            return ""
        return f"{_fmt(_num(r['sim_success_rate']), 2)} / {_fmt(_num(r['real_success_rate']), 2)} " \
               f"({float(r['sim_real_gap']):+.2f})"
    for name, scopes in by.items():
        o = scopes.get("overall", {})
        out.append(f"| {name} | {o.get('sft_steps', '')} | {_fmt(_num(o.get('state_exact_match', '')))} | "
                   f"{_fmt(_num(o.get('reward_accuracy', '')))} | {_fmt(_num(o.get('win_recall', '')))} | "
                   f"{_fmt(_num(o.get('invalid_action_accuracy', '')))} | {gap(scopes.get('policy:random'))} | "
                   f"{gap(scopes.get('policy:bc'))} |")
    out.append("")
    return "\n".join(out)


ARM_TEXT = {"init": "pi0", "sft": "SFT on all demos", "real_rl": "RL in the real env (B)",
            "dreamgym": "DreamGym (0 real)", "s2r": "DreamGym-S2R (<= 0.1 B real)",
            "no_replay": "w/o experience replay", "no_cot": "w/o reasoning", "no_curriculum": "w/o task generation",
            "sampled_mexp": "M_exp sampled (not a paper row)",
            "s2r_explore": "S2R, real rounds at temperature 2 (not a paper row)",
            "shared_mexp": "M_exp sampled, noise shared per task and step (not a paper row)"}


POST_HOC = ("sampled_mexp", "s2r_explore", "shared_mexp")
"""Arms that are not paper rows, added after a diagnosis on test games (marked in the README)."""


def _arm_order(arm: str, algorithm: str) -> tuple[int, str]:
    order = list(ARM_TEXT)
    return (order.index(arm) if arm in order else len(order), algorithm)


def _siblings(results_dir: str, testbed: str, kind: str) -> list[dict]:
    """Rows of ``<testbed>_<kind>.csv`` (paired, pooled), [] when absent."""
    path = os.path.join(results_dir, f"{testbed}_{kind}.csv")
    return _rows(path) if os.path.exists(path) else []


def _claims(testbed: str, rows: Sequence[dict], pooled: Sequence[dict], paired: Sequence[dict]) -> list[dict]:
    return claims_table(testbed, rows, pooled, paired, budget=TESTBEDS[testbed].budget if testbed in TESTBEDS else None)


def experiment_section(testbed: str, rows: Sequence[dict], results_dir: str, png_dir: str, rel_dir: str) -> str:
    """One testbed's arms (``dreamgym experiment TESTBED``): success pooled over seeds with its
    bootstrap interval and the mean cost per arm; every seed against init and real_rl on the same
    games; a plot of the pooled success with each seed's."""
    pooled = {(r["arm"], r["algorithm"]): r for r in _siblings(results_dir, testbed, "pooled")}
    by_arm: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_arm[(r["arm"], r["algorithm"])].append(r)

    def mean(rs: list[dict], key: str) -> float:
        return sum(float(r[key]) for r in rs) / len(rs)

    sampled = testbed.endswith("_sampled")  # scripts/sampled_scores.py: the arms' policies re-scored sampled
    how = (f"`python scripts/sampled_scores.py {testbed.removesuffix('_sampled')}`: the finished arms of "
           f"`dreamgym experiment {testbed.removesuffix('_sampled')}` re-scored with the sampled policy (one episode "
           "a game)" if sampled else
           f"`dreamgym experiment {testbed}` (`dreamgym_core.experiment`): every RL arm from the same pi0, scored greedy")
    out = [f"## Experiment: {testbed}", "", how,
           "on the same held-out test games. Success is pooled over seeds (mean of the seeds' rates) with a 95%",
           "bootstrap interval over seeds and games; cost columns are means per seed (real transitions the",
           "policy trained on, synthetic transitions in M_exp, wall seconds and counted model FLOPs of training).",
           "", "| arm | algorithm | seeds | games per seed | success [95% CI] | per seed | real transitions | "
           "synthetic transitions | wall s | FLOPs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(by_arm, key=lambda k: _arm_order(*k)):
        rs = sorted(by_arm[key], key=lambda r: int(r["seed"]))
        pool = pooled.get(key)
        cell = f"{float(pool['success']):.3f} [{float(pool['ci_low']):.2f}, {float(pool['ci_high']):.2f}]" if pool else ""
        out.append(f"| {key[0]} ({ARM_TEXT.get(key[0], '')}) | {key[1]} | {len(rs)} | {rs[0]['games']} | {cell} | "
                   + ", ".join(f"{float(r['success']):.3f}" for r in rs)
                   + f" | {mean(rs, 'real_transitions'):,.0f} | {mean(rs, 'synthetic_transitions'):,.0f} | "
                   f"{mean(rs, 'wall_s'):,.1f} | {mean(rs, 'flops'):.3g} |")
    paired = _siblings(results_dir, testbed, "paired")
    if paired:
        out += ["", "Paired on the same games (same seed): games only the arm won / only the baseline won, exact "
                "McNemar p.", "", "| arm | algorithm | seed | vs init | vs real_rl |", "|---|---|---|---|---|"]
        cells: dict[tuple, dict[str, str]] = defaultdict(dict)
        for r in paired:
            cells[(r["arm"], r["algorithm"], int(r["seed"]))][r["baseline"]] = \
                f"+{r['only_arm']} / -{r['only_baseline']}, p={float(r['p_value']):.3f}"
        for (arm, algo, seed), c in sorted(cells.items(), key=lambda kv: (_arm_order(*kv[0][:2]), kv[0][2])):
            out.append(f"| {arm} | {algo} | {seed} | {c.get('init', '')} | {c.get('real_rl', '')} |")
    claims = _claims(testbed, rows, list(pooled.values()), paired)
    if claims:
        out += ["", "Against the paper's claims (pooled success; an arm with fewer than 3 seeds is not measured):",
                "", "| algorithm | claim | needed | measured | verdict |", "|---|---|---|---|---|"]
        out += [f"| {c['algorithm']} | {c['claim']} | {c['needed']} | {c['measured']} | **{c['verdict']}** |"
                for c in claims]
    png = _experiment_plot(testbed, by_arm, pooled)
    if png:
        name = f"experiment_{testbed}.png"
        with open(os.path.join(png_dir, name), "wb") as f:
            f.write(png)
        out += ["", f"![{testbed} arms]({rel_dir}/{name})"]
    out.append("")
    return "\n".join(out)


def _experiment_plot(testbed: str, by_arm: dict, pooled: dict) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted(by_arm, key=lambda k: _arm_order(*k))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(keys) + 1), 3.5))
    for i, key in enumerate(keys):
        seeds = [float(r["success"]) for r in by_arm[key]]
        ax.plot([i] * len(seeds), seeds, "o", color="grey", alpha=0.6, markersize=4)
        if key in pooled:
            p = pooled[key]
            s, lo, hi = float(p["success"]), float(p["ci_low"]), float(p["ci_high"])
            ax.errorbar([i], [s], yerr=[[s - lo], [hi - s]], fmt="s", color="C0", capsize=4)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([a if algo in ("none", "grpo") else f"{a}\n{algo}" for a, algo in keys], fontsize=7, rotation=30)
    ax.set_ylabel("test success")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{testbed}: pooled success (95% CI) and seeds")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def side_channels_section(rows: Sequence[dict], png_dir: str, rel_dir: str) -> str:
    """M_exp's one-step fidelity and replay agreement with and without the adapter's side channels
    (``scripts/side_channels.py``)."""
    out = ["## M_exp with and without the env's side channels", "",
           "`python scripts/side_channels.py` (one seed; the same held-out real transitions for both arms; both",
           "retrieve 2 demonstrations). Exact match beside the 'nothing changes' baseline.", "",
           "| env | side channels | SFT steps | exact match (baseline) | reward acc. | win recall / precision | "
           "invalid-action acc. | all agree after 5 replayed steps | command |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['env']} | {r['side_channels']} ({r['channels']}) | {r['sft_steps']} | "
                   f"{_fmt(_num(r['state_exact_match']), 2)} ({_fmt(_num(r['baseline_state_exact_match']), 2)}) | "
                   f"{_fmt(_num(r['reward_accuracy']), 2)} | {_fmt(_num(r['win_recall']), 2)} / "
                   f"{_fmt(_num(r['win_precision']), 2)} | {_fmt(_num(r['invalid_action_accuracy']), 2)} | "
                   f"{_fmt(_num(r['drift_agree_at_5']), 2)} | `{r['command']}` |")
    return "\n".join(out) + "\n"


def sim_real_gap_section(rows: Sequence[dict], png_dir: str, rel_dir: str) -> str:
    """A DreamGym loop's last policy, greedy, on the same test games in M_exp and in the real env
    (``scripts/sim_real_gap.py``)."""
    out = ["## The sim-real gap of the DreamGym loops' policies", "",
           "`python scripts/sim_real_gap.py TESTBED --seed S ...` (greedy; each game played from the same start "
           "state in M_exp, retrieving from the loop's buffer, and in the real env; pairs by game).", "",
           "| testbed | arm | seed | policy | games | real | M_exp | won in both | only in M_exp | only real | "
           "same actions throughout |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['testbed']} | {r['arm']} | {r['seed']} | {r['policy']} | {r['games']} | "
                   f"{_fmt(_num(r['real_success']), 3)} | {_fmt(_num(r['sim_success']), 3)} | {r['both_won']} | "
                   f"{r['sim_only']} | {r['real_only']} | {_fmt(_num(r['same_actions']), 2)} |")
    return "\n".join(out) + "\n"


def lamp_colours_section(rows: Sequence[dict], png_dir: str, rel_dir: str) -> str:
    """Per seed, which lamp colours M_exp lights and how often the loop's policy presses the lit one,
    in M_exp (sampled rollouts) and in the real game (greedy) (``scripts/lamp_colours.py``)."""
    out = ["## lamp: the colours M_exp lights and the colours the policy presses", "",
           "`python scripts/lamp_colours.py --seed S ...`: presses of the lit colour / decisions with it lit "
           "(share of the position's decisions). sim: the loop's last 5 iterations of rollouts in M_exp "
           "(sampled); real: its last policy, greedy, on 100 test games. The real game lights a uniform colour "
           "after a hit; M_exp invents one.", "",
           "| arm | seed | where | position | blue | green | red | yellow |", "|---|---|---|---|---|---|---|---|"]
    cells: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        cells[(r["arm"], int(r["seed"]), r["where"], r["position"])][r["lit"]] = \
            f"{r['pressed_lit']}/{r['decisions']} ({_fmt(_num(r['share_lit']), 2)})"
    for (arm, seed, where, pos), c in sorted(cells.items(), key=lambda kv: (kv[0][:2], kv[0][2] != "sim", kv[0][3])):
        out.append(f"| {arm} | {seed} | {where} | {pos} | " + " | ".join(c.get(k, "never lit") for k in
                                                                 ("blue", "green", "red", "yellow")) + " |")
    return "\n".join(out) + "\n"


SECTIONS = {"learner.csv": learner_section, "mexp_retrieval.csv": mexp_retrieval_section,
            "side_channels.csv": side_channels_section, "sim_real_gap.csv": sim_real_gap_section,
            "lamp_colours.csv": lamp_colours_section}


def write_results_doc(results_dir: str = "results", out_path: str = "docs/results.md") -> str:
    """Write ``out_path`` (and its PNGs in ``<out dir>/results_png``) from ``results_dir``; returns the path."""
    if not os.path.isdir(results_dir):
        raise ValueError(f"{results_dir}: no results folder")
    out_dir = os.path.dirname(out_path) or "."
    png_dir = os.path.join(out_dir, "results_png")
    os.makedirs(png_dir, exist_ok=True)
    parts = ["# Results", "",
             "Generated by `dreamgym results` from the rows under `results/`; do not edit by hand.", ""]
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".csv"):
            continue
        path = os.path.join(results_dir, name)
        stem = name.removesuffix(".csv")
        if stem.rsplit("_", 1)[-1] in ("paired", "pooled") and \
                os.path.exists(os.path.join(results_dir, stem.rsplit("_", 1)[0] + ".csv")):
            continue  # rendered with its testbed's rows
        rows = _rows(path)
        section = SECTIONS.get(name)
        if section is None and set(rows[0]) == set(ROW_COLUMNS):
            parts.append(experiment_section(stem, rows, results_dir, png_dir, "results_png"))
            continue
        parts.append(section(rows, png_dir, "results_png") if section else
                     f"## {name}\n\n{len(rows)} rows (no section renders this file yet).\n")
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(parts).rstrip() + "\n")
    os.replace(tmp, out_path)
    return out_path


README_BEGIN, README_END = "<!-- results:begin (dreamgym results writes this block) -->", "<!-- results:end -->"


def readme_block(results_dir: str = "results") -> str:
    """The README's summary of every experiment testbed scored greedy (the sampled re-scorings stay in
    docs/results.md): success pooled over seeds per arm, and the paper's claims with their verdicts."""
    out = []
    for name in sorted(os.listdir(results_dir)):
        stem = name.removesuffix(".csv")
        if not name.endswith(".csv") or stem.rsplit("_", 1)[-1] in ("paired", "pooled", "sampled"):
            continue
        rows = _rows(os.path.join(results_dir, name))
        if not rows or set(rows[0]) != set(ROW_COLUMNS):
            continue
        pooled = _siblings(results_dir, stem, "pooled")
        by_arm: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            by_arm[(r["arm"], r["algorithm"])].append(r)

        def mean(key: tuple, field: str) -> float:
            return sum(float(r[field]) for r in by_arm[key]) / len(by_arm[key])

        if not any(r["arm"] not in ("init", "sft", "real_rl") for r in rows):
            # a testbed measured only for headroom (no DreamGym arm): one line, its tables in docs/results.md
            cells = [f"{p['arm']}" + (f" ({p['algorithm']})" if p["algorithm"] not in ("none", "grpo") else "") +
                     f" {float(p['success']):.3f} [{float(p['ci_low']):.2f}, {float(p['ci_high']):.2f}]"
                     for p in sorted(pooled, key=lambda p: _arm_order(p["arm"], p["algorithm"]))]
            out += [f"**{stem}** (`dreamgym experiment {stem}`, greedy, {rows[0]['games']} held-out games per seed; "
                    f"no DreamGym arm run): " + ", ".join(cells) + f" pooled over {max(int(p['seeds']) for p in pooled)} "
                    "seeds; tables in [docs/results.md](docs/results.md).", ""]
            continue
        out += [f"**{stem}** (`dreamgym experiment {stem}`, greedy; {rows[0]['games']} held-out games per seed):", "",
                "| arm | algorithm | seeds | success, pooled [95% CI] | real transitions | synthetic transitions |",
                "|---|---|---|---|---|---|"]
        for p in sorted(pooled, key=lambda p: _arm_order(p["arm"], p["algorithm"])):
            key = (p["arm"], p["algorithm"])
            out.append(f"| {key[0]}{' *' if key[0] in POST_HOC else ''} | {key[1]} | {p['seeds']} | {float(p['success']):.3f} [{float(p['ci_low']):.2f}, "
                       f"{float(p['ci_high']):.2f}] | {mean(key, 'real_transitions'):,.0f} | "
                       f"{mean(key, 'synthetic_transitions'):,.0f} |")
        if any(p["arm"] in POST_HOC for p in pooled):
            out += ["", "\\* not a paper row: a variant added after reading the test results "
                    "([docs/experiments.md](docs/experiments.md))."]
        claims = _claims(stem, rows, pooled, _siblings(results_dir, stem, "paired"))
        if claims:
            out += ["", f"The paper's claims on {stem}:", ""]
            ran = {(r["arm"], r["algorithm"]) for r in rows}
            claims = [c for c in claims if (c["arm"], c["algorithm"]) in ran]  # arms never run: docs only
            out += [f"- {c['claim']} ({c['algorithm']}): **{c['verdict']}**" + (f" ({c['measured']})" if c["measured"]
                                                                                 else "") for c in claims]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme: str, results_dir: str = "results") -> bool:
    """Replace the README's generated results block (between ``README_BEGIN`` and ``README_END``);
    False when the README has no such block."""
    if not os.path.exists(readme):
        return False
    text = open(readme).read()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    with open(readme + ".tmp", "w") as f:
        f.write(head + README_BEGIN + "\n" + readme_block(results_dir) + README_END + tail)
    os.replace(readme + ".tmp", readme)
    return True
