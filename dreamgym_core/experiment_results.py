"""The experiments' results as data: rows, per-game outcomes, paired tests and pooled success.

No paper equation: the statistics of ``shared/EXPERIMENTS.md`` over the rows ``experiment.run_arm``
writes (Table 1 / Table 2 cells). Under ``results/`` (committed, so an experiment can resume on
another machine and grow over days):

  <testbed>.csv            one row per (arm, algorithm, seed), ``experiment.ROW_COLUMNS``; a re-run
                           partition replaces its row;
  <testbed>_games/         per partition, the outcome of every test game (Parquet, ``GAME_SCHEMA``);
  <testbed>_paired.csv     every arm against ``init`` and against ``real_rl`` (same seed, same games):
                           games only the arm won, only the baseline won, exact McNemar p
                           (``evaluation.paired_outcomes``);
  <testbed>_pooled.csv     success pooled over seeds with a 95% interval from a bootstrap over seeds
                           and, within each drawn seed, over its games (both sources of variance).

``claims_table`` checks the paper's relative claims (DreamGym vs init and real-env RL, S2R, the
ablations) on those tables; the docs render it, nothing stores it.

Every file is replaced atomically; the paired and pooled tables are recomputed from all rows and
game files present, whichever machine wrote them.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from typing import Sequence

import pyarrow as pa

from dreamgym_core.experiment import GAME_SCHEMA, ROW_COLUMNS

PAIRED_COLUMNS = ("testbed", "arm", "algorithm", "seed", "baseline", "baseline_algorithm", "games", "only_arm",
                  "only_baseline", "p_value")
POOLED_COLUMNS = ("testbed", "arm", "algorithm", "seeds", "games", "success", "ci_low", "ci_high")
INT_FIELDS = ("seed", "games", "real_transitions", "synthetic_transitions", "flops")
FLOAT_FIELDS = ("success", "ci_low", "ci_high", "wall_s")


def read_rows(path: str) -> list[dict]:
    """The rows of ``<testbed>.csv``, typed; a bad row gives a one-line error naming file, row, field."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        for name in ROW_COLUMNS:
            if r.get(name) in (None, ""):
                raise ValueError(f"{path}: line {i}: field {name!r} is missing")
        try:
            out.append({**r, **{k: int(r[k]) for k in INT_FIELDS}, **{k: float(r[k]) for k in FLOAT_FIELDS}})
        except ValueError as exc:
            raise ValueError(f"{path}: line {i}: {exc}") from None
    return out


def write_csv(path: str, columns: Sequence[str], rows: Sequence[dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="raise")
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in columns} for r in rows])
    os.replace(path + ".tmp", path)
    return path


def _key(r: dict) -> tuple[str, str, int]:
    return (r["arm"], r["algorithm"], int(r["seed"]))


def games_path(results_dir: str, testbed: str, arm: str, algorithm: str, seed: int) -> str:
    return os.path.join(results_dir, f"{testbed}_games", f"{arm}-{algorithm}-s{seed}.parquet")


def load_games(results_dir: str, testbed: str, rows: Sequence[dict]) -> dict[tuple, dict[str, bool]]:
    """(arm, algorithm, seed) -> game -> won, for every row that has its game file."""
    from dreamgym_core.io import read_parquet

    out = {}
    for r in rows:
        path = games_path(results_dir, testbed, *_key(r))
        if os.path.exists(path):
            t = read_parquet(path)
            if t.schema.names[:2] != ["game", "won"]:
                raise ValueError(f"{path}: expected columns game, won first, got {t.schema.names}")
            out[_key(r)] = dict(zip(t["game"].to_pylist(), t["won"].to_pylist()))
    return out


