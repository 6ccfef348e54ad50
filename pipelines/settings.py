"""Dagster config -> core config, through one conversion.

The core's frozen dataclasses (``RLConfig``, ``LoopConfig``, ``CurriculumConfig``, ``SFTConfig``...)
hold the documented fields and their checks; the Dagster ``Config`` classes and resources hold the
run-level overrides a user edits in the Launchpad. ``core(cls, *sources, **values)`` builds ``cls``
from the fields of ``sources`` that carry the same name (later sources win), plus ``values`` the
asset computes itself; lists become tuples where the core field is a tuple; a core field that no
source names keeps its core default. Nothing is copied by hand field by field.

``CONVERSIONS`` lists every (Dagster class, core class) pair the assets convert, with the core
fields the Dagster side deliberately does not expose (and why); ``tests/test_settings.py`` checks
that every other core field is reachable from the Dagster class under the same name, that every
Dagster field lands somewhere (a core field or the pair's ``asset_level`` list), and that the types agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def core(cls, *sources: Any, **values: Any):
    """``cls`` (a core dataclass) from the same-named fields of ``sources`` and then ``values``.

    ``values`` must name fields of ``cls`` (a misspelt one is an error, not a silent default)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    kw: dict[str, Any] = {}
    for src in sources:
        dump = src.model_dump() if hasattr(src, "model_dump") else dataclasses.asdict(src)
        kw.update({k: v for k, v in dump.items() if k in names})
    kw.update(values)
    for k, v in kw.items():
        if isinstance(v, list) and isinstance(names[k].default, tuple):
            kw[k] = tuple(v)
    return cls(**kw)


@dataclass(frozen=True)
class Conversion:
    """A Dagster class and the core classes the assets build from it."""

    dagster: type
    cores: tuple[type, ...]
    not_exposed: dict[str, str] = field(default_factory=dict)
    """Core fields the Dagster class leaves out on purpose -> why (the asset sets it, or it is fixed)."""
    asset_only: tuple[str, ...] = ()
    """Dagster fields no core class has: the asset itself reads them."""
    own_defaults: tuple[str, ...] = ()
    """Shared fields whose pipeline default differs from the core default on purpose (documented at the field)."""


def conversions() -> list[Conversion]:
    """Every conversion the assets make (imported lazily: the asset modules import this one)."""
    from assets.experience import ExperienceModelConfig, FidelityConfig
    from assets.loop import LoopSettings
    from assets.policy import PolicyInitAssetConfig, RLSettings
    from dreamgym_core.curriculum import CurriculumConfig
    from dreamgym_core.evaluation import FidelityEvalConfig
    from dreamgym_core.experience.sft_setup import SFTDataConfig
    from dreamgym_core.experience_model import PromptConfig, SFTConfig
    from dreamgym_core.loop import LoopConfig
    from dreamgym_core.models import TinyLlamaConfig
    from dreamgym_core.policy_init import PolicyInitConfig
    from dreamgym_core.rl.trainer import RLConfig

    fixed = "fixed by how M_task was trained"
    return [
        Conversion(RLSettings, (RLConfig,), own_defaults=("lr", "kl_coef")),
        Conversion(LoopSettings, (LoopConfig, CurriculumConfig),
                   {"rollout_batch": "sized to M_exp's batch (SimConfig.batch_size)",
                    "enabled": "LoopSettings.curriculum", "seeds_per_prompt": fixed, "max_state_chars": fixed,
                    "cluster_size": "PPO's task clusters: fixed"},
                   asset_only=("curriculum", "replay_buffer", "mexp_sampling")),
        Conversion(PolicyInitAssetConfig, (PolicyInitConfig,)),
        Conversion(FidelityConfig, (FidelityEvalConfig,)),
        Conversion(ExperienceModelConfig, (SFTConfig, PromptConfig, TinyLlamaConfig, SFTDataConfig),
                   {"warmup": "the schedule's fixed warmup", "checkpoint_every": "fixed at 100 steps",
                    "heads": "fixed (TinyLlamaConfig)",
                    "kv_heads": "fixed", "intermediate": "fixed", "max_positions": "fixed"},
                   own_defaults=("steps", "max_len", "time_budget_s", "history_window", "num_demos")),
    ]
