"""M_exp per environment with and without the side channels its adapter declares, measured.

    python scripts/side_channels.py --work data/side_channels --testbeds lamp twc [--out results/side_channels.csv]
    python scripts/side_channels.py --markdown [--out results/side_channels.csv]   # the docs' table, from the CSV

For each testbed (``dreamgym_core.experiment.TESTBEDS``, at the small CPU sizes of ``SIZES``): the
offline data and M_exp of the experiment stages (``experiment_stages.offline_data`` /
``experience_model``: Eq. 5 SFT with k = 2 retrieved demonstrations D_k from the offline replay seed),
trained twice with the same steps and seed: ``on`` = the side channels the env's adapter declares
(``envs.side_channels``), ``off`` = none of them (variant ``no_side_channels``: no dense score, no
placement or affordance hints, rule traces without twc's task reading; retrieval stays). Both are
scored on the same held-out real transitions, collected fresh on the testbed's test games with the
offline mix (``evaluation.heldout_selection``: wins and invalid actions up to a third each),
teacher-forced (``fidelity.score_transitions``), and by an open-loop replay of 40 held-out
trajectories (``fidelity.multi_step_drift``). Rows of the same (testbed, side_channels, seed, SFT
steps) are replaced in ``--out``; the stages are cached under ``--work``, so a re-run only scores.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import replace

SIZES = {
    # lamp: the testbed's own offline data (200 train tasks) and M_exp architecture, fewer SFT steps
    "lamp": {"mexp": {"steps": 300}},
    # twc: 60 train tasks (about 4,000 transitions) and a 2-layer M_exp instead of 300 tasks and 4 layers
    "twc": {"offline": {"train_tasks": 60}, "mexp": {"steps": 300, "hidden": 128, "layers": 2, "heads": 4,
                                                      "vocab_size": 2000}},
    "tiny": {"mexp": {}},  # a smoke run (seconds); its numbers mean nothing
}
HELDOUT_TASKS = 40
MAX_TRANSITIONS = 300
COLUMNS = ["env", "game", "testbed", "side_channels", "channels", "prompt_switches", "seed", "sft_steps",
           "train_transitions", "n", "state_exact_match", "baseline_state_exact_match", "content_exact_match",
           "reward_accuracy", "win_recall", "win_precision", "invalid_action_accuracy", "valid_action_accuracy",
           "valid_rate", "drift_trajectories", "drift_agree_at_5", "drift_exact_at_5", "baseline_drift_exact_at_5",
           "sft_wall_s", "commit", "command"]


def small(name: str, steps: int = 0):
    """The testbed at ``SIZES``; ``steps`` > 0 overrides M_exp's SFT steps."""
    from dreamgym_core.experiment import get_testbed

    tb, sizes = get_testbed(name), SIZES[name]
    mexp = {**sizes["mexp"], **({"steps": steps} if steps else {})}
    return replace(tb, offline=replace(tb.offline, **sizes.get("offline", {})), mexp=replace(tb.mexp, **mexp))


def heldout(tb, work: str, log):
    """Fresh real trajectories on the testbed's first ``HELDOUT_TASKS`` test games, with the offline mix."""
    from dreamgym_core.collect import CollectConfig, collect
    from dreamgym_core.envs import make_env

    o = tb.offline
    env = make_env(tb.env_spec(work))
    try:
        tasks = env.tasks(tb.eval_split, HELDOUT_TASKS, tb.test_start)
        trajs, _ = collect(env, tasks, CollectConfig(
            episodes={"expert": o.expert, "noisy": o.noisy, "random": o.random}, epsilon=o.epsilon,
            invalid_rate=o.invalid_rate, max_steps=o.max_steps, seed=1))
    finally:
        env.close()
    log(f"{tb.name}: {sum(len(t) for t in trajs)} held-out transitions on {len(tasks)} test games")
    return trajs


