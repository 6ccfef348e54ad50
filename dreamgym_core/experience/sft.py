"""SFT of the experience model M_exp (paper Eq. 5): examples, encoding, loss and the training loop.

Eq. 5: L = -log P(R* | s, a, H, D_k) - log P(s' | s, a, R*, H, D_k). Targets are
``exp_format.render_target(R*, delta)``: the reasoning tokens form the first term, the prediction
tokens (and the end-of-sequence token) the second; both are logged separately as ``loss/reasoning``
and ``loss/state`` (per-token means) and the optimised loss is their token-weighted sum divided by
the number of target tokens.

Departures from the paper (and why):
* D_k in SFT comes from OTHER tasks than the example's own (``retrieval.Retriever`` with
  ``exclude_own_task``): a neighbour from the same task would often be the answer itself, and the
  model would learn to copy instead of using evidence as it must on unseen tasks.
* ``done`` targets are the env's own end (won or lost), never the collector's step cap.
* The prediction is a structured change to the abstract state (``exp_format``), in pointer form by
  default (``prompt`` module); ``use_cot=False`` (the paper's no-reasoning ablation) trains an empty
  reasoning part, so the first term of Eq. 5 vanishes.
* Weighted sampling with length bucketing (``train_sft`` ``sample_weights``, ``_bucketed_draw``):
  rare outcomes (wins, invalid actions) are drawn more often; a sampling choice, not a loss change.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from dreamgym_core.exp_format import render_pointer_target, render_target
from dreamgym_core.experience.decoding import _ids
from dreamgym_core.experience.prompt import PromptConfig, Query, Retrieve, _feedback, demos_for, has_progress, \
    row_progress, step_prompt
from dreamgym_core.state import AbstractState
from dreamgym_core.state_delta import diff


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    reasoning: str
    """The target's reasoning part ("<think>...</think>\\n"); empty in the no-CoT ablation."""
    prediction: str
    """The target's structured next-state part."""


def sft_examples(rows: Sequence[Mapping], cfg: PromptConfig, retrieve: Retrieve | None = None) -> list[SFTExample]:
    """Examples from annotated transition rows (``cot_annotations``: TRAJECTORY rows + reasoning).

    Rows of one trajectory must be consecutive and ordered by step_idx (as stored); the history of
    a step is the (action, feedback) of the steps before it in the same trajectory. With
    ``cfg.pointers`` the prompt and target are in pointer form. ``retrieve`` (with
    ``cfg.num_demos > 0``) gives every example its D_k in one batched call; pass a retriever that
    excludes each query's own task (``Retriever(..., exclude_own_task=True)``).
    """
    scored = cfg.progress and has_progress(rows)
    evidence = {}
    if cfg.placements:
        from dreamgym_core.annotate import placement_evidence

        evidence = placement_evidence(rows)
    demos = demos_for(retrieve, [Query(r.get("task_id") or "", r["state"], r["action"]) for r in rows], cfg)
    if retrieve is not None and cfg.num_demos and rows and not any(demos):
        # M_exp would learn without D_k and then meet demonstrations only in simulation (off its training
        # distribution); a retriever filtered to nothing (wrong iteration, source or version) is a bug
        raise ValueError(f"sft_examples: the retriever returned no demonstration for any of {len(rows)} rows "
                         f"(num_demos={cfg.num_demos}); check its buffer, source and iteration/version filters")
    out: list[SFTExample] = []
    history: list[tuple[str, str]] = []
    prev_traj = None
    for r, d in zip(rows, demos):
        if r["traj_id"] != prev_traj:
            history, prev_traj = [], r["traj_id"]
        state = AbstractState.parse(r["state"])
        before, after = row_progress(r, scored)
        delta = diff(state, AbstractState.parse(r["next_state"]), valid=bool(r["valid"]),
                     reward=float(r["reward"]), done=bool(r["won"] or r["lost"]), progress=before,
                     next_progress=after)
        known = None
        if cfg.placements:
            from dreamgym_core.annotate import placement_known

            task = r.get("task_id") or ""
            known = lambda p, task=task: placement_known(evidence, p, task)  # noqa: E731
        prompt, refs = step_prompt(r.get("instruction") or "", history, r["state"], r["action"], cfg, demos=d,
                                   progress=before, known=known)
        reasoning = r["reasoning"] if cfg.use_cot else ""
        if refs is None:
            text, rs, ps = render_target(reasoning, delta)
        else:
            t = render_pointer_target(reasoning, delta, state, refs)
            text, rs, ps = t.text, t.reasoning_span, t.prediction_span
        out.append(SFTExample(prompt, text[rs[0]:rs[1]], text[ps[0]:ps[1]]))
        history.append((r["action"], _feedback(r["next_state"])))
    return out


