"""Which lamp colours a DreamGym loop's M_exp shows, and which the loop's policy learned to press.

lamp hides the colour sequence: after a correct press the real game lights a uniformly drawn
colour, and M_exp has to invent one. This reads, per seed:
- ``sim``: the loop's rollouts in M_exp (the last ``--last`` iterations): how often each colour is
  lit at the start (from the real start states) and after a hit (M_exp's invention), and how often
  the sampling policy pressed the lit colour;
- ``real``: the loop's last policy, greedy, on the first ``--games`` test games: how often it
  pressed the lit colour, per colour and position.
A colour M_exp never lights after a hit, and that the policy fails on its starts in every episode
of a group (zero advantage), is never learned: the real game then loses every episode that shows it.
Rows go to ``results/lamp_colours.csv`` (replaced per arm and seed).

    python scripts/lamp_colours.py --work WORK/experiments --seed 1 \
        --loop WORK/experiments/lamp/loop-full-grpo-s1-<hash>

Run it with the code that built the loop (``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import collections
import csv
import glob
import os
import re
import sys

COLUMNS = ("testbed", "arm", "seed", "where", "lit", "position", "decisions", "pressed_lit", "share_lit", "loop")
_LIT, _PANEL = re.compile(r"lamp \((\w+)\)"), re.compile(r"panel \((\d+) of")


def _lit(state: str) -> str | None:
    m = _LIT.search(state or "")
    return m.group(1) if m and m.group(1) != "off" else None


def _position(state: str) -> str:
    m = _PANEL.search(state or "")
    return "start" if m is None or m.group(1) == "0" else "after a hit"


def count(decisions) -> list[dict]:
    """(state, action) pairs -> per (lit colour, position): decisions, presses of the lit colour and
    the share of that position's decisions with that colour lit."""
    acc: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for state, action in decisions:
        lit = _lit(state)
        if lit is None:
            continue
        key = (lit, _position(state))
        acc[key][0] += 1
        acc[key][1] += action == f"press {lit}"
    per_pos = collections.Counter()
    for (_, pos), (n, _) in acc.items():
        per_pos[pos] += n
    return [{"lit": lit, "position": pos, "decisions": n, "pressed_lit": hit,
             "share_lit": round(n / per_pos[pos], 4)} for (lit, pos), (n, hit) in sorted(acc.items())]


def sim_decisions(loop: str, last: int):
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(loop, "[0-9][0-9][0-9]", "rollouts.parquet")))[-last:]
    if not files:
        raise SystemExit(f"lamp_colours: {loop} holds no NNN/rollouts.parquet")
    for f in files:
        for r in pq.read_table(f, columns=["state", "action"]).to_pylist():
            yield r["state"], r["action"]


def real_decisions(work: str, loop: str, seed: int, games: int):
    from dreamgym_core.evaluation import evaluate, lm_policy_factory
    from dreamgym_core.experiment import _real_envs, get_testbed, splits
    from dreamgym_core.loop import LoopConfig
    from dreamgym_core.models import load_checkpoint

    tb = get_testbed("lamp")
    _, _, test = splits(tb, work)
    done = sorted(d for d in os.listdir(loop) if d.isdigit() and os.path.isdir(os.path.join(loop, d, "policy")))
    model, tok, _ = load_checkpoint(os.path.join(loop, done[-1], "policy"))
    eps: dict = {}
    evaluate(lm_policy_factory(model, tok, "loop"), "loop", 0, test[:games], _real_envs(tb, work), None, None,
             LoopConfig(eval_tasks=games, sim_eval_tasks=0, eval_max_steps=tb.max_steps, seed=seed),
             real_transitions=0, episodes=eps, log=lambda _: None)
    for tr in eps["greedy"]:
        for s in tr.steps:
            yield s.state, s.action


def main(argv: list[str] | None = None) -> int:
    from dreamgym_core.experiment_results import write_csv

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--loop", required=True,
                   help="the DreamGym loop directory of the lamp arm (NNN/rollouts, NNN/policy)")
    p.add_argument("--arm", default="dreamgym", help="the arm whose loop this is (a label in the rows)")
    p.add_argument("--last", type=int, default=5, help="read the rollouts of the last N iterations")
    p.add_argument("--games", type=int, default=100)
    p.add_argument("--out", default="results/lamp_colours.csv")
    a = p.parse_args(argv)
    if not os.path.isdir(a.loop):
        raise SystemExit(f"lamp_colours: --loop {a.loop} is not a directory")
    base = {"testbed": "lamp", "arm": a.arm, "seed": a.seed, "loop": os.path.basename(a.loop.rstrip("/"))}
    rows = [{**base, "where": "sim", **r} for r in count(sim_decisions(a.loop, a.last))]
    rows += [{**base, "where": "real", **r} for r in count(real_decisions(a.work, a.loop, a.seed, a.games))]
    for r in rows:
        print(f"seed {a.seed} {r['where']:4s} {r['lit']:7s} {r['position']:11s} lit in {r['share_lit']:.2f} of "
              f"decisions; pressed {r['pressed_lit']}/{r['decisions']}")
    old = []
    if os.path.exists(a.out):
        with open(a.out, newline="") as f:
            old = [r for r in csv.DictReader(f) if (r["arm"], r["seed"]) != (a.arm, str(a.seed))]
    write_csv(a.out, COLUMNS, sorted(old + rows, key=lambda r: (r["arm"], int(r["seed"]), r["where"], r["position"],
                                                                r["lit"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
