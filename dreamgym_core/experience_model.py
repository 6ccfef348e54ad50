"""The reasoning experience model M_exp: SFT (paper Eq. 5), batched simulator (Eq. 4), fidelity.

Eq. 4: (R_t, s_{t+1}, r_{t+1}) ~ M_exp(. | s_t, a_t, H_t, D_k): given the task, a history window,
the current abstract state, the action and k retrieved demonstrations, M_exp writes a reasoning
trace and then the next state and reward.

Eq. 5 (SFT): L = -log P(R* | s, a, H, D_k) - log P(s' | s, a, R*, H, D_k). Targets are
``exp_format.render_target(R*, delta)``: the reasoning tokens form the first term, the prediction
tokens (and the end-of-sequence token) the second; both are logged separately as
``loss/reasoning`` and ``loss/state`` (per-token means) and the optimised loss is their token-
weighted sum divided by the number of target tokens.

Departures from the paper (and why):
* The model predicts a structured change to the abstract state (``exp_format``), which code
  applies; tiny CPU models cannot regenerate whole states (shared/notes/feasibility-...).
* ``done`` targets are the env's own end (won or lost), never the collector's step cap.
* An invalid action leaves the state unchanged with feedback, as the real env does; the paper's
  "invalid action leads to a failure state" is available as ``SimConfig.invalid_ends_episode``.
  An output that does not parse always ends the synthetic episode as a failure (and is counted).
* Pointer form (``PromptConfig.pointers``, default on): the action's objects are ``@1``/``@2`` in
  the prompt and the target, and object changes are item-level edits resolved by code
  (``exp_format`` "Pointer form"). Held-out games use items never seen in training and a tiny
  model cannot copy unseen multi-token names; with pointers it never has to. Predictions are
  relexicalized before they are applied, so callers always see real abstract states.
* Progress (``PromptConfig.progress``, default on): the prompt shows the env's dense score before
  the step and M_exp predicts it after (``exp_format`` ``progress``); the simulator carries it and
  the episode is won when it reaches 100 (``outcome``). Without it a small model decided the win by
  counting what was still out of place from the object list, and granted wins with items left.
* Placement knowledge (``PromptConfig.placements``, default on): for a put (or a take out of a
  receptacle) the prompt says what the training data knows about that (item, receptacle) pair:
  an exact-key lookup of past experience, next to the paper's embedding retrieval of demonstrations.
  SFT examples see only the other training tasks' evidence, so "never seen" is trained as it occurs
  on unseen games; the table is saved with the checkpoint (``dreamgym.json`` "placements").
* Affordances (``PromptConfig.affordances``, default on): one ``## known`` line per object the
  action names, saying what the state shows it is (carried, closed / open container, surface, loose
  here, inside Y; ``annotate.affordance_hints``). Nothing the prompt's state does not already hold,
  but a 3.4M model trained for 10 CPU minutes accepted rare invalid actions (open an onion, take an
  item it carries, close a shelf) when it had to find the object's fact in a list of a dozen;
  invalid-action accuracy on held-out games went 0.94 -> 0.98 with it (README).
* Prefill in groups of similar length (``SimConfig.prefill_rows``): the simulator's batch is
  prefilled a few prompts at a time, each group padded to its own longest, and the keys and values
  are laid into the batch's left-padded cache. Not an equation, a speed-up (README, benchmarks).
* Retrieval is a function argument (``retrieve(state, action, k) -> demos``), so M_exp works with
  or without the replay buffer.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from dreamgym_core.envs.base import Observation, StepResult
from dreamgym_core.exp_format import (Prediction, StateDelta, action_refs, apply, build_prompt, diff, parse_output,
                                      parse_pointer_output, progress_percent, render_pointer_target, render_target)
from dreamgym_core.schema import RawObs, Task
from dreamgym_core.state import AbstractState

Retrieve = Callable[[str, str, int], Sequence[Mapping]]


# --------------------------------------------------------------------------------------------
# SFT data

@dataclass(frozen=True)
class SFTExample:
    prompt: str
    reasoning: str
    """The target's reasoning part ("<think>...</think>\\n"); empty in the no-CoT ablation."""
    prediction: str
    """The target's structured next-state part."""


@dataclass(frozen=True)
class PromptConfig:
    history_window: int = 4
    num_demos: int = 0
    """Retrieved demonstrations per prompt (0 = no retrieval)."""
    use_cot: bool = True
    """Train and generate the reasoning trace (ablation: False)."""
    use_history: bool = True
    pointers: bool = True
    """Copy-free prompts and targets (``exp_format`` pointer form); False = literal names (ablation)."""
    progress: bool = True
    """Show the env's dense score before the step (``## progress``) and predict it after; the
    simulator wins an episode when it reaches 100. Data without a dense score leaves it out."""
    placements: bool = True
    """For an action that puts an item somewhere (or takes it out of a receptacle), show what the
    training data says about that (item, receptacle) pair (``## known``: belongs / does not belong /
    never seen; ``annotate.placement_evidence``). SFT examples see the evidence of the *other*
    training tasks only, so "never seen" is trained as often as it happens on unseen games."""
    affordances: bool = True
    """Also in ``## known``: one line per object the action names saying what the state shows it is
    (carried, closed / open container, surface, loose here, inside Y; ``annotate.affordance_hints``).
    Read off the prompt's own state, so no outcome leaks; it makes rare invalid actions (open a
    non-container, take a carried item, close a shelf) learnable in minutes on a CPU."""

    @classmethod
    def from_meta(cls, meta: Mapping) -> "PromptConfig":
        """The config a checkpoint's ``dreamgym.json`` records; ``placements`` (added after ``progress``)
        counts as off for a checkpoint that does not record it: it was trained without it (so does
        ``affordances``, added later still). Checkpoints
        from before the progress field (``experience_model`` format 2) do not write its output line
        and must be retrained (the asset's config key changed, so it retrains them)."""
        saved = dict(meta.get("prompt") or {})
        saved.setdefault("progress", False)
        saved.setdefault("placements", False)
        saved.setdefault("affordances", False)
        return cls(**saved)

    def __post_init__(self) -> None:
        if self.history_window < 0 or self.num_demos < 0:
            raise ValueError("PromptConfig: history_window and num_demos must be >= 0")


