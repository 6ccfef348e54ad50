"""Tiny models the tests build locally (no hub access)."""


def tiny_llama(folder, lines, vocab_size, **llama):
    """A byte-level BPE trained on ``lines`` in ``folder`` and a random tied-embedding Llama over it
    (``llama``: LlamaConfig fields besides the vocabulary); seed 0. Returns (model, tokenizer)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    (folder / "c.txt").write_text("\n".join(lines))
    bpe = ByteLevelBPETokenizer()
    bpe.train(files=[str(folder / "c.txt")], vocab_size=vocab_size, min_frequency=1,
              special_tokens=["<|pad|>", "<|eos|>"])
    bpe.save(str(folder / "tok.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tok.json"), pad_token="<|pad|>", eos_token="<|eos|>")
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **llama)), tok
