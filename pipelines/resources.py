"""Run-level configuration: where data lives and which experiment to run.

The core never sees a Dagster type: ``Experiment.env_spec()`` / ``collect_config()`` build the core's
frozen dataclasses. Every field can be overridden per run in the Launchpad (resources section).
"""

from __future__ import annotations

import os

import dagster as dg

from dreamgym_core.collect import CollectConfig
from dreamgym_core.envs import EnvSpec


def data_root() -> str:
    return os.environ.get("DREAMGYM_DATA", os.path.abspath("data"))


class Experiment(dg.ConfigurableResource):
    """One experiment: environment, task counts, offline data mix."""

    env: str = "twx"
    game: str = "twc"
    params: str = ""
    n_train_tasks: int = 100
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
    invalid_rate: float = 0.15
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