def _feedback(state: str) -> str:
    try:
        return AbstractState.parse(state).feedback
    except ValueError:
        return ""


def refs_for(state: str, action: str, cfg: PromptConfig) -> tuple[str, ...] | None:
    """The pointer bindings of one step (None in the literal form or for an unparseable state)."""
    if not cfg.pointers:
        return None
    try:
        return action_refs(AbstractState.parse(state), action)
    except ValueError:
        return None


def make_prompt(instruction: str, history: Sequence[tuple[str, str]], state: str, action: str,
                demos: Sequence[Mapping], cfg: PromptConfig, refs: Sequence[str] | None = None,
                progress: int | None = None, hint: str | None = None) -> str:
    return build_prompt(instruction, history, state, action, demos, history_window=cfg.history_window,
                        max_demos=cfg.num_demos, use_history=cfg.use_history and cfg.history_window > 0,
                        use_demos=cfg.num_demos > 0, refs=refs, progress=progress if cfg.progress else None,
                        hints=((hint,) if (hint and cfg.placements) else ()) + _affordances(state, action, cfg))


def _affordances(state: str, action: str, cfg: PromptConfig) -> tuple[str, ...]:
    if not cfg.affordances:
        return ()
    from dreamgym_core.annotate import affordance_hints

    try:
        parsed = AbstractState.parse(state)
    except ValueError:
        return ()
    return affordance_hints(parsed, action_refs(parsed, action))


Knowledge = Mapping[tuple[str, str], bool]
"""(item, receptacle) -> whether the item belongs there, from the training data (``knowledge_of``)."""


def knowledge_of(rows: Sequence[Mapping]) -> dict[tuple[str, str], bool]:
    """What all of ``rows`` say about each (item, receptacle) pair they put to the test."""
    from dreamgym_core.annotate import placement_evidence

    return {pair: bool(right) for pair, (right, _) in placement_evidence(rows).items()}


def knowledge_to_meta(knowledge: Knowledge) -> list[list]:
    return [[x, y, bool(b)] for (x, y), b in sorted(knowledge.items())]


def knowledge_from_meta(meta: Mapping) -> dict[tuple[str, str], bool]:
    """The knowledge a checkpoint's ``dreamgym.json`` carries (empty for a model trained without it)."""
    return {(str(x), str(y)): bool(b) for x, y, b in meta.get("placements") or []}


def _hint(state: str, action: str, known: Callable[[tuple[str, str]], bool | None]) -> str | None:
    from dreamgym_core.annotate import placement_hint, placement_pair

    try:
        pair = placement_pair(AbstractState.parse(state), action)
    except ValueError:
        return None
    return placement_hint(pair, known(pair)) if pair else None


def has_progress(rows: Sequence[Mapping]) -> bool:
    """The rows carry the env's dense score (``score`` and the observation's ``obs.score``); imported
    logs with zeros only, or rows without the observation's score, do not."""
    return any(r.get("score") for r in rows) and all(isinstance(r.get("obs"), Mapping) for r in rows)


def row_progress(r: Mapping, scored: bool) -> tuple[int | None, int | None]:
    """(progress before, progress after) of a transition row in percent; (None, None) unscored."""
    if not scored:
        return None, None
    obs = r.get("obs") if isinstance(r.get("obs"), Mapping) else {}
    before = obs.get("score")
    return progress_percent(0.0 if before is None else float(before)), progress_percent(float(r.get("score") or 0.0))


def parse_for(text: str, state: str, refs: Sequence[str] | None) -> Prediction:
    """Parse M_exp's text for one step: relexicalized against ``state`` when ``refs`` is not None."""
    if refs is None:
        return parse_output(text)
    try:
        current = AbstractState.parse(state)
    except ValueError:
        return Prediction("", None, False, "bad:state")
    return parse_pointer_output(text, current, refs)


