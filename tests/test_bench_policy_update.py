import pytest
import torch

from bench.policy_update import forward_flops
from dreamgym_core.policy import _ids, score_candidates


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_models import tiny_llama

    lines = [f"Task: tidy\nobjects: apple{i} | fridge\nAction: take apple{i}" for i in range(100)]
    model, tok = tiny_llama(tmp_path_factory.mktemp("tok"), lines, 300, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, attn_implementation="eager")
    return model.eval(), tok


def test_forward_flops_matches_torchs_counter_on_the_matmuls(tiny):
    """The dense part (projections, MLP, LM head) against torch's FlopCounterMode on a real
    ``score_candidates`` call; the attention part against a plain loop over tokens."""
    from torch.utils.flop_counter import FlopCounterMode

    model, tok = tiny
    c = model.config
    prompt = "Task: tidy\nobjects: apple3 | fridge\n" * 3
    cands = [f"take apple{i}" for i in range(10, 40)]
    n = len(_ids(tok, " " + cands[0] + "\n"))
    cands = [a for a in cands if len(_ids(tok, " " + a + "\n")) == n][:3]  # equal lengths: no padding
    assert len(cands) == 3 and n > 1
    p = len(_ids(tok, prompt))
    with FlopCounterMode(display=False) as fc:
        score_candidates(model, tok, [prompt], [cands])
    counts = fc.get_flop_counts()["Global"]
    dense = sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))
    hd, q = c.hidden_size // c.num_attention_heads, c.hidden_size
    attn = 0  # plain loop: every token attends to the real keys up to itself, QK^T and AV
    for pos in range(p):
        attn += c.num_hidden_layers * 2 * (2 * q * (pos + 1))
    for _ in cands:
        for k in range(n - 1):
            attn += c.num_hidden_layers * 2 * (2 * q * (p + k + 1))
    total = forward_flops(c, p, [n] * len(cands))
    assert total - attn == dense  # the LM head only where logits are read: the prompt's last position
    assert hd * c.num_attention_heads == q
    # more candidates, more FLOPs; a longer prompt, more per token (attention)
    assert forward_flops(c, p, [n] * 4) > total and forward_flops(c, 2 * p, [n] * 3) > 2 * total - forward_flops(c, 0, [n] * 3)
