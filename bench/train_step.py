"""Where a training step's time goes: rollout, advantages, update (``rl.step.train_step``).

    python -m bench.train_step [--steps 5] [--tasks 8] [--group 4] [--hidden 128] [--layers 2] [--threads N]

The embedded default policy size (a from-scratch tiny Llama, ``PolicyInitConfig``) acts in the lamp
learner check (``envs.lamp``: short episodes, a real env with no engine start-up), GRPO and PPO with
the defaults of ``RLConfig``. Per algorithm and phase: the median seconds over ``--steps`` steps
(after one warm-up step), the phase's share of the step, and decisions per second; then the ratio
of the update phases to the rollout. Nothing is written outside a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

PHASES = ("rollout", "advantages", "update")


def build_policy(workdir: str, hidden: int, layers: int, seed: int):
    """A tiny Llama with a tokenizer trained on lamp prompts, carrying the default PolicyFormat."""
    from dreamgym_core.envs.lamp import COLOURS, INSTRUCTION
    from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, train_tokenizer
    from dreamgym_core.policy import PolicyFormat, set_policy_format

    lines = [f"Task: {INSTRUCTION}\nDid: press {a} -> You press {a}.\nfeedback: x\nlocation: control room\n"
             f"objects: lamp ({b}) | panel (1 of 3 lit)\nAction: press {b}\n" for a in COLOURS for b in COLOURS]
    tok = train_tokenizer(lines * 4, os.path.join(workdir, "tok"), vocab_size=500, min_frequency=1)
    model = build_tiny_llama(tok, TinyLlamaConfig(hidden=hidden, layers=layers, heads=4, kv_heads=4,
                                                  intermediate=3 * hidden), seed=seed)
    set_policy_format(model, PolicyFormat())
    return model, tok


def time_steps(algorithm: str, args, workdir: str) -> list[dict[str, float]]:
    from dreamgym_core.envs import EnvSpec, SerialBatchEnv, make_env
    from dreamgym_core.rl.step import train_step
    from dreamgym_core.rl.trainer import PolicyTrainer, RLConfig
    from dreamgym_core.rollout import RolloutConfig

    model, tok = build_policy(workdir, args.hidden, args.layers, args.seed)
    trainer = PolicyTrainer(model, tok, RLConfig(algorithm=algorithm, seed=args.seed))
    spec = EnvSpec("lamp")
    tasks = make_env(spec).tasks("train", args.tasks)
    env = SerialBatchEnv(lambda: make_env(spec), max_engines=args.tasks * args.group)
    out = []
    try:
        for k in range(args.steps + 1):
            step = train_step(env, trainer, tasks, RolloutConfig(
                group_size=args.group if algorithm == "grpo" else 1, max_steps=8, batch_size=args.tasks * args.group,
                iteration=k, seed=args.seed + k), policy_name=f"{algorithm}@{k}")
            if k:  # the first step warms up (allocations, tokenizer caches)
                out.append({**{p: step.metrics[f"timing/{p}_s"] for p in PHASES},
                            "decisions": float(step.stats.transitions)})
    finally:
        env.close()
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.tasks < 1 or args.group < 1:
        raise SystemExit("bench.train_step: --steps, --tasks and --group must be >= 1")
    torch.set_num_threads(args.threads)
    print(f"lamp (3 colours, length 3), tiny Llama hidden {args.hidden} x {args.layers} layers, {args.tasks} tasks "
          f"(GRPO: groups of {args.group}), {args.threads} torch threads, median of {args.steps} steps after 1 "
          "warm-up\n")
    print("| algorithm | phase | median s | share of step | decisions/s |\n|---|---|---|---|---|")
    ratios = []
    for algorithm in ("grpo", "ppo"):
        with tempfile.TemporaryDirectory() as workdir:
            rows = time_steps(algorithm, args, workdir)
        med = {p: statistics.median(r[p] for r in rows) for p in PHASES}
        total = sum(med.values())
        decisions = statistics.median(r["decisions"] for r in rows)
        for p in PHASES:
            print(f"| {algorithm} | {p} | {med[p]:.3f} | {med[p] / total:.0%} | {decisions / max(med[p], 1e-9):,.0f} |")
        ratios.append((algorithm, (med["advantages"] + med["update"]) / max(med["rollout"], 1e-9), total))
    print("\n| algorithm | step s (median phases) | (advantages + update) / rollout |\n|---|---|---|")
    for algorithm, ratio, total in ratios:
        print(f"| {algorithm} | {total:.3f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
