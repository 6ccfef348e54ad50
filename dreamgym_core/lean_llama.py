"""A lean inference forward for Llama-architecture causal LMs: the simulator's prefill and decode steps.

Not a paper equation: this is how M_exp (Eq. 4) is run faster on a CPU. For a small model,
transformers' Llama forward spends much of a decode step outside the matmuls (per-module calls, a
causal mask built for every step, keyword plumbing). ``LeanLlama`` computes the same function from
the same weights with fewer, larger operations (``bench.mexp_generation --ablate``, README: +24% at
batch 1, +6% at 32, none at 96, where attention and matmuls dominate):

* q, k and v are one matmul (their weights concatenated), as are gate and up;
* the key-padding mask is a boolean (B, 1, 1, L) tensor for a decode step (no causal part is needed
  for a single query), built once per step, not per layer;
* grouped-query attention packs a decode step's query heads onto their key/value head (one SDPA
  over (B, kv_heads, groups, D)) instead of repeating keys and values;
* keys and values go into the cache it is given (the simulator's ``GrowingCache``, written in place).

Scope: ``supports(model)`` accepts ``LlamaForCausalLM`` with SiLU MLPs and no projection biases
(the embedded default and SmolLM2); any other model uses transformers' own forward. Rotary
embeddings come from the model's own ``rotary_emb`` module, so every RoPE variant it implements is
honoured. Inference only (no gradients, no dropout); the logits match transformers' forward to
float rounding (tested against it, with padding, drops and reorders).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supports(model) -> bool:
    """Whether ``LeanLlama`` computes this model's function (else use transformers' forward)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama" or type(model).__name__ != "LlamaForCausalLM":
        return False
    return (getattr(cfg, "hidden_act", "silu") == "silu" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and getattr(cfg, "pretraining_tp", 1) == 1)


class LeanLlama:
    """Inference forward over a ``LlamaForCausalLM``'s weights (shared, not copied, except the fused
    q/k/v and gate/up matrices, built once). Rebuild it if the model's weights change."""

    def __init__(self, model):
        if not supports(model):
            raise ValueError(f"LeanLlama: {type(model).__name__} ({getattr(model.config, 'model_type', '?')}) is "
                             "not a plain LlamaForCausalLM; use transformers' forward")
        cfg, base = model.config, model.model
        self.model = model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.embed = base.embed_tokens.weight
        self.rotary = base.rotary_emb
        self.norm = base.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = []
        with torch.no_grad():
            for layer in base.layers:
                att, mlp = layer.self_attn, layer.mlp
                self.layers.append({
                    "ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
                    "qkv": torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).contiguous(),
                    "o": att.o_proj.weight, "scale": att.scaling,
                    "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
                    "down": mlp.down_proj.weight})

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor, cache,
                last_only: bool = True) -> torch.Tensor:
        """Logits of one step.

        input_ids, position_ids: (B, T) (T = 1 for a decode step, the padded prompt for prefill);
        key_mask: (B, L) bool, L = cached + T positions, True where a key is a real token; cache: a
        ``GrowingCache`` (or any transformers Cache) that receives this step's keys and values.
        Returns (B, V) logits of the last position with ``last_only``, else (B, T, V).
        """
        B, T = input_ids.shape
        H, Hk, D = self.heads, self.kv_heads, self.head_dim
        g = H // Hk
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary(x, position_ids)            # (B, T, D)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)      # (B, 1, T, D): broadcast over heads
        if T == 1:
            mask = key_mask[:, None, None, :]              # (B, 1, 1, L): one query sees every real key
        else:
            L = key_mask.shape[1]
            causal = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T)
            # a padding query sees no real key; let it see itself so that its softmax stays finite
            # (a NaN there would reach the cache; its output is never used, padding keys are masked)
            mask = (key_mask[:, None, None, :] & causal[None, None]) | _diagonal(T, L, x.device)[None, None]
        for i, w in enumerate(self.layers):
            h = self._rms(x, w["ln1"])
            qkv = F.linear(h, w["qkv"])                    # (B, T, (H + 2 Hk) D)
            q, k, v = qkv.split((H * D, Hk * D, Hk * D), dim=-1)
            q = self._rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)
            k = self._rope(k.view(B, T, Hk, D).transpose(1, 2), cos, sin)
            v = v.view(B, T, Hk, D).transpose(1, 2)
            k, v = cache.update(k, v, i)                   # (B, Hk, L, D)
            if T == 1 and g > 1:                           # the groups of a kv head as its queries
                a = F.scaled_dot_product_attention(q.reshape(B, Hk, g, D), k, v, attn_mask=mask, scale=w["scale"])
                a = a.reshape(B, 1, H * D)
            else:
                if g > 1:
                    k = k.repeat_interleave(g, dim=1)
                    v = v.repeat_interleave(g, dim=1)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=w["scale"])
                a = a.transpose(1, 2).reshape(B, T, H * D)
            x = x + F.linear(a, w["o"])
            h = self._rms(x, w["ln2"])
            gate, up = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w["down"])
        x = self._rms(x[:, -1] if last_only else x, self.norm)
        return F.linear(x, self.lm_head)


def _diagonal(T: int, L: int, device) -> torch.Tensor:
    """(T, L) bool: query t's own key position (L - T + t)."""
    eye = torch.zeros(T, L, dtype=torch.bool, device=device)
    eye[torch.arange(T), torch.arange(L - T, L)] = True
    return eye