def sft_examples(rows: Sequence[Mapping], cfg: PromptConfig, retrieve: Retrieve | None = None) -> list[SFTExample]:
    """Examples from annotated transition rows (``cot_annotations``: TRAJECTORY rows + reasoning).

    Rows of one trajectory must be consecutive and ordered by step_idx (as stored); the history of
    a step is the (action, feedback) of the steps before it in the same trajectory. With
    ``cfg.pointers`` the prompt and target are in pointer form (a step whose state does not parse
    stays literal).
    """
    out: list[SFTExample] = []
    history: list[tuple[str, str]] = []
    prev_traj = None
    scored = cfg.progress and has_progress(rows)
    evidence = {}
    if cfg.placements:
        from dreamgym_core.annotate import placement_evidence, placement_known

        evidence = placement_evidence(rows)
    for r in rows:
        if r["traj_id"] != prev_traj:
            history, prev_traj = [], r["traj_id"]
        state = AbstractState.parse(r["state"])
        hint = _hint(r["state"], r["action"], lambda p: placement_known(evidence, p, r.get("task_id") or "")) \
            if cfg.placements else None
        before, after = row_progress(r, scored)
        delta = diff(state, AbstractState.parse(r["next_state"]), valid=bool(r["valid"]),
                     reward=float(r["reward"]), done=bool(r["won"] or r["lost"]), progress=before,
                     next_progress=after)
        reasoning = r["reasoning"] if cfg.use_cot else ""
        refs = refs_for(r["state"], r["action"], cfg)
        if refs is None:
            text, rs, ps = render_target(reasoning, delta)
        else:
            t = render_pointer_target(reasoning, delta, state, refs)
            text, rs, ps = t.text, t.reasoning_span, t.prediction_span
        demos = [d for d in retrieve(r["state"], r["action"], cfg.num_demos + 1)
                 if not (d.get("state") == r["state"] and d.get("action") == r["action"])][:cfg.num_demos] \
            if (retrieve and cfg.num_demos) else []
        prompt = make_prompt(r.get("instruction") or "", history, r["state"], r["action"], demos, cfg, refs, before,
                             hint)
        out.append(SFTExample(prompt, text[rs[0]:rs[1]], text[ps[0]:ps[1]]))
        history.append((r["action"], _feedback(r["next_state"])))
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


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


# --------------------------------------------------------------------------------------------
# The simulator

class FormatConstraint:
    """A transformers ``LogitsProcessor`` that keeps every row of a generation inside M_exp's output
    grammar (``exp_format.next_constraint``): where the grammar allows only some strings, every
    token that does not continue one of them gets -inf. Free parts (the reasoning, feedback, object
    edits) are left to the model, so this removes format failures, not prediction errors.

    ``prompt_len``: columns of ``input_ids`` that belong to the (left-padded) prompt; ``prefix``:
    text the output starts with that is part of the prompt (the no-CoT ablation's empty think block).
    """

    _TRIGGERS = ("\n", ">", ":", "s", "o")
    """Last characters of "\\n", "</think>", "field:", "yes", "no": the grammar can only constrain
    after a token ending in one of them (markers may span several tokens), other steps skip the check."""
    _trigger_cache: dict[int, frozenset[int]] = {}
    _enc_cache: dict[int, dict[str, list[int]]] = {}
    """Allowed strings -> token ids, per tokenizer: built once, not once per generated chunk (the
    progress field alone allows 202 strings)."""

    def __init__(self, tokenizer, prompt_len: int, prefix: str = ""):
        from dreamgym_core.exp_format import END

        self.tok, self.prompt_len, self.prefix, self.end = tokenizer, prompt_len, prefix, END
        self._enc = self._enc_cache.setdefault(hash((id(tokenizer), len(tokenizer))), {})
        self._texts: dict[int, tuple[int, str]] = {}      # row -> (tokens decoded, text)
        self._pending: dict[int, tuple[list[list[int]], int]] = {}  # row -> (allowed sequences, position)
        self.triggers = self._trigger_ids(tokenizer)

    @classmethod
    def _trigger_ids(cls, tok) -> frozenset[int]:
        """Token ids whose text ends like a grammar point (computed once per tokenizer)."""
        key = hash((id(tok), len(tok)))
        if key not in cls._trigger_cache:
            texts = tok.convert_ids_to_tokens(list(range(len(tok))))
            decoded = [tok.convert_tokens_to_string([t]) if t is not None else "" for t in texts]
            cls._trigger_cache[key] = frozenset(i for i, t in enumerate(decoded) if t.endswith(cls._TRIGGERS))
        return cls._trigger_cache[key]

    def _ids(self, text: str) -> list[int]:
        if text not in self._enc:
            self._enc[text] = [self.tok.eos_token_id] if text == self.end else _ids(self.tok, text)
        return self._enc[text]

    def _text(self, b: int, row: list[int]) -> str:
        done, text = self._texts.get(b, (0, self.prefix))
        if len(row) > done:
            piece = self.tok.decode(row[done:], skip_special_tokens=True)
            text = text + piece if "\ufffd" not in piece else \
                self.prefix + self.tok.decode(row, skip_special_tokens=True)
            self._texts[b] = (len(row), text)
        return text

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.constrain(input_ids, scores)

    def constrain(self, input_ids: torch.Tensor, scores: torch.Tensor,
                  rows: Sequence[int] | None = None) -> torch.Tensor:
        """``rows``: the original row id of each batch row when finished rows have been dropped from
        the batch (``ExperienceModel._decode``); the per-row state follows the id, not the position."""
        from dreamgym_core.exp_format import next_constraint

        n_gen = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist() if n_gen > 0 else [None] * input_ids.shape[0]
        for j, tok in enumerate(last):  # only the last token per row, unless at a grammar point
            b = j if rows is None else rows[j]
            pending = self._pending.pop(b, None)
            if pending is not None:  # advance along the allowed sequences by the token just chosen
                seqs, pos = pending
                seqs = [q for q in seqs if tok is not None and q[pos] == tok]
                pos += 1
                if seqs and all(len(q) > pos for q in seqs):
                    self._pending[b] = (seqs, pos)
            if b not in self._pending:
                if tok is not None and tok not in self.triggers:
                    continue  # mid-word or mid-value: no grammar point here, the model is free
                row = input_ids[j, self.prompt_len:].tolist() if n_gen > 0 else []
                allowed = next_constraint(self._text(b, row))
                if allowed is None:
                    continue
                self._pending[b] = ([self._ids(a) for a in allowed], 0)
            seqs, pos = self._pending[b]
            keep = torch.tensor(sorted({q[pos] for q in seqs}), device=scores.device)
            masked = torch.full_like(scores[j], float("-inf"))
            masked[keep] = scores[j, keep]
            scores[j] = masked
        return scores


