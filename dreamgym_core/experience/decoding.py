"""How M_exp's text is generated: decoding knobs, the output-grammar constraint, the KV-cache loop.

No paper equation: this is how samples of Eq. 4 are drawn, kept apart from what they mean (the
simulator's semantics live in ``simulator``). ``DecodeConfig`` holds every decoding knob; ``Decoder``
turns prompts into texts for any causal LM.

Departures from a plain ``generate`` (all speed-ups or format guarantees, none changes the
distribution the model defines except the grammar constraint):
* ``FormatConstraint`` masks tokens that cannot continue M_exp's output grammar
  (``exp_format.next_constraint``): format failures go, prediction errors stay the model's.
* ``drop_finished``: our own KV-cache loop drops a row at its end-of-sequence token, so a batch
  costs the sum of its rows' lengths, not rows x the longest.
* ``GrowingCache`` writes each step in place into a preallocated buffer instead of concatenating.
* Prefill in groups of similar length (``prefill_rows``): each group is padded to its own longest
  and its keys and values are laid into the batch's left-padded cache (README, benchmarks).
* ``forward="lean"``: a plain Llama runs through ``lean_llama.LeanLlama`` (same logits to rounding).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Sequence

import torch


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


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
        the batch (``Decoder.decode``); the per-row state follows the id, not the position."""
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
    """A KV cache for ``Decoder.decode`` that writes in place into a preallocated buffer (``GrowingLayer``)."""
    return _growing_cache_classes()[0](capacity)


@dataclass(frozen=True)
class DecodeConfig:
    """Decoding knobs of M_exp (what the simulator means by a step is ``simulator.SimConfig``)."""

    max_new_tokens: int = 160
    constrained: bool = True
    """Decode inside the output grammar (``FormatConstraint``): field names, yes/no and 0/1 values and
    the end are forced, the reasoning and the values stay the model's. False = free decoding."""
    greedy: bool = True
    temperature: float = 1.0
    shared_noise: bool = False
    """Sampling only: each row's sampling noise comes from a seed the caller gives per row (the
    simulator: task and step), by the Gumbel-max trick, instead of the batch's random stream. Rows with
    the same seed and prompt then produce the same text, rows with the same seed and different prompts
    correlated ones: the episodes of a GRPO group face one world, as a real task's hidden draws are
    fixed, and the comparison within the group is of the actions, not of the draws."""
    max_prompt_tokens: int = 448
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
            raise ValueError(f"DecodeConfig.forward={self.forward!r}: use 'lean' or 'transformers'")
        if self.kv_cache not in ("growing", "dynamic"):
            raise ValueError(f"DecodeConfig.kv_cache={self.kv_cache!r}: use 'growing' or 'dynamic'")
        if not isinstance(self.prefill_rows, int) or self.prefill_rows < 0:
            raise ValueError(f"DecodeConfig.prefill_rows={self.prefill_rows!r} must be an integer >= 0")



class Decoder:
    """Prompts -> generated texts for a causal LM under ``DecodeConfig`` (batched, left-padded).

    ``prefix``: text every output starts with that is part of the prompt (the no-CoT ablation's
    empty think block: models trained without reasoning continue after it); it is prepended to the
    returned texts. ``stats``: an object whose ``generated_tokens`` and ``seconds`` are counted up.
    """

    def __init__(self, model, tokenizer, cfg: DecodeConfig = DecodeConfig(), *, prefix: str = "", stats=None):
        self.model, self.tokenizer, self.cfg, self.prefix, self.stats = model, tokenizer, cfg, prefix, stats
        self._calls = 0
        self._lean_cached, self._lean_version = None, -1  # LeanLlama of the weights at that version

    def generate(self, prompts: Sequence[str], row_seeds: Sequence[int] | None = None) -> list[str]:
        """One batch of prompts -> one text per prompt (the prefix included, the EOS not). ``row_seeds``
        (sampling with ``drop_finished`` only): one seed per prompt for its sampling noise
        (``DecodeConfig.shared_noise``)."""
        if row_seeds is not None:
            if self.cfg.greedy or not self.cfg.drop_finished:
                raise ValueError("Decoder.generate: row_seeds need sampling (greedy=False) and drop_finished=True")
            if len(row_seeds) != len(prompts):
                raise ValueError(f"Decoder.generate: {len(row_seeds)} row_seeds for {len(prompts)} prompts")
        tok, model = self.tokenizer, self.model
        t0 = time.perf_counter()
        ids = [_ids(tok, p + "\n")[-self.cfg.max_prompt_tokens:] for p in prompts]
        if self.prefix:  # e.g. no-CoT models were trained on an empty think block
            think = _ids(tok, self.prefix)
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
                tok, P, prefix=self.prefix)])
        with torch.no_grad():
            if self.cfg.drop_finished:
                rows = self.decode(inp.to(device), attn.to(device), P, processors[0] if processors else None,
                                   row_seeds)
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
            if self.stats is not None:
                self.stats.generated_tokens += len(row)
            texts.append(tok.decode(row, skip_special_tokens=True))
        if self.prefix:
            texts = [self.prefix + t for t in texts]
        if self.stats is not None:
            self.stats.seconds += time.perf_counter() - t0
        return texts

    def decode(self, inp: torch.Tensor, attn: torch.Tensor, P: int, constraint: "FormatConstraint | None",
               row_seeds: Sequence[int] | None = None) -> list[list[int]]:
        """Greedy or sampled KV-cache decoding of a left-padded batch; a row leaves the batch (and
        its KV cache) at its end-of-sequence token, so later steps only run the live rows.
        Returns each row's generated ids (the EOS included when reached)."""
        model, eos, cfg = self.model, self.tokenizer.eos_token_id, self.cfg
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        lean = self.lean()
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
            logits = self.grouped_prefill(inp, attn, cache, step, lean is not None)
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
            elif row_seeds is not None:  # Gumbel-max with each row's own stream: a sample of softmax(scores / T)
                if t == 0:
                    gens = [torch.Generator().manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in row_seeds]
                u = torch.stack([torch.rand(scores.shape[-1], generator=gens[b]) for b in live]).to(scores.device)
                nxt = (scores / cfg.temperature - torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7)))).argmax(-1)
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

    def grouped_prefill(self, inp: torch.Tensor, attn: torch.Tensor, cache, step, growing_parts: bool):
        """Prefill ``cfg.prefill_rows`` prompts at a time, grouped by length; every group's keys and
        values go into ``cache`` at the batch's left-padded positions (a row's real tokens end at P,
        as in the one-forward prefill). ``step(x, p, a, part_cache)`` is ``decode``'s forward; each group
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

    def lean(self):
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
