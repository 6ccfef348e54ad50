"""dreamgym_core.device: one placement rule; on this CPU machine, cpu/fp32 everywhere.

The accelerator branch is tested with a faked ``torch.cuda`` (no GPU needed); the model-loading test
checks that ``models.load_checkpoint`` follows the rule.
"""

import pytest
import torch

from dreamgym_core import device


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.delenv(device.ENV_VAR, raising=False)

    def fake(available: bool, bf16: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    return fake


def test_cpu_is_fp32(fake_cuda):
    fake_cuda(False, False)
    assert device.placement() == device.Placement("cpu", torch.float32, "no")
    assert device.placement(training=True) == device.Placement("cpu", torch.float32, "no")
    assert not device.placement().accelerated


def test_cuda_with_bf16_serves_bf16_and_trains_fp32_under_bf16_autocast(fake_cuda):
    fake_cuda(True, True)
    assert device.placement() == device.Placement("cuda", torch.bfloat16, "no")
    assert device.placement().dtype_name == "bfloat16"
    assert device.placement(training=True) == device.Placement("cuda", torch.float32, "bf16")


def test_cuda_without_bf16_stays_fp32(fake_cuda):
    fake_cuda(True, False)
    assert device.placement() == device.Placement("cuda", torch.float32, "no")
    assert device.placement(training=True).mixed_precision == "no"


def test_env_override(fake_cuda, monkeypatch):
    fake_cuda(True, True)
    monkeypatch.setenv(device.ENV_VAR, "cpu")
    assert device.placement() == device.Placement("cpu", torch.float32, "no")
    monkeypatch.setenv(device.ENV_VAR, "cuda:1")
    assert device.placement().device == "cuda:1"
    monkeypatch.setenv(device.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="DREAMGYM_DEVICE must be"):
        device.placement()
    fake_cuda(False, False)
    monkeypatch.setenv(device.ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        device.placement()


def test_this_machine_loads_checkpoints_on_cpu_fp32(tmp_path, monkeypatch):
    """On the CPU test machine the real (unfaked) rule picks cpu/fp32, and load_checkpoint follows it."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: the CPU rule is covered by the faked tests")
    monkeypatch.delenv(device.ENV_VAR, raising=False)
    assert device.placement() == device.Placement("cpu", torch.float32, "no")
    from dreamgym_core.models import build_tiny_llama, load_checkpoint, save_checkpoint, train_tokenizer

    tok = train_tokenizer(["go north", "open the fridge", "take apple"] * 20, str(tmp_path / "tok"), vocab_size=300)
    from dreamgym_core.models import TinyLlamaConfig

    save_checkpoint(build_tiny_llama(tok, TinyLlamaConfig(hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32)),
                    tok, str(tmp_path / "ckpt"), {})
    for training in (False, True):
        model, _, _ = load_checkpoint(str(tmp_path / "ckpt"), training=training)
        p = next(model.parameters())
        assert p.device.type == "cpu" and p.dtype == torch.float32


def test_accelerator_on_cpu_has_no_mixed_precision(fake_cuda):
    fake_cuda(False, False)
    acc = device.accelerator()
    assert acc.device.type == "cpu" and acc.mixed_precision == "no"
