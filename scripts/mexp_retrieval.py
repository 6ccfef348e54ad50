"""M_exp with and without retrieval, measured: the same data, the same wall budget, one after the other.

    python scripts/mexp_retrieval.py --from data --budget 300 [--variants 3] [--out results/mexp_retrieval.csv]

Copies a finished demo's data root (its offline data, annotations, replay seed, SFT policy and held-out
tasks; not its Dagster history) into <from>-mexp-retrieval, then, for each variant, materializes
``experience_model`` (Eq. 5 SFT for ``--budget`` seconds) and ``experience_model_eval`` with the demo's
sizes, and appends the overall fidelity row and the random and BC policies' sim-real rows to ``--out``.
Variants: retrieval with k=2 (the default), no retrieval (k=0), k=2 without the twc placement lookup.
A budget different from the demo's makes the reuse key differ, so every variant trains anew.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import time

VARIANTS = [("retrieval_k2", {"num_demos": 2}), ("no_retrieval", {"num_demos": 0}),
            ("retrieval_k2_no_placements", {"num_demos": 2, "placements": False})]
COLUMNS = ["variant", "budget_s", "sft_steps", "scope", "transitions", "state_exact_match", "reward_accuracy",
           "win_recall", "invalid_action_accuracy", "episodes", "sim_success_rate", "real_success_rate", "sim_real_gap"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="src", required=True, help="a data root where `dreamgym demo` has finished")
    p.add_argument("--budget", type=float, default=300.0)
    p.add_argument("--variants", type=int, default=len(VARIANTS))
    p.add_argument("--out", default="results/mexp_retrieval.csv")
    a = p.parse_args()
    data = os.path.abspath(a.src.rstrip("/") + "-mexp-retrieval")
    if not os.path.isdir(os.path.join(a.src, "parquet")):
        p.error(f"--from {a.src}: no parquet/ folder (run `dreamgym demo --data {a.src}` first)")
    if not os.path.exists(data):
        shutil.copytree(a.src, data, ignore=shutil.ignore_patterns("dagster_home", "locks", "report.html"))
    os.environ["DREAMGYM_DATA"] = data
    os.environ["DAGSTER_HOME"] = os.path.join(data, "dagster_home")
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)

    import dagster as dg
    import pyarrow.parquet as pq

    from assets.loop import LoopSettings
    from pipelines.cli import demo_sizes
    from pipelines.definitions import ALL_ASSETS, build_defs
    from pipelines.resources import Experiment

    sizes = demo_sizes("twx")
    resources = {**build_defs(data).resources, "experiment": Experiment(**sizes["experiment"]),
                 "loop": LoopSettings(**sizes["loop"])}
    for name, cfg in VARIANTS[:a.variants]:
        started = time.perf_counter()
        with dg.DagsterInstance.get() as instance:
            result = dg.materialize(ALL_ASSETS, selection=["experience_model", "experience_model_eval"],
                                    resources=resources, instance=instance, run_config={"ops": {
                                        "experience_model": {"config": {"time_budget_s": a.budget, **cfg}},
                                        "experience_model_eval": {"config": sizes["experience_model_eval"]}}})
        steps = next((m.materialization.metadata["steps"].value for m in result.get_asset_materialization_events()
                      if "steps" in m.materialization.metadata), None)
        rows = pq.read_table(os.path.join(data, "parquet", "experience_model_eval.parquet")).to_pylist()
        new = not os.path.exists(a.out)
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(COLUMNS)
            for r in rows:
                if r["scope"] in ("overall", "policy:random", "policy:bc"):
                    w.writerow([name, a.budget, steps, *(r.get(c) for c in COLUMNS[3:])])
        print(f"{name}: {steps} SFT steps, {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
