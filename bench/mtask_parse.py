"""M_task's parse rate with and without its grammar constraint, on the demo's M_exp and real twc tasks.

    python -m bench.mtask_parse DATA [prompts=32] [mexp=DIR] [seed=0] [show=0]

DATA is a data root with ``seed_tasks``, ``offline_trajectories`` and ``experience_model``
materialized (``make demo``). ``prompts`` train tasks (a seeded draw among those with a recorded
start state) each seed one M_task prompt built as the loop builds it (the seed with a task of its
room, the room's object catalogue); M_exp's weights write one variant per prompt, sampled
(temperature 1) once freely and once inside the grammar (``curriculum.TaskConstraint``), with the
same seed. Each output is parsed as the loop parses it (pointer form with the parent as template)
and the parsed ones go through the static part of the feasibility filter (duplicate, format,
unknown; no simulation). Prints one row per decoding; ``show=N`` prints N outputs of each.
Nothing is written to DATA.
"""

from __future__ import annotations

import collections
import glob
import os
import random
import sys
import time


def _latest(data: str, pattern: str) -> str:
    found = sorted((p for p in glob.glob(os.path.join(data, pattern)) if os.path.isdir(p)), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"bench.mtask_parse: nothing matches {pattern} under {data}; materialize it first")
    return found[-1]


def main(argv: list[str]) -> int:
    if not argv or "=" in argv[0]:
        print(__doc__)
        return 2
    data, opts = argv[0], dict(a.split("=", 1) for a in argv[1:])
    n, seed, show = int(opts.get("prompts", 32)), int(opts.get("seed", 0)), int(opts.get("show", 0))
    mexp = opts.get("mexp") or _latest(data, "checkpoints/experience_model/*/final")

    import torch

    from assets.runtime import offline_start_states
    from dreamgym_core import curriculum as cur
    from dreamgym_core.io import read_parquet
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.schema import tasks_from_arrow

    torch.set_num_threads(2)
    tasks = tasks_from_arrow(read_parquet(os.path.join(data, "parquet", "seed_tasks.parquet")))
    starts = offline_start_states(read_parquet(os.path.join(data, "parquet", "offline_trajectories.parquet")))
    tasks = [t for t in tasks if t.task_id in starts]
    model, tok, meta = load_checkpoint(mexp)
    pointers = bool(meta.get("prompt", {}).get("pointers", True))
    seeds = sorted(random.Random(seed).sample(tasks, min(n, len(tasks))), key=lambda t: t.task_id)
    groups = cur.seed_groups(seeds, tasks, starts, 2, seed=seed)
    known = cur.object_catalogue(list(starts.values())) if pointers else {}
    cats = [known.get(cur.location_of(starts[t.task_id]), ()) if pointers else None for t in seeds]
    prompts = [cur.build_task_prompt(g, starts, 2, c) for g, c in zip(groups, cats)]
    templates = [starts[t.task_id] if c is not None else None for t, c in zip(seeds, cats)]
    print(f"M_exp {mexp} ({meta.get('metrics', {}).get('steps', '?')} SFT steps), {len(prompts)} prompts, "
          f"pointer form {pointers}")
    print("decoding      | proposals | parsed | parse rate | parse failures | static filter (kept / drops) | s")
    for constrained in (False, True):
        writer = cur.TaskWriter(model, tok, seed=seed, pointers=pointers, constrained=constrained)
        t0 = time.perf_counter()
        texts = writer.write(prompts, cats)
        dt = time.perf_counter() - t0
        kept, report = cur.synthesize(texts, seeds, tasks, starts, lambda ts: [], 1, cur.CurriculumConfig(), cats,
                                      templates)
        drops = {k: v for k, v in report["drops"].items() if v and k != "parse"}
        print(f"{'constrained' if constrained else 'free':13} | {report['proposals']:9} | {report['parsed']:6} | "
              f"{report['parse_rate']:10.2f} | {dict(collections.Counter(report['parse_failures']))} | "
              f"{len(kept)} / {drops} | {dt:.1f}")
        for text in texts[:show]:
            print("   ---\n   " + text.replace("\n", "\n   "))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
