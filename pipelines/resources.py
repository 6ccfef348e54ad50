"""Run-level configuration: where data lives and which experiment to run.

The core never sees a Dagster type: ``Experiment.env_spec()`` / ``collect_config()`` build the core's
frozen dataclasses. Every field can be overridden per run in the Launchpad (resources section).
"""

from __future__ import annotations

import json
import os

import dagster as dg
from pydantic import field_validator

from dreamgym_core.collect import CollectConfig
from dreamgym_core.envs import EnvSpec


def data_root() -> str:
    return os.environ.get("DREAMGYM_DATA", os.path.abspath("data"))


class Experiment(dg.ConfigurableResource):
    """One experiment: environment, task counts, offline data mix."""

    env: str = "twx"
    """twx | textworld | scienceworld | lamp | alfworld (docs/environments.md; `dreamgym demo --env`
    uses CPU-sized counts per env, pipelines/cli.py demo_sizes)."""
    game: str = "twc"
    """The env's game: twc, cookingworld... (twx); all or one ALFWorld task type (alfworld)."""
    params: str = ""
    n_train_tasks: int = 300
    """Seed tasks (games) of the offline data; 300 x 5 episodes = about 24,000 transitions (half a
    minute to collect): M_exp's fidelity on unseen games rose with it (README, M_exp table)."""
    n_dev_tasks: int = 25
    n_test_tasks: int = 50
    eval_fold: str = "train"
    """Held-out evaluation games: "train" = unseen games of the training fold (same objects), "test" =
    the env's test fold (TWX twc: unseen objects, which a from-scratch model cannot know)."""
    heldout_start: int = 900
    """eval_fold="train": first held-out seed index (must be >= n_train_tasks)."""
    episodes_expert: int = 1
    episodes_noisy: int = 2
    episodes_random: int = 2
    epsilon: float = 0.3
    invalid_rate: float = 0.25
    """Share of noisy steps that try an invalid action, so M_exp sees enough rejections of each verb."""
    max_steps: int = 30
    seed: int = 0
    cache_dir: str = ""
    """Generated-game cache; '' = <data>/cache."""

    def env_spec(self) -> EnvSpec:
        return EnvSpec(env=self.env, game=self.game, params=self.params,
                       cache_dir=self.cache_dir or os.path.join(data_root(), "cache"))

    def collect_config(self) -> CollectConfig:
        return CollectConfig(episodes={"expert": self.episodes_expert, "noisy": self.episodes_noisy,
                                       "random": self.episodes_random},
                             epsilon=self.epsilon, invalid_rate=self.invalid_rate,
                             max_steps=self.max_steps, seed=self.seed)


class Launcher(dg.ConfigurableResource):
    """How the GPU stages (M_exp SFT, the loop's policy update) run.

    ``inprocess`` (default, CPU): inside the Dagster step, as before. ``accelerate``: as
    ``[*launch, "-m", "pipelines.accelerate_entry", <stage>, <spec.json>]`` through Dagster Pipes;
    only rank 0 reports back (shared/notes/dagster-idioms.md §3).
    """

    mode: str = "inprocess"
    """inprocess | accelerate."""
    launch: list[str] = ["accelerate", "launch"]
    """The launcher command, e.g. ``["accelerate", "launch", "--multi_gpu", "--num_processes", "8"]`` or
    ``["accelerate", "launch", "--config_file", "fsdp.yaml"]``. On CPU, ``--cpu`` always gives one process:
    two CPU ranks need ``--multi_gpu --num_processes 2`` (gloo)."""

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        if mode not in ("inprocess", "accelerate"):
            raise ValueError(f"Launcher.mode={mode!r}: use 'inprocess' or 'accelerate'")
        return mode

    def command(self, stage: str, spec_path: str) -> list[str]:
        return [*self.launch, "-m", "pipelines.accelerate_entry", stage, spec_path]

    def run(self, context: dg.AssetExecutionContext, stage: str, spec: dict,
            spec_path: str) -> dg.PipesClientCompletedInvocation:
        """Write ``spec`` to ``spec_path`` (every rank reads it) and run ``stage`` under the launcher."""
        os.makedirs(os.path.dirname(spec_path), exist_ok=True)
        with open(spec_path + ".tmp", "w") as f:
            json.dump(spec, f, indent=2, sort_keys=True)
        os.replace(spec_path + ".tmp", spec_path)
        context.log.info(f"launching {stage}: {' '.join(self.command(stage, spec_path))}")
        return dg.PipesSubprocessClient().run(command=self.command(stage, spec_path), context=context)
