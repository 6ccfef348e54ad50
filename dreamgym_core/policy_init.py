"""The policy's initialization: behaviour cloning on offline successful trajectories (the paper's SFT baseline).

Paper §5 ("SFT" rows, and the starting point of every RL run): the policy is first fine-tuned on
offline expert demonstrations. Here the embedded CPU default builds a small from-scratch Llama with
a byte-level BPE trained on the policy's own prompts, then trains it with the candidate-ranking BC
loss of ``policy.train_bc`` on the *won* offline episodes of the expert and the noisy expert,
cloning the expert's own choices (``clone_kinds``): the noisy episodes add recoveries from
off-path states, and their epsilon-random detours and the random walker's lucky wins are not
cloned (they are noise, and made BC's loss plateau near the entropy of a random choice). Departure: the paper starts from a pretrained instruction model; a
pretrained model can be passed instead (``base_model``: "smollm2" is the packaged
SmolLM2-135M-Instruct, see ``models.smollm2_checkpoint``). The from-scratch default exists because
no weights can be downloaded here and a 135M model is slow to fine-tune on two CPU cores.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from dreamgym_core.rollout import PolicyFormat
from dreamgym_core.schema import Trajectory


@dataclass(frozen=True)
class PolicyInitConfig:
    base_model: str = ""
    """'' = a from-scratch tiny Llama; "smollm2" = the packaged SmolLM2-135M-Instruct (converted once
    into $DREAMGYM_MODEL_CACHE, default ~/.cache/dreamgym/models); else a local causal-LM directory."""
    vocab_size: int = 2000
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    steps: int = 2000
    """Measured on twc (300 tasks, 2,252 cloned decisions, 200 held-out games, greedy): 400 steps
    (the old default) 0.365 real success, 1,000 steps 0.64, 2,000 steps 0.83 (0.85 on 600 games; train
    games 0.99)."""
    time_budget_s: float = 900.0
    """BC stops at ``steps`` or this wall budget (tokenizer training included), whichever comes first;
    a budget-bound run plans a shorter cosine schedule so it still ends annealed (``policy.train_bc``)."""
    batch_size: int = 16
    lr: float = 2e-3
    history_window: int = PolicyFormat.history_window
    """(action, feedback) pairs in the policy's prompt. Set here only: the checkpoint records it
    (``PolicyFormat``) and every rollout, update and evaluation of this policy reads it from there."""
    behaviours: tuple[str, ...] = ("expert", "noisy")
    """Offline behaviours (``Trajectory.policy``) whose won episodes are cloned; () = every behaviour."""
    clone_kinds: tuple[str, ...] = ("expert",)
    """``Transition.action_kind`` of the cloned steps; () = every valid step of those episodes."""
    max_prompt_tokens: int = PolicyFormat.max_prompt_tokens
    """Left truncation of the policy's prompts (recorded in its ``PolicyFormat`` like the window)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "layers", "heads", "steps", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"PolicyInitConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.history_window < 0 or self.time_budget_s <= 0 or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError("PolicyInitConfig: history_window >= 0, time_budget_s > 0 and lr > 0 are required")

    @property
    def fmt(self) -> PolicyFormat:
        """The prompt format the cloned policy is saved with."""
        return PolicyFormat(history_window=self.history_window, max_prompt_tokens=self.max_prompt_tokens)


def policy_corpus(trajs: Sequence[Trajectory], fmt: PolicyFormat) -> list[str]:
    """Texts the policy tokenizer is trained on: every prompt the policy will see plus its actions."""
    from dreamgym_core.policy import END_OF_ACTION, bc_examples, build_policy_prompt
    from dreamgym_core.rollout import PolicyContext

    texts = [e.prompt + " " + e.action + END_OF_ACTION for e in bc_examples(trajs, fmt)]
    for t in trajs:  # states and candidates of failed episodes too: the RL policy meets them
        for s in t.steps[:3]:
            texts.append(build_policy_prompt(PolicyContext(t.task.instruction, s.state, s.candidates), fmt) + " "
                         + " | ".join(s.candidates))
    return texts


def init_policy(trajs: Sequence[Trajectory], out_dir: str, cfg: PolicyInitConfig = PolicyInitConfig(),
                progress: Callable[[int, float], None] | None = None) -> dict:
    """Train the BC policy and save it (safetensors) at ``out_dir``; returns its metrics."""
    import torch

    from dreamgym_core.models import (TinyLlamaConfig, build_tiny_llama, load_causal_lm, save_checkpoint,
                                      train_tokenizer)
    from dreamgym_core.policy import bc_examples, set_policy_format, train_bc

    chosen = [t for t in trajs if not cfg.behaviours or t.policy in cfg.behaviours]
    examples = bc_examples(chosen, cfg.fmt, kinds=cfg.clone_kinds or None)
    if not examples:
        raise ValueError(f"init_policy: no won episode of {list(cfg.behaviours) or 'any behaviour'} with "
                         f"{list(cfg.clone_kinds) or 'valid'} steps to clone in the offline data")
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    if cfg.base_model:
        model, tok = load_causal_lm(cfg.base_model)
    else:
        tok_dir = out_dir.rstrip("/") + ".tokenizer"
        tok = train_tokenizer(policy_corpus(trajs, cfg.fmt), tok_dir, vocab_size=cfg.vocab_size,
                              extra_tokens=["Task:", "Did:", "Action:", "feedback:", "location:", "objects:",
                                            "exits:", "inventory:"])
        model = build_tiny_llama(tok, TinyLlamaConfig(hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                                                      kv_heads=cfg.heads, intermediate=3 * cfg.hidden),
                                 seed=cfg.seed)
    set_policy_format(model, cfg.fmt)
    info: dict = {}
    losses = train_bc(model, tok, examples, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                      max_prompt_tokens=cfg.fmt.max_prompt_tokens, progress=progress, info=info,
                      time_budget_s=max(cfg.time_budget_s - (time.perf_counter() - started), 1e-3))
    metrics = {"bc/examples": float(len(examples)), "bc/steps": float(len(losses)),
               "bc/planned_steps": float(info["planned_steps"]),
               "bc/final_loss": float(losses[-1]) if losses else float("nan"),
               "params": float(sum(p.numel() for p in model.parameters())),
               "timing/bc_s": round(time.perf_counter() - started, 2)}
    save_checkpoint(model, tok, out_dir, {"metrics": metrics, "config": asdict(cfg), "kind": "policy"})
    if not cfg.base_model:
        import shutil

        shutil.rmtree(out_dir.rstrip("/") + ".tokenizer", ignore_errors=True)
    return metrics


def policy_dir_ok(path: str) -> bool:
    """A finished SFT policy that records its prompt format (older ones are cloned again)."""
    import json

    meta = os.path.join(path, "dreamgym.json")
    if not os.path.exists(meta):
        return False
    with open(meta) as f:
        return "policy_format" in json.load(f)
