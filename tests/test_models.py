import pytest
import torch

from dreamgym_core.models import (
    FORMAT_TOKENS, TinyLlamaConfig, build_tiny_llama, load_causal_lm, load_checkpoint, save_checkpoint,
    train_tokenizer,
)

LINES = [f"valid: yes\nfeedback: You take the apple{i}.\nobjects: -counter: apple{i} | +counter: empty" for i in range(300)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(LINES, str(tmp_path_factory.mktemp("tok")), vocab_size=400)


def test_tokenizer_round_trips_and_keeps_format_fields_whole(tok, tmp_path):
    text = "<think>why</think>\nvalid: yes\nobjects: -counter: apple7"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    for field in FORMAT_TOKENS:
        assert len(tok(field, add_special_tokens=False)["input_ids"]) == 1, field
    assert tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>"
    again = train_tokenizer(LINES, str(tmp_path / "again"), vocab_size=400)
    assert again(text)["input_ids"] == tok(text)["input_ids"]        # deterministic


def test_tiny_llama_learns_and_checkpoints_round_trip(tok, tmp_path):
    model = build_tiny_llama(tok, TinyLlamaConfig(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64))
    x = torch.tensor([tok(LINES[3])["input_ids"]] * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(15):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7
    path = save_checkpoint(model, tok, str(tmp_path / "ckpt"), {"step": 15, "parent": None})
    back, tok2, meta = load_checkpoint(path)
    assert meta["step"] == 15 and len(tok2) == len(tok)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x).logits, back(x).logits, atol=1e-5)
    assert not list(tmp_path.glob("*.tmp"))


def test_config_and_loader_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="divisible by heads"):
        TinyLlamaConfig(hidden=30, heads=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="pass a local model path"):
        load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ValueError, match="slower than float32"):
        load_causal_lm(str(tmp_path), dtype="bfloat16")
    with pytest.raises(ValueError, match="cannot load causal LM") as err:
        load_causal_lm(str(tmp_path))
    assert "\n" not in str(err.value)
