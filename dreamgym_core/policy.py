"""The agent policy: a causal LM acting in multi-turn episodes (paper §4.4).

Two action modes (issue: small models that generate free text produced 0% valid actions):

* ``choose`` (default): the policy scores every candidate action by its sequence log-probability
  given the prompt, log p(a|x) = sum_t log p(a_t | x, a_<t) (+ end-of-action token), and acts with
  pi(a|x) = softmax_a(log p(a|x) / temperature) over the candidates. The prompt is run once and
  its KV cache is shared by all its candidates, so scoring costs about one prompt forward plus a
  few tokens per candidate.
* ``generate``: free generation (for large models), parsed as the action text.

Both give token-level log-probs (``score_candidates`` returns them per candidate with gradients
when asked) for the PPO/GRPO update. ``ValueHead`` reads the last prompt token's hidden state for PPO.

Departure from the paper: the paper's policies (Llama-3/Qwen-2.5, 3B-8B) generate actions; the
embedded CPU default is a small model choosing among candidates, which the paper's ALFWorld/WebShop
action spaces also allow (admissible commands).
"""

from __future__ import annotations

import functools
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dreamgym_core.rollout import ActionChoice, PolicyContext, PolicyFormat  # noqa: F401  (PolicyFormat: re-exported)
from dreamgym_core.schema import Trajectory

END_OF_ACTION = "\n"
NO_CANDIDATES_FALLBACK = "look around"
"""What the policy acts on when a state lists no candidate actions."""


def set_policy_format(model, fmt: PolicyFormat) -> None:
    """Attach the format a policy model was cloned with (``models.load_checkpoint`` does it on load)."""
    model.dreamgym_policy_format = fmt


def policy_format(model) -> PolicyFormat:
    """The format attached to ``model``; an error if none is (a model not loaded from a policy checkpoint)."""
    fmt = getattr(model, "dreamgym_policy_format", None)
    if fmt is None:
        raise ValueError("this model carries no PolicyFormat: load it with models.load_checkpoint from a policy "
                         "checkpoint, or attach one with policy.set_policy_format")
    return fmt


def build_policy_prompt(ctx: PolicyContext, fmt: PolicyFormat) -> str:
    """Task, the last ``fmt.history_window`` (action, feedback) pairs and the abstract state; the
    action follows after 'Action:'."""
    lines = [f"Task: {ctx.instruction}"]
    for action, feedback in (ctx.history[-fmt.history_window:] if fmt.history_window else ()):
        lines.append(f"Did: {action} -> {feedback}")
    lines.append(ctx.state)
    lines.append("Action:")
    return "\n".join(lines)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _takes_logits_to_keep(model) -> bool:
    return _forward_takes_logits_to_keep(type(model))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls: type) -> bool:
    """Whether ``cls.forward`` accepts ``logits_to_keep`` (read once per model class: this is on the
    path of every policy decision)."""
    import inspect

    fwd = getattr(cls, "forward", None)
    try:
        return fwd is not None and "logits_to_keep" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False


