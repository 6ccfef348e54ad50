"""Kill a tiny DreamGym demo anywhere, resume it, and check nothing was lost or corrupted (issue 27 item 1).

    PYTHONPATH=. python scripts/kill_anywhere.py --out data-kill [--iterations 2] [--random-kills 2] [--seed 0]
                                                 [--reference DIR]

1. Reference: ``dreamgym demo --tiny`` uninterrupted into <out>/reference (or ``--reference`` reuses one).
2. Killed: the same demo into <out>/killed, started again and again; each start is SIGKILLed once,
   either at a named fault point (``DREAMGYM_FAULT``, dreamgym_core/faults.py: inside a Parquet write,
   inside a checkpoint save, before a checkpoint manifest, between a Lance delete and add) or at a
   seeded random time (anywhere, e.g. between stages or in the middle of training). Then it runs to the end.
3. After every kill, checks: every visible Parquet file reads; every checkpoint manifest parses and
   points at loadable weights; every Lance table opens (after the journal recovery every opener does)
   with no iteration's rows lost; the outputs of steps finished before the kill are byte-identical.
   After the next start: the killed run is FAILURE, not STARTED.
4. At the end: no run left STARTED; every Parquet asset equals the reference's (timing columns aside,
   the data folder's own path replaced by <data>, and a checkpoint folder's reuse key replaced by <key>:
   the key fingerprints the replay buffer by its Lance version, which a rolled-back write advances
   without changing its rows), and every checkpoint's weights equal it within
   ``WEIGHT_ATOL`` (CPU training reduces in thread order, so two uninterrupted runs can differ in the
   last bit; the report gives the largest difference and how many are bitwise equal).
   Writes <out>/kill_report.json and prints a summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULT_KILLS = ["parquet:before_move@1", "checkpoint:mid_save@1", "checkpoint:before_manifest@1",
               "lance:between_delete_and_add@1", "parquet:before_move@3"]
TIMING = ("timing", "_s", "per_s", "seconds", "elapsed", "wall")
WEIGHT_ATOL = 1e-5


def demo(data: Path, iterations: int, fault: str | None = None, kill_after: float | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(data / "dagster_home")}
    env.pop("DREAMGYM_FAULT", None)
    if fault:
        point, _, nth = fault.partition("@")
        env["DREAMGYM_FAULT"] = f"{point}:kill" + (f"@{nth}" if nth else "")
    log = open(data.parent / f"{data.name}.log", "ab")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "demo", "--tiny", "--data", str(data),
                             "--iterations", str(iterations)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=REPO, start_new_session=True)
    try:
        rc = proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the demo and anything it started
        rc = proc.wait()
    return {"rc": rc, "killed": rc == -signal.SIGKILL, "seconds": round(time.perf_counter() - t0, 1)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finished_outputs(data: Path) -> dict[str, str]:
    """sha256 of each output file of a step that finished (the demo will not write it again)."""
    import dagster as dg

    out = {}
    home = data / "dagster_home"
    if not (home / "dagster.yaml").exists():
        return out
    with dg.DagsterInstance.from_config(str(home)) as inst:
        done_parts = set(inst.get_materialized_partitions(dg.AssetKey("iteration_eval")))
        for key in inst.get_asset_keys():
            for ev in inst.fetch_materializations(key, limit=1000).records:
                mat = ev.asset_materialization
                if mat is None or (mat.partition is not None and mat.partition not in done_parts):
                    continue
                for name in ("path", "manifest"):
                    v = mat.metadata.get(name)
                    p = Path(v.value) if v is not None else None
                    if p is not None and p.is_file():
                        out[str(p)] = _sha(p)
    return out


def run_statuses(data: Path) -> dict[str, int]:
    import dagster as dg

    home = data / "dagster_home"
    if not (home / "dagster.yaml").exists():
        return {}
    with dg.DagsterInstance.from_config(str(home)) as inst:
        counts: dict[str, int] = {}
        for r in inst.get_runs():
            counts[r.status.value] = counts.get(r.status.value, 0) + 1
        return counts


def lance_tables(data: Path) -> list[Path]:
    """Table folders (``<db>/<name>.lance``), not the ``.lance`` data files inside them."""
    return [p for p in data.rglob("*.lance")
            if p.is_dir() and not any(part.endswith(".lance") for part in p.relative_to(data).parts[:-1])]


def visible_state_problems(data: Path) -> tuple[list[str], dict]:
    """What a reader would trip on right now: unreadable Parquet, broken manifests, broken Lance tables."""
    import lancedb
    import pyarrow.parquet as pq
    from safetensors import safe_open

    from dreamgym_core.lance_journal import journal_path, recover

    problems, info = [], {"parquet_files": 0, "manifests": 0, "lance_tables": 0, "lance_journals_recovered": 0}
    for p in (data / "parquet").rglob("*.parquet") if (data / "parquet").exists() else []:
        if p.name.startswith("."):
            continue
        info["parquet_files"] += 1
        try:
            pq.read_table(p)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            problems.append(f"{p}: unreadable Parquet ({type(exc).__name__})")
    for m in (data / "checkpoints").rglob("manifest.json") if (data / "checkpoints").exists() else []:
        info["manifests"] += 1
        try:
            ref = json.loads(m.read_text())
        except ValueError:
            problems.append(f"{m}: not JSON")
            continue
        path = Path(ref.get("path", ""))
        if ref.get("kind") in ("policy", "experience_model") and path.is_dir():
            weights = path / "model.safetensors"
            try:
                with safe_open(str(weights), "pt") as f:
                    for k in list(f.keys())[:50]:
                        f.get_tensor(k)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{m}: weights {weights} unreadable ({type(exc).__name__})")
        elif ref.get("kind") in ("policy", "experience_model"):
            problems.append(f"{m}: points to {path}, which does not exist")
    for lance_dir in lance_tables(data):
        uri, name = str(lance_dir.parent), lance_dir.name[: -len(".lance")]
        info["lance_tables"] += 1
        had = journal_path(uri, name)
        if had and os.path.exists(had):
            info["lance_journals_recovered"] += 1
        try:
            db = lancedb.connect(uri)
            recover(db, uri, name)
            tbl = db.open_table(name)
            tbl.to_arrow()
            for tag, v in tbl.tags.list().items():
                tbl.checkout(v["version"])
                tbl.to_arrow()
                tbl.checkout_latest()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{lance_dir}: {type(exc).__name__}: {str(exc)[:120]}")
    return problems, info


def lance_rows_by_iteration(data: Path) -> dict[str, dict]:
    import lancedb
    import pyarrow.compute as pc

    out = {}
    for lance_dir in lance_tables(data):
        tbl = lancedb.connect(str(lance_dir.parent)).open_table(lance_dir.name[:-6])
        t = tbl.to_arrow()
        if "iteration" in t.column_names:
            out[str(lance_dir)] = {str(c["values"]): c["counts"] for c in pc.value_counts(t["iteration"]).to_pylist()}
    return out


def compare_with_reference(ref: Path, got: Path) -> dict:
    import pyarrow.parquet as pq

    from safetensors.torch import load_file

    res = {"parquet_equal": [], "parquet_differ": [], "weights_equal": [], "weights_differ": [],
           "weights_bitwise_equal": 0, "weights_max_abs_diff": 0.0}

    def canon(table, root: Path) -> str:
        text = json.dumps(table.to_pylist(), default=str).replace(str(root), "<data>")
        return re.sub(r"(<data>/checkpoints/[^/\"]+/)[0-9a-f]{16}/", r"\1<key>/", text)
    for p in sorted((ref / "parquet").rglob("*.parquet")):
        if p.name.startswith("."):
            continue
        rel = p.relative_to(ref)
        q = got / rel
        if not q.exists():
            res["parquet_differ"].append(f"{rel} (missing)")
            continue
        a, b = pq.read_table(p), pq.read_table(q)
        keep = [c for c in a.column_names if not any(t in c for t in TIMING) and c not in ("path",)]
        a, b = a.select(keep), b.select([c for c in keep if c in b.column_names])
        # through JSON so that NaN equals NaN (M_exp's eval has undefined rates on tiny data)
        same = a.schema == b.schema and canon(a, ref) == canon(b, got)
        res["parquet_equal" if same else "parquet_differ"].append(str(rel))
    for m in sorted((ref / "checkpoints").rglob("manifest.json")):
        rel = m.relative_to(ref)
        r1, r2 = json.loads(m.read_text()), json.loads((got / rel).read_text()) if (got / rel).exists() else {}
        w1, w2 = Path(r1.get("path", "")) / "model.safetensors", Path(r2.get("path", "")) / "model.safetensors"
        if w1.is_file():
            if not w2.is_file():
                res["weights_differ"].append(f"{rel.parent} (missing)")
                continue
            res["weights_bitwise_equal"] += _sha(w1) == _sha(w2)
            a, b = load_file(str(w1)), load_file(str(w2))
            diff = max((float((a[k] - b[k]).abs().max()) if k in b and a[k].shape == b[k].shape else float("inf"))
                       for k in a) if set(a) == set(b) else float("inf")
            res["weights_max_abs_diff"] = max(res["weights_max_abs_diff"], diff)
            res["weights_equal" if diff <= WEIGHT_ATOL else "weights_differ"].append(str(rel.parent))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--random-kills", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", default=None, help="an existing uninterrupted `demo --tiny` data folder")
    ap.add_argument("--compare-only", action="store_true",
                    help="only redo the final comparison of <out>/reference (or --reference) and <out>/killed")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ref = Path(args.reference).resolve() if args.reference else out / "reference"
    report: dict = {"kills": [], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.compare_only:
        report = json.loads((out / "kill_report.json").read_text())
        report["comparison"] = compare_with_reference(ref, out / "killed")
        return _finish(out, report, [p for k in report["kills"] for p in
                                     k["visible_problems"] + k["finished_outputs_changed"] + k["lance_rows_lost"]])
    if not args.reference:
        r = demo(ref, args.iterations)
        report["reference"] = r
        if r["rc"] != 0:
            print(f"reference run failed (rc {r['rc']}); see {ref}.log", file=sys.stderr)
            return 1
    data = out / "killed"
    rng = random.Random(args.seed)
    plan = [("fault", f) for f in FAULT_KILLS] + [("time", round(rng.uniform(5, 90), 1))
                                                  for _ in range(args.random_kills)]
    rng.shuffle(plan[len(FAULT_KILLS) - 1:])   # the first fault points happen early, in order; the rest mixed
    all_problems = []
    for kind, what in plan:
        before = finished_outputs(data)
        lance_before = lance_rows_by_iteration(data) if data.exists() else {}
        r = demo(data, args.iterations, fault=what if kind == "fault" else None,
                 kill_after=what if kind == "time" else None)
        problems, info = visible_state_problems(data)
        after = finished_outputs(data)
        changed = [p for p, h in before.items() if after.get(p, h) != h or not Path(p).exists()]
        lance_after = lance_rows_by_iteration(data)
        lost = [f"{t}: iteration {i} had {n} rows, now {lance_after.get(t, {}).get(i, 0)}"
                for t, by in lance_before.items() for i, n in by.items() if lance_after.get(t, {}).get(i, 0) < n]
        entry = {"kind": kind, "at": what, **r, "visible_problems": problems, **info,
                 "finished_outputs_before": len(before), "finished_outputs_changed": changed, "lance_rows_lost": lost,
                 "runs_after_kill": run_statuses(data)}
        report["kills"].append(entry)
        all_problems += problems + changed + lost
        print(f"[kill] {kind} {what}: rc {r['rc']} after {r['seconds']}s; problems {len(problems)}, "
              f"finished outputs changed {len(changed)}, lance rows lost {len(lost)}, runs {entry['runs_after_kill']}",
              flush=True)
    before = finished_outputs(data)
    final = demo(data, args.iterations)
    after = finished_outputs(data)
    report["final"] = {**final, "runs": run_statuses(data),
                       "finished_outputs_changed": [p for p, h in before.items() if after.get(p) != h]}
    report["comparison"] = compare_with_reference(ref, data)
    return _finish(out, report, all_problems)


def _finish(out: Path, report: dict, all_problems: list[str]) -> int:
    final = report["final"]
    killed = sum(k["killed"] for k in report["kills"])
    runs = report["final"]["runs"]
    ok = (final["rc"] == 0 and not all_problems and not report["final"]["finished_outputs_changed"]
          and runs.get("STARTED", 0) == 0 and runs.get("STARTING", 0) == 0
          and not report["comparison"]["parquet_differ"] and not report["comparison"]["weights_differ"])
    report.update(kills_landed=killed, ok=ok)
    (out / "kill_report.json").write_text(json.dumps(report, indent=2))
    cmp_ = report["comparison"]
    print(f"[kill] {killed} of {len(report['kills'])} kills landed; final rc {final['rc']}; runs {runs}; "
          f"parquet equal {len(cmp_['parquet_equal'])} / differ {cmp_['parquet_differ']}; "
          f"weights equal {len(cmp_['weights_equal'])} (bitwise {cmp_['weights_bitwise_equal']}, max abs diff "
          f"{cmp_['weights_max_abs_diff']:.3g}) / differ {cmp_['weights_differ']}; ok={ok}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