def encode_example(tokenizer, ex: SFTExample, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and a parallel ``kind`` list: 0 prompt (no loss), 1 reasoning, 2 next state.

    The prompt is left-truncated so that the whole target always fits.
    """
    r, p = _ids(tokenizer, ex.reasoning), _ids(tokenizer, ex.prediction) + [tokenizer.eos_token_id]
    room = max_len - len(r) - len(p)
    if room < 8:
        raise ValueError(f"max_len={max_len} leaves no room for the prompt (target is {len(r) + len(p)} tokens)")
    q = _ids(tokenizer, ex.prompt + "\n")[-room:]
    return q + r + p, [0] * len(q) + [1] * len(r) + [2] * len(p)


def eq5_loss(model, batch_ids: torch.Tensor, kinds: torch.Tensor, attn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eq. 5 on a right-padded batch. ids, kinds, attn: (B, T). Returns loss, reasoning and state NLLs.

    ``loss`` = (sum reasoning NLL + sum state NLL) / target tokens; the two terms are per-token means.
    """
    logits = model(input_ids=batch_ids, attention_mask=attn).logits[:, :-1].float()
    target, k = batch_ids[:, 1:], kinds[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none").view_as(target)
    r_mask, s_mask = (k == 1).float(), (k == 2).float()
    r_sum, s_sum = (nll * r_mask).sum(), (nll * s_mask).sum()
    n_r, n_s = r_mask.sum(), s_mask.sum()
    return {"loss": (r_sum + s_sum) / (n_r + n_s).clamp(min=1),
            "loss/reasoning": r_sum.detach() / n_r.clamp(min=1), "loss/state": s_sum.detach() / n_s.clamp(min=1),
            "tokens": (n_r + n_s).detach()}


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int):
    T = max(len(i) for i, _ in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    kinds = torch.zeros((len(encoded), T), dtype=torch.long)
    attn = torch.zeros((len(encoded), T), dtype=torch.long)
    for b, (i, k) in enumerate(encoded):
        ids[b, :len(i)] = torch.tensor(i)
        kinds[b, :len(k)] = torch.tensor(k)
        attn[b, :len(i)] = 1
    return ids, kinds, attn


# --------------------------------------------------------------------------------------------
# SFT training (through accelerate: CPU here, DDP/FSDP on GPUs unchanged)

@dataclass(frozen=True)
class SFTConfig:
    steps: int = 600
    """Optimizer steps (the wall budget below may stop earlier)."""
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 30
    max_len: int = 512
    seed: int = 0
    time_budget_s: float | None = None
    """Stop after this many seconds of training, counted across resumes. The cosine schedule then
    follows whichever runs out first, steps or time, so the learning rate reaches 0 at the end of a
    budget-limited run on a slow or busy machine instead of being cut off at its peak."""
    checkpoint_every: int = 100
    length_bucketing: bool = True
    """Draw each batch from examples of similar length (less padding, same distribution)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("SFTConfig: steps and batch_size must be >= 1 and lr > 0")


@dataclass
class SFTResult:
    steps: int
    resumed_from: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def _save_checkpoint(model, tokenizer, opt, out_dir: str, state: dict) -> None:
    """Atomic checkpoint: weights (safetensors), tokenizer, optimizer tensors, trainer state."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state, f)
    old = out_dir.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


BUCKET_POOL = 8
"""Batches drawn together and cut by length in weighted SFT sampling (``_bucketed_draw``)."""


def _bucketed_draw(cum_weights: Sequence[float], lengths: Sequence[int], batch_size: int, step: int,
                   key: tuple[int, int]) -> list[int]:
    """Step ``step``'s batch under weighted sampling with length bucketing: BUCKET_POOL x batch_size
    examples are drawn i.i.d. with the weights (once per pool of BUCKET_POOL steps, from a seed of
    ``key`` and the pool), sorted by length and cut into batches, which the pool's steps take in a
    shuffled order. Every example keeps its sampling probability, a batch pads to a similar length
    instead of the longest of a random draw, and a resumed run draws the same batches."""
    pool = step // BUCKET_POOL
    rng = random.Random(hash((key[0], -1 - pool, key[1])) & 0xFFFFFFFF)
    drawn = rng.choices(range(len(lengths)), cum_weights=cum_weights, k=BUCKET_POOL * batch_size)
    drawn.sort(key=lambda i: lengths[i])
    batches = [drawn[j * batch_size:(j + 1) * batch_size] for j in range(BUCKET_POOL)]
    rng.shuffle(batches)
    return batches[step % BUCKET_POOL]


def train_sft(model, tokenizer, examples: Sequence[SFTExample], cfg: SFTConfig, checkpoint_dir: str | None = None,
              progress: Callable[[int, dict], None] | None = None,
              sample_weights: Sequence[float] | None = None) -> SFTResult:
    """Train M_exp with Eq. 5; resumes from ``checkpoint_dir`` if a checkpoint is there.

    ``sample_weights`` (one per example) draws batches in proportion to them, e.g. to show rare
    outcomes (wins are about 2% of twc transitions) often enough; with ``cfg.length_bucketing`` the
    draws are cut into batches by length (``_bucketed_draw``).
    """
    from dreamgym_core.device import accelerator

    if not examples:
        raise ValueError("train_sft: no examples")
    if sample_weights is not None and (len(sample_weights) != len(examples) or min(sample_weights) < 0
                                       or sum(sample_weights) <= 0):
        raise ValueError("train_sft: sample_weights needs one non-negative weight per example, not all zero")
    acc = accelerator()
    encoded = [encode_example(tokenizer, e, cfg.max_len) for e in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    lengths = [len(e[0]) for e in encoded]
    cum_weights = list(itertools.accumulate(sample_weights)) if sample_weights is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    start, history = 0, []
    if checkpoint_dir and os.path.exists(os.path.join(checkpoint_dir, "trainer_state.json")):
        from safetensors.torch import load_file

        state = json.load(open(os.path.join(checkpoint_dir, "trainer_state.json")))
        weights = os.path.join(checkpoint_dir, "model.safetensors")
        model.load_state_dict(load_file(weights), strict=False)
        opt.load_state_dict(torch.load(os.path.join(checkpoint_dir, "optimizer.pt"), weights_only=True))
        start, history = int(state["step"]), list(state["history"])
    spent = float(history[-1].get("elapsed", history[-1]["seconds"])) if history else 0.0  # before this resume
    t0 = time.perf_counter()

    def elapsed() -> float:
        t = spent + time.perf_counter() - t0
        if acc.num_processes > 1:  # DDP: every rank follows rank 0's clock (same lr, same last step, no hang)
            from accelerate.utils import broadcast

            t = float(broadcast(torch.tensor([t], dtype=torch.float64, device=acc.device), from_process=0)[0])
        return t

    clock = [elapsed()]  # read once per step: the lr, the record and the stop test see one time (one DDP sync)

    def lr_at(s: int) -> float:
        frac = min(s, cfg.steps) / cfg.steps
        if cfg.time_budget_s:  # a positive budget: anneal by time too
            frac = max(frac, min(1.0, clock[0] / cfg.time_budget_s))
        return min(1.0, (s + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at, last_epoch=start - 1 if start else -1)
    model, opt = acc.prepare(model, opt)
    model.train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, step = 0, start
    for step in range(start, cfg.steps):
        rng = random.Random(hash((cfg.seed, step, acc.process_index)) & 0xFFFFFFFF)
        if sample_weights is not None and cfg.length_bucketing:
            idx = _bucketed_draw(cum_weights, lengths, cfg.batch_size, step, (cfg.seed, acc.process_index))
        elif sample_weights is not None:
            idx = rng.choices(range(len(encoded)), weights=sample_weights, k=cfg.batch_size)
        elif cfg.length_bucketing:
            j = rng.randrange(max(1, len(order) - cfg.batch_size + 1))
            idx = [order[min(j + rng.randrange(cfg.batch_size * 2), len(order) - 1)] for _ in range(cfg.batch_size)]
        else:
            idx = [rng.randrange(len(encoded)) for _ in range(cfg.batch_size)]
        ids, kinds, attn = (t.to(acc.device) for t in collate([encoded[i] for i in idx], pad))
        out = eq5_loss(model, ids, kinds, attn)
        opt.zero_grad(set_to_none=True)
        acc.backward(out["loss"])
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        clock[0] = elapsed()
        sched.step()
        tokens += int(attn.sum())
        rec = {"step": step + 1, "loss": out["loss"].item(), "loss/reasoning": out["loss/reasoning"].item(),
               "loss/state": out["loss/state"].item(), "lr": sched.get_last_lr()[0],
               "seconds": round(time.perf_counter() - t0, 2), "elapsed": round(clock[0], 2)}
        history.append(rec)
        if progress and acc.is_main_process:
            progress(step + 1, rec)
        done = cfg.time_budget_s is not None and clock[0] >= cfg.time_budget_s
        if checkpoint_dir and acc.is_main_process and ((step + 1) % cfg.checkpoint_every == 0 or done or step + 1 == cfg.steps):
            _save_checkpoint(acc.unwrap_model(model), tokenizer, opt, checkpoint_dir, {"step": step + 1, "history": history})
        if done:
            break
    model.eval()
    return SFTResult(steps=len(history), resumed_from=start, history=history,
                     seconds=time.perf_counter() - t0, tokens=tokens)
