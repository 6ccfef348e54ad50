"""The policy trainer: PPO or GRPO on multi-turn rollouts, in M_exp or in the real env (paper §4.4).

What this implements
--------------------
One DreamGym policy-learning step (paper §4.4, Algorithm 1 line "update pi with PPO/GRPO on the
synthetic rollouts"), as three named phases that ``rl.step.train_step`` times one by one:

  1. rollout     ``rollout()`` of the trainer's current model (sampled ``LMPolicy``) in any BatchEnv;
  2. advantages  ``PolicyTrainer.prepare``: per-decision rows (each with the prompt the acting policy
                 recorded on its transition; pure functions in ``rl.advantages``), then
                 GRPO: A = group-normalized episode return (group = the rollouts of one task in the
                 batch, ``core_algos.group_normalized_advantages``), the same A for every decision of
                 the episode;
                 PPO:  V(s) from ``ValueHead`` on the prompt's last hidden state, GAE over the
                 decisions of each episode (``core_algos.compute_gae``), returns = A + V, then A is
                 whitened over the batch;
                 plus the frozen reference model's log-probs when ``kl_coef > 0``;
  3. update      ``PolicyTrainer.optimize``: ``ppo_epochs`` passes of shuffled minibatches with
                 gradient accumulation, loss = clipped surrogate + kl_coef * KL(pi || pi_ref)
                 (+ vf_coef * clipped value loss for PPO), gradient-norm clipping, AdamW.

The action log-probability (choose mode)
----------------------------------------
The policy picks among the candidate actions (``dreamgym_core.policy``). Each candidate a_j gets the
sequence score s_j = log p(a_j | x) = sum_t log p(a_j,t | x, a_j,<t) over its tokens (" " + action +
end-of-action), and the policy is pi(a_j | x) = softmax_j(s_j / T). The log-prob the ratio and KL use
is ``log softmax(s / T)[chosen]``, exactly what ``LMPolicy`` recorded while acting, so re-scoring with
unchanged weights reproduces the stored log-prob (ratio 1). Its gradient is

    d log pi(a_k | x) = (1/T) [ d s_k - sum_j pi(a_j | x) d s_j ],

i.e. token-level log-prob gradients on the chosen action's tokens, minus the policy-weighted
gradients of every candidate's tokens. Only action tokens are scored: the environment's tokens
(task, history feedback, the state) are the prompt, conditioning only, and never receive gradient.
Each decision is one "token" of ``core_algos``'s (B, T) convention: a trajectory is a row of its
decisions, ``mask`` marks the real ones.

Where this departs from the paper and why
-----------------------------------------
- The paper's policies generate action text token by token; the embedded small policy chooses among
  candidates (see ``dreamgym_core.policy``), so the ratio is per action (per decision), not per
  token. GAE runs over decisions (turns), which is the paper's turn-level formulation exactly.
- The loss is averaged over decisions (``token-mean`` with one decision per "token"), with the
  minibatch's decision count as the denominator of every micro-batch, so gradient accumulation
  gives exactly the full-minibatch gradient.
- A constant-reward GRPO group (all won or all lost, or a single rollout) has zero advantage and is
  counted in ``grpo/zero_adv_groups``: it carries no learning signal, only the KL term acts on it.
- Multi-process (DDP): ``score_candidates`` calls the model twice per micro-batch (prompt, then the
  candidates on the shared KV cache), which DDP's bucketed reducer does not support, so each rank
  runs the unwrapped module on its share of the minibatch and gradients are averaged explicitly
  (``accelerator.reduce``) before clipping. On one process (CPU default) that step is skipped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from typing import Literal, Sequence

import torch

from dreamgym_core.policy import END_OF_ACTION, ValueHead, _ids, policy_format, score_candidates
from dreamgym_core.rl.advantages import (
    Decision, UpdateBatch, _distinct, choice_logprobs, decision_samples, gae_advantages, grpo_advantages,
)
from dreamgym_core.rl.core_algos import aggregate_loss, kl_penalty, masked_whiten, ppo_clip_loss, value_loss
from dreamgym_core.schema import Trajectory

Algorithm = Literal["ppo", "grpo"]

_STATE_FILE = "trainer_state.pt"
_VALUE_FILE = "value_head.safetensors"
_META_FILE = "trainer.json"
_FORMAT = 1


@dataclass(frozen=True)
class RLConfig:
    """The PPO/GRPO update (one ``algorithm`` field, one dispatch in ``PolicyTrainer.prepare``)."""

    algorithm: Algorithm = "grpo"
    """grpo: group-normalized episode returns, no critic | ppo: GAE with a value head."""
    lr: float = 1e-4
    """AdamW learning rate of the policy."""
    value_lr: float = 1e-3
    """AdamW learning rate of the value head (PPO only)."""
    ppo_epochs: int = 2
    """Passes over one rollout batch."""
    minibatch_size: int = 32
    """Decisions per optimizer step."""
    grad_accum_steps: int = 1
    """Micro-batches per minibatch (memory knob: the gradient is the same for any value)."""
    clip_ratio: float = 0.2
    """PPO clip range epsilon of the surrogate (and of the value loss)."""
    kl_coef: float = 0.02
    """Weight of KL(pi || pi_ref) in the loss; 0 skips the reference model entirely."""
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (``core_algos.kl_penalty``)."""
    gamma: float = 1.0
    """Discount per decision (PPO's GAE; the return-to-go of GRPO's step-level advantage)."""
    gae_lambda: float = 0.95
    """GAE lambda (PPO)."""
    step_advantage_weight: float = 0.0
    """GRPO only: weight omega of a step-level advantage added to the episode-level one (GiGPO, Feng et
    al. 2025): decisions of one group taken in the same state (its content, the feedback line aside)
    form an anchor group, and each gets (G - mean) / std of the anchor group's discounted
    returns-to-go G = gamma^(steps left) * R. 0 = plain GRPO."""
    progress_reward: float = 0.0
    """Weight w of the env's dense score in the reward the update sees: r_t + w * (score_t -
    score_{t-1}), the episode starting at score 0 (TWX twc: +1/n per object put where it belongs,
    so a GRPO return becomes 1[won] + w * final score and a group whose episodes all fail still
    ranks them by how much they did). Simulated episodes carry M_exp's predicted score
    (``## progress``), so real and synthetic rollouts are shaped alike. 0 = the paper's outcome
    reward only."""
    episode_weighting: bool = False
    """Every episode's decisions share one unit of weight (GRPO's sequence mean) instead of every
    decision weighing the same (the unbiased policy gradient). Long failed episodes then push as
    hard as short won ones, not 3-4 times harder."""
    vf_coef: float = 0.5
    """Weight of the value loss (PPO)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (policy and value head together)."""
    temperature: float = 1.0
    """Softmax temperature over candidate scores; ``rl.step`` acts with it. (The prompt format, history
    window and truncation, is the policy checkpoint's ``PolicyFormat``, not an RL setting.)"""
    seed: int = 0
    """Seeds the minibatch shuffling."""
    share_decisions: bool = True
    """Score each distinct decision (same prompt, same candidates) once per micro-batch and let its
    copies share the result; minibatches are then shuffled by distinct decision, so the copies land
    together. Exact (same loss, same gradient); the rollouts of a GRPO group all start from the
    task's initial state, so their first decisions coincide. False: one score per decision row and a
    per-row shuffle."""

    def __post_init__(self) -> None:
        if self.algorithm not in ("ppo", "grpo"):
            raise ValueError(f"RLConfig.algorithm={self.algorithm!r}: use 'ppo' or 'grpo'")
        if self.kl_kind not in ("k1", "k2", "k3"):
            raise ValueError(f"RLConfig.kl_kind={self.kl_kind!r}: use 'k1', 'k2' or 'k3'")
        for name in ("ppo_epochs", "minibatch_size", "grad_accum_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"RLConfig.{name}={getattr(self, name)!r} must be an integer >= 1")
        if self.grad_accum_steps > self.minibatch_size:
            raise ValueError(f"RLConfig.grad_accum_steps={self.grad_accum_steps} exceeds minibatch_size="
                             f"{self.minibatch_size}; lower it or raise minibatch_size")
        for name in ("lr", "value_lr", "clip_ratio", "temperature", "max_grad_norm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"RLConfig.{name}={v!r} must be a finite number > 0")
        for name in ("kl_coef", "vf_coef", "step_advantage_weight", "progress_reward"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"RLConfig.{name}={v!r} must be a finite number >= 0")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"RLConfig.{name}={getattr(self, name)!r} must be within [0, 1]")


# --------------------------------------------------------------------------------------------
# The trainer

def _default_accelerator():
    from dreamgym_core.device import accelerator

    return accelerator()


class PolicyTrainer:
    """PPO/GRPO updates of a causal-LM policy (choose mode), through ``accelerate``.

    ``ref_model``: the frozen reference for the KL term (DreamGym: the SFT policy). When
    ``kl_coef > 0`` and none is given, a frozen copy of ``model`` as it is now is used.
    ``value_head``: PPO's critic; a zero-initialized ``ValueHead`` when none is given.
    """

    def __init__(self, model, tokenizer, cfg: RLConfig, ref_model=None, value_head: ValueHead | None = None,
                 accelerator=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.fmt = policy_format(model)
        """The policy checkpoint's prompt format: scoring truncates prompts as acting did."""
        self.accelerator = accelerator or _default_accelerator()
        device = self.accelerator.device
        if cfg.kl_coef > 0 and ref_model is None:
            ref_model = copy.deepcopy(model)
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = ref_model.to(device).eval()
            self.ref_model.requires_grad_(False)
        if cfg.algorithm == "ppo" and value_head is None:
            value_head = ValueHead(model.config.hidden_size)
        self.value_head = value_head if cfg.algorithm == "ppo" else None
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
        if self.value_head is not None:
            groups.append({"params": list(self.value_head.parameters()), "lr": cfg.value_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        if self.value_head is not None:
            self._model, self._value_head, self.optimizer = self.accelerator.prepare(model, self.value_head, optimizer)
        else:
            self._model, self.optimizer = self.accelerator.prepare(model, optimizer)
            self._value_head = None
        self.model = self.accelerator.unwrap_model(self._model)
        if self.value_head is not None:
            self.value_head = self.accelerator.unwrap_model(self._value_head)
        self.updates = 0
        self.optimizer_steps = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)

    # -- phase 2 ------------------------------------------------------------------------------
    def _score(self, model, samples: Sequence[Decision], *, grad: bool, hidden: bool = False):
        """Candidate scores per decision (and the prompt's hidden state with ``hidden``); with
        ``share_decisions`` each distinct (prompt, candidates) is run once and its copies share it."""
        if not self.cfg.share_decisions:
            return score_candidates(model, self.tokenizer, [d.prompt for d in samples], [d.candidates for d in samples],
                                    max_prompt_tokens=self.fmt.max_prompt_tokens, grad=grad, return_hidden=hidden)
        first, inverse = _distinct(samples)
        uniq = [samples[i] for i in first]
        out = score_candidates(model, self.tokenizer, [d.prompt for d in uniq], [d.candidates for d in uniq],
                               max_prompt_tokens=self.fmt.max_prompt_tokens, grad=grad, return_hidden=hidden)
        scores, h = out if hidden else (out, None)
        scores = [scores[j] for j in inverse]
        return (scores, h[torch.tensor(inverse, device=h.device)]) if hidden else scores

    @torch.no_grad()
    def _score_all(self, model, samples: Sequence[Decision], *, hidden: bool = False):
        """``_score`` of every sample without gradient, in minibatch-sized chunks of distinct decisions
        (all of them when not shared), expanded back to one entry per sample."""
        first, inverse = _distinct(samples) if self.cfg.share_decisions else (list(range(len(samples))),
                                                                              list(range(len(samples))))
        uniq = [samples[i] for i in first]
        scores, hs = [], []
        for idx in self._chunks(len(uniq)):
            chunk = [uniq[i] for i in idx]
            out = score_candidates(model, self.tokenizer, [d.prompt for d in chunk], [d.candidates for d in chunk],
                                   max_prompt_tokens=self.fmt.max_prompt_tokens, return_hidden=hidden)
            scores.extend(out[0] if hidden else out)
            if hidden:
                hs.append(out[1])
        scores = [scores[j] for j in inverse]
        return (scores, torch.cat(hs)[torch.tensor(inverse, device=hs[0].device)]) if hidden else scores

    def _computed_tokens(self, batch: "UpdateBatch", idx: Sequence[int]) -> int:
        """Tokens actually run through the model for these decisions (distinct ones only when shared)."""
        if not self.cfg.share_decisions:
            return int(batch.tokens[list(idx)].sum())
        first, _ = _distinct([batch.samples[i] for i in idx])
        return int(sum(batch.tokens[idx[j]] for j in first))

    def _order(self, samples: Sequence[Decision]) -> list[int]:
        """One epoch's shuffled decision order (by distinct decision when shared, copies adjacent)."""
        if not self.cfg.share_decisions:
            return torch.randperm(len(samples), generator=self.generator).tolist()
        first, inverse = _distinct(samples)
        members: list[list[int]] = [[] for _ in first]
        for i, j in enumerate(inverse):
            members[j].append(i)
        return [i for j in torch.randperm(len(first), generator=self.generator).tolist() for i in members[j]]

    def _chunks(self, n: int):
        step = max(1, self.cfg.minibatch_size // self.cfg.grad_accum_steps)
        return [range(s, min(n, s + step)) for s in range(0, n, step)]

    def _token_counts(self, samples: Sequence[Decision]) -> torch.Tensor:
        cand_len: dict[str, int] = {}
        counts = []
        for d in samples:
            n = min(len(_ids(self.tokenizer, d.prompt)), self.fmt.max_prompt_tokens)
            for c in d.candidates:
                if c not in cand_len:
                    cand_len[c] = len(_ids(self.tokenizer, " " + c + END_OF_ACTION))
                n += cand_len[c]
            counts.append(n)
        return torch.tensor(counts, dtype=torch.long)

    @torch.no_grad()
    def prepare(self, trajectories: Sequence[Trajectory]) -> UpdateBatch:
        """Phase 2: decisions -> (PPO: values) -> advantages, plus reference log-probs for the KL."""
        cfg = self.cfg
        samples = decision_samples(trajectories, progress_weight=cfg.progress_reward)
        if not samples:
            raise ValueError("PolicyTrainer: no decisions to train on (every trajectory is empty)")
        metrics: dict[str, float] = {"samples": float(len(samples)), "episodes": float(len(trajectories))}
        returns = old_values = None
        match cfg.algorithm:
            case "grpo":
                adv, m = grpo_advantages(samples, step_weight=cfg.step_advantage_weight, gamma=cfg.gamma,
                                         episode_weighting=cfg.episode_weighting)
                metrics.update(m)
            case "ppo":
                self.model.eval()
                scores, h = self._score_all(self.model, samples, hidden=True)
                old_values = self.value_head(h).float().cpu()
                lp, _ = choice_logprobs(scores, [d.chosen for d in samples], cfg.temperature)
                err = (lp.cpu() - torch.tensor([d.old_logprob for d in samples])).abs().max()
                adv, returns = gae_advantages(samples, old_values, cfg.gamma, cfg.gae_lambda)
                metrics["value/mean"] = old_values.mean().item()
                metrics["check/old_logprob_err"] = err.item()
                adv = masked_whiten(adv.unsqueeze(0), torch.ones(1, len(adv), dtype=torch.bool)).squeeze(0)
        metrics["adv/mean"] = adv.mean().item()
        metrics["adv/std"] = adv.std(unbiased=False).item()
        ref = None
        if self.ref_model is not None:
            t0 = time.perf_counter()
            lp, _ = choice_logprobs(self._score_all(self.ref_model, samples), [d.chosen for d in samples],
                                    cfg.temperature)
            ref = lp.float().cpu()
            metrics["timing/ref_s"] = time.perf_counter() - t0
        old = torch.tensor([d.old_logprob for d in samples], dtype=torch.float32)
        return UpdateBatch(samples, old, adv.float(), returns, old_values, ref, self._token_counts(samples), metrics)

    # -- phase 3 ------------------------------------------------------------------------------
    def _loss(self, batch: UpdateBatch, idx: Sequence[int], denom: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, device = self.cfg, self.accelerator.device
        chunk = [batch.samples[i] for i in idx]
        ppo = cfg.algorithm == "ppo"
        out = self._score(self.model, chunk, grad=True, hidden=ppo)
        scores, hidden = out if ppo else (out, None)
        logp, entropy = choice_logprobs(scores, [d.chosen for d in chunk], cfg.temperature)
        sel = torch.tensor(list(idx))
        row = lambda t: t[sel].to(device).unsqueeze(0)  # noqa: E731  (N,) -> (1, n): one row of decisions
        old = row(batch.old_logprobs)
        mask = torch.ones_like(old, dtype=torch.bool)
        logp = logp.float().unsqueeze(0)
        pg, pg_m = ppo_clip_loss(logp, old, row(batch.advantages), mask, cfg.clip_ratio, denom=denom)
        loss = pg
        m = {"loss/policy": pg.detach(), "clip_frac": pg_m["clipfrac"], "approx_kl": pg_m["approx_kl"],
             "entropy": entropy.detach().mean(), "ratio/mean": (logp.detach() - old).exp().mean(),
             "logprob_err": (logp.detach() - old).abs().max()}
        if batch.ref_logprobs is not None:
            kl_mat = kl_penalty(logp, row(batch.ref_logprobs), cfg.kl_kind)
            kl = aggregate_loss(kl_mat, mask, denom=denom)
            loss = loss + cfg.kl_coef * kl
            m["loss/kl"] = kl.detach()
            m["kl"] = kl_mat.detach().mean()
        if ppo:
            values = self.value_head(hidden).float().unsqueeze(0)
            vl, v_m = value_loss(values, row(batch.old_values), row(batch.returns), mask, cfg.clip_ratio, denom=denom)
            loss = loss + cfg.vf_coef * vl
            m["loss/value"] = vl.detach()
            m["value_clip_frac"] = v_m["clipfrac"]
        return loss, m

    def _params(self) -> list[torch.nn.Parameter]:
        ps = [p for p in self.model.parameters() if p.requires_grad]
        return ps + (list(self.value_head.parameters()) if self.value_head is not None else [])

    def _average_grads_across_ranks(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params()]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for p, g in zip(self._params(), grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def optimize(self, batch: UpdateBatch) -> dict[str, float]:
        """Phase 3: ``ppo_epochs`` x shuffled minibatches, gradient accumulation, clipping, AdamW."""
        cfg, acc = self.cfg, self.accelerator
        n = len(batch.samples)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        tokens, computed, first = 0, 0, None
        self.model.train()
        for _ in range(cfg.ppo_epochs):
            order = self._order(batch.samples)
            for start in range(0, n, cfg.minibatch_size):
                full = order[start:start + cfg.minibatch_size]  # each rank a contiguous share: copies stay together
                r, world = acc.process_index, acc.num_processes
                mb = full[len(full) * r // world:len(full) * (r + 1) // world]
                if not mb:
                    continue
                size = math.ceil(len(mb) / cfg.grad_accum_steps)
                mb_metrics: dict[str, float] = {}
                self.optimizer.zero_grad(set_to_none=True)
                for s in range(0, len(mb), size):
                    micro = mb[s:s + size]
                    loss, m = self._loss(batch, micro, denom=len(mb))
                    acc.backward(loss)
                    tokens += int(batch.tokens[micro].sum())
                    computed += self._computed_tokens(batch, micro)
                    w = len(micro) / len(mb)
                    for k, v in m.items():
                        # losses are already divided by the minibatch size; the rest are micro means
                        add = v.item() if k.startswith("loss/") else v.item() * w
                        mb_metrics[k] = max(mb_metrics.get(k, 0.0), add) if k == "logprob_err" else \
                            mb_metrics.get(k, 0.0) + add
                if first is None:  # before any step: ratio 1 if the prompts were rebuilt faithfully
                    first = {"check/first_ratio_mean": mb_metrics["ratio/mean"],
                             "check/first_logprob_err": mb_metrics["logprob_err"]}
                self._average_grads_across_ranks()
                gn = acc.clip_grad_norm_(self._params(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer_steps += 1
                mb_metrics["grad_norm"] = float(gn)
                for k, v in mb_metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        self.model.eval()
        self.updates += 1
        metrics = {k: sums[k] / counts[k] for k in sums if k not in ("logprob_err", "ratio/mean")}
        metrics.setdefault("loss/value", 0.0)
        metrics.setdefault("kl", 0.0)
        metrics.update(first or {})
        metrics.update({"tokens": float(tokens), "tokens_computed": float(computed), "optimizer_steps": float(self.optimizer_steps),
                        "updates": float(self.updates)})
        return metrics

    def update(self, trajectories: Sequence[Trajectory]) -> dict[str, float]:
        """One PPO/GRPO update on a rollout batch: advantages, then the optimization passes."""
        t0 = time.perf_counter()
        batch = self.prepare(trajectories)
        t1 = time.perf_counter()
        metrics = self.optimize(batch)
        t2 = time.perf_counter()
        return {**batch.metrics, **metrics, "timing/advantages_s": t1 - t0, "timing/update_s": t2 - t1}

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, out_dir: str) -> str:
        """Model + tokenizer (safetensors via save_pretrained), value head (safetensors), optimizer
        state, counters and the shuffling RNG (``torch.save`` of plain tensors and dicts), written into
        a temporary directory and moved into place; ``trainer.json`` marks a complete trainer state."""
        from safetensors.torch import save_file

        from dreamgym_core.models import save_checkpoint

        tmp = out_dir.rstrip("/") + ".trainer-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        meta = {"kind": "policy", "algorithm": self.cfg.algorithm, "updates": self.updates}
        save_checkpoint(self.model, self.tokenizer, tmp, meta)
        if self.value_head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                      os.path.join(tmp, _VALUE_FILE))
        torch.save({"optimizer": self.optimizer.state_dict(), "updates": self.updates,
                    "optimizer_steps": self.optimizer_steps, "rng": self.generator.get_state()},
                   os.path.join(tmp, _STATE_FILE))
        with open(os.path.join(tmp, _META_FILE), "w") as f:
            json.dump({"format": _FORMAT, "config": asdict(self.cfg), "updates": self.updates,
                       "optimizer_steps": self.optimizer_steps}, f, indent=2)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return out_dir

    @classmethod
    def load(cls, path: str, cfg: RLConfig | None = None, ref_model=None, accelerator=None) -> "PolicyTrainer":
        """Resume a ``save`` directory. ``cfg`` defaults to the saved one; the optimizer state is
        restored when the algorithm is unchanged (learning rates come from ``cfg``). With
        ``kl_coef > 0`` the reference model must be passed: it is the SFT policy, not this checkpoint."""
        from safetensors.torch import load_file

        from dreamgym_core.models import load_checkpoint

        meta_path = os.path.join(path, _META_FILE)
        if not os.path.exists(meta_path):
            raise ValueError(f"{path!r} is not a PolicyTrainer checkpoint (no {_META_FILE})")
        with open(meta_path) as f:
            meta = json.load(f)
        saved = RLConfig(**{k: v for k, v in meta["config"].items() if k in {f.name for f in fields(RLConfig)}})
        cfg = cfg or saved
        if cfg.kl_coef > 0 and ref_model is None:
            raise ValueError("PolicyTrainer.load: ref_model is required when kl_coef > 0 (the reference is the "
                             "SFT policy, not the resumed checkpoint)")
        model, tok, _ = load_checkpoint(path)  # with the policy's recorded PolicyFormat
        head = None
        if cfg.algorithm == "ppo":
            head = ValueHead(model.config.hidden_size)
            if os.path.exists(os.path.join(path, _VALUE_FILE)):
                head.load_state_dict(load_file(os.path.join(path, _VALUE_FILE)))
        trainer = cls(model, tok, cfg, ref_model=ref_model, value_head=head, accelerator=accelerator)
        state = torch.load(os.path.join(path, _STATE_FILE), weights_only=True, map_location="cpu")
        if saved.algorithm == cfg.algorithm:
            trainer.optimizer.load_state_dict(state["optimizer"])
            for group, lr in zip(trainer.optimizer.param_groups, (cfg.lr, cfg.value_lr)):
                group["lr"] = lr
        trainer.updates, trainer.optimizer_steps = int(state["updates"]), int(state["optimizer_steps"])
        trainer.generator.set_state(state["rng"])
        return trainer
