"""Policy-update throughput: our PPO/GRPO trainer against TRL's GRPOTrainer, and CPU training MFU.

    .venv/bin/python -m bench.policy_update [--repeats 5] [--skip-trl] [--no-share] [--distinct-prompts]

Workload (the same for both, one process, the same torch threads): the embedded CPU default policy
(``build_tiny_llama`` with the default ``TinyLlamaConfig``, a locally trained byte-level BPE), a
batch of ``--batch`` samples in GRPO groups of ``--group``, each sample = one prompt of about
``--prompt-tokens`` tokens followed by ``--candidates`` x ``--cand-tokens`` action tokens. For TRL a
sample is the same prompt with one completion of candidates x cand-tokens tokens (forced length), so
both sides push the same number of real tokens per sample through forward + backward. One
optimizer step per update (minibatch = batch, 1 epoch), KL coefficient 0.04 on both sides (a
reference-model forward each), fp32.

What is timed
-------------
- ours: ``PolicyTrainer.update(trajectories)``: building the decision rows (tokenization), the
  reference forward, the policy forward + backward, clipping and the AdamW step.
- TRL: one ``Trainer`` step (``on_step_begin`` -> ``on_step_end`` callbacks): generation, reward,
  reference forward, forward + backward, optimizer step; ``_generate`` (the sampling loop alone) is
  timed apart and subtracted for the "TRL update" row, which then covers the same work as ours.
Each row is the median over ``--repeats`` steps after ``--warmup`` steps; the two trainers alternate
step by step so that load from other processes hits both alike. Tokens/s counts real (non-pad)
tokens per sample (prompt + action tokens), the same logical work on both sides.

Group sharing: as in GRPO (and in TRL's workload, where each group is one prompt repeated
``--group`` times), the samples of a group share their prompt, here also the candidates (the task's
initial state), and differ in the action taken and the reward. Ours scores each distinct decision
once (``RLConfig.share_decisions``, exact: same loss and gradient, see tests/test_trainer.py); TRL
runs every sample's prompt + completion. ``--no-share`` turns the sharing off,
``--distinct-prompts`` gives every sample its own prompt (nothing to share).

MFU: achieved FLOP/s over the peak of a torch fp32 matmul (``--peak-n`` square, best of several)
measured in the same run on the same threads, counting only the tokens actually run (a shared
decision once). The estimate rows: the policy's forward + backward (6 x parameters x tokens:
forward 2N, backward 4N) and all model FLOPs of the update (+ the reference model's forward, 2N
per token), attention not counted. The exact rows (``update_flops``) count every matmul of the
model as it is run on the real tokens: projections, causal attention over real keys, the LM head
where logits are used; the training MFU row divides the policy's forward + backward FLOPs by the
optimize phase's time (``timing/update_s``: forward, backward, clipping and the AdamW step), the
last row all of them (+ the reference forward) by the whole update.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from typing import Sequence

import torch


def _corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    rooms = ["kitchen", "pantry", "bedroom", "bathroom", "laundry room", "living room", "backyard", "corridor"]
    things = ["apple", "red potato", "cookbook", "towel", "wet white shirt", "dirty plate", "knife", "clean mug",
              "fridge", "dishwasher", "kitchen cupboard", "shelf", "bed", "toilet", "washing machine", "table"]
    out = []
    for _ in range(n):
        objs = " | ".join(f"{rng.choice(things)} ({rng.choice(['open', 'closed', 'on the table', 'clean'])})"
                          for _ in range(rng.randint(4, 9)))
        out.append(f"Task: put the {rng.choice(things)} in the {rng.choice(things)}\n"
                   f"Did: take {rng.choice(things)} -> You take the {rng.choice(things)}.\n"
                   f"feedback: You see a {rng.choice(things)}.\nlocation: {rng.choice(rooms)}\n"
                   f"objects: {objs}\nexits: north, south\ninventory: {rng.choice(things)}\n"
                   f"Action: open {rng.choice(things)}\n")
    return out


def _text_of_tokens(tok, rng: random.Random, n: int, corpus: list[str]) -> str:
    """Real-looking text cut to about ``n`` tokens (whole lines from the corpus, then trimmed)."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tok(rng.choice(corpus), add_special_tokens=False)["input_ids"]
    return tok.decode(ids[:n])


