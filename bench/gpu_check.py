"""GPU check: SmolLM2-135M as the policy and as M_exp, through accelerate in bf16 (one command).

    python -m bench.gpu_check             # on a machine with a GPU: under 8 minutes on one H100
    python -m bench.gpu_check --smoke     # anywhere: a tiny random Llama, a few decisions (the test runs it)

Without an accelerator and without ``--smoke`` it refuses (exit 2): the numbers it prints are only
meaningful on a GPU. Placement comes from ``dreamgym_core.device`` (the same rule the pipeline uses):
the policy trains with fp32 weights under ``accelerate``'s bf16 autocast, M_exp serves in bf16.

What it measures
----------------
1. **Policy update MFU.** ``PolicyTrainer.update`` (GRPO, one epoch over one minibatch, KL to a
   reference copy) on ``--batch`` decisions in groups of ``--group`` (``bench.policy_update``'s
   workload: prompts of about ``--prompt-tokens`` tokens, ``--candidates`` actions each). Model FLOPs
   are counted exactly on the tokens run (``bench.policy_update.update_flops``: projections, causal
   attention over real keys, the LM head where used; backward = 2 x forward, plus the reference
   forward) and divided by the median update time. MFU is given against the measured peak of a
   bf16 matmul on this device (``--peak-n`` square) and, on an H100/H200, the nominal dense bf16 peak.
2. **Simulator tokens/s.** ``ExperienceModel.predict`` (the batched simulator, ``SimConfig`` defaults,
   batch ``--sim-batch``) against the same prompts one at a time through ``model.generate``
   (``bench.mexp_generation.compare``): real M_exp prompts from collected TWX twc episodes. The
   weights are SmolLM2's, not a trained M_exp: outputs are mostly unparsable and generations run
   long, which is a throughput test, not a fidelity one.

Each section reports its own failure and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
"""Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts)."""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best achieved FLOP/s of an n x n matmul in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(8):
            torch.mm(a, b)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / 8)
    return 2 * n ** 3 / best


def nominal_peak(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in NOMINAL_BF16_PEAK.items() if k in name), None)


def _models(args, workdir: str):
    """(checkpoint dir, description): SmolLM2-135M-Instruct, or for --smoke a tiny random Llama."""
    if not args.smoke:
        from dreamgym_core.models import smollm2_checkpoint

        return smollm2_checkpoint(args.model_cache or None), "SmolLM2-135M-Instruct"
    from bench.policy_update import _corpus
    from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, save_checkpoint, train_tokenizer

    tok = train_tokenizer(_corpus(200, args.seed), os.path.join(workdir, "tok"), vocab_size=600)
    model = build_tiny_llama(tok, TinyLlamaConfig(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64),
                             seed=args.seed)
    return save_checkpoint(model, tok, os.path.join(workdir, "tiny"), {}), "tiny random Llama (smoke)"


def policy_update(args, path: str, workdir: str) -> dict:
    from bench.policy_update import _with_acting_logprobs, build_workload, update_flops
    from dreamgym_core.device import accelerator, placement
    from dreamgym_core.models import load_checkpoint
    from dreamgym_core.rl.trainer import PolicyTrainer, RLConfig

    wl = SimpleNamespace(seed=args.seed, batch=args.batch, group=args.group, prompt_tokens=args.prompt_tokens,
                         candidates=args.candidates, cand_tokens=args.cand_tokens, distinct_prompts=False)
    _, _, trajs, _ = build_workload(wl, workdir)  # text only: lengths are about right in any tokenizer
    model, tok, _ = load_checkpoint(path, training=True)
    ref, _, _ = load_checkpoint(path, training=True)
    # the prompt format (history window 0, truncation) is RLConfig's here and, once the training step
    # records it with the policy, the model's (``policy.set_policy_format``): set whichever exists
    fmt = {"history_window": 0, "max_prompt_tokens": args.prompt_tokens + 64}
    fields = {f.name for f in dataclasses.fields(RLConfig)}
    cfg = RLConfig(algorithm="grpo", lr=1e-5, ppo_epochs=1, minibatch_size=args.batch, kl_coef=0.04, seed=args.seed,
                   **{k: v for k, v in fmt.items() if k in fields})
    try:
        from dreamgym_core.policy import PolicyFormat, set_policy_format
    except ImportError:
        pass
    else:
        for m in (model, ref):
            set_policy_format(m, PolicyFormat(**fmt))
    trainer = PolicyTrainer(model, tok, cfg, ref_model=ref, accelerator=accelerator())
    trajs = _with_acting_logprobs(trainer.model, tok, trajs, cfg)
    dev = placement(training=True)
    times, last = [], {}
    for i in range(args.warmup + args.repeats):
        _sync(dev.device)
        t0 = time.perf_counter()
        last = trainer.update(trajs)
        _sync(dev.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    policy_flops, ref_flops = update_flops(trainer, trajs)
    secs = statistics.median(times)
    measured = matmul_peak(dev.device, torch.bfloat16 if dev.mixed_precision == "bf16" else torch.float32,
                           args.peak_n)
    out = {"device": dev.device, "mixed_precision": dev.mixed_precision,
           "params_M": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
           "update_s": secs, "tokens": float(last.get("tokens", float("nan"))),
           "model_TFLOP_per_update": (policy_flops + ref_flops) / 1e12,
           "achieved_TFLOP_s": (policy_flops + ref_flops) / secs / 1e12,
           "peak_measured_TFLOP_s": measured / 1e12,
           "mfu_vs_measured": (policy_flops + ref_flops) / secs / measured}
    nominal = nominal_peak(dev.device)
    if nominal:
        out["mfu_vs_nominal"] = (policy_flops + ref_flops) / secs / nominal
    return out


def simulator(args, path: str) -> dict:
    from dataclasses import replace

    from bench.mexp_generation import collect_prompts, compare
    from dreamgym_core.device import placement
    from dreamgym_core.experience_model import PromptConfig, SimConfig
    from dreamgym_core.models import load_checkpoint

    model, tok, _ = load_checkpoint(path)  # serving: bf16 on the accelerator
    pcfg = PromptConfig()
    prompts, contexts, pool = collect_prompts(args.sim_prompts, pcfg, args.sim_tasks, seed=args.seed)
    cfg = SimConfig(max_new_tokens=args.max_new_tokens, greedy=True, prompt=pcfg, batch_size=args.sim_batch)
    out = {"device": placement().device, "dtype": placement().dtype_name, "prompts": len(prompts), "pool": pool}
    try:
        res = compare(model, tok, prompts, contexts, cfg, [args.sim_batch], repeats=args.sim_repeats)
    except Exception as exc:  # the lean forward is the CPU path's; fall back to transformers' and say so
        out["lean_forward_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        cfg = replace(cfg, forward="transformers")
        res = compare(model, tok, prompts, contexts, cfg, [args.sim_batch], repeats=args.sim_repeats)
    one, batched = res["one_at_a_time"], res[f"batched_{args.sim_batch}"]
    out |= {"forward": cfg.forward, "one_at_a_time_tokens_s": one["tokens_per_s"],
            "batched_tokens_s": batched["tokens_per_s"], "one_at_a_time_steps_s": one["steps_per_s"],
            "batched_steps_s": batched["steps_per_s"], "speedup_tokens_s": batched["tokens_per_s"] / one["tokens_per_s"],
            "tokens_per_step": batched["tokens_per_step"], "same_text": batched["same_text"]}
    return out


def _print(title: str, rec: dict) -> None:
    print(f"\n## {title}")
    for k, v in rec.items():
        print(f"  {k:28s} {v:.4g}" if isinstance(v, float) else f"  {k:28s} {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random model and workload; runs on CPU")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=384)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--cand-tokens", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-n", type=int, default=8192)
    ap.add_argument("--sim-prompts", type=int, default=64)
    ap.add_argument("--sim-tasks", type=int, default=6)
    ap.add_argument("--sim-batch", type=int, default=64)
    ap.add_argument("--sim-repeats", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=96,
                    help="the budget is set by one-at-a-time generate: about 64 x 96 steps at batch size 1")
    ap.add_argument("--model-cache", default="", help="where SmolLM2's converted copy goes (default ~/.cache)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    from dreamgym_core.device import placement

    hf_logging.disable_progress_bar()

    where = placement()
    if not where.accelerated and not args.smoke:
        print("bench.gpu_check: no accelerator here (dreamgym_core.device chose cpu/float32); run it on a GPU "
              "machine, or pass --smoke for the tiny CPU check", file=sys.stderr)
        return 2
    if args.smoke:
        args.batch, args.group, args.prompt_tokens, args.candidates = 4, 2, 24, 3
        args.warmup, args.repeats, args.peak_n = 0, 1, 128
        args.sim_prompts, args.sim_tasks, args.sim_batch, args.sim_repeats, args.max_new_tokens = 4, 1, 4, 1, 8
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="gpu-check-")
    path, what = _models(args, workdir)
    gpu = torch.cuda.get_device_name() if where.device.startswith("cuda") else where.device
    print(f"bench.gpu_check: {what} on {gpu} (serving {where.dtype_name}; training fp32 weights, "
          f"mixed precision {placement(training=True).mixed_precision}); torch {torch.__version__}")
    failed = False
    for title, run in (("policy update (PolicyTrainer.update, GRPO + KL)", lambda: policy_update(args, path, workdir)),
                       ("simulator (ExperienceModel.predict vs one-at-a-time generate)", lambda: simulator(args, path))):
        t0 = time.perf_counter()
        try:
            rec = run()
        except Exception as exc:  # one section's failure is reported; the other still runs
            failed = True
            rec = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        rec["section_s"] = time.perf_counter() - t0
        _print(title, rec)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