def score_candidates(model, tokenizer, prompts: Sequence[str], candidates: Sequence[Sequence[str]], *,
                     max_prompt_tokens: int = 384, grad: bool = False,
                     return_hidden: bool = False):
    """Sequence log-probs of every candidate action after its prompt.

    prompts: B strings; candidates: B lists (n_b >= 1).
    Returns ``scores``: list of B tensors (n_b,) = sum of token log-probs of " " + action + "\\n",
    and, with ``return_hidden``, the last prompt token's hidden state (B, H) for a value head.
    Prompts are left-truncated to ``max_prompt_tokens`` (the state and recent history are at the end).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    p_ids = [_ids(tokenizer, p)[-max_prompt_tokens:] for p in prompts]
    B, P = len(p_ids), max(len(x) for x in p_ids)
    inp = torch.full((B, P), pad, dtype=torch.long)
    p_mask = torch.zeros((B, P), dtype=torch.long)
    for b, ids in enumerate(p_ids):  # left padding: every prompt ends at column P-1
        inp[b, P - len(ids):] = torch.tensor(ids)
        p_mask[b, P - len(ids):] = 1
    inp, p_mask = inp.to(device), p_mask.to(device)
    pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    ctx = torch.enable_grad() if grad else torch.no_grad()
    # only the prompt's last position needs the LM head (it predicts the first action token): with a
    # large vocabulary (SmolLM2: 49k, a fifth of its FLOPs per token) the other positions' logits are waste
    keep = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    with ctx:
        out = model(input_ids=inp, attention_mask=p_mask, position_ids=pos, use_cache=True,
                    output_hidden_states=return_hidden, **keep)
        first_lp = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): first action token
        rows, c_ids = [], []
        for b, cands in enumerate(candidates):
            if not cands:
                raise ValueError(f"prompt {b} has no candidate actions")
            for c in cands:
                rows.append(b)
                c_ids.append(_ids(tokenizer, " " + c + END_OF_ACTION))
        R, C = len(rows), max(len(x) for x in c_ids)
        idx = torch.tensor(rows, device=device)
        tokens = torch.full((R, C), pad, dtype=torch.long, device=device)
        c_mask = torch.zeros((R, C), dtype=torch.long, device=device)
        for r, ids in enumerate(c_ids):
            tokens[r, :len(ids)] = torch.tensor(ids, device=device)
            c_mask[r, :len(ids)] = 1
        # token 0 is predicted by the prompt's last position; tokens 1.. by the continuation
        lp = first_lp[idx].gather(1, tokens[:, :1]).squeeze(1)
        if C > 1:
            cache = out.past_key_values
            cache.reorder_cache(idx)  # one copy of each prompt's KV per candidate row
            cont_in = tokens[:, :-1]
            full_mask = torch.cat([p_mask[idx], c_mask[:, :-1]], dim=1)
            cont_pos = p_mask.sum(-1)[idx].unsqueeze(1) + torch.arange(C - 1, device=device).unsqueeze(0)
            out2 = model(input_ids=cont_in, attention_mask=full_mask, position_ids=cont_pos,
                         past_key_values=cache, use_cache=False)
            tok_lp = F.log_softmax(out2.logits.float(), dim=-1).gather(2, tokens[:, 1:].unsqueeze(2)).squeeze(2)
            lp = lp + (tok_lp * c_mask[:, 1:]).sum(1)
        scores, start = [], 0
        for cands in candidates:
            scores.append(lp[start:start + len(cands)])
            start += len(cands)
        if return_hidden:
            return scores, out.hidden_states[-1][:, -1]
        return scores


class ValueHead(torch.nn.Module):
    """V(s) from the policy's last prompt hidden state (PPO critic)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


class LMPolicy:
    """A causal LM choosing among candidate actions (``Policy`` protocol of dreamgym_core.rollout).

    The prompt format is the model's (``policy_format``); ``fmt``, if given, must equal it: acting
    with another history window than the policy was cloned with is an error, not a silent drift.
    Each choice carries the prompt it was scored on, which rollouts store on the transition."""

    def __init__(self, model, tokenizer, name: str, *, temperature: float = 1.0, greedy: bool = False,
                 batch_size: int = 16, fmt: PolicyFormat | None = None):
        if temperature <= 0:
            raise ValueError("LMPolicy.temperature must be > 0 (use greedy=True for argmax)")
        own = policy_format(model)
        if fmt is not None and fmt != own:
            raise ValueError(f"LMPolicy {name!r}: acting with {fmt} but the policy checkpoint records {own}; "
                             "the format is read from the checkpoint, do not set it elsewhere")
        self.model, self.tokenizer, self.name, self.fmt = model, tokenizer, name, own
        self.temperature, self.greedy, self.batch_size = temperature, greedy, batch_size

    def act(self, contexts: Sequence[PolicyContext]) -> list[ActionChoice]:
        self.model.eval()
        out: list[ActionChoice] = []
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start:start + self.batch_size]
            cands = [list(c.candidates) or [NO_CANDIDATES_FALLBACK] for c in chunk]
            prompts = [build_policy_prompt(c, self.fmt) for c in chunk]
            scores = score_candidates(self.model, self.tokenizer, prompts, cands,
                                      max_prompt_tokens=self.fmt.max_prompt_tokens)
            for c, p, cs, s in zip(chunk, prompts, cands, scores):
                logp = F.log_softmax(s / self.temperature, dim=0)
                if self.greedy:
                    i = int(torch.argmax(logp))
                else:
                    u, acc, i = random.Random(c.seed).random(), 0.0, len(cs) - 1
                    for j, p_j in enumerate(logp.exp().tolist()):
                        acc += p_j
                        if u < acc:
                            i = j
                            break
                out.append(ActionChoice(cs[i], float(logp[i]), prompt=p))
        return out