def _action_of_tokens(tok, rng: random.Random, n: int, vocab_words: list[str]) -> str:
    while True:
        words = " ".join(rng.choice(vocab_words) for _ in range(n))
        ids = tok(" " + words + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return tok.decode(ids[:n - 1]).strip() or words


def build_workload(args, workdir: str):
    from dreamgym_core.models import TinyLlamaConfig, build_tiny_llama, train_tokenizer
    from dreamgym_core.policy import PolicyFormat, build_policy_prompt, set_policy_format
    from dreamgym_core.rollout import PolicyContext
    from dreamgym_core.schema import Task, Trajectory, Transition

    corpus = _corpus(2000, args.seed)
    tok = train_tokenizer(corpus, os.path.join(workdir, "tok"), vocab_size=3000)
    model = build_tiny_llama(tok, TinyLlamaConfig(), seed=args.seed)
    fmt = PolicyFormat(history_window=0, max_prompt_tokens=args.prompt_tokens + 64)
    set_policy_format(model, fmt)
    model.save_pretrained(os.path.join(workdir, "model"))
    tok.save_pretrained(os.path.join(workdir, "model"))
    rng = random.Random(args.seed)
    words = sorted({w for line in corpus for w in line.replace("\n", " ").split() if w.isalpha()})
    trajs, trl_prompts = [], []
    for i in range(args.batch):
        task = Task(f"bench/{i // args.group}", "bench", "g", "train", i // args.group, "put the apple in the fridge")
        if args.distinct_prompts or i % args.group == 0:  # a GRPO group starts from its task's initial state
            state = _text_of_tokens(tok, rng, args.prompt_tokens, corpus)
            cands = tuple(dict.fromkeys(_action_of_tokens(tok, rng, args.cand_tokens, words)
                                        for _ in range(args.candidates)))
        prompt = build_policy_prompt(PolicyContext(task.instruction, state, cands), fmt)
        trl_prompts.append(prompt)
        step = Transition(traj_id=f"{task.task_id}#{i}", task_id=task.task_id, env="bench", step_idx=0, state=state,
                          action=cands[rng.randrange(len(cands))], next_state="", reward=float(rng.random() < 0.5),
                          score=0.0, done=True,
                          won=False, lost=False, valid=True, action_kind="policy", candidates=cands, logprob=0.0,
                          prompt=prompt)
        trajs.append(Trajectory(f"{task.task_id}#{i}", task, "bench", (step,)))
    return tok, model, trajs, trl_prompts


def _with_acting_logprobs(model, tok, trajs, cfg):
    """Replace the placeholder log-probs by the current policy's, as a rollout would have recorded."""
    from dataclasses import replace

    from dreamgym_core.policy import policy_format, score_candidates
    from dreamgym_core.rl.advantages import choice_logprobs, decision_samples

    samples = decision_samples(trajs)
    scores = score_candidates(model, tok, [s.prompt for s in samples], [s.candidates for s in samples],
                              max_prompt_tokens=policy_format(model).max_prompt_tokens)
    lp, _ = choice_logprobs(scores, [s.chosen for s in samples], cfg.temperature)
    return [replace(t, steps=(replace(t.steps[0], logprob=float(x)),)) for t, x in zip(trajs, lp)]


class OursRunner:
    def __init__(self, args, tok, model, trajs):
        from dreamgym_core.rl.trainer import PolicyTrainer, RLConfig

        self.cfg = RLConfig(algorithm="grpo", lr=1e-4, ppo_epochs=1, minibatch_size=args.batch, kl_coef=0.04,
                            seed=args.seed,
                            share_decisions=not args.no_share)
        self.trainer = PolicyTrainer(model, tok, self.cfg)
        self.phase_s: list[float] = []  # the optimize phase alone: policy forward + backward + AdamW
        self.trajs = _with_acting_logprobs(model, tok, trajs, self.cfg)

    def step(self) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        m = self.trainer.update(self.trajs)
        self.last = m
        return time.perf_counter() - t0, int(m["tokens"]), int(m["tokens_computed"])


class TRLRunner:
    """TRL's GRPOTrainer on the same model and prompts, stepped one optimizer step at a time."""

    def __init__(self, args, model_dir: str, prompts: list[str], workdir: str):
        from datasets import Dataset
        from transformers import AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        rng = random.Random(args.seed)
        completion = args.candidates * args.cand_tokens
        self.gen_s: list[float] = []
        self.step_s: list[float] = []
        self.tokens: list[int] = []
        tok = AutoTokenizer.from_pretrained(model_dir)
        outer = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                outer._t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                outer.step_s.append(time.perf_counter() - outer._t0)

        def reward(completions, **kwargs):
            return [float(rng.random() < 0.5) for _ in completions]

        n_steps = args.warmup + args.repeats
        # the generation dataloader takes batch/group unique prompts per step, each repeated `group` times
        data = Dataset.from_dict({"prompt": [prompts[i % len(prompts)] for i in range(0, n_steps * args.batch, args.group)]})
        cfg = GRPOConfig(output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=args.batch,
                         num_generations=args.group, gradient_accumulation_steps=1, steps_per_generation=1,
                         num_iterations=1, beta=0.04, learning_rate=1e-4, max_completion_length=completion,
                         generation_kwargs={"min_new_tokens": completion}, max_steps=n_steps, use_cpu=True,
                         bf16=False, fp16=False, report_to="none", logging_steps=10_000, save_strategy="no",
                         dataloader_num_workers=0, seed=args.seed, shuffle_dataset=False, disable_dropout=True)
        self.trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=cfg, train_dataset=data,
                                   processing_class=tok, callbacks=[StepTimer()])
        generate = self.trainer._generate

        def timed_generate(batch_prompts):
            t0 = time.perf_counter()
            out = generate(batch_prompts)
            self.gen_s.append(time.perf_counter() - t0)
            self.tokens.append(sum(map(len, out[0])) + sum(map(len, out[1])))  # prompt ids, completion ids
            return out

        self.trainer._generate = timed_generate


def forward_flops(config, prompt_len: int, cand_lens: Sequence[int]) -> int:
    """Model FLOPs of one ``score_candidates`` forward of a decision (Llama shapes of ``config``).

    Each multiply-add counts 2. Prompt: ``prompt_len`` tokens through every layer's q/k/v/o and
    gate/up/down projections, causal attention over the real keys before each (QK^T and AV:
    2 x 2 x heads x head_dim x context per token and layer), and the LM head at the last position
    only. Each candidate of ``n`` tokens: its ``n - 1`` continuation tokens the same way (context =
    prompt + its own earlier tokens) with the LM head at each. Padding, masked keys and the
    per-candidate KV copies are not model FLOPs and are not counted. Backward is 2x forward
    (``update_flops``)."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_token = 2 * L * (d * q + 2 * d * kv + q * d + 3 * d * config.intermediate_size)
    attn = lambda ctx: 2 * 2 * L * q * ctx  # noqa: E731  one token attending to ctx keys (itself included)
    head = 2 * d * V
    f = prompt_len * per_token + sum(attn(i + 1) for i in range(prompt_len)) + head
    for n in cand_lens:
        f += (n - 1) * (per_token + head) + sum(attn(prompt_len + k + 1) for k in range(n - 1))
    return f


def update_flops(trainer, trajectories) -> tuple[int, int]:
    """(policy forward + backward, reference forward) model FLOPs of ``trainer.update(trajectories)``
    with one epoch over one minibatch: each distinct decision once (``share_decisions``), prompts
    truncated as the trainer truncates them."""
    from dreamgym_core.policy import END_OF_ACTION
    from dreamgym_core.rl.advantages import _distinct, decision_samples

    cfg, tok = trainer.cfg, trainer.tokenizer
    samples = decision_samples(trajectories)
    first = _distinct(samples)[0] if cfg.share_decisions else range(len(samples))
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    fwd = sum(forward_flops(trainer.model.config, min(len(ids(samples[i].prompt)), trainer.fmt.max_prompt_tokens),
                            [len(ids(" " + c + END_OF_ACTION)) for c in samples[i].candidates]) for i in first)
    return 3 * fwd, (fwd if trainer.ref_model is not None else 0)


def matmul_peak(n: int, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=192)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--cand-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--peak-n", type=int, default=1024)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--distinct-prompts", action="store_true",
                    help="every sample its own prompt (no GRPO group sharing its initial state)")
    ap.add_argument("--no-share", action="store_true", help="ours with RLConfig(share_decisions=False)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    workdir = tempfile.mkdtemp(prefix="bench-policy-update-")
    tok, model, trajs, prompts = build_workload(args, workdir)
    params = sum(p.numel() for p in model.parameters())
    ours = OursRunner(args, tok, model, trajs)
    trl = trl_error = None
    if not args.skip_trl:
        try:
            import trl as trl_pkg

            trl = TRLRunner(args, os.path.join(workdir, "model"), prompts, workdir)
            trl_version = trl_pkg.__version__
        except Exception as exc:  # report why TRL could not run instead of failing the table
            trl_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    # Alternate: one of ours, then one TRL step, so background load hits both alike.
    our_s, our_tok, our_run = [], [], []
    if trl is not None:
        trl.trainer.add_callback(_Interleave(lambda: _record(ours, our_s, our_tok, our_run)))
        trl.trainer.train()
        if len(our_s) < args.warmup + args.repeats:  # the callback runs once per TRL step
            raise RuntimeError("TRL ran fewer steps than asked")
    else:
        for _ in range(args.warmup + args.repeats):
            _record(ours, our_s, our_tok, our_run)
    peak = statistics.median(matmul_peak(args.peak_n) for _ in range(3))

    w = args.warmup
    our_t = statistics.median(our_s[w:])
    our_tps = statistics.median(n / s for n, s in zip(our_tok[w:], our_s[w:]))
    # MFU counts the tokens actually run (a shared decision once); minibatch = batch and one epoch, so
    # the reference forward runs exactly the same tokens as the policy's forward + backward.
    flops6 = statistics.median(6 * params * c / s for c, s in zip(our_run[w:], our_s[w:]))
    flops8 = statistics.median(8 * params * c / s for c, s in zip(our_run[w:], our_s[w:]))
    train_f, ref_f = update_flops(ours.trainer, ours.trajs)
    phase = statistics.median(ours.phase_s[w:])
    exact_train = train_f / phase
    exact_all = statistics.median((train_f + ref_f) / s for s in our_s[w:])
    print(f"\nworkload: {params / 1e6:.2f}M-param Llama, batch {args.batch} (groups of {args.group}), ~{args.prompt_tokens}"
          f"-token prompts + {args.candidates}x{args.cand_tokens} action tokens, {args.threads} torch threads, "
          f"median of {args.repeats} after {w} warm-up; "
          f"{'distinct prompts' if args.distinct_prompts else 'each group shares its prompt and candidates'}, "
          f"ours {'without' if args.no_share else 'with'} shared decisions\n")
    print("| trainer | step s | update s | tokens/step | update tokens/s | ratio (ours / this) |")
    print("|---|---|---|---|---|---|")
    print(f"| ours PolicyTrainer.update | {our_t:.3f} | {our_t:.3f} | {statistics.median(our_tok[w:]):.0f} | "
          f"{our_tps:,.0f} | 1.00 |")
    if trl is not None:
        upd = [s - g for s, g in zip(trl.step_s[w:], trl.gen_s[w:])]
        trl_tps = statistics.median(n / u for n, u in zip(trl.tokens[w:], upd))
        trl_full = statistics.median(n / s for n, s in zip(trl.tokens[w:], trl.step_s[w:]))
        print(f"| TRL {trl_version} GRPOTrainer step (incl. generation) | {statistics.median(trl.step_s[w:]):.3f} | "
              f"- | {statistics.median(trl.tokens[w:]):.0f} | {trl_full:,.0f} | {our_tps / trl_full:.2f} |")
        print(f"| TRL {trl_version} step minus generation (update) | - | {statistics.median(upd):.3f} | "
              f"{statistics.median(trl.tokens[w:]):.0f} | {trl_tps:,.0f} | {our_tps / trl_tps:.2f} |")
        print(f"\nTRL generation alone: median {statistics.median(trl.gen_s[w:]):.3f} s per step")
    else:
        print(f"\nTRL not measured: {trl_error or 'skipped (--skip-trl)'}")
    print("\n| MFU (ours) | value |")
    print("|---|---|")
    print(f"| fp32 matmul peak ({args.peak_n}^3, {args.threads} threads) | {peak / 1e9:.1f} GFLOP/s |")
    print(f"| tokens run per update (logical {statistics.median(our_tok[w:]):.0f}) | "
          f"{statistics.median(our_run[w:]):.0f} |")
    print(f"| achieved, policy forward + backward (6 x {params / 1e6:.2f}M params x tokens run / update s) | "
          f"{flops6 / 1e9:.1f} GFLOP/s |")
    print(f"| MFU, policy forward + backward | {100 * flops6 / peak:.1f}% |")
    print(f"| achieved, + reference forward (8 x params x tokens run / update s) | {flops8 / 1e9:.1f} GFLOP/s |")
    print(f"| MFU, all model FLOPs of the update | {100 * flops8 / peak:.1f}% |")
    print(f"| exact model FLOPs per update: policy forward + backward / reference forward "
          f"(`update_flops`: attention and LM head as run, no padding) | {train_f / 1e9:.2f} / {ref_f / 1e9:.2f} GFLOP |")
    print(f"| training MFU: policy forward + backward FLOPs / optimize phase ({phase:.3f} s: forward, backward, "
          f"AdamW) | {exact_train / 1e9:.1f} GFLOP/s = **{100 * exact_train / peak:.1f}%** |")
    print(f"| MFU of the whole update: all exact model FLOPs / update s | {exact_all / 1e9:.1f} GFLOP/s = "
          f"{100 * exact_all / peak:.1f}% |")


def _record(ours: OursRunner, times: list[float], tokens: list[int], computed: list[int]) -> None:
    dt, n, c = ours.step()
    times.append(dt)
    tokens.append(n)
    computed.append(c)
    ours.phase_s.append(ours.last["timing/update_s"])


class _Interleave:
    """A TrainerCallback that runs one of our updates between TRL steps (outside TRL's timed span)."""

    def __new__(cls, fn):
        from transformers import TrainerCallback

        class Cb(TrainerCallback):
            def on_step_end(self, *a, **k):  # runs after StepTimer's on_step_end: outside TRL's timed span
                fn()

        return Cb()


if __name__ == "__main__":
    main()
