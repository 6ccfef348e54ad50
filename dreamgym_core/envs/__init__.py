"""Environment adapters behind one protocol (``base.Env`` / ``base.BatchEnv``).

``make_env`` is the single dispatch point from an ``EnvSpec`` to an adapter; heavy engines are
imported only when chosen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Callable

from dreamgym_core.envs.base import NO_SIDE_CHANNELS, BatchEnv, Env, EnvCrash, Observation, SerialBatchEnv, \
    SideChannels, StepResult, safe_step

ENV_NAMES = ("twx", "textworld", "scienceworld", "lamp", "alfworld", "miniwob")


@dataclass(frozen=True)
class EnvSpec:
    """Which environment to build."""

    env: str = "twx"
    """Adapter: twx (TextWorldExpress) | textworld (tw-make challenges) | scienceworld | lamp (a learner
    check with a known optimum, ``envs.lamp``) | alfworld (locally generated ALFWorld games) | miniwob
    (MiniWoB++ web pages in headless Chromium)."""
    game: str = "twc"
    """TWX game name, TextWorld challenge (tw-simple, tw-cooking, ...), ScienceWorld task name, ALFWorld
    task type ("all" = the six in turn), or MiniWoB task(s): ``mix`` or comma-separated names from
    ``miniwob_state.TASKS``."""
    params: str = ""
    """TWX and lamp: "k=v,k=v" game params ('' = the adapter's default). TextWorld/ScienceWorld: a JSON object."""
    step_limit: int = 100
    cache_dir: str = "data/cache"
    """Where generated games (TextWorld) are cached."""

    def __post_init__(self) -> None:
        if self.env not in ENV_NAMES:
            raise ValueError(f"EnvSpec.env must be one of {ENV_NAMES}, got {self.env!r}")
        if self.env not in ("twx", "lamp") and self.params:
            try:
                if not isinstance(json.loads(self.params), dict):
                    raise ValueError
            except ValueError:
                raise ValueError(f"EnvSpec.params for {self.env} must be a JSON object, got {self.params!r}") from None


def make_env(spec: EnvSpec) -> Env:
    match spec.env:
        case "twx":
            from dreamgym_core.envs.twx import TWXEnv

            return TWXEnv(spec.game, spec.params or None, step_limit=spec.step_limit)
        case "textworld":
            from dreamgym_core.envs.textworld_env import TextWorldEnv

            return TextWorldEnv(spec.game, json.loads(spec.params or "{}"), cache_dir=spec.cache_dir,
                                step_limit=spec.step_limit)
        case "scienceworld":
            from dreamgym_core.envs.scienceworld_env import ScienceWorldEnv

            return ScienceWorldEnv(spec.game, json.loads(spec.params or "{}"), step_limit=spec.step_limit)
        case "lamp":
            from dreamgym_core.envs.lamp import LampEnv

            return LampEnv(spec.params)
        case "alfworld":
            from dreamgym_core.envs.alfworld_env import ALFWorldEnv

            # the spec's default game is TWX's twc: Experiment(env="alfworld") alone means all task types
            game = "all" if spec.game == "twc" else spec.game
            return ALFWorldEnv(game, json.loads(spec.params or "{}"), cache_dir=spec.cache_dir,
                               step_limit=spec.step_limit)
        case "miniwob":
            from dreamgym_core.envs.miniwob_env import MiniWoBEnv

            return MiniWoBEnv(spec.game, step_limit=spec.step_limit)
    raise AssertionError(spec.env)  # unreachable: validated in EnvSpec


def state_candidate_rule(env: str, game: str = "") -> Callable[[str], list[str]] | None:
    """The adapter's candidate rule from an abstract state alone, without starting its engine (the
    offline-only path has no engine to start); None for an env with no such rule here (lamp's depends
    on its params; an env of imported logs may have no adapter at all)."""
    match env:
        case "twx":
            from dreamgym_core.envs.twx import propose_candidates

            return partial(propose_candidates, game=game or "twc")
        case "textworld":
            from dreamgym_core.envs.textworld_env import propose_candidates

            return partial(propose_candidates, challenge=game or "tw-simple")
        case "scienceworld":
            from dreamgym_core.envs.scienceworld_env import propose_candidates

            return propose_candidates
        case "alfworld":
            from dreamgym_core.envs.alfworld_env import propose_candidates

            return propose_candidates
        case "miniwob":
            from dreamgym_core.envs.miniwob_env import propose_candidates

            return propose_candidates
    return None


def side_channels(env: str, game: str = "", offline: bool = False) -> SideChannels:
    """What the adapter ``env`` declares it offers M_exp for ``game`` beyond the paper's inputs
    (``SideChannels``), read off its class without starting an engine; ``offline`` (the imported-logs
    path): none, whatever env the logs name."""
    if offline:
        return NO_SIDE_CHANNELS
    match env:
        case "twx":
            from dreamgym_core.envs.twx import TWXEnv as adapter
        case "textworld":
            from dreamgym_core.envs.textworld_env import TextWorldEnv as adapter
        case "scienceworld":
            from dreamgym_core.envs.scienceworld_env import ScienceWorldEnv as adapter
        case "lamp":
            from dreamgym_core.envs.lamp import LampEnv as adapter
        case "alfworld":
            from dreamgym_core.envs.alfworld_env import ALFWorldEnv as adapter
        case "miniwob":
            from dreamgym_core.envs.miniwob_env import MiniWoBEnv as adapter
        case _:
            raise ValueError(f"side_channels: unknown env {env!r}; known: {', '.join(ENV_NAMES)}")
    return adapter.side_channels(game or EnvSpec.game)


__all__ = ["BatchEnv", "Env", "EnvCrash", "EnvSpec", "NO_SIDE_CHANNELS", "Observation", "SerialBatchEnv",
           "SideChannels", "StepResult", "make_env", "safe_step", "side_channels", "state_candidate_rule",
           "ENV_NAMES"]