@functools.lru_cache(maxsize=None)
def _growing_cache_classes():
    """GrowingCache / GrowingLayer, built once on first use (transformers is imported lazily)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class GrowingLayer(DynamicLayer):
        """One layer's KV cache in a buffer sized for the whole generation (prompt + new tokens):
        a decode step writes its column in place and attention reads a view, where ``DynamicLayer``
        concatenates (copies) the whole cache every step. Dropping finished rows moves only the
        rows behind them, in place. The buffer doubles if a generation outgrows it."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = int(capacity), 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, n, d = key_states.shape
            cap = max(self.capacity, n)
            self._k = key_states.new_empty((b, h, cap, d))
            self._v = value_states.new_empty((b, h, cap, value_states.shape[-1]))
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self._k.shape[-2]:  # outgrown: double (amortized), keep what is written
                grow = max(end, 2 * self._k.shape[-2]) - self._k.shape[-2]
                self._k = torch.cat([self._k, self._k.new_empty(self._k.shape[:2] + (grow, self._k.shape[-1]))], 2)
                self._v = torch.cat([self._v, self._v.new_empty(self._v.shape[:2] + (grow, self._v.shape[-1]))], 2)
            self._k[:, :, self.length:end] = key_states
            self._v[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            """Keep rows ``beam_idx``. Strictly increasing indices (rows dropped, order kept) compact
            in place; anything else gathers into a new buffer."""
            if not self.is_initialized:
                return
            idx = beam_idx.tolist()
            n, L = len(idx), self.length
            if all(b > a for a, b in zip(idx, idx[1:])):
                for j, i in enumerate(idx):  # i >= j: a source row is read before any later target writes it
                    if i != j:
                        self._k[j, :, :L] = self._k[i, :, :L]
                        self._v[j, :, :L] = self._v[i, :, :L]
                self._k, self._v = self._k[:n], self._v[:n]
            else:
                self._k, self._v = self._k[beam_idx], self._v[beam_idx]
            self.keys, self.values = self._k[:, :, :L], self._v[:, :, :L]

        batch_select_indices = reorder_cache

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("GrowingLayer: crop is not supported (no speculative decoding here)")

    class GrowingCache(DynamicCache):
        """A ``DynamicCache`` of ``GrowingLayer``s, each with room for ``capacity`` positions."""

        def __init__(self, capacity: int):
            super().__init__()
            self.layer_class_to_replicate = lambda: GrowingLayer(capacity)

    return GrowingCache, GrowingLayer


def GrowingCache(capacity: int):  # noqa: N802 - a class factory, used like the class
    """A KV cache for ``_decode`` that writes in place into a preallocated buffer (``GrowingLayer``)."""
    return _growing_cache_classes()[0](capacity)


@dataclass(frozen=True)
class SimConfig:
    max_new_tokens: int = 160
    constrained: bool = True
    """Decode inside the output grammar (``FormatConstraint``): field names, yes/no and 0/1 values and
    the end are forced, the reasoning and the values stay the model's. False = free decoding."""
    greedy: bool = True
    temperature: float = 1.0
    prompt: PromptConfig = PromptConfig()
    max_prompt_tokens: int = 448
    invalid_ends_episode: bool = False
    """Paper's variant: an action predicted invalid ends the episode as a failure."""
    batch_size: int = 64
    """Prompts per decoding batch (``predict`` chunks longer lists). On 2 CPU cores steps/s still
    rose from 32 to 128 (README, benchmarks); a rollout hands over at most its live episodes."""
    seed: int = 0
    drop_finished: bool = True
    """Decode with our own KV-cache loop that drops a row from the batch as soon as it ends, so a
    batch costs the sum of its rows' lengths instead of rows x the longest (same greedy text up to
    float ties; ``bench.mexp_generation`` reports agreement). False: transformers ``generate``."""
    kv_cache: str = "growing"
    """KV cache of the ``drop_finished`` loop: "growing" writes each step in place into a buffer sized
    for the generation (``GrowingLayer``); "dynamic" is transformers' ``DynamicCache``, which copies
    the whole cache at every step."""
    prefill_rows: int = 16
    """Prefill of the ``drop_finished`` loop in groups of this many prompts of similar length (sorted
    by length, each group padded only to its own longest), their keys and values then laid into the
    batch's left-padded cache: a random mix of prompt lengths padded to the batch's longest wastes
    about a third of the prefill's matmuls, and one attention mask over the whole batch is large.
    0 = the whole batch in one forward."""
    forward: str = "lean"
    """Model forward of the ``drop_finished`` loop: "lean" runs a plain Llama (the embedded default,
    SmolLM2) through ``lean_llama.LeanLlama`` (fused projections, one mask per step; the same logits
    to float rounding), any other model through transformers; "transformers" always the latter."""

    def __post_init__(self) -> None:
        if self.forward not in ("lean", "transformers"):
            raise ValueError(f"SimConfig.forward={self.forward!r}: use 'lean' or 'transformers'")
        if self.kv_cache not in ("growing", "dynamic"):
            raise ValueError(f"SimConfig.kv_cache={self.kv_cache!r}: use 'growing' or 'dynamic'")
        if not isinstance(self.prefill_rows, int) or self.prefill_rows < 0:
            raise ValueError(f"SimConfig.prefill_rows={self.prefill_rows!r} must be an integer >= 0")


@dataclass
class SimStats:
    steps: int = 0
    parse_failures: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


class ExperienceModel:
    """M_exp as a ``BatchEnv``: policies roll out in it exactly as in a real environment.

    initial_state(task) gives the abstract start state (Task.initial_state for synthetic tasks, a
    real reset or offline data for env tasks); propose_candidates(state) gives candidate actions for
    synthetic states (the adapter's state-only rule).
    """

    name = "m_exp"

    def __init__(self, model, tokenizer, *, initial_state: Callable[[Task], str],
                 propose_candidates: Callable[[str], list[str]], retrieve: Retrieve | None = None,
                 cfg: SimConfig = SimConfig(), initial_progress: Callable[[Task], int] | None = None,
                 knowledge: Knowledge | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.knowledge = dict(knowledge or {})
        self.initial_state, self.propose, self.retrieve = initial_state, propose_candidates, retrieve
        self.initial_progress = initial_progress or (lambda task: 0)
        self.stats = SimStats()
        self._calls = 0
        self._lean_cached, self._lean_version = None, -1  # LeanLlama of the weights at that version

    # -- one batched generation: prompts -> parsed predictions --------------------------------
    def predict(self, prompts: Sequence[str],
                contexts: Sequence[tuple[str, Sequence[str] | None]] | None = None) -> list[Prediction]:
        """Generate and parse. ``contexts`` (one (state, refs) per prompt, from ``refs_for``) makes
        pointer-form outputs parse into real deltas for that state; without it outputs are literal."""
        if contexts is not None and len(contexts) != len(prompts):
            raise ValueError("predict: contexts needs one (state, refs) per prompt")
        out: list[Prediction] = []
        for i in range(0, len(prompts), self.cfg.batch_size):
            texts = self._generate_chunk(prompts[i:i + self.cfg.batch_size])
            ctx = contexts[i:i + len(texts)] if contexts is not None else [("", None)] * len(texts)
            preds = [parse_for(t, st, refs) for t, (st, refs) in zip(texts, ctx)]
            self.stats.parse_failures += sum(not p.ok for p in preds)
            out.extend(preds)
        return out

    def _generate_chunk(self, prompts: Sequence[str]) -> list[str]:
        tok, model = self.tokenizer, self.model
        t0 = time.perf_counter()
        ids = [_ids(tok, p + "\n")[-self.cfg.max_prompt_tokens:] for p in prompts]
        if not self.cfg.prompt.use_cot:  # no-CoT models were trained on an empty think block
            think = _ids(tok, "<think></think>\n")
            ids = [x + think for x in ids]
        P = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        inp = torch.full((len(ids), P), pad, dtype=torch.long)
        attn = torch.zeros((len(ids), P), dtype=torch.long)
        for b, x in enumerate(ids):
            inp[b, P - len(x):] = torch.tensor(x)
            attn[b, P - len(x):] = 1
        device = next(model.parameters()).device
        self._calls += 1
        torch.manual_seed(hash((self.cfg.seed, self._calls)) & 0x7FFFFFFF)
        processors = None
        if self.cfg.constrained:
            from transformers import LogitsProcessorList

            processors = LogitsProcessorList([FormatConstraint(
                tok, P, prefix="" if self.cfg.prompt.use_cot else "<think></think>\n")])
        with torch.no_grad():
            if self.cfg.drop_finished:
                rows = self._decode(inp.to(device), attn.to(device), P, processors[0] if processors else None)
            else:
                gen = model.generate(input_ids=inp.to(device), attention_mask=attn.to(device),
                                     max_new_tokens=self.cfg.max_new_tokens, do_sample=not self.cfg.greedy,
                                     temperature=self.cfg.temperature if not self.cfg.greedy else None,
                                     top_p=None, top_k=None, logits_processor=processors,
                                     pad_token_id=pad, eos_token_id=tok.eos_token_id)
                rows = gen[:, P:].tolist()
        texts = []
        for row in rows:
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            self.stats.generated_tokens += len(row)
            texts.append(tok.decode(row, skip_special_tokens=True))
        if not self.cfg.prompt.use_cot:
            texts = ["<think></think>\n" + t for t in texts]
        self.stats.seconds += time.perf_counter() - t0
        return texts

    def _decode(self, inp: torch.Tensor, attn: torch.Tensor, P: int, constraint: "FormatConstraint | None") -> list[list[int]]:
        """Greedy or sampled KV-cache decoding of a left-padded batch; a row leaves the batch (and
        its KV cache) at its end-of-sequence token, so later steps only run the live rows.
        Returns each row's generated ids (the EOS included when reached)."""
        model, eos, cfg = self.model, self.tokenizer.eos_token_id, self.cfg
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        lean = self._lean()
        if cfg.kv_cache == "growing":
            cache = GrowingCache(P + cfg.max_new_tokens)
        else:
            from transformers import DynamicCache

            cache = DynamicCache() if lean is not None else None

        def step(x: torch.Tensor, p: torch.Tensor, a: torch.Tensor, c):
            """(B, V) logits of each row's last position (the prompt's other positions need no LM head)
            and the cache ``c`` (None: the model makes one) holding this step's keys and values."""
            if lean is not None:
                return lean.forward(x, p, a.bool(), c), c
            out = model(input_ids=x, attention_mask=a, position_ids=p, past_key_values=c, use_cache=True,
                        logits_to_keep=1)
            return out.logits[:, -1, :], out.past_key_values

        def forward(x: torch.Tensor, p: torch.Tensor, a: torch.Tensor):
            return step(x, p, a, cache)

        # grouped prefill needs a cache we own (growing, or DynamicCache with the lean forward); with
        # transformers' forward and no cache given, the model builds its own kind, so it prefills whole
        logits = None
        if 0 < cfg.prefill_rows < inp.shape[0] and cache is not None:
            logits = self._grouped_prefill(inp, attn, cache, step, lean is not None)
        if logits is None:
            logits, cache = forward(inp, pos, attn)
        live = list(range(inp.shape[0]))
        seqs: list[list[int]] = [[] for _ in live]
        ids, next_pos = inp, attn.sum(-1, keepdim=True)
        for t in range(cfg.max_new_tokens):
            scores = logits.float()
            if constraint is not None:
                scores = constraint.constrain(ids, scores, rows=live)
            if cfg.greedy:
                nxt = scores.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(scores / cfg.temperature, dim=-1), 1).squeeze(1)
            for b, tok in zip(live, nxt.tolist()):  # one device-to-host copy per step
                seqs[b].append(tok)
            if t == cfg.max_new_tokens - 1:
                break
            going = nxt != eos
            if not bool(going.any()):
                break
            if not bool(going.all()):
                keep = going.nonzero().squeeze(1)
                cache.reorder_cache(keep)
                live = [live[int(i)] for i in keep]
                nxt, ids, attn, next_pos = nxt[keep], ids[keep], attn[keep], next_pos[keep]
            ids = torch.cat([ids, nxt.unsqueeze(1)], dim=1)
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            logits, cache = forward(nxt.unsqueeze(1), next_pos, attn)
            next_pos = next_pos + 1
        return seqs

    def _grouped_prefill(self, inp: torch.Tensor, attn: torch.Tensor, cache, step, growing_parts: bool):
        """Prefill ``cfg.prefill_rows`` prompts at a time, grouped by length; every group's keys and
        values go into ``cache`` at the batch's left-padded positions (a row's real tokens end at P,
        as in the one-forward prefill). ``step(x, p, a, part_cache)`` is ``_decode``'s forward; each group
        runs into its own ``GrowingCache`` (``growing_parts``, the lean forward) or ``DynamicCache``.
        Returns the (B, V) last-position logits.

        Row b's real keys, values and logits are the same function of its own tokens as in one
        forward over the batch (causal attention over real keys only, positions from its own mask);
        only padding differs, and padding keys are masked. So the result differs by float rounding.
        Returns None (the caller then prefills in one forward) when every prompt has the same length
        or the model's cache layers are not plain full-length key/value tensors."""
        B, P = inp.shape
        lengths = attn.sum(-1)
        per_row = lengths.tolist()
        if len(set(per_row)) == 1:  # nothing to save: one forward (the caller's)
            return None
        order = sorted(range(B), key=per_row.__getitem__)
        logits = None
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for g in range(0, B, self.cfg.prefill_rows):
            rows = torch.tensor(order[g:g + self.cfg.prefill_rows], device=inp.device)
            n = int(lengths[rows].max())
            x, a = inp[rows, P - n:], attn[rows, P - n:]
            p = (a.cumsum(-1) - 1).clamp(min=0)
            if growing_parts:
                part = GrowingCache(n)
            else:
                from transformers import DynamicCache

                part = DynamicCache()
            out, part = step(x, p, a, part)
            if logits is None:
                if not all(getattr(layer, "keys", None) is not None and layer.keys.shape[-2] == n
                           for layer in part.layers):  # a cache of another shape (e.g. sliding window)
                    return None
                logits = out.new_empty((B, out.shape[-1]))
            logits[rows] = out
            for i, layer in enumerate(part.layers):
                if len(keys) <= i:  # (B, Hk, P, D), zeros where a row is padding (masked)
                    keys.append(layer.keys.new_zeros((B, layer.keys.shape[1], P, layer.keys.shape[3])))
                    values.append(layer.values.new_zeros((B, layer.values.shape[1], P, layer.values.shape[3])))
                keys[i][rows, :, P - n:] = layer.keys
                values[i][rows, :, P - n:] = layer.values
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(k, v, i)
        return logits

    def _lean(self):
        """The model's ``LeanLlama`` forward when ``cfg.forward`` is "lean" and the model is a plain
        Llama (else None: transformers' forward); rebuilt when the weights have changed in place."""
        if self.cfg.forward != "lean":
            return None
        from dreamgym_core.lean_llama import LeanLlama, supports

        if not supports(self.model):
            return None
        version = sum(p._version for p in self.model.parameters())
        if self._lean_cached is None or self._lean_version != version:
            self._lean_cached, self._lean_version = LeanLlama(self.model), version
        return self._lean_cached

    # -- BatchEnv -----------------------------------------------------------------------------
    def reset_batch(self, tasks: Sequence[Task]) -> list[Observation]:
        self._tasks = list(tasks)
        self._states = [self.initial_state(t) for t in tasks]
        self._history: list[list[tuple[str, str]]] = [[] for _ in tasks]
        self._live = [True] * len(tasks)
        self._progress = [self.initial_progress(t) if self.cfg.prompt.progress else None for t in tasks]
        return [self._obs(s) for s in self._states]

    def _obs(self, state: str) -> Observation:
        cands = tuple(self.propose(state))
        return Observation(state=state, candidates=cands, raw=RawObs(feedback=_feedback(state), candidates=cands))

    def step_batch(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        live = [i for i, a in enumerate(actions) if a is not None and self._live[i]]
        prompts, contexts = [], []
        for i in live:
            demos = self.retrieve(self._states[i], actions[i], self.cfg.prompt.num_demos) \
                if (self.retrieve and self.cfg.prompt.num_demos) else []
            refs = refs_for(self._states[i], actions[i], self.cfg.prompt)
            prompts.append(make_prompt(self._tasks[i].instruction, self._history[i], self._states[i], actions[i],
                                       demos, self.cfg.prompt, refs, self._progress[i], self.hint(self._states[i],
                                                                                                  actions[i])))
            contexts.append((self._states[i], refs))
        preds = self.predict(prompts, contexts) if prompts else []
        out: list[StepResult | None] = [None] * len(actions)
        for i, pred in zip(live, preds):
            delta = pred.effective_delta()
            state = AbstractState.parse(self._states[i])
            nxt = apply(state, delta).render()
            self._progress[i], won, done = outcome(pred, self._progress[i])
            done = done or (not delta.valid and self.cfg.invalid_ends_episode)
            reward = 1.0 if won else 0.0
            self._states[i] = nxt
            self._history[i].append((actions[i], _feedback(nxt)))
            self._live[i] = not done
            self.stats.steps += 1
            score = reward if self._progress[i] is None else self._progress[i] / 100
            out[i] = StepResult(obs=self._obs(nxt), reward=reward, score=score, done=done, won=won,
                                lost=done and not won, valid=bool(delta.valid and pred.ok), crashed=False)
        return out

    def hint(self, state: str, action: str) -> str | None:
        """The ``## known`` line for this step from the model's training-data knowledge (PromptConfig.placements)."""
        return _hint(state, action, self.knowledge.get) if self.cfg.prompt.placements else None

    def close(self) -> None:
        pass


def outcome(pred: Prediction, progress: int | None) -> tuple[int | None, bool, bool]:
    """(progress after, won, done) of one simulated step from ``progress`` before it.

    Without progress (None: a model or data without a dense score) the model's own ``reward`` and
    ``done`` decide. With it, the predicted progress (unchanged when the delta leaves it out) decides
    the win: the episode is won exactly when it reaches 100, whatever the reward field says (a
    "reward 1" short of 100 is overruled and the episode goes on); a predicted end without reward is
    a loss. An unusable prediction ends the episode as a failure either way.
    """
    delta: StateDelta = pred.effective_delta()
    if not pred.ok:
        return progress, False, True
    if progress is None:
        won = bool(delta.done and delta.reward > 0)
        return None, won, bool(delta.done)
    after = progress if delta.progress is None else delta.progress
    won = after >= 100
    return after, won, bool(won or (delta.done and delta.reward == 0))


# --------------------------------------------------------------------------------------------
# Fidelity on held-out real transitions (teacher-forced: real state, real history)

def _token_f1(a: str, b: str) -> float:
    ta, tb = a.split(), b.split()
    if not ta and not tb:
        return 1.0
    common = sum(min(ta.count(w), tb.count(w)) for w in set(ta))
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def _content(state: str) -> str:
    """The state without its feedback line (what the identity baseline can get right)."""
    return "\n".join(state.split("\n")[1:])


def action_type(action: str) -> str:
    """The verb of an action, for per-type fidelity: "put dirty jeans in basket" -> "put"."""
    words = action.split()
    return words[0].lower() if words else ""


def score_transitions(sim: ExperienceModel, rows: Sequence[Mapping], retrieve: Retrieve | None = None,
                      select: Sequence[bool] | None = None) -> list[dict]:
    """Teacher-forced predictions on real transitions: one record per selected row.

    rows: real transitions in trajectory order (TRAJECTORY rows); every row feeds the histories,
    only rows with ``select`` True (default all) are predicted. A record holds the real row's
    outcome, M_exp's prediction (next state after applying its delta, win, valid, parse ok) and the
    "nothing changes" baseline's; ``summarize_fidelity`` turns records into metrics.
    """
    cfg = sim.cfg.prompt
    select = [True] * len(rows) if select is None else list(select)
    scored = cfg.progress and has_progress(rows)
    prompts, contexts, history, prev, chosen, before = [], [], [], None, [], []
    for r, keep in zip(rows, select):
        if r["traj_id"] != prev:
            history, prev = [], r["traj_id"]
        if keep:
            demos = retrieve(r["state"], r["action"], cfg.num_demos) if (retrieve and cfg.num_demos) else []
            refs = refs_for(r["state"], r["action"], cfg)
            p0 = row_progress(r, scored)[0]
            prompts.append(make_prompt(r.get("instruction") or "", history, r["state"], r["action"], demos, cfg,
                                       refs, p0, sim.hint(r["state"], r["action"])))
            contexts.append((r["state"], refs))
            chosen.append(r)
            before.append(p0)
        history.append((r["action"], _feedback(r["next_state"])))
    preds = sim.predict(prompts, contexts)
    out = []
    for r, p, p0 in zip(chosen, preds, before):
        d = p.effective_delta()
        _, pred_win, _ = outcome(p, p0)
        out.append({"action_type": action_type(r["action"]), "state": r["state"], "next_state": r["next_state"],
                    "pred_state": apply(AbstractState.parse(r["state"]), d).render(),
                    "real_win": bool(r["won"]) and float(r["reward"]) > 0, "real_reward": float(r["reward"]),
                    "real_valid": bool(r["valid"]), "pred_win": pred_win,
                    "pred_valid": bool(p.ok and d.valid), "parsed": bool(p.ok)})
    return out


def summarize_fidelity(records: Sequence[Mapping]) -> dict[str, float]:
    """Metrics over ``score_transitions`` records (all in [0, 1]; NaN where undefined).

    state_exact_match (whole next state incl. feedback), content_exact_match (without feedback),
    state_token_f1, reward_accuracy, valid_rate (parseable outputs), win_recall, win_precision,
    invalid_action_accuracy (real-invalid actions predicted invalid), valid_action_accuracy, and
    ``baseline_*`` for the prediction "next state = current state, reward 0, valid, not done".
    """
    n = len(records)
    nan = float("nan")

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values) if values else nan

    wins = [r for r in records if r["real_win"]]
    pred_wins = [r for r in records if r["pred_win"]]
    invalid = [r for r in records if not r["real_valid"]]
    valid = [r for r in records if r["real_valid"]]
    return {
        "state_exact_match": mean(r["pred_state"] == r["next_state"] for r in records),
        "content_exact_match": mean(_content(r["pred_state"]) == _content(r["next_state"]) for r in records),
        "state_token_f1": mean(_token_f1(r["pred_state"], r["next_state"]) for r in records),
        "reward_accuracy": mean((1.0 if r["pred_win"] else 0.0) == r["real_reward"] for r in records),
        "valid_rate": mean(r["parsed"] for r in records),
        "win_recall": mean(r["pred_win"] for r in wins),
        "win_precision": mean(r["real_win"] for r in pred_wins),
        "invalid_action_accuracy": mean(r["parsed"] and not r["pred_valid"] for r in invalid),
        "valid_action_accuracy": mean(r["pred_valid"] for r in valid),
        "baseline_state_exact_match": mean(r["state"] == r["next_state"] for r in records),
        "baseline_content_exact_match": mean(_content(r["state"]) == _content(r["next_state"]) for r in records),
        "baseline_state_token_f1": mean(_token_f1(r["state"], r["next_state"]) for r in records),
        "baseline_reward_accuracy": mean(r["real_reward"] == 0.0 for r in records),
        "baseline_valid_rate": 1.0 if n else nan,
        "baseline_win_recall": 0.0 if wins else nan,
        "baseline_win_precision": nan,
        "baseline_invalid_action_accuracy": 0.0 if invalid else nan,
        "baseline_valid_action_accuracy": 1.0 if valid else nan,
        "transitions": float(n), "wins": float(len(wins)), "invalid_actions": float(len(invalid)),
    }


def fidelity(sim: ExperienceModel, rows: Sequence[Mapping], retrieve: Retrieve | None = None,
             select: Sequence[bool] | None = None) -> dict[str, float]:
    """Single-step fidelity of M_exp on real transitions, beside the "nothing changes" baseline
    (``score_transitions`` then ``summarize_fidelity``)."""
    return summarize_fidelity(score_transitions(sim, rows, retrieve, select))


def multi_step_drift(sim: ExperienceModel, trajectories: Sequence, max_steps: int = 10) -> list[dict]:
    """Replay real trajectories' actions through M_exp from their real start states, open loop.

    At step t the simulator sees only its own earlier predictions (its state and history), never
    the real ones, so errors compound. ``sim`` must take its start state from ``Task.initial_state``
    (``SimulatorFactory`` / ``initial_state_fn`` do); each trajectory is replayed as its own task.
    Returns one dict per step t = 1..max_steps with ``trajectories`` (real ones at least t long),
    ``state_exact_match`` / ``content_exact_match`` / ``state_token_f1`` of the simulated state
    after t actions against the real one (a simulated episode that already ended counts as a miss),
    ``sim_alive`` (still running), ``agree_so_far`` (exact match at every step up to t), and the
    same for the baseline "the start state never changes".
    """
    from dataclasses import replace as _replace

    trajs = [t for t in trajectories if t.steps]
    if not trajs:
        return []
    tasks = [_replace(t.task, task_id=f"{t.task.task_id}#{t.traj_id}", initial_state=t.steps[0].state)
             for t in trajs]
    obs = sim.reset_batch(tasks)
    states = [o.state for o in obs]
    alive = [True] * len(trajs)
    agree = [True] * len(trajs)
    out = []
    for t in range(1, max_steps + 1):
        acts = [tr.steps[t - 1].action if (alive[i] and len(tr.steps) >= t) else None
                for i, tr in enumerate(trajs)]
        res = sim.step_batch(acts) if any(a is not None for a in acts) else [None] * len(trajs)
        rec = {"step": t, "trajectories": 0, "state_exact_match": 0.0, "content_exact_match": 0.0,
               "state_token_f1": 0.0, "sim_alive": 0.0, "agree_so_far": 0.0, "baseline_state_exact_match": 0.0,
               "baseline_content_exact_match": 0.0, "baseline_state_token_f1": 0.0}
        for i, tr in enumerate(trajs):
            if len(tr.steps) < t:
                continue
            real = tr.steps[t - 1].next_state
            was_alive = alive[i]
            if res[i] is not None:
                states[i] = res[i].obs.state
                alive[i] = not res[i].done
            match = was_alive and res[i] is not None and states[i] == real
            agree[i] = agree[i] and match
            start = tr.steps[0].state
            rec["trajectories"] += 1
            rec["state_exact_match"] += match
            rec["content_exact_match"] += was_alive and res[i] is not None and _content(states[i]) == _content(real)
            rec["state_token_f1"] += _token_f1(states[i], real) if (was_alive and res[i] is not None) else 0.0
            rec["sim_alive"] += was_alive
            rec["agree_so_far"] += agree[i]
            rec["baseline_state_exact_match"] += start == real
            rec["baseline_content_exact_match"] += _content(start) == _content(real)
            rec["baseline_state_token_f1"] += _token_f1(start, real)
        if not rec["trajectories"]:
            break
        for k in rec:
            if k not in ("step", "trajectories"):
                rec[k] /= rec["trajectories"]
        out.append(rec)
    return out


def config_dict(cfg) -> dict:
    return asdict(cfg)
