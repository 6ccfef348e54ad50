"""Replay-buffer retrieval: top-4 latency and recall@4 against exact numpy search, by buffer size.

    python -m bench.replay_retrieval [--sizes 10000,100000,1000000] [--queries 200] [--data clustered]

For each size, one ReplayBuffer is filled with N synthetic 384-d unit vectors (the MiniLM
dimension) and searched through its public API (``search_vectors``, one query per call, records
included), so the latency is what M_exp's retrieval pays. Below ``--index-min-rows`` the buffer
searches exactly (numpy over the version's vectors); above it through the IVF_RQ index.

Data (``--data``):
    clustered  (default) N/1000 cluster centres on the sphere; each point is a centre plus a
               16-dim Gaussian offset inside a cluster-specific subspace (scale 0.25) plus
               isotropic noise (norm 0.3), normalized. A top-4 neighbour has cosine ~0.78 and the
               4th/5th gap is ~0.007, so PQ-like codes alone do not find them (recall ~0.7).
               Queries are fresh draws from the same mixture, not stored points.
    uniform    i.i.d. uniform directions: no structure, the worst case for any IVF index.
Columns: write = adding the rows (vectors given, no embedding), index = building it, p50/p95 =
per-query latency after ``--warmup`` queries, recall@4 = |found ∩ exact top-4| / 4 averaged over
queries, numpy p50 = one brute-force matrix-vector product over all N vectors, for scale.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

from dreamgym_core.buffer import BufferConfig, ReplayBuffer

DIM = 384


class _VectorsOnly:
    """The buffer needs an embedder's name and size; this benchmark passes vectors directly."""

    model_name = "bench-random-384"
    dim = DIM

    def encode(self, texts):
        raise RuntimeError("the benchmark passes vectors; nothing should be embedded")


def clustered(n: int, seed: int, per_cluster: int = 1000, rank: int = 16, spread: float = 0.25,
              noise: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = max(4, n // per_cluster)
    centers = rng.standard_normal((c, DIM), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    bases = (rng.standard_normal((c, rank, DIM), dtype=np.float32) / np.sqrt(DIM)).astype(np.float32)
    labels = rng.integers(0, c, n)
    out = rng.standard_normal((n, DIM), dtype=np.float32) * np.float32(noise / np.sqrt(DIM))
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(c + 1))
    for j in range(c):
        idx = order[bounds[j]:bounds[j + 1]]
        out[idx] += centers[j] + (rng.standard_normal((len(idx), rank), dtype=np.float32) * spread) @ bases[j]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def uniform(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top4(x: np.ndarray, q: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Exact cosine top-4 row ids per query, chunked so 1M x Q sims never sit in memory at once."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for s in range(0, len(x), chunk):
        sims = q @ x[s:s + chunk].T
        part = np.argpartition(-sims, min(4, sims.shape[1] - 1), axis=1)[:, :4]
        best_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + s], axis=1)
        keep = np.argsort(-best_s, axis=1)[:, :4]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def _rows(start: int, n: int) -> pa.Table:
    ids = np.arange(start, start + n)
    text = pa.array(["s"] * n)
    return pa.table({
        "traj_id": pa.array([f"t{i // 100}" for i in ids]), "task_id": pa.array([f"task/{i % 1000}" for i in ids]),
        "env": pa.array(["bench"] * n), "step_idx": pa.array(ids, pa.int64()),   # step_idx = row id
        "state": text, "action": text, "next_state": text, "reward": pa.array(np.zeros(n)),
        "done": pa.array(np.zeros(n, bool)), "won": pa.array(np.zeros(n, bool)), "valid": pa.array(np.ones(n, bool)),
    })


def run_size(n: int, args, root: str) -> dict:
    gen = clustered if args.data == "clustered" else uniform
    t0 = time.perf_counter()
    allv = gen(n + args.queries + args.warmup, seed=n)
    x, q = allv[:n], allv[n:]
    gen_s = time.perf_counter() - t0
    cfg = BufferConfig(table=f"bench_{n}", index_min_rows=args.index_min_rows, nprobes=args.nprobes,
                       refine_factor=args.refine_factor, auto_index=False)
    buf = ReplayBuffer(root, _VectorsOnly(), cfg)
    t0 = time.perf_counter()
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        buf.add(_rows(s, m), "synthetic", 1, vectors=x[s:s + m])
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    built = buf.ensure_index()
    index_s = time.perf_counter() - t0
    truth = exact_top4(x, q[args.warmup:])
    lat, recall = [], []
    for i, qi in enumerate(q):
        t0 = time.perf_counter()
        hits = buf.search_vectors(qi, k=4)[0]
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            lat.append(dt * 1e3)
            recall.append(len({h.step_idx for h in hits} & set(truth[i - args.warmup].tolist())) / 4)
    np_lat = []
    for qi in q[:20]:
        t0 = time.perf_counter()
        s = x @ qi
        np.argpartition(-s, 4)[:4]
        np_lat.append((time.perf_counter() - t0) * 1e3)
    return {"rows": n, "path": "IVF_RQ" if built == "built" else "exact", "gen_s": gen_s, "write_s": write_s,
            "index_s": index_s, "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95),
            "recall": float(np.mean(recall)), "numpy_p50": float(np.median(np_lat))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated row counts")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    ap.add_argument("--index-min-rows", type=int, default=BufferConfig.index_min_rows)
    ap.add_argument("--nprobes", type=int, default=BufferConfig.nprobes)
    ap.add_argument("--refine-factor", type=int, default=BufferConfig.refine_factor)
    ap.add_argument("--dir", default=None, help="where the tables go (default: a temp folder, deleted after)")
    args = ap.parse_args(argv)

    root = args.dir or tempfile.mkdtemp(prefix="replay_bench_")
    print(f"data={args.data} dim={DIM} k=4 queries={args.queries} (+{args.warmup} warm-up) "
          f"index_min_rows={args.index_min_rows} nprobes={args.nprobes} refine_factor={args.refine_factor}",
          flush=True)
    try:
        results = []
        for n in [int(s) for s in args.sizes.split(",")]:
            results.append(run_size(n, args, root))
            r = results[-1]
            print(f"  done {n} rows (data generation {r['gen_s']:.1f} s)", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    head = f"{'rows':>9} | {'search':>6} | {'write s':>7} | {'index s':>7} | {'p50 ms':>6} | {'p95 ms':>6} | " \
           f"{'recall@4':>8} | {'numpy p50 ms':>12}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['rows']:>9} | {r['path']:>6} | {r['write_s']:>7.1f} | {r['index_s']:>7.1f} | {r['p50']:>6.2f} | "
              f"{r['p95']:>6.2f} | {r['recall']:>8.3f} | {r['numpy_p50']:>12.2f}")


if __name__ == "__main__":
    main()
