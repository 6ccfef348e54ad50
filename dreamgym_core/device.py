"""Where models run, decided in one place: the accelerator when present (bf16 where supported), else CPU fp32.

The paper trains and serves its models on GPUs; this repo's CPU default is fp32 (bf16 matmuls on
this CPU class are about 400x slower, ``models.py``). Every model load (``models.load_checkpoint``:
M_exp as the simulator, M_task, the policies under evaluation) and every ``Accelerator`` asks here.

- Inference (``placement()``): the weights move to the accelerator in bf16 when it supports bf16,
  fp32 otherwise; on CPU they stay fp32.
- Training (``placement(training=True)``): the weights stay fp32 (AdamW on bf16 weights loses small
  updates) and ``mixed_precision="bf16"`` tells accelerate to run the forward and backward under bf16
  autocast; ``accelerator()`` builds that ``Accelerator``, and ``prepare`` moves the model.

``DREAMGYM_DEVICE`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:1`` ...) overrides the choice, e.g. to keep
a second process off a GPU that training holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ENV_VAR = "DREAMGYM_DEVICE"


@dataclass(frozen=True)
class Placement:
    """Where a model goes and in which dtype."""

    device: str
    """"cpu", "cuda", "cuda:1", "mps"."""
    dtype: torch.dtype
    """The weights' dtype: fp32 on CPU and for training; bf16 for inference on an accelerator that has it."""
    mixed_precision: str = "no"
    """accelerate's ``mixed_precision`` for training: "bf16" on an accelerator with bf16, else "no"."""

    @property
    def accelerated(self) -> bool:
        return self.device != "cpu"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _bf16_ok(device: str) -> bool:
    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    return False  # mps: bf16 matmuls exist on recent macOS only; fp32 is the safe choice


def _detect() -> str:
    want = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if want == "cpu":
        return "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{ENV_VAR}={want} but torch sees no CUDA device; unset it or use cpu")
        return want
    if want == "mps":
        return "mps"
    if want != "auto":
        raise ValueError(f"{ENV_VAR} must be auto, cpu, cuda[:N] or mps, got {want!r}")
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def placement(training: bool = False) -> Placement:
    """The placement for a model that serves (``training=False``) or trains (see the module docstring)."""
    device = _detect()
    bf16 = _bf16_ok(device)
    if training:
        return Placement(device, torch.float32, "bf16" if bf16 else "no")
    return Placement(device, torch.bfloat16 if bf16 else torch.float32)


def place(model: torch.nn.Module, training: bool = False) -> torch.nn.Module:
    """``model`` moved to ``placement(training)`` (its device and dtype), returned for chaining."""
    p = placement(training)
    return model.to(device=p.device, dtype=p.dtype)


def accelerator(**kwargs):
    """An ``accelerate.Accelerator`` on the chosen device with bf16 mixed precision where supported."""
    from accelerate import Accelerator

    p = placement(training=True)
    return Accelerator(cpu=p.device == "cpu", mixed_precision=p.mixed_precision, **kwargs)
