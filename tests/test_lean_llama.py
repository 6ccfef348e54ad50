import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from dreamgym_core.experience_model import GrowingCache
from dreamgym_core.lean_llama import LeanLlama, supports


def _model(kv_heads=2, **kw):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv_heads,
                                        max_position_embeddings=128, **kw)).eval()


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query and plain multi-head attention
def test_lean_forward_gives_transformers_logits_through_padding_drops_and_reorders(kv_heads):
    model = _model(kv_heads)
    lean = LeanLlama(model)
    torch.manual_seed(1)
    inp = torch.randint(0, 97, (4, 9))
    attn = torch.ones_like(inp)
    attn[1, :4] = 0  # left padding
    attn[3, :1] = 0
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=inp, attention_mask=attn, position_ids=pos, past_key_values=DynamicCache(),
                    use_cache=True)
        cache = GrowingCache(32)
        got = lean.forward(inp, pos, attn.bool(), cache, last_only=False)
        real = attn.bool()
        torch.testing.assert_close(got[real], ref.logits[real], rtol=1e-4, atol=1e-5)  # padded positions are free
        assert torch.isfinite(got).all()
        ref_cache, a, npos = ref.past_key_values, attn.clone(), attn.sum(-1, keepdim=True)
        nxt = ref.logits[:, -1].argmax(-1)
        for t in range(5):
            keep = {1: torch.tensor([0, 1, 3]), 3: torch.tensor([2, 0, 1])}.get(t)  # a drop, then a permutation
            if keep is not None:
                ref_cache.reorder_cache(keep)
                cache.reorder_cache(keep)
                nxt, a, npos = nxt[keep], a[keep], npos[keep]
            a = torch.cat([a, a.new_ones((a.shape[0], 1))], 1)
            want = model(input_ids=nxt[:, None], attention_mask=a, position_ids=npos, past_key_values=ref_cache,
                         use_cache=True).logits[:, -1]
            torch.testing.assert_close(lean.forward(nxt[:, None], npos, a.bool(), cache), want, rtol=1e-4, atol=1e-5)
            nxt, npos = want.argmax(-1), npos + 1


def test_only_plain_llama_models_are_taken():
    assert supports(_model())
    assert not supports(_model(attention_bias=True))
    assert not supports(_model(hidden_act="gelu"))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LeanLlama(_model(mlp_bias=True))
    from transformers import GPT2Config, GPT2LMHeadModel

    assert not supports(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