def paired_table(testbed: str, rows: Sequence[dict], games: dict[tuple, dict[str, bool]]) -> list[dict]:
    """Every row against ``init`` and ``real_rl`` of its seed (``real_rl`` of its own algorithm when
    it is an RL arm, else GRPO's), where both have game outcomes."""
    from dreamgym_core.evaluation import paired_outcomes

    out = []
    for r in sorted(rows, key=_key):
        arm, algo, seed = _key(r)
        for base in (("init", "none"), ("real_rl", algo if algo in ("grpo", "ppo") else "grpo")):
            if base == (arm, algo) or (arm, algo, seed) not in games or (*base, seed) not in games:
                continue
            c = paired_outcomes(games[(*base, seed)], games[(arm, algo, seed)])
            out.append({"testbed": testbed, "arm": arm, "algorithm": algo, "seed": seed, "baseline": base[0],
                        "baseline_algorithm": base[1], "games": c.tasks, "only_arm": c.better,
                        "only_baseline": c.worse, "p_value": round(c.p_value, 6)})
    return out


def pooled_table(testbed: str, rows: Sequence[dict], games: dict[tuple, dict[str, bool]], *,
                 resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Success per (arm, algorithm) over its seeds: the mean of the seeds' success rates, with the 2.5
    and 97.5 percentiles of that mean when seeds are drawn with replacement and then, within each
    drawn seed, its games with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by_arm: dict[tuple[str, str], list[np.ndarray]] = {}
    for r in sorted(rows, key=_key):
        won = games.get(_key(r))
        if won:
            by_arm.setdefault((r["arm"], r["algorithm"]), []).append(np.array(list(won.values()), dtype=float))
    out = []
    for (arm, algo), seeds in sorted(by_arm.items()):
        means = np.empty(resamples)
        for b in range(resamples):
            picked = rng.integers(0, len(seeds), len(seeds))
            means[b] = np.mean([rng.choice(seeds[i], len(seeds[i])).mean() for i in picked])
        out.append({"testbed": testbed, "arm": arm, "algorithm": algo, "seeds": len(seeds),
                    "games": int(sum(len(s) for s in seeds)), "success": round(float(np.mean([s.mean() for s in seeds])), 4),
                    "ci_low": round(float(np.percentile(means, 2.5)), 4),
                    "ci_high": round(float(np.percentile(means, 97.5)), 4)})
    return out


def write_results(results_dir: str, testbed: str, finished: Sequence[tuple[dict, pa.Table]]) -> dict[str, str]:
    """Add ``finished`` partitions ((row, per-game table) pairs) to ``results_dir``: their game files,
    their rows (replacing rows of the same arm, algorithm and seed), then the paired and pooled tables
    over everything there. Returns the paths written."""
    from dreamgym_core.io import write_parquet_atomic

    for row, table in finished:
        if set(row) != set(ROW_COLUMNS):
            raise ValueError(f"{testbed}: row of {row.get('arm')!r} has columns {list(row)}, expected {list(ROW_COLUMNS)}")
        write_parquet_atomic(table.cast(GAME_SCHEMA), games_path(results_dir, testbed, *_key(row)))
    path = os.path.join(results_dir, f"{testbed}.csv")
    new = {_key(r): r for r, _ in finished}
    rows = [r for r in read_rows(path) if _key(r) not in new] + list(new.values())
    rows.sort(key=_key)
    write_csv(path, ROW_COLUMNS, rows)
    games = load_games(results_dir, testbed, rows)
    return {"rows": path,
            "paired": write_csv(os.path.join(results_dir, f"{testbed}_paired.csv"), PAIRED_COLUMNS,
                                paired_table(testbed, rows, games)),
            "pooled": write_csv(os.path.join(results_dir, f"{testbed}_pooled.csv"), POOLED_COLUMNS,
                                pooled_table(testbed, rows, games))}


CLAIM_COLUMNS = ("testbed", "algorithm", "claim", "arm", "baseline", "needed", "measured", "verdict")
ABLATIONS = ("no_replay", "no_cot", "no_curriculum")


def claims_table(testbed: str, rows: Sequence[dict], pooled: Sequence[dict], paired: Sequence[dict], *,
                 budget: int | None = None, min_seeds: int = 3) -> list[dict]:
    """The paper's relative claims (issue protocol, ``shared/EXPERIMENTS.md``) checked on pooled success:

    1. ``dreamgym`` (0 real) at least 10 points above ``init``, and every seed's paired test in its
       favour at p < 0.05;
    2. ``dreamgym`` within 5 points of ``real_rl`` at B (at most 5 points below);
    3. ``s2r`` at or above ``real_rl``, with at most 10% of B real transitions (B = ``budget``, else
       the most real transitions a ``real_rl`` seed used);
    4. each ablation below ``dreamgym``.

    A claim whose arms have fewer than ``min_seeds`` seeds is "not measured". Verdicts use the pooled
    point estimates; the measured column carries the difference so that a reader sees the margin.
    """
    seeds = defaultdict(int)
    real = defaultdict(list)
    for r in rows:
        seeds[(r["arm"], r["algorithm"])] += 1
        real[(r["arm"], r["algorithm"])].append(int(r["real_transitions"]))
    success = {(p["arm"], p["algorithm"]): float(p["success"]) for p in pooled}
    tests = defaultdict(list)
    for p in paired:
        tests[(p["arm"], p["algorithm"], p["baseline"])].append(p)
    out = []
    for algo in sorted({a for arm, a in success if arm == "dreamgym"}):
        dg, rl = ("dreamgym", algo), ("real_rl", algo)

        def claim(name: str, arm: tuple, base: tuple, needed: str, check) -> None:
            if algo != "grpo" and not seeds[arm] and arm[0] != "dreamgym":
                return  # another algorithm's claims are the ones its arms were run for (PPO: real_rl, dreamgym)
            row = {"testbed": testbed, "algorithm": algo, "claim": name, "arm": arm[0], "baseline": base[0],
                   "needed": needed}
            few = [f"{a[0]} {seeds[a]} seed(s)" for a in (arm, base) if seeds[a] < min_seeds or a not in success]
            if few:
                out.append({**row, "measured": "", "verdict": "not measured (" + ", ".join(few) + ")"})
                return
            measured, ok = check(success[arm] - success[base])
            out.append({**row, "measured": measured, "verdict": "met" if ok else "not met"})

        def above_init(d: float) -> tuple[str, bool]:
            per_seed = tests[("dreamgym", algo, "init")]
            wins = [p for p in per_seed if int(p["only_arm"]) > int(p["only_baseline"]) and float(p["p_value"]) < 0.05]
            return (f"{d:+.3f}; {len(wins)} of {len(per_seed)} seeds paired p<0.05 in its favour",
                    d >= 0.10 and len(per_seed) >= min_seeds and len(wins) == len(per_seed))

        claim("dreamgym (0 real) >= init + 10 points", dg, ("init", "none"), "+0.100, paired p<0.05 per seed",
              above_init)
        claim("dreamgym within 5 points of real_rl", dg, rl, ">= -0.050", lambda d: (f"{d:+.3f}", d >= -0.05))
        b = budget or max(real[rl], default=0)

        def s2r_check(d: float) -> tuple[str, bool]:
            used = max(real[("s2r", algo)], default=0)
            return f"{d:+.3f} with {used:,} real ({used / b:.0%} of B={b:,})" if b else f"{d:+.3f}", \
                d >= 0 and used <= 0.1 * b
        claim("s2r (<= 10% of B real) >= real_rl", ("s2r", algo), rl, ">= 0, real <= 10% of B", s2r_check)
        per_seed = {(r["arm"], r["algorithm"], int(r["seed"])): float(r["success"]) for r in rows
                    if "success" in r}

        def below(ab: str):
            def check(d: float) -> tuple[str, bool]:
                diffs = [per_seed[(ab, algo, s)] - per_seed[(dg[0], algo, s)] for (a, al, s) in per_seed
                         if (a, al) == (ab, algo) and (dg[0], algo, s) in per_seed]
                if not diffs:
                    return f"{d:+.3f}", d < 0
                return (f"{d:+.3f}; per seed lower {sum(x < 0 for x in diffs)}, equal {sum(x == 0 for x in diffs)}, "
                        f"higher {sum(x > 0 for x in diffs)}"), d < 0
            return check

        for ab in ABLATIONS:
            claim(f"{ab} below dreamgym", (ab, algo), dg, "< 0", below(ab))
    return out
