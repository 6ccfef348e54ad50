"""bench.gpu_check: refuses on a CPU-only machine without --smoke; the smoke mode runs both sections."""

import pytest
import torch

from bench import gpu_check


@pytest.fixture
def no_gpu(monkeypatch):
    from dreamgym_core import device

    monkeypatch.delenv(device.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_refuses_without_an_accelerator(no_gpu, capsys):
    assert gpu_check.main([]) == 2
    assert "no accelerator" in capsys.readouterr().err


def test_smoke_mode_runs_both_sections_on_cpu(no_gpu, capsys):
    assert gpu_check.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "error" not in out
    assert "mfu_vs_measured" in out and "batched_tokens_s" in out and "one_at_a_time_tokens_s" in out
    mfu = float(out.split("mfu_vs_measured")[1].split()[0])
    assert 0 < mfu < 1
