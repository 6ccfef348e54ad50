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


class OfflineOnlyError(dg.Failure):
    """A step asked for something the offline-only path does not have (a live env), or its logs are unusable.
    A ``dg.Failure``: Dagster shows its one-line description, not a traceback."""

    def __init__(self, message: str):
        super().__init__(description=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


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
    logs: str = ""
    """The offline-only path (docs/environments.md): a trajectory log in ``dreamgym import``'s format
    (JSONL or Parquet), or a table ``dreamgym import`` wrote (a path, or its NAME under
    <data>/parquet/imported_trajectories). Set: the tasks, the offline trajectories and the held-out
    logs all come from it, ``env``/``game`` only name what the logs are of (for ``live_scoring``), M_exp
    gets no side channel (``dreamgym_core.envs.NO_SIDE_CHANNELS``: no dense score, placement or
    affordance hints, candidates read off the logs), the loop runs in M_exp alone, and no step starts a
    live env (real_rl_policy and s2r_policy refuse to run; see ``live_scoring``)."""
    heldout_share: float = 0.2
    """logs: share of the logged train tasks held out for evaluation (by a hash of the task id) when the
    logs have no test split of their own (``dreamgym_core.offline.split_logs``)."""
    live_scoring: bool = False
    """logs: also score policies in the live env/game named above (policy_eval, iteration_eval, when the
    env exists); M_exp's data, its training and the loop's rollouts still never touch it."""

    @property
    def offline(self) -> bool:
        """The offline-only path: experience comes from ``logs``, not from a live env."""
        return bool(self.logs)

    def env_spec(self) -> EnvSpec:
        """The live env. On the offline-only path this raises (one line): a step that needs a live env was asked for."""
        if self.offline and not self.live_scoring:
            raise OfflineOnlyError(f"experiment.logs is set ({self.logs}): this run is offline-only and has no live "
                                   "env; this step needs one (set experiment.live_scoring to score in "
                                   f"{self.env}/{self.game}, or drop experiment.logs)")
        return EnvSpec(env=self.env, game=self.game, params=self.params,
                       cache_dir=self.cache_dir or os.path.join(data_root(), "cache"))

    def require_training_env(self, step: str) -> None:
        """Steps that TRAIN in the live env (real_rl_policy, s2r_policy) never run on the offline-only path."""
        if self.offline:
            raise OfflineOnlyError(f"{step} trains in a live env, and this run is offline-only (experiment.logs = "
                                   f"{self.logs}): only M_exp is there to learn in; drop {step} from the run")

    def logs_path(self) -> str:
        """``logs`` as a file: the path itself, or an imported table's NAME under <data>/parquet/imported_trajectories."""
        if os.path.exists(self.logs):
            return os.path.abspath(self.logs)
        named = os.path.join(data_root(), "parquet", "imported_trajectories", f"{self.logs}.parquet")
        if os.path.exists(named):
            return named
        raise OfflineOnlyError(f"experiment.logs: no file {self.logs!r} and no import named {self.logs!r} "
                               f"under {os.path.dirname(named)} (`dreamgym import FILE --name NAME`)")

    def log_split(self):
        """The logs split into train / dev / test trajectories (``dreamgym_core.offline.split_logs``)."""
        from dreamgym_core.importer import TrajectoryImportError
        from dreamgym_core.offline import read_logs, split_logs

        path = self.logs_path()
        try:
            return split_logs(read_logs(path, env=self.env), self.heldout_share, self.seed)
        except (TrajectoryImportError, ValueError) as exc:
            raise OfflineOnlyError(f"experiment.logs {path}: {exc}") from None

    def source_key(self):
        """What this experiment's experience comes from, for reuse keys: the live env, or the logs."""
        if self.offline:
            return {"logs": self.logs, "heldout_share": self.heldout_share,
                    "live_scoring": self.live_scoring, "env": self.env, "game": self.game}
        return self.env_spec()

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