# --------------------------------------------------------------------------------------------
# Behaviour cloning (the paper's SFT baseline and the RL initialization).

@dataclass(frozen=True)
class BCExample:
    prompt: str
    action: str
    candidates: tuple[str, ...]


def bc_examples(trajs: Sequence[Trajectory], fmt: PolicyFormat,
                kinds: Sequence[str] | None = None) -> list[BCExample]:
    """(prompt, action) pairs from successful episodes, dropping rejected actions; prompts in ``fmt``.

    ``kinds``: clone only steps whose ``action_kind`` is listed (e.g. ("expert",) keeps the expert's
    choices inside noisy-expert episodes and drops their epsilon-random detours); None = every
    valid step. Every step still enters the history of the steps after it.
    """
    from dreamgym_core.rollout import episode_contexts

    out = []
    for t in trajs:
        if not t.won:
            continue
        for s, ctx in zip(t.steps, episode_contexts(t)):
            if s.valid and (kinds is None or s.action_kind in kinds):
                out.append(BCExample(build_policy_prompt(ctx, fmt), s.action, s.candidates))
    return out


_PLAN_AFTER = 10
"""BC steps timed before a wall-budgeted run fixes its planned length."""
_clock = time.perf_counter


def train_bc(model, tokenizer, examples: Sequence[BCExample], *, steps: int, batch_size: int = 16,
             lr: float = 1e-3, seed: int = 0, max_prompt_tokens: int = 384, time_budget_s: float | None = None,
             progress: Callable[[int, float], None] | None = None, info: dict | None = None) -> list[float]:
    """Maximise log pi(a*|x) = log softmax over candidates of the expert action (ranking BC).

    The candidate-normalised loss matches how the policy acts (choose mode); it is the
    cross-entropy of the expert's choice, not of free text. Returns the loss per step.

    Schedule: 20 warm-up steps, then a cosine decay to 0 over the planned steps. With a wall budget
    (``time_budget_s``) the plan is fixed once, after ``_PLAN_AFTER`` steps, from the measured speed:
    ``steps`` if they fit in the budget, else as many as fit. So a budget-cut run still ends on an
    annealed learning rate (a cut at the middle of the cosine left the weights at a high-rate point),
    and a run the budget does not bind is the same, step for step, on any machine. The budget is also
    a hard stop (after at least one step). ``info``, if given, receives ``planned_steps`` and
    ``last_lr``.
    """
    if not examples:
        raise ValueError("train_bc: no examples (no successful episodes with valid actions)")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    plan = {"total": steps}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s / max(plan["total"], 1), 1.0))))
    losses = []
    started = _clock()
    model.train()
    for step in range(steps):
        if time_budget_s is not None:
            elapsed = _clock() - started
            if step == _PLAN_AFTER and elapsed * steps / step > time_budget_s:
                plan["total"] = max(step + 1, int(time_budget_s * step / elapsed))
            if step >= plan["total"] or (elapsed > time_budget_s and step > 0):
                break
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        cands = [list(e.candidates) if e.action in e.candidates else list(e.candidates) + [e.action] for e in batch]
        scores = score_candidates(model, tokenizer, [e.prompt for e in batch], cands, grad=True,
                                  max_prompt_tokens=max_prompt_tokens)
        loss = torch.stack([-F.log_softmax(s, 0)[c.index(e.action)] for s, c, e in zip(scores, cands, batch)]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, losses[-1])
    if info is not None:
        info["planned_steps"], info["last_lr"] = plan["total"], sched.get_last_lr()[0]
    model.eval()
    return losses