def score(tb, work: str, mexp_dir: str, trajs, log) -> dict:
    from dreamgym_core.buffer import BufferConfig, ReplayBuffer
    from dreamgym_core.embed import make_embedder
    from dreamgym_core.evaluation import heldout_selection
    from dreamgym_core.experience.retrieval import Retriever
    from dreamgym_core.experience_model import (ExperienceModel, PromptConfig, SimConfig, knowledge_from_meta,
                                                multi_step_drift, score_transitions, summarize_fidelity)
    from dreamgym_core.loop import initial_state_fn
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.schema import trajectories_to_arrow

    model, tok, meta = load_checkpoint(os.path.join(mexp_dir, "final"))
    prompt = PromptConfig.from_meta(meta)
    retrieve = None
    if meta.get("replay"):  # D_k from the offline seed at the version M_exp was trained with
        buf = ReplayBuffer(meta["replay"], make_embedder("hashing"), BufferConfig(table="replay_hashing"))
        retrieve = Retriever(buf, as_of_version=int(meta["replay_version"]), source="offline", exclude_own_task=True)

    def sim(initial_state):
        return ExperienceModel(model, tok, initial_state=initial_state, propose_candidates=lambda s: [],
                               retrieve=retrieve, cfg=SimConfig(prompt=prompt, batch_size=32),
                               knowledge=knowledge_from_meta(meta))

    rows = trajectories_to_arrow(trajs).to_pylist()
    rng = random.Random(0)
    m = summarize_fidelity(score_transitions(sim(lambda t: ""), rows, select=heldout_selection(rows, MAX_TRANSITIONS,
                                                                                                rng)))
    drift = multi_step_drift(sim(initial_state_fn({})), rng.sample(list(trajs), min(40, len(trajs))), 5)
    at5 = drift[-1] if drift else {}
    log(f"{tb.name}: exact {m['state_exact_match']:.3f} (baseline {m['baseline_state_exact_match']:.3f}), reward "
        f"{m['reward_accuracy']:.3f}, win recall {m['win_recall']:.3f}, drift agree@{at5.get('step')} "
        f"{at5.get('agree_so_far', float('nan')):.3f}")
    return {**{k: m[k] for k in COLUMNS if k in m}, "n": int(m["transitions"]),
            "drift_trajectories": at5.get("trajectories"), "drift_agree_at_5": at5.get("agree_so_far"),
            "drift_exact_at_5": at5.get("state_exact_match"),
            "baseline_drift_exact_at_5": at5.get("baseline_state_exact_match"),
            "prompt_switches": "+".join(n for n in ("progress", "placements", "affordances") if getattr(prompt, n))
            or "none", "sft_steps": (meta.get("metrics") or {}).get("steps")}


def run(a) -> int:
    import json

    from dreamgym_core.envs import side_channels
    from dreamgym_core.experiment_stages import experience_model, offline_data

    command = "python scripts/side_channels.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                      text=True).stdout.strip():
        commit += "-dirty"
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    out = []
    for name in a.testbeds:
        tb = small(name, a.steps)
        trajs = heldout(tb, a.work, log)
        data = offline_data(tb, a.work, log)
        import pyarrow.parquet as pq

        train_n = pq.ParquetFile(os.path.join(data, "offline.parquet")).metadata.num_rows
        for on, variant in (("on", "full"), ("off", "no_side_channels")):
            started = time.perf_counter()
            mexp = experience_model(tb, a.work, variant, a.seed, log)
            with open(os.path.join(mexp, "cost.json")) as f:
                wall = json.load(f)["wall_s"]
            log(f"{name} side channels {on}: M_exp ready ({time.perf_counter() - started:.0f} s here, "
                f"SFT {wall:.0f} s)")
            out.append({"env": tb.env, "game": tb.game, "testbed": name, "side_channels": on,
                        "channels": "+".join(side_channels(tb.env, tb.game).offered()) if on == "on" else "none",
                        "seed": a.seed, "train_transitions": train_n, "sft_wall_s": round(wall, 1), "commit": commit,
                        "command": command, **score(tb, a.work, mexp, trajs, log)})
    keep = []
    if os.path.exists(a.out):
        with open(a.out, newline="") as f:
            done = {(r["testbed"], r["side_channels"], str(r["seed"]), str(r["sft_steps"])) for r in out}
            keep = [r for r in csv.DictReader(f)
                    if (r["testbed"], r["side_channels"], r["seed"], r["sft_steps"]) not in done]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(keep + out)
    os.replace(a.out + ".tmp", a.out)
    print(markdown(a.out))
    return 0


def markdown(path: str) -> str:
    """The per-environment table of ``path`` (one row per testbed and side_channels on/off)."""
    def f(v: str) -> str:
        return "" if v in ("", "nan", None) else f"{float(v):.2f}"

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    lines = ["| env / game | side channels | prompt switches on | SFT steps | n | next-state exact (nothing changes) | "
             "reward acc. | win recall / precision | invalid-action acc. | all agree after 5 replayed steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['env']} / {r['game']} | {r['side_channels']}: {r['channels']} | {r['prompt_switches']} | "
                     f"{r['sft_steps']} | {r['n']} | {f(r['state_exact_match'])} ({f(r['baseline_state_exact_match'])}) | "
                     f"{f(r['reward_accuracy'])} | {f(r['win_recall'])} / {f(r['win_precision'])} | "
                     f"{f(r['invalid_action_accuracy'])} | {f(r['drift_agree_at_5'])} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="data/side_channels", help="where the cached stages live")
    p.add_argument("--testbeds", nargs="+", default=["lamp", "twc"], choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="M_exp SFT steps (0 = SIZES)")
    p.add_argument("--out", default="results/side_channels.csv")
    p.add_argument("--markdown", action="store_true", help="only print the table of --out")
    a = p.parse_args()
    if a.markdown:
        print(markdown(a.out))
        return 0
    return run(a)


if __name__ == "__main__":
    raise SystemExit(main())
